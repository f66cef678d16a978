"""The trace of an :class:`~gfcomb.combinators.unfold.Unfold`: its steps' kernel traces,
stacked, with the older steps of a particle batch in a shared history
(:mod:`gfcomb.combinators.unfold.history`)."""


from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch
from torch.utils import _pytree as pytree

from gfcomb.combinators.unfold.history import StepBlock, concat_steps, steps_differ
from gfcomb.core.address import normalize
from gfcomb.core.batching import cached_arange
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.deferred import Deferred
from gfcomb.core.diff import Diff, NoChange, VectorDiff
from gfcomb.core.errors import AddressError
from gfcomb.core.harmonize import harmonize
from gfcomb.core.pytree import (
    register_record,
    tree_concat,
    tree_index,
    tree_map_tensors,
    tree_stack,
    tree_tensors,
)
from gfcomb.core.trace import Trace

_NO_CHANGE = NoChange()



def state_at(states: Any, t: int) -> Any:
    """Step ``t``'s state out of the stacked states."""
    return tree_map_tensors(lambda x: x[t], states)


def no_states(init: Any, batch_ndim: int = 0) -> Any:
    """The stacked states of zero steps: shaped like ``init`` with a step axis of length 0
    (after ``batch_ndim`` batch axes)."""
    def empty(x: Any) -> torch.Tensor:
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(
            x, dtype=torch.get_default_dtype() if isinstance(x, float) else None)
        return x.unsqueeze(batch_ndim).narrow(batch_ndim, 0, 0)

    return pytree.tree_map(empty, init)


def state_tensors(init: Any) -> Any:
    """``init_state`` with Python numbers made tensors, so that every step's kernel trace
    has the same leaves (step 0 would otherwise keep a number where later steps hold the
    tensor state, and the steps could not be stacked)."""
    if init is None or isinstance(init, torch.Tensor):
        return init  # (no tree walk: torch's makes a reference cycle per call)

    def as_tensor(x: Any) -> Any:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return x
        return torch.as_tensor(x, dtype=torch.get_default_dtype() if isinstance(x, float)
                               else None)

    return pytree.tree_map(as_tensor, init)


def block_states(block: StepBlock) -> Any:
    """The states stored in a history block (what ``StepBlock.gather_leaf`` reads)."""
    return block.stored_state()


def retdiff_of(n_new: int, n_old: int, changed: list[int]) -> Diff:
    """An Unfold's retdiff: NoChange, or a VectorDiff naming the steps whose state changed."""
    if n_new == n_old and not changed:
        return _NO_CHANGE
    return VectorDiff(n_new, n_old, changed)


def zero_like(x: Any) -> torch.Tensor:
    """A scalar 0 with the dtype/device of ``x`` if it is a floating tensor."""
    for leaf in tree_tensors(x):
        if leaf.is_floating_point():
            return torch.zeros((), dtype=leaf.dtype, device=leaf.device)
    return torch.zeros((), dtype=torch.get_default_dtype())


def stack_steps(steps: Sequence[Trace], axis: int = 0, keys: Sequence[int] | None = None,
                ) -> Trace:
    """Stack step traces along a new step axis (``axis``: after any batch axes); ``keys``,
    the steps' numbers, name the step that differs in the :class:`StepStructureError` raised
    when the traces cannot share one record."""
    if len(steps) == 1:
        return tree_map_tensors(lambda x: x.unsqueeze(axis), steps[0])
    try:  # (one walk per step: the common case, every step of one structure)
        return tree_stack(steps, axis)
    except ValueError:  # a Switch on different branches: widened to one structure
        widened = harmonize(steps)
    try:
        return tree_stack(widened, axis)
    except ValueError:
        raise steps_differ(widened, keys) from None


