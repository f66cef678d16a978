"""Tests of the Switch combinator: every GFI method against hand-computed log densities, branch
changes in update/regenerate, Switch inside @gen and under Map with a batched index (checked
element by element against the unbatched Switch), errors and immutability."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import gfcomb as gf
from gfcomb.combinators.map import Map
from gfcomb.combinators.switch import Switch, SwitchTrace
from gfcomb.core.errors import ArgumentError, UnvisitedConstraintError

NC, UC = gf.NoChange(), gf.UnknownChange()
TOL = dict(rtol=0, atol=1e-9)
LOG_2PI = math.log(2 * math.pi)


def lpn(x, mu, s):
    """log N(x; mu, s) written out."""
    x, mu, s = (torch.as_tensor(v, dtype=torch.float64) for v in (x, mu, s))
    return -0.5 * ((x - mu) / s) ** 2 - torch.log(s) - 0.5 * LOG_2PI


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64),
                               torch.as_tensor(b, dtype=torch.float64), **TOL)


# ---------------------------------------------------------------------------- branches
# a and b share "y" and have one address of their own each ("u" / "v").
@gf.gen
def branch_a(x):
    y = gf.normal(x, 1.0) @ "y"
    u = gf.normal(0.0, 2.0) @ "u"
    return y + u


@gf.gen
def branch_b(x):
    y = gf.normal(-x, 0.5) @ "y"
    v = gf.normal(1.0, 1.5) @ "v"
    return y * v


def lp_a(x, y, u):
    return lpn(y, x, 1.0) + lpn(u, 0.0, 2.0)


def lp_b(x, y, v):
    return lpn(y, -x, 0.5) + lpn(v, 1.0, 1.5)


# c and d have the same single address "y".
@gf.gen
def branch_c(x):
    return gf.normal(2.0 * x + 1.0, 0.7) @ "y"


@gf.gen
def branch_d(x):
    return gf.normal(-x, 1.3) @ "y"


def lp_c(x, y):
    return lpn(y, 2.0 * x + 1.0, 0.7)


def lp_d(x, y):
    return lpn(y, -x, 1.3)


SW = Switch(branch_a, branch_b)
SW_CD = Switch(branch_c, branch_d)


def snapshot(trace):
    """A deep copy of a trace's observable state (to check it was not mutated)."""
    return (dict((a, v.clone()) for a, v in trace.choices.items()), trace.score.clone(),
            copy.copy(trace.args))


def assert_unchanged(trace, snap):
    choices, score, args = snap
    now = dict(trace.choices.items())
    assert now.keys() == choices.keys()
    for a in choices:
        assert torch.equal(now[a], choices[a])
    assert torch.equal(trace.score, score)
    assert trace.args == args


def trace_with(sw, index, x, choices):
    tr, w = sw.generate((index, x), choices)
    close(w, tr.score)
    return tr


# ---------------------------------------------------------------------- simulate / generate
def test_simulate_score_is_branch_log_density_and_choices_are_flat():
    for k in (0, 1):
        tr = SW.simulate((k, 0.4))
        assert isinstance(tr, SwitchTrace)
        if k == 0:
            assert set(tr.choices.addresses()) == {("y",), ("u",)}
            close(tr.score, lp_a(0.4, tr["y"], tr["u"]))
            close(tr.retval, tr["y"] + tr["u"])
        else:
            assert set(tr.choices.addresses()) == {("y",), ("v",)}
            close(tr.score, lp_b(0.4, tr["y"], tr["v"]))
            close(tr.retval, tr["y"] * tr["v"])
        assert tr.branch_trace.gen_fn is SW.branches[k]


def test_generate_score_and_weight():
    # partial constraints: weight = log p of the constrained choice; score = branch log p
    tr, w = SW.generate((1, 0.3), {"y": 0.2})
    close(tr["y"], 0.2)
    close(w, lpn(0.2, -0.3, 0.5))
    close(tr.score, lp_b(0.3, 0.2, tr["v"]))  # not 0 (Gen.jl's Switch generate bug)
    # full constraints: weight == score == assess == hand
    tr, w = SW.generate((0, 0.3), {"y": 0.2, "u": -1.1})
    close(w, lp_a(0.3, 0.2, -1.1))
    close(tr.score, w)
    wa, r = SW.assess((0, 0.3), gf.ChoiceMap({"y": 0.2, "u": -1.1}))
    close(wa, w)
    close(r, 0.2 - 1.1)
    # no constraints: weight 0
    tr, w = SW.generate((0, 0.3))
    close(w, 0.0)


def test_tensor_index_outside_vmap_runs_one_branch():
    tr = SW.simulate((torch.tensor(1), 0.3))
    assert not tr.all_branches and tr.index == 1
    assert tr.traces[0] is None
    close(tr.score, lp_b(0.3, tr["y"], tr["v"]))
    tr2 = SW.simulate((torch.tensor(0.0), 0.3))  # an integral float (e.g. a bernoulli value)
    assert tr2.index == 0


def test_propose_and_project():
    choices, w, r = SW.propose((1, 0.5))
    close(w, lp_b(0.5, choices["y"], choices["v"]))
    tr = trace_with(SW, 1, 0.5, {"y": 0.1, "v": 2.0})
    close(SW.project(tr, gf.select("y")), lpn(0.1, -0.5, 0.5))
    close(SW.project(tr, gf.select("v")), lpn(2.0, 1.0, 1.5))
    close(SW.project(tr, gf.selectall()), tr.score)
    close(SW.project(tr, gf.Selection.none()), 0.0)


