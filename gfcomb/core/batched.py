"""Batches of traces: one record with a leading row axis on every tensor leaf.

A batch is what the batch methods of :class:`~gfcomb.core.gfi.GenerativeFunction` return
(and what ``torch.func.vmap`` returns when it runs a GFI method over particles or chains).
This module answers the questions every batch method asks -- how many rows, which rows --
for any record.
"""

from __future__ import annotations

from typing import Any

import torch

from gfcomb.core.errors import ArgumentError
from gfcomb.core.pytree import tree_map_tensors


def batch_size(traces: Any) -> int:
    """The number of rows of the batch ``traces`` (the leading axis of its score)."""
    score = getattr(traces, "score", None)
    if not isinstance(score, torch.Tensor) or score.dim() == 0:
        raise ArgumentError(f"expected a batch of traces (a leading row axis on the score), "
                            f"got {type(traces).__name__} with score "
                            f"{getattr(score, 'shape', score)!r}")
    return int(score.shape[0])


def check_rows(index: Any) -> torch.Tensor:
    """``index`` if it is a 1-d long tensor of row numbers (ArgumentError otherwise)."""
    if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.dim() != 1:
        raise ArgumentError("rows must be a 1-d long tensor of row numbers, got "
                            f"{type(index).__name__} {getattr(index, 'dtype', '')}")
    return index


def select_leaves(tree: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` of every tensor leaf of the batched ``tree``.

    Leaves that are one row expanded to all (stride 0 along the rows: shared arguments,
    shared observations) are kept as they are; static parts (shared step histories) are
    never indexed.
    """
    index = check_rows(index)
    n = index.shape[0]

    def rows(x: torch.Tensor) -> torch.Tensor:
        if x.dim() and x.stride(0) == 0 and x.shape[0] == n:
            return x  # every row is the same row
        if x.device != index.device:
            return x.index_select(0, index.to(x.device))
        return x.index_select(0, index)

    return tree_map_tensors(rows, tree)


def select_batch(tree: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` of the batch ``tree`` (a batch of traces, or any pytree of batched
    tensors): what resampling does to a batch of particle traces.

    Math: the result's row k is ``tree``'s row ``index[k]``.  A batch of traces is selected
    by its generative function's :meth:`~gfcomb.core.gfi.GenerativeFunction.batch_select`,
    so that a shared step history is re-pointed rather than copied.
    """
    gen_fn = getattr(tree, "gen_fn", None)
    if gen_fn is not None and hasattr(gen_fn, "batch_select"):
        return gen_fn.batch_select(tree, check_rows(index))
    return select_leaves(tree, index)


def compact_history(tree: Any) -> Any:
    """``tree`` with its storage compacted for a batch (:meth:`Trace.compacted`): the recent
    steps of every batched Unfold trace closed into its shared history (no data copied), so
    that resampling re-indexes row pointers rather than step data.  Values and scores are
    unchanged; a non-trace is returned as it is."""
    compacted = getattr(tree, "compacted", None)
    return compacted() if compacted is not None else tree
