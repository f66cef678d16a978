"""Recurse: a probabilistic grammar checked against hand-computed log densities.

The grammar: node input ``(x, depth)``; production ``v ~ normal(x, 1)``, and below MAX_DEPTH
``k ~ categorical(PROBS)`` children, each with input ``(v, depth + 1)``; aggregation either
``r ~ normal(v + Σ child results, 0.1)`` (random) or ``v + Σ child results`` (deterministic, a
@gen with no choices).  Every weight is compared with log densities written out in this file.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree

import gfcomb as gf
from gfcomb.combinators.recurse import Production, Recurse, RecurseTrace
from gfcomb.core.diff import NoChange, UnknownChange
from gfcomb.core.errors import ArgumentError, MissingChoiceError, UnvisitedConstraintError

MAX_DEPTH = 3
B = 2
PROBS = [0.3, 0.3, 0.4]
SIG_AGG = 0.1
TOL = 1e-9


# ------------------------------------------------------------------ the model
def make_model(random_agg: bool = True, max_branch: int = B, max_depth: int = MAX_DEPTH,
               batch_depths: bool = False) -> tuple[Recurse, dict[str, int]]:
    """A fresh grammar and its body-run counters."""
    counts = {"prod": 0, "agg": 0}

    @gf.gen
    def production(inp):
        counts["prod"] += 1
        x, depth = inp
        v = gf.normal(x, 1.0) @ "v"
        k = 0
        if depth < max_depth:
            k = int(gf.categorical(torch.tensor(PROBS)) @ "k")
        return Production(v, [(v, depth + 1)] * k)

    if random_agg:
        @gf.gen
        def aggregation(v, results):
            counts["agg"] += 1
            return gf.normal(v + sum(results), SIG_AGG) @ "r"
    else:
        @gf.gen
        def aggregation(v, results):
            counts["agg"] += 1
            return v + sum(results)

    return Recurse(production, aggregation, max_branch, batch_depths=batch_depths), counts


def norm_lp(x: Any, mu: Any, sigma: float) -> torch.Tensor:
    """log N(x; mu, sigma), written out."""
    x, mu = torch.as_tensor(x), torch.as_tensor(mu)
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def hand(choices: Any, x0: Any, random_agg: bool = True, max_branch: int = B,
         max_depth: int = MAX_DEPTH) -> tuple[dict[tuple, torch.Tensor], list[int], Any]:
    """Per-choice log densities, the node set and the root result, walking the grammar."""
    lps: dict[tuple, torch.Tensor] = {}
    nodes: list[int] = []

    def visit(i: int, x: Any, depth: int) -> Any:
        nodes.append(i)
        v = choices[i, "production", "v"]
        lps[(i, "production", "v")] = norm_lp(v, x, 1.0)
        k = 0
        if depth < max_depth:
            k = int(choices[i, "production", "k"])
            lps[(i, "production", "k")] = torch.tensor(math.log(PROBS[k]))
        rs = [visit(i * max_branch + j + 1, v, depth + 1) for j in range(k)]
        mean = v + sum(rs)
        if not random_agg:
            return mean
        r = choices[i, "aggregation", "r"]
        lps[(i, "aggregation", "r")] = norm_lp(r, mean, SIG_AGG)
        return r

    res = visit(0, x0, 0)
    return lps, sorted(nodes), res


def total(lps: dict[tuple, torch.Tensor], addrs: Any = None) -> torch.Tensor:
    keys = lps.keys() if addrs is None else addrs
    return sum((lps[a] for a in keys), torch.tensor(0.0))


def as_dict(cm: gf.ChoiceMap) -> dict[tuple, torch.Tensor]:
    return {a: v for a, v in cm.items()}


def assert_same_choices(a: gf.ChoiceMap, b: gf.ChoiceMap) -> None:
    da, db = as_dict(a), as_dict(b)
    assert da.keys() == db.keys()
    for k in da:
        assert torch.equal(torch.as_tensor(da[k]), torch.as_tensor(db[k])), k


def close(a: Any, b: Any, tol: float = TOL) -> None:
    assert abs(float(a) - float(b)) < tol, (float(a), float(b))


X0 = torch.tensor(0.25, dtype=torch.float64)
ARGS = ((X0, 0),)

# a fixed tree (B = 2, MAX_DEPTH = 3): 0 -> {1, 2}; 1 -> {3}; 3 -> {7, 8}; 7, 8 at max depth
KS = {0: 2, 1: 1, 2: 0, 3: 2}
VS = {0: 0.5, 1: -0.3, 2: 1.2, 3: 0.1, 7: -0.8, 8: 0.4}
RS = {0: 1.0, 1: 0.2, 2: 1.1, 3: -0.2, 7: -0.7, 8: 0.5}
DEPTH = {0: 0, 1: 1, 2: 1, 3: 2, 7: 3, 8: 3}


def fixed_choices(random_agg: bool = True) -> gf.ChoiceMap:
    d: dict[Any, Any] = {}
    for i, v in VS.items():
        d[(i, "production", "v")] = torch.tensor(v)
        if i in KS:
            d[(i, "production", "k")] = torch.tensor(KS[i])
        if random_agg:
            d[(i, "aggregation", "r")] = torch.tensor(RS[i])
    return gf.ChoiceMap(d)


def fixed_trace(random_agg: bool = True):
    model, counts = make_model(random_agg)
    tr, _ = model.generate(ARGS, fixed_choices(random_agg))
    counts["prod"] = counts["agg"] = 0
    return model, counts, tr


def snapshot(tr: RecurseTrace) -> tuple[dict, torch.Tensor, tuple, dict]:
    return ({a: v.clone() for a, v in as_dict(tr.choices).items()}, tr.score.clone(),
            tr.nodes, dict(tr.num_children))


def assert_unchanged(tr: RecurseTrace, snap: tuple) -> None:
    choices, score, nodes, nch = snap
    assert tr.nodes == nodes and tr.num_children == nch
    assert torch.equal(tr.score, score)
    now = as_dict(tr.choices)
    assert now.keys() == choices.keys()
    for a in choices:
        assert torch.equal(now[a], choices[a])


# ------------------------------------------------------------------ simulate / generate / assess
@pytest.mark.parametrize("random_agg", [True, False])
def test_simulate_score_is_hand_sum_over_nodes(random_agg):
    model, _ = make_model(random_agg)
    sizes = set()
    for _ in range(15):
        tr = model.simulate(ARGS)
        lps, nodes, res = hand(tr.choices, X0, random_agg)
        assert list(tr.nodes) == nodes
        close(tr.score, total(lps))
        close(tr.retval, res)
        for i in nodes:  # child indices follow p * max_branch + k + 1
            assert tr.children_of(i) == tuple(i * B + k + 1 for k in range(tr.num_children[i]))
            close(tr.production_trace(i).score + tr.aggregation_trace(i).score,
                  total(lps, [a for a in lps if a[0] == i]))
        sizes.add(len(nodes))
    assert len(sizes) > 2  # the grammar really produces different trees


@pytest.mark.parametrize("random_agg", [True, False])
def test_generate_full_constraints_weight_equals_score_and_assess(random_agg):
    model, _ = make_model(random_agg)
    cm = fixed_choices(random_agg)
    tr, w = model.generate(ARGS, cm)
    lps, nodes, res = hand(cm, X0, random_agg)
    assert list(tr.nodes) == nodes == [0, 1, 2, 3, 7, 8]
    assert tr.num_children == {0: 2, 1: 1, 2: 0, 3: 2, 7: 0, 8: 0}
    close(w, total(lps))
    close(tr.score, total(lps))
    aw, ar = model.assess(ARGS, cm)
    close(aw, total(lps))
    close(ar, res)
    close(tr.retval, res)
    assert_same_choices(tr.choices, cm)


def test_generate_partial_constraints_weight_is_constrained_log_density():
    model, _ = make_model()
    cm = gf.ChoiceMap({(0, "production", "k"): torch.tensor(1),
                       (1, "production", "v"): torch.tensor(0.7),
                       (1, "production", "k"): torch.tensor(0),
                       (1, "aggregation", "r"): torch.tensor(0.2)})
    for _ in range(5):
        tr, w = model.generate(ARGS, cm)
        lps, nodes, _ = hand(tr.choices, X0)
        assert nodes == [0, 1]
        close(w, total(lps, [a for a, _ in cm.items()]))
        close(tr.score, total(lps))


def test_generate_constraint_at_unreached_node_names_it():
    model, _ = make_model()
    cm = gf.ChoiceMap({(0, "production", "k"): torch.tensor(0),
                       (4, "production", "v"): torch.tensor(0.0)})
    with pytest.raises(UnvisitedConstraintError) as err:
        model.generate(ARGS, cm)
    assert err.value.address == (4, "production", "v")
    for bad, addr in [({("x", "v"): 1.0}, ("x", "v")),
                      ({(0, "foo", "v"): 1.0}, (0, "foo", "v")),
                      ({(0,): 1.0}, (0,)),
                      ({(0, "production", "nope"): 1.0}, (0, "production", "nope"))]:
        with pytest.raises(UnvisitedConstraintError) as err:
            model.generate(ARGS, gf.ChoiceMap(bad))
        assert err.value.address == addr
        assert str(addr[0]) in str(err.value)


def test_assess_missing_choice_names_full_address():
    model, _ = make_model()
    d = as_dict(fixed_choices())
    del d[(3, "production", "v")]
    with pytest.raises(MissingChoiceError) as err:
        model.assess(ARGS, gf.ChoiceMap(d))
    assert err.value.address == (3, "production", "v")
    assert "3" in str(err.value) and "production" in str(err.value)
    d = as_dict(fixed_choices())
    del d[(8, "aggregation", "r")]
    with pytest.raises(MissingChoiceError) as err:
        model.assess(ARGS, gf.ChoiceMap(d))
    assert err.value.address == (8, "aggregation", "r")
    # a given choice at a node the tree does not reach
    d = as_dict(fixed_choices())
    d[(5, "production", "v")] = torch.tensor(0.0)
    with pytest.raises(UnvisitedConstraintError) as err:
        model.assess(ARGS, gf.ChoiceMap(d))
    assert err.value.address == (5, "production", "v")


def test_too_many_children_names_the_node():
    model, _ = make_model(max_branch=1)
    with pytest.raises(ArgumentError, match=r"node 0 .*2 children.*max_branch=1"):
        model.generate(ARGS, {(0, "production", "k"): torch.tensor(2)})
    with pytest.raises(ArgumentError, match=r"node 1 .*max_branch=1"):
        model.generate(ARGS, {(0, "production", "k"): torch.tensor(1),
                              (1, "production", "k"): torch.tensor(2)})
    # also in update: growing node 1 past max_branch
    tr, _ = model.generate(ARGS, {(0, "production", "k"): torch.tensor(1),
                                  (1, "production", "k"): torch.tensor(0)})
    with pytest.raises(ArgumentError, match=r"node 1 .*max_branch=1"):
        tr.update({(1, "production", "k"): torch.tensor(2)})


def test_bad_arguments_and_kernels():
    model, _ = make_model()
    with pytest.raises(ArgumentError, match="one argument"):
        model.simulate((X0, 0))
    with pytest.raises(ArgumentError, match="tuple"):
        model.simulate(X0)
    with pytest.raises(ArgumentError, match="max_branch"):
        Recurse(model.production, model.aggregation, 0)
    with pytest.raises(TypeError, match="production"):
        Recurse(lambda x: x, model.aggregation, 2)

    @gf.gen
    def not_a_production(x):
        return gf.normal(x, 1.0) @ "v"

    with pytest.raises(ArgumentError, match=r"node 0 .*Production"):
        Recurse(not_a_production, model.aggregation, 2).simulate((X0,))
    with pytest.raises(ArgumentError, match="list or tuple"):
        Production(1.0, 3)


# ------------------------------------------------------------------ update
@pytest.mark.parametrize("random_agg", [True, False])
def test_leaf_update_revisits_only_the_leaf_and_ancestor_aggregations(random_agg):
    model, counts, tr = fixed_trace(random_agg)
    snap = snapshot(tr)
    old_lps, _, _ = hand(tr.choices, X0, random_agg)
    new_tr, w, retdiff, discard = tr.update({(8, "production", "v"): torch.tensor(-0.6)})
    new_lps, nodes, res = hand(new_tr.choices, X0, random_agg)
    assert nodes == [0, 1, 2, 3, 7, 8]
    close(new_tr.score, total(new_lps))
    close(w, total(new_lps) - total(old_lps))
    close(new_tr.retval, res)
    assert as_dict(discard).keys() == {(8, "production", "v")}
    assert float(discard[8, "production", "v"]) == VS[8]
    assert counts["prod"] == 1
    if random_agg:
        # node 8's result r is a retained choice: its aggregation is re-scored, nothing above
        assert counts["agg"] == 1
        assert isinstance(retdiff, NoChange)
        assert new_tr.aggregations[3] is tr.aggregations[3]
    else:
        assert counts["agg"] == 4  # nodes 8, 3, 1, 0
        assert isinstance(retdiff, UnknownChange)
    for i in (0, 1, 2, 3, 7):
        assert new_tr.productions[i] is tr.productions[i]
    assert_unchanged(tr, snap)


def test_aggregation_constraint_propagates_upward():
    model, counts, tr = fixed_trace()
    old_lps, _, _ = hand(tr.choices, X0)
    new_tr, w, retdiff, discard = tr.update({(1, "aggregation", "r"): torch.tensor(0.9)})
    new_lps, _, _ = hand(new_tr.choices, X0)
    close(w, total(new_lps) - total(old_lps))
    close(new_tr.score, total(new_lps))
    assert (counts["prod"], counts["agg"]) == (0, 2)  # node 1, then the root (its child result)
    assert isinstance(retdiff, NoChange)  # the root's r is retained
    assert as_dict(discard).keys() == {(1, "aggregation", "r")}


def test_update_root_input_rescores_without_revisiting_children():
    model, counts, tr = fixed_trace(random_agg=False)
    old_lps, _, _ = hand(tr.choices, X0, False)
    x1 = torch.tensor(-0.4)
    new_tr, w, retdiff, discard = model.update(tr, ((x1, 0),), (UnknownChange(),), None)
    new_lps, _, res = hand(new_tr.choices, x1, False)
    close(w, total(new_lps) - total(old_lps))
    close(new_tr.score, total(new_lps))
    assert discard.is_empty()
    assert counts["prod"] == 1  # children inputs (v, 1) are the same value: not revisited
    assert counts["agg"] == 0  # the root's value did not change either
    assert isinstance(retdiff, NoChange)
    # no change at all: the same trace back
    same, w0, rd0, d0 = model.update(tr, ARGS, (NoChange(),), None)
    assert same is tr and float(w0) == 0.0 and isinstance(rd0, NoChange) and d0.is_empty()


def test_changed_value_revisits_children_one_level_down():
    model, counts, tr = fixed_trace()
    old_lps, _, _ = hand(tr.choices, X0)
    new_tr, w, _, _ = tr.update({(1, "production", "v"): torch.tensor(0.8)})
    new_lps, _, _ = hand(new_tr.choices, X0)
    close(w, total(new_lps) - total(old_lps))
    close(new_tr.score, total(new_lps))
    # node 1 (constrained) and node 3 (its input changed; its own v is kept, so 7 and 8 are
    # not revisited); aggregation of node 1 only (its value changed, its r is kept)
    assert (counts["prod"], counts["agg"]) == (2, 1)
    for i in (0, 2, 7, 8):
        assert new_tr.productions[i] is tr.productions[i]
    assert new_tr.aggregations[3] is tr.aggregations[3]


@pytest.mark.parametrize("random_agg", [True, False])
def test_constraints_in_several_subtrees(random_agg):
    model, counts, tr = fixed_trace(random_agg)
    old_lps, _, _ = hand(tr.choices, X0, random_agg)
    cm = {(7, "production", "v"): torch.tensor(0.3), (2, "production", "v"): torch.tensor(-1.0),
          (0, "production", "v"): torch.tensor(0.0)}
    new_tr, w, _, discard = tr.update(cm)
    new_lps, _, res = hand(new_tr.choices, X0, random_agg)
    close(w, total(new_lps) - total(old_lps))
    close(new_tr.retval, res)
    assert as_dict(discard).keys() == set(cm)
    # the constrained nodes 0, 2, 7 and node 1 (input changed); node 3 keeps its input
    assert counts["prod"] == 4


@pytest.mark.parametrize("random_agg", [True, False])
def test_random_structural_updates_against_hand_math(random_agg):
    model, _ = make_model(random_agg)
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(25):
        tr = model.simulate(ARGS)
        snap = snapshot(tr)
        old_lps, nodes, _ = hand(tr.choices, X0, random_agg)
        inner = [a for a in old_lps if a[2] == "k"]
        if not inner:
            continue
        a = inner[int(torch.randint(len(inner), (), generator=gen))]
        k_new = int(torch.randint(3, (), generator=gen))
        cm = {a: torch.tensor(k_new), (0, "production", "v"): torch.tensor(0.1)}
        new_tr, w, _, discard = tr.update(cm)
        new_lps, new_nodes, res = hand(new_tr.choices, X0, random_agg)
        assert list(new_tr.nodes) == new_nodes
        fresh = [b for b in new_lps if b not in old_lps and b not in cm]
        close(w, total(new_lps) - total(old_lps) - total(new_lps, fresh))
        close(new_tr.score, total(new_lps))
        close(new_tr.retval, res)
        removed = {b for b in old_lps if b not in new_lps}
        assert as_dict(discard).keys() == removed | set(cm)
        back, w_back, _, _ = new_tr.update(discard)
        assert_same_choices(back.choices, tr.choices)
        close(w_back, total(old_lps) - total(new_lps))
        assert_unchanged(tr, snap)
        seen.add((len(nodes) > len(new_nodes), len(nodes) < len(new_nodes)))
    assert len(seen) == 3  # pruned, grown and same-size updates all happened


def test_deep_chain_is_walked_without_recursion():
    @gf.gen
    def production(inp):
        x, depth = inp
        v = gf.normal(x, 1.0) @ "v"
        return Production(v, [(v, depth + 1)] if depth < 1500 else [])

    @gf.gen
    def aggregation(v, results):
        return v + sum(results)

    model = Recurse(production, aggregation, 1)
    tr = model.simulate(ARGS)
    assert len(tr.nodes) == 1501 and tr.nodes[-1] == 1500
    vs = torch.stack([tr[i, "production", "v"] for i in range(1501)])
    xs = torch.cat([X0.reshape(1), vs[:-1]])
    close(tr.score, norm_lp(vs, xs, 1.0).sum(), 1e-8)
    close(tr.retval, vs.sum(), 1e-8)
    new_tr, w, _, _ = tr.update({(1500, "production", "v"): torch.tensor(0.0)})
    close(w, norm_lp(0.0, vs[-2], 1.0) - norm_lp(vs[-1], vs[-2], 1.0))
    close(new_tr.retval, vs[:-1].sum(), 1e-8)


def test_trace_of_another_function_is_refused():
    model, _ = make_model()
    other, _ = make_model()
    tr = model.simulate(ARGS)
    with pytest.raises(ArgumentError, match="another generative function"):
        other.update(tr, ARGS, (NoChange(),), {(0, "production", "v"): 0.0})
    with pytest.raises(ArgumentError, match="another generative function"):
        other.project(tr, gf.selectall())


@pytest.mark.parametrize("random_agg", [True, False])
def test_structural_update_prunes_subtree_and_reverse_restores(random_agg):
    model, counts, tr = fixed_trace(random_agg)
    snap = snapshot(tr)
    old_lps, _, _ = hand(tr.choices, X0, random_agg)
    new_tr, w, _, discard = tr.update({(1, "production", "k"): torch.tensor(0)})
    new_lps, nodes, res = hand(new_tr.choices, X0, random_agg)
    assert nodes == list(new_tr.nodes) == [0, 1, 2]
    close(new_tr.score, total(new_lps))
    close(w, total(new_lps) - total(old_lps))  # − 0: nothing fresh
    close(new_tr.retval, res)
    expected = {(1, "production", "k")} | {a for a in old_lps if a[0] in (3, 7, 8)}
    assert as_dict(discard).keys() == expected
    assert int(discard[1, "production", "k"]) == 1
    for a in expected - {(1, "production", "k")}:
        assert torch.equal(discard[a], snap[0][a])
    # the reverse update restores the old trace with the opposite weight
    back, w_back, _, discard_back = new_tr.update(discard)
    assert_same_choices(back.choices, tr.choices)
    close(w_back, -w)
    close(back.score, tr.score)
    close(back.retval, tr.retval)
    assert as_dict(discard_back).keys() == {(1, "production", "k")}
    assert_unchanged(tr, snap)


def test_update_constraint_inside_pruned_subtree_is_unvisited():
    _, _, tr = fixed_trace()
    with pytest.raises(UnvisitedConstraintError) as err:
        tr.update({(1, "production", "k"): torch.tensor(0),
                   (7, "production", "v"): torch.tensor(0.0)})
    assert err.value.address == (7, "production", "v")


def test_growing_subtree_via_update_weight_subtracts_fresh_choices():
    model, counts, tr = fixed_trace()
    snap = snapshot(tr)
    old_lps, _, _ = hand(tr.choices, X0)
    grown_sizes = set()
    for _ in range(8):
        new_tr, w, _, discard = tr.update({(2, "production", "k"): torch.tensor(2)})
        new_lps, nodes, res = hand(new_tr.choices, X0)
        assert {5, 6} <= set(nodes)
        fresh = [a for a in new_lps if a not in old_lps]
        assert all(a[0] not in DEPTH for a in fresh)
        close(new_tr.score, total(new_lps))
        close(w, total(new_lps) - total(old_lps) - total(new_lps, fresh))
        assert as_dict(discard).keys() == {(2, "production", "k")}
        grown_sizes.add(len(nodes))
    assert len(grown_sizes) > 1
    # constraints inside the new subtree add their log density to the weight
    cm = {(2, "production", "k"): torch.tensor(1), (5, "production", "v"): torch.tensor(0.3),
          (5, "production", "k"): torch.tensor(0)}
    new_tr, w, _, _ = tr.update(cm)
    new_lps, nodes, _ = hand(new_tr.choices, X0)
    assert nodes == [0, 1, 2, 3, 5, 7, 8]
    fresh = [a for a in new_lps if a not in old_lps and a not in cm]
    assert fresh == [(5, "aggregation", "r")]
    close(w, total(new_lps) - total(old_lps) - total(new_lps, fresh))
    assert float(new_tr[5, "production", "v"]) == 0.3
    assert_unchanged(tr, snap)


# ------------------------------------------------------------------ regenerate / project
def test_regenerate_one_leaf_value_against_hand_math():
    model, counts, tr = fixed_trace()
    snap = snapshot(tr)
    new_tr, w, retdiff = tr.regenerate(gf.select((8, "production", "v")))
    v_new = new_tr[8, "production", "v"]
    assert float(v_new) != VS[8]
    r8 = torch.tensor(RS[8])
    expected = norm_lp(r8, v_new, SIG_AGG) - norm_lp(r8, torch.tensor(VS[8]), SIG_AGG)
    close(w, expected)
    new_lps, _, _ = hand(new_tr.choices, X0)
    close(new_tr.score, total(new_lps))
    assert (counts["prod"], counts["agg"]) == (1, 1)
    assert isinstance(retdiff, NoChange)
    assert_unchanged(tr, snap)


@pytest.mark.parametrize("random_agg", [True, False])
def test_regenerate_weight_is_sum_over_retained_unselected_choices(random_agg):
    model, _, tr = fixed_trace(random_agg)
    snap = snapshot(tr)
    old_lps, _, _ = hand(tr.choices, X0, random_agg)
    selections = [gf.select((1, "production", "k")), gf.select((0, "production")),
                  gf.select(3, (2, "production", "v")), ~gf.select((0, "production", "v")),
                  gf.selectall()]
    shapes = set()
    for sel in selections:
        for _ in range(4):
            new_tr, w, _ = tr.regenerate(sel)
            new_lps, nodes, res = hand(new_tr.choices, X0, random_agg)
            assert list(new_tr.nodes) == nodes
            kept = [a for a in new_lps if a in old_lps and a not in sel]
            close(w, total(new_lps, kept) - total(old_lps, kept))
            close(new_tr.score, total(new_lps))
            close(new_tr.retval, res)
            for a in old_lps:  # unselected retained choices keep their values
                if a not in sel and a in new_lps:
                    assert torch.equal(new_tr[a], tr[a])
            shapes.add(tuple(nodes))
    assert len(shapes) > 2
    assert_unchanged(tr, snap)


def test_regenerate_with_changed_input_and_empty_selection():
    model, _, tr = fixed_trace()
    old_lps, _, _ = hand(tr.choices, X0)
    x1 = torch.tensor(1.5)
    new_tr, w, _ = model.regenerate(tr, ((x1, 0),), (UnknownChange(),), gf.Selection.none())
    new_lps, _, _ = hand(new_tr.choices, x1)
    assert_same_choices(new_tr.choices, tr.choices)
    close(w, total(new_lps) - total(old_lps))
    same, w0, rd = tr.regenerate(gf.Selection.none())
    assert same is tr and float(w0) == 0.0 and isinstance(rd, NoChange)


def test_project():
    model, _, tr = fixed_trace()
    lps, _, _ = hand(tr.choices, X0)
    close(model.project(tr, gf.selectall()), tr.score)
    close(model.project(tr, gf.Selection.none()), 0.0)
    sel = gf.select((0, "production", "v"), 3, (8, "aggregation"))
    chosen = [a for a in lps if a in sel]
    assert len(chosen) == 5
    close(model.project(tr, sel), total(lps, chosen))
    comp = ~sel
    close(tr.project(comp), total(lps, [a for a in lps if a not in sel]))
    close(tr.project(gf.select(42)), 0.0)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("random_agg", [True, False])
def test_choice_gradients_match_finite_differences_and_autograd(random_agg):
    model, _, tr = fixed_trace(random_agg)
    cont = [a for a, _ in tr.choices.items() if a[2] in ("v", "r")]
    sel = gf.select(*cont)
    (arg_grads,), values, grads = model.choice_gradients(tr, sel)
    assert as_dict(values).keys() == set(cont)
    base = as_dict(tr.choices)

    def logp(over: dict[tuple, torch.Tensor], x0: torch.Tensor) -> torch.Tensor:
        cm = dict(base)
        cm.update(over)
        return total(hand(gf.ChoiceMap(cm), x0, random_agg)[0])

    # autograd of the hand-written log density
    leaves = {a: base[a].clone().requires_grad_(True) for a in cont}
    x0 = X0.clone().requires_grad_(True)
    g = torch.autograd.grad(logp(leaves, x0), [x0] + [leaves[a] for a in cont])
    close(arg_grads[0], g[0])
    assert arg_grads[1] is None
    for a, ga in zip(cont, g[1:]):
        close(grads[a], ga)
    # central finite differences of assess
    h = 1e-5
    for a in cont:
        up = gf.ChoiceMap({**base, a: base[a] + h})
        dn = gf.ChoiceMap({**base, a: base[a] - h})
        fd = (model.assess(ARGS, up)[0] - model.assess(ARGS, dn)[0]) / (2 * h)
        close(grads[a], fd, 1e-6)
    fd = (model.assess(((X0 + h, 0),), tr.choices)[0]
          - model.assess(((X0 - h, 0),), tr.choices)[0]) / (2 * h)
    close(arg_grads[0], fd, 1e-6)


def test_accumulate_param_gradients_reaches_kernel_modules():
    lin = torch.nn.Linear(1, 1)

    @gf.gen
    def production(inp):
        x, depth = inp
        v = gf.normal(lin(x.reshape(1)).reshape(()), 1.0) @ "v"
        return Production(v, [(v, depth + 1)] if depth < 2 else [])

    @gf.gen
    def aggregation(v, results):
        return v + sum(results)

    model = Recurse(production, aggregation, 1)
    assert {id(p) for p in model.parameters()} == {id(lin.weight), id(lin.bias)}
    tr = model.simulate(ARGS)
    vs = [tr[i, "production", "v"].detach() for i in (0, 1, 2)]
    xs = [X0, vs[0], vs[1]]
    ret = tr.retval
    model.accumulate_param_gradients(tr, retgrad=torch.tensor(2.0), scale=1.0)
    lp = sum(norm_lp(v, lin.weight[0, 0] * x + lin.bias[0], 1.0) for v, x in zip(vs, xs))
    gw, gb = torch.autograd.grad(lp + 2.0 * ret.detach(), [lin.weight, lin.bias])
    close(lin.weight.grad[0, 0], -gw[0, 0])
    close(lin.bias.grad[0], -gb[0])


# ------------------------------------------------------------------ structure
def test_trace_is_a_pytree_with_static_structure():
    _, _, tr = fixed_trace()
    leaves, spec = pytree.tree_flatten(tr)
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    back = pytree.tree_unflatten([x * 1 for x in leaves], spec)
    assert isinstance(back, RecurseTrace)
    assert back.nodes == tr.nodes and back.num_children == tr.num_children
    assert_same_choices(back.choices, tr.choices)
    close(back.score, tr.score)
    pruned, *_ = tr.update({(1, "production", "k"): torch.tensor(0)})
    assert pytree.tree_flatten(pruned)[1] != spec
    # same structure, other values: same spec
    other, _ = tr.gen_fn.generate(ARGS, gf.ChoiceMap(
        {**as_dict(tr.choices), (0, "production", "v"): torch.tensor(-1.0)}))
    assert pytree.tree_flatten(other)[1] == spec


def test_structural_equality_lets_bodies_build_recurse_afresh():
    model, counts = make_model()
    prod, agg = model.production, model.aggregation
    assert Recurse(prod, agg, 2) == Recurse(prod, agg, 2)
    assert hash(Recurse(prod, agg, 2)) == hash(Recurse(prod, agg, 2))
    assert Recurse(prod, agg, 2) != Recurse(prod, agg, 3)
    assert Recurse(prod, agg, 2) != Recurse(agg, prod, 2)

    @gf.gen
    def outer(x):
        return Recurse(prod, agg, 2)((x, 0)) @ "tree"

    cm = gf.ChoiceMap({("tree",) + a: v for a, v in as_dict(fixed_choices()).items()})
    tr, _ = outer.generate((X0,), cm)
    old_lps, _, _ = hand(tr.choices.get_submap("tree"), X0)
    counts["prod"] = counts["agg"] = 0
    new_tr, w, _, discard = tr.update({("tree", 8, "production", "v"): torch.tensor(-0.6)})
    new_lps, _, _ = hand(new_tr.choices.get_submap("tree"), X0)
    close(w, total(new_lps) - total(old_lps))
    assert (counts["prod"], counts["agg"]) == (1, 1)  # Recurse.update, not a fresh generate
    assert as_dict(discard).keys() == {("tree", 8, "production", "v")}


# ------------------------------------------------------------------ batched depths (simulate)
def test_batch_depths_vmaps_static_productions_and_matches_the_loop():
    counts = {"prod": 0}
    depth_max = 3

    @gf.gen
    def production(inp):
        counts["prod"] += 1
        x, depth = inp
        v = gf.normal(x, 1.0) @ "v"
        return Production(v, [(v, depth + 1), (v + 1.0, depth + 1)] if depth < depth_max
                          else [])

    @gf.gen
    def aggregation(v, results):
        return gf.normal(v + sum(results), SIG_AGG) @ "r"

    looped = Recurse(production, aggregation, 2, batch_depths=False)
    batched = Recurse(production, aggregation, 2)  # batched by depth is the default
    tr = batched.simulate(ARGS)
    assert counts["prod"] == depth_max + 1  # one (vmapped) body run per depth
    assert tr.nodes == tuple(range(2 ** (depth_max + 1) - 1))

    def hand_full(choices: gf.ChoiceMap) -> torch.Tensor:
        lp = torch.tensor(0.0)

        def visit(i: int, x: Any, depth: int) -> Any:
            nonlocal lp
            v = choices[i, "production", "v"]
            lp = lp + norm_lp(v, x, 1.0)
            kids = [(v, depth + 1), (v + 1.0, depth + 1)] if depth < depth_max else []
            rs = [visit(2 * i + k + 1, cx, cd) for k, (cx, cd) in enumerate(kids)]
            r = choices[i, "aggregation", "r"]
            lp = lp + norm_lp(r, v + sum(rs), SIG_AGG)
            return r

        visit(0, X0, 0)
        return lp

    close(tr.score, hand_full(tr.choices))
    # the per-node loop, fully determined by the batched trace's choices, agrees exactly
    counts["prod"] = 0
    ltr, lw = looped.generate(ARGS, tr.choices)
    assert counts["prod"] == len(tr.nodes)
    close(lw, tr.score)
    close(ltr.score, tr.score)
    close(ltr.retval, tr.retval)
    for i in tr.nodes:
        close(ltr.production_trace(i).score, tr.production_trace(i).score)
        for a, b in zip(ltr.production_trace(i).retval.children,
                        tr.production_trace(i).retval.children):
            close(a[0], b[0])
            assert a[1] == b[1]
    # the batched trace works with the rest of the GFI
    new_tr, w, _, _ = tr.update({(5, "production", "v"): torch.tensor(0.0)})
    close(w, hand_full(new_tr.choices) - hand_full(tr.choices))


def test_batch_depths_falls_back_to_loop_for_data_dependent_branching():
    model, counts = make_model(batch_depths=True)
    for k in range(5):
        counts["prod"] = 0
        tr = model.simulate(ARGS)
        lps, nodes, res = hand(tr.choices, X0)
        assert list(tr.nodes) == nodes
        # at most one failed vmap attempt per simulate, then node by node (the first also
        # abandons one run of the body over the whole batch: gfcomb/dsl/whole.py)
        assert len(nodes) <= counts["prod"] <= len(nodes) + (2 if k == 0 else 1)
        close(tr.score, total(lps))
        close(tr.retval, res)
