"""The trace of a :class:`~gfcomb.combinators.recurse.Recurse`: per node, a production and an
aggregation kernel trace, held in :class:`NodeTable` s whose rows may be stacked by depth."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any

import attrs
import torch

from gfcomb.core.choicemap import ChoiceMap, short_repr
from gfcomb.core.errors import AddressError, ArgumentError
from gfcomb.core.pytree import register_record, tree_index
from gfcomb.core.trace import Trace

PARTS = ("production", "aggregation")
_PLAIN = (int, float, str, bool, type(None))


def _children_tuple(children: Any) -> tuple[Any, ...]:
    if isinstance(children, (list, tuple)):
        return tuple(children)
    raise ArgumentError("Production: children must be a list or tuple of child inputs, got "
                        f"{type(children).__name__}")


@attrs.frozen(repr=False, eq=False)
class Production:
    """What a Recurse production kernel returns: the node's ``value`` (passed to the node's
    aggregation) and ``children``, the list of child inputs (one child per entry, at most
    ``max_branch``).  Stored as a tuple; a pytree, so vmap can batch it."""

    value: Any
    children: tuple[Any, ...] = attrs.field(converter=_children_tuple, factory=tuple)
    _layout: Any = attrs.field(default=None, eq=False, repr=False)

    def __repr__(self) -> str:
        return f"Production(value={short_repr(self.value)}, children=<{len(self.children)}>)"


register_record(Production, dynamic=("value", "children"), static=())


class LazyMap(Mapping[Any, Any]):
    """A read-only mapping built by ``build()`` on first use: the node index of a tree grown
    afresh (node -> place, node -> children count) is O(nodes) Python to build, and a call
    that only reads the score or the return value never needs it.  Equal to a dict with the
    same items; pickles and saves as that dict."""

    __slots__ = ("_build", "_map")

    def __init__(self, build: Callable[[], dict[Any, Any]]) -> None:
        self._build: Callable[[], dict[Any, Any]] | None = build
        self._map: dict[Any, Any] | None = None

    def materialized(self) -> dict[Any, Any]:
        """The mapping as a dict (built now if it was not yet; do not modify it)."""
        m = self._map
        if m is None:
            assert self._build is not None
            m = self._map = self._build()
            self._build = None
        return m

    def __getitem__(self, key: Any) -> Any:
        return self.materialized()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.materialized())

    def __len__(self) -> int:
        return len(self.materialized())

    def __contains__(self, key: object) -> bool:
        return key in self.materialized()

    def keys(self) -> Any:
        """The keys (of the built dict)."""
        return self.materialized().keys()

    def values(self) -> Any:
        """The values (of the built dict)."""
        return self.materialized().values()

    def items(self) -> Any:
        """The items (of the built dict)."""
        return self.materialized().items()

    def get(self, key: Any, default: Any = None) -> Any:
        """The value at ``key``, else ``default``."""
        return self.materialized().get(key, default)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LazyMap):
            other = other.materialized()
        return self.materialized() == other

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return dict, (self.materialized(),)

    def __repr__(self) -> str:
        return repr(self.materialized())


def as_dict(m: Mapping[Any, Any]) -> dict[Any, Any]:
    """``m`` itself if it is a dict, else the dict behind a :class:`LazyMap` (read-only)."""
    if type(m) is dict:
        return m
    if isinstance(m, LazyMap):
        return m.materialized()
    return dict(m)


class _Block:
    """One stacked kernel trace (rows = nodes) and the per-row traces read out of it so far
    (shared by every table that holds the block, so a node's trace is one object)."""

    __slots__ = ("trace", "rows")

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.rows: dict[int, Trace] = {}

    def row(self, j: int) -> Trace:
        tr = self.rows.get(j)
        if tr is None:  # (the node axis is the block score's last: after any batch axes
            # the whole Recurse trace was stacked along, by a Map or an Unfold)
            tr = self.rows[j] = tree_index(self.trace, j, dim=self.trace.score.dim() - 1)
        return tr


#: a node's place: (block, row) for a row of a stacked block, (trace, -1) for a lone trace
Entry = tuple[Any, int]


@attrs.frozen(repr=False, eq=False)
class NodeTable(Mapping[int, Trace]):
    """Node index -> kernel trace, in increasing index order.

    ``blocks`` are kernel traces: stacked ones (one row per node, from one batched kernel
    call over a depth) and lone per-node ones; ``where`` maps a node to ``(block number,
    row)``, row -1 for a lone trace.  A node's own trace is read out of its block when first
    asked for.  ``where`` is the static structure of the pytree, ``blocks`` its dynamic part.
    """

    blocks: tuple[Trace | None, ...]
    where: Mapping[int, tuple[int, int]]  # a dict, or a LazyMap for a tree grown afresh
    _layout: Any = attrs.field(default=None, eq=False, repr=False)
    _handles: Any = attrs.field(default=None, eq=False, repr=False)
    _live: Any = attrs.field(default=None, eq=False, repr=False)

    def _after_unflatten(self) -> None:
        object.__setattr__(self, "_handles", None)
        object.__setattr__(self, "_live", None)

    def handles(self) -> tuple[Any, ...]:
        """Per block: the :class:`_Block` of a stacked one, the trace itself for a lone one
        (None for a block no node refers to any more)."""
        hs = self._handles
        if hs is None:
            rows = {b: r for b, r in self.where.values()}
            hs = tuple(None if t is None else _Block(t) if rows.get(b, -1) >= 0 else t
                       for b, t in enumerate(self.blocks))
            object.__setattr__(self, "_handles", hs)
        return hs

    def live(self) -> list[int]:
        """Per block: how many nodes it holds."""
        counts = self._live
        if counts is None:
            counts = [0] * len(self.blocks)
            for b, n in Counter(map(itemgetter(0), self.where.values())).items():
                counts[b] = n
            object.__setattr__(self, "_live", counts)
        return list(counts)

    def entry(self, i: int) -> Entry:
        """Node ``i``'s place: ``(block handle, row)`` or ``(trace, -1)``."""
        b, r = as_dict(self.where)[i]
        return self.handles()[b], r

    def __getitem__(self, i: int) -> Trace:
        b, r = as_dict(self.where)[i]
        h = self.handles()[b]
        return h.row(r) if r >= 0 else h

    def __iter__(self) -> Iterator[int]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, i: object) -> bool:
        return i in self.where

    def __repr__(self) -> str:
        return f"NodeTable(<{len(self.where)} nodes in {len(self.blocks)} blocks>)"

    @staticmethod
    def build(entries: Mapping[int, Entry], sort: bool) -> NodeTable:
        """A table from node -> entry (``(block handle, row)`` / ``(trace, -1)``)."""
        keys = sorted(entries) if sort else list(entries)
        vals = list(map(entries.__getitem__, keys))
        hs = list(map(itemgetter(0), vals))
        ids = list(map(id, hs))  # (C loops: this runs over every node of every edit)
        numbers = {k: b for b, k in enumerate(dict.fromkeys(ids))}
        by_id = dict(zip(ids, hs))
        handles = [by_id[k] for k in numbers]
        where = dict(zip(keys, zip(map(numbers.__getitem__, ids), map(itemgetter(1), vals))))
        blocks = tuple(h.trace if isinstance(h, _Block) else h for h in handles)
        return NodeTable(blocks, where, handles=tuple(handles))

    def replaced(self, new: Mapping[int, Entry]) -> NodeTable:
        """This table with the entries of some of its nodes replaced (O(changes) Python, a
        C copy of ``where``); blocks no node refers to any more are dropped (None), and the
        table is rebuilt once they are most of it."""
        where = dict(as_dict(self.where))
        blocks = list(self.blocks)
        handles = list(self.handles())
        live = self.live()
        numbers: dict[int, int] = {}
        for i, (h, r) in new.items():
            b_old = where[i][0]
            live[b_old] -= 1
            if not live[b_old]:
                blocks[b_old] = handles[b_old] = None
            b = numbers.get(id(h))
            if b is None:
                b = numbers[id(h)] = len(blocks)
                blocks.append(h.trace if isinstance(h, _Block) else h)
                handles.append(h)
                live.append(0)
            live[b] += 1
            where[i] = (b, r)
        if len(blocks) > 16 and 2 * live.count(0) > len(blocks):
            return NodeTable.build({i: (handles[b], r) for i, (b, r) in where.items()}, False)
        return NodeTable(tuple(blocks), where, handles=tuple(handles), live=live)

    def entries_of(self, nodes: Iterable[int]) -> list[Entry]:
        """The entries of ``nodes``."""
        hs = self.handles()
        return [(hs[b], r) for b, r in map(as_dict(self.where).__getitem__, nodes)]


    def __gf_persist__(self) -> NodeTable:
        """Saved with a plain dict as ``where`` (gfcomb.persistence)."""
        if type(self.where) is dict:
            return self
        return NodeTable(self.blocks, as_dict(self.where))


