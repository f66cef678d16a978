"""Running a Recurse kernel over the nodes of one depth at once.

The nodes of one depth that get the same kind of kernel call (simulate, generate, update,
regenerate) with inputs of one structure are a batch of rows: their inputs are stacked (one
leading row axis) and the kernel runs once, through its batch methods
(:meth:`~gfcomb.core.gfi.GenerativeFunction.batch_generate`, ``batch_update``,
``batch_regenerate``; for ``simulate`` the per-row method under :func:`map_rows`).  Its
stacked trace becomes one block of a :class:`~gfcomb.combinators.recurse.trace.NodeTable`.

:class:`Rows` is such a group: node indices and their inputs, stacked (children of a batched
production come out stacked: child slot ``k`` of every parent is one column) or the one
node's own input.  :func:`merge` joins the groups of a depth that can share a call;
:func:`gather` reads a per-node quantity (an argument, a result) of many nodes out of a table
as one stacked value, slicing a block rather than stacking rows where it can.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from operator import itemgetter
from typing import Any

import torch

from gfcomb.combinators.recurse.trace import Entry
from gfcomb.core.diff import Diff
from gfcomb.core.flat import flatten as fast_flatten
from gfcomb.core.flat import unflatten as fast_unflatten
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.core.pytree import tree_index, tree_stack
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import PerRow, unwrap_rows, vmap_rows


class Rows:
    """Nodes of one depth that may go to the kernel together.

    ``nodes``: their indices; ``x``: their inputs, stacked along a leading row axis when
    ``stacked``, else the one node's input; ``diff``: the input's diff (None for nodes new to
    the tree, ``fresh``); ``key``: what else a call must share (the edit's key).
    """

    __slots__ = ("nodes", "x", "stacked", "diff", "fresh", "key")

    def __init__(self, nodes: Sequence[int], x: Any, stacked: bool, diff: Diff | None,
                 fresh: bool, key: Hashable = None) -> None:
        self.nodes = nodes
        self.x = x
        self.stacked = stacked
        self.diff = diff
        self.fresh = fresh
        self.key = key

    def input(self, j: int) -> Any:
        """Node ``nodes[j]``'s own input."""
        return tree_index(self.x, j) if self.stacked else self.x

    def take(self, positions: list[int]) -> Rows:
        """The rows at ``positions`` (in that order), same diff and key."""
        nodes = [self.nodes[j] for j in positions]
        if len(positions) == 1:
            return Rows(nodes, self.input(positions[0]), False, self.diff, self.fresh, self.key)
        if positions == list(range(len(self.nodes))):
            return self
        idx = torch.tensor(positions)
        return Rows(nodes, tree_index(self.x, idx), True, self.diff, self.fresh, self.key)

    def singles(self) -> list[Rows]:
        """One group per node."""
        if not self.stacked:
            return [self]
        return [self.take([j]) for j in range(len(self.nodes))]


def _signature(x: Any, stacked: bool) -> tuple[tuple[Any, Any], list[torch.Tensor]] | None:
    """(a hashable structure key, the tensor leaves) of the inputs: rows share a call only
    with rows of the same pytree structure, Python leaves and tensor shapes and dtypes."""
    leaves: list[torch.Tensor] = []
    spec = fast_flatten(x, leaves)
    if not leaves:
        return None  # nothing to stack: every row would be the same call
    shapes = tuple((t.shape[1:] if stacked else t.shape, t.dtype) for t in leaves)
    try:
        key = (spec, shapes)
        hash(key)
    except TypeError:
        return None
    return key, leaves


def merge(groups: Sequence[Rows]) -> list[Rows]:
    """Join the groups that can share one kernel call (same kind, diff, edit key and input
    structure); inputs are concatenated along the row axis."""
    out: list[Rows] = []
    joined: dict[Any, list[tuple[Rows, list[torch.Tensor]]]] = {}
    specs: dict[Any, Any] = {}
    for g in groups:
        sig = _signature(g.x, g.stacked)
        if sig is None:
            out.extend(g.singles())
            continue
        key = (g.fresh, type(g.diff), g.key, sig[0])
        joined.setdefault(key, []).append((g, sig[1]))
        specs[key] = sig[0][0]
    for key, members in joined.items():
        if len(members) == 1:
            out.append(members[0][0])
            continue
        nodes = [i for g, _ in members for i in g.nodes]
        columns = [[t if g.stacked else t.unsqueeze(0) for t in leaves]
                   for g, leaves in members]
        cat = [torch.cat([c[j] for c in columns]) for j in range(len(columns[0]))]
        first = members[0][0]
        out.append(Rows(nodes, fast_unflatten(specs[key], iter(cat)), True, first.diff,
                        first.fresh, first.key))
    return out


def children_rows(nodes: Sequence[int], children: tuple[Any, ...], b: int) -> list[Rows]:
    """The children of a batch of new nodes ``nodes`` (``children[k]``: every parent's child
    ``k``, stacked): one group of them all, in increasing index order (child ``k`` of the
    parent in row ``j`` is row ``j * n + k``), when the ``n`` child slots have one input
    structure; else one group per slot."""
    n = len(children)
    if n == 0:
        return []
    flat = []
    for c in children:
        leaves: list[torch.Tensor] = []
        flat.append((fast_flatten(c, leaves), leaves))
    spec, first = flat[0]
    if n == 1 or not first or any(
            s != spec or len(ls) != len(first)
            or any(a.shape != f.shape or a.dtype != f.dtype for a, f in zip(ls, first))
            for s, ls in flat[1:]):
        return [Rows([p * b + k + 1 for p in nodes], c, True, None, True)
                for k, c in enumerate(children)]
    nodes = as_range(nodes)
    if type(nodes) is range and nodes.step == 1 and n == b:
        kids: Sequence[int] = range(nodes.start * b + 1, nodes.stop * b + 1)
    else:
        kids = [p * b + k + 1 for p in nodes for k in range(n)]
    leaves = [torch.stack(col, 1).flatten(0, 1) for col in zip(*[ls for _, ls in flat])]
    return [Rows(kids, fast_unflatten(spec, iter(leaves)), True, None, True)]


def as_range(nodes: Sequence[int]) -> Sequence[int]:
    """``nodes`` as a ``range`` when they are consecutive increasing indices (the nodes of
    a full depth), else as they are."""
    if type(nodes) is list and nodes:
        first, last = nodes[0], nodes[-1]
        if last - first + 1 == len(nodes) and nodes == list(range(first, last + 1)):
            return range(first, last + 1)
    return nodes


def gather(es: Sequence[Entry], get: Callable[[Any], Any]) -> Any:
    """``get`` of the kernel traces at the entries ``es``, stacked along a leading row axis:
    a slice (or an index) of one block where they are rows of it, else the rows stacked
    (ValueError when they do not stack)."""
    h = es[0][0]
    rows = list(map(itemgetter(1), es))
    if rows[0] >= 0 and len(set(map(id, map(itemgetter(0), es)))) == 1:
        value = get(h.trace)
        r0 = rows[0]
        if rows == list(range(r0, r0 + len(rows))):
            if r0 == 0 and len(rows) == h.trace.score.shape[0]:
                return value
            return tree_index(value, slice(r0, r0 + len(rows)))
        return tree_index(value, torch.tensor(rows))
    return tree_stack([get(e[0].row(e[1]) if e[1] >= 0 else e[0]) for e in es])


# ------------------------------------------------------------------ batched kernel calls
def rows_simulate(kernel: GenerativeFunction, n: int, args: tuple[Any, ...], who: str) -> Trace:
    """``simulate`` of ``n`` rows (PerRow arguments per row): the kernel's batch method when
    it runs over the whole batch, else the per-row method under one vmap over the rows (the
    caller falls back node by node on any error, so there is no error naming to add here)."""
    if not kernel.batch_runs_whole(args):
        values, dims = [], []
        for a in args:
            v, rowwise = unwrap_rows(a)
            values.append(v)
            dims.append(0 if rowwise else None)
        return vmap_rows(lambda *a: kernel.simulate(a), tuple(dims), values, n)
    return kernel.batch_generate(n, args, None)[0]


def rows_generate(kernel: GenerativeFunction, n: int, args: tuple[Any, ...], cm: Any,
                  ) -> tuple[Trace, torch.Tensor]:
    """``generate`` of ``n`` rows (PerRow constraints)."""
    return kernel.batch_generate(n, args, cm)


def rows_update(kernel: GenerativeFunction, olds: Trace, args: tuple[Any, ...],
                diffs: tuple[Diff, ...], cm: Any) -> tuple[Trace, torch.Tensor, Diff, Any]:
    """``update`` of every row of ``olds``."""
    return kernel.batch_update(olds, args, diffs, cm)


def rows_regenerate(kernel: GenerativeFunction, olds: Trace, args: tuple[Any, ...],
                    diffs: tuple[Diff, ...], sel: Any) -> tuple[Trace, torch.Tensor, Diff]:
    """``regenerate`` of every row of ``olds`` with one selection."""
    return kernel.batch_regenerate(olds, args, diffs, sel)


def per_row(x: Any) -> Any:
    """``x`` marked as one value per row (when it holds a tensor)."""
    if isinstance(x, torch.Tensor):
        return PerRow(x)
    leaves: list[torch.Tensor] = []
    fast_flatten(x, leaves)
    return PerRow(x) if leaves else x
