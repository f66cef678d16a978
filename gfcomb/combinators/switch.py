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
  needs gives a NaN weight.

One-branch traces of different branches cannot be stacked into one record (a Python loop
such as ``Map(..., vectorize=False)`` would keep the first element's branch for all): such a
stacked trace refuses to be read (ArgumentError) rather than answer for the wrong branch.

Changing branch (update, regenerate)
------------------------------------
Under vmap with a changed batched index, ``update`` runs ONE ``generate`` per branch for all
elements, whether they stay on the branch or move to it: the elements that stay reuse every
old choice, which for branches with prior proposals (every @gen function, distribution and
combinator of gfcomb) is exactly the branch's update: same weight (new score − old score −
Σ log p of fresh choices), same discard (the overwritten values).  (Running the branch's
update AND a generate and merging the two traces with ``torch.where`` cost twice as much.)
With an unchanged index (``NoChange``) every element stays and the branch's own update runs.

The new branch is *generated* with the old choices it can reuse as constraints: the old
choices at addresses the new branch visits, minus those overwritten by new constraints
(update) or selected (regenerate).  To know which addresses the new branch visits without
making it fail on the ones it does not, we first try a ``generate`` with all of them; if the
branch rejects one (UnvisitedConstraintError), we take the branch's address structure from a
``simulate`` (or, under vmap, from the branch's trace already held in the old trace), keep the
old choices at those addresses, generate, and check that the new trace visits no other old
address.  A branch whose addresses depend on its choices (possible outside vmap only) is
re-generated with the structure it actually showed (an old choice it then rejects is left
out), until the reused set is stable, so every old choice at an address the new trace
visits is reused, as in Gen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import attrs
import torch

from gfcomb.combinators.vector import has_masks
from gfcomb.core import masked
from gfcomb.core.batching import inside_functorch_transform, is_batched
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange
from gfcomb.core.errors import (
    ArgumentError,
    MissingChoiceError,
    UnvisitedConstraintError,
)
from gfcomb.core.gfi import GenerativeFunction, as_choicemap, check_argdiffs, check_args_tuple
from gfcomb.core.harmonize import harmonize_values, rebuild_record
from gfcomb.core.pytree import (
    register_record,
    tree_map2_tensors,
    tree_map_tensors,
)
from gfcomb.core.selection import (
    MaskSelection,
    Selection,
    flag_and,
    flag_not,
)
from gfcomb.core.trace import Trace
from gfcomb.core.validation import check_selection
from gfcomb.dsl.parameters import unique_parameters

Flag = Union[bool, torch.Tensor]
_EMPTY = ChoiceMap.empty()
_MAX_PASSES = 8  # re-generations for branches whose structure depends on their choices


# =============================================================================== the trace
@attrs.frozen(repr=False)
class SwitchTrace(Trace):
    """The trace of a :class:`Switch`.

    ``batched`` is False when one branch ran: ``traces`` holds its trace at its position and
    None elsewhere; ``index`` is the index as given (a Python int, or a 0-dim tensor).  It is
    True when every branch ran under vmap: every entry of ``traces`` is a trace of its branch
    and ``index`` is the index tensor (with leading batch dimensions outside vmap).
    ``choices`` are the chosen branch's choices (masked per element in the second case).
    """

    gen_fn: Any
    args: tuple[Any, ...]
    index: Any
    traces: tuple[Any, ...]
    retval: Any
    score: torch.Tensor
    batched: bool
    _layout: Any = attrs.field(default=None, eq=False, repr=False)
    _choices: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def all_branches(self) -> bool:
        """True if every branch ran (the index was batched under vmap)."""
        return self.batched

    @property
    def selector(self) -> int | torch.Tensor:
        """The chosen branch: an int when one branch ran, else the (batched) index tensor."""
        if self.batched:
            return self.index
        k = next(i for i, t in enumerate(self.traces) if t is not None)
        if isinstance(self.index, torch.Tensor) and not inside_functorch_transform():
            # one-branch traces of different branches stacked together (by a Python loop
            # such as Map(vectorize=False)) keep only the first one's branch: refuse them
            if not bool((self.index == k).all()):
                raise ArgumentError(
                    f"this Switch trace holds branch {k}'s trace but its index is "
                    f"{self.index.tolist()}: traces of different branches were stacked (e.g. "
                    "by Map(..., vectorize=False)); run the Switch under vmap (vectorize=True), "
                    "where every branch runs and the results are merged by the index")
        return k

    def narrowed(self) -> SwitchTrace:
        """The one-branch form of an every-branch trace whose index is one integer that no
        vmap batches (e.g. a step of an Unfold read back after :func:`harmonize` widened
        it, or one element of a batched trace indexed outside vmap): the chosen branch's
        trace alone, as a one-branch run would have made it.  Other traces: unchanged."""
        idx = self.index
        if not self.batched or idx.dim() != 0 or is_batched(idx):
            return self
        try:
            k = int(idx)
        except RuntimeError:  # under another functorch transform: keep the masked form
            return self
        if not 0 <= k < len(self.traces) or self.traces[k] is None:
            return self
        only = tuple(_only(k, self.traces[k], len(self.traces)))
        return SwitchTrace(self.gen_fn, self.args, idx, only, self.retval, self.score, False)

    @property
    def branch_trace(self) -> Trace:
        """The chosen branch's trace (one-branch traces only)."""
        if self.batched:
            raise ArgumentError("this Switch trace ran every branch under vmap (batched "
                                "index); read trace.traces[k] for branch k")
        return self.traces[self.selector]

    @property
    def choices(self) -> ChoiceMap:
        cached = self._choices
        if cached is None:
            narrow = self.narrowed()
            if not narrow.batched:
                cached = narrow.traces[narrow.selector].choices
            else:
                flags = [self.index == k for k in range(len(self.traces))]
                cached = masked.union([(t.choices, f) for t, f in zip(self.traces, flags)
                                 if t is not None], bdim=self.index.dim(), exhaustive=True)
            object.__setattr__(self, "_choices", cached)
        return cached

    def _after_unflatten(self) -> None:
        object.__setattr__(self, "_choices", None)

    def discrete_addresses(self) -> Iterator[tuple[Any, ...]]:
        """The discrete addresses of every branch present (their choices sit flat)."""
        for sub in self.traces:
            if sub is not None:
                yield from sub.discrete_addresses()

    @staticmethod
    def harmonize_group(xs: list[SwitchTrace]) -> list[SwitchTrace] | None:
        """Switch traces of one structure (:mod:`gfcomb.core.harmonize`'s record protocol):
        on different branches, widened to every branch that occurs."""
        return _harmonize_switch(xs)

    def _retval_at(self, path: tuple[Any, ...]) -> Any:
        """``get_retval(addr)``: a call of the chosen branch (its addresses sit flat)."""
        return self.narrowed().branch_trace.get_retval(path)


register_record(SwitchTrace, dynamic=("args", "index", "traces", "retval", "score"),
                static=("gen_fn", "batched"))


def _branch_of(tr: SwitchTrace) -> int:
    return next(i for i, t in enumerate(tr.traces) if t is not None)


def _harmonize_switch(xs: list[SwitchTrace]) -> list[SwitchTrace] | None:
    """Switch traces of one structure (see :func:`gfcomb.core.harmonize.harmonize`): on one
    branch, harmonized inside it; else widened to every branch that occurs."""
    fn = xs[0].gen_fn
    n = len(xs[0].traces)
    if any(x.gen_fn != fn or len(x.traces) != n for x in xs):
        return None
    occurs = [k for k in range(n) if any(x.traces[k] is not None for x in xs)]
    if (len(occurs) == 1 and not any(x.batched for x in xs)
            and len({isinstance(x.index, torch.Tensor) for x in xs}) == 1):
        # every trace on the same branch: harmonize inside it
        k = occurs[0]
        col = harmonize_values([x.traces[k] for x in xs])
        if col is None:
            return None
        return [rebuild_record(x, {"traces": tuple(_only(k, c, n))}) for x, c in zip(xs, col)]
    # widen: every branch that occurs, the absent ones filled from a template
    cols: dict[int, list[Any]] = {}
    for k in occurs:
        template = next(x.traces[k] for x in xs if x.traces[k] is not None)
        col = [x.traces[k] if x.traces[k] is not None else _template(template, x.score.shape)
               for x in xs]
        inner = harmonize_values(col)
        cols[k] = col if inner is None else inner
    out = []
    for i, x in enumerate(xs):
        if x.batched:
            index = x.index if x.index.dtype == torch.long else x.index.long()
        else:
            index = torch.full(x.score.shape, _branch_of(x), dtype=torch.long,
                               device=x.score.device)
        args = x.args
        if args and not isinstance(args[0], torch.Tensor):
            args = (index,) + tuple(args[1:])
        traces = tuple(cols[k][i] if k in cols else None for k in range(n))
        out.append(SwitchTrace(fn, args, index, traces, x.retval, x.score, True))
    return out


def _template(tr: Trace, shape: torch.Size) -> Trace:
    """The branch trace ``tr`` as a stand-in for a trace with element axes ``shape`` (its
    first element broadcast; values never read: masked out by the index)."""
    lead = tr.score.dim()
    if tuple(tr.score.shape) == tuple(shape) or lead != len(shape):
        return tr
    first = (0,) * lead

    def fit(v: torch.Tensor) -> torch.Tensor:
        if v.dim() < lead:
            return v
        return v[first].expand(tuple(shape) + tuple(v.shape[lead:]))

    return tree_map_tensors(fit, tr)


# ====================================================================== the combinator
class Switch(GenerativeFunction):
    """``Switch(*branches)``: args ``(index, *branch_args)``; runs ``branches[index]`` (see
    the module docstring for the batched-index mode and for changing branch)."""

    def __init__(self, *branches: GenerativeFunction) -> None:
        if not branches:
            raise ArgumentError("Switch needs at least one branch")
        for i, b in enumerate(branches):
            if not isinstance(b, GenerativeFunction):
                raise TypeError(f"Switch: branch {i} is not a generative function: {b!r}")
        self.branches: tuple[GenerativeFunction, ...] = tuple(branches)

    def __repr__(self) -> str:
        return f"Switch({', '.join(repr(b) for b in self.branches)})"

    def _key(self) -> tuple[Any, ...]:
        return (Switch, self.branches)

    def __eq__(self, other: object) -> bool:
        # Switch(a, b) is often built inside a @gen body: equal parts, same function
        return isinstance(other, Switch) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

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
        return [_equals(index, k) for k in range(len(self.branches))]

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
        score = _pick(flags, [None if t is None else t.score for t in traces], _nan_like,
                      "scores")
        retval = _pick(flags, [None if t is None else t.retval for t in traces], lambda v: v,
                       "return values")
        return SwitchTrace(self, args, index, traces, retval, score, True)

    def _check_trace(self, trace: Any) -> SwitchTrace:
        if not isinstance(trace, SwitchTrace) or trace.gen_fn != self:
            raise ArgumentError(f"{self!r} was given a trace of another generative function: "
                                f"{getattr(trace, 'gen_fn', trace)!r}")
        return trace.narrowed()

    def _generate_reusing(self, k: int, bargs: tuple[Any, ...], cm: ChoiceMap,
                          provided: ChoiceMap, structure: ChoiceMap | None, batched: bool,
                          ) -> tuple[Trace, torch.Tensor, ChoiceMap, ChoiceMap]:
        """Generate branch ``k`` with constraints ``cm`` and, where it visits their addresses,
        the old choices ``provided`` (disjoint from ``cm``).

        Returns ``(trace, weight, reused, dropped)``: ``reused`` are the old choices passed
        on; ``dropped`` the constraints of ``cm`` at addresses branch ``k`` never visits
        (batched mode only; outside it the branch raises for them).  ``structure`` is a
        choice map with the branch's addresses, if known.
        """
        branch = self.branches[k]
        if structure is None:
            try:
                tr, w = branch.generate(bargs, masked.union([(cm, True), (provided, True)]))
                return tr, w, provided, _EMPTY
            except UnvisitedConstraintError:
                if not batched and provided.is_empty():
                    raise
                structure = branch.simulate(bargs).choices
        cm_use, dropped = masked.restrict(cm, structure) if batched else (cm, _EMPTY)
        reused = masked.restrict(provided, structure)[0]
        best = None
        for _ in range(_MAX_PASSES):
            # (under vmap the structure is static and the first pass succeeds; outside it a
            # branch whose addresses depend on its choices may need a few passes)
            try:
                tr, w = branch.generate(bargs, masked.union([(cm_use, True), (reused, True)]))
            except UnvisitedConstraintError as err:
                smaller = masked.without(reused, tuple(err.address))
                if smaller is None:  # not an old choice: a bad constraint
                    raise
                reused = smaller
                continue
            if batched and has_masks(tr.choices):
                # the branch's addresses differ per element (a nested Switch): an old choice
                # reused for an element whose new trace does not visit its address must not
                # count as a constraint it ignores (NaN weight) -- pass only the old choices
                # each element's new trace visits, and generate again
                reused = masked.where_present(reused, tr.choices)
                tr, w = branch.generate(bargs, masked.union([(cm_use, True), (reused, True)]))
                best = (tr, w, reused)
                break
            best = (tr, w, reused)
            visited = masked.restrict(provided, tr.choices)[0]
            if masked.addresses(visited) == masked.addresses(reused):
                break
            reused = visited
        if best is None:  # no stable reuse found: reuse nothing (still a valid update)
            tr, w = branch.generate(bargs, cm_use)
            best = (tr, w, _EMPTY)
        return best[0], best[1], best[2], dropped

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
            return self._trace(args, index, _only(index, tr, len(self.branches))), w
        if cm.is_empty():
            tr = self.simulate(args)
            return tr, torch.zeros_like(tr.score)
        traces, weights, dropped = [], [], []
        for k in range(len(self.branches)):
            tr, w, _, drop = self._generate_reusing(k, bargs, cm, _EMPTY, None, True)
            traces.append(tr)
            weights.append(_nan_where(masked.any_present(drop), w))
            dropped.append(drop)
        _check_some_branch_visits(dropped, "generate")
        flags = self._flags(index)
        weight = _pick(flags, weights, _nan_like, "weights")
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
                    weights.append(_nan_where(masked.missing(made, cm), w))
                    retvals.append(r)
                    continue
            except (UnvisitedConstraintError, MissingChoiceError):
                sim = branch.simulate(bargs)
                used = masked.restrict(cm, sim.choices)[0]
                try:
                    w, r = branch.assess(bargs, used)
                except MissingChoiceError:  # no element on this branch can be assessed
                    w, r, used = _nan_like(sim.score), sim.retval, _EMPTY
            # a masked-out value of `used` is missing where this element's branch visits it
            if masked.all_present(used) is not True:
                made = branch.generate(bargs, used)[0].choices
                w = _nan_where(masked.missing(made, used), w)
            weights.append(w)
            retvals.append(r)
        flags = self._flags(index)
        return (_pick(flags, weights, _nan_like, "weights"),
                _pick(flags, retvals, lambda v: v, "return values"))

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
        trace = self._check_trace(trace)
        index, bargs = self._parse(args)
        argdiffs = check_argdiffs(args, argdiffs, 'Switch')
        cm = as_choicemap(constraints)
        if cm.is_empty() and all(isinstance(d, NoChange) for d in argdiffs):
            return trace, torch.zeros_like(trace.score), NoChange(), _EMPTY
        bdiffs = tuple(argdiffs[1:])
        batched = isinstance(index, torch.Tensor) or trace.batched
        need = self._flags(index)
        if batched and trace.batched and not isinstance(argdiffs[0], NoChange):
            # a changed index under vmap: one generate of each branch for the elements that
            # stay on it and those that move to it alike (staying elements reuse every old
            # choice: with prior proposals that is the branch's update, weight and discard
            # included), instead of an update AND a generate merged by torch.where
            same: list[Flag] = [False] * len(self.branches)
        else:
            same = self._same_flags(trace, argdiffs[0])
        traces: list[Trace | None] = []
        weights: list[Any] = []
        discards: list[tuple[ChoiceMap, Flag]] = []
        dropped: list[ChoiceMap] = []
        retdiff: Diff = UnknownChange()
        old_choices = provided = None
        minus_old = all(s is False for s in same)  # every weight is generate weight − old score
        for k, branch in enumerate(self.branches):
            if need[k] is False:
                traces.append(None)
                weights.append(None)
                continue
            s = same[k]
            drop = _EMPTY
            tr_u = w_u = tr_g = w_g = None
            if s is not False:  # elements staying on branch k: the branch's update
                old_k = trace.traces[k]
                cm_k = cm
                if batched:
                    cm_k, drop = masked.restrict(cm, old_k.choices)
                tr_u, w_u, rd, d_u = branch.update(old_k, bargs, bdiffs, cm_k)
                discards.append((d_u, flag_and(need[k], s)))
                if s is True and need[k] is True:
                    retdiff = rd
            if s is not True:  # elements moving to branch k: generate, reusing old choices
                if old_choices is None:
                    old_choices = trace.choices
                    provided = masked.minus(old_choices, cm)
                assert provided is not None
                hint = trace.traces[k].choices if trace.traces[k] is not None else None
                tr_g, w_g, reused, drop = self._generate_reusing(k, bargs, cm, provided, hint,
                                                                 batched)
                if not minus_old:
                    w_g = w_g - trace.score
                discards.append((masked.minus(old_choices, reused), flag_and(need[k], flag_not(s))))
            traces.append(_where(s, tr_u, tr_g, "traces"))
            weights.append(_nan_where(masked.any_present(drop), _where(s, w_u, w_g, "weights")))
            dropped.append(drop)
        if batched:
            _check_some_branch_visits(dropped, "update")
        new_trace = self._trace(args, index, traces, need)
        weight = _pick(need, weights, _nan_like, "weights")
        if minus_old:
            weight = weight - trace.score
        return new_trace, weight, retdiff, masked.union(discards, exhaustive=True)

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
        trace = self._check_trace(trace)
        index, bargs = self._parse(args)
        argdiffs = check_argdiffs(args, argdiffs, 'Switch')
        if selection.is_empty_static() and all(isinstance(d, NoChange) for d in argdiffs):
            return trace, torch.zeros_like(trace.score), NoChange()
        bdiffs = tuple(argdiffs[1:])
        batched = isinstance(index, torch.Tensor) or trace.batched
        need = self._flags(index)
        same = self._same_flags(trace, argdiffs[0])
        traces: list[Trace | None] = []
        weights: list[Any] = []
        retdiff: Diff = UnknownChange()
        provided = None
        for k, branch in enumerate(self.branches):
            if need[k] is False:
                traces.append(None)
                weights.append(None)
                continue
            s = same[k]
            tr_u = w_u = tr_g = w_g = None
            if s is not False:
                tr_u, w_u, rd = branch.regenerate(trace.traces[k], bargs, bdiffs, selection)
                if s is True and need[k] is True:
                    retdiff = rd
            if s is not True:
                if provided is None:
                    provided = masked.drop_selected(trace.choices, selection)
                hint = trace.traces[k].choices if trace.traces[k] is not None else None
                tr_g, w_g, reused, _ = self._generate_reusing(k, bargs, _EMPTY, provided, hint,
                                                              batched)
                w_g = w_g - self._old_logp(trace, reused)
            traces.append(_where(s, tr_u, tr_g, "traces"))
            weights.append(_where(s, w_u, w_g, "weights"))
        new_trace = self._trace(args, index, traces)
        return new_trace, _pick(need, weights, _nan_like, "weights"), retdiff

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
        return _pick(self._flags(k), ws, _nan_like, "weights")

    # ------------------------------------------------------------------ update helpers
    def _same_flags(self, trace: SwitchTrace, index_diff: Diff) -> list[Flag]:
        """Per new branch k: is the element's old branch k too (bool or per-element tensor)."""
        old = trace.selector
        out: list[Flag] = []
        for k in range(len(self.branches)):
            if trace.traces[k] is None:
                out.append(False)  # no element was on branch k (widened by harmonize)
            elif isinstance(index_diff, NoChange):
                out.append(True)  # the index did not change: every element stays
            else:
                out.append(_equals(old, k))
        return out

    def _old_logp(self, trace: SwitchTrace, reused: ChoiceMap) -> torch.Tensor:
        """Σ over the reused old choices of their log density under the old branch."""
        if reused.is_empty():
            return torch.zeros_like(trace.score)
        sel = MaskSelection(masked.presence_flags(reused))
        old = trace.selector
        total: Any = None
        for i, (b, t) in enumerate(zip(self.branches, trace.traces)):
            if t is None:
                continue
            lp = b.project(t, sel)
            f = _equals(old, i)
            lp = _where(f, lp, torch.zeros_like(lp), "weights")
            total = lp if total is None else total + lp
        return total


# ============================================================================ helpers
def _only(k: int, tr: Trace, n: int) -> list[Trace | None]:
    return [tr if i == k else None for i in range(n)]


def _equals(index: int | torch.Tensor, k: int) -> Flag:
    """``index == k``: a bool for an int index, a bool tensor for a tensor index."""
    return index == k


def _nan_like(x: Any) -> torch.Tensor:
    return torch.full_like(x, math.nan)


def _nan_where(bad: Flag, w: torch.Tensor) -> torch.Tensor:
    """``w`` with NaN where ``bad`` (an element-level error that vmap cannot raise)."""
    if bad is False:
        return w
    if bad is True:
        return _nan_like(w)
    return torch.where(bad, _nan_like(w), w)


def _where(flag: Flag, a: Any, b: Any, what: str) -> Any:
    """Leafwise ``torch.where(flag, a, b)`` over two pytrees of the same structure."""
    if flag is True:
        return a
    if flag is False:
        return b

    def pick(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x is y:  # e.g. the same argument in both traces
            return x
        if x.shape != y.shape:
            raise ArgumentError(
                f"Switch with a batched index (every branch runs under vmap): the branches' "
                f"{what} differ in shape ({tuple(x.shape)} vs {tuple(y.shape)})")
        return torch.where(_flag_for(flag, x), x, y)

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):  # no pytree walk
        return pick(a, b)
    try:
        return tree_map2_tensors(pick, a, b)
    except ValueError as err:
        raise ArgumentError(
            f"Switch with a batched index (every branch runs under vmap): the branches' "
            f"{what} have different structures") from err


def _pick(flags: Sequence[Flag], values: Sequence[Any], fill: Callable[[Any], Any],
          what: str) -> Any:
    """The value of the chosen branch: ``values[k]`` where ``flags[k]`` (``fill`` where none)."""
    acc = None
    for f, v in zip(flags, values):
        if f is False or v is None:
            continue
        if f is True:
            return v
        if acc is None and fill is _nan_like and isinstance(v, torch.Tensor):
            acc = torch.where(_flag_for(f, v), v, math.nan)  # (no NaN tensor to build)
            continue
        acc = _where(f, v, fill(v) if acc is None else acc, what)
    return acc


def _flag_for(flag: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-element flag with trailing singleton dimensions to broadcast against ``x``."""
    extra = x.dim() - flag.dim()
    return flag if extra <= 0 else flag.reshape(flag.shape + (1,) * extra)


def _check_some_branch_visits(dropped: Sequence[ChoiceMap], method: str) -> None:
    """Batched mode: a constraint that no branch visits is an error for every element."""
    if not dropped:
        return
    common = masked.addresses(dropped[0])
    for d in dropped[1:]:
        common &= masked.addresses(d)
    if common:
        addr = min(common, key=repr)
        raise UnvisitedConstraintError(
            f"{method}: constraint at address {{addr}} is never visited by any branch of the "
            "Switch", addr)