# ----------------------------------------------------------------------------- update
def test_update_same_branch():
    tr = trace_with(SW, 0, 0.3, {"y": 0.2, "u": -1.1})
    snap = snapshot(tr)
    new, w, rd, discard = SW.update(tr, (0, 0.8), (NC, UC), {"u": 0.5})
    close(new["y"], 0.2)
    close(new["u"], 0.5)
    close(new.score, lp_a(0.8, 0.2, 0.5))
    close(w, lp_a(0.8, 0.2, 0.5) - lp_a(0.3, 0.2, -1.1))
    assert discard.addresses() == [("u",)]
    close(discard["u"], -1.1)
    assert_unchanged(tr, snap)
    # nothing changed: the same trace back
    same, w0, rd0, d0 = SW.update(tr, (0, 0.3), (NC, NC), None)
    assert same is tr and isinstance(rd0, gf.NoChange) and d0.is_empty()
    close(w0, 0.0)


def test_update_branch_change_shared_address_reuses_value():
    tr = trace_with(SW_CD, 0, 0.4, {"y": 1.7})
    snap = snapshot(tr)
    new, w, rd, discard = SW_CD.update(tr, (1, 0.4), (UC, NC), None)
    close(new["y"], 1.7)  # the shared value is reused
    close(new.score, lp_d(0.4, 1.7))
    close(w, lp_d(0.4, 1.7) - lp_c(0.4, 1.7))
    assert discard.is_empty()
    assert isinstance(rd, gf.UnknownChange)
    assert new.index == 1
    assert_unchanged(tr, snap)


def test_update_branch_change_new_addresses():
    tr = trace_with(SW, 0, 0.3, {"y": 0.2, "u": -1.1})
    snap = snapshot(tr)
    new, w, rd, discard = SW.update(tr, (1, 0.3), (UC, NC), None)
    close(new["y"], 0.2)
    v = new["v"]
    assert set(new.choices.addresses()) == {("y",), ("v",)}
    close(new.score, lp_b(0.3, 0.2, v))
    # weight = new score − old score − log q(fresh v) with q the prior
    close(w, lp_b(0.3, 0.2, v) - lp_a(0.3, 0.2, -1.1) - lpn(v, 1.0, 1.5))
    assert discard.addresses() == [("u",)]
    close(discard["u"], -1.1)
    assert_unchanged(tr, snap)

    # the reverse update with the discard restores the old trace
    back, w_back, _, d_back = SW.update(new, (0, 0.3), (UC, NC), discard)
    assert back.index == 0
    assert dict(back.choices.items()).keys() == {("y",), ("u",)}
    close(back["y"], 0.2)
    close(back["u"], -1.1)
    close(back.score, tr.score)
    close(w_back, tr.score - new.score)  # nothing fresh on the way back
    close(w + w_back, -lpn(v, 1.0, 1.5))
    assert d_back.addresses() == [("v",)]
    close(d_back["v"], v)


def test_update_branch_change_with_constraints():
    tr = trace_with(SW, 0, 0.3, {"y": 0.2, "u": -1.1})
    # the constraint overwrites the shared address: the old y goes to the discard too
    new, w, _, discard = SW.update(tr, (1, 0.3), (UC, NC), {"y": -0.4, "v": 2.5})
    close(new["y"], -0.4)
    close(new["v"], 2.5)
    close(w, lp_b(0.3, -0.4, 2.5) - lp_a(0.3, 0.2, -1.1))
    assert set(discard.addresses()) == {("y",), ("u",)}
    close(discard["y"], 0.2)
    close(discard["u"], -1.1)
    # a constraint the new branch does not visit is an error naming it
    with pytest.raises(UnvisitedConstraintError, match="'u'"):
        SW.update(tr, (1, 0.3), (UC, NC), {"u": 0.0})


@gf.gen
def always_c_x(_):
    c = gf.bernoulli(0.5) @ "c"
    x = gf.normal(0.0, 1.0) @ "x"
    return c + x


@gf.gen
def maybe_x(_):
    c = gf.bernoulli(0.3) @ "c"
    if bool(c):
        return gf.normal(1.0, 2.0) @ "x"
    return c


def test_update_branch_change_dynamic_structure_reuses_every_visited_old_choice():
    sw = Switch(always_c_x, maybe_x)
    old = trace_with(sw, 0, None, {"c": 1.0, "x": 0.7})
    for seed in range(6):  # whatever the structure probe samples, x is reused
        torch.manual_seed(seed)
        new, w, _, discard = sw.update(old, (1, None), (UC, NC), None)
        close(new["x"], 0.7)
        close(new["c"], 1.0)
        close(w, (math.log(0.3) + lpn(0.7, 1.0, 2.0)) - (math.log(0.5) + lpn(0.7, 0.0, 1.0)))
        assert discard.is_empty()
    old0 = trace_with(sw, 0, None, {"c": 0.0, "x": 0.7})
    for seed in range(4):
        torch.manual_seed(seed)
        new, w, _, discard = sw.update(old0, (1, None), (UC, NC), None)
        assert new.choices.addresses() == [("c",)]
        close(w, math.log(0.7) - (math.log(0.5) + lpn(0.7, 0.0, 1.0)))
        assert discard.addresses() == [("x",)]


