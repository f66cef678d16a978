"""The distribution base class: a generative function with one choice at the empty address.

A concrete distribution only has to say how to *sample*, how to *score* and what its
parameters must satisfy; the GFI methods (simulate, generate, update, regenerate, project,
gradients) and argument validation are written once here.

Contract for subclasses
-----------------------
- ``sample(*params) -> Tensor``: draws one value.  Must work under
  ``torch.func.vmap(randomness="different")`` (no in-place randomness into unbatched tensors,
  no ``.item()``, no data-dependent Python control flow) and on any device (allocate with
  ``*_like`` or ``device=param.device``).  Where the math allows it the sample is
  *reparameterized*: differentiable with respect to the parameters (set ``reparameterized``).
- ``logpdf(value, *params) -> Tensor``: the log density (or log mass), elementwise in the
  broadcast shape (one entry per event for multivariate distributions); the base class sums
  it to the scalar score.  Must be differentiable in ``value`` (continuous distributions) and
  in the parameters, also under vmap/grad.
- ``param_constraints``: one :class:`Constraint` per parameter (aligned with
  ``param_names``): what a valid value is (:data:`REAL`, :data:`POSITIVE`,
  :data:`PROBABILITY`, :data:`POSITIVE_DEFINITE`, ...) and how many trailing dimensions one
  value of the parameter has (its ``event_dim``).  ``relations`` adds ordering constraints
  between parameters (``("low", "<", "high")``).  :meth:`DistributionMethods.check_args`
  validates all of it in one shared routine, outside vmap only, and raises
  :class:`gfcomb.core.errors.DistributionArgumentError` naming the distribution and the
  argument (a @gen caller adds the address).
- ``event_shape(params)``: the shape of one event (``()`` for univariate distributions);
  together with the broadcast batch shape of the parameters it gives the shape of a value
  (:meth:`DistributionMethods.value_shape`), against which constrained values are checked.
- Class attributes: ``name`` (str), ``param_names`` (tuple of str), ``discrete`` (bool),
  ``reparameterized`` (bool).

Parameters are converted to tensors once per GFI call (:func:`param_tensors`: one floating dtype,
the device of the tensor parameters; Python numbers become cached constant tensors), so
``sample`` and ``logpdf`` get tensors and their own conversion is a no-op.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
from torch._C import _functorch

from gfcomb.core.address import normalize
from gfcomb.core.batching import inside_functorch_transform
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange
from gfcomb.core.errors import (
    AddressError,
    DistributionArgumentError,
    MissingChoiceError,
    UnvisitedConstraintError,
)
from gfcomb.core.gfi import GenerativeFunction, as_choicemap, check_args_tuple
from gfcomb.core.pytree import register_record
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.core.validation import check_param_type, check_selection, checked_sample

_Number = (int, float)


def as_tensor(x: Any) -> torch.Tensor:
    """Turn a parameter into a tensor (Python numbers get the default float dtype)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, bool):
        return torch.tensor(float(x))
    if isinstance(x, _Number):
        return torch.tensor(float(x), dtype=torch.get_default_dtype())
    return torch.as_tensor(x, dtype=torch.get_default_dtype())


# ============================================================ converting parameters to tensors
_CONSTANTS: dict[tuple[Any, ...], torch.Tensor] = {}
_CONSTANT_VALUES: dict[int, tuple[torch.Tensor, float]] = {}  # id(tensor) -> (tensor, number)
_MAX_CONSTANTS = 4096