register_record(NodeTable, dynamic=("blocks",), static=("where",))


class TableEdit:
    """A :class:`NodeTable` being edited: the old table (or None) and the entries set so far
    (node -> ``(block handle, row)`` / ``(trace, -1)``)."""

    __slots__ = ("old", "_new", "pending", "gone", "added")

    def __init__(self, old: NodeTable | None) -> None:
        self.old = old
        self._new: dict[int, Entry] = {}
        self.pending: list[tuple[_Block, Sequence[int]]] = []  # blocks not yet in ``new``
        self.gone: set[int] = set()
        self.added: list[tuple[Any, Any]] = []  # (handle, its nodes or node), in order

    @property
    def new(self) -> dict[int, Entry]:
        """Node -> entry of the nodes set so far (blocks entered node by node when first
        asked for: a tree grown afresh may never ask)."""
        if self.pending:
            for h, nodes in self.pending:
                self._new.update(zip(nodes, zip(repeat(h), range(len(nodes)))))
            self.pending.clear()
        return self._new

    def block_of(self, nodes: Sequence[int]) -> _Block | None:
        """The block added with :meth:`put_block` whose rows are the nodes ``nodes`` (that
        very sequence object), if it is still theirs; else None."""
        for h, ns in reversed(self.added):
            if ns is nodes:
                return h if isinstance(h, _Block) and not self.gone else None
        return None

    def __getitem__(self, i: int) -> Entry:
        e = self._new.get(i)
        if e is not None:
            return e
        for h, nodes in reversed(self.pending):  # (newest first: a parent asks for its kids)
            if type(nodes) is range:
                if i in nodes:
                    return h, nodes.index(i)
                continue
            try:
                return h, nodes.index(i)  # type: ignore[attr-defined]
            except ValueError:
                continue
        if self.old is None or i in self.gone:
            raise KeyError(i)
        return self.old.entry(i)

    def entries_of(self, nodes: Iterable[int]) -> list[Entry]:
        """The entries of ``nodes``."""
        try:
            return list(map(self.new.__getitem__, nodes))  # (the common case, in C)
        except KeyError:
            return [self[i] for i in nodes]

    def __setitem__(self, i: int, e: Entry) -> None:
        if any(i in nodes for _, nodes in self.pending):
            self.new[i] = e  # (the block's entry first, then this one over it)
        else:
            self._new[i] = e
        self.gone.discard(i)
        self.added.append((e[0], i))

    def put_block(self, stacked: Trace, nodes: Sequence[int]) -> None:
        """A new stacked block: node ``nodes[j]`` is its row ``j``."""
        h = _Block(stacked)
        if self.old is None:
            self.pending.append((h, nodes))
        else:
            self.new.update(zip(nodes, zip(repeat(h), range(len(nodes)))))
            if self.gone:
                self.gone.difference_update(nodes)
        self.added.append((h, nodes))

    def __delitem__(self, i: int) -> None:
        self.new.pop(i, None)
        self.gone.add(i)

    def __contains__(self, i: object) -> bool:
        if i in self.new:
            return True
        return self.old is not None and i in self.old.where and i not in self.gone

    def finish(self) -> NodeTable:
        """The edited table (keys in increasing order)."""
        old = self.old
        if old is None:  # every node new: the blocks in the order they came
            added = list(self.added)
            handles = tuple(h for h, _ in added)
            blocks = tuple(h.trace if isinstance(h, _Block) else h for h in handles)
            order = [nodes for _, nodes in added]  # (the index keeps no trace alive)
            return NodeTable(blocks, LazyMap(lambda: _index_of(order)), handles=handles)
        if not self.new and not self.gone:
            return old
        if self.gone or not self.new.keys() <= old.where.keys():
            merged = {i: old.entry(i) for i in old.where if i not in self.gone}
            merged.update(self.new)
            return NodeTable.build(merged, sort=True)
        return old.replaced(self.new)


