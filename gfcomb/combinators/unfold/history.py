"""The step history of batched Unfold traces: stored once, shared, never copied by resampling.

A particle filter extends every particle's Unfold trace by one step and then resamples: it
picks rows of the batched trace.  Stored as one stacked tensor per leaf, both operations
would copy the whole history (``torch.cat`` to append, ``index_select`` to resample), so a
step at T = 1,000 would cost 100 times one at T = 10.  Instead (DESIGN §4) the steps of a
batched trace live in a persistent chain of immutable :class:`StepBlock` s:

* a block holds the kernel traces of steps ``start..stop-1`` for R rows (leaves shaped
  ``[R, stop - start, ...]``) and, for every row, the row of its parent block that the same
  particle came from (``parent_rows``);
* a trace points at the newest block with one row number per particle (``rows``, a batched
  leaf); resampling re-indexes ``rows`` (N integers) and leaves the blocks alone;
* steps appended since the last compaction stay in the trace's ``recent`` leaves, and
  :func:`gfcomb.core.batched.compact_history` closes them into a new block (no copy: the
  block keeps the tensors).

The blocks are static pytree data, so ``torch.func.vmap`` passes them through untouched;
inside vmap a particle reads its past by indexing the (unbatched) block tensors with its
(batched) row number.  Reading the whole history (``trace.choices``, the stacked states,
an update that revisits old steps) gathers it: O(steps), only when asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

import torch
from torch.utils import _pytree as pytree

from gfcomb.core.batching import inside_functorch_transform
from gfcomb.core.errors import StepStructureError
from gfcomb.core.flat import flatten, unflatten
from gfcomb.core.harmonize import harmonize
from gfcomb.core.pytree import reconcile, same_structure, tree_concat, tree_map_tensors


class Rebuild(Protocol):
    """How a stored block's kernel trace is made again from its choices (see
    :meth:`StepBlock.stored`): for all its rows, or for some (from their choices and their
    rows in the parent block)."""

    def __call__(self, block: StepBlock) -> Any: ...

    def at_rows(self, block: StepBlock, choices: Any, parent_rows: torch.Tensor) -> Any: ...


class StepBlock:
    """Immutable stored steps ``start..stop-1`` of a batch of Unfold traces.

    ``steps``: the stacked kernel traces, leaves shaped ``[R, stop - start, ...]``, or, for a
    block of one step (``single=True``), that step's kernel trace with leaves ``[R, ...]``;
    ``parent_rows``: a long tensor ``[R]`` giving each row's row in ``parent`` (None for the
    first block).  A single-step block made by :meth:`stored` keeps only what the step's
    trace cannot be rebuilt without -- its choices and its state -- and rebuilds the kernel
    trace (scores, arguments) from them when it is read, by a fully constrained ``generate``
    (``rebuild``).  Compared by identity (it sits in pytree contexts).
    """

    __slots__ = ("_steps", "_choices", "_choice_spec", "_rebuild", "parent_rows", "parent",
                 "start", "stop", "single", "_state", "_gathered", "structure")

    def __init__(self, steps: Any, parent_rows: torch.Tensor | None,
                 parent: StepBlock | None, start: int, stop: int, single: bool = False,
                 state: Any = None) -> None:
        if single and stop - start != 1:
            raise ValueError(f"a single-step block holds one step, not {start}..{stop - 1}")
        self._steps = steps
        self._choices: tuple[torch.Tensor, ...] | None = None  # (stored: the choice leaves)
        self._choice_spec: Any = None
        self._rebuild: Rebuild | None = None
        self.parent_rows = parent_rows
        self.parent = parent
        self.start = start
        self.stop = stop
        self.single = single
        self._state = state  # the newest step's state, when given (else read from steps)
        self._gathered: Any = None  # (rows, after, parts, block, rows there): the last gather
        self.structure: Any = None  # (its newest step's choice spec: see check_next)

    @classmethod
    def stored(cls, choices: Any, state: Any, rebuild: Rebuild,
               parent_rows: torch.Tensor | None, parent: StepBlock | None,
               t: int, steps: Any = None) -> StepBlock:
        """A single-step block holding step ``t``'s ``choices`` (a choice map, leaves [R,
        ...]) and ``state`` only; ``rebuild(block)`` makes the step's kernel trace from them.

        Few Python objects per step (a long filter keeps every block, and each object kept
        brings Python's garbage collector round sooner): the choice map is kept as its
        tensor leaves and a spec (the parent's when equal), and ``rebuild`` is the parent's
        when it compares equal.  ``steps``, the step's kernel trace when at hand, is kept
        while the block is the newest (what a rejuvenation move reads), and let go when a
        block is stored after it: the history keeps one kernel trace, not one per step."""
        leaves: list[torch.Tensor] = []
        spec = flatten(choices, leaves)
        structure = cls.check_next(parent, steps, spec, t)
        block = cls(steps, parent_rows, parent, t, t + 1, single=True, state=state)
        block.structure = structure
        if parent is not None:
            parent._gathered = None  # (the caches of the newest block only: let go)
            if parent._rebuild is not None:
                parent._steps = None  # (rebuilt from the choices if read again)
        if parent is not None and parent._choices is not None:
            if parent._choice_spec == spec:
                spec = parent._choice_spec
            if parent._rebuild == rebuild:
                rebuild = parent._rebuild
        block._choices = tuple(leaves)
        block._choice_spec = spec
        block._rebuild = rebuild
        return block

    @staticmethod
    def check_next(parent: StepBlock | None, step: Any, structure: Any, t: int) -> Any:
        """Raise :class:`StepStructureError` unless step ``t``'s kernel trace ``step`` can be
        stored after ``parent``'s newest step: the same structure, up to the widening
        :func:`harmonize` does (a Switch on another branch, a Mask with another concrete
        flag), as every read of the history concatenates them.  ``structure`` is the step's
        choice spec: a step whose choices have the parent's spec is taken as it is (the
        common case, no walk of the traces).  Returns the spec to keep for the new block
        (the parent's when equal: one object for a whole filter)."""
        if parent is None:
            return structure
        if structure is parent.structure or structure == parent.structure:
            return parent.structure
        if step is not None:
            last = parent.read_steps()
            if not parent.single:
                last = tree_map_tensors(lambda x: x[:, -1], last)
            pair = harmonize([last, step])
            if not same_structure(pytree.tree_structure(pair[0]),
                                  pytree.tree_structure(pair[1])):
                raise steps_differ(pair, [parent.stop - 1, t])
        return structure

    @property
    def steps(self) -> Any:
        """The stored kernel traces (rebuilt from the choices and kept, for a block made by
        :meth:`stored`)."""
        if self._steps is None:
            assert self._rebuild is not None
            self._steps = self._rebuild(self)
        return self._steps

    def read_steps(self) -> Any:
        """The kernel traces, rebuilt if need be but not kept (a read of the whole history
        keeps the history as small as it was)."""
        if self._steps is not None:
            return self._steps
        assert self._rebuild is not None
        return self._rebuild(self)

    def read_steps_at(self, rows: torch.Tensor) -> Any:
        """The kernel trace of rows ``rows`` (a 1-d long tensor) of this block, leaves
        ``[len(rows), ...]``; a stored block rebuilds only those rows (its choices and the
        parent's states gathered first), not all of them."""
        if self._steps is not None or self.parent is None:
            return tree_map_tensors(partial(_rows, r=rows), self.read_steps())
        assert self._rebuild is not None and self.parent_rows is not None
        assert self._choices is not None
        choices = unflatten(self._choice_spec, iter([_rows(x, rows) for x in self._choices]))
        return self._rebuild.at_rows(self, choices, self.parent_rows[rows])

    @property
    def choices(self) -> Any:
        """The stored steps' choices (leaves [R, ...], or [R, steps, ...])."""
        if self._choices is not None:
            return unflatten(self._choice_spec, iter(self._choices))
        return self._steps.choices

    def __repr__(self) -> str:
        return f"<StepBlock steps {self.start}..{self.stop - 1}>"

    def gather(self, rows: torch.Tensor, after: int = 0,
               ) -> tuple[list[Any], StepBlock | None, torch.Tensor | None]:
        """The stored steps ``>= h`` of the particles at ``rows`` (row numbers into this block,
        any shape B; a batched 0-d tensor under vmap), where h is the last block boundary
        ``<= after``: one stacked kernel trace per block, oldest first, leaves shaped
        ``[*B, steps, ...]``.  Also returns the block holding the steps before h and the
        particles' rows in it (None, None when h = 0): the history that stays shared.

        The last gather of a block outside vmap is remembered (an MCMC move on the newest
        steps reads them, and its accept step reads the same rows again)."""
        cached = self._gathered
        if cached is not None and cached[0] is rows and cached[1] == after:
            return list(cached[2]), cached[3], cached[4]
        parts = []
        block: StepBlock | None = self
        r: torch.Tensor | None = rows

        def take(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return _rows(x, r)

        def take_single(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return _rows(x, r).unsqueeze(r.dim())  # (the step axis, after the batch axes)

        while block is not None and block.stop > after:
            assert r is not None
            if block.single and block._steps is None and r.dim() == 1 \
                    and not inside_functorch_transform():
                parts.append(tree_map_tensors(partial(torch.unsqueeze, dim=1),
                                              block.read_steps_at(r)))
            else:
                pick = take_single if block.single else take
                stored = block.steps if after else block.read_steps()
                parts.append(tree_map_tensors(partial(pick, r=r), stored))
            if block.parent is not None:
                assert block.parent_rows is not None
                r = block.parent_rows[r]
            else:
                r = None
            block = block.parent
        parts.reverse()
        if not inside_functorch_transform():
            self._gathered = (rows, after, parts, block, r)
        return list(parts), block, r

    def gather_leaf(self, rows: torch.Tensor, read: Any) -> Any:
        """One value of every stored step of the particles at ``rows``, stacked along the
        step axis (after the batch axes): ``read(block)`` picks it from a block (leaves
        [R, ...] in a single-step block, [R, steps, ...] in others: its stored state, a
        choice).  Only that value is gathered: a block costs one index per tensor of it."""
        parts = []
        block: StepBlock | None = self
        r: torch.Tensor | None = rows
        axis = rows.dim()
        while block is not None:
            assert r is not None
            value = read(block)
            if block.single:
                parts.append(tree_map_tensors(partial(_row_step, r=r, axis=axis), value))
            else:
                parts.append(tree_map_tensors(partial(_rows, r=r), value))
            r = None if block.parent_rows is None else block.parent_rows[r]
            block = block.parent
        parts.reverse()
        if len(parts) == 1:
            return parts[0]
        return tree_concat(parts, axis)

    def locate(self, rows: torch.Tensor, t: int) -> tuple[StepBlock, torch.Tensor]:
        """The block holding stored step ``t`` and the particles' rows in it, walking back
        from this block: O(blocks after step t)."""
        block: StepBlock | None = self
        r: torch.Tensor | None = rows
        while block is not None and block.start > t:
            assert block.parent_rows is not None and r is not None
            r = block.parent_rows[r]
            block = block.parent
        if block is None or not block.start <= t < block.stop or r is None:
            raise IndexError(f"step {t} is not stored in this history")
        return block, r

    def step_at(self, rows: torch.Tensor, t: int) -> Any:
        """The kernel trace of stored step ``t`` of the particles at ``rows`` (leaves
        ``[*B, ...]``)."""
        block, r = self.locate(rows, t)
        return tree_map_tensors(partial(block.pick, r=r, t=t), block.steps)

    def value_at(self, rows: torch.Tensor, t: int, path: tuple[Any, ...]) -> Any:
        """The choice at ``path`` of stored step ``t`` of the particles at ``rows``: one
        gather (only that choice is read)."""
        block, r = self.locate(rows, t)
        return block.pick(block.choices[path], r, t)

    def pick(self, x: torch.Tensor, r: torch.Tensor, t: int) -> torch.Tensor:
        """Step ``t`` of the rows ``r`` of one of this block's leaves."""
        x = _rows(x, r)
        return x if self.single else x.select(r.dim(), t - self.start)

    def stored_state(self) -> Any:
        """The states of this block's steps (leaves [R, ...] for a single step, else
        [R, steps, ...])."""
        if self.single and self._state is not None:
            return self._state
        return self.steps.retval

    def last_state(self, rows: torch.Tensor) -> Any:
        """The state (kernel return value) of the newest stored step of the particles at
        ``rows`` (leaves ``[*B, ...]``): one gather per state leaf."""
        if self._state is None and not self.single:
            return tree_map_tensors(lambda x: x[rows, -1], self.steps.retval)
        state = self.steps.retval if self._state is None else self._state
        if isinstance(state, torch.Tensor):  # (the common state: no tree walk)
            return _rows(state, rows)
        return tree_map_tensors(partial(_rows, r=rows), state)


def _row_step(x: torch.Tensor, r: torch.Tensor, axis: int) -> torch.Tensor:
    """Rows ``r`` of a single-step leaf, with the step axis added at ``axis``."""
    return _rows(x, r).unsqueeze(axis)


def _rows(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x[r]``: rows ``r`` of ``x`` (``index_select`` for a plain 1-d ``r``: a third of the
    cost of advanced indexing; a leaf that is one row expanded to all, a shared observation,
    is expanded again rather than copied)."""
    if x.dim() and x.stride(0) == 0:
        return x[0].expand(r.shape + x.shape[1:])
    return x.index_select(0, r) if r.dim() == 1 else x[r]


def concat_steps(parts: Sequence[Any], dim: int, starts: Sequence[int] | None = None) -> Any:
    """Stacked step traces concatenated leafwise along the step axis ``dim`` (static parts
    from the first; bookkeeping on which they disagree becomes unknown).  ``starts``, the
    parts' first step numbers, name the step in the :class:`StepStructureError` raised when
    a part's structure differs from the first's."""
    if len(parts) == 1:
        return parts[0]
    parts = harmonize(list(parts))
    leaves0, spec = pytree.tree_flatten(parts[0])
    rest = [pytree.tree_flatten(p) for p in parts[1:]]
    for i, (_, other) in enumerate(rest, 1):
        if not same_structure(spec, other):  # (leaf by leaf they would not line up)
            raise steps_differ([parts[0], parts[i]],
                               None if starts is None else [starts[0], starts[i]])
    out = []
    for j, leaf in enumerate(leaves0):
        if isinstance(leaf, torch.Tensor):
            out.append(torch.cat([leaf] + [ls[j].to(leaf.dtype) for ls, _ in rest], dim))
        else:
            out.append(leaf)
    return pytree.tree_unflatten(out, reconcile(spec, [s for _, s in rest]))


def steps_differ(steps: Sequence[Any], keys: Sequence[int] | None = None) -> StepStructureError:
    """The error for step traces ``steps`` (the first step numbers of each, ``keys``) that
    do not share one structure, at the first step whose structure differs from the first's
    (at the Unfold's own address when the numbers are not known)."""
    first = pytree.tree_structure(steps[0])
    i = next((i for i, s in enumerate(steps[1:], 1)
              if not same_structure(first, pytree.tree_structure(s))), len(steps) - 1)
    what = ("the kernel's trace at step {addr} has a different structure from step "
            f"{keys[0]}'s" if keys is not None else
            "the kernel's traces of two steps of the Unfold at {addr} differ in structure")
    return StepStructureError(
        what + " (other addresses or other static values); an Unfold stores its steps "
        "stacked, one tensor per address, so every step must make the same choices (branch "
        "on the step with gf.Switch or gf.Mask, not a Python `if`)",
        () if keys is None else (keys[i],))
