"""The sampling / scoring / validation half of a distribution (:class:`DistributionMethods`):
the contract of ``sample`` and ``logpdf``, value shapes, and the one routine that validates
the parameters against their :class:`~gfcomb.distributions.params.Constraint`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from gfcomb.core.errors import (
    DistributionArgumentError,
)
from gfcomb.core.validation import check_param_type
from gfcomb.distributions.params import (
    REAL,
    Constraint,
    NumberCheck,
    as_tensor,
    broadcast_shape,
    checked_scalar_params,
    param_tensors,
    shape_of,
)

_Number = (int, float)
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
    #: Whether ``sample`` draws independent noise for every element of the broadcast shape of
    #: its parameters (torch's ``*_like`` of a parameter, as the built-ins do): then a batch of
    #: rows with scalar parameters draws every row in one call, its parameters expanded to
    #: the rows.  Else (a sampler drawing, say, ``torch.randn(())`` and broadcasting it, which
    #: vmap makes per row) its batch methods run per row under vmap.
    samples_per_element: bool = False

    def __init_subclass__(cls, *, name: str | None = None,
                          params: dict[str, Constraint] | None = None,
                          relations: tuple[tuple[str, str, str], ...] | None = None,
                          discrete: bool | None = None, reparameterized: bool | None = None,
                          samples_per_element: bool | None = None, **kwargs: Any) -> None:
        """The class attributes above, given as class keywords: ``class Gamma(Distribution,
        name="gamma", params={"concentration": POSITIVE, "rate": POSITIVE},
        reparameterized=True)`` (``params``: the parameter names and their constraints, in
        order).  A subclass may set the attributes in its body instead."""
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
        if params is not None:
            cls.param_names = tuple(params)
            cls.param_constraints = tuple(params.values())
        if relations is not None:
            cls.relations = relations
        if discrete is not None:
            cls.discrete = discrete
        if reparameterized is not None:
            cls.reparameterized = reparameterized
        if samples_per_element is not None:
            cls.samples_per_element = samples_per_element

    if TYPE_CHECKING:
        # each distribution takes its own parameters (``sample(loc, scale)``): to the type
        # checker the two are callables of any signature, not methods to override exactly
        sample: Callable[..., torch.Tensor]
        logpdf: Callable[..., torch.Tensor]
    else:
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
        batch = broadcast_shape(*[
            s[:len(s) - c.event_dim] if c.event_dim else s
            for s, c in ((shape_of(p), c) for p, c in zip(params, constraints))])
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
        checks = self._scalar_checks()
        if (checks is not None and len(params) == len(checks)
                and checked_scalar_params(params, checks) is not None):
            return  # (every check below would pass: the common case, in plain Python)
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
                desc = ", ".join(f"{n}: {shape_of(p)}" for n, p in zip(names, params))
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

    def _scalar_checks(self) -> tuple[NumberCheck | None, ...] | None:
        """Per parameter its number check when every parameter is a scalar per element and
        no relations tie them (None otherwise: only the full check applies); kept once made."""
        try:
            return self.__dict__["_scalar_number_checks"]  # type: ignore[no-any-return]
        except KeyError:
            pass
        constraints = self._constraints()
        checks = None if self.relations or any(c.event_dim for c in constraints) else \
            tuple(c.number for c in constraints)
        self.__dict__["_scalar_number_checks"] = checks
        return checks

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