@attrs.frozen(repr=False)
class UnfoldTrace(Trace):
    """The trace of an :class:`Unfold`: the kernel traces of its ``length`` steps.

    Steps ``0..h-1`` may sit in a shared :class:`~gfcomb.combinators.unfold.history.StepBlock`
    chain (``history``, with ``rows``: this particle's row in the newest block) and steps
    ``h..length-1`` in ``recent`` (one stacked kernel trace, step axis first).  Outside a
    particle batch ``history`` is None and ``recent`` holds every step.  ``inner`` (all steps
    stacked), ``retval`` (the stacked states) and ``choices`` gather the history when read.
    """

    gen_fn: Any
    args: tuple[Any, ...]
    score: torch.Tensor
    length: int
    recent: Trace | None
    rows: torch.Tensor | None = None
    history: StepBlock | None = None
    _layout: Any = attrs.field(default=None, eq=False, repr=False)
    _gathered: Any = attrs.field(default=None, eq=False, repr=False)  # cache of ``inner``
    _last_split: Any = attrs.field(default=None, eq=False, repr=False)  # (step, split(step))

    def _after_unflatten(self) -> None:
        object.__setattr__(self, "_gathered", None)
        object.__setattr__(self, "_last_split", None)

    @property
    def history_length(self) -> int:
        """How many of the steps sit in the shared history."""
        return 0 if self.history is None else self.history.stop

    @property
    def inner(self) -> Trace | None:
        """All steps' kernel traces, stacked (step axis after any batch axes); None if no
        steps.  Gathers the shared history: O(steps)."""
        if self.history is None:
            return self.recent
        if self._gathered is None:
            object.__setattr__(self, "_gathered", self.split(0)[2])
        return self._gathered

    def split(self, step: int) -> tuple[StepBlock | None, torch.Tensor | None,
                                         Trace | None, int]:
        """Split the steps at the last history-block boundary h <= ``step``: returns (the
        shared block chain holding steps < h, this particle's row in it, steps h..n-1
        gathered and stacked, h).  An update that leaves steps < ``step`` alone works on the
        gathered part only, in O(n - h)."""
        if self.history is None or self.history.stop <= step:
            return self.history, self.rows, self.recent, self.history_length
        cached = self._last_split  # (a move splits a trace, its accept step splits it again)
        if cached is not None and cached[0] == step:
            return cached[1]
        assert self.rows is not None
        parts, block, rows = self.history.gather(self.rows, step)
        if self.recent is not None:
            parts.append(self.recent)
        window = concat_steps(parts, self.rows.dim())
        out = block, rows, window, 0 if block is None else block.stop
        object.__setattr__(self, "_last_split", (step, out))
        return out

    @property
    def retval(self) -> Any:  # type: ignore[override]
        """The stacked states s_0..s_{n-1} (leading axis = step, after any batch axes).
        Read from a shared history, only the states are gathered (one index per step)."""
        if self.history is not None and self._gathered is None:
            assert self.rows is not None
            stored = self.history.gather_leaf(self.rows, block_states)
            if self.recent is None:
                return stored
            axis = self.score.dim()
            return tree_concat([stored, self.recent.retval], axis)
        inner = self.inner
        if inner is None:
            return no_states(self.args[1], self.score.dim())
        return inner.retval

    @property
    def choices(self) -> ChoiceMap:
        """Every step's choices, stacked.  Read from a shared history, only the stored
        choices are gathered (no kernel trace is rebuilt)."""
        batch_ndim = self.score.dim()
        if self.history is not None and self._gathered is None:
            assert self.rows is not None
            try:
                stored = self.history.gather_leaf(self.rows, lambda block: block.choices)
                if self.recent is not None:
                    stored = tree_concat([stored, self.recent.choices], batch_ndim)
            except (ValueError, RuntimeError):  # (steps of other structures: gather all)
                pass
            else:
                return ChoiceMap.from_stacked_block(stored, self.length, batch_ndim=batch_ndim)
        inner = self.inner
        if inner is None:
            return ChoiceMap.empty()
        return ChoiceMap.from_stacked_block(inner.choices, self.length,
                                            batch_ndim=inner.score.dim() - 1)

    @property
    def element_scores(self) -> torch.Tensor:
        """The kernel score of each step (step axis after any batch axes)."""
        inner = self.inner
        assert inner is not None
        return inner.score

    def last_state(self) -> Any:
        """The newest step's state (``init_state`` if there are no steps): O(1)."""
        if self.recent is not None:  # (the step axis comes after any batch axes)
            axis = self.score.dim()
            return tree_map_tensors(lambda x: x.select(axis, -1), self.recent.retval)
        if self.history is not None:
            assert self.rows is not None
            return self.history.last_state(self.rows)
        return self.args[1]

    def step_trace(self, t: int) -> Trace:
        """Step ``t``'s kernel trace (negative ``t`` counts from the end): read from the
        newest steps backwards, so the newest steps cost O(1) at any length."""
        if not -self.length <= t < self.length:
            raise AddressError(f"an Unfold of {self.length} steps has no step {{addr}}", (t,))
        t = t % self.length
        h = self.history_length
        if t >= h:
            assert self.recent is not None
            return tree_index(self.recent, t - h, dim=self.score.dim())
        assert self.history is not None and self.rows is not None
        return self.history.step_at(self.rows, t)

    def __getitem__(self, addr: Any) -> Any:
        path = normalize(addr)
        if path and path[0] == slice(None) and self.history is not None and \
                self.recent is None and self._gathered is None and len(path) > 1:
            assert self.rows is not None  # (one address of every step: only it is gathered)
            rest = path[1:]
            return self.history.gather_leaf(self.rows, lambda block: block.choices[rest])
        if path and type(path[0]) is int:  # one step: no gather of the others
            t = path[0]
            try:
                if self.history is not None and -self.length <= t < self.length and \
                        t % self.length < self.history_length:
                    assert self.rows is not None
                    return self.history.value_at(self.rows, t % self.length, path[1:])
                return self.step_trace(t)[path[1:]]
            except AddressError as err:
                raise err.prefixed(path[:1]) from None
        return self.choices[path]

    def discrete_addresses(self) -> Iterator[tuple[Any, ...]]:
        """The kernel's discrete addresses, under every step (read from the newest steps:
        the steps share one structure)."""
        newest = self.recent if self.recent is not None else (
            None if self.history is None else self.history.steps)
        if newest is not None:
            for pattern in newest.discrete_addresses():
                yield (slice(None),) + pattern

    def _retval_at(self, path: tuple[Any, ...]) -> Any:
        """``get_retval((t, ...))``: step ``t``'s state (or a call inside the step), read
        from that step alone."""
        t = path[0]
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.length:
            raise AddressError(f"no step at address {{addr}} (steps are keyed "
                               f"0..{self.length - 1})", path)
        step = self.step_trace(t)
        if len(path) == 1:
            return step.retval
        try:
            return step.get_retval(path[1:])
        except AddressError as err:
            raise err.prefixed((t,)) from None

    def __gf_persist__(self) -> UnfoldTrace:
        """An equal trace without a shared history (gf.save's record hook): every step's
        kernel trace gathered, so the saved trace is exact."""
        if self.history is None:
            return self
        return UnfoldTrace(self.gen_fn, self.args, self.score, self.length, self.inner)

    def caller_retval(self) -> Any:
        """The stacked states; for a batch, deferred (built on first use: they may have to
        be gathered through the shared history), with or without a history, so that a
        caller records one layout for every batch of this Unfold."""
        if self.history is None and self.score.dim() == 0:
            return self.retval
        return Deferred(lambda: self.retval)

    def compacted(self) -> UnfoldTrace:
        """Close ``recent`` into a new shared history block (a batch with one leading
        particle axis only; otherwise unchanged).  Copies no step data."""
        if self.recent is None or self.score.dim() != 1:
            return self
        n = self.score.shape[0]
        block = StepBlock(self.recent, self.rows, self.history, self.history_length,
                          self.length)
        rows = cached_arange(n, torch.long, self.score.device)
        return UnfoldTrace(self.gen_fn, self.args, self.score, self.length, None, rows, block)

    def with_layout_of(self, other: Trace) -> Trace:
        """This trace with its steps split where ``other``'s shared history ends (an update
        that revisited the newest steps of ``self`` made ``other``): the same shared block,
        the later steps gathered into ``recent``.  O(steps after the split)."""
        if not isinstance(other, UnfoldTrace) or other.length != self.length or \
                other.history is self.history:
            return self
        if other.history is None:
            inner = self.inner
            return UnfoldTrace(self.gen_fn, self.args, self.score, self.length, inner)
        block, rows, window, h = self.split(other.history_length)
        if block is not other.history:
            return self
        return UnfoldTrace(self.gen_fn, self.args, self.score, self.length, window, rows, block)


register_record(UnfoldTrace, dynamic=("args", "score", "recent", "rows"),
                static=("gen_fn", "length", "history"))