def constant_tensor(x: Any, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """``torch.as_tensor(x, dtype=dtype, device=device)``, cached for Python numbers.

    The cached tensors never leave the distribution layer (samplers and log densities only
    compute with them), so sharing one per (value, dtype, device) is safe.  Nothing is cached
    that a transform has wrapped (made under ``grad``; under ``vmap`` factories give plain
    tensors), nor while inference mode or a torch function mode (``set_default_device``) is
    active: a tensor made there could not be reused everywhere.
    """
    if not isinstance(x, _Number):
        return torch.as_tensor(x, dtype=dtype, device=device)
    key = (x, math.copysign(1.0, x), dtype, device)  # copysign: 0.0 and -0.0 compare equal
    t = _CONSTANTS.get(key)
    if t is not None:
        return t
    t = torch.as_tensor(x, dtype=dtype, device=device)
    if (type(t) is torch.Tensor and not _functorch.is_functorch_wrapped_tensor(t)
            and not torch.is_inference_mode_enabled()
            and not torch._C._is_torch_function_mode_enabled()):
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
            _CONSTANT_VALUES.clear()
        _CONSTANTS[key] = t
        _CONSTANT_VALUES[id(t)] = (t, float(x))
    return t


def constant_value(t: Any) -> float | None:
    """The Python number a parameter tensor was made from by :func:`param_tensors` (a cached
    constant), else None.  Lets a log density do per-constant work in Python (``math.log``
    of a number scale) instead of as tensor operations."""
    hit = _CONSTANT_VALUES.get(id(t))
    if hit is not None and hit[0] is t:
        return hit[1]
    return None


def float_dtype(params: Sequence[Any]) -> torch.dtype:
    """The promoted floating dtype of the floating tensor parameters (default dtype if none)."""
    dtypes = [p.dtype for p in params if isinstance(p, torch.Tensor) and p.is_floating_point()]
    if not dtypes:
        return torch.get_default_dtype()
    return functools.reduce(torch.promote_types, dtypes)


def param_tensors(*params: Any) -> tuple[torch.Tensor, ...]:
    """Convert parameters to tensors of one floating dtype on the device of the tensor ones.

    Python numbers follow the tensors (as in ``torch.normal(t, 1.0)``) and are cached
    constants; integer tensors are promoted to the floating dtype.  Parameters that already
    are floating tensors of one dtype are returned as they are (the common case once a GFI
    method has converted them).  Works on BatchedTensors (only ``.to``/``as_tensor``).
    """
    dtype = None
    device = None
    same = True  # every parameter a floating tensor of one dtype
    for p in params:
        if isinstance(p, torch.Tensor):
            if device is None:
                device = p.device
            if p.is_floating_point():
                d = p.dtype
                if dtype is None:
                    dtype = d
                elif d is not dtype:
                    dtype = torch.promote_types(dtype, d)
                    same = False
            else:
                same = False
        else:
            same = False
    if same:
        return params
    if dtype is None:
        dtype = torch.get_default_dtype()
    return tuple((p if p.dtype is dtype else p.to(dtype)) if isinstance(p, torch.Tensor)
                 else constant_tensor(p, dtype, device) for p in params)


def _broadcast_shape(*shapes: Sequence[int]) -> tuple[int, ...]:
    """``torch.broadcast_shapes`` for shapes (a fast path for equal/scalar shapes; raises
    ValueError if they do not broadcast)."""
    out = tuple(shapes[0])
    for s in shapes[1:]:
        if len(s) == 0 or s == out:
            continue
        if not out:
            out = tuple(s)
            continue
        n = max(len(out), len(s))
        a = (1,) * (n - len(out)) + out
        b = (1,) * (n - len(s)) + tuple(s)
        res = []
        for x, y in zip(a, b):
            if x == y or y == 1:
                res.append(x)
            elif x == 1:
                res.append(y)
            else:
                raise ValueError(f"shapes {tuple(out)} and {tuple(s)} do not broadcast")
        out = tuple(res)
    return out


def broadcast_params(*params: Any) -> tuple[torch.Tensor, ...]:
    """:func:`param_tensors`, then ``torch.broadcast_tensors`` unless the shapes already agree."""
    ts = param_tensors(*params)
    shape = ts[0].shape
    if all(t.shape == shape for t in ts[1:]):
        return ts
    return tuple(torch.broadcast_tensors(*ts))


def _shape_of(p: Any) -> tuple[int, ...]:
    if isinstance(p, torch.Tensor):
        return tuple(p.shape)
    if isinstance(p, _Number) or p is None:
        return ()
    return tuple(as_tensor(p).shape)


# ================================================================ parameter constraints
NumberCheck = Callable[[Any], "str | None"]
TensorCheck = Callable[[torch.Tensor], "str | None"]


class Constraint:
    """What one distribution parameter must satisfy (besides being finite).

    ``event_dim`` trailing dimensions make one value of the parameter (0: a scalar per
    element, 1: a vector, 2: a matrix); the dimensions in front are batch dimensions, which
    must broadcast across the parameters.  ``number`` checks a Python number (or a one-element
    tensor read with ``.item()``), ``tensor`` checks a tensor; each returns None when the
    value is valid, else the requirement it breaks (``"must be > 0"``).  Either may be None
    (nothing to check beyond finiteness).
    """

    __slots__ = ("name", "event_dim", "number", "tensor")

    def __init__(self, name: str, event_dim: int = 0, number: NumberCheck | None = None,
                 tensor: TensorCheck | None = None) -> None:
        self.name = name
        self.event_dim = event_dim
        self.number = number
        self.tensor = tensor

    def __repr__(self) -> str:
        return f"Constraint({self.name!r})"


def _elementwise(name: str, requirement: str, number: Callable[[Any], bool],
                 tensor: Callable[[torch.Tensor], torch.Tensor]) -> Constraint:
    """A constraint checked element by element: ``number(x)`` / ``tensor(t).all()``."""
    return Constraint(
        name, 0,
        number=lambda x: None if number(x) else requirement,
        tensor=lambda t: None if bool(tensor(t).all()) else requirement)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) or float(x).is_integer()


