"""The batch edit engine of :class:`~gfcomb.combinators.unfold.Unfold`: ``batch_update`` and
``batch_regenerate`` of a whole batch of Unfold traces whose shared history
(:mod:`gfcomb.combinators.unfold.history`) is edited in place of per-row gathers.

An edit that leaves ``init_state``, the parameters and the steps before the first touched
one alone revisits only the steps from there on -- each step one batch call of the kernel for
every row -- and appends new steps as history blocks: a particle-filter step or an MCMC move
on the newest steps costs the same at any length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from gfcomb.combinators.unfold.history import StepBlock, concat_steps
from gfcomb.combinators.unfold.trace import (
    UnfoldTrace,
    retdiff_of,
    stack_steps,
    state_tensors,
)
from gfcomb.combinators.vector import has_masks
from gfcomb.core.batched import batch_size
from gfcomb.core.batching import cached_arange
from gfcomb.core.deferred import resolve
from gfcomb.core.diff import Diff, NoChange, all_unchanged
from gfcomb.core.errors import AddressError
from gfcomb.core.flat import flatten
from gfcomb.core.gfi import check_argdiffs, check_args_tuple, rows_submap, weight_like
from gfcomb.core.harmonize import harmonize
from gfcomb.core.pytree import tree_index, tree_map_tensors, tree_scatter
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import PerRow, held_rows, unwrap_rows

if TYPE_CHECKING:
    from gfcomb.combinators.unfold.combinator import Unfold

_NO_CHANGE = NoChange()
# (new step trace, weight, retdiff) for one revisited step
StepResult = tuple[Trace, torch.Tensor, Diff]


def batch_plan(unfold: Unfold, traces: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                touched_below: Callable[[int], Sequence[int]]) -> list[int] | None:
    """The touched stored steps of a batch edit done on the whole batch (sorted), or None
    when the edit must run per row: not a one-axis batch of this Unfold's traces, fewer
    steps, or ``init_state``/a parameter changed (every step is revisited then)."""
    if (not isinstance(traces, UnfoldTrace) or traces.score.dim() != 1
            or not (traces.gen_fn is unfold or traces.gen_fn == unfold)):
        return None
    args = check_args_tuple(args)
    argdiffs = check_argdiffs(args, argdiffs, 'Unfold')
    n_new = unfold.unpack((args[0], None))[0]
    if n_new < traces.length or not all_unchanged(argdiffs[1:]):
        return None
    return [t for t in touched_below(n_new) if t < traces.length]

def batch_edit(unfold: Unfold, traces: UnfoldTrace, args: tuple[Any, ...], touched: list[int],
                step: Callable[[int, Trace, tuple[Any, ...], tuple[Diff, ...]], StepResult],
                constraints: Any) -> tuple[UnfoldTrace, torch.Tensor, Diff]:
    """The batch edit engine shared by batch_update and batch_regenerate: revisit the
    stored steps from ``touched[0]`` on with ``step`` (one batch call each, a step whose
    incoming state changed revisited too), then append the new steps (generated against
    ``constraints``).  Appending only: the new steps become history blocks; otherwise
    the steps after the last history boundary before ``touched[0]`` are the new
    ``recent`` (the layout a per-row update gives, so that an MCMC accept step can merge
    the old and the new trace row by row).  Returns (traces, weights, retdiff)."""
    params = tuple(args[2:])
    if not touched or traces.history is not None:
        # (a batch without a shared history -- all its steps stacked, as under a Map -- is
        # edited where it lies: closing it into a block would gather it back per row)
        traces = compacted(unfold, traces, params)
    rows = batch_size(traces)
    n_old, n_new = traces.length, args[0]
    weight: Any = None  # (None: nothing added yet; a 0.0 start would cost an op per step)
    score = traces.score
    changed: list[int] = []
    stored: Trace | None = None  # the stored steps first..n_old-1, stacked (axis 1)
    head: Trace | None = None  # stored steps h..first-1: not revisited, kept stacked
    if not touched:  # appending only
        block, prows, first = traces.history, traces.rows, n_old
        h = first
    else:
        first = touched[0]
        parts, block, prows, h = stored_window(traces, first)
        (stored,) = parts
        if first > h:
            head = tree_index(stored, slice(0, first - h), dim=1)
            stored = tree_index(stored, slice(first - h, None), dim=1)
    # the revisited steps first..n_old-1: one batch call each, the others left where they
    # are in ``stored``; a step whose incoming state is unchanged is called with the state
    # its stored trace holds (the same tensors, which a merge of the old and the new trace
    # then need not pick between)
    state: Any = None if stored is not None else state_before(args[1], block, prows)
    revisited: dict[int, Trace] = {}
    if stored is not None:
        state_diff: Diff = _NO_CHANGE
        todo = set(touched)
        for t in range(first, n_old):
            if not (t in todo or not isinstance(state_diff, NoChange)):
                state = None  # (the stored state: read only if the next step is revisited)
                continue
            old = tree_index(stored, t - first, dim=1)
            if state is None:
                state = _stored_state(unfold, old, t, first, stored, head,
                                      lambda: state_before(args[1], block, prows))
            try:
                new, w, rd = step(t, old, (t, state) + params,
                                  (_NO_CHANGE, state_diff) + (_NO_CHANGE,) * len(params))
            except AddressError as err:
                raise err.prefixed((t,)) from None
            weight = w if weight is None else weight + w
            score = score + (new.score - old.score)
            revisited[t] = new
            if not isinstance(rd, NoChange):
                changed.append(t)
            state_diff = rd
            state = PerRow(resolve(new.retval))
        if state is None:
            state = PerRow(_step_of(resolve(stored.retval), -1))
        stored = _with_steps(stored, first, revisited)
    window: list[Trace] = []
    # the appended steps
    kernel = unfold.kernel
    for t in range(n_old, n_new):
        try:
            new, w = kernel.batch_generate(rows, (t, state) + params,
                                           rows_submap(constraints, t))
        except AddressError as err:
            raise err.prefixed((t,)) from None
        weight = w if weight is None else weight + w
        score = score + new.score
        last = resolve(new.retval)
        if touched:
            window.append(new)
        else:
            block = closed_step(unfold, new, last, rows, params,
                                args[1] if block is None else None, prows, block, t)
            prows = cached_arange(rows, torch.long, score.device)
        state = PerRow(last)
    stored_args = tuple(held_rows(a, rows) for a in args)
    segments = [(part, start) for part, start in ((head, h), (stored, first))
                if part is not None]
    if window:
        segments.append((stack_steps(window, 1, range(n_old, n_new)), n_old))
    recent = concat_steps([s for s, _ in segments], 1, [start for _, start in segments]) \
        if segments else None
    new_traces = UnfoldTrace(unfold, stored_args, score, n_new, recent, prows, block)
    weight = weight_like(0.0 if weight is None else weight, score)
    return new_traces, weight, retdiff_of(n_new, n_old, changed)

def compacted(unfold: Unfold, traces: UnfoldTrace, params: tuple[Any, ...]) -> UnfoldTrace:
    """``traces`` with its ``recent`` steps closed into the shared history
    (:meth:`UnfoldTrace.compacted`), one recent step after a history block (what an MCMC
    move on the newest step leaves) as a stored block -- its choices and state, like an
    appended step -- rather than its whole kernel trace."""
    recent, block = traces.recent, traces.history
    if (recent is None or block is None or traces.rows is None or traces.score.dim() != 1
            or traces.length - traces.history_length != 1):
        return traces.compacted()
    step = tree_index(recent, 0, dim=1)
    n = batch_size(traces)
    closed = closed_step(unfold, step, resolve(step.retval), n, params, None, traces.rows,
                         block, traces.history_length)
    rows = cached_arange(n, torch.long, traces.score.device)
    return UnfoldTrace(unfold, traces.args, traces.score, traces.length, None, rows, closed)


def closed_step(unfold: Unfold, step: Trace, state: Any, rows: int, params: tuple[Any, ...],
                init: Any, parent_rows: torch.Tensor | None, parent: StepBlock | None,
                t: int) -> StepBlock:
    """The history block of step ``t`` (kernel trace ``step`` of ``rows`` rows, ``state`` its
    return value) after ``parent``: stored as its choices and state (rebuilt when read, from
    the parent's states or ``init``), or kept whole when its choices have presence masks
    (absent values would be drawn afresh by a rebuild)."""
    choices = step.choices
    if has_masks(choices):
        structure = StepBlock.check_next(parent, step, flatten(choices, []), t)
        block = StepBlock(step, parent_rows, parent, t, t + 1, single=True, state=state)
        block.structure = structure
        return block
    rebuild = StepRebuild(unfold.kernel, rows, params, init)
    return StepBlock.stored(choices, state, rebuild, parent_rows, parent, t, step)


def _stored_state(unfold: Unfold, old: Trace, t: int, first: int, stored: Trace,
                  head: Trace | None, before_window: Callable[[], Any]) -> Any:
    """The state going into stored step ``t`` (``old``, its trace; ``stored``, the stacked
    steps first..; ``head``, the steps before ``first`` still stacked; ``before_window()``,
    the state before them).  A step trace of the kernel itself holds it as its argument 1
    (the same tensors, which a merge of the old and new trace then need not pick between);
    one made by another function (a Scan's step is its user kernel's trace) is given the
    previous step's return value."""
    if old.gen_fn is unfold.kernel:
        return PerRow(old.args[1])
    if t > first:
        return PerRow(_step_of(resolve(stored.retval), t - first - 1))
    if head is not None:
        return PerRow(_step_of(resolve(head.retval), -1))
    return before_window()


def _step_of(states: Any, j: int) -> Any:
    """Step ``j``'s states out of stacked states (leaves [rows, steps, ...])."""
    return tree_map_tensors(lambda x: x[:, j], states)


def _with_steps(stored: Trace, first: int, revisited: dict[int, Trace]) -> Trace:
    """The stacked steps ``stored`` (steps first.., axis 1) with the revisited ones put in."""
    if not revisited:
        return stored
    keys = sorted(revisited)
    new = stack_steps([revisited[t] for t in keys], 1, keys)
    if len(keys) == stored.score.shape[1]:
        return new  # every step revisited
    idx = torch.tensor([t - first for t in keys], dtype=torch.long, device=stored.score.device)
    stored, new = harmonize([stored, new])
    return tree_scatter(stored, idx, new, dim=1)


class StepRebuild:
    """How a stored step's kernel trace is made again (:meth:`StepBlock.stored`): from the
    block's choices and the state before it (the parent block's, or ``init``, for the first
    step), by a fully constrained batch generate, which draws nothing (the same trace:
    scores, arguments and return value).  Only choice maps without presence masks are stored
    this way.  Equal (the same kernel, row count, parameters and initial state) for the steps
    of one filter, which then share one."""

    __slots__ = ("kernel", "rows", "params", "init")

    def __init__(self, kernel: Any, rows: int, params: tuple[Any, ...], init: Any) -> None:
        self.kernel = kernel
        self.rows = rows
        self.params = params
        self.init = init

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, StepRebuild) and other.kernel is self.kernel
                and other.rows == self.rows and other.init is self.init
                and len(other.params) == len(self.params)
                and all(a is b for a, b in zip(other.params, self.params)))

    __hash__ = None  # type: ignore[assignment]

    def __call__(self, block: StepBlock) -> Trace:
        state = state_before(self.init, block.parent, block.parent_rows)
        step, _ = self.kernel.batch_generate(self.rows, (block.start, state) + self.params,
                                             PerRow(block.choices))
        return step

    def at_rows(self, block: StepBlock, choices: Any, parent_rows: torch.Tensor) -> Trace:
        """The step trace of some rows of ``block`` (which has a parent) from their
        ``choices`` and their rows in the parent block."""
        assert block.parent is not None
        state = state_before(None, block.parent, parent_rows)
        step, _ = self.kernel.batch_generate(parent_rows.shape[0],
                                             (block.start, state) + self.params,
                                             PerRow(choices))
        return step


def stored_window(traces: UnfoldTrace, first: int,
                   ) -> tuple[list[Trace], StepBlock | None, torch.Tensor | None, int]:
    """The stored steps from the last history boundary h <= ``first`` on (one stacked
    kernel trace, leaves [rows, steps, ...]), the block before h, the rows in it, and
    h."""
    block, prows, window, h = traces.split(first)
    assert window is not None
    return [window], block, prows, h

def state_before(init: Any, block: StepBlock | None, prows: torch.Tensor | None) -> Any:
    """The state going into the step after ``block`` for every row: ``init_state`` when
    there is no block before it, else the newest state stored in ``block`` (a PerRow)."""
    if block is None:
        v, per_row = unwrap_rows(init)
        return init if per_row else state_tensors(v)
    assert prows is not None
    return PerRow(block.last_state(prows))
