"""Registering gfcomb's immutable records as pytrees that ``torch.func.vmap`` takes and returns.

A record's fields are split into *dynamic* fields (arbitrary Python structures whose tensor
leaves become pytree children, so they get a batch dimension under vmap) and *static*
fields (addresses, generative functions, Python ints: kept in the pytree context).

Non-tensor leaves found inside dynamic fields (a Python ``int`` among the arguments, say) are
kept static too.  Which leaves are tensors is decided once, when a record is first flattened,
and remembered in the record's ``_layout`` slot: torch re-flattens records whose tensor leaves
have been replaced by placeholders (e.g. ``0`` when it broadcasts ``out_dims``), so the layout
must not be re-derived from the leaf types then.

Flattening is on the fixed cost of every ``torch.func.vmap`` call that takes or returns a trace
(torch flattens the outputs, rebuilds them with placeholders to broadcast ``out_dims``,
flattens that again and rebuilds the result), so it is made cheap: a record's dynamic fields
are walked directly (tuples, lists, dicts, registered nodes; :func:`_walk`) instead of with a
nested ``tree_flatten``, and the result ``(children, context)`` is what ``_layout`` holds: a
record is immutable, so flattening it again (or a record built by unflatten) is a lookup.
Code that copies a record with changed fields (``attrs.evolve``) must reset ``_layout``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
import torch
from torch.utils import _pytree as pytree

from gfcomb.core.batching import stack_tensors

T = TypeVar("T")

_LAYOUT = "_layout"


_W_TENSOR, _W_TUPLE, _W_LIST, _W_DICT, _W_STATIC, _W_NODE, _W_OTHER = range(7)
_TENSOR_SPEC = (_W_TENSOR,)
_PLAIN_STATIC = (int, float, bool, str, type(None))


def _walk(x: Any, leaves: list[Any]) -> Any:
    """Append the tensor leaves of ``x`` to ``leaves`` and return a spec to rebuild it.

    Equal specs mean equal structure: nested tuples of kinds, dict keys, the type and
    context of registered pytree nodes (records, choice maps, diffs) and the values of
    non-tensor leaves (which stay static).  A direct walk: much cheaper than
    ``pytree.tree_flatten`` with its TreeSpec per node.
    """
    if isinstance(x, torch.Tensor):
        leaves.append(x)
        return _TENSOR_SPEC
    t = type(x)
    if t is tuple:
        return (_W_TUPLE, tuple([_walk(v, leaves) for v in x]))
    if t is list:
        return (_W_LIST, tuple([_walk(v, leaves) for v in x]))
    if t is dict:
        return (_W_DICT, tuple(x), tuple([_walk(v, leaves) for v in x.values()]))
    if t in _PLAIN_STATIC:
        return (_W_STATIC, x)
    node = pytree.SUPPORTED_NODES.get(t)
    if node is not None:
        children, ctx = node.flatten_fn(x)
        return (_W_NODE, t, ctx, tuple([_walk(c, leaves) for c in children]))
    if pytree.tree_is_leaf(x):
        return (_W_STATIC, x)
    # another pytree node (a namedtuple, a structseq): torch's own walk
    all_leaves, spec = pytree.tree_flatten(x)
    is_t = tuple(isinstance(v, torch.Tensor) for v in all_leaves)
    leaves.extend(v for v, k in zip(all_leaves, is_t) if k)
    return (_W_OTHER, spec, is_t, tuple(None if k else v for v, k in zip(all_leaves, is_t)))


def _build(spec: Any, it: Any) -> Any:
    """Rebuild what :func:`_walk` walked, taking its tensor leaves from the iterator ``it``."""
    kind = spec[0]
    if kind == _W_TENSOR:
        return next(it)
    if kind == _W_STATIC:
        return spec[1]
    if kind == _W_TUPLE:
        return tuple([_build(s, it) for s in spec[1]])
    if kind == _W_LIST:
        return [_build(s, it) for s in spec[1]]
    if kind == _W_DICT:
        return dict(zip(spec[1], [_build(s, it) for s in spec[2]]))
    if kind == _W_NODE:
        return pytree.SUPPORTED_NODES[spec[1]].unflatten_fn(
            [_build(s, it) for s in spec[3]], spec[2])
    _, tspec, is_t, statics = spec
    return pytree.tree_unflatten([next(it) if k else v for v, k in zip(statics, is_t)], tspec)


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


def reconcile(spec: Any, others: Sequence[Any]) -> Any:
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
    for o in others:
        new_ctx = _reconcile_statics(new_ctx, o.context)
    children = list(spec.children())
    if not children and new_ctx is ctx:
        return spec
    other_children = [list(o.children()) for o in others]
    new_children = [reconcile(c, [oc[j] for oc in other_children])
                    for j, c in enumerate(children)]
    if new_ctx is ctx and all(n is c for n, c in zip(new_children, children)):
        return spec
    return pytree.TreeSpec(spec.type, new_ctx, new_children)




def _reconcile_statics(ctx: Any, other: Any) -> Any:
    """A record context ``(…, statics)`` with the uncompared statics on which ``other``'s
    disagree replaced by the conflict marker (see :func:`reconcile`)."""
    if not (isinstance(ctx, tuple) and len(ctx) == 2 and isinstance(ctx[1], tuple)
            and any(isinstance(v, _Uncompared) for v in ctx[1])):
        return ctx
    statics = list(ctx[1])
    changed = False
    for k, v in enumerate(statics):
        if isinstance(v, _Uncompared) and v.value is not _CONFLICT:
            ov = other[1][k]
            if not isinstance(ov, _Uncompared) or not _same(ov.value, v.value):
                statics[k] = _Uncompared(_CONFLICT)
                changed = True
    return (ctx[0], tuple(statics)) if changed else ctx


def _reconcile_walk(spec: Any, other: Any) -> Any:
    """:func:`reconcile` for two :func:`_walk` specs of equal structure."""
    kind = spec[0]
    if kind == _W_NODE:
        children = tuple([_reconcile_walk(c, o) for c, o in zip(spec[3], other[3])])
        return (kind, spec[1], _reconcile_statics(spec[2], other[2]), children)
    if kind in (_W_TUPLE, _W_LIST):
        return (kind, tuple([_reconcile_walk(c, o) for c, o in zip(spec[1], other[1])]))
    if kind == _W_DICT:
        return (kind, spec[1],
                tuple([_reconcile_walk(c, o) for c, o in zip(spec[2], other[2])]))
    return spec


#: Per record class, for each static field: is it uncompared bookkeeping (declared
#: ``eq=False``)?  Read by :mod:`gfcomb.core.flat` when it compares two specs.
LOOSE_STATICS: dict[type, tuple[bool, ...]] = {}

#: Every record class registered with :func:`register_record`: (dynamic field names, static
#: field names, its pytree flatten function); read by :mod:`gfcomb.core.flat`.
RECORD_FIELDS: dict[type, tuple[tuple[str, ...], tuple[str, ...], Callable[..., Any]]] = {}


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
        cached = getattr(rec, _LAYOUT)
        if cached is not None:  # flattened before, or built by unflatten: immutable
            return list(cached[0]), cached[1]
        children: list[Any] = []
        specs = tuple([_walk(getattr(rec, f), children) for f in dynamic])
        context = (specs, tuple(_Uncompared(getattr(rec, f)) if b else getattr(rec, f)
                                for f, b in zip(static, boxed)))
        object.__setattr__(rec, _LAYOUT, (tuple(children), context))
        return children, context

    def unflatten(children: Any, context: Any) -> Any:
        specs, static_values = context
        children = tuple(children)
        it = iter(children)
        rec = cls.__new__(cls)
        for name, spec in zip(dynamic, specs):
            object.__setattr__(rec, name, _build(spec, it))
        for f, v, b in zip(static, static_values, boxed):
            object.__setattr__(rec, f, (None if v.value is _CONFLICT else v.value) if b else v)
        object.__setattr__(rec, _LAYOUT, (children, context))
        _post_unflatten = getattr(rec, "_after_unflatten", None)
        if _post_unflatten is not None:
            _post_unflatten()
        return rec

    pytree.register_pytree_node(cls, flatten, unflatten)
    RECORD_FIELDS[cls] = (dynamic, static, flatten)
    LOOSE_STATICS[cls] = boxed
    return cls


# --------------------------------------------------------------------------- tensor tree ops
_PLAIN_LEAF = (torch.Tensor, int, float, bool, str, type(None))


def tree_map_tensors(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of ``tree`` (non-tensor leaves are left as they are).

    One direct walk of the tree (:mod:`gfcomb.core.flat`), not torch's TreeSpec per node:
    this runs several times per particle-filter step on whole traces."""
    if isinstance(tree, torch.Tensor):  # (the common small cases, without the walk)
        return fn(tree)
    if type(tree) is tuple:
        out = []
        for x in tree:
            if isinstance(x, torch.Tensor):
                out.append(fn(x))
            elif isinstance(x, _PLAIN_LEAF):
                out.append(x)
            else:
                break  # a nested leaf: the general walk
        else:
            return tuple(out)
    from gfcomb.core.flat import flatten, unflatten

    leaves: list[torch.Tensor] = []
    spec = flatten(tree, leaves)
    return unflatten(spec, iter(_map_once(fn, leaves)))


