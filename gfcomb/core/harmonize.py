"""Traces of one common structure, so that they can be stacked or concatenated.

The steps of an ``Unfold`` whose kernel calls a ``Switch`` may sit on different branches: their
traces differ in structure and cannot be stacked leafwise.  :func:`harmonize` rewrites them
into equivalent traces of one structure.  It walks tuples, lists, dicts and registered records
position by position; a record class that can widen a group of its traces to one structure
says how with a static method ``harmonize_group(xs) -> list | None`` (SwitchTrace: to the
every-branch form Switch uses under vmap; MaskTrace: to the batched form, for a Mask whose
concrete flag differs between the traces).  :func:`stand_in` fills the part a widened trace
lacks (a branch not taken, a function that did not run) from another trace of the group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from gfcomb.core.pytree import RECORD_FIELDS, same_structure, tree_map_tensors


def harmonize(traces: Sequence[Any]) -> list[Any]:
    """Equivalent traces of one common structure (``traces``: traces or pytrees of traces of
    equal structure except at positions whose records can be widened, e.g. Switch traces on
    different branches, anywhere inside).  The widened traces answer every GFI method as
    the originals.  Traces that already share a structure are returned as they are."""
    traces = list(traces)
    if len(traces) < 2:
        return traces
    specs = [pytree.tree_structure(t) for t in traces]
    if all(same_structure(specs[0], s) for s in specs[1:]):
        return traces
    out = harmonize_values(traces)
    return traces if out is None else out


def harmonize_values(xs: list[Any]) -> list[Any] | None:
    """:func:`harmonize` at one position (``xs``: the values there); None if unchanged."""
    first = xs[0]
    t = type(first)
    if any(type(x) is not t for x in xs):
        return None  # not reconcilable here: the caller's structure check will say so
    group = getattr(t, "harmonize_group", None)
    if group is not None:
        return group(xs)
    if t is tuple or t is list:
        if any(len(x) != len(first) for x in xs):
            return None
        cols = [harmonize_values(list(c)) for c in zip(*xs)]
        if all(c is None for c in cols):
            return None
        full = [c if c is not None else [x[j] for x in xs] for j, c in enumerate(cols)]
        return [t(row) for row in zip(*full)]
    if t is dict:
        keys = list(first)
        if any(list(x) != keys for x in xs):
            return None
        cols = [harmonize_values([x[k] for x in xs]) for k in keys]
        if all(c is None for c in cols):
            return None
        return [{k: (x[k] if c is None else c[i]) for k, c in zip(keys, cols)}
                for i, x in enumerate(xs)]
    fields = RECORD_FIELDS.get(t)
    if fields is None:
        return None
    changed = {}
    for f in fields[0]:
        col = harmonize_values([getattr(x, f) for x in xs])
        if col is not None:
            changed[f] = col
    if not changed:
        return None
    return [rebuild_record(x, {f: col[i] for f, col in changed.items()})
            for i, x in enumerate(xs)]


def rebuild_record(rec: Any, changes: dict[str, Any]) -> Any:
    """A copy of the registered record ``rec`` with some dynamic fields replaced (caches
    reset, as pytree unflatten does)."""
    cls: Any = type(rec)
    dynamic, static = RECORD_FIELDS[cls][:2]
    new = cls.__new__(cls)
    for f in dynamic + static:
        object.__setattr__(new, f, changes[f] if f in changes else getattr(rec, f))
    object.__setattr__(new, "_layout", None)
    post = getattr(new, "_after_unflatten", None)
    if post is not None:
        post()
    return new


def stand_in(trace: Any, shape: tuple[int, ...]) -> Any:
    """``trace`` as a stand-in for a trace with element axes ``shape`` that has no such part
    (a Switch branch not taken, a Mask whose function did not run): its first element
    broadcast to ``shape`` when the element axes differ.  Its values are never read: the
    widened record masks them out (by the index, by the flag)."""
    lead = trace.score.dim()
    if tuple(trace.score.shape) == tuple(shape) or lead != len(shape):
        return trace
    first = (0,) * lead

    def fit(v: torch.Tensor) -> torch.Tensor:
        if v.dim() < lead:
            return v
        return v[first].expand(tuple(shape) + tuple(v.shape[lead:]))

    return tree_map_tensors(fit, trace)