def _int_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t == torch.floor(t)
    return torch.ones_like(t, dtype=torch.bool)


#: Any finite real number.
REAL = Constraint("real")
#: Finite and > 0.
POSITIVE = _elementwise("positive", "must be > 0", lambda x: x > 0, lambda t: t > 0)
#: Finite and >= 0.
NONNEGATIVE = _elementwise("nonnegative", "must be >= 0", lambda x: x >= 0, lambda t: t >= 0)
#: In [0, 1].
PROBABILITY = _elementwise("probability", "must lie in [0, 1]", lambda x: 0 <= x <= 1,
                           lambda t: (t >= 0) & (t <= 1))
#: In (0, 1].
POSITIVE_PROBABILITY = _elementwise("positive probability", "must lie in (0, 1]",
                                    lambda x: 0 < x <= 1, lambda t: (t > 0) & (t <= 1))
#: Integer-valued.
INTEGER = _elementwise("integer", "must be integer-valued", _is_int, _int_tensor)
#: Integer-valued and >= 0.
NONNEGATIVE_INTEGER = _elementwise(
    "nonnegative integer", "must be a non-negative integer (integer-valued and >= 0)",
    lambda x: _is_int(x) and x >= 0, lambda t: _int_tensor(t) & (t >= 0))


def _check_weights(t: torch.Tensor) -> str | None:
    if not bool((t >= 0).all()):
        return "must be >= 0"
    if not bool((t.sum(dim=-1) > 0).all()):
        return "must have a positive sum along the last dim"
    return None


def _check_positive(t: torch.Tensor) -> str | None:
    return None if bool((t > 0).all()) else "must be > 0"


def _check_spd(t: torch.Tensor) -> str | None:
    if t.shape[-1] != t.shape[-2]:
        return f"must be square with shape (..., d, d), got shape {tuple(t.shape)}"
    c = t if t.is_floating_point() else t.to(torch.get_default_dtype())
    tol = 1e3 * torch.finfo(c.dtype).eps
    scale = torch.clamp(c.abs().amax(dim=(-2, -1), keepdim=True), min=1.0)
    if not bool(((c - c.mT).abs() <= tol * scale).all()):
        return "must be symmetric"
    _, info = torch.linalg.cholesky_ex(c)
    if not bool((info == 0).all()):
        return "must be positive definite"
    return None


