"""Mask: a generative function that runs only where a flag is true (GenJAX's ``mask``).

``Mask(gen_fn)(flag, *args)``: with ``flag`` true it is ``gen_fn(*args)`` (same choices at
the same addresses, same score, same return value); with ``flag`` false it makes no choices,
its score is 0 and its return value is ``None``.

Two ways of running, as for :class:`~gfcomb.combinators.switch.Switch`:

*Concrete flag* (a Python bool, or a one-element tensor without a vmap batch dimension):
``gen_fn`` runs only when the flag is true.  A constraint given while the flag is false is at
an address the function never visits: :class:`UnvisitedConstraintError`.

*Batched flag* (a bool tensor batched by ``torch.func.vmap``, e.g. ``Map(Mask(obs))(present,
xs)`` for ragged data): data-dependent control flow is impossible under vmap, so ``gen_fn``
runs for every element and the results are masked by the flag: the choices carry the flag
as their presence mask (absent where it is false, as for a Switch branch that was not
taken), scores and weights are ``where(flag, ·, 0)``, and the return value is ``gen_fn``'s
where the flag is true and zeros (of its shape) where it is false.  An element whose flag
turns on gets fresh choices (a ``generate``), one whose flag turns off discards its old
choices.  A constraint at an element whose flag is false is at an address that element never
visits: as for a Switch under vmap this cannot raise per element, and the element's weight is
NaN (never a wrong number); a Map over concrete tensors traces such a weight back to its
element and raises :class:`UnvisitedConstraintError` there.  To observe ragged data, give
the constraints the flags as their presence mask: ``ChoiceMap.stacked({"y": ys},
mask=present)``.

A concrete flag that differs from step to step of an Unfold or Scan (outside vmap) changes
the step's addresses; to stack such steps, their Mask traces are widened to the batched form
(:func:`~gfcomb.core.harmonize.harmonize`, as a Switch's steps on different branches are),
and a step read back from the stack is narrowed to its concrete form again.

Math: log p(t; (f, x)) = [f] · log p_gen_fn(t; x).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import torch

from gfcomb.combinators.edit import Constrain, Edit, Resample
from gfcomb.combinators.parts import Combinator, gen_fn_part
from gfcomb.core.batching import is_batched
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange
from gfcomb.core.errors import AddressError, ArgumentError, UnvisitedConstraintError
from gfcomb.core.gfi import (
    GenerativeFunction,
    as_choicemap,
    check_argdiffs,
    check_args_tuple,
    check_trace,
    zero_weight,
)
from gfcomb.core.harmonize import harmonize, harmonize_values, rebuild_record, stand_in
from gfcomb.core.masked import any_present
from gfcomb.core.pytree import register_record, tree_map_tensors, tree_where
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace

_EMPTY = ChoiceMap.empty()
_NO_CHANGE = NoChange()
_UNKNOWN = UnknownChange()
Flag = bool | torch.Tensor


def masked(cm: ChoiceMap, flag: torch.Tensor) -> ChoiceMap:
    """``cm`` with every value present only where ``flag`` is true.  ``flag`` has the shape
    of the batch dimensions in front of the values (0-dim under vmap); under stacked
    sub-maps it is widened over their element axis."""
    if cm.is_empty():
        return cm
    if cm.is_value():
        v, m = cm.get_value(), cm.mask
        f = flag
        if m is not None and m.dim() > f.dim():
            f = f.reshape(f.shape + (1,) * (m.dim() - f.dim()))
        return ChoiceMap.value(v, f if m is None else (m & f))
    if cm.is_stacked():
        n = cm.stacked_length
        wide = flag.unsqueeze(-1).expand(*flag.shape, n)
        return ChoiceMap.from_stacked_block(masked(cm.stacked_inner, wide), n,
                                            None if cm.stacked_is_dense else cm.stacked_indices,
                                            batch_ndim=flag.dim())
    return ChoiceMap.node({k: masked(cm.get_submap(k), flag) for k in cm.keys()})


@attrs.frozen(repr=False)
class MaskTrace(Trace):
    """The trace of a :class:`Mask`.  ``batched`` False: ``inner`` is the inner trace when
    the flag was true, None when it was false (``active``).  ``batched`` True: ``inner`` is
    a trace of every element and ``flag`` the bool tensor (batch dimensions in front outside
    vmap)."""

    gen_fn: Any
    args: tuple[Any, ...]
    retval: Any
    score: torch.Tensor
    inner: Trace | None
    flag: torch.Tensor | None
    batched: bool
    active: bool
    _layout: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def choices(self) -> ChoiceMap:
        if self.inner is None:
            return _EMPTY
        if not self.batched:
            return self.inner.choices
        assert self.flag is not None
        return masked(self.inner.choices, self.flag)

    def narrowed(self) -> MaskTrace:
        """The concrete form of a batched trace whose flag is one bool that no vmap batches
        (a step of an Unfold read back after :func:`~gfcomb.core.harmonize.harmonize`
        widened it): the inner trace when the flag is true, none when it is false, as a run
        with that concrete flag would have made it.  Other traces: unchanged."""
        flag = self.flag
        if not self.batched or flag is None or flag.dim() != 0 or is_batched(flag):
            return self
        try:
            on = bool(flag)
        except RuntimeError:  # (under another functorch transform: keep the masked form)
            return self
        if not on:  # (its score is already the 0 a false flag scores)
            return MaskTrace(self.gen_fn, self.args, None, self.score, None, None, False, False)
        assert self.inner is not None
        return MaskTrace(self.gen_fn, self.args, self.inner.retval, self.inner.score,
                         self.inner, None, False, True)

    @staticmethod
    def harmonize_group(xs: list[MaskTrace]) -> list[MaskTrace] | None:
        """Mask traces of one structure (:mod:`gfcomb.core.harmonize`'s record protocol):
        traces whose function ran in some and not in others (concrete flags that differ),
        or concrete and batched ones, widened to the batched form -- the inner trace of one
        that ran standing in, masked out by a false flag, where the function did not run."""
        return _harmonize_mask(xs)

    def _retval_at(self, path: tuple[Any, ...]) -> Any:
        if self.inner is None:
            raise AddressError("no traced call at address {addr} (the Mask's flag is false)",
                               path)
        return self.inner.get_retval(path)


register_record(MaskTrace, dynamic=("args", "retval", "score", "inner", "flag"),
                static=("gen_fn", "batched", "active"))


def _harmonize_mask(xs: list[MaskTrace]) -> list[MaskTrace] | None:
    """See :meth:`MaskTrace.harmonize_group`."""
    fn = xs[0].gen_fn
    if any(x.gen_fn != fn for x in xs):
        return None
    ran = [x.inner for x in xs if x.inner is not None]
    if not ran:
        return None  # (the function ran nowhere: one structure already)
    if len(ran) == len(xs) and len({x.batched for x in xs}) == 1:  # one form: harmonize inside
        col = harmonize_values([x.inner for x in xs])
        if col is None:
            return None
        return [rebuild_record(x, {"inner": c}) for x, c in zip(xs, col)]
    donor = ran[0]
    inners = [x.inner if x.inner is not None else stand_in(donor, tuple(x.score.shape))
              for x in xs]
    inners = harmonize_values(inners) or inners
    out = []
    for x, inner in zip(xs, inners):
        if x.batched:
            flag = x.flag
            retval = x.retval
        else:
            flag = torch.full(x.score.shape, x.active, dtype=torch.bool, device=x.score.device)
            retval = x.retval if x.active else tree_map_tensors(torch.zeros_like, inner.retval)
        args = x.args
        if args and not isinstance(args[0], torch.Tensor):
            args = (flag,) + tuple(args[1:])
        out.append(MaskTrace(fn, args, retval, x.score, inner, flag, True, True))
    return out


def _nan_where_unvisited(w: torch.Tensor, flag: torch.Tensor, cm: ChoiceMap) -> torch.Tensor:
    """``w`` with NaN where ``flag`` is false and ``cm`` constrains something."""
    given = any_present(cm)
    if given is False:
        return w
    bad = ~flag if given is True else (given & ~flag)
    return torch.where(bad, torch.full_like(w, float("nan")), w)


def _where(flag: torch.Tensor, a: torch.Tensor, b: Any) -> torch.Tensor:
    b = b if isinstance(b, torch.Tensor) else torch.zeros_like(a) + b
    return torch.where(flag, a, b.to(a.dtype))


class Mask(Combinator):
    """``gen_fn`` where ``flag`` is true, nothing where it is false (see the module
    docstring).  Arguments: ``(flag, *args)``."""

    def __init__(self, gen_fn: GenerativeFunction) -> None:
        self.gen_fn = gen_fn_part(gen_fn, "Mask", "gen_fn")

    def parts(self) -> tuple[Any, ...]:
        """The masked function."""
        return (Mask, self.gen_fn)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The inner function's parameters."""
        return self.gen_fn.parameters()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _parse(args: Any) -> tuple[Flag, tuple[Any, ...]]:
        """``(flag, inner args)``: flag a Python bool (concrete) or a bool tensor (batched)."""
        args = check_args_tuple(args)
        if not args:
            raise ArgumentError("Mask: args must start with the flag: (flag, *args)")
        flag = args[0]
        if isinstance(flag, torch.Tensor):
            if flag.numel() != 1:
                raise ArgumentError(f"Mask: argument 'flag' must be a single boolean, got a "
                                    f"tensor of shape {tuple(flag.shape)} (vmap over a batch)")
            flag = flag.reshape(())
            if is_batched(flag):
                return (flag if flag.dtype == torch.bool else flag != 0), args[1:]
            return bool(flag), args[1:]
        if isinstance(flag, (bool, int)):
            return bool(flag), args[1:]
        raise ArgumentError(f"Mask: argument 'flag' must be a bool or a bool tensor, got "
                            f"{flag!r}")

    def _check_trace(self, trace: Any) -> MaskTrace:
        return check_trace(self, trace, MaskTrace).narrowed()

    @staticmethod
    def _refuse(cm: ChoiceMap, method: str) -> None:
        present = any_present(cm)  # (values masked out everywhere are absent)
        if isinstance(present, torch.Tensor) and not is_batched(present):
            present = bool(present)
        if present is not False:
            addr = next(iter(cm.items(stacked=True)), ((), None))[0]
            raise UnvisitedConstraintError(
                f"{method}: constraint at address {{addr}} is never visited (the Mask's flag "
                "is false)", tuple(":" if isinstance(k, slice) else k for k in addr))

    def _off(self, args: tuple[Any, ...]) -> MaskTrace:
        zero = torch.zeros((), dtype=torch.get_default_dtype())
        return MaskTrace(self, args, None, zero, None, None, False, False)

    def _on(self, args: tuple[Any, ...], inner: Trace) -> MaskTrace:
        return MaskTrace(self, args, inner.retval, inner.score, inner, None, False, True)

    def _batched(self, args: tuple[Any, ...], flag: torch.Tensor, inner: Trace) -> MaskTrace:
        r = inner.retval
        retval = tree_where(flag, r, tree_map_tensors(torch.zeros_like, r))
        return MaskTrace(self, args, retval, _where(flag, inner.score, 0.0), inner, flag,
                         True, True)

    @staticmethod
    def _as_tensor(flag: Flag) -> torch.Tensor:
        return flag if isinstance(flag, torch.Tensor) else torch.tensor(bool(flag))

    # ------------------------------------------------------------------ the GFI
    def simulate(self, args: tuple[Any, ...]) -> MaskTrace:
        """Math: flag true: t ~ p_gen_fn(·; x), score = its score; false: no choices, 0."""
        flag, inner_args = self._parse(args)
        if isinstance(flag, bool):
            return self._on(args, self.gen_fn.simulate(inner_args)) if flag else self._off(args)
        return self._batched(args, flag, self.gen_fn.simulate(inner_args))

    def generate(self, args: tuple[Any, ...], constraints: ChoiceMap | None = None,
                 ) -> tuple[MaskTrace, torch.Tensor]:
        """Math: weight = [flag] · the inner generate weight (NaN for an element whose
        batched flag is false and that is given a constraint)."""
        flag, inner_args = self._parse(args)
        cm = as_choicemap(constraints)
        if isinstance(flag, bool):
            if not flag:
                self._refuse(cm, "generate")
                tr = self._off(args)
                return tr, tr.score
            inner, w = self.gen_fn.generate(inner_args, cm)
            return self._on(args, inner), w
        inner, w = self.gen_fn.generate(inner_args, cm)
        return self._batched(args, flag, inner), _nan_where_unvisited(_where(flag, w, 0.0),
                                                                     flag, cm)

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
        """Math: weight = [flag] · log p_gen_fn(t; x); flag false: 0 and retval None."""
        flag, inner_args = self._parse(args)
        cm = as_choicemap(choices)
        if isinstance(flag, bool):
            if not flag:
                self._refuse(cm, "assess")
                return torch.zeros((), dtype=torch.get_default_dtype()), None
            return self.gen_fn.assess(inner_args, cm)
        tr, w = self.generate(args, cm)
        return w, tr.retval

    def update(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
               constraints: ChoiceMap | None = None,
               ) -> tuple[MaskTrace, torch.Tensor, Diff, ChoiceMap]:
        """Update where the flag stays true; generate where it turns true; drop where it
        turns false.

        Math: weight = Σ per case: stays on: the inner update weight; turns on: the inner
        generate weight (log p(t') − log q(fresh)); turns off: −old score; stays off: 0.
        discard = the inner discard (stays on) and the old choices (turns off).
        """
        return self._edit(trace, args, argdiffs, Constrain(as_choicemap(constraints)))

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[MaskTrace, torch.Tensor, Diff]:
        """Regenerate where the flag stays true; simulate where it turns true.

        Math: weight = the inner regenerate weight where the flag stays true, else 0 (new and
        removed choices contribute 0).
        """
        new, w, rd, _ = self._edit(trace, args, argdiffs, Resample(selection))
        return new, w, rd

    def _fresh(self, inner_args: tuple[Any, ...], edit: Edit) -> tuple[Trace, torch.Tensor]:
        """The inner function run afresh where the flag turns true: generated against the
        edit's constraints (an update), simulated with weight 0 (a regenerate)."""
        if edit.counts_discards:
            return self.gen_fn.generate(inner_args, edit.constraints)
        tr = self.gen_fn.simulate(inner_args)
        return tr, zero_weight(tr.score)

    def _edit(self, trace: Trace, args: tuple[Any, ...], argdiffs: Any, edit: Edit,
              ) -> tuple[MaskTrace, torch.Tensor, Diff, ChoiceMap]:
        """The edit engine of update and regenerate: per case of the old and the new flag,
        ``edit`` applied to the inner trace (stays on), the inner function run afresh (turns
        on), the inner trace dropped (turns off; an update counts its score and discards its
        choices)."""
        old = self._check_trace(trace)
        flag, inner_args = self._parse(args)
        argdiffs = check_argdiffs(args, argdiffs, 'Mask')
        cm = edit.constraints
        inner_diffs = argdiffs[1:]
        if isinstance(flag, bool) and not old.batched:
            if old.inner is not None and flag:
                inner, w, rd, d = edit.apply(self.gen_fn, old.inner, inner_args, inner_diffs)
                return self._on(args, inner), w, rd, d
            if flag:  # turns on
                inner, w = self._fresh(inner_args, edit)
                return self._on(args, inner), w, _UNKNOWN, _EMPTY
            self._refuse(cm, "update")
            new = self._off(args)
            if old.active and edit.counts_discards:  # turns off
                return new, -old.score, _UNKNOWN, old.choices
            return (new, torch.zeros_like(old.score), _UNKNOWN if old.active else _NO_CHANGE,
                    _EMPTY)
        # batched: per-element cases with torch.where
        f1 = self._as_tensor(flag)
        if old.inner is None:  # was off everywhere: the inner function afresh where on
            inner, w = self._fresh(inner_args, edit)
            w = _nan_where_unvisited(_where(f1, w, 0.0), f1, cm)
            return self._batched(args, f1, inner), w, _UNKNOWN, _EMPTY
        f0 = old.flag if old.batched else torch.tensor(True)
        assert f0 is not None
        inner, w, rd, d = edit.apply(self.gen_fn, old.inner, inner_args, inner_diffs)
        if isinstance(argdiffs[0], NoChange) and old.batched:  # the same flag: stays as it was
            return (self._batched(args, f1, inner),
                    _nan_where_unvisited(_where(f1, w, 0.0), f1, cm),
                    rd if isinstance(rd, NoChange) else _UNKNOWN, masked(d, f1))
        stay, on, off = f0 & f1, ~f0 & f1, f0 & ~f1
        fresh, wg = self._fresh(inner_args, edit)
        # (the fresh run may take other concrete paths inside -- a Mask off, a Switch on
        # another branch -- than the edited one: both widened to one structure first)
        fresh, inner = harmonize([fresh, inner])
        inner = tree_where(on, fresh, inner)
        if edit.counts_discards:
            weight = _where(stay, w, _where(on, wg, _where(off, -old.inner.score, 0.0)))
            discard = masked(d, stay).merge(masked(old.inner.choices, off))
        else:  # fresh and removed choices contribute 0
            weight, discard = _where(stay, w, 0.0), _EMPTY
        weight = _nan_where_unvisited(weight, f1, cm)
        return self._batched(args, f1, inner), weight, _UNKNOWN, discard

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Math: project(t, S) = [flag] · the inner project(t, S)."""
        old = self._check_trace(trace)
        if old.inner is None:
            return torch.zeros_like(old.score)
        w = self.gen_fn.project(old.inner, selection)
        if not old.batched:
            return w
        assert old.flag is not None
        return _where(old.flag, w, 0.0)
