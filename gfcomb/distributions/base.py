"""The distribution base class: a generative function with one choice at the empty address.

A concrete distribution only has to say how to *sample* and how to *score*; the GFI methods
(simulate, generate, update, regenerate, project, gradients) are written once here.

Contract for subclasses
-----------------------
- ``sample(*params) -> Tensor``: draws one value.  Must work under
  ``torch.func.vmap(randomness="different")`` (no in-place randomness into unbatched tensors,
  no ``.item()``, no data-dependent Python control flow) and on any device (allocate with
  ``*_like`` or ``device=param.device``).  Where the math allows it the sample is
  *reparameterized*: differentiable with respect to the parameters (set ``reparameterized``).
- ``logpdf(value, *params) -> Tensor``: the log density (or log mass), elementwise in the
  broadcast shape; the base class sums it to the scalar score.  Must be differentiable in
  ``value`` (continuous distributions) and in the parameters, also under vmap/grad.
- ``check_args(*params)``: validation run *outside* vmap only; raise
  :class:`gfcomb.core.errors.DistributionArgumentError` naming the parameter.  The default
  checks that tensor parameters are finite; subclasses add support checks.
- Class attributes: ``name`` (str), ``param_names`` (tuple of str), ``discrete`` (bool),
  ``reparameterized`` (bool).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

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


def as_tensor(x: Any) -> torch.Tensor:
    """Turn a parameter into a tensor (Python numbers get the default float dtype)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, bool):
        return torch.tensor(float(x))
    if isinstance(x, (int, float)):
        return torch.tensor(float(x), dtype=torch.get_default_dtype())
    return torch.as_tensor(x, dtype=torch.get_default_dtype())


class DistributionMethods:
    """The sampling / scoring half of a distribution (see the module docstring)."""

    name: str = "distribution"
    param_names: tuple[str, ...] = ()
    discrete: bool = False
    reparameterized: bool = False

    def sample(self, *params: Any) -> torch.Tensor:
        """Draw one value (vmap-safe; reparameterized when ``self.reparameterized``)."""
        raise NotImplementedError

    def logpdf(self, value: torch.Tensor, *params: Any) -> torch.Tensor:
        """Elementwise log density / log mass of ``value``."""
        raise NotImplementedError

    def check_args(self, *params: Any) -> None:
        """Validate parameters outside vmap; raise DistributionArgumentError naming the argument."""
        self._check_arity(params)
        for pname, p in zip(self.param_names, params):
            self._check_finite(pname, p)

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
            raise DistributionArgumentError(
                f"{self.name}: argument {pname!r} must be finite, got {t.detach().cpu()}"
            )

    def _check_positive(self, pname: str, p: Any) -> None:
        t = as_tensor(p)
        if not bool((t > 0).all()):
            raise DistributionArgumentError(
                f"{self.name}: argument {pname!r} must be > 0, got {t.detach().cpu()}"
            )

    def _check_probs(self, pname: str, p: Any) -> None:
        t = as_tensor(p)
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise DistributionArgumentError(
                f"{self.name}: argument {pname!r} must lie in [0, 1], got {t.detach().cpu()}"
            )

    def _check_broadcast(self, **named: Any) -> None:
        shapes = {k: as_tensor(v).shape for k, v in named.items()}
        try:
            torch.broadcast_shapes(*shapes.values())
        except RuntimeError:
            desc = ", ".join(f"{k}: {tuple(s)}" for k, s in shapes.items())
            raise DistributionArgumentError(
                f"{self.name}: argument shapes do not broadcast ({desc})"
            ) from None

    def validate(self, params: Sequence[Any]) -> None:
        """Run :meth:`check_args` unless we are inside a torch.func transform."""
        if not inside_functorch_transform():
            self.check_args(*params)


# --------------------------------------------------------------------------------- the GFI
_validation = {"enabled": True}