def _index_of(order: list[Any]) -> dict[int, tuple[int, int]]:
    """node -> (block, row) of blocks whose nodes come in this order (a lone trace's entry
    is its node), keys in increasing order."""
    where: dict[int, tuple[int, int]] = {}
    for b, nodes in enumerate(order):
        if isinstance(nodes, int):
            where[nodes] = (b, -1)
        else:
            where.update(zip(nodes, zip(repeat(b), range(len(nodes)))))
    return sorted_dict(where)


def sorted_dict(d: dict[int, Any]) -> dict[int, Any]:
    """``d`` with its keys in increasing order (C loops)."""
    keys = sorted(d)
    return dict(zip(keys, map(d.__getitem__, keys)))


def as_table(x: Any) -> NodeTable:
    """A NodeTable from a table or a plain dict of node -> trace (a loaded trace)."""
    if isinstance(x, NodeTable):
        return x
    return NodeTable.build({i: (t, -1) for i, t in dict(x).items()}, sort=True)


@attrs.frozen(repr=False)
class RecurseTrace(Trace):
    """The trace of a :class:`Recurse`: one production and one aggregation trace per node.

    ``productions`` and ``aggregations`` map node index -> kernel trace (:class:`NodeTable`,
    keys in increasing index order, which is breadth-first order); ``num_children`` maps node
    index -> the number of children.  The node indices and the children counts are the static
    structure of the pytree; the kernel traces are its dynamic part.
    """

    gen_fn: Any
    args: tuple[Any, ...]
    retval: Any
    score: torch.Tensor
    productions: NodeTable = attrs.field(converter=as_table)
    aggregations: NodeTable = attrs.field(converter=as_table)
    num_children: Mapping[int, int]  # a dict, or a LazyMap for a tree grown afresh
    _layout: Any = attrs.field(default=None, eq=False, repr=False)
    _choices: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def choices(self) -> ChoiceMap:
        cached = self._choices
        if cached is None:
            cached = ChoiceMap.node({i: node_choices(self.productions[i], self.aggregations[i])
                                     for i in self.productions})
            object.__setattr__(self, "_choices", cached)
        return cached

    def discrete_addresses(self) -> Iterator[tuple[Any, ...]]:
        """Every node's production and aggregation discrete addresses under the node."""
        for part, subs in (("production", self.productions),
                           ("aggregation", self.aggregations)):
            for idx, sub in subs.items():
                for pattern in sub.discrete_addresses():
                    yield (idx, part) + pattern

    def _after_unflatten(self) -> None:
        object.__setattr__(self, "_choices", None)

    @property
    def nodes(self) -> tuple[int, ...]:
        """The node indices, in increasing (breadth-first) order."""
        return tuple(self.productions)

    def production_trace(self, idx: int) -> Trace:
        """The production kernel's trace at node ``idx``."""
        return self._node(self.productions, idx)

    def aggregation_trace(self, idx: int) -> Trace:
        """The aggregation kernel's trace at node ``idx``."""
        return self._node(self.aggregations, idx)

    def children_of(self, idx: int) -> tuple[int, ...]:
        """The indices of node ``idx``'s children."""
        self._node(self.productions, idx)
        b = self.gen_fn.max_branch
        return tuple(idx * b + k + 1 for k in range(self.num_children[idx]))

    def result_of(self, idx: int) -> Any:
        """Node ``idx``'s aggregation result."""
        return self._node(self.aggregations, idx).retval

    @staticmethod
    def _node(table: NodeTable, idx: int) -> Trace:
        if idx not in table:
            raise AddressError("Recurse trace has no node {addr}", (idx,))
        return table[idx]

    def _retval_at(self, path: tuple[Any, ...]) -> Any:
        """``get_retval(idx)``: node ``idx``'s aggregation result; ``(idx, "production")`` /
        ``(idx, "aggregation")`` (and deeper): the kernel call there."""
        idx, rest = path[0], path[1:]
        if not rest:
            return self.result_of(idx)
        table = {"production": self.productions, "aggregation": self.aggregations}.get(rest[0])
        if table is None:
            raise AddressError("no traced call at address {addr} (a Recurse node has "
                               "'production' and 'aggregation')", path)
        node = self._node(table, idx)
        try:
            return node.get_retval(rest[1:])
        except AddressError as err:
            raise err.prefixed((idx, rest[0])) from None


