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
  ``reparameterized`` (bool), ``samples_per_element`` (bool: the sampler draws independent
  noise for every element of its parameters' broadcast shape, so a batch of rows is drawn in
  one call; the batch methods then run on the whole batch); or, as the built-ins do, class
  keywords:
  ``class Gamma(Distribution, name="gamma", params={"concentration": POSITIVE, "rate":
  POSITIVE}, reparameterized=True)`` (see
  :class:`~gfcomb.distributions.methods.DistributionMethods`).

Parameters are converted to tensors once per GFI call (:func:`param_tensors`; Python numbers
become cached constants): ``sample`` and ``logpdf`` get tensors of one dtype and device.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch._C import _functorch

from gfcomb.core.address import normalize
from gfcomb.core.batching import expanded_rows, inside_functorch_transform
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange
from gfcomb.core.errors import (
    AddressError,
    DistributionArgumentError,
    MissingChoiceError,
    UnvisitedConstraintError,
)
from gfcomb.core.gfi import GenerativeFunction, as_choicemap, check_args_tuple, zero_weight
from gfcomb.core.pytree import register_record
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.core.validation import check_selection, checked_sample
from gfcomb.core.vmap import held_rows, unwrap_rows
from gfcomb.distributions.methods import DistributionMethods
from gfcomb.distributions.params import (
    as_tensor,
    checked_scalar_params,
    same_scalar_params,
    shape_of,
)

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

    def caller_retval(self) -> torch.Tensor:
        """The value (read directly: a @gen caller asks once per traced choice)."""
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