# -------------------------------------------------------------------------- regenerate
def test_regenerate_same_branch():
    tr = trace_with(SW, 1, 0.3, {"y": 0.2, "v": 2.0})
    snap = snapshot(tr)
    new, w, _ = SW.regenerate(tr, (1, 0.6), (NC, UC), gf.select("v"))
    close(new["y"], 0.2)
    # the unselected y is rescored; the selected v contributes 0
    close(w, lpn(0.2, -0.6, 0.5) - lpn(0.2, -0.3, 0.5))
    close(new.score, lp_b(0.6, 0.2, new["v"]))
    assert_unchanged(tr, snap)


def test_regenerate_branch_change():
    tr = trace_with(SW, 0, 0.3, {"y": 0.2, "u": -1.1})
    snap = snapshot(tr)
    # nothing selected: y is retained and reused: weight = log p_b(y) − log p_a(y)
    new, w, rd = SW.regenerate(tr, (1, 0.3), (UC, NC), gf.Selection.none())
    close(new["y"], 0.2)
    close(w, lpn(0.2, -0.3, 0.5) - lpn(0.2, 0.3, 1.0))
    close(new.score, lp_b(0.3, 0.2, new["v"]))
    assert isinstance(rd, gf.UnknownChange)
    # y selected: everything in the new branch is new or selected: weight 0
    new, w, _ = SW.regenerate(tr, (1, 0.3), (UC, NC), gf.select("y"))
    close(w, 0.0)
    close(new.score, lp_b(0.3, new["y"], new["v"]))
    assert not torch.equal(new["y"], torch.tensor(0.2))
    # the removed u (selected or not) contributes 0 either way
    _, w2, _ = SW.regenerate(tr, (1, 0.3), (UC, NC), gf.select("u"))
    close(w2, lpn(0.2, -0.3, 0.5) - lpn(0.2, 0.3, 1.0))
    assert_unchanged(tr, snap)


# ----------------------------------------------------------------------------- inside @gen
@gf.gen
def mixture(x):
    k = gf.bernoulli(0.3) @ "k"
    return Switch(branch_c, branch_d)(int(k), x) @ "s"  # built afresh in every run


def test_switch_inside_gen_contributes_its_score_and_updates_across_branches():
    tr, w = mixture.generate((0.5,), {"k": 1.0, ("s", "y"): 0.9})
    close(tr.score, math.log(0.3) + lp_d(0.5, 0.9))
    close(w, tr.score)
    assert tr.choices.addresses() == [("k",), ("s", "y")]  # flat under "s": no index key
    snap = snapshot(tr)
    new, w, _, discard = mixture.update(tr, (0.5,), (NC,), {"k": 0.0})
    close(new[("s", "y")], 0.9)  # reused across the branch change
    close(new.score, math.log(0.7) + lp_c(0.5, 0.9))
    close(w, new.score - tr.score)
    assert discard.addresses() == [("k",)]
    assert_unchanged(tr, snap)
    new2, w2, _ = mixture.regenerate(tr, (0.5,), (NC,), gf.select("k"))
    if new2["k"] == 0.0:  # switched: y retained and rescored under the other branch
        close(w2, lp_c(0.5, 0.9) - lp_d(0.5, 0.9))
    else:
        close(w2, 0.0)
    close(mixture.project(tr, gf.select(("s", "y"))), lp_d(0.5, 0.9))


def test_structural_equality():
    assert Switch(branch_a, branch_b) == SW
    assert hash(Switch(branch_a, branch_b)) == hash(SW)
    assert Switch(branch_b, branch_a) != SW
    assert Switch(branch_a) != SW


# ------------------------------------------------------------------------------ errors
def test_index_out_of_range_and_bad_arguments():
    with pytest.raises(ArgumentError, match=r"index 2 .*2 branches"):
        SW.simulate((2, 0.3))
    with pytest.raises(ArgumentError, match=r"index -1 .*2 branches"):
        SW.generate((-1, 0.3), {"y": 0.0})
    with pytest.raises(ArgumentError, match=r"index 5 .*2 branches"):
        SW.assess((torch.tensor(5), 0.3), gf.ChoiceMap({"y": 0.0}))
    tr = SW.simulate((0, 0.3))
    with pytest.raises(ArgumentError, match=r"index 3 .*2 branches"):
        SW.update(tr, (3, 0.3), (UC, NC), None)
    with pytest.raises(ArgumentError, match=r"index 7"):
        SW.regenerate(tr, (7, 0.3), (UC, NC), gf.selectall())
    with pytest.raises(ArgumentError, match="integer"):
        SW.simulate((torch.tensor(0.5), 0.3))
    with pytest.raises(ArgumentError, match="index"):
        SW.simulate(("a", 0.3))
    with pytest.raises(ArgumentError, match="index"):
        SW.simulate(())
    with pytest.raises(ArgumentError, match="argdiffs"):
        SW.update(tr, (0, 0.3), (UC,), None)
    with pytest.raises(ArgumentError, match="another generative function"):
        SW_CD.update(tr, (0, 0.3), (UC, NC), None)
    with pytest.raises(ArgumentError):
        Switch()
    with pytest.raises(TypeError, match="branch 1"):
        Switch(branch_a, lambda x: x)
    with pytest.raises(UnvisitedConstraintError, match="'w'"):
        SW.generate((0, 0.3), {"w": 1.0})
    with pytest.raises(gf.MissingChoiceError):
        SW.assess((0, 0.3), gf.ChoiceMap({"y": 0.0}))