def _map_once(fn: Callable[..., Any], leaves: list[Any], others: list[Any] | None = None,
              ) -> list[Any]:
    """``fn`` of each leaf (pair of leaves), computed once per distinct tensor (pair): a
    tensor held in several places of a trace (a choice that is also the return value and the
    next call's argument) maps to one result, so the result shares it the same way."""
    done: dict[Any, Any] = {}
    out = []
    if others is None:
        for x in leaves:
            y = done.get(id(x))
            if y is None:
                y = done[id(x)] = fn(x)
            out.append(y)
        return out
    for x, z in zip(leaves, others):
        key = (id(x), id(z))
        y = done.get(key)
        if y is None:
            y = done[key] = fn(x, z)
        out.append(y)
    return out


def tree_map2_tensors(fn: Callable[[torch.Tensor, torch.Tensor], Any], a: Any, b: Any) -> Any:
    """Apply ``fn`` leafwise to two trees of the same structure (tensor leaves only).

    The result has ``a``'s structure; uncompared bookkeeping fields on which ``a`` and ``b``
    disagree become unknown (``None``).
    """
    la: list[Any] = []
    lb: list[Any] = []
    spec, spec_b = _walk(a, la), _walk(b, lb)  # (not torch's walk: no reference cycle)
    if len(la) != len(lb):
        raise ValueError("trees have different structures")
    return _build(_reconcile_walk(spec, spec_b), iter(_map_once(fn, la, lb)))


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
        if x is y:  # (a part both sides share: nothing to pick)
            return x
        m = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
        return torch.where(m, x, y)

    return tree_map2_tensors(pick, a, b)