def _rows_in_batch(traces: Trace) -> int | None:
    """The row count of a batch of choice traces holding one scalar value per row (else
    None: the vmap default handles it)."""
    if not isinstance(traces, ChoiceTrace) or traces.value.dim() != 1 \
            or traces.score.shape != traces.value.shape:
        return None
    return int(traces.value.shape[0])


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

    def _checked_params(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The parameters validated (:meth:`check_args`, when validation is on and no
        transform runs) and converted (:meth:`_prepare`); scalar parameters of a
        distribution with the default validation and conversion in one pass of plain
        Python (:func:`checked_scalar_params`), the common case of a traced choice."""
        if not _validation["enabled"] or _functorch.peek_interpreter_stack() is not None:
            return self._prepare(args)
        checks = self._one_pass_checks
        if checks is not None and len(args) == len(checks):
            params = checked_scalar_params(args, checks)
            if params is not None:
                return params
        self.check_args(*args)
        return self._prepare(args)

    @functools.cached_property
    def _one_pass_checks(self) -> tuple[Any, ...] | None:
        """The per-parameter number checks when validation and conversion are the defaults
        and every parameter is a scalar per element (else None)."""
        cls = type(self)
        if (cls.check_args is not DistributionMethods.check_args
                or cls._prepare is not DistributionMethods._prepare):
            return None
        return self._scalar_checks()

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
        shapes = ", ".join(f"{n}: {shape_of(p)}" for n, p in zip(self.param_names, args))
        what = "the given value" if given else "the kept value"
        raise DistributionArgumentError(
            f"{self.name}: {what} of shape {tuple(value.shape)} does not fit the parameters "
            f"({shapes}), which give values of shape {expected}")

    def _given(self, cm: ChoiceMap, args: tuple[Any, ...],
               params: tuple[Any, ...]) -> torch.Tensor:
        """The value held by a constraint map, shape-checked; integer/bool values given for a
        continuous distribution (``{"x": 1}``) become floats, so the choice stays
        differentiable."""
        v = self._as_value(cm.get_value())
        self._check_value(v, args, params)
        return v

    def _as_value(self, v: Any) -> Any:
        """An integer/bool value of a continuous distribution as a float (else as it is)."""
        integral = isinstance(v, torch.Tensor) and not (v.is_floating_point() or v.is_complex())
        return v.to(torch.get_default_dtype()) if integral and not self.discrete else v

    def _score_given(self, value: torch.Tensor, args: tuple[Any, ...],
                     params: tuple[Any, ...]) -> torch.Tensor:
        """The score of a *given* value: outside vmap, a value that does not fit the
        parameters is a DistributionArgumentError naming the shapes (not torch's bare error)."""
        try:
            return self._score(value, params)
        except RuntimeError as err:
            if inside_functorch_transform():
                raise
            shapes = ", ".join(f"{n}: {shape_of(p)}" for n, p in zip(self.param_names, args))
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
        # (a fused sampler of a distribution that is not reparameterized leaves its value
        # without gradient itself, as the no_grad of _sample would)
        both = self._draw_scored(*params) if self._fused else None
        if both is None:
            value = self._sample(params)
            return value, self._score(value, params)
        value, lp = both
        return value, lp if lp.dim() == 0 else lp.sum()

    def simulate(self, args: tuple[Any, ...]) -> ChoiceTrace:
        """Sample a value from the distribution.

        Math: v ~ p(·; θ); score = log p(v; θ).
        """
        if type(args) is not tuple:
            args = check_args_tuple(args)  # (raises)
        params = self._checked_params(args)
        if self._fused:  # (_sample_scored's fused case, inline: simulate is the hot path)
            both = self._draw_scored(*params)
            if both is not None:
                value, lp = both
                return ChoiceTrace(self, args, value, lp if lp.dim() == 0 else lp.sum())
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
            return tr, zero_weight(tr.score)
        params = self._checked_params(args)
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
        params = self._checked_params(args)
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
            for d in argdiffs:
                if not isinstance(d, NoChange):
                    break
            else:
                return trace, zero_weight(trace.score), _NO_CHANGE, ChoiceMap.empty()
            params = self._checked_params(args)
            if same_scalar_params(args, trace.args):  # new tensors, the same numbers
                return (ChoiceTrace(self, args, trace.value, trace.score),
                        zero_weight(trace.score), _NO_CHANGE, ChoiceMap.empty())
            self._check_value(trace.value, args, params, given=False)
            score = self._score(trace.value, params)
            return (ChoiceTrace(self, args, trace.value, score), score - trace.score,
                    _NO_CHANGE, ChoiceMap.empty())
        params = self._checked_params(args)
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
        params = self._checked_params(args)
        if flag is True:
            value, score = self._sample_scored(params)
            return ChoiceTrace(self, args, value, score), zero_weight(score), _UNKNOWN_CHANGE
        self._check_value(trace.value, args, params, given=False)
        sampled = self._sample(params)
        value = torch.where(_expand_mask(flag, sampled), sampled, trace.value)
        score = self._score(value, params)
        weight = torch.where(flag, torch.zeros_like(score), score - trace.score)
        return ChoiceTrace(self, args, value, score), weight, _UNKNOWN_CHANGE

    # ------------------------------------------------------------------ the batch protocol
    # Scalar parameters per row: one elementwise computation on the rows, in the layout of
    # the vmap default (shared tensors as expanded rows); any other batch: the default.
    def batch_matches_per_row(self) -> bool:
        """True: the batch methods give what the per-row methods under vmap give (they
        compute it on the whole batch at once), so a caller already running per row calls
        the per-row methods directly."""
        return True

    def batch_runs_whole(self, args: tuple[Any, ...]) -> bool:
        """Whether a batch with these arguments is computed on the whole batch at once: the
        distribution is univariate (a value has the broadcast shape of its parameters), its
        sampler draws per element (:attr:`samples_per_element`) and every argument is a
        scalar per row (``PerRow`` of a 1-d tensor) or shared (a number or 0-d tensor)."""
        return self._scalar_rows(args, None) is not None

    def _scalar_rows(self, args: tuple[Any, ...], n: int | None,
                     ) -> list[Any] | None:
        """Every argument's value (out of its ``PerRow``) when :meth:`batch_runs_whole`
        holds (and the per-row ones have ``n`` rows, if given), else None."""
        if not (self._elementwise and self.samples_per_element):
            return None
        out = []
        for a in args:
            v, per_row = unwrap_rows(a)
            if per_row:
                if type(v) is not torch.Tensor or v.dim() != 1 or (n is not None
                                                                   and v.shape[0] != n):
                    return None
            elif isinstance(v, torch.Tensor):
                if v.dim() != 0:
                    return None
            elif not isinstance(v, (float, int)):
                return None
            out.append(v)
        return out

    def _rows_of(self, args: tuple[Any, ...], n: int,
                 ) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
        """(the arguments as a batch trace holds them -- a shared tensor as its expanded
        rows --, the parameters) of an elementwise batch of ``n`` rows, or None."""
        values = self._scalar_rows(args, n)
        if values is None:
            return None
        return tuple(held_rows(a, n) for a in args), self._prepare(tuple(values))

    def _lp(self, value: torch.Tensor, params: tuple[Any, ...]) -> torch.Tensor:
        """The elementwise log density (one entry per row: not summed)."""
        return self._logpdf_prepared(value, *params) if self._fused else \
            self.logpdf(value, *params)

    def _batch_draw(self, params: tuple[Any, ...], n: int,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` fresh values, one per row, and their log densities.  The sampler draws its
        noise in the shape of its parameters (``*_like``), so they are expanded to the rows
        first: every row draws its own."""
        full = tuple(p if p.shape == (n,) else p.expand(n) for p in params)
        both = self._draw_scored(*full) if self._fused else None
        if both is None:
            value = self._sample(full)
            return value, self._lp(value, params)
        return both

    def _rows_score(self, value: torch.Tensor, params: tuple[Any, ...], n: int) -> torch.Tensor:
        return expanded_rows(lp, n) if (lp := self._lp(value, params)).dim() == 0 else lp

    def _rows_value(self, constraints: Any, n: int) -> torch.Tensor | None:
        """The constrained value of every row (a shared one as its expanded rows), or None
        when the constraint is not a plain scalar per row (a mask: the vmap default)."""
        cv, per_row = unwrap_rows(constraints)
        cm = as_choicemap(cv)
        if not cm.is_value() or cm.mask is not None:
            return None
        v = cm.get_value()
        v = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        if v.dim() != (1 if per_row else 0) or (per_row and v.shape[0] != n):
            return None
        v = self._as_value(v)
        return v if per_row else expanded_rows(v, n)

    def batch_generate(self, n: int, args: tuple[Any, ...],
                       constraints: Any = None) -> tuple[ChoiceTrace, torch.Tensor]:
        """Math: row i: constrained, v_i = c_i and weight_i = log p(c_i; θ_i); else v_i ~
        p(·; θ_i) and weight_i = 0."""
        args = check_args_tuple(args)
        rows = self._rows_of(args, n)
        cm = as_choicemap(unwrap_rows(constraints)[0])
        value = None if cm.is_empty() or rows is None else self._rows_value(constraints, n)
        if rows is None or (value is None and not cm.is_empty()):
            return super().batch_generate(n, args, constraints)  # type: ignore[return-value]
        held, params = rows
        if value is None:
            value, score = self._batch_draw(params, n)
            return ChoiceTrace(self, held, value, score), zero_weight(score)
        score = self._rows_score(value, params, n)
        return ChoiceTrace(self, held, value, score), score

    def batch_update(self, traces: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                     constraints: Any = None,
                     ) -> tuple[ChoiceTrace, torch.Tensor, Diff, ChoiceMap]:
        """Math: row i: v_i' = c_i if constrained, else v_i; weight_i = log p(v_i'; θ_i') −
        log p(v_i; θ_i); discard_i = {v_i} if constrained."""
        args = check_args_tuple(args)
        n = _rows_in_batch(traces)
        rows = None if n is None else self._rows_of(args, n)
        cm = as_choicemap(unwrap_rows(constraints)[0])
        value = None if cm.is_empty() or n is None or rows is None else \
            self._rows_value(constraints, n)
        if n is None or rows is None or (value is None and not cm.is_empty()):
            return super().batch_update(  # type: ignore[return-value]
                traces, args, argdiffs, constraints)
        assert isinstance(traces, ChoiceTrace)
        held, params = rows
        if value is None:
            if all(isinstance(d, NoChange) for d in argdiffs):
                return traces, zero_weight(traces.score), _NO_CHANGE, ChoiceMap.empty()
            score = self._rows_score(traces.value, params, n)
            return (ChoiceTrace(self, held, traces.value, score), score - traces.score,
                    _NO_CHANGE, ChoiceMap.empty())
        score = self._rows_score(value, params, n)
        return (ChoiceTrace(self, held, value, score), score - traces.score, _UNKNOWN_CHANGE,
                ChoiceMap.value(traces.value))

    def batch_regenerate(self, traces: Trace, args: tuple[Any, ...],
                         argdiffs: tuple[Diff, ...],
                         selection: Selection) -> tuple[ChoiceTrace, torch.Tensor, Diff]:
        """Math: selected: v_i' ~ p(·; θ_i'), weight_i = 0; else v_i' = v_i, weight_i =
        log p(v_i; θ_i') − log p(v_i; θ_i)."""
        check_selection(selection, self, "batch_regenerate")
        flag = selection.leaf_flag()
        if flag is not True:
            if flag is False:
                new, w, retdiff, _ = self.batch_update(traces, args, argdiffs, None)
                return new, w, retdiff
            return super().batch_regenerate(  # type: ignore[return-value]
                traces, args, argdiffs, selection)
        args = check_args_tuple(args)
        n = _rows_in_batch(traces)
        rows = None if n is None else self._rows_of(args, n)
        if rows is None:
            return super().batch_regenerate(  # type: ignore[return-value]
                traces, args, argdiffs, selection)
        assert n is not None
        held, params = rows
        value, score = self._batch_draw(params, n)
        return ChoiceTrace(self, held, value, score), zero_weight(score), _UNKNOWN_CHANGE

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