# ---------------------------------------------------------------------- gradients
def test_choice_gradients_and_param_gradients():
    tr = trace_with(SW_CD, 1, 0.4, {"y": 1.7})
    arg_grads, values, grads = SW_CD.choice_gradients(tr, gf.select("y"))
    # log N(y; -x, s): d/dy = -(y + x)/s², d/dx = -(y + x)/s²
    s2 = 1.3 ** 2
    close(grads["y"], -(1.7 + 0.4) / s2)
    close(values["y"], 1.7)
    assert arg_grads[0] is None  # the index
    x = torch.tensor(0.4)
    tr = trace_with(SW_CD, 1, x, {"y": 1.7})
    arg_grads, _, _ = SW_CD.choice_gradients(tr, None)
    close(arg_grads[1], -(1.7 + 0.4) / s2)

    lin = torch.nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(0.5)
        lin.bias.fill_(-0.2)

    @gf.gen
    def learned(x):
        return gf.normal(lin(x.reshape(1)).reshape(()), 1.0) @ "y"

    sw = Switch(branch_c, learned)
    assert {id(p) for p in sw.parameters()} == {id(lin.weight), id(lin.bias)}
    tr = trace_with(sw, 1, x, {"y": 1.7})
    lin.zero_grad()
    sw.accumulate_param_gradients(tr, None, 2.0)
    resid = 1.7 - (0.5 * 0.4 - 0.2)  # d log p / d mu = (y - mu)
    close(lin.weight.grad.reshape(()), -2.0 * resid * 0.4)
    close(lin.bias.grad.reshape(()), -2.0 * resid)


# ------------------------------------------------------------ under Map: batched index
IDX = torch.tensor([0, 1, 1, 0, 1])
XS = torch.tensor([0.3, -0.5, 1.2, 0.0, 2.0], dtype=torch.float64)
YS = torch.tensor([0.1, -0.7, 0.4, 1.5, -0.2], dtype=torch.float64)
US = torch.tensor([-1.0, 0.0, 0.0, 0.6, 0.0], dtype=torch.float64)  # used where IDX == 0
VS = torch.tensor([0.0, 2.2, -0.3, 0.0, 1.1], dtype=torch.float64)  # used where IDX == 1


def element_choices(k, i):
    return {"y": YS[i], "u": US[i]} if k == 0 else {"y": YS[i], "v": VS[i]}


def full_constraints(idx):
    cm = {}
    for i, k in enumerate(idx.tolist()):
        for a, v in element_choices(k, i).items():
            cm[(i, a)] = v
    return gf.ChoiceMap(cm)


def assert_element_choices(trace, i, expected):
    sub = trace.choices.get_submap(i)
    got = dict(sub.items())
    assert got.keys() == {(a,) for a in expected}
    for a, v in expected.items():
        close(got[(a,)], v)


def test_map_batched_index_generate_matches_loop_of_unbatched_switch():
    m = Map(SW)
    tr, w = m.generate((IDX, XS), full_constraints(IDX))
    assert tr.inner.all_branches
    total = 0.0
    for i, k in enumerate(IDX.tolist()):
        tr_i, w_i = SW.generate((k, XS[i]), element_choices(k, i))
        close(tr.inner.score[i], tr_i.score)
        close(tr.inner.retval[i], tr_i.retval)
        assert_element_choices(tr, i, element_choices(k, i))
        assert tr.choices.has_value((i, "u")) == (k == 0)
        assert tr.choices.has_value((i, "v")) == (k == 1)
        total = total + w_i
    close(w, total)
    close(tr.score, total)
    close(tr.retval, tr.inner.retval)
    # partial constraints (only y): weight = Σ_i log p_{b_i}(y_i); scores by hand
    cm = gf.ChoiceMap({(i, "y"): YS[i] for i in range(5)})
    tr, w = m.generate((IDX, XS), cm)
    expected_w = sum(lpn(YS[i], XS[i], 1.0) if k == 0 else lpn(YS[i], -XS[i], 0.5)
                     for i, k in enumerate(IDX.tolist()))
    close(w, expected_w)
    for i, k in enumerate(IDX.tolist()):
        if k == 0:
            close(tr.inner.score[i], lp_a(XS[i], YS[i], tr[i, "u"]))
        else:
            close(tr.inner.score[i], lp_b(XS[i], YS[i], tr[i, "v"]))


def test_map_batched_index_simulate_and_project():
    m = Map(SW)
    tr = m.simulate((IDX, XS))
    for i, k in enumerate(IDX.tolist()):
        if k == 0:
            close(tr.inner.score[i], lp_a(XS[i], tr[i, "y"], tr[i, "u"]))
            close(tr.inner.retval[i], tr[i, "y"] + tr[i, "u"])
        else:
            close(tr.inner.score[i], lp_b(XS[i], tr[i, "y"], tr[i, "v"]))
            close(tr.inner.retval[i], tr[i, "y"] * tr[i, "v"])
    close(tr.score, tr.inner.score.sum())
    tr = m.generate((IDX, XS), full_constraints(IDX))[0]
    sel = gf.select((1, "v"), (0, "u"), (3, "y"), (2, "u"))  # (2, "u") is not in element 2
    close(m.project(tr, sel),
          lpn(VS[1], 1.0, 1.5) + lpn(US[0], 0.0, 2.0) + lpn(YS[3], XS[3], 1.0))
    close(m.project(tr, gf.selectall()), tr.score)