def tree_where_alike(mask: torch.Tensor, a: Any, b: Any) -> Any:
    """:func:`tree_where` of two trees of the same structure (as :func:`same_tree_structure`
    tests; ValueError otherwise), walking only where they differ: a sub-tree that is one
    object in both (a call a move left alone) is kept as it is.  A leaf that is one tensor in
    both, or two views of the same memory laid out alike (a shared argument or observation
    expanded to every row), passes through from ``a``: merging its rows would only copy it;
    so does a leaf expanded to every row on both sides from equal values (a constant the
    model made anew in each of the two runs), which stays shared."""
    from gfcomb.core.flat import zip_alike

    shaped: dict[int, torch.Tensor] = {}
    lead = mask.dim()

    def pick(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.data_ptr() == y.data_ptr() and x.stride() == y.stride() and x.shape == y.shape \
                and x.dtype == y.dtype and x.device == y.device:
            return x
        if x.dim() >= lead and x.shape == y.shape and x.dtype == y.dtype \
                and all(x.stride(i) == 0 == y.stride(i) for i in range(lead)):
            row = (0,) * lead
            try:
                if x[row].numel() <= 4096 and torch.equal(x[row], y[row]):
                    return x
            except RuntimeError:  # (a tracer: values cannot be read; merged as any leaf)
                pass
        m = shaped.get(x.dim())
        if m is None:
            m = shaped[x.dim()] = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
        return torch.where(m, x, y)

    return zip_alike(a, b, pick)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same_walk(x: Any, y: Any) -> bool:
    """Do two :func:`_walk` specs describe the same structure (Python-number leaves may
    differ in value, not in type)?"""
    if x is y or _same(x, y):
        return True
    kind = x[0]
    if kind != y[0]:
        return False
    if kind == _W_STATIC:
        return _is_number(x[1]) and type(x[1]) is type(y[1])
    if kind in (_W_TUPLE, _W_LIST):
        return len(x[1]) == len(y[1]) and all(map(_same_walk, x[1], y[1]))
    if kind == _W_DICT:
        return x[1] == y[1] and all(map(_same_walk, x[2], y[2]))
    if kind == _W_NODE:
        return (x[1] is y[1] and _same_context(x[1], x[2], y[2]) and len(x[3]) == len(y[3])
                and all(map(_same_walk, x[3], y[3])))
    if kind == _W_OTHER:
        return (x[1] == y[1] and x[2] == y[2] and all(
            _same(a, b) or (_is_number(a) and type(a) is type(b)) for a, b in zip(x[3], y[3])))
    return False


def _same_context(t: type, a: Any, b: Any) -> bool:
    if t in RECORD_FIELDS:  # (walk specs of the dynamic fields, static field values)
        return (len(a[0]) == len(b[0]) and all(map(_same_walk, a[0], b[0]))
                and all(map(_same, a[1], b[1])))
    return _same(a, b)


def same_structure(a: pytree.TreeSpec, b: pytree.TreeSpec) -> bool:
    """Do two pytree specs (of :func:`torch.utils._pytree.tree_flatten`) describe trees that
    can be stacked into one: the same nodes, records with equal static fields, the same
    tensor leaves?  Python numbers kept static (e.g. a step index among a kernel's
    arguments) may differ in value."""
    if a is b or _same(a, b):
        return True
    if a.type is not b.type or a.num_children != b.num_children:
        return False
    if a.type is not None and not _same_context(a.type, a.context, b.context):
        return False
    return all(map(same_structure, a.children(), b.children()))


def tree_stack(trees: Sequence[Any], dim: int = 0) -> Any:
    """Stack a list of trees of identical structure leafwise.

    Static parts come from ``trees[0]``; uncompared bookkeeping fields on which the trees
    disagree become unknown (``None``); Python numbers kept static may differ (``trees[0]``'s
    are kept).  Trees of other structures (other addresses, a Switch on another branch)
    raise ValueError.  ``trees[0]`` is walked with gfcomb's own walk (:func:`_walk`), every
    other tree along its spec (:func:`_follow`: leaves, structure check and bookkeeping in
    one pass, no spec built): an Unfold stacks its steps' traces with it.
    """
    first: list[Any] = []
    spec = _walk(trees[0], first)
    columns = [first]
    for i, tree in enumerate(trees[1:], 1):
        leaves: list[Any] = []
        try:
            spec = _follow(tree, spec, leaves)
        except _Mismatch:
            raise ValueError(
                f"tree_stack: tree {i} has a different structure from tree 0 (other "
                "addresses, other static values, or a Switch on another branch), so the trees "
                "cannot be stacked into one record") from None
        columns.append(leaves)
    # a tensor held in several places of every tree (a choice's value that is also the
    # return value and the next choice's argument) is stacked once and shared
    out: list[torch.Tensor] = []
    done: dict[tuple[int, ...], torch.Tensor] = {}
    for j in range(len(first)):
        col = [c[j] for c in columns]
        key = tuple(map(id, col))
        stacked = done.get(key)
        if stacked is None:
            stacked = done[key] = stack_tensors(col, dim)
        out.append(stacked)
    return _build(spec, iter(out))


class _Mismatch(Exception):
    """A tree that :func:`_follow` found to differ from the spec it follows."""


def _follow(x: Any, spec: Any, leaves: list[Any]) -> Any:
    """Append the tensor leaves of ``x`` to ``leaves`` walking along ``spec`` (a
    :func:`_walk` spec of a tree of the same structure); return ``spec`` with the
    uncompared bookkeeping on which ``x`` disagrees marked (:func:`reconcile`), or raise
    :class:`_Mismatch`.  The check of ``_same_walk(spec, _walk(x))`` without building
    ``x``'s spec (nor its records' layouts)."""
    kind = spec[0]
    if kind == _W_TENSOR:
        if not isinstance(x, torch.Tensor):
            raise _Mismatch
        leaves.append(x)
        return spec
    if kind == _W_STATIC and type(x) in _PLAIN_STATIC:
        v0 = spec[1]
        if x is v0 or (type(x) is type(v0) and (_is_number(x) or x == v0)):
            return spec  # (numbers may differ: trees[0]'s are kept)
        raise _Mismatch
    if kind == _W_NODE:
        t = spec[1]
        if type(x) is not t:
            raise _Mismatch
        fields = RECORD_FIELDS.get(t)
        if fields is None or pytree.SUPPORTED_NODES[t].flatten_fn is not fields[2]:
            children, ctx = pytree.SUPPORTED_NODES[t].flatten_fn(x)
            if len(children) != len(spec[3]) or not (
                    _same(ctx, spec[2]) or _same_context(t, spec[2], ctx)):
                raise _Mismatch
            kids = _follow_all(children, spec[3], leaves)
            return spec if kids is None else spec[:3] + (kids,)
        dynamic, static, _ = fields
        fspecs, statics = spec[2]
        new_fspecs = _follow_all([getattr(x, f) for f in dynamic], fspecs, leaves)
        new_statics = statics
        for k, f in enumerate(static):
            v0, v = statics[k], getattr(x, f)
            if type(v0) is _Uncompared:
                if v0.value is not _CONFLICT and not _same(v, v0.value):
                    new_statics = new_statics[:k] + (_Uncompared(_CONFLICT),) + new_statics[k + 1:]
            elif not (v is v0 or _same(v, v0)):
                raise _Mismatch
        if new_statics is statics and new_fspecs is None:
            return spec
        return (kind, t, (fspecs if new_fspecs is None else new_fspecs, new_statics), spec[3])
    if kind == _W_TUPLE or kind == _W_LIST:
        if type(x) is not (tuple if kind == _W_TUPLE else list) or len(x) != len(spec[1]):
            raise _Mismatch
        kids = _follow_all(x, spec[1], leaves)
        return spec if kids is None else (kind, kids)
    if kind == _W_DICT:
        if type(x) is not dict or tuple(x) != spec[1]:
            raise _Mismatch
        kids = _follow_all(list(x.values()), spec[2], leaves)
        return spec if kids is None else (kind, spec[1], kids)
    mine: list[Any] = []  # another leaf or node: walk it and compare
    other = _walk(x, mine)
    if not _same_walk(spec, other):
        raise _Mismatch
    leaves.extend(mine)
    return _reconcile_walk(spec, other)


def _follow_all(xs: Sequence[Any], specs: tuple[Any, ...], leaves: list[Any],
                ) -> tuple[Any, ...] | None:
    """:func:`_follow` of each of ``xs`` along ``specs`` (of equal length); None when every
    spec came back unchanged, else the new specs."""
    out: list[Any] | None = None
    for j, (v, sp) in enumerate(zip(xs, specs)):
        if sp is _TENSOR_SPEC and isinstance(v, torch.Tensor):  # (most children)
            leaves.append(v)
            if out is not None:
                out.append(sp)
            continue
        got = _follow(v, sp, leaves)
        if got is not sp:
            if out is None:
                out = list(specs[:j])
            out.append(got)
        elif out is not None:
            out.append(sp)
    return None if out is None else tuple(out)


def same_tree_structure(a: Any, b: Any) -> bool:
    """Do ``a`` and ``b`` have the same structure: the same nodes, records with equal static
    fields (uncompared bookkeeping aside), equal non-tensor leaves?  (The test of
    ``tree_structure(a) == tree_structure(b)``, a little stricter on plain non-tensor
    leaves, by gfcomb's own walk: torch's leaves a reference cycle per call.)"""
    if a is b:
        return True
    return _same(_walk(a, []), _walk(b, []))


def tree_concat(trees: Sequence[Any], dim: int) -> Any:
    """Concatenate trees of one structure leafwise along ``dim`` (static parts from
    ``trees[0]``; Python numbers kept static may differ).  Trees of other structures raise
    ValueError.  gfcomb's own walk: ``torch.utils._pytree.tree_map`` leaves a reference
    cycle behind on every call, garbage for the cyclic collector in a long filter."""
    if len(trees) == 1:
        return trees[0]
    columns: list[list[Any]] = []
    specs = []
    for tree in trees:
        leaves: list[Any] = []
        specs.append(_walk(tree, leaves))
        columns.append(leaves)
    for i, spec in enumerate(specs[1:], 1):
        if not _same_walk(specs[0], spec):
            raise ValueError(f"tree_concat: tree {i} has a different structure from tree 0")
    out = [torch.cat([c[j] for c in columns], dim) for j in range(len(columns[0]))]
    return _build(specs[0], iter(out))


def tree_tensors(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of ``tree``, in pytree order."""
    leaves: list[Any] = []
    _walk(tree, leaves)
    return leaves