#: A vector of finite reals, shape (..., d).
REAL_VECTOR = Constraint("real vector", 1)
#: Non-negative category weights with a positive sum, shape (..., K) (need not be normalized).
WEIGHTS = Constraint("weights", 1, tensor=_check_weights)
#: A vector of positive reals, shape (..., K).
POSITIVE_VECTOR = Constraint("positive vector", 1, tensor=_check_positive)
#: A symmetric positive definite matrix, shape (..., d, d).
POSITIVE_DEFINITE = Constraint("positive definite", 2, tensor=_check_spd)

_EVENT_SHAPES = {1: "(..., d)", 2: "(..., d, d)"}
_RELATIONS: dict[str, tuple[Callable[[Any, Any], Any], str]] = {
    "<": (lambda a, b: a < b, ">"),
    "<=": (lambda a, b: a <= b, ">="),
}


def _shown(v: Any) -> Any:
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


class DistributionMethods:
    """The sampling / scoring / validation half of a distribution (see the module docstring)."""

    name: str = "distribution"
    param_names: tuple[str, ...] = ()
    #: One :class:`Constraint` per parameter; empty means every parameter is :data:`REAL`.
    param_constraints: tuple[Constraint, ...] = ()
    #: Ordering constraints between parameters: ``(a, "<" or "<=", b)`` by parameter name.
    relations: tuple[tuple[str, str, str], ...] = ()
    discrete: bool = False
    reparameterized: bool = False

    def sample(self, *params: Any) -> torch.Tensor:
        """Draw one value (vmap-safe; reparameterized when ``self.reparameterized``)."""
        raise NotImplementedError

    def logpdf(self, value: torch.Tensor, *params: Any) -> torch.Tensor:
        """Elementwise log density / log mass of ``value``."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shapes
    def event_shape(self, params: Sequence[torch.Tensor]) -> tuple[int, ...]:
        """The shape of one event (``()`` for univariate distributions)."""
        return ()

    def value_shape(self, params: Sequence[Any]) -> tuple[int, ...]:
        """The shape of a value: the broadcast batch shape of the parameters (each without its
        ``event_dim`` trailing dimensions) followed by :meth:`event_shape`.  Under vmap these
        are per-element shapes."""
        constraints = self._constraints()
        batch = _broadcast_shape(*[
            s[:len(s) - c.event_dim] if c.event_dim else s
            for s, c in ((_shape_of(p), c) for p, c in zip(params, constraints))])
        return batch + tuple(self.event_shape(params))

    @functools.cached_property
    def _knows_shapes(self) -> bool:
        """Whether the value shape can be derived: the distribution declares its
        ``param_constraints`` (with their event dims) or computes :meth:`value_shape` itself.
        A custom distribution that does neither gets no shape checks (its parameters'
        event dims are unknown)."""
        cls = type(self)
        return (bool(self.param_constraints)
                or cls.value_shape is not DistributionMethods.value_shape)

    @functools.cached_property
    def _elementwise(self) -> bool:
        """Univariate with the default value shape: a value has the broadcast shape of the
        (converted, tensor) parameters."""
        cls = type(self)
        return (all(c.event_dim == 0 for c in self._constraints())
                and cls.event_shape is DistributionMethods.event_shape
                and cls.value_shape is DistributionMethods.value_shape
                and cls._prepare is DistributionMethods._prepare)

    # ----------------------------------------------------------------- validation
    def _constraints(self) -> tuple[Constraint, ...]:
        return self.param_constraints or (REAL,) * len(self.param_names)

    def _fail(self, pname: str, requirement: str, value: Any) -> DistributionArgumentError:
        return DistributionArgumentError(
            f"{self.name}: argument {pname!r} {requirement}, got {_shown(value)}")

    def check_args(self, *params: Any) -> None:
        """Validate parameters outside vmap; raise DistributionArgumentError naming the argument.

        One routine for every distribution, driven by ``param_constraints`` and ``relations``:
        arity; per parameter finiteness and the shape of its events; that the batch shapes
        broadcast; per parameter its constraint; then the relations.  Python numbers (and
        one-element tensors, read with ``.item()``) are checked in plain Python.
        """
        self._check_arity(params)
        names = self.param_names
        constraints = self._constraints()
        values: list[Any] = []  # a Python number, or a tensor
        tensors: list[tuple[str, Any]] = []
        for pname, c, p in zip(names, constraints, params):
            check_param_type(self.name, pname, p)  # (a str or None: named, not torch's error)
            if isinstance(p, _Number):
                if c.event_dim:
                    raise self._fail(pname, f"must have shape {_EVENT_SHAPES[c.event_dim]}",
                                     f"a scalar {p!r}")
                if not math.isfinite(p):
                    raise self._fail(pname, "must be finite", p)
                values.append(p)
                continue
            t = p if isinstance(p, torch.Tensor) else as_tensor(p)
            tensors.append((pname, p))
            if c.event_dim and (t.dim() < c.event_dim or t.shape[-1] < 1):
                raise DistributionArgumentError(
                    f"{self.name}: argument {pname!r} must have shape "
                    f"{_EVENT_SHAPES[c.event_dim]} with at least one entry, "
                    f"got shape {tuple(t.shape)}")
            if t.numel() == 1 and t.device.type == "cpu" and not t.is_complex():
                x = t.item()
                if not math.isfinite(x):
                    raise self._fail(pname, "must be finite", t)
                values.append(x if not c.event_dim else t)
            else:
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise self._fail(pname, "must be finite", t)
                values.append(t)
        if len(tensors) > 1 and self._knows_shapes:
            try:
                self.value_shape(params)
            except (ValueError, RuntimeError):
                desc = ", ".join(f"{n}: {_shape_of(p)}" for n, p in zip(names, params))
                raise DistributionArgumentError(
                    f"{self.name}: argument shapes do not broadcast ({desc})") from None
        for pname, c, v in zip(names, constraints, values):
            if isinstance(v, torch.Tensor):
                problem = c.tensor(v) if c.tensor is not None else None
            else:
                problem = c.number(v) if c.number is not None else None
            if problem is not None:
                raise self._fail(pname, problem, v)
        self._check_relations(dict(zip(names, values)))

    def _check_relations(self, values: dict[str, Any]) -> None:
        """Check ``relations`` (values: Python numbers or tensors, by parameter name)."""
        for a, op, b in self.relations:
            fn, inverse = _RELATIONS[op]
            va, vb = values[a], values[b]
            if isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor):
                ta, tb = param_tensors(va, vb)
                ok = bool(fn(ta, tb).all())
            else:
                ok = bool(fn(va, vb))
            if not ok:
                raise DistributionArgumentError(
                    f"{self.name}: argument {b!r} must be {inverse} {a!r}, "
                    f"got {a}={_shown(va)}, {b}={_shown(vb)}")

    # ----------------------------------------------------------------- helpers for subclasses
    def _check_arity(self, params: Sequence[Any]) -> None:
        if len(params) != len(self.param_names):
            raise DistributionArgumentError(
                f"{self.name} takes {len(self.param_names)} argument(s) "
                f"({', '.join(self.param_names)}), got {len(params)}"
            )

    def _check_finite(self, pname: str, p: Any) -> None:
        t = as_tensor(p)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise self._fail(pname, "must be finite", t)

    def _prepare(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The parameters as tensors, converted once per GFI call (see :func:`param_tensors`)."""
        return param_tensors(*args) if args else args