def test_map_batched_index_update_matches_loop_of_unbatched_switch():
    m = Map(SW)
    old, _ = m.generate((IDX, XS), full_constraints(IDX))
    snap = snapshot(old)
    new_idx = torch.tensor([1, 1, 0, 0, 0])  # elements 0, 2, 4 change branch
    new_xs = XS + 0.25
    # constrain the fresh addresses of the elements that change branch (fully determined)
    fresh = {0: {"v": 0.9}, 2: {"u": -0.8}, 4: {"u": 0.35}}
    extra = {3: {"y": 0.05}}  # and one element that stays gets a new y
    cm = gf.ChoiceMap({(i, a): v for d in (fresh, extra) for i, e in d.items()
                       for a, v in e.items()})
    new, w, rd, discard = m.update(old, (new_idx, new_xs), (UC, UC), cm)
    total = 0.0
    for i in range(5):
        k_old, k_new = int(IDX[i]), int(new_idx[i])
        old_i = trace_with(SW, k_old, XS[i], element_choices(k_old, i))
        cm_i = {**fresh.get(i, {}), **extra.get(i, {})}
        new_i, w_i, _, d_i = SW.update(old_i, (k_new, new_xs[i]), (UC, UC), cm_i)
        total = total + w_i
        close(new.inner.score[i], new_i.score)
        close(new.inner.retval[i], new_i.retval)
        assert_element_choices(new, i, dict((a[0], v) for a, v in new_i.choices.items()))
        got = dict(discard.get_submap(i).items())
        assert got.keys() == set(dict(d_i.items()).keys())
        for a, v in d_i.items():
            close(got[a], v)
    close(w, total)
    assert_unchanged(old, snap)


def test_map_batched_index_update_without_constraints_hand_math():
    m = Map(SW)
    old, _ = m.generate((IDX, XS), full_constraints(IDX))
    new_idx = torch.tensor([1, 0, 1, 0, 0])  # 0: a→b, 1: b→a, 4: b→a
    new, w, _, discard = m.update(old, (new_idx, XS), (UC, NC), None)
    expected = 0.0
    for i in range(5):
        k_old, k_new = int(IDX[i]), int(new_idx[i])
        close(new[i, "y"], YS[i])  # y is shared: reused
        if k_old == k_new:
            close(new.inner.score[i], old.inner.score[i])
            continue
        if k_new == 1:
            v = new[i, "v"]
            expected = expected + lp_b(XS[i], YS[i], v) - lp_a(XS[i], YS[i], US[i]) \
                - lpn(v, 1.0, 1.5)
            assert dict(discard.get_submap(i).items()).keys() == {("u",)}
            close(discard[i, "u"], US[i])
        else:
            u = new[i, "u"]
            expected = expected + lp_a(XS[i], YS[i], u) - lp_b(XS[i], YS[i], VS[i]) \
                - lpn(u, 0.0, 2.0)
            close(discard[i, "v"], VS[i])
    close(w, expected)
    assert dict(discard.get_submap(2).items()) == {}
    assert dict(discard.get_submap(3).items()) == {}


def test_map_batched_index_regenerate_hand_math():
    m = Map(SW)
    old, _ = m.generate((IDX, XS), full_constraints(IDX))
    snap = snapshot(old)
    new_idx = torch.tensor([1, 1, 0, 0, 1])  # 0: a→b, 2: b→a
    sel = gf.select((2, "y"), (3, "u"))
    new, w, _ = m.regenerate(old, (new_idx, XS), (UC, NC), sel)
    # 0: y retained & unselected: rescored under the new branch; 2: y selected: 0;
    # 3: same branch, u selected: 0; 1, 4: same branch, nothing selected: 0
    close(w, lpn(YS[0], -XS[0], 0.5) - lpn(YS[0], XS[0], 1.0))
    close(new[0, "y"], YS[0])
    close(new[3, "y"], YS[3])
    close(new[1, "v"], VS[1])
    close(new.inner.score[2], lp_a(XS[2], new[2, "y"], new[2, "u"]))
    close(new.inner.score[3], lp_a(XS[3], YS[3], new[3, "u"]))
    assert_unchanged(old, snap)


def test_map_same_address_branches_assess_and_gradients():
    m = Map(SW_CD)
    cm = gf.ChoiceMap({(i, "y"): YS[i] for i in range(5)})
    w, retval = m.assess((IDX, XS), cm)
    per = [lp_c(XS[i], YS[i]) if k == 0 else lp_d(XS[i], YS[i])
           for i, k in enumerate(IDX.tolist())]
    close(w, sum(per))
    close(retval, YS)
    tr, _ = m.generate((IDX, XS), cm)
    arg_grads, _, grads = m.choice_gradients(tr, gf.selectall())
    gy = torch.stack([-(YS[i] - (2 * XS[i] + 1)) / 0.49 if k == 0 else -(YS[i] + XS[i]) / 1.69
                      for i, k in enumerate(IDX.tolist())])
    close(grads[:, "y"], gy)
    gx = torch.stack([2 * (YS[i] - (2 * XS[i] + 1)) / 0.49 if k == 0 else -(YS[i] + XS[i]) / 1.69
                      for i, k in enumerate(IDX.tolist())])
    close(arg_grads[1], gx)


