"""Switch: choose one of several generative functions by an index argument.

``Switch(b_0, ..., b_{K-1})(index, *args)`` calls ``b_index(*args)``.  The chosen branch's
choices sit *flat* at the Switch's own addresses (there is no index key); the return value
is the branch's return value.

Math: log p(t; (k, x)) = log p_{b_k}(t; x): the Switch score is always the chosen branch's
score (Gen.jl's ``Switch`` ``generate`` leaves the trace score at 0; gfcomb does not).

Two ways of running
-------------------
*One branch* (the index is a Python int, or a tensor without a vmap batch dimension): only
the chosen branch runs; the trace holds that branch's trace.  An index out of range raises
:class:`ArgumentError` naming the index and the number of branches.

*Every branch* (the index is a tensor batched by ``torch.func.vmap``, e.g. ``Map(Switch(a,
b))(idx, xs)``): data-dependent Python control flow is impossible under vmap, so EVERY
branch runs for every element and the results are merged with ``torch.where`` on the index.
The trace holds every branch's trace (each a valid trace of its branch) and the index; its
choices are the chosen branch's: an address that only some branches have carries a
presence mask (``ChoiceMap.value(v, mask)``), so ``items()``/``has_value`` report, element by
element, only the chosen branch's choices.  Scores, weights and return values are selected
by the index.  Requirements and caveats of this mode:

- branches that share an address must agree on its kind (a choice, or a call with deeper
  addresses) and, for choices, on its shape; the branches' return values must have the same
  structure and shapes (ArgumentError otherwise);
- every branch is evaluated on every element, so branches must be numerically safe on the
  arguments of the others (a ``-inf`` log density in an unused branch is fine; a NaN that
  reaches a gradient through ``torch.where`` is not);
- errors that depend on the element cannot be raised inside vmap; they give NaN instead,
  never a wrong number: an index out of range gives a NaN score (the element's choices and
  return value are then meaningless); a constraint at an address that the element's chosen
  branch does not visit gives a NaN weight (a constraint that NO branch visits still raises
  :class:`UnvisitedConstraintError`); ``assess`` without a choice that the element's branch
  needs gives a NaN weight.  A Map over concrete tensors traces such a score or weight back
  to its element and raises the named error there (DESIGN §8); inside a user's own vmap the
  NaN stays.

One-branch traces of different branches cannot be stacked into one record (a Python loop
such as ``Map(..., vectorize=False)`` would keep the first element's branch for all): such a
stacked trace refuses to be read (ArgumentError) rather than answer for the wrong branch.

Changing branch in ``update`` and ``regenerate`` (one edit engine, :meth:`Switch._edit`):
see :mod:`gfcomb.combinators.switch.edit`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gfcomb.combinators.edit import Constrain, Edit, Resample
from gfcomb.combinators.parts import Combinator, gen_fn_part
from gfcomb.combinators.switch.edit import generate_reusing, old_logp, same_flags
from gfcomb.combinators.switch.merge import (
    Flag,
    check_some_branch_visits,
    equals,
    nan_like,
    nan_where,
    only,
    pick,
    where,
)
from gfcomb.combinators.switch.trace import SwitchTrace
from gfcomb.core import masked
from gfcomb.core.batching import is_batched
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange, all_unchanged
from gfcomb.core.errors import ArgumentError, MissingChoiceError, UnvisitedConstraintError
from gfcomb.core.gfi import (
    GenerativeFunction,
    as_choicemap,
    check_argdiffs,
    check_args_tuple,
    check_trace,
    zero_weight,
)
from gfcomb.core.selection import Selection, flag_and, flag_not
from gfcomb.core.trace import Trace
from gfcomb.core.validation import check_selection
from gfcomb.core.vmap import held_rows, unwrap_rows
from gfcomb.dsl.parameters import unique_parameters

_EMPTY = ChoiceMap.empty()


class Switch(Combinator):
    """``Switch(*branches)``: args ``(index, *branch_args)``; runs ``branches[index]`` (see
    the module docstring for the batched-index mode and for changing branch)."""

    def __init__(self, *branches: GenerativeFunction) -> None:
        if not branches:
            raise ArgumentError("Switch needs at least one branch")
        self.branches = tuple(gen_fn_part(b, "Switch", f"branch {i}")
                              for i, b in enumerate(branches))

    def parts(self) -> tuple[Any, ...]:
        """The branches."""
        return (Switch, self.branches)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The branches' trainable parameters, each once."""
        return unique_parameters([], list(self.branches))

    # ------------------------------------------------------------------ helpers
    def _parse(self, args: Any) -> tuple[int | torch.Tensor, tuple[Any, ...]]:
        args = check_args_tuple(args)
        if not args:
            raise ArgumentError("Switch: args must start with the branch index: "
                                "(index, *branch_args)")
        return self._index(args[0]), args[1:]

    def _index(self, index: Any) -> int | torch.Tensor:
        """A Python int (one branch runs) or a 0-dim batched tensor (every branch runs)."""
        n = len(self.branches)
        if isinstance(index, torch.Tensor):
            if index.numel() != 1:
                raise ArgumentError(f"Switch: the index must be a single integer, got a tensor "
                                    f"of shape {tuple(index.shape)}")
            if is_batched(index):
                return index if index.dim() == 0 else index.reshape(())
            if index.is_floating_point() or index.is_complex():
                value = float(index.reshape(()))
                if value != math.floor(value):
                    raise ArgumentError(f"Switch: the index must be an integer, got {value}")
            k = int(index.reshape(()))
        elif isinstance(index, int):
            k = int(index)
        else:
            raise ArgumentError(f"Switch: the index must be an int or an integer tensor, "
                                f"got {index!r}")
        if not 0 <= k < n:
            raise ArgumentError(f"Switch: index {k} is out of range for {n} branch"
                                f"{'es' if n != 1 else ''} (valid indices: 0..{n - 1})")
        return k

    def _flags(self, index: int | torch.Tensor) -> list[Flag]:
        """Per branch: is it the chosen one (bool, or a bool tensor per element)."""
        return [equals(index, k) for k in range(len(self.branches))]

    def _trace(self, args: tuple[Any, ...], index: int | torch.Tensor,
               traces: Sequence[Trace | None], flags: list[Flag] | None = None) -> SwitchTrace:
        traces = tuple(traces)
        if isinstance(index, int):
            tr = traces[index]
            assert tr is not None
            given = args[0].reshape(()) if isinstance(args[0], torch.Tensor) else index
            return SwitchTrace(self, args, given, traces, tr.retval, tr.score, False)
        if flags is None:
            flags = self._flags(index)
        score = pick(flags, [None if t is None else t.score for t in traces], nan_like,
                      "scores")
        retval = pick(flags, [None if t is None else t.retval for t in traces], lambda v: v,
                       "return values")
        return SwitchTrace(self, args, index, traces, retval, score, True, flags=flags)

    def _check_trace(self, trace: Any) -> SwitchTrace:
        return check_trace(self, trace, SwitchTrace).narrowed()

    # ------------------------------------------------------------------ the batch protocol
    # A batch with one branch index per row runs every branch's own batch method for all
    # rows and merges them by the index (merge.py): what the Switch does per row under the
    # vmap over the rows (every branch runs, the index picks), without the vmap.  An index
    # shared by every row (or one expanded to every row, which the vmap sees as shared) runs
    # that branch alone, as per row.
    def batch_matches_per_row(self) -> bool:
        """True: the batch methods give what the per-row methods give under the vmap over
        the rows, so a caller already running per row calls the per-row methods."""
        return True

    def _batch_index(self, args: tuple[Any, ...]) -> int | torch.Tensor | None:
        """The index of a batch call: the per-row index (1-d), the one branch every row
        takes, or None (not an integer index: the vmap default says what is wrong)."""
        if not args:
            return None
        index, per_row = unwrap_rows(args[0])
        if isinstance(index, torch.Tensor):
            if index.is_floating_point() or index.is_complex() or index.dim() != int(per_row):
                return None
            if per_row:
                if index.stride(0) != 0 or index.shape[0] == 1:
                    return index
                index = index[0]
        elif type(index) is not int:
            return None
        try:
            return self._index(index)
        except ArgumentError:
            return None

    def batch_runs_whole(self, args: tuple[Any, ...]) -> bool:
        """Whether a batch with ``args`` runs on the whole batch: an integer index (per row
        or shared) and the batch of every branch that runs running whole."""
        index = self._batch_index(args)
        if index is None:
            return False
        bargs = tuple(args[1:])
        branches = self.branches if isinstance(index, torch.Tensor) else (self.branches[index],)
        return all(b.batch_runs_whole(bargs) for b in branches)

    def batch_generate(self, n: int, args: tuple[Any, ...],
                       constraints: Any = None) -> tuple[SwitchTrace, torch.Tensor]:
        """``generate`` for ``n`` rows.  Unconstrained, when :meth:`batch_runs_whole`: the
        branches' batches merged by the index; otherwise the vmap default.

        Math: row i is ``simulate`` of branch index_i (see :meth:`simulate`).
        """
        args = check_args_tuple(args)
        if not as_choicemap(unwrap_rows(constraints)[0]).is_empty() \
                or not self.batch_runs_whole(args):
            return super().batch_generate(n, args, constraints)  # type: ignore[return-value]
        index = self._batch_index(args)
        assert index is not None
        bargs = tuple(args[1:])
        held = [held_rows(a, n) for a in args]
        if isinstance(index, torch.Tensor):
            tr = self._trace(tuple(held), index, [b.batch_generate(n, bargs)[0]
                                                  for b in self.branches])
            return tr, zero_weight(tr.score)
        one, _ = self.branches[index].batch_generate(n, bargs)
        given = held[0] if isinstance(held[0], torch.Tensor) else index
        tr = SwitchTrace(self, tuple(held), given, tuple(only(index, one, len(self.branches))),
                         one.retval, one.score, False)
        return tr, zero_weight(tr.score)

    # ------------------------------------------------------------------ the GFI
    def simulate(self, args: tuple[Any, ...]) -> SwitchTrace:
        """Run the chosen branch (every branch under vmap with a batched index).

        Math: t ~ p_{b_k}(·; x); score = log p_{b_k}(t; x).
        """
        index, bargs = self._parse(args)
        flags = self._flags(index)
        traces = [b.simulate(bargs) if f is not False else None
                  for b, f in zip(self.branches, flags)]
        return self._trace(args, index, traces, flags)

    def generate(self, args: tuple[Any, ...], constraints: ChoiceMap | None = None,
                 ) -> tuple[SwitchTrace, torch.Tensor]:
        """Generate the chosen branch with the constraints.

        Math: weight = the branch's generate weight = log p_{b_k}(t; x) − log q(u), which
        with prior proposals is Σ log p of the constrained choices; the trace score is the
        branch score (full constraints: weight == score == assess weight).
        """
        index, bargs = self._parse(args)
        cm = as_choicemap(constraints)
        if isinstance(index, int):
            tr, w = self.branches[index].generate(bargs, cm)
            return self._trace(args, index, only(index, tr, len(self.branches))), w
        if cm.is_empty():
            tr = self.simulate(args)
            return tr, zero_weight(tr.score)
        traces, weights, dropped = [], [], []
        for k in range(len(self.branches)):
            tr, w, _, drop = generate_reusing(self.branches[k], bargs, cm, _EMPTY, None, True)
            traces.append(tr)
            weights.append(nan_where(masked.any_present(drop), w))
            dropped.append(drop)
        check_some_branch_visits(dropped, "generate")
        flags = self._flags(index)
        weight = pick(flags, weights, nan_like, "weights")
        return self._trace(args, index, traces, flags), weight

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
        """Score the choices under the chosen branch.

        Math: weight = log p_{b_k}(t; x); every choice the branch visits must be given.
        """
        index, bargs = self._parse(args)
        cm = as_choicemap(choices)
        if isinstance(index, int):
            return self.branches[index].assess(bargs, cm)
        weights, retvals = [], []
        for branch in self.branches:
            try:
                w, r = branch.assess(bargs, cm)
                used = cm
                if masked.all_present(cm) is not True:
                    # masked values: missing only where this element's branch visits them (a
                    # nested Switch/Map element may not have the address at all)
                    made = branch.generate(bargs, cm)[0].choices
                    weights.append(nan_where(masked.missing(made, cm), w))
                    retvals.append(r)
                    continue
            except (UnvisitedConstraintError, MissingChoiceError):
                sim = branch.simulate(bargs)
                used = masked.restrict(cm, sim.choices)[0]
                try:
                    w, r = branch.assess(bargs, used)
                except MissingChoiceError:  # no element on this branch can be assessed
                    w, r, used = nan_like(sim.score), sim.retval, _EMPTY
            # a masked-out value of `used` is missing where this element's branch visits it
            if masked.all_present(used) is not True:
                made = branch.generate(bargs, used)[0].choices
                w = nan_where(masked.missing(made, used), w)
            weights.append(w)
            retvals.append(r)
        flags = self._flags(index)
        return (pick(flags, weights, nan_like, "weights"),
                pick(flags, retvals, lambda v: v, "return values"))

    def update(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
               constraints: ChoiceMap | None = None,
               ) -> tuple[SwitchTrace, torch.Tensor, Diff, ChoiceMap]:
        """Same branch: the branch's update; new branch: generate it reusing old choices.

        Math: same branch k: the branch's update with argdiffs ``argdiffs[1:]`` (weight =
        log p(t'; x') − log p(t; x) − log q(fresh)).  Branch change k → j: b_j is generated
        with constraints = the new constraints ∪ the old choices at addresses b_j visits that
        the constraints do not set; weight = that generate weight − old score = log p_{b_j}(t')
        − log p_{b_k}(t) − Σ log p of the freshly sampled choices; discard = the old choices
        that are not reused (those b_j does not visit and those overwritten).  retdiff is the
        branch's on the same branch, else UnknownChange.
        """
        return self._edit(trace, args, argdiffs, Constrain(as_choicemap(constraints)))

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[SwitchTrace, torch.Tensor, Diff]:
        """Same branch: the branch's regenerate; new branch: generate it reusing the old
        unselected choices at the addresses it visits.

        Math (DESIGN §1): weight = Σ over retained, unselected choices of (log p' − log p);
        selected, new and removed choices contribute 0.  Same branch: the branch's regenerate
        weight.  Branch change k → j: the reused choices R (old, unselected, visited by b_j)
        are the only retained ones, so weight = Σ_{a∈R} log p_{b_j}(t[a]) − Σ_{a∈R}
        log p_{b_k}(t[a]) = (generate weight of b_j given R) − project(t_{b_k}, R).
        """
        check_selection(selection, self, "regenerate")
        new, w, rd, _ = self._edit(trace, args, argdiffs, Resample(selection))
        return new, w, rd

    def _edit(self, trace: Trace, args: tuple[Any, ...], argdiffs: Any, edit: Edit,
              ) -> tuple[SwitchTrace, torch.Tensor, Diff, ChoiceMap]:
        """The edit engine of update and regenerate: per branch the element needs, apply
        ``edit`` to the branch's old trace where the element stays on it, and generate it
        reusing the old choices the edit leaves (:func:`generate_reusing`) where the element
        moves to it; merge the branches by the index."""
        trace = self._check_trace(trace)
        index, bargs = self._parse(args)
        argdiffs = check_argdiffs(args, argdiffs, 'Switch')
        if edit.is_empty() and all_unchanged(argdiffs):
            return trace, torch.zeros_like(trace.score), NoChange(), _EMPTY
        bdiffs = tuple(argdiffs[1:])
        batched = isinstance(index, torch.Tensor) or trace.batched
        need = self._flags(index)
        if (edit.counts_discards and batched and trace.batched
                and not isinstance(argdiffs[0], NoChange)):
            # an update with a changed index under vmap: one generate of each branch for the
            # elements that stay on it and those that move to it alike (staying elements
            # reuse every old choice: with prior proposals that is the branch's update,
            # weight and discard included), instead of an update AND a generate merged by
            # torch.where.  (A regenerate would need a projection of every old branch.)
            same: list[Flag] = [False] * len(self.branches)
        else:
            same = same_flags(trace, argdiffs[0])
        traces: list[Trace | None] = []
        weights: list[Any] = []
        discards: list[tuple[ChoiceMap, Flag]] = []
        dropped: list[ChoiceMap] = []
        retdiff: Diff = UnknownChange()
        old_choices = provided = None
        # an update of a generated branch weighs its generate weight − the old score (every
        # old choice is reused or discarded): subtracted once when every branch is generated
        minus_old = edit.counts_discards and all(s is False for s in same)
        for k, branch in enumerate(self.branches):
            if need[k] is False:
                traces.append(None)
                weights.append(None)
                continue
            s = same[k]
            drop = _EMPTY
            tr_u = w_u = tr_g = w_g = None
            if s is not False:  # elements staying on branch k: the branch's own edit
                old_k = trace.traces[k]
                sub = edit
                if batched:
                    sub, drop = edit.restricted(old_k.choices)
                tr_u, w_u, rd, d_u = sub.apply(branch, old_k, bargs, bdiffs)
                discards.append((d_u, flag_and(need[k], s)))
                if s is True and need[k] is True:
                    retdiff = rd
            if s is not True:  # elements moving to branch k: generate, reusing old choices
                if old_choices is None:
                    old_choices = trace.choices
                    provided = edit.reusable(old_choices)
                assert provided is not None
                hint = trace.traces[k].choices if trace.traces[k] is not None else None
                tr_g, w_g, reused, drop = generate_reusing(branch, bargs, edit.constraints,
                                                           provided, hint, batched)
                if not edit.counts_discards:  # Σ over the reused (retained) choices only
                    w_g = w_g - old_logp(self.branches, trace, reused)
                elif not minus_old:
                    w_g = w_g - trace.score
                discards.append((masked.minus(old_choices, reused) if edit.counts_discards
                                 else _EMPTY, flag_and(need[k], flag_not(s))))
            traces.append(where(s, tr_u, tr_g, "traces"))
            weights.append(nan_where(masked.any_present(drop), where(s, w_u, w_g, "weights")))
            dropped.append(drop)
        if batched:
            check_some_branch_visits(dropped, "update")
        new_trace = self._trace(args, index, traces, need)
        weight = pick(need, weights, nan_like, "weights")
        if minus_old:
            weight = weight - trace.score
        return new_trace, weight, retdiff, masked.union(discards, exhaustive=True)

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Math: project(t, S) = the chosen branch's project(t_{b_k}, S)."""
        check_selection(selection, self, "project")
        trace = self._check_trace(trace)
        if selection.is_all_static():
            return trace.score
        k = trace.selector
        if isinstance(k, int):
            return self.branches[k].project(trace.traces[k], selection)
        ws = [None if t is None else b.project(t, selection)
              for b, t in zip(self.branches, trace.traces)]
        return pick(self._flags(k), ws, nan_like, "weights")
