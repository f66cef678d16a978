"""Registering gfcomb's immutable records as pytrees that ``torch.func.vmap`` takes and returns.

A record's fields are split into *dynamic* fields (arbitrary Python structures whose tensor
leaves become pytree children, so they get a batch dimension under vmap) and *static*
fields (addresses, generative functions, Python ints: kept in the pytree context).

Non-tensor leaves found inside dynamic fields (a Python ``int`` among the arguments, say) are
kept static too.  Which leaves are tensors is decided once, when a record is first flattened,
and remembered in the record's ``_layout`` slot: torch re-flattens records whose tensor leaves
have been replaced by placeholders (e.g. ``0`` when it broadcasts ``out_dims``), so the layout
must not be re-derived from the leaf types then.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch.utils import _pytree as pytree

T = TypeVar("T")

_LAYOUT = "_layout"


def _flatten_fields(values: Sequence[Any], layout: Any) -> tuple[list[Any], Any]:
    leaves, spec = pytree.tree_flatten(list(values))
    if layout is not None and layout[0] == spec:
        is_dyn = layout[1]
    else:
        is_dyn = tuple(isinstance(leaf, torch.Tensor) for leaf in leaves)
    children = [leaf for leaf, d in zip(leaves, is_dyn) if d]
    statics = tuple(None if d else leaf for leaf, d in zip(leaves, is_dyn))
    return children, (spec, is_dyn, statics)


def _unflatten_fields(children: Sequence[Any], ctx: Any) -> list[Any]:
    spec, is_dyn, statics = ctx
    it = iter(children)
    leaves = [next(it) if d else s for d, s in zip(is_dyn, statics)]
    return pytree.tree_unflatten(leaves, spec)


def register_record(cls: type[T], dynamic: Sequence[str], static: Sequence[str]) -> type[T]:
    """Register an attrs record class as a pytree node.

    ``dynamic`` names the fields whose tensor leaves are children; ``static`` the fields kept
    in the context.  The class must declare a ``_layout`` field (``attrs.field(default=None,
    eq=False, repr=False)``) where the leaf layout is cached.
    """
    dynamic = tuple(dynamic)
    static = tuple(static)

    def flatten(rec: Any) -> tuple[list[Any], Any]:
        values = [getattr(rec, f) for f in dynamic]
        children, ctx = _flatten_fields(values, getattr(rec, _LAYOUT))
        return children, (ctx, tuple(getattr(rec, f) for f in static))

    def unflatten(children: Any, context: Any) -> Any:
        ctx, static_values = context
        values = _unflatten_fields(list(children), ctx)
        kwargs = dict(zip(dynamic, values))
        kwargs.update(zip(static, static_values))
        rec = cls.__new__(cls)
        for name, value in kwargs.items():
            object.__setattr__(rec, name, value)
        object.__setattr__(rec, _LAYOUT, (ctx[0], ctx[1]))
        _post_unflatten = getattr(rec, "_after_unflatten", None)
        if _post_unflatten is not None:
            _post_unflatten()
        return rec

    pytree.register_pytree_node(cls, flatten, unflatten)
    return cls


# --------------------------------------------------------------------------- tensor tree ops
def tree_map_tensors(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of ``tree`` (non-tensor leaves are left as they are)."""
    return pytree.tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, tree)


def tree_map2_tensors(fn: Callable[[torch.Tensor, torch.Tensor], Any], a: Any, b: Any) -> Any:
    """Apply ``fn`` leafwise to two trees of the same structure (tensor leaves only)."""
    la, spec = pytree.tree_flatten(a)
    lb = pytree.tree_leaves(b)
    if len(la) != len(lb):
        raise ValueError("trees have different structures")
    out = [fn(x, y) if isinstance(x, torch.Tensor) else x for x, y in zip(la, lb)]
    return pytree.tree_unflatten(out, spec)


def tree_index(tree: Any, index: Any, dim: int = 0) -> Any:
    """Index every tensor leaf along ``dim`` (an int, a slice or an index tensor)."""
    if isinstance(index, torch.Tensor):
        return tree_map_tensors(lambda x: x.index_select(dim, index.to(x.device)), tree)
    sl = (slice(None),) * dim + (index,)
    return tree_map_tensors(lambda x: x[sl], tree)


def tree_scatter(tree: Any, index: torch.Tensor, updates: Any, dim: int = 0) -> Any:
    """Return a copy of ``tree`` whose entries at ``index`` (along ``dim``) are ``updates``."""
    return tree_map2_tensors(
        lambda x, u: x.index_copy(dim, index.to(x.device), u.to(x.dtype)), tree, updates
    )


def tree_where(mask: torch.Tensor, a: Any, b: Any) -> Any:
    """Leafwise ``torch.where(mask, a, b)``, broadcasting ``mask`` over trailing dimensions."""

    def pick(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
        return torch.where(m, x, y)

    return tree_map2_tensors(pick, a, b)


def tree_stack(trees: Sequence[Any], dim: int = 0) -> Any:
    """Stack a list of trees of identical structure leafwise."""
    leaves0, spec = pytree.tree_flatten(trees[0])
    columns = [pytree.tree_leaves(t) for t in trees]
    out = []
    for j, leaf in enumerate(leaves0):
        if isinstance(leaf, torch.Tensor):
            out.append(torch.stack([c[j] for c in columns], dim))
        else:
            out.append(leaf)
    return pytree.tree_unflatten(out, spec)


def tree_tensors(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of ``tree``, in pytree order."""
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]
