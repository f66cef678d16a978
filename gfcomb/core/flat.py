"""A one-shot walk of a pytree into its tensor leaves and back, for crossing a vmap boundary.

:func:`gfcomb.core.vmap.vmap_rows` flattens the arguments and the result of every
vmapped kernel call (traces, choice maps, selections) and rebuilds them on the other side.
``torch.utils._pytree`` does that with a TreeSpec per node, and a record's own flatten
(:func:`gfcomb.core.pytree.register_record`) returns all the tensors of its sub-tree, so a
walk through nested records (a Switch trace holding @gen traces holding choice traces) visits
each tensor once per level.  :func:`flatten` / :func:`unflatten` visit each node once:
tuples, lists and dicts directly, a registered record through its field lists (read from
:data:`gfcomb.core.pytree.RECORD_FIELDS`), any other registered pytree node through its own
flatten/unflatten functions; non-tensor leaves stay in the spec.  Measured on a Switch trace
under Map (K = 2, 17 tensor leaves): about a third of the cost of going through the records'
pytree flatten.  Rebuilt records start with an empty ``_layout`` cache (as if just built).
The spec is only for :func:`unflatten` (it is not a ``TreeSpec``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from gfcomb.core.pytree import LOOSE_STATICS, RECORD_FIELDS

_TENSOR, _STATIC, _TUPLE, _LIST, _DICT, _RECORD, _NODE, _OTHER = range(8)
_TENSOR_SPEC = (_TENSOR,)
_NODES = pytree.SUPPORTED_NODES


_UNSEEN = object()
_PLAIN = (int, float, bool, str)
#: types met as leaves that are neither tensors nor pytree nodes (generative functions,
#: selections, row views, ...): their instances are static without asking torch again
_STATIC_TYPES: set[type] = set()
#: per record class: (getter of its dynamic field values, getter of its static field values)
#: as tuples; None for a type that is not a plain registered record
_GETTERS: dict[type, tuple[Callable[[Any], tuple[Any, ...]],
                           Callable[[Any], tuple[Any, ...]]] | None] = {}


def _tuple_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    if len(names) > 1:
        return operator.attrgetter(*names)  # (one C call for all the fields)
    if names:
        name = names[0]
        return lambda rec: (getattr(rec, name),)
    return lambda rec: ()


def _record_getters(t: type) -> Any:
    fields = RECORD_FIELDS.get(t)
    node = _NODES.get(t)
    getters = None
    if fields is not None and node is not None and node.flatten_fn is fields[2]:
        getters = (_tuple_getter(tuple(fields[0])), _tuple_getter(tuple(fields[1])))
    _GETTERS[t] = getters
    return getters


def flatten(tree: Any, leaves: list[torch.Tensor]) -> Any:
    """Append the tensor leaves of ``tree`` to ``leaves``; return the spec to rebuild it."""
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return _TENSOR_SPEC
    t = type(tree)
    if t is tuple:
        return (_TUPLE, _flatten_all(tree, leaves))
    if t is list:
        return (_LIST, _flatten_all(tree, leaves))
    if t is dict:
        return (_DICT, tuple(tree), _flatten_all(tree.values(), leaves))
    getters: Any = _GETTERS.get(t, _UNSEEN)
    if getters is _UNSEEN:
        getters = _record_getters(t)
    if getters is not None:
        dynamic, static = getters
        return (_RECORD, t, _flatten_all(dynamic(tree), leaves), static(tree))
    node = _NODES.get(t)
    if node is not None:
        children, ctx = node.flatten_fn(tree)
        return (_NODE, node.unflatten_fn, ctx, _flatten_all(children, leaves))
    if tree is None or t in _PLAIN or t in _STATIC_TYPES:
        return (_STATIC, tree)
    if not pytree.is_namedtuple_instance(tree):
        _STATIC_TYPES.add(t)  # (a type that is no pytree node: static from now on)
        return (_STATIC, tree)
    all_leaves, spec = pytree.tree_flatten(tree)  # a namedtuple: torch's own walk
    is_t = tuple(isinstance(x, torch.Tensor) for x in all_leaves)
    leaves.extend(x for x, k in zip(all_leaves, is_t) if k)
    return (_OTHER, spec, is_t, tuple(None if k else x for x, k in zip(all_leaves, is_t)))


def _flatten_all(items: Iterable[Any], leaves: list[torch.Tensor]) -> tuple[Any, ...]:
    out: list[Any] = []
    for x in items:
        if isinstance(x, torch.Tensor):  # (inline: most children are tensors)
            leaves.append(x)
            out.append(_TENSOR_SPEC)
        elif type(x) is tuple and len(x) == 2 and isinstance(x[0], torch.Tensor) \
                and isinstance(x[1], torch.Tensor):
            leaves.extend(x)  # (inline: a pair of tensors, the arguments of most choices)
            out.append(_PAIR_SPEC)
        else:
            out.append(flatten(x, leaves))
    return tuple(out)


_PAIR_SPEC = (_TUPLE, (_TENSOR_SPEC, _TENSOR_SPEC))


def unflatten(spec: Any, leaves: Iterator[torch.Tensor]) -> Any:
    """Rebuild a tree from its :func:`flatten` spec, taking tensor leaves from ``leaves``."""
    kind = spec[0]
    if kind == _TENSOR:
        return next(leaves)
    if kind == _STATIC:
        return spec[1]
    if kind == _TUPLE:
        return tuple(_unflatten_all(spec[1], leaves))
    if kind == _LIST:
        return _unflatten_all(spec[1], leaves)
    if kind == _DICT:
        return dict(zip(spec[1], _unflatten_all(spec[2], leaves)))
    if kind == _RECORD:
        return _record(spec[1], _unflatten_all(spec[2], leaves), spec[3])
    if kind == _NODE:
        return spec[1](_unflatten_all(spec[3], leaves), spec[2])
    _, tspec, is_t, statics = spec
    return pytree.tree_unflatten([next(leaves) if k else x for x, k in zip(statics, is_t)],
                                 tspec)


def without_bookkeeping(spec: Any) -> Any:
    """A :func:`flatten` spec with the records' uncompared bookkeeping fields (declared
    ``eq=False``: a @gen trace's argument sources) set to None: the static data a rebuilt
    tree's values depend on (bookkeeping only makes later edits cheaper, and stays right
    when stale: it names sources, and holds constants compared by value)."""
    kind = spec[0]
    if kind in (_TUPLE, _LIST):
        return (kind, tuple(without_bookkeeping(s) for s in spec[1]))
    if kind == _DICT:
        return (kind, spec[1], tuple(without_bookkeeping(s) for s in spec[2]))
    if kind == _RECORD:
        loose = LOOSE_STATICS.get(spec[1], ())
        statics = tuple(None if i < len(loose) and loose[i] else v
                        for i, v in enumerate(spec[3]))
        return (kind, spec[1], tuple(without_bookkeeping(s) for s in spec[2]), statics)
    if kind == _NODE:
        return (kind, spec[1], spec[2], tuple(without_bookkeeping(s) for s in spec[3]))
    return spec


def static_leaves(spec: Any) -> list[Any]:
    """The non-tensor leaves of a tree, from its :func:`flatten` spec, in order (not the
    records' static fields, nor the contexts of other pytree nodes)."""
    out: list[Any] = []
    todo = [spec]
    while todo:
        s = todo.pop()
        kind = s[0]
        if kind == _STATIC:
            out.append(s[1])
        elif kind in (_TUPLE, _LIST):
            todo.extend(reversed(s[1]))
        elif kind == _DICT:
            todo.extend(reversed(s[2]))
        elif kind == _RECORD:
            todo.extend(reversed(s[2]))
        elif kind == _NODE:
            todo.extend(reversed(s[3]))
        elif kind == _OTHER:
            out.extend(x for x, k in zip(s[3], s[2]) if not k)
    return out


def _record(cls: Any, dynamic_values: Iterable[Any], static_values: Iterable[Any]) -> Any:
    """A registered record of class ``cls`` with these field values (its leaf layout cache
    empty, as if just built)."""
    dynamic, static = RECORD_FIELDS[cls][:2]
    rec = cls.__new__(cls)
    for name, v in zip(dynamic, dynamic_values):
        object.__setattr__(rec, name, v)
    for name, v in zip(static, static_values):
        object.__setattr__(rec, name, v)
    object.__setattr__(rec, "_layout", None)
    post = getattr(rec, "_after_unflatten", None)
    if post is not None:
        post()
    return rec


def _unflatten_all(specs: tuple[Any, ...], leaves: Iterator[torch.Tensor]) -> list[Any]:
    return [next(leaves) if s is _TENSOR_SPEC else unflatten(s, leaves) for s in specs]


def zip_alike(a: Any, b: Any, fn: Callable[[torch.Tensor, torch.Tensor], Any]) -> Any:
    """A tree of ``a``'s structure whose tensor leaves are ``fn(x, y)`` of the matching leaves
    ``x`` of ``a`` and ``y`` of ``b``, a tree of the same structure (the same nodes, records of
    one class with equal static fields, equal non-tensor leaves; ValueError otherwise).  A
    sub-tree that is one object in both is kept as it is, not walked (a move that changed
    one call of a big trace merges that call only); ``fn`` runs once per distinct pair of
    tensors.  Uncompared bookkeeping fields of records on which the two disagree (e.g. a @gen
    trace's argument sources) become unknown (None)."""
    try:
        return _zip(a, b, fn, {})
    except _Differ:
        raise ValueError("the trees have different structures") from None


def _zip(x: Any, y: Any, fn: Callable[..., Any], done: dict[Any, Any]) -> Any:
    if x is y:
        return x
    if isinstance(x, torch.Tensor):
        if not isinstance(y, torch.Tensor):
            raise _Differ
        key = (id(x), id(y))
        out = done.get(key)
        if out is None:
            out = done[key] = fn(x, y)
        return out
    t = type(x)
    if type(y) is not t:
        raise _Differ
    if t is tuple or t is list:
        if len(x) != len(y):
            raise _Differ
        items = [_zip(u, v, fn, done) for u, v in zip(x, y)]
        if all(i is u for i, u in zip(items, x)):
            return x
        return tuple(items) if t is tuple else items
    if t is dict:
        if list(x) != list(y):
            raise _Differ
        values = [_zip(u, y[k], fn, done) for k, u in x.items()]
        if all(v is u for v, u in zip(values, x.values())):
            return x
        return dict(zip(x, values))
    getters: Any = _GETTERS.get(t, _UNSEEN)
    if getters is _UNSEEN:
        getters = _record_getters(t)
    if getters is not None:
        return _zip_record(t, x, y, getters, fn, done)
    node = _NODES.get(t)
    if node is not None:
        cx, ctx = node.flatten_fn(x)
        cy, cty = node.flatten_fn(y)
        if not _equal(ctx, cty) or len(cx) != len(cy):
            raise _Differ
        children = [_zip(u, v, fn, done) for u, v in zip(cx, cy)]
        return node.unflatten_fn(children, ctx)
    if x is None or t in _PLAIN or t in _STATIC_TYPES or not pytree.is_namedtuple_instance(x):
        if _equal(x, y):
            return x
        raise _Differ
    fields = [_zip(u, v, fn, done) for u, v in zip(x, y)]  # (a namedtuple: its fields)
    return x if all(f is u for f, u in zip(fields, x)) else t(*fields)


def _zip_record(cls: Any, x: Any, y: Any, getters: Any, fn: Callable[..., Any],
                done: dict[Any, Any]) -> Any:
    dynamic_of, static_of = getters
    dx, dy = dynamic_of(x), dynamic_of(y)
    values = [_zip(u, v, fn, done) for u, v in zip(dx, dy)]
    statics, loosened = _merged_statics(cls, static_of(x), static_of(y))
    if not loosened and all(v is u for v, u in zip(values, dx)):
        return x
    return _record(cls, values, statics)


def _merged_statics(cls: Any, xs: Iterable[Any], ys: Iterable[Any]) -> tuple[tuple[Any, ...],
                                                                            bool]:
    """Two records' static field values merged: ``(values, whether some uncompared
    bookkeeping disagreed and became None)``; _Differ when a compared field differs."""
    statics = []
    loosened = False
    for v, w, loose in zip(xs, ys, LOOSE_STATICS[cls]):
        if _equal(v, w):
            statics.append(v)
        elif loose:
            statics.append(None)
            loosened = True
        else:
            raise _Differ
    return tuple(statics), loosened


class _Differ(Exception):
    """Two trees that :func:`zip_alike` found to differ in structure."""


def _equal(x: Any, y: Any) -> bool:
    try:
        return bool(x is y or x == y)
    except Exception:  # (tensors inside: cannot vouch for equality)
        return False
