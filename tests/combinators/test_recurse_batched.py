"""Recurse batched by depth: every fast path (one batched kernel call per depth) against the
general path (one call per node, ``with vectorized(False)``), in float64: the same weights,
scores, return values, discards and gradients; body-run counts show which path ran."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import gfcomb as gf
from gfcomb.combinators.recurse import Production, Recurse, RecurseTrace
from gfcomb.core.diff import NoChange, UnknownChange
from gfcomb.core.errors import MissingChoiceError
from gfcomb.core.pytree import tree_index
from gfcomb.core.vmap import PerRow, vectorized

D = 3  # depths 0..3: 15 nodes
TOL = 1e-10
X0 = torch.tensor(0.25, dtype=torch.float64)
ARGS = ((X0, 0),)


def make(random_agg: bool = True, lin: torch.nn.Module | None = None,
         ) -> tuple[Recurse, dict[str, int]]:
    """A full binary tree of depth D: v ~ N(x, 1) (the mean through ``lin`` if given), child
    inputs (v, d + 1) and (v + 0.5, d + 1); r ~ N(v + Σ child results, 0.1) or the sum."""
    counts = {"prod": 0, "agg": 0}

    @gf.gen
    def production(inp):
        counts["prod"] += 1
        x, depth = inp
        mean = x if lin is None else lin(x.reshape(1)).reshape(())
        v = gf.normal(mean, 1.0) @ "v"
        return Production(v, [(v, depth + 1), (v + 0.5, depth + 1)] if depth < D else [])

    if random_agg:
        @gf.gen
        def aggregation(v, results):
            counts["agg"] += 1
            return gf.normal(v + sum(results), 0.1) @ "r"
    else:
        @gf.gen
        def aggregation(v, results):
            counts["agg"] += 1
            return v + sum(results)

    return Recurse(production, aggregation, 2), counts


def close(a: Any, b: Any, tol: float = TOL) -> None:
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    assert abs(a - b) < tol, (a, b)


def as_dict(cm: gf.ChoiceMap) -> dict[tuple, torch.Tensor]:
    return {a: v for a, v in cm.items()}


def same_choices(a: gf.ChoiceMap, b: gf.ChoiceMap, tol: float = 0.0) -> None:
    da, db = as_dict(a), as_dict(b)
    assert da.keys() == db.keys()
    for k in da:
        assert torch.allclose(da[k], db[k], atol=tol, rtol=0), k


def same_trace(a: RecurseTrace, b: RecurseTrace) -> None:
    assert a.nodes == b.nodes and a.num_children == b.num_children
    same_choices(a.choices, b.choices)
    close(a.score, b.score)
    close(a.retval, b.retval)
    for i in a.nodes:
        close(a.production_trace(i).score, b.production_trace(i).score)
        close(a.aggregation_trace(i).score, b.aggregation_trace(i).score)


def same_as_general_regenerate(model: Recurse, tr: RecurseTrace, sel: gf.Selection,
                               new: RecurseTrace, w: torch.Tensor) -> None:
    """``(new, w)`` from ``tr.regenerate(sel)`` is the general path's move: an update to the
    new values of the selected choices, minus their log density change (the prior
    proposal's)."""
    picked = gf.ChoiceMap({a: v for a, v in as_dict(new.choices).items() if a in sel})
    with vectorized(False):
        unew, uw, _, _ = model.update(tr, ARGS, (NoChange(),), picked)
        expected = uw - (model.project(unew, sel) - model.project(tr, sel))
    same_trace(new, unew)
    close(w, expected)


def depth_nodes(d: int) -> list[int]:
    return list(range(2 ** d - 1, 2 ** (d + 1) - 1))


@pytest.fixture(autouse=True)
def _float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


# ------------------------------------------------------------------ simulate / generate / assess
@pytest.mark.parametrize("random_agg", [True, False])
def test_simulate_runs_each_kernel_once_per_depth_and_scores_like_the_general_path(random_agg):
    model, counts = make(random_agg)
    tr = model.simulate(ARGS)
    assert tr.nodes == tuple(range(2 ** (D + 1) - 1))
    assert counts == {"prod": D + 1, "agg": D + 1}
    assert len(tr.productions.blocks) == D + 1  # one stacked block per depth
    with vectorized(False):
        counts["prod"] = counts["agg"] = 0
        gtr, w = model.generate(ARGS, tr.choices)
        assert counts == {"prod": len(tr.nodes), "agg": len(tr.nodes)}
        aw, ar = model.assess(ARGS, tr.choices)
    same_trace(gtr, tr)
    close(w, tr.score)
    close(aw, tr.score)
    close(ar, tr.retval)


def test_generate_and_assess_batched_equal_the_general_path():
    model, counts = make()
    tr = model.simulate(ARGS)
    # (the first batch call of each method also runs the kernel once over the whole batch and
    # learns that it needs its rows: gfcomb/dsl/whole.py; counted from the second call on)
    model.generate(ARGS, tr.choices)
    counts["prod"] = counts["agg"] = 0
    fast_tr, fast_w = model.generate(ARGS, tr.choices)  # full constraints: one call a depth
    assert counts == {"prod": D + 1, "agg": D + 1}
    fast_aw, fast_ar = model.assess(ARGS, tr.choices)
    with vectorized(False):
        gen_tr, gen_w = model.generate(ARGS, tr.choices)
        gen_aw, gen_ar = model.assess(ARGS, tr.choices)
    same_trace(fast_tr, gen_tr)
    close(fast_w, gen_w)
    close(fast_aw, gen_aw)
    close(fast_ar, gen_ar)
    # partial constraints: two depth-2 nodes constrained alike (one batched generate with
    # per-row constraints), the rest of the depth simulated in another batch
    cons = {(3, "production", "v"): torch.tensor(0.4), (5, "production", "v"): torch.tensor(-0.2),
            (2, "aggregation", "r"): torch.tensor(1.5)}
    for _ in range(3):
        ptr, pw = model.generate(ARGS, cons)
        with vectorized(False):
            expected = model.project(ptr, gf.select(*cons))
            back, bw = model.generate(ARGS, ptr.choices)
        close(pw, expected)
        close(bw, ptr.score)
        for a, v in cons.items():
            assert float(ptr[a]) == float(v)


def test_assess_batched_names_a_missing_choice():
    model, _ = make()
    tr = model.simulate(ARGS)
    d = as_dict(tr.choices)
    del d[(4, "production", "v")]
    with pytest.raises(MissingChoiceError) as err:
        model.assess(ARGS, gf.ChoiceMap(d))
    assert err.value.address == (4, "production", "v")


# ------------------------------------------------------------------ update
@pytest.mark.parametrize("random_agg", [True, False])
def test_update_batched_equals_the_general_path(random_agg):
    model, counts = make(random_agg)
    tr = model.simulate(ARGS)
    x1 = torch.tensor(-0.7)
    moves = [
        # a new root input: every node revisited, each depth one batched update
        (((x1, 0),), (UnknownChange(),), None),
        # constraints at every node of depth 2 (one batched update with per-row constraints)
        (ARGS, (NoChange(),), {(i, "production", "v"): torch.tensor(0.1 * i)
                               for i in depth_nodes(2)}),
        # aggregation constraints at the leaves and a production at the root
        (ARGS, (NoChange(),), {**({(i, "aggregation", "r"): torch.tensor(0.05 * i)
                                   for i in depth_nodes(D)} if random_agg else {}),
                               (0, "production", "v"): torch.tensor(0.3)}),
    ]
    for args, diffs, cons in moves:
        counts["prod"] = counts["agg"] = 0
        new, w, rd, discard = model.update(tr, args, diffs, cons)
        batched_runs = counts["prod"] + counts["agg"]
        with vectorized(False):
            counts["prod"] = counts["agg"] = 0
            gnew, gw, grd, gdiscard = model.update(tr, args, diffs, cons)
            general_runs = counts["prod"] + counts["agg"]
            back, bw, _, _ = model.update(new, ARGS, (UnknownChange(),), discard)
        # (the batched path runs each depth once; where few nodes change -- a new root
        # input leaves every child's input as it was -- both paths run as few bodies)
        assert batched_runs <= general_runs
        same_trace(new, gnew)
        close(w, gw)
        assert type(rd) is type(grd)
        same_choices(discard, gdiscard)
        close(new.score - tr.score, w)  # no fresh choices: weight = score difference
        same_choices(back.choices, tr.choices, 1e-12)
        close(bw, -w)


def test_leaf_update_of_a_batched_trace_touches_one_node():
    model, counts = make()
    tr = model.simulate(ARGS)
    counts["prod"] = counts["agg"] = 0
    new, w, rd, discard = tr.update({(9, "production", "v"): torch.tensor(0.0)})
    assert counts == {"prod": 1, "agg": 1}  # r at node 9 is retained: nothing above changes
    assert isinstance(rd, NoChange)
    with vectorized(False):
        gnew, gw, _, _ = tr.update({(9, "production", "v"): torch.tensor(0.0)})
    same_trace(new, gnew)
    close(w, gw)
    for i in tr.nodes:
        if i != 9:
            assert new.productions[i] is tr.productions[i]
            assert new.aggregations[i] is tr.aggregations[i] or i == 9


# ------------------------------------------------------------------ regenerate / project
def test_regenerate_batched_weight_is_the_general_path_weight():
    model, counts = make()
    tr = model.simulate(ARGS)
    selections = [gf.select(*depth_nodes(2)), gf.select(*[(i, "production") for i in range(7)]),
                  gf.selectall()]
    for sel in selections:
        counts["prod"] = counts["agg"] = 0
        new, w, _ = tr.regenerate(sel)
        assert counts["prod"] <= D + 1
        same_as_general_regenerate(model, tr, sel, new, w)
    # a new root input and nothing selected: deterministic, both paths agree
    x1 = torch.tensor(1.1)
    new, w, _ = model.regenerate(tr, ((x1, 0),), (UnknownChange(),), gf.Selection.none())
    with vectorized(False):
        gnew, gw, _ = model.regenerate(tr, ((x1, 0),), (UnknownChange(),), gf.Selection.none())
    same_trace(new, gnew)
    close(w, gw)


def test_project_of_batched_blocks_equals_the_sum_over_nodes():
    model, _ = make()
    tr = model.simulate(ARGS)
    sels = [gf.select(*depth_nodes(2)), gf.select(1, (2, "production"), (8, "aggregation", "r")),
            ~gf.select(0), gf.select(*[(i, "production", "v") for i in depth_nodes(3)])]
    for sel in sels:
        expected = torch.tensor(0.0)
        for i in tr.nodes:
            for part, sub in (("production", tr.production_trace(i)),
                              ("aggregation", tr.aggregation_trace(i))):
                s = sel.get_subselection(i).get_subselection(part)
                expected = expected + sub.gen_fn.project(sub, s)
        close(model.project(tr, sel), expected)


# ------------------------------------------------------------------ gradients
def test_gradients_batched_equal_the_general_path():
    lin = torch.nn.Linear(1, 1).double()
    model, counts = make(lin=lin)
    tr = model.simulate(ARGS)
    sel = gf.select(*[(i, "production", "v") for i in tr.nodes], (3, "aggregation", "r"))
    ((ag, _),), vals, grads = model.choice_gradients(tr, sel, retgrad=torch.tensor(0.5))
    lin.zero_grad()
    pg = model.accumulate_param_gradients(tr, retgrad=torch.tensor(0.5))
    fast_param = [p.grad.clone() for p in lin.parameters()]
    with vectorized(False):
        ((gag, _),), gvals, ggrads = model.choice_gradients(tr, sel,
                                                            retgrad=torch.tensor(0.5))
        lin.zero_grad()
        gpg = model.accumulate_param_gradients(tr, retgrad=torch.tensor(0.5))
    close(ag, gag)
    close(pg[0][0], gpg[0][0])
    same_choices(vals, gvals)
    same_choices(grads, ggrads, 1e-10)
    for p, g in zip(lin.parameters(), fast_param):
        assert torch.allclose(p.grad, g, atol=1e-10, rtol=0)
    assert any(float(g.abs().sum()) > 0 for g in fast_param)
    # against finite differences of the batched assess
    h = 1e-6
    a = (5, "production", "v")
    base = as_dict(tr.choices)
    up = model.assess(ARGS, gf.ChoiceMap({**base, a: base[a] + h}))[0]
    dn = model.assess(ARGS, gf.ChoiceMap({**base, a: base[a] - h}))[0]
    close(grads[a], (up - dn) / (2 * h), 1e-5)  # (r at node 0 is a choice: retgrad adds 0)


# ------------------------------------------------------------------ fallback and grouping
def test_aggregation_that_cannot_be_vmapped_falls_back_node_by_node():
    batched, counts = make()

    @gf.gen
    def aggregation(v, results):
        counts["agg"] += 1
        total = v + sum(results)
        if float(total) > 0:  # data-dependent Python: not vmappable
            return gf.normal(total, 0.1) @ "r"
        return gf.normal(total, 0.2) @ "r"

    model = Recurse(batched.production, aggregation, 2)
    tr = model.simulate(ARGS)
    n = len(tr.nodes)
    assert counts["prod"] == D + 1  # productions still batched
    # one abandoned run of the body over the whole batch (gfcomb/dsl/whole.py), one failed
    # vmapped attempt, then node by node
    assert counts["agg"] == n + 2
    with vectorized(False):
        w, _ = model.assess(ARGS, tr.choices)
    close(w, tr.score)


def test_nodes_of_one_depth_with_other_input_structures_run_in_separate_batches():
    counts = {"prod": 0}

    @gf.gen
    def production(inp):
        counts["prod"] += 1
        x, depth, kind = inp  # kind (a Python int) decides the children: 2 or 1
        v = gf.normal(x, 1.0) @ "v"
        if depth >= D:
            return Production(v, [])
        kids = {0: [(v, depth + 1, 0), (v + 1.0, depth + 1, 1)], 1: [(v, depth + 1, 1)]}
        return Production(v, kids[kind])

    @gf.gen
    def aggregation(v, results):
        return gf.normal(v + sum(results), 0.1) @ "r"

    model = Recurse(production, aggregation, 2)
    tr = model.simulate(((X0, 0, 0),))
    with vectorized(False):
        counts["prod"] = 0
        w, r = model.assess(((X0, 0, 0),), tr.choices)
        per_node = counts["prod"]
    assert per_node == len(tr.nodes)
    counts["prod"] = 0
    model.simulate(((X0, 0, 0),))
    assert counts["prod"] < per_node
    close(w, tr.score)
    close(r, tr.retval)


# ------------------------------------------------------------------ batch methods (defaults)
def test_batch_methods_over_a_batch_of_trees_equal_the_per_row_methods():
    model, _ = make()
    one = model.simulate(ARGS)
    traces, w0 = model.batch_generate(3, ARGS, one.choices)
    assert traces.score.shape == (3,)
    for i in range(3):
        close(w0[i], one.score)
    cons = {(4, "production", "v"): PerRow(torch.tensor([0.1, 0.2, 0.3]))}
    per_row = gf.ChoiceMap({(4, "production", "v"): torch.tensor([0.1, 0.2, 0.3])})
    new, w, _, _ = model.batch_update(traces, ARGS, (NoChange(),), PerRow(per_row))
    del cons
    for i in range(3):
        row = tree_index(traces, i)
        rnew, rw, _, _ = row.update({(4, "production", "v"): torch.tensor(0.1 * (i + 1))})
        close(w[i], rw)
        close(new.score[i], rnew.score)
    sel = gf.select(*depth_nodes(3))
    regen, rw3, _ = model.batch_regenerate(traces, ARGS, (NoChange(),), sel)
    assert rw3.shape == (3,)
    for i in range(3):
        row = tree_index(regen, i)
        with vectorized(False):
            w_row, _ = model.assess(ARGS, row.choices)
        close(regen.score[i], w_row)
    picked = traces.score - model.batch_regenerate(traces, ARGS, (NoChange(),),
                                                   gf.selectall())[0].score
    assert torch.isfinite(picked).all()



def test_batched_tree_satisfies_the_gfi_laws():
    """The GFI laws (gfcomb.testing) on the batched tree, the vmap law included (the
    per-depth batches run inside an outer vmap over trees)."""
    from hypothesis import strategies as st

    from gfcomb.testing import check_gfi

    model, _ = make()
    xs = st.floats(-2.0, 2.0).map(lambda v: torch.tensor(v, dtype=torch.float64))
    report = check_gfi(model, st.tuples(st.tuples(xs, st.just(0))), max_examples=6,
                       require_vmap=True, derandomize=True)
    assert {"vmap", "regenerate_weight", "update_roundtrip"} <= set(report.laws_run)


def test_batched_updates_that_prune_and_grow_subtrees():
    """The children count follows a Python int in the root input: changing it prunes (or
    grows) a subtree under every node of a depth at once, in batched updates."""
    counts = {"prod": 0}

    @gf.gen
    def production(inp):
        counts["prod"] += 1
        x, depth, width = inp
        v = gf.normal(x, 1.0) @ "v"
        n = 2 if depth == 0 else width  # (the root always has two children)
        return Production(v, [(v, depth + 1, width)] * n if depth < D else [])

    @gf.gen
    def aggregation(v, results):
        return gf.normal(v + sum(results), 0.1) @ "r"

    model = Recurse(production, aggregation, 2)
    wide, narrow = ((X0, 0, 2),), ((X0, 0, 1),)
    tr = model.simulate(wide)
    assert len(tr.nodes) == 15
    # prune: every node below the root keeps one child (one batched update per depth);
    # deterministic, so both paths agree exactly
    # (the first batch call of each method also runs the kernel once over the whole batch and
    # learns that it needs its rows: gfcomb/dsl/whole.py; counted from the second call on)
    model.update(tr, narrow, (UnknownChange(),), None)
    counts["prod"] = 0
    pruned, w, _, discard = model.update(tr, narrow, (UnknownChange(),), None)
    assert counts["prod"] == D + 1 and pruned.nodes == (0, 1, 2, 3, 5, 7, 11)
    with vectorized(False):
        gpruned, gw, _, gdiscard = model.update(tr, narrow, (UnknownChange(),), None)
        back, bw, _, _ = model.update(pruned, wide, (UnknownChange(),), discard)
    same_trace(pruned, gpruned)
    close(w, gw)
    same_choices(discard, gdiscard)
    close(w, pruned.score - tr.score)
    same_choices(back.choices, tr.choices)  # the discard restores the pruned subtrees
    close(bw, -w)
    # grow: new subtrees simulated under every node; weight = Δscore − log p(fresh choices)
    counts["prod"] = 0
    grown, gw2, _, gd = model.update(pruned, wide, (UnknownChange(),), None)
    assert grown.nodes == tr.nodes and gd.is_empty()
    assert counts["prod"] < len(tr.nodes)
    fresh = [i for i in grown.nodes if i not in pruned.nodes]
    with vectorized(False):
        q = model.project(grown, gf.select(*fresh))
        gback, gbw = model.generate(wide, grown.choices)
    close(gw2, grown.score - pruned.score - q)
    close(gbw, grown.score)
    # the same moves as regenerate with nothing selected: removed and new nodes add nothing
    rpruned, rw, _ = model.regenerate(tr, narrow, (UnknownChange(),), gf.Selection.none())
    rgrown, rw2, _ = model.regenerate(pruned, wide, (UnknownChange(),), gf.Selection.none())
    with vectorized(False):
        grpruned, grw, _ = model.regenerate(tr, narrow, (UnknownChange(),),
                                            gf.Selection.none())
        kept = gf.select(*pruned.nodes)
        expected = model.project(rgrown, kept) - model.project(pruned, kept)
    same_trace(rpruned, grpruned)
    close(rw, grw)
    close(rw, model.project(rpruned, gf.selectall()) - model.project(tr, gf.select(*pruned.nodes)))
    close(rw2, expected)


def test_a_batched_trace_survives_save_and_load():
    import io

    model, _ = make()
    tr = model.simulate(ARGS)
    new, _, _, _ = tr.update({(9, "production", "v"): torch.tensor(0.0)})  # mixed blocks
    for t in (tr, new):
        buf = io.BytesIO()
        gf.save(t, buf)
        buf.seek(0)
        back = gf.load(buf, gen_fns={"production": model.production,
                                     "aggregation": model.aggregation})
        assert back.gen_fn == model
        same_trace(back, t)
        a, wa, _, _ = t.update({(3, "production", "v"): torch.tensor(0.5)})
        b, wb, _, _ = back.update({(3, "production", "v"): torch.tensor(0.5)})
        close(wa, wb)
        same_trace(a, b)


# ------------------------------------------------------------------ a tree grown afresh
def test_a_tree_grown_afresh_indexes_its_nodes_when_first_asked():
    """simulate builds no per-node index: its tables and children counts are LazyMaps that
    equal (and pickle, save and flatten as) the dicts the general path builds."""
    import copy
    import pickle

    from torch.utils import _pytree as pytree

    from gfcomb.combinators.recurse.trace import LazyMap

    model, _ = make()
    tr = model.simulate(ARGS)
    assert isinstance(tr.productions.where, LazyMap)
    assert isinstance(tr.num_children, LazyMap)
    with vectorized(False):
        gtr, _ = model.generate(ARGS, tr.choices)
    expected = {i: 2 if i < 2 ** D - 1 else 0 for i in range(2 ** (D + 1) - 1)}
    assert tr.num_children == expected and expected == tr.num_children
    assert tr.num_children == gtr.num_children
    assert gtr.productions.where == {i: (i, -1) for i in expected}  # one trace per node
    assert list(tr.productions) == sorted(tr.productions) == list(gtr.productions)
    for table in (tr.productions, tr.aggregations):  # one block per depth, rows in order
        assert table.where[0][1] == -1  # the root: one call
        for d in range(1, D + 1):
            places = [table.where[i] for i in depth_nodes(d)]
            assert {b for b, _ in places} == {places[0][0]}
            assert [r for _, r in places] == list(range(2 ** d))
    back = pickle.loads(pickle.dumps(tr.num_children))
    assert type(back) is dict and back == expected
    assert copy.deepcopy(tr.productions.where) == tr.productions.where
    other = model.simulate(ARGS)
    assert pytree.tree_structure(tr) == pytree.tree_structure(other)
    same_trace(tr, gtr)
    # an index not yet built keeps no kernel trace alive
    import gc
    import weakref

    fresh = model.simulate(ARGS)
    where, num_children = fresh.productions.where, fresh.num_children
    block = weakref.ref(fresh.productions.blocks[-1])
    del fresh
    gc.collect()
    assert block() is None
    assert num_children == expected and len(where) == len(expected)


@pytest.mark.parametrize("kids", [1, 2, 3])
def test_children_of_a_batch_are_one_group_in_index_order(kids):
    """max_branch 3 with 1, 2 or 3 children (distinct inputs per slot): the children of a
    batch go on as one group whose rows are in increasing index order, and every node's
    input, value and result equal the general path's."""

    @gf.gen
    def production(inp):
        x, depth = inp
        v = gf.normal(x, 1.0) @ "v"
        return Production(v, [(v + 0.25 * k, depth + 1) for k in range(kids)]
                          if depth < 3 else [])

    @gf.gen
    def aggregation(v, results):
        return gf.normal(v + sum(results) / (1 + len(results)), 0.1) @ "r"

    model = Recurse(production, aggregation, 3)
    tr = model.simulate(ARGS)
    assert len(tr.productions.blocks) == 4
    with vectorized(False):
        gtr, w = model.generate(ARGS, tr.choices)
    same_trace(tr, gtr)
    close(w, tr.score)
    for i in tr.nodes:
        close(tr.production_trace(i).args[0][0], gtr.production_trace(i).args[0][0])
        close(tr.result_of(i), gtr.result_of(i))
    assert list(tr.productions) == sorted(tr.productions)


# ------------------------------------------------------------------ sparse edits
@pytest.mark.parametrize("random_agg", [True, False])
def test_sparse_edits_visit_only_the_edited_nodes_and_changed_results(random_agg):
    """With the root input unchanged an edit visits the edited nodes at their depths and
    the parents of results that changed, nothing else: counts and results equal the
    general path's."""
    model, counts = make(random_agg)
    tr = model.simulate(ARGS)
    leaf, other = 9, 4  # a leaf (depth 3) and its parent
    moves = [
        ({(leaf, "production", "v"): torch.tensor(0.2)},
         {"prod": 1, "agg": 1 if random_agg else D + 1}),
        ({(leaf, "production", "v"): torch.tensor(0.2), (6, "production", "v"):
          torch.tensor(-0.4)}, None),
        ({(other, "production", "v"): torch.tensor(0.7)}, None),
    ]
    if random_agg:  # r at the leaf changes: its parent's aggregation sees a new result
        moves.append(({(leaf, "aggregation", "r"): torch.tensor(1.5)}, {"prod": 0, "agg": 2}))
    for cons, expected_counts in moves:
        counts["prod"] = counts["agg"] = 0
        new, w, rd, discard = tr.update(cons)
        if expected_counts is not None:
            assert counts == expected_counts
        with vectorized(False):
            gnew, gw, grd, gdiscard = tr.update(cons)
            back, bw, _, _ = new.update(discard)
        same_trace(new, gnew)
        close(w, gw)
        assert type(rd) is type(grd)
        same_choices(discard, gdiscard)
        same_choices(back.choices, tr.choices, 1e-12)
        close(bw, -w)
    # regenerate of one deep aggregation choice and one production choice elsewhere
    sel = gf.select((leaf, "aggregation", "r"), (6, "production"))
    new, w, _ = tr.regenerate(sel)
    same_as_general_regenerate(model, tr, sel, new, w)


def test_regenerate_batches_nodes_whose_selections_are_built_alike():
    """select((i, "production", "v") for every node of a depth) gives every node its own
    sub-selection object; equal ones share one batched regenerate (one production call for
    the depth), with the weight of the general path's move."""
    from gfcomb.combinators.recurse.edits import selection_key

    model, counts = make()
    tr = model.simulate(ARGS)
    sel = gf.select(*[(i, "production", "v") for i in depth_nodes(D)])
    subs = [sel.get_subselection(i).get_subselection("production") for i in depth_nodes(D)]
    assert subs[0] is not subs[1] and selection_key(subs[0]) == selection_key(subs[1])
    assert selection_key(gf.select("v")) != selection_key(gf.select("w"))
    assert selection_key(~gf.select("v")) == selection_key(~gf.select("v"))
    # (the first batch call of each method also runs the kernel once over the whole batch and
    # learns that it needs its rows: gfcomb/dsl/whole.py; counted from the second call on)
    tr.regenerate(sel)
    counts["prod"] = counts["agg"] = 0
    new, w, _ = tr.regenerate(sel)
    assert counts["prod"] == 1  # the leaf depth: one batched call
    same_as_general_regenerate(model, tr, sel, new, w)


def test_traces_with_depth_blocks_stack_under_map_and_unfold():
    # a depth's nodes sit in one stacked block; a Map or an Unfold stacks whole Recurse
    # traces along a batch axis in front, and a node is read at the block's node axis
    # after it (was: IndexError reading the choices of any such stacked trace)
    @gf.gen
    def production(inp):
        x, depth = inp
        v = gf.normal(x, 1.0) @ "v"
        return Production(v, [(v, depth + 1)] * (2 if depth == 0 else 0))

    @gf.gen
    def aggregation(v, results):
        return v + sum(results)

    rec = Recurse(production, aggregation, 2)
    xs = torch.tensor([0.0, 1.0, -1.0])
    tm = gf.Map(rec).simulate(((xs, 0),))
    assert len(list(tm.choices.items())) == 9
    per = [rec.assess(((xs[i], 0),), tm.choices.get_submap(i))[0] for i in range(3)]
    torch.testing.assert_close(tm.score, sum(per), rtol=0, atol=1e-12)

    @gf.gen
    def step(t, x):
        return rec((x, 0)) @ "r"

    unfold = gf.Unfold(step)
    x0 = torch.tensor(0.0)
    tr = unfold.simulate((1, x0))
    torch.testing.assert_close(unfold.assess((1, x0), tr.choices)[0], tr.score, rtol=0, atol=1e-12)
    new, w, _, _ = unfold.update(tr, (3, x0), (UnknownChange(), NoChange()))
    assert len(list(new.choices.items())) == 9 and float(w) == 0.0
    torch.testing.assert_close(unfold.assess((3, x0), new.choices)[0], new.score, rtol=0,
                               atol=1e-12)
