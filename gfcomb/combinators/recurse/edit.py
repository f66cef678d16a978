"""The Recurse edit engine: one pass, top-down over the productions and bottom-up over the
aggregations, applying an *edit* (:mod:`gfcomb.combinators.recurse.edits`) at the nodes.

:class:`EditPass` decides which nodes a call must revisit (their input changed, they are
edited, or a child's result changed), grows new subtrees and removes dropped ones; the edit
says how one kernel call (or one batch of them) is made and what it adds to the weight.  The
nodes of one depth that take the same kind of call run as one batch
(:mod:`gfcomb.combinators.recurse.batch`), falling back to one call per node for the rest of
the pass when the kernel cannot run under vmap.  With the root input unchanged, only the
edited nodes (found at their depths) and the parents of results that changed are visited.
A tree grown afresh is indexed node by node only when first asked for (its node tables and
children counts are :class:`~gfcomb.combinators.recurse.trace.LazyMap` s).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any

import torch

from gfcomb.combinators.recurse.batch import Rows, children_rows, gather, merge, per_row
from gfcomb.combinators.recurse.edits import Edit, Resample
from gfcomb.combinators.recurse.trace import (
    Entry,
    LazyMap,
    NodeTable,
    Production,
    TableEdit,
    as_dict,
    same_value,
    sorted_dict,
)
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange
from gfcomb.core.errors import ArgumentError
from gfcomb.core.pytree import tree_index
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import PerRow, vectorizing

if TYPE_CHECKING:
    from gfcomb.combinators.recurse.combinator import Recurse
    from gfcomb.combinators.recurse.trace import RecurseTrace

NO_CHANGE = NoChange()
UNKNOWN = UnknownChange()
Done = tuple[Sequence[int], bool, Diff, "int | None"]




def _entry_trace(e: Entry) -> Trace:
    return e[0].row(e[1]) if e[1] >= 0 else e[0]


def _counts_of(counts: dict[int, int], batches: list[tuple[Sequence[int], int]],
               ) -> dict[int, int]:
    """``counts`` with every node of the ``batches`` (nodes, children count) entered."""
    for nodes, n in batches:
        counts.update(zip(nodes, repeat(n)))
    return counts


def entry_retval(e: Entry) -> Any:
    """The return value at entry ``e``: a row of a stacked block's return value is read
    from it (its row trace is not built for that)."""
    if e[1] < 0:
        return e[0].retval
    tr = e[0].rows.get(e[1])
    return tr.retval if tr is not None else tree_index(e[0].trace.retval, e[1])


class EditPass:
    """One edit of a Recurse tree (``old`` None: a tree grown afresh).

    Productions top-down, depth by depth; then the aggregations of the nodes visited,
    bottom-up.  Works on copies of the node tables of ``old``.
    """

    def __init__(self, gf: Recurse, edit: Edit, old: RecurseTrace | None) -> None:
        self.gf = gf
        self.edit = edit
        self.old = old
        self.prods = TableEdit(None if old is None else old.productions)
        self.aggs = TableEdit(None if old is None else old.aggregations)
        self.old_nch: dict[int, int] = {} if old is None else as_dict(old.num_children)
        self.nch: dict[int, int] = self.old_nch  # (copied on the first change: counts())
        self.nch_pending: list[tuple[Sequence[int], int]] = []  # (fresh batches, see count)
        # weight and score change, summed once at the end (one op, not two per call)
        self.w_plus: list[torch.Tensor] = []
        self.w_minus: list[torch.Tensor] = []
        self.s_plus: list[torch.Tensor] = []
        self.s_minus: list[torch.Tensor] = []
        self.discard: dict[int, dict[str, ChoiceMap]] = {}
        on = gf.batch_depths and vectorizing()
        self.batching = {"production": on, "aggregation": on}
        # per depth, the nodes visited: (nodes, fresh, their production's retdiff, their
        # children count if they are one batch, else None)
        self.levels: list[list[Done]] = []
        self.retdiffs: dict[int, Diff] = {}
        self.grown = False
        self.kids: dict[int, Sequence[int]] = {}  # id(production block) -> its children
        # whether ancestors hand their must-visit children down (else: _with_edited)
        self.pass_must = True
        self.must: set[int] = set()
        self.changed: list[int] = []  # nodes of the depth done whose result changed

    def who(self, part: str) -> str:
        """Names a kernel in errors."""
        return self.gf.kernel_name(part)

    def count(self, i: int) -> int:
        """Node ``i``'s number of children (batches of new nodes are entered node by node
        only when a single node's count is asked for)."""
        n = self.nch.get(i)
        if n is None:
            self._flush_counts()
            n = self.nch[i]
        return n

    def counts(self) -> dict[int, int]:
        """The children counts, to be changed (the old trace's dict is copied first)."""
        if self.nch is self.old_nch and self.old is not None:
            self.nch = dict(self.old_nch)
        return self.nch

    def _flush_counts(self) -> dict[int, int]:
        _counts_of(self.nch, self.nch_pending)
        self.nch_pending.clear()
        return self.nch

    # ------------------------------------------------------------------ bookkeeping
    def _add(self, w: Any, new: torch.Tensor, old: torch.Tensor | None = None) -> None:
        """Count a call's weight(s) ``w`` (None: nothing) and score(s) ``new`` in place of
        ``old`` (per node or per row of a batch)."""
        if w is not None:
            self.w_plus.append(w)
        self.s_plus.append(new)
        if old is not None:
            self.s_minus.append(old)

    @staticmethod
    def _sum(parts: list[torch.Tensor]) -> torch.Tensor | None:
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0].sum() if parts[0].dim() else parts[0]
        if len(parts) <= 8 and not any(p.dim() for p in parts):  # a few nodes: just add
            total = parts[0]
            for p in parts[1:]:
                total = total + p
            return total
        return torch.cat([p if p.dim() == 1 else p.reshape(-1) for p in parts]).sum()

    def _total(self, plus: list[torch.Tensor], minus: list[torch.Tensor],
               ) -> torch.Tensor | None:
        a, b = self._sum(plus), self._sum(minus)
        if a is None:
            return None if b is None else -b
        return a if b is None else a - b

    def weight(self) -> torch.Tensor | None:
        """The edit's weight (None: no call contributed one)."""
        return self._total(self.w_plus, self.w_minus)

    def dscore(self) -> torch.Tensor | None:
        """The change of the score (the score itself for a tree grown afresh)."""
        return self._total(self.s_plus, self.s_minus)

    def _note_discard(self, idx: int, part: str, cm: Any) -> None:
        if cm is not None and not cm.is_empty():
            self.discard.setdefault(idx, {})[part] = cm

    def _remove(self, root: int) -> None:
        old = self.old
        assert old is not None
        for j in self.gf.subtree(self.old_nch, root):
            p, a = old.productions[j], old.aggregations[j]
            self.s_minus += (p.score, a.score)
            if self.edit.counts_removed:
                self.w_minus += (p.score, a.score)
                self._note_discard(j, "production", p.choices)
                self._note_discard(j, "aggregation", a.choices)
            del self.prods[j], self.aggs[j], self.counts()[j]

    def _call(self, idx: int, part: str, fn: Any, *args: Any) -> Any:
        return self.gf.node_call(idx, part, fn, *args)

    # ------------------------------------------------------------------ the pass
    def run(self, root_input: Any, root_diff: Diff) -> tuple[torch.Tensor | None, Diff]:
        """Edit the tree; returns (weight or None, the root aggregation's retdiff)."""
        old = self.old
        self.pass_must = old is None or not isinstance(root_diff, NoChange)
        level = [Rows(range(1), root_input, False, root_diff, old is None)]
        # the root input unchanged: only the edited nodes and what their calls change are
        # visited (at their depths, found directly), not the ancestors that make no call
        prod_edits: list[list[int]] = []
        agg_edits: list[list[int]] = []
        if old is not None and not self.pass_must:
            prod_edits = self._by_depth(self.edit.edited(old, "production"))
            agg_edits = self._by_depth(self.edit.edited(old, "aggregation"))
        else:
            self.must = self.edit.must(self.gf, old) if old is not None else set()
        depth = 0
        while level or depth < len(prod_edits):
            if depth < len(prod_edits) and prod_edits[depth]:
                level = self._with_edited(level, prod_edits[depth])
            depth += 1
            done: list[Done] = []
            self.levels.append(done)
            if not level:
                continue
            level = self._prepare(level, "production")
            nxt: list[Rows] = []
            for rows in level:
                if rows.stacked and not self._productions_batched(rows, done, nxt):
                    for one in rows.singles():
                        self._production(one, done, nxt)
                elif not rows.stacked:
                    self._production(rows, done, nxt)
            level = nxt
        while len(self.levels) < len(agg_edits):
            self.levels.append([])
        for d in range(len(self.levels) - 1, -1, -1):
            extra = agg_edits[d] if d < len(agg_edits) else []
            if self.changed:  # (their parents must look at the new results)
                gf = self.gf
                extra = extra + sorted({gf.parent_index(i) for i in self.changed if i})
                self.changed = []
            if extra or self.levels[d]:
                self._aggregations(self.levels[d], extra)
        return self.weight(), self.retdiffs.get(0, NO_CHANGE)

    def _prepare(self, level: list[Rows], part: str) -> list[Rows]:
        """The depth's groups split by edit key and joined where they can share a call."""
        if len(level) == 1 and not level[0].stacked:
            return level  # (one node: nothing to join it with)
        if not self.batching[part]:
            return [one for rows in level for one in rows.singles()]
        edit = self.edit
        keyed: list[Rows] = []
        for rows in level:
            if (rows.fresh and isinstance(edit, Resample)) or not edit.touches(rows.nodes):
                rows.key = ()
                keyed.append(rows)
                continue
            by_key: dict[Hashable, list[int]] = {}
            for j, i in enumerate(rows.nodes):
                by_key.setdefault(edit.key(edit.at(i, part)), []).append(j)  # type: ignore[arg-type]
            for key, positions in by_key.items():
                sub = rows.take(positions)
                sub.key = key
                keyed.append(sub)
        return keyed if len(keyed) == 1 else merge(keyed)

    # ------------------------------------------------------------------ productions
    def _by_depth(self, nodes: list[int]) -> list[list[int]]:
        """``nodes`` by depth (increasing order within a depth)."""
        if not nodes:
            return []
        b = self.gf.max_branch
        out: list[list[int]] = []
        for i in sorted(nodes):
            d, j = 0, i
            while j:
                j = (j - 1) // b
                d += 1
            while len(out) <= d:
                out.append([])
            out[d].append(i)
        return out

    def _with_edited(self, level: list[Rows], edited: list[int]) -> list[Rows]:
        """The depth's groups and the depth's nodes with a production edit that no group
        holds (with their old input, unchanged)."""
        if not edited:
            return level
        held = {i for rows in level for i in rows.nodes} if level else ()
        old = self.old
        assert old is not None
        extra = [Rows([i], old.productions[i].args[0], False, NO_CHANGE, False)
                 for i in edited if i not in held and i in self.prods]
        return level + extra if extra else level

    def _production_of(self, idx: int, retval: Any) -> Production:
        return self.gf.production_of(idx, retval)

    def _production(self, rows: Rows, done: list[Any], nxt: list[Rows]) -> None:
        """One node's production call (or none, when nothing about it changed)."""
        gf, edit = self.gf, self.edit
        idx, x = rows.nodes[0], rows.x
        sub = edit.at(idx, "production")
        if rows.fresh:
            tr, w = self._call(idx, "production", edit.fresh, gf.production, (x,), sub)
            prod = self._production_of(idx, tr.retval)
            self.prods[idx] = (tr, -1)
            self.counts()[idx] = len(prod.children)
            self._add(w, tr.score)
            done.append(([idx], True, UNKNOWN, None))
            nxt.extend(Rows([gf.child_index(idx, k)], c, False, None, True)
                       for k, c in enumerate(prod.children))
            return
        old = self.old
        assert old is not None and rows.diff is not None
        old_tr = old.productions[idx]
        if isinstance(rows.diff, NoChange) and edit.empty(sub):  # type: ignore[arg-type]
            # an ancestor of an edited node: no call, only the edited children go on
            first = idx * gf.max_branch + 1
            for k, c in enumerate(old_tr.retval.children):
                if self.pass_must and first + k in self.must:
                    nxt.append(Rows([first + k], c, False, NO_CHANGE, False))
            done.append(([idx], False, NO_CHANGE, None))
            return
        tr, w, pdiff, d = self._call(idx, "production", edit.revisit, gf.production, old_tr,
                                     (x,), (rows.diff,), sub)
        self._note_discard(idx, "production", d)
        self._add(w, tr.score, old_tr.score)
        self.prods[idx] = (tr, -1)
        prod = self._production_of(idx, tr.retval)
        old_prod: Production = old_tr.retval
        n, n_old = len(prod.children), len(old_prod.children)
        if self.nch.get(idx) != n:
            self.counts()[idx] = n
        done.append(([idx], False, pdiff, None))
        for k in range(min(n, n_old)):
            c, c_old = prod.children[k], old_prod.children[k]
            ci = gf.child_index(idx, k)
            if isinstance(pdiff, NoChange) or same_value(c, c_old):
                if self.pass_must and ci in self.must:
                    nxt.append(Rows([ci], c_old, False, NO_CHANGE, False))
            else:
                nxt.append(Rows([ci], c, False, UNKNOWN, False))
        nxt.extend(Rows([gf.child_index(idx, k)], prod.children[k], False, None, True)
                   for k in range(n_old, n))
        self._resize(idx, n, n_old)

    def _resize(self, idx: int, n: int, n_old: int) -> None:
        """Node ``idx`` went from ``n_old`` to ``n`` children: drop the subtrees past ``n``."""
        for k in range(n, n_old):
            self._remove(self.gf.child_index(idx, k))
        if n > n_old:
            self.grown = True

    def _productions_batched(self, rows: Rows, done: list[Any], nxt: list[Rows]) -> bool:
        """One batched production call over ``rows``; False (batching off from now on) when
        the production cannot run over a batch."""
        gf, edit, nodes = self.gf, self.edit, rows.nodes
        b = gf.max_branch
        subs = self._subs(nodes, "production")
        n_rows = len(nodes)
        olds = None
        try:
            if rows.fresh:
                tr, w = edit.fresh_rows(gf.production, n_rows, (PerRow(rows.x),), subs,
                                        self.who("production"))  # type: ignore[arg-type]
                rd: Diff = UNKNOWN
                d = None
            else:
                assert self.old is not None and rows.diff is not None
                olds = gather(self.old.productions.entries_of(nodes), lambda t: t)
                tr, w, rd, d = edit.revisit_rows(gf.production, olds, (PerRow(rows.x),),
                                                 (rows.diff,), subs)  # type: ignore[arg-type]
            prod = tr.retval
            if not isinstance(prod, Production) or len(prod.children) > gf.max_branch:
                raise ArgumentError("checked again node by node")
        except Exception:  # noqa: BLE001 - not vmappable; a genuine error recurs per node
            self.batching["production"] = False
            return False
        n = len(prod.children)
        self.prods.put_block(tr, nodes)
        if self.old is None:
            self.nch_pending.append((nodes, n))
        else:
            self.counts().update(zip(nodes, repeat(n)))
        self._add(w, tr.score, None if olds is None else olds.score)
        done.append((nodes, rows.fresh, rd, n))
        if d is not None and not d.is_empty():
            for j, i in enumerate(nodes):
                self._note_discard(i, "production", tree_index(d, j))
        if rows.fresh:
            groups = children_rows(nodes, prod.children, b)
            if len(groups) == 1:  # (the aggregations read the children's results from it)
                self.kids[id(self.prods.added[-1][0])] = groups[0].nodes
            nxt.extend(groups)
            return True
        old = self.old
        assert old is not None
        n_old = [self.old_nch[p] for p in nodes]
        for k in range(n):
            kids = Rows([p * b + k + 1 for p in nodes], prod.children[k], True, UNKNOWN,
                        False)
            kept = [j for j in range(n_rows) if n_old[j] > k]
            if isinstance(rd, NoChange):
                for j in kept:  # same inputs as before: only edited subtrees are visited
                    ci = kids.nodes[j]
                    if self.pass_must and ci in self.must:
                        c_old = old.productions[nodes[j]].retval.children[k]
                        nxt.append(Rows([ci], c_old, False, NO_CHANGE, False))
            elif kept:
                nxt.append(kids.take(kept))
            new = [j for j in range(n_rows) if n_old[j] <= k]
            if new:
                grown = kids.take(new)
                nxt.append(Rows(grown.nodes, grown.x, grown.stacked, None, True))
        for j, p in enumerate(nodes):
            self._resize(p, n, n_old[j])
        return True

    # ------------------------------------------------------------------ aggregations
    def _subs(self, nodes: Sequence[int], part: str) -> list[Any]:
        edit = self.edit
        if not edit.touches(nodes):
            return [edit.nothing] * len(nodes)
        return [edit.at(i, part) for i in nodes]

    def _aggregations(self, done: list[Done], extra: Sequence[int] = ()) -> None:
        """The aggregations of one depth's visited nodes and of the ``extra`` nodes (with an
        aggregation edit, or a child whose result changed), batched by kind of call."""
        gf, edit, old = self.gf, self.edit, self.old
        if extra:
            seen = {i for nodes, *_ in done for i in nodes}
            done = done + [([i], False, NO_CHANGE, None) for i in dict.fromkeys(extra)
                           if i not in seen and i in self.prods]
        batching = self.batching["aggregation"]
        # key -> the node sequences of the group (a batch's own sequence kept as it is)
        groups: dict[tuple[tuple[bool, bool, bool], int, Any], list[Sequence[int]]] = {}
        fresh_plan = (True, False, False)
        for nodes, fresh, pdiff, n_batch in done:
            touched = edit.touches(nodes)
            if fresh and batching and not touched:  # a batch of new nodes: all alike
                n = self.count(nodes[0]) if n_batch is None else n_batch
                groups.setdefault((fresh_plan, n, ()), []).append(nodes)
                continue
            for idx in nodes:
                n = self.count(idx)
                sub = edit.at(idx, "aggregation") if touched else edit.nothing
                if fresh:
                    plan = fresh_plan
                else:
                    assert old is not None
                    same_res = n == self.old_nch[idx] and all(
                        isinstance(self.retdiffs.get(c, NO_CHANGE), NoChange)
                        for c in gf.children_range(idx, n))
                    same_val = isinstance(pdiff, NoChange)
                    if not same_val:
                        e = self.prods[idx]  # (a lone trace's value may be the same object)
                        same_val = e[1] < 0 and same_value(e[0].retval.value,
                                                           old.productions[idx].retval.value)
                    if same_val and same_res and edit.empty(sub):  # type: ignore[arg-type]
                        continue
                    plan = (False, same_val, same_res)
                key = (plan, n, edit.key(sub) if batching else idx)  # type: ignore[arg-type]
                groups.setdefault(key, []).append([idx])
        for (plan, n, _), seqs in groups.items():
            nodes = seqs[0] if len(seqs) == 1 else [i for s in seqs for i in s]
            if len(nodes) > 1 and self.batching["aggregation"]:
                if self._aggregations_batched(nodes, n, plan):
                    continue
            for idx in nodes:
                self._aggregation(idx, plan)

    def _agg_args(self, idx: int, plan: tuple[bool, bool, bool]) -> tuple[Any, Any]:
        fresh, same_val, same_res = plan
        old_agg = None if fresh or self.old is None else self.old.aggregations[idx]
        kids = self.gf.children_range(idx, self.count(idx))
        value = (old_agg.args[0] if same_val and old_agg is not None
                 else _entry_trace(self.prods[idx]).retval.value)
        results = (old_agg.args[1] if same_res and old_agg is not None
                   else tuple(entry_retval(self.aggs[c]) for c in kids))
        return value, results

    def _aggregation(self, idx: int, plan: tuple[bool, bool, bool]) -> None:
        gf, edit = self.gf, self.edit
        value, results = self._agg_args(idx, plan)
        sub = edit.at(idx, "aggregation")
        if plan[0]:
            tr, w = self._call(idx, "aggregation", edit.fresh, gf.aggregation, (value, results),
                               sub)
            self._add(w, tr.score)
            rd: Diff = UNKNOWN
        else:
            assert self.old is not None
            old_tr = self.old.aggregations[idx]
            diffs = (NO_CHANGE if plan[1] else UNKNOWN, NO_CHANGE if plan[2] else UNKNOWN)
            tr, w, rd, d = self._call(idx, "aggregation", edit.revisit, gf.aggregation, old_tr,
                                      (value, results), diffs, sub)
            self._note_discard(idx, "aggregation", d)
            self._add(w, tr.score, old_tr.score)
        self.aggs[idx] = (tr, -1)
        self.retdiffs[idx] = rd
        if not (self.pass_must or isinstance(rd, NoChange)):
            self.changed.append(idx)

    def _aggregations_batched(self, nodes: Sequence[int], n: int,
                              plan: tuple[bool, bool, bool]) -> bool:
        gf, edit = self.gf, self.edit
        fresh, same_val, same_res = plan
        subs = self._subs(nodes, "aggregation")
        olds = None
        try:
            old_entries = None if fresh else self.old.aggregations.entries_of(nodes)  # type: ignore[union-attr]
            ph = self.prods.block_of(nodes)
            if same_val and old_entries is not None:
                value = gather(old_entries, lambda t: t.args[0])
            elif ph is not None:  # the nodes' own production batch: its values as they are
                value = ph.trace.retval.value
            else:
                value = gather(self.prods.entries_of(nodes), lambda t: t.retval.value)
            if same_res and old_entries is not None:
                results = gather(old_entries, lambda t: t.args[1])
            else:
                results = self._child_results(nodes, n, ph)
            args = (per_row(value), per_row(results))
            if fresh:
                tr, w = edit.fresh_rows(gf.aggregation, len(nodes), args, subs,  # type: ignore[arg-type]
                                        self.who("aggregation"))
                rd: Diff = UNKNOWN
                d = None
            else:
                assert old_entries is not None
                olds = gather(old_entries, lambda t: t)
                diffs = (NO_CHANGE if same_val else UNKNOWN, NO_CHANGE if same_res else UNKNOWN)
                tr, w, rd, d = edit.revisit_rows(gf.aggregation, olds, args, diffs, subs)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - not vmappable; a genuine error recurs per node
            self.batching["aggregation"] = False
            return False
        self.aggs.put_block(tr, nodes)
        self._add(w, tr.score, None if olds is None else olds.score)
        if self.old is not None:  # (a tree grown afresh asks for no retdiff below the root)
            self.retdiffs.update(zip(nodes, repeat(rd)))
            if not (self.pass_must or isinstance(rd, NoChange)):
                self.changed.extend(nodes)
        if d is not None and not d.is_empty():
            for j, i in enumerate(nodes):
                self._note_discard(i, "aggregation", tree_index(d, j))
        return True

    def _child_results(self, nodes: Sequence[int], n: int, ph: Any) -> tuple[Any, ...]:
        """The children's results of ``nodes`` (``n`` children each), per child slot,
        stacked: strided slices of one aggregation block when the children are the one
        group (in index order) that the nodes' production batch handed on, else gathered
        node by node."""
        b = self.gf.max_branch
        kids = self.kids.get(id(ph)) if ph is not None else None
        ah = self.aggs.block_of(kids) if kids is not None and len(kids) == n * len(nodes) \
            else None
        if ah is not None:
            r = ah.trace.retval
            if isinstance(r, torch.Tensor):
                return tuple(r[k::n] for k in range(n))
            return tuple(tree_index(r, slice(k, None, n)) for k in range(n))
        return tuple(gather(self.aggs.entries_of([p * b + k + 1 for p in nodes]),
                            lambda t: t.retval) for k in range(n))

    # ------------------------------------------------------------------ the result
    def tables(self) -> tuple[NodeTable, NodeTable, Mapping[int, int]]:
        """The edited node tables and children counts."""
        nch: Mapping[int, int]
        if self.old is None:  # (a tree grown afresh: indexed when first asked for)
            counts, batches = self.nch, list(self.nch_pending)  # (not the pass itself)
            nch = LazyMap(lambda: sorted_dict(_counts_of(counts, batches)))
        else:
            nch = sorted_dict(self.nch) if self.grown else self.nch
        return self.prods.finish(), self.aggs.finish(), nch

    def root_result(self) -> Any:
        """The root aggregation's result."""
        return _entry_trace(self.aggs[0]).retval

    def discards(self) -> ChoiceMap:
        """What the edit discarded, by node."""
        return ChoiceMap.node({i: ChoiceMap.node(self.discard[i]) for i in sorted(self.discard)})
