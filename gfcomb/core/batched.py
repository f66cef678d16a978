"""Operations on *batched* traces (a leading particle or chain dimension on every leaf):
picking rows (resampling) and compacting step histories.

A batched trace is what ``torch.func.vmap`` returns when it runs a GFI method over particles.
Resampling picks rows of it: ``select_batch(traces, ancestors)``.  Done leafwise that would
copy every stored step of an ``Unfold`` trace, so records may take part through two hooks:

``_select_rows(self, pick)`` (optional): return the record's rows picked by ``pick`` (a
function applied to each per-row tensor), or None to let the leafwise walk do it; a record
whose leaves are mostly shared (an Unfold trace's history) picks only its per-row fields.

``_compact_history(self)``: return an equal record whose recently appended steps are moved
into shared, immutable history blocks (no tensor is copied).  Records nested in other records
(an Unfold trace inside a @gen trace, say) are found by walking the attrs fields.  The per-
particle row pointers are ordinary leaves, so picking rows is then a plain leafwise
``index_select`` along dimension 0.  Both functions are called *outside* vmap, by the
inference code, after each vmapped step.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from gfcomb.core.pytree import tree_map_tensors


def _walk(x: Any, hook: str) -> Any:
    """``x`` with ``hook()`` applied to every record in it that defines it (records, dicts,
    lists and tuples are searched; a container is rebuilt only if something in it changed)."""
    cls = type(x)
    if hasattr(cls, hook):
        return getattr(x, hook)()
    if isinstance(x, torch.Tensor):
        return x
    if attrs.has(cls):
        changes = {}
        for f in attrs.fields(cls):
            if f.name.startswith("_"):
                continue
            v = getattr(x, f.name)
            nv = _walk(v, hook)
            if nv is not v:
                changes[f.name] = nv
        if not changes:
            return x
        # caches (the pytree layout, derived choice maps) start afresh
        caches = {f.name.lstrip("_"): None for f in attrs.fields(cls)
                  if f.name.startswith("_") and f.init}
        return attrs.evolve(x, **changes, **caches)
    if isinstance(x, dict):
        new = {k: _walk(v, hook) for k, v in x.items()}
        return x if all(new[k] is v for k, v in x.items()) else new
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        items = [_walk(v, hook) for v in x]
        if all(a is b for a, b in zip(items, x)):
            return x
        return type(x)(items)
    return x


def compact_history(tree: Any) -> Any:
    """``tree`` with the recent steps of every batched Unfold trace in it moved into its
    shared history (an O(1) operation per trace: no step data is copied).

    Particle filters call this after every vmapped ``update`` so that the next resampling
    re-indexes row pointers rather than step data.  Values and scores are unchanged.
    """
    return _walk(tree, "_compact_history")


def select_batch(tree: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` of the batched ``tree`` (a long tensor of row numbers): what
    resampling does to a batch of particle traces.

    Math: the result's row i is ``tree``'s row ``index[i]`` (every tensor leaf indexed along
    dimension 0).  The recent steps of Unfold traces are first compacted into their shared
    history, whose blocks are not indexed: only the per-particle row pointers are, so the
    cost does not grow with the number of steps.
    """
    if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.dim() != 1:
        raise TypeError("select_batch: index must be a 1-d long tensor of row numbers, got "
                        f"{type(index).__name__} {getattr(index, 'dtype', '')}")
    n = index.shape[0]

    def rows(x: torch.Tensor) -> torch.Tensor:
        if x.dim() and x.stride(0) == 0 and x.shape[0] == n:
            return x  # expanded (unbatched args after vmap): every row is the same row
        try:
            return x.index_select(0, index)
        except RuntimeError:
            if x.device == index.device:
                raise
            return x.index_select(0, index.to(x.device))  # (a leaf on another device)

    select_rows = getattr(type(tree), "_select_rows", None)  # a record's own fast path
    if select_rows is not None:
        picked = select_rows(tree, rows)
        if picked is not None:
            return picked
    return tree_map_tensors(rows, compact_history(tree))