def _persist_trace(tr: RecurseTrace) -> RecurseTrace:
    """Saved with plain dicts as its node index (gfcomb.persistence)."""
    if type(tr.num_children) is dict:
        return tr
    return attrs.evolve(tr, num_children=as_dict(tr.num_children), layout=None, choices=None)


RecurseTrace.__gf_persist__ = _persist_trace  # type: ignore[attr-defined]

register_record(RecurseTrace, dynamic=("args", "retval", "score", "productions", "aggregations"),
                static=("gen_fn", "num_children"))


def node_choices(prod: Trace, agg: Trace) -> ChoiceMap:
    """A node's choices: ``{"production": ..., "aggregation": ...}``."""
    return ChoiceMap.node({"production": prod.choices, "aggregation": agg.choices})


def first_address(cm: ChoiceMap) -> tuple[Any, ...]:
    """The address of some choice in ``cm`` (for error messages)."""
    if cm.is_empty() or cm.is_value():
        return ()
    first = next(iter(cm.items(stacked=True)), ((), None))[0]
    return tuple(":" if isinstance(k, slice) else k for k in first)


def same_value(new: Any, old: Any) -> bool:
    """Conservatively: is ``new`` the same value as ``old``?  Identity for tensors and other
    objects, equality for plain Python values, elementwise for tuples/lists/dicts."""
    if new is old:
        return True
    if isinstance(new, _PLAIN) and isinstance(old, _PLAIN):
        return type(new) is type(old) and new == old
    if isinstance(new, (tuple, list)) and type(new) is type(old):
        return len(new) == len(old) and all(same_value(a, b) for a, b in zip(new, old))
    if isinstance(new, dict) and isinstance(old, dict):
        return new.keys() == old.keys() and all(same_value(new[k], old[k]) for k in new)
    return False
