"""Distribution parameters: converting them to tensors (one floating dtype and device per
call; Python numbers become cached constant tensors) and the :class:`Constraint` each one
must satisfy (:data:`REAL`, :data:`POSITIVE`, :data:`POSITIVE_DEFINITE`, ...)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch._C import _functorch

#: What a distribution parameter may be: a tensor, a Python number, or a nested list.
ArrayLike = Union[torch.Tensor, float, int, bool, list]

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
_CPU = torch.device("cpu")


def constant_tensor(x: Any, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """``torch.as_tensor(x, dtype=dtype, device=device)``, cached for Python numbers.

    The cached tensors never leave the distribution layer (samplers and log densities only
    compute with them), so sharing one per (value, dtype, device) is safe.  Nothing is cached
    that a transform has wrapped (made under ``grad``; under ``vmap`` factories give plain
    tensors), nor while inference mode or a torch function mode (``set_default_device``) is
    active: a tensor made there could not be reused everywhere.
    """
    tx = type(x)
    if tx is not float and tx is not int and not isinstance(x, _Number):
        return torch.as_tensor(x, dtype=dtype, device=device)
    # (0.0 and -0.0 compare equal: zeros are keyed by their sign as well)
    key = (x, dtype, device) if x != 0 else (x, math.copysign(1.0, x), dtype, device)
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
    out = []  # (a loop, not a comprehension: one frame less on every GFI call)
    for p in params:
        if isinstance(p, torch.Tensor):
            out.append(p if p.dtype is dtype else p.to(dtype))
        else:
            out.append(constant_tensor(p, dtype, device))
    return tuple(out)


def checked_scalar_params(params: Sequence[Any],
                          checks: Sequence[NumberCheck | None]) -> tuple[Any, ...] | None:
    """Validate and convert in one pass: :func:`param_tensors` of ``params`` when each is a
    Python float/int or a 0-dim floating CPU tensor (all of one dtype), finite and passing
    its number check (``checks``, aligned with ``params``); None as soon as one is not (the
    caller then runs the full validation, which names the problem, and the conversion)."""
    isfinite = math.isfinite
    dtype = None
    numbers = False
    for p, check in zip(params, checks):
        tp = type(p)
        if tp is float or tp is int:
            v = p
            numbers = True
        elif tp is torch.Tensor and p.dim() == 0 and p.is_cpu and p.is_floating_point():
            d = p.dtype
            if dtype is None:
                dtype = d
            elif d is not dtype:
                return None
            v = p.item()
        else:
            return None
        if not isfinite(v) or (check is not None and check(v) is not None):
            return None
    if not numbers:
        return tuple(params)
    if dtype is None:  # (Python numbers only: the default dtype and device)
        dtype, device = torch.get_default_dtype(), None
    else:
        device = _CPU
    out = []
    for p in params:
        out.append(p if type(p) is torch.Tensor else constant_tensor(p, dtype, device))
    return tuple(out)


def same_scalar_params(new: Sequence[Any], old: Sequence[Any]) -> bool:
    """Whether ``new`` holds the very numbers ``old`` held, parameter by parameter: equal
    Python numbers of one type, or 0-dim floating CPU tensors of one dtype with equal values
    (zeros of one sign), none requiring grad nor wrapped by a transform.  Then a kept value's
    log density is the one already computed (a ``@gen`` body recomputes ``rho * x`` from an
    unchanged ``x`` on every run: a new tensor, the same number)."""
    if len(new) != len(old):
        return False
    for a, b in zip(new, old):
        if a is b:
            continue
        ta = type(a)
        if ta is not type(b):
            return False
        if ta is float or ta is int:
            va, vb = a, b
        elif (ta is torch.Tensor and a.dim() == 0 and b.dim() == 0 and a.dtype is b.dtype
              and a.is_cpu and b.is_cpu and a.is_floating_point()
              and not (a.requires_grad or b.requires_grad)
              and not _functorch.is_functorch_wrapped_tensor(a)
              and not _functorch.is_functorch_wrapped_tensor(b)):
            try:
                va, vb = a.item(), b.item()
            except RuntimeError:  # (under a tracer -- make_fx, compile -- values are unread)
                return False
        else:
            return False
        if va != vb or (va == 0 and math.copysign(1.0, va) != math.copysign(1.0, vb)):
            return False
    return True


def broadcast_shape(*shapes: Sequence[int]) -> tuple[int, ...]:
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


def shape_of(p: Any) -> tuple[int, ...]:
    """The shape of a parameter (a tensor, a Python number, None or a nested list)."""
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
