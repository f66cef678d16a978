"""Operations on *batched* traces (a leading particle or chain dimension on every leaf):
picking rows (resampling) and compacting step histories.

A batched trace is what ``torch.func.vmap`` returns when it runs a GFI method over particles.
Resampling picks rows of it: ``select_batch(traces, ancestors)``.  Done leafwise that would
copy every stored step of an ``Unfold`` trace, so records may take part through two hooks:

* ``_compact_history(self)`` -- return an equal record whose recently appended steps are
  moved into shared, immutable history blocks (no tensor is copied);
* ``_select_batch(self, index)`` -- return the record with batch rows ``index``.

Records without hooks are handled leafwise (``index_select`` along dimension 0).  Both
functions are called *outside* vmap, by the inference code, after each vmapped step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


def _has_hook(name: str) -> Any:
    return lambda x: hasattr(type(x), name)


def compact_history(tree: Any) -> Any:
    """``tree`` with the recent steps of every batched Unfold trace in it moved into its
    shared history (an O(1) operation per trace: no step data is copied).

    Particle filters call this after every vmapped ``update`` so that the next resampling
    re-indexes row pointers rather than step data.  Values and scores are unchanged.
    """
    def visit(x: Any) -> Any:
        return x._compact_history() if hasattr(type(x), "_compact_history") else x

    return pytree.tree_map(visit, tree, is_leaf=_has_hook("_compact_history"))


def select_batch(tree: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` of the batched ``tree`` (a long tensor of row numbers): what
    resampling does to a batch of particle traces.

    Math: the result's row i is ``tree``'s row ``index[i]`` (every tensor leaf indexed along
    dimension 0).  Unfold traces re-index their per-particle history pointers instead of
    copying the stored steps, so the cost does not grow with the number of steps.
    """
    if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.dim() != 1:
        raise TypeError("select_batch: index must be a 1-d long tensor of row numbers, got "
                        f"{type(index).__name__} {getattr(index, 'dtype', '')}")

    def visit(x: Any) -> Any:
        if hasattr(type(x), "_select_batch"):
            return x._select_batch(index)
        if isinstance(x, torch.Tensor):
            return x.index_select(0, index.to(x.device))
        return x

    return pytree.tree_map(visit, tree, is_leaf=_has_hook("_select_batch"))