def test_batched_switch_directly_under_vmap_assess_and_missing_choice_is_nan():
    def f(i, x, y, u):
        return SW.assess((i, x), gf.ChoiceMap({"y": y, "u": u}))[0]

    idx = torch.tensor([0, 1, 0])
    w = torch.func.vmap(f, randomness="different")(idx, XS[:3], YS[:3], US[:3])
    close(w[0], lp_a(XS[0], YS[0], US[0]))
    close(w[2], lp_a(XS[2], YS[2], US[2]))
    assert torch.isnan(w[1])  # element 1 is on branch b, whose "v" is missing


def test_map_batched_index_out_of_range_raises_a_named_error():
    # (was: a NaN score for element 1; DESIGN §8: a named error over concrete tensors)
    with pytest.raises(gf.NumericalError, match="element 1 .*index 2 is out of range"):
        Map(SW_CD).simulate((torch.tensor([0, 2, 1]), XS[:3]))


def test_map_batched_index_out_of_range_inside_vmap_gives_nan_score():
    """Inside a user's own vmap the values cannot be read: the score stays NaN."""
    idx = torch.tensor([[0, 2, 1], [0, 1, 1]])
    scores = torch.func.vmap(lambda i: Map(SW_CD).simulate((i, XS[:3])).inner.score,
                             randomness="different")(idx)
    assert torch.isnan(scores[0, 1]) and not torch.isnan(scores[1]).any()


def test_map_batched_index_constraint_errors():
    m = Map(SW)
    # element 0 is on branch a, which has no "v": over concrete tensors a named error for it
    # (DESIGN §8; it was a NaN weight), never a wrong number
    with pytest.raises(UnvisitedConstraintError, match=r"\(0, 'v'\)"):
        m.generate((IDX, XS), {(0, "v"): 1.0, (1, "v"): 1.0})
    _, w = m.generate((IDX, XS), {(1, "v"): 1.0, (0, "u"): 1.0})
    close(w, lpn(1.0, 1.0, 1.5) + lpn(1.0, 0.0, 2.0))
    with pytest.raises(UnvisitedConstraintError, match="'nowhere'"):
        m.generate((IDX, XS), {(0, "nowhere"): 1.0})


def test_map_of_a_random_branch_names_a_constraint_its_branch_did_not_visit():
    # the index is drawn inside each element: a run of the element alone would draw it
    # again, so the unvisited address is read from the element's own trace
    @gf.gen
    def pick(x):
        k = gf.bernoulli(0.5) @ "k"
        return SW(k.long(), x) @ "sw"

    m = Map(pick)
    outcomes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        try:
            tr, w = m.generate((XS[:2],), {(1, "sw", "v"): 0.4})
        except UnvisitedConstraintError as err:
            assert err.address == (1, "sw", "v")
            outcomes.add("branch a")
        else:
            assert tr[1, "k"] == 1 and tr[1, "sw", "v"] == 0.4
            close(w, lpn(0.4, 1.0, 1.5))
            outcomes.add("branch b")
    assert outcomes == {"branch a", "branch b"}  # (both draws occurred in 8 seeds)


def test_map_with_shared_python_index_runs_one_branch():
    m = Map(SW, in_dims=(None, 0))
    tr = m.simulate((1, XS))
    assert not tr.inner.all_branches
    assert set(a[1] for a in tr.choices.addresses()) == {"y", "v"}
    close(tr.score, sum(lp_b(XS[i], tr[i, "y"], tr[i, "v"]) for i in range(5)))


@gf.gen
def scalar_ret(x):
    return gf.normal(x, 1.0) @ "y"


@gf.gen
def vector_ret(x):
    gf.normal(x, 1.0) @ "y"
    return torch.stack([x, x])


def test_batched_index_needs_same_shaped_retvals():
    with pytest.raises(ArgumentError, match="return values"):
        Map(Switch(scalar_ret, vector_ret)).simulate((IDX, XS))


# nested: branches that contain a Map (stacked choices) under a batched index
@gf.gen
def seq_up(xs):
    return Map(branch_c)(xs) @ "ys"


@gf.gen
def seq_down(xs):
    gf.normal(0.0, 1.0) @ "z"
    return Map(branch_d)(xs) @ "ys"


