"""The trace of a :class:`~gfcomb.combinators.switch.Switch`: the chosen branch's trace (one
branch ran) or every branch's trace merged by the index (every branch ran under vmap)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import torch

from gfcomb.combinators.switch.merge import only
from gfcomb.core import masked
from gfcomb.core.batching import inside_functorch_transform, is_batched
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError
from gfcomb.core.harmonize import harmonize_values, rebuild_record, stand_in
from gfcomb.core.pytree import register_record
from gfcomb.core.trace import Trace


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
    _flags: Any = attrs.field(default=None, eq=False, repr=False)  # (index == k, when made)

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
        alone = tuple(only(k, self.traces[k], len(self.traces)))
        return SwitchTrace(self.gen_fn, self.args, idx, alone, self.retval, self.score, False)

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
                flags = self._flags or [self.index == k for k in range(len(self.traces))]
                cached = masked.union([(t.choices, f) for t, f in zip(self.traces, flags)
                                 if t is not None], bdim=self.index.dim(), exhaustive=True)
            object.__setattr__(self, "_choices", cached)
        return cached

    def _after_unflatten(self) -> None:
        object.__setattr__(self, "_choices", None)
        object.__setattr__(self, "_flags", None)

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
        return [rebuild_record(x, {"traces": tuple(only(k, c, n))}) for x, c in zip(xs, col)]
    # widen: every branch that occurs, the absent ones filled from a template
    cols: dict[int, list[Any]] = {}
    for k in occurs:
        template = next(x.traces[k] for x in xs if x.traces[k] is not None)
        col = [x.traces[k] if x.traces[k] is not None else stand_in(template, x.score.shape)
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