# --------------------------------------------------------------------------------- the GFI
_validation = {"enabled": True}
_NO_CHANGE = NoChange()  # diffs are frozen records: one instance each serves every call
_UNKNOWN_CHANGE = UnknownChange()


def set_validation(enabled: bool) -> None:
    """Turn distribution argument validation (outside vmap) on or off globally.

    Validation costs about a microsecond per Python-number parameter and a few per tensor
    parameter (a device sync each); it is on by default because a NaN scale is much easier to
    debug at the call that made it.
    """
    _validation["enabled"] = bool(enabled)


@attrs.frozen(repr=False)
class ChoiceTrace(Trace):
    """The trace of a distribution: one value at the empty address."""

    gen_fn: Distribution
    args: tuple[Any, ...]
    value: torch.Tensor
    score: torch.Tensor
    _layout: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def retval(self) -> torch.Tensor:  # type: ignore[override]
        return self.value

    @property
    def choices(self) -> ChoiceMap:
        return ChoiceMap.value(self.value)

    def discrete_addresses(self) -> Iterator[tuple[Any, ...]]:
        """The empty address if the distribution is discrete."""
        if self.gen_fn.discrete:
            yield ()

    def __getitem__(self, addr: Any) -> Any:
        if normalize(addr) == ():
            return self.value
        raise AddressError("a distribution has no choice at address {addr}", normalize(addr))