def test_batched_index_with_nested_map_branches():
    sw = Switch(seq_up, seq_down)
    m = Map(sw)
    xs = torch.tensor([[0.1, 0.2, 0.3], [1.0, -1.0, 0.5]])
    idx = torch.tensor([1, 0])
    ys = torch.tensor([[0.5, -0.5, 0.25], [2.0, 1.0, -1.0]])
    cm = gf.ChoiceMap({(i, "ys", j, "y"): ys[i, j] for i in range(2) for j in range(3)})
    cm = cm.merge(gf.ChoiceMap({(0, "z"): 0.3}))
    tr, w = m.generate((idx, xs), cm)
    per0 = lpn(0.3, 0.0, 1.0) + sum(lp_d(xs[0, j], ys[0, j]) for j in range(3))
    per1 = sum(lp_c(xs[1, j], ys[1, j]) for j in range(3))
    close(w, per0 + per1)
    close(tr.inner.score, torch.stack([per0, per1]))
    assert tr.choices.has_value((0, "z")) and not tr.choices.has_value((1, "z"))
    close(tr[1, "ys", 2, "y"], -1.0)
    # switch element 1 to seq_down: ys reused, z fresh
    new, w, _, discard = m.update(tr, (torch.tensor([1, 1]), xs), (UC, NC), None)
    z = new[1, "z"]
    close(w, lpn(z, 0.0, 1.0) + sum(lp_d(xs[1, j], ys[1, j]) for j in range(3))
          - per1 - lpn(z, 0.0, 1.0))
    assert discard.is_empty() or not list(discard.items())


def test_map_vectorize_false_over_switch_refuses_mixed_branches():
    # a Python loop stacks one-branch traces, keeping element 0's branch: that must not be
    # read as if every element were on it
    # read as if every element were on it (Map's loop may refuse them itself; if it does not,
    # the Switch trace refuses to be read)
    with pytest.raises(ArgumentError, match="(different branches were stacked)|(Switch on "
                       "another branch)"):
        tr = Map(SW_CD, vectorize=False).simulate((IDX, XS))
        tr.choices.items()
    # every element on one branch: fine
    tr = Map(SW_CD, vectorize=False).simulate((torch.ones(5, dtype=torch.long), XS))
    close(tr.score, sum(lp_d(XS[i], tr[i, "y"]) for i in range(5)))


def test_map_partial_revisit_with_vector_diff():
    m = Map(SW)
    old, _ = m.generate((IDX, XS), full_constraints(IDX))
    snap = snapshot(old)
    new_idx = IDX.clone()
    new_idx[2] = 0  # only element 2 changes branch (b → a)
    new, w, rd, discard = m.update(old, (new_idx, XS), (gf.VectorDiff(5, 5, {2}), NC),
                                   {(2, "u"): 0.45})
    close(w, lp_a(XS[2], YS[2], 0.45) - lp_b(XS[2], YS[2], VS[2]))
    close(new[2, "y"], YS[2])
    close(new[2, "u"], 0.45)
    assert not new.choices.has_value((2, "v"))
    assert discard.addresses() == [(2, "v")]
    for i in (0, 1, 3, 4):
        close(new.inner.score[i], old.inner.score[i])
        assert_element_choices(new, i, element_choices(int(IDX[i]), i))
    # constraints only, index unchanged (NoChange): every element stays on its branch
    new, w, _, discard = m.update(old, (IDX, XS), (NC, NC), {(1, "v"): 0.0, (3, "y"): 0.0})
    close(w, lpn(0.0, 1.0, 1.5) - lpn(VS[1], 1.0, 1.5)
          + lpn(0.0, XS[3], 1.0) - lpn(YS[3], XS[3], 1.0))
    assert set(discard.addresses()) == {(1, "v"), (3, "y")}
    assert_unchanged(old, snap)


probs = torch.tensor([0.25, 0.75], dtype=torch.float64)


@gf.gen
def mixture_kernel(x):
    k = gf.categorical(probs) @ "k"
    return Switch(branch_c, branch_d)(k, x) @ "s"


def mixture_kernel_lp(k, x, y):
    return math.log(float(probs[k])) + (lp_c(x, y) if k == 0 else lp_d(x, y))


def test_index_from_a_choice_inside_a_mapped_gen_kernel():
    m = Map(mixture_kernel)
    ks = torch.tensor([1, 0, 0, 1, 1])
    cm = gf.ChoiceMap({**{(i, "k"): ks[i] for i in range(5)},
                       **{(i, "s", "y"): YS[i] for i in range(5)}})
    tr, w = m.generate((XS,), cm)
    per = [mixture_kernel_lp(int(ks[i]), XS[i], YS[i]) for i in range(5)]
    close(w, sum(per))
    for i in range(5):  # against the unbatched kernel, element by element
        tr_i, w_i = mixture_kernel.generate((XS[i],), {"k": ks[i], ("s", "y"): YS[i]})
        close(tr.inner.score[i], tr_i.score)
        close(tr.inner.score[i], per[i])
    # flip the component of elements 0 and 2: y is kept and rescored under the other branch
    new_ks = ks.clone()
    new_ks[0], new_ks[2] = 0, 1
    new, wu, _, discard = m.update(tr, (XS,), (NC,), {(0, "k"): new_ks[0], (2, "k"): new_ks[2]})
    per_new = [mixture_kernel_lp(int(new_ks[i]), XS[i], YS[i]) for i in range(5)]
    close(wu, sum(per_new) - sum(per))
    close(new.inner.score, torch.stack(per_new))
    close(new[:, "s", "y"], YS)
    assert set(discard.addresses()) == {(0, "k"), (2, "k")}
    # regenerate k everywhere: y is retained and rescored where the component changed
    reg, wr, _ = m.regenerate(tr, (XS,), (NC,), gf.select(*[(i, "k") for i in range(5)]))
    reg_ks = reg[:, "k"]
    expected = 0.0
    for i in range(5):
        k_old, k_new = int(ks[i]), int(reg_ks[i])
        lp = (lp_c, lp_d)
        expected = expected + lp[k_new](XS[i], YS[i]) - lp[k_old](XS[i], YS[i])
        close(reg.inner.score[i], mixture_kernel_lp(k_new, XS[i], YS[i]))
    close(wr, expected)
    close(reg[:, "s", "y"], YS)


