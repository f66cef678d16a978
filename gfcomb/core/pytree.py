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

import attrs
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


class _Uncompared:
    """A static record field kept in a pytree context but left out of TreeSpec equality
    (an attrs field declared ``eq=False``, e.g. a @gen trace's argument-source bookkeeping):
    two traces that differ only there have the same structure."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Uncompared)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "<uncompared>"


#: The value of an uncompared field after records that disagree on it were combined into one
#: (stacked, scattered, merged): unflatten gives the field ``None`` ("unknown") then.
_CONFLICT = object()


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a is b or a == b)
    except Exception:  # e.g. tensors inside: cannot vouch for equality
        return False


def _reconcile(spec: Any, others: Sequence[Any]) -> Any:
    """``spec`` with every uncompared field on which the specs ``others`` (of equal structure)
    disagree replaced by a conflict marker.

    Bookkeeping such as a @gen trace's argument sources is exact for the record it was made
    for; a record built from several (tree_stack / tree_scatter / tree_where) must not claim
    the bookkeeping of one of them for all of them.
    """
    if not others:
        return spec
    ctx = spec.context
    new_ctx = ctx
    if (isinstance(ctx, tuple) and len(ctx) == 2 and isinstance(ctx[1], tuple)
            and any(isinstance(v, _Uncompared) for v in ctx[1])):
        statics = list(ctx[1])
        changed = False
        for k, v in enumerate(statics):
            if not isinstance(v, _Uncompared) or v.value is _CONFLICT:
                continue
            for o in others:
                ov = o.context[1][k]
                if not isinstance(ov, _Uncompared) or not _same(ov.value, v.value):
                    statics[k] = _Uncompared(_CONFLICT)
                    changed = True
                    break
        if changed:
            new_ctx = (ctx[0], tuple(statics))
    children = list(spec.children())
    if not children and new_ctx is ctx:
        return spec
    other_children = [list(o.children()) for o in others]
    new_children = [_reconcile(c, [oc[j] for oc in other_children])
                    for j, c in enumerate(children)]
    if new_ctx is ctx and all(n is c for n, c in zip(new_children, children)):
        return spec
    return pytree.TreeSpec(spec.type, new_ctx, new_children)




def register_record(cls: type[T], dynamic: Sequence[str], static: Sequence[str]) -> type[T]:
    """Register an attrs record class as a pytree node.

    ``dynamic`` names the fields whose tensor leaves are children; ``static`` the fields kept
    in the context.  The class must declare a ``_layout`` field (``attrs.field(default=None,
    eq=False, repr=False)``) where the leaf layout is cached.
    """
    dynamic = tuple(dynamic)
    static = tuple(static)
    # static fields declared eq=False (bookkeeping) take no part in TreeSpec equality either
    loose = {f.name for f in attrs.fields(cls) if not f.eq} if attrs.has(cls) else set()
    boxed = tuple(f in loose for f in static)

    def flatten(rec: Any) -> tuple[list[Any], Any]:
        values = [getattr(rec, f) for f in dynamic]
        children, ctx = _flatten_fields(values, getattr(rec, _LAYOUT))
        return children, (ctx, tuple(_Uncompared(getattr(rec, f)) if b else getattr(rec, f)
                                     for f, b in zip(static, boxed)))

    def unflatten(children: Any, context: Any) -> Any:
        ctx, static_values = context
        values = _unflatten_fields(list(children), ctx)
        kwargs = dict(zip(dynamic, values))
        kwargs.update((f, (None if v.value is _CONFLICT else v.value) if b else v)
                      for f, v, b in zip(static, static_values, boxed))
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
    """Apply ``fn`` leafwise to two trees of the same structure (tensor leaves only).

    The result has ``a``'s structure; uncompared bookkeeping fields on which ``a`` and ``b``
    disagree become unknown (``None``).
    """
    la, spec = pytree.tree_flatten(a)
    lb, spec_b = pytree.tree_flatten(b)
    if len(la) != len(lb):
        raise ValueError("trees have different structures")
    out = [fn(x, y) if isinstance(x, torch.Tensor) else x for x, y in zip(la, lb)]
    return pytree.tree_unflatten(out, _reconcile(spec, [spec_b]))


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
    """Stack a list of trees of identical structure leafwise.

    Static parts come from ``trees[0]``; uncompared bookkeeping fields on which the trees
    disagree become unknown (``None``).
    """
    leaves0, spec = pytree.tree_flatten(trees[0])
    flat = [pytree.tree_flatten(t) for t in trees[1:]]
    columns = [leaves0] + [leaves for leaves, _ in flat]
    out = []
    for j, leaf in enumerate(leaves0):
        if isinstance(leaf, torch.Tensor):
            out.append(torch.stack([c[j] for c in columns], dim))
        else:
            out.append(leaf)
    return pytree.tree_unflatten(out, _reconcile(spec, [s for _, s in flat]))


def tree_tensors(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of ``tree``, in pytree order."""
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]