def set_validation(enabled: bool) -> None:
    """Turn distribution argument validation (outside vmap) on or off globally.

    Validation costs a few microseconds per choice (a device sync per parameter); it is on by
    default because a NaN scale is much easier to debug at the call that made it.
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

    Subclasses implement ``sample``, ``logpdf`` and ``check_args`` (see the module docstring).
    Every GFI method is written here once, vmap-safe, with masked constraints and per-element
    selection flags (used by Map/Unfold to touch some elements of a batch but not others).
    """

    def __repr__(self) -> str:
        return f"gfcomb.{self.name}"

    def _score(self, value: torch.Tensor, args: tuple[Any, ...]) -> torch.Tensor:
        return self.logpdf(value, *args).sum()

    def _validate(self, args: tuple[Any, ...]) -> None:
        if _validation["enabled"] and not inside_functorch_transform():
            self.check_args(*args)

    def _given(self, cm: ChoiceMap) -> torch.Tensor:
        """The value held by a constraint map; integer/bool values given for a continuous
        distribution (``{"x": 1}``) become floats, so the choice stays differentiable."""
        v = cm.get_value()
        if (not self.discrete and isinstance(v, torch.Tensor) and not v.is_floating_point()
                and not v.is_complex()):
            v = v.to(torch.get_default_dtype())
        return v

    def _score_given(self, value: torch.Tensor, args: tuple[Any, ...]) -> torch.Tensor:
        """The score of a *given* value: outside vmap, a value whose shape does not fit the
        parameters is a DistributionArgumentError naming the shapes (not torch's bare
        broadcasting error)."""
        try:
            return self._score(value, args)
        except RuntimeError as err:
            if inside_functorch_transform():
                raise
            shapes = ", ".join(f"{n}: {tuple(as_tensor(p).shape)}"
                               for n, p in zip(self.param_names, args))
            raise DistributionArgumentError(
                f"{self.name}: the given value of shape {tuple(value.shape)} does not fit the "
                f"parameters ({shapes}): {str(err).splitlines()[0]}") from None

    def _sample(self, args: tuple[Any, ...]) -> torch.Tensor:
        if self.reparameterized:
            return self.sample(*args)
        with torch.no_grad():
            return self.sample(*args)

    def simulate(self, args: tuple[Any, ...]) -> ChoiceTrace:
        """Sample a value from the distribution.

        Math: v ~ p(·; θ); score = log p(v; θ).
        """
        args = check_args_tuple(args)
        self._validate(args)
        value = self._sample(args)
        return ChoiceTrace(self, args, value, self._score(value, args))

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
        cv = self._given(cm)
        mask = cm.mask
        if mask is None:
            score = self._score_given(cv, args)
            return ChoiceTrace(self, args, cv, score), score
        sampled = self._sample(args)
        value = torch.where(_expand_mask(mask, sampled), cv.to(sampled.dtype), sampled)
        score = self._score(value, args)
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
        value = self._given(cm)
        return self._score_given(value, args), value

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
                return trace, torch.zeros_like(trace.score), NoChange(), ChoiceMap.empty()
            self._validate(args)
            score = self._score(trace.value, args)
            return (ChoiceTrace(self, args, trace.value, score), score - trace.score,
                    NoChange(), ChoiceMap.empty())
        self._validate(args)
        cv = self._given(cm)
        mask = cm.mask
        old = trace.value
        if mask is None:
            value = cv
        else:
            value = torch.where(_expand_mask(mask, old), cv.to(old.dtype), old)
        score = self._score_given(value, args)
        discard = ChoiceMap.value(old, mask)
        return ChoiceTrace(self, args, value, score), score - trace.score, UnknownChange(), discard

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[ChoiceTrace, torch.Tensor, Diff]:
        """Resample the value if selected, else rescore it.

        Math: selected: v' ~ p(·; θ'), weight = 0; not selected: v' = v,
        weight = log p(v; θ') − log p(v; θ).
        """
        assert isinstance(trace, ChoiceTrace)
        args = check_args_tuple(args)
        flag = selection.leaf_flag()
        if flag is False:
            tr, w, retdiff, _ = self.update(trace, args, argdiffs, None)
            return tr, w, retdiff
        self._validate(args)
        if flag is True:
            value = self._sample(args)
            return ChoiceTrace(self, args, value, self._score(value, args)), \
                torch.zeros_like(trace.score), UnknownChange()
        sampled = self._sample(args)
        value = torch.where(_expand_mask(flag, sampled), sampled, trace.value)
        score = self._score(value, args)
        weight = torch.where(flag, torch.zeros_like(score), score - trace.score)
        return ChoiceTrace(self, args, value, score), weight, UnknownChange()

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
        return self._score(as_tensor(value), args)