def test_map_batched_shared_address_has_no_mask_and_reuse_discards_nothing():
    m = Map(SW_CD)
    cm = gf.ChoiceMap({(i, "y"): YS[i] for i in range(5)})
    tr, _ = m.generate((IDX, XS), cm)
    assert tr.inner.choices.get_submap("y").mask is None  # every branch has "y"
    new, w, _, discard = m.update(tr, (1 - IDX, XS), (UC, NC), None)
    assert discard.is_empty()
    per = [lp_d(XS[i], YS[i]) - lp_c(XS[i], YS[i]) if k == 0
           else lp_c(XS[i], YS[i]) - lp_d(XS[i], YS[i]) for i, k in enumerate(IDX.tolist())]
    close(w, sum(per))
    close(new[:, "y"], YS)


def test_choice_gradients_of_batched_switch_with_different_addresses():
    tr = Map(SW).generate((IDX, XS), full_constraints(IDX))[0]
    grads = torch.func.vmap(lambda t: SW.choice_gradients(t, gf.selectall())[2],
                            randomness="different")(tr.inner)
    for i, k in enumerate(IDX.tolist()):
        if k == 0:  # y ~ N(x, 1), u ~ N(0, 2)
            close(grads.get_submap("y").get_value()[i], -(YS[i] - XS[i]))
            close(grads.get_submap("u").get_value()[i], -US[i] / 4.0)
        else:  # y ~ N(-x, 0.5), v ~ N(1, 1.5)
            close(grads.get_submap("y").get_value()[i], -(YS[i] + XS[i]) / 0.25)
            close(grads.get_submap("v").get_value()[i], -(VS[i] - 1.0) / 2.25)
    # the gradient map reports, element by element, only the chosen branch's addresses
    assert bool(grads.get_submap("u").mask[0]) and not bool(grads.get_submap("u").mask[1])


# ------------------------------------------------- regressions: assess / gradients of Map(Switch)
def test_map_batched_index_assess_with_branch_specific_addresses_matches_loop():
    # regression: require_dense took "not in this element's branch" masks for missing choices
    m = Map(SW)
    w, retval = m.assess((IDX, XS), full_constraints(IDX))
    total = 0.0
    for i, k in enumerate(IDX.tolist()):
        w_i, r_i = SW.assess((k, XS[i]), gf.ChoiceMap(element_choices(k, i)))
        close(w_i, lp_a(XS[i], YS[i], US[i]) if k == 0 else lp_b(XS[i], YS[i], VS[i]))
        close(retval[i], r_i)
        total = total + w_i
    close(w, total)
    # the same choices given stacked, "u" / "v" masked by the branch
    flags0, flags1 = IDX == 0, IDX == 1
    stacked = gf.ChoiceMap.stacked(gf.ChoiceMap.node({
        "y": gf.ChoiceMap.value(YS), "u": gf.ChoiceMap.value(US, flags0),
        "v": gf.ChoiceMap.value(VS, flags1)}), 5)
    close(m.assess((IDX, XS), stacked)[0], total)


def test_map_batched_index_assess_missing_choice_raises_naming_the_address():
    m = Map(SW)
    cm = {a: v for a, v in full_constraints(IDX).items() if a != (3, "u")}
    with pytest.raises(gf.MissingChoiceError, match=r"\(3, 'u'\)"):
        m.assess((IDX, XS), gf.ChoiceMap(cm))
    cm = {a: v for a, v in full_constraints(IDX).items() if a != (2, "y")}
    with pytest.raises(gf.MissingChoiceError, match=r"\(2, 'y'\)"):
        m.assess((IDX, XS), gf.ChoiceMap(cm))
    # only y given for a kernel that needs y: still the plain missing-choice error
    with pytest.raises(gf.MissingChoiceError, match=r"\(4, 'y'\)"):
        Map(SW_CD).assess((IDX, XS), gf.ChoiceMap({(i, "y"): YS[i] for i in range(4)}))


def test_map_batched_index_choice_gradients_with_branch_specific_addresses():
    m = Map(SW)
    tr, _ = m.generate((IDX, XS), full_constraints(IDX))
    arg_grads, values, grads = m.choice_gradients(tr, gf.selectall())
    for i, k in enumerate(IDX.tolist()):
        tr_i, _ = SW.generate((k, XS[i]), gf.ChoiceMap(element_choices(k, i)))
        ag_i, _, g_i = SW.choice_gradients(tr_i, gf.selectall())
        close(arg_grads[1][i], ag_i[1])
        got = dict(grads.get_submap(i).items())
        assert got.keys() == {(a,) for a in element_choices(k, i)}
        for a, g in g_i.items():
            close(got[a], g)
    # by hand: y ~ N(x, 1) on a, N(-x, 0.5) on b
    gx = torch.stack([YS[i] - XS[i] if k == 0 else -(YS[i] + XS[i]) / 0.25
                      for i, k in enumerate(IDX.tolist())])
    close(arg_grads[1], gx)