register_record(ChoiceTrace, dynamic=("args", "value", "score"), static=("gen_fn",))


def _expand_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))


def _value_constraint(dist: Distribution, constraints: Any, method: str) -> ChoiceMap | None:
    cm = as_choicemap(constraints)
    if cm.is_empty():
        return None
    if not cm.is_value():
        addr = next(iter(cm.items(stacked=True)))[0]
        raise UnvisitedConstraintError(
            f"{method}: constraint at address {{addr}} is never visited ({dist.name} has a "
            "single choice at the empty address)", addr)
    return cm


class Distribution(DistributionMethods, GenerativeFunction):
    """A primitive distribution as a generative function with one choice at the empty address.

    Subclasses implement ``sample`` and ``logpdf`` and declare ``param_constraints`` (see the
    module docstring).  Every GFI method is written here once, vmap-safe, with masked
    constraints and per-element selection flags (used by Map/Unfold to touch some elements of
    a batch but not others).  Given values (constraints, and kept values rescored under new
    arguments) must have exactly the value shape the arguments imply
    (:meth:`~DistributionMethods.value_shape`; per element under vmap).
    """

    def __repr__(self) -> str:
        return f"gfcomb.{self.name}"

    def _score(self, value: torch.Tensor, params: tuple[Any, ...]) -> torch.Tensor:
        lp = self._logpdf_prepared(value, *params) if self._fused else \
            self.logpdf(value, *params)
        return lp if lp.dim() == 0 else lp.sum()

    def _validate(self, args: tuple[Any, ...]) -> None:
        if _validation["enabled"] and _functorch.peek_interpreter_stack() is None:
            self.check_args(*args)

    def _check_value(self, value: torch.Tensor, args: tuple[Any, ...],
                     params: tuple[Any, ...], given: bool = True) -> None:
        """Raise DistributionArgumentError unless ``value`` has the value shape ``params``
        imply.  A value that merely broadcasts against the parameters would be scored several
        times (or stand for several values); the one leeway is size-1 dimensions: a value whose
        shape differs only by them holds the same values (``()`` for ``(1,)`` and back)."""
        if not self._knows_shapes:
            return
        if self._elementwise:  # fast path: every parameter scalar or of the value's shape
            vs = value.shape
            full = len(vs) == 0
            for p in params:
                ps = p.shape
                if ps == vs:
                    full = True
                elif len(ps) != 0:
                    break
            else:
                if full:
                    return
        try:
            expected = self.value_shape(params)
        except (ValueError, RuntimeError):
            expected = None  # the parameters do not broadcast: scoring will say so
        shape = tuple(value.shape)
        if expected is None or shape == expected:
            return
        if [d for d in shape if d != 1] == [d for d in expected if d != 1]:
            return  # only size-1 dimensions differ: the same values, scored once
        shapes = ", ".join(f"{n}: {_shape_of(p)}" for n, p in zip(self.param_names, args))
        what = "the given value" if given else "the kept value"
        raise DistributionArgumentError(
            f"{self.name}: {what} of shape {tuple(value.shape)} does not fit the parameters "
            f"({shapes}), which give values of shape {expected}")

    def _given(self, cm: ChoiceMap, args: tuple[Any, ...],
               params: tuple[Any, ...]) -> torch.Tensor:
        """The value held by a constraint map, shape-checked; integer/bool values given for a
        continuous distribution (``{"x": 1}``) become floats, so the choice stays
        differentiable."""
        v = cm.get_value()
        if (not self.discrete and isinstance(v, torch.Tensor) and not v.is_floating_point()
                and not v.is_complex()):
            v = v.to(torch.get_default_dtype())
        self._check_value(v, args, params)
        return v

    def _score_given(self, value: torch.Tensor, args: tuple[Any, ...],
                     params: tuple[Any, ...]) -> torch.Tensor:
        """The score of a *given* value: outside vmap, a value that does not fit the
        parameters is a DistributionArgumentError naming the shapes (not torch's bare error)."""
        try:
            return self._score(value, params)
        except RuntimeError as err:
            if inside_functorch_transform():
                raise
            shapes = ", ".join(f"{n}: {_shape_of(p)}" for n, p in zip(self.param_names, args))
            raise DistributionArgumentError(
                f"{self.name}: the given value of shape {tuple(value.shape)} does not fit the "
                f"parameters ({shapes}): {str(err).splitlines()[0]}") from None

    def _sample(self, params: tuple[Any, ...]) -> torch.Tensor:
        if self.reparameterized:
            return self._raw_sample(*params)
        with torch.no_grad():
            return self._raw_sample(*params)

    def sample_with_logpdf(self, *params: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Optional: ``(value, logpdf(value, *params))`` from one draw, for a distribution
        whose log density is cheaper from the sampler's own noise (a Normal's standardized
        draw).  None (the default): sample, then score."""
        return None

    def _draw_scored(self, *params: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`sample_with_logpdf` of parameters already converted by ``_prepare`` (a
        distribution may skip the conversion)."""
        return self.sample_with_logpdf(*params)

    def _logpdf_prepared(self, value: torch.Tensor, *params: Any) -> torch.Tensor:
        """:meth:`logpdf` of parameters already converted by ``_prepare``."""
        return self.logpdf(value, *params)

    #: the sampler as written (the public ``sample`` validates first: checked_sample)
    _raw_sample = DistributionMethods.sample

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("sample")
        if own is not None and not getattr(own, "__gf_checked__", False):
            cls._raw_sample = own  # type: ignore[method-assign]
            cls.sample = checked_sample(own)  # type: ignore[method-assign]
        # the fused sampler and the prepared-parameter log density only stand in for the
        # ``sample``/``logpdf`` written beside them (a subclass that overrides either one
        # gets its own, unfused)
        owner = next(c for c in cls.__mro__ if "sample_with_logpdf" in c.__dict__)
        cls._fused = owner is not Distribution and all(
            getattr(cls, m) is getattr(owner, m) for m in ("sample", "logpdf"))

    _fused = False

    def _sample_scored(self, params: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh value and its score (simulate's work)."""
        both = self._draw_scored(*params) if self._fused and self.reparameterized else None
        if both is None:
            value = self._sample(params)
            return value, self._score(value, params)
        value, lp = both
        return value, lp if lp.dim() == 0 else lp.sum()

    def simulate(self, args: tuple[Any, ...]) -> ChoiceTrace:
        """Sample a value from the distribution.

        Math: v ~ p(·; θ); score = log p(v; θ).
        """
        args = check_args_tuple(args)
        self._validate(args)
        params = self._prepare(args)
        value, score = self._sample_scored(params)
        return ChoiceTrace(self, args, value, score)

    def generate(self, args: tuple[Any, ...],
                 constraints: ChoiceMap | None = None) -> tuple[ChoiceTrace, torch.Tensor]:
        """Sample, or take the constrained value.

        Math: constrained: v = c, weight = log p(c; θ) = score; unconstrained: v ~ p(·; θ),
        weight = 0.  With a mask (per element of a batch), each element follows its own case.
        """
        args = check_args_tuple(args)
        cm = _value_constraint(self, constraints, "generate")
        if cm is None:
            tr = self.simulate(args)
            return tr, torch.zeros_like(tr.score)
        self._validate(args)
        params = self._prepare(args)
        cv = self._given(cm, args, params)
        mask = cm.mask
        if mask is None:
            score = self._score_given(cv, args, params)
            return ChoiceTrace(self, args, cv, score), score
        sampled = self._sample(params)
        value = torch.where(_expand_mask(mask, sampled), cv.to(sampled.dtype), sampled)
        score = self._score(value, params)
        # zeros_like, not 0 * score: a -inf score must give weight 0 where unconstrained
        return ChoiceTrace(self, args, value, score), torch.where(mask, score,
                                                                  torch.zeros_like(score))

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
        """Score a given value.

        Math: weight = log p(v; θ).
        """
        args = check_args_tuple(args)
        cm = as_choicemap(choices)
        if not cm.is_value():
            if cm.is_empty():
                raise MissingChoiceError("assess: no choice given at address {addr}", ())
            _value_constraint(self, cm, "assess")
        self._validate(args)
        params = self._prepare(args)
        value = self._given(cm, args, params)
        return self._score_given(value, args, params), value

    def update(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
               constraints: ChoiceMap | None = None,
               ) -> tuple[ChoiceTrace, torch.Tensor, Diff, ChoiceMap]:
        """Constrain the value and/or rescore it under new parameters.

        Math: v' = c if constrained else v; weight = log p(v'; θ') − log p(v; θ);
        discard = {v} if constrained.  retdiff is NoChange when the value is kept.
        """
        assert isinstance(trace, ChoiceTrace)
        args = check_args_tuple(args)
        cm = _value_constraint(self, constraints, "update")
        if cm is None:
            if all(isinstance(d, NoChange) for d in argdiffs):
                return trace, torch.zeros_like(trace.score), _NO_CHANGE, ChoiceMap.empty()
            self._validate(args)
            params = self._prepare(args)
            self._check_value(trace.value, args, params, given=False)
            score = self._score(trace.value, params)
            return (ChoiceTrace(self, args, trace.value, score), score - trace.score,
                    _NO_CHANGE, ChoiceMap.empty())
        self._validate(args)
        params = self._prepare(args)
        cv = self._given(cm, args, params)
        mask = cm.mask
        old = trace.value
        if mask is None:
            value = cv
        else:
            value = torch.where(_expand_mask(mask, old), cv.to(old.dtype), old)
        score = self._score_given(value, args, params)
        discard = ChoiceMap.value(old, mask)
        return ChoiceTrace(self, args, value, score), score - trace.score, _UNKNOWN_CHANGE, discard

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[ChoiceTrace, torch.Tensor, Diff]:
        """Resample the value if selected, else rescore it.

        Math: selected: v' ~ p(·; θ'), weight = 0; not selected: v' = v,
        weight = log p(v; θ') − log p(v; θ).
        """
        assert isinstance(trace, ChoiceTrace)
        args = check_args_tuple(args)
        check_selection(selection, self, "regenerate")
        flag = selection.leaf_flag()
        if flag is False:
            tr, w, retdiff, _ = self.update(trace, args, argdiffs, None)
            return tr, w, retdiff
        self._validate(args)
        params = self._prepare(args)
        if flag is True:
            value, score = self._sample_scored(params)
            return ChoiceTrace(self, args, value, score), torch.zeros_like(trace.score), \
                _UNKNOWN_CHANGE
        self._check_value(trace.value, args, params, given=False)
        sampled = self._sample(params)
        value = torch.where(_expand_mask(flag, sampled), sampled, trace.value)
        score = self._score(value, params)
        weight = torch.where(flag, torch.zeros_like(score), score - trace.score)
        return ChoiceTrace(self, args, value, score), weight, _UNKNOWN_CHANGE

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Math: project(t, S) = log p(v; θ) if the empty address is in S, else 0."""
        flag = selection.leaf_flag()
        if flag is True:
            return trace.score
        if flag is False:
            return torch.zeros_like(trace.score)
        return torch.where(flag, trace.score, torch.zeros_like(trace.score))

    def logpdf_of(self, value: Any, *args: Any) -> torch.Tensor:
        """The summed log density of ``value`` (a convenience outside the GFI)."""
        return self._score(as_tensor(value), self._prepare(args))
