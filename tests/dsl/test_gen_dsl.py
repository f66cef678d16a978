"""The @gen language and the GFI of @gen functions, checked against hand-computed math.

Every weight below is compared with log densities written out by hand (``math`` / scipy),
in float64 with tolerance 1e-10, never with the library's own numbers.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import gfcomb as gf
from gfcomb import ChoiceMap
from gfcomb.core.pytree import register_record

TOL = 1e-10
LOG2PI = math.log(2.0 * math.pi)


def lnorm(x, m, s):
    """log N(x; m, s²) by hand."""
    x, m, s = f(x), f(m), f(s)
    return -0.5 * ((x - m) / s) ** 2 - math.log(s) - 0.5 * LOG2PI


def lbern(x, p):
    return math.log(p) if float(x) == 1.0 else math.log1p(-p)


def close(a, b, tol=TOL):
    a = float(a) if not isinstance(a, torch.Tensor) else a.detach()
    b = float(b) if not isinstance(b, torch.Tensor) else b.detach()
    assert abs(torch.as_tensor(a) - torch.as_tensor(b)).max() <= tol, (a, b)


def f(x):
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def snapshot(tr):
    """Clones of everything observable about a trace, to check it is not mutated."""
    return ({a: v.detach().clone() for a, v in tr.choices.items()},
            tr.score.detach().clone(),
            tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in tr.args))


def assert_snapshot(tr, snap):
    choices, score, args = snap
    now = dict(tr.choices.items())
    assert now.keys() == choices.keys()
    for a, v in choices.items():
        assert torch.equal(now[a], v), a
    assert torch.equal(tr.score, score)
    for a, b in zip(tr.args, args):
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b


# =================================================================================== models
@gf.gen
def line(x):
    slope = gf.normal(0.0, 1.0) @ "slope"
    return gf.normal(slope * x, 0.5) @ "y"


def line_logp(slope, y, x):
    return lnorm(slope, 0.0, 1.0) + lnorm(y, f(slope) * f(x), 0.5)


@gf.gen
def chain(mu):
    a = gf.normal(mu, 1.0) @ "a"
    b = gf.normal(a, 2.0) @ "b"
    c = gf.normal(b, 0.5) @ "c"
    return c


def chain_logp(a, b, c, mu):
    return lnorm(a, mu, 1.0) + lnorm(b, a, 2.0) + lnorm(c, b, 0.5)


@gf.gen
def branchy(p):
    coin = gf.bernoulli(p) @ "coin"
    if f(coin) == 1.0:
        x = gf.normal(0.0, 1.0) @ "u"
    else:
        x = gf.normal(3.0, 2.0) @ "v"
    return gf.normal(x, 1.0) @ "obs"


def branchy_logp(tr, p):
    if f(tr["coin"]) == 1.0:
        x = tr["u"]
        lp = lbern(1.0, p) + lnorm(x, 0.0, 1.0)
    else:
        x = tr["v"]
        lp = lbern(0.0, p) + lnorm(x, 3.0, 2.0)
    return lp + lnorm(tr["obs"], x, 1.0)


@gf.gen
def sub(m):
    return gf.normal(m, 1.0) @ "z"


@gf.gen
def hier(x):
    a = gf.normal(0.0, 1.0) @ "a"
    s = sub(a + x) @ "s"
    total = 0.0
    for i in range(3):
        total = total + gf.normal(s, 0.5) @ ("y", i)
    return total


def hier_logp(tr, x):
    lp = lnorm(tr["a"], 0.0, 1.0) + lnorm(tr["s", "z"], f(tr["a"]) + f(x), 1.0)
    return lp + sum(lnorm(tr["y", i], tr["s", "z"], 0.5) for i in range(3))


# ================================================================================ generate
def test_hand_density_matches_scipy():
    assert abs(lnorm(0.3, -1.0, 2.5) - stats.norm(-1.0, 2.5).logpdf(0.3)) < 1e-12
    assert abs(lbern(1.0, 0.3) - stats.bernoulli(0.3).logpmf(1)) < 1e-12


def test_generate_full_constraints_weight_score_assess_equal_hand():
    x = 1.7
    cm = {"slope": 0.4, "y": 0.2}
    tr, w = line.generate((x,), cm)
    hand = line_logp(0.4, 0.2, x)
    close(w, hand)
    close(tr.score, hand)
    aw, ret = line.assess((x,), cm)
    close(aw, hand)
    close(ret, 0.2)
    close(tr.retval, 0.2)
    close(tr["slope"], 0.4)


def test_generate_full_constraints_with_choicemap_and_tensor_args():
    mu = torch.tensor(0.25)
    cm = ChoiceMap({"a": 1.0, "b": -0.5, "c": 0.1})
    tr, w = chain.generate((mu,), cm)
    hand = chain_logp(1.0, -0.5, 0.1, 0.25)
    close(w, hand)
    close(tr.score, hand)
    close(chain.assess((mu,), cm)[0], hand)


def test_generate_partial_constraints_weight_is_constrained_log_density():
    x = 2.0
    tr, w = line.generate((x,), {"y": 1.1})
    close(w, lnorm(1.1, f(tr["slope"]) * x, 0.5))
    close(tr.score, line_logp(tr["slope"], 1.1, x))
    tr, w = line.generate((x,), {"slope": -0.3})
    close(w, lnorm(-0.3, 0.0, 1.0))
    close(tr.score, line_logp(-0.3, tr["y"], x))


def test_generate_partial_constraints_on_middle_of_chain():
    tr, w = chain.generate((0.0,), {"b": 0.7})
    close(w, lnorm(0.7, tr["a"], 2.0))
    close(tr.score, chain_logp(tr["a"], 0.7, tr["c"], 0.0))


@pytest.mark.parametrize("empty", [None, {}, ChoiceMap.empty()])
def test_generate_empty_constraints_weight_zero(empty):
    tr, w = line.generate((1.0,), empty)
    assert f(w) == 0.0
    close(tr.score, line_logp(tr["slope"], tr["y"], 1.0))


def test_generate_branch_with_bernoulli_constraint():
    tr, w = branchy.generate((0.3,), {"coin": 1.0, "u": 0.5, "obs": 0.2})
    close(w, lbern(1.0, 0.3) + lnorm(0.5, 0.0, 1.0) + lnorm(0.2, 0.5, 1.0))
    close(tr.score, w)
    assert set(tr.choices.addresses()) == {("coin",), ("u",), ("obs",)}
    tr, w = branchy.generate((0.3,), {"coin": 0.0})
    assert set(tr.choices.addresses()) == {("coin",), ("v",), ("obs",)}
    close(w, lbern(0.0, 0.3))


def test_simulate_score_is_hand_log_density():
    tr = chain.simulate((0.5,))
    close(tr.score, chain_logp(tr["a"], tr["b"], tr["c"], 0.5))
    close(tr.retval, tr["c"])
    assert tr.gen_fn is chain and tr.args == (0.5,)
    assert tr.get_score() is tr.score and tr.get_retval() is tr.retval
    assert tr.get_args() == (0.5,) and tr.get_choices() is tr.choices


def test_propose_weight_is_the_score():
    choices, w, ret = chain.propose((0.0,))
    close(w, chain_logp(choices["a"], choices["b"], choices["c"], 0.0))
    close(ret, choices["c"])


def test_assess_matches_simulated_score():
    tr = hier.simulate((0.5,))
    w, ret = hier.assess((0.5,), tr.choices)
    close(w, hier_logp(tr, 0.5))
    close(w, tr.score)
    close(ret, tr.retval)


# ================================================================================== update
def test_update_constraint_weight_discard_and_reverse():
    x = 1.5
    tr, _ = line.generate((x,), {"slope": 0.4, "y": 0.2})
    new, w, retdiff, discard = line.update(tr, (x,), (gf.NoChange(),), {"slope": -0.1})
    close(w, line_logp(-0.1, 0.2, x) - line_logp(0.4, 0.2, x))
    close(new.score, line_logp(-0.1, 0.2, x))
    close(new["slope"], -0.1)
    close(new["y"], 0.2)
    assert discard.addresses() == [("slope",)]
    close(discard["slope"], 0.4)
    back, w2, _, discard2 = line.update(new, (x,), (gf.NoChange(),), discard)
    close(w2, -w)
    close(back["slope"], 0.4)
    close(back["y"], 0.2)
    close(back.score, tr.score)
    assert discard2.addresses() == [("slope",)]
    close(discard2["slope"], -0.1)


def test_update_argument_change_weight_is_score_difference():
    tr, _ = line.generate((1.0,), {"slope": 0.4, "y": 0.2})
    new, w, _, discard = line.update(tr, (3.0,), (gf.UnknownChange(),), None)
    close(w, line_logp(0.4, 0.2, 3.0) - line_logp(0.4, 0.2, 1.0))
    close(new.score, line_logp(0.4, 0.2, 3.0))
    assert discard.is_empty()
    assert new.args == (3.0,)


def test_update_argument_change_and_constraint():
    tr, _ = chain.generate((0.0,), {"a": 0.1, "b": 0.2, "c": 0.3})
    new, w, _, discard = chain.update(tr, (1.0,), (gf.UnknownChange(),), {"b": -1.0})
    close(w, chain_logp(0.1, -1.0, 0.3, 1.0) - chain_logp(0.1, 0.2, 0.3, 0.0))
    close(discard["b"], 0.2)
    assert discard.addresses() == [("b",)]


def test_update_nothing_changes_weight_zero_same_trace():
    tr = chain.simulate((0.0,))
    new, w, retdiff, discard = chain.update(tr, (0.0,), (gf.NoChange(),), None)
    assert f(w) == 0.0 and discard.is_empty()
    assert isinstance(retdiff, gf.NoChange)
    close(new.score, tr.score)


def test_update_argdiffs_none_means_unknown():
    tr, _ = line.generate((1.0,), {"slope": 0.4, "y": 0.2})
    _, w, _, _ = line.update(tr, (2.0,), None, None)
    close(w, line_logp(0.4, 0.2, 2.0) - line_logp(0.4, 0.2, 1.0))


def test_update_structure_change_weight_and_discard():
    p = 0.3
    tr, _ = branchy.generate((p,), {"coin": 1.0, "u": 0.5, "obs": 0.2})
    new, w, _, discard = branchy.update(tr, (p,), (gf.NoChange(),), {"coin": 0.0})
    v = new["v"]  # freshly sampled from the prior
    assert set(new.choices.addresses()) == {("coin",), ("v",), ("obs",)}
    old_lp = lbern(1.0, p) + lnorm(0.5, 0.0, 1.0) + lnorm(0.2, 0.5, 1.0)
    new_lp = lbern(0.0, p) + lnorm(v, 3.0, 2.0) + lnorm(0.2, v, 1.0)
    close(new.score, new_lp)
    close(w, new_lp - old_lp - lnorm(v, 3.0, 2.0))
    assert set(discard.addresses()) == {("coin",), ("u",)}
    close(discard["u"], 0.5)
    close(discard["coin"], 1.0)
    # the reverse move: constrain back with the discard; no fresh choices this time
    back, w2, _, discard2 = branchy.update(new, (p,), (gf.NoChange(),), discard)
    close(back.score, tr.score)
    close(back["u"], 0.5)
    assert set(back.choices.addresses()) == {("coin",), ("u",), ("obs",)}
    close(w2, old_lp - new_lp)
    close(w2, -(w + lnorm(v, 3.0, 2.0)))
    assert set(discard2.addresses()) == {("coin",), ("v",)}
    close(discard2["v"], v)


def test_update_structure_change_with_the_new_branch_constrained():
    p = 0.6
    tr, _ = branchy.generate((p,), {"coin": 1.0, "u": 0.5, "obs": 0.2})
    new, w, _, discard = branchy.update(tr, (p,), (gf.NoChange(),), {"coin": 0.0, "v": 2.5})
    old_lp = lbern(1.0, p) + lnorm(0.5, 0.0, 1.0) + lnorm(0.2, 0.5, 1.0)
    new_lp = lbern(0.0, p) + lnorm(2.5, 3.0, 2.0) + lnorm(0.2, 2.5, 1.0)
    close(w, new_lp - old_lp)
    back, w2, _, _ = branchy.update(new, (p,), (gf.NoChange(),), discard)
    close(w2, -w)
    close(back.score, tr.score)


def test_update_nested_constraint():
    tr, _ = hier.generate((0.0,), {"a": 0.1, ("s", "z"): 0.3, "y": {0: 0.0, 1: 0.5, 2: 1.0}})
    new, w, _, discard = hier.update(tr, (0.0,), (gf.NoChange(),), {("s", "z"): -0.2})
    close(w, hier_logp(new, 0.0) - hier_logp(tr, 0.0))
    close(new["s", "z"], -0.2)
    assert discard.addresses() == [("s", "z")]
    close(discard["s", "z"], 0.3)


# ============================================================================== regenerate
def test_regenerate_weight_is_mh_log_acceptance_ratio():
    tr, _ = chain.generate((0.0,), {"a": 0.3, "b": -0.4, "c": 0.9})
    new, w, _ = chain.regenerate(tr, (0.0,), (gf.NoChange(),), gf.select("a"))
    a2 = new["a"]
    assert f(a2) != 0.3
    close(new["b"], -0.4)
    close(new["c"], 0.9)
    # retained unselected choices: b (depends on a) and c (does not)
    close(w, lnorm(-0.4, a2, 2.0) - lnorm(-0.4, 0.3, 2.0))
    # the same thing written as the MH ratio p(t')q(t|t') / p(t)q(t'|t) with prior proposals
    mh = (chain_logp(a2, -0.4, 0.9, 0.0) - chain_logp(0.3, -0.4, 0.9, 0.0)
          - (lnorm(a2, 0.0, 1.0) - lnorm(0.3, 0.0, 1.0)))
    close(w, mh)
    close(new.score, chain_logp(a2, -0.4, 0.9, 0.0))


def test_regenerate_middle_choice():
    tr, _ = chain.generate((0.0,), {"a": 0.3, "b": -0.4, "c": 0.9})
    new, w, _ = chain.regenerate(tr, (0.0,), (gf.NoChange(),), gf.select("b"))
    b2 = new["b"]
    close(new["a"], 0.3)
    close(w, lnorm(0.9, b2, 0.5) - lnorm(0.9, -0.4, 0.5))


def test_regenerate_empty_selection_weight_zero_same_trace():
    tr = chain.simulate((0.0,))
    for sel in (gf.Selection.none(), gf.select()):
        new, w, retdiff = chain.regenerate(tr, (0.0,), (gf.NoChange(),), sel)
        assert f(w) == 0.0
        assert isinstance(retdiff, gf.NoChange)
        for a, v in tr.choices.items():
            assert torch.equal(new[a], v)
        assert torch.equal(new.score, tr.score)


def test_regenerate_argument_change_only():
    tr, _ = chain.generate((0.0,), {"a": 0.3, "b": -0.4, "c": 0.9})
    new, w, _ = chain.regenerate(tr, (1.0,), (gf.UnknownChange(),), gf.Selection.none())
    close(w, lnorm(0.3, 1.0, 1.0) - lnorm(0.3, 0.0, 1.0))
    close(new.score, chain_logp(0.3, -0.4, 0.9, 1.0))


def test_regenerate_nested_selection_with_dependents():
    tr, _ = hier.generate((0.5,), {"a": 0.1, ("s", "z"): 0.3, "y": {0: 0.0, 1: 0.5, 2: 1.0}})
    new, w, _ = hier.regenerate(tr, (0.5,), (gf.NoChange(),), gf.select(("s", "z")))
    z2 = new["s", "z"]
    close(new["a"], 0.1)
    close(w, sum(lnorm(y, z2, 0.5) - lnorm(y, 0.3, 0.5) for y in (0.0, 0.5, 1.0)))
    close(new.score, hier_logp(new, 0.5))


def test_regenerate_selectall_weight_zero():
    tr = hier.simulate((0.0,))
    new, w, _ = hier.regenerate(tr, (0.0,), (gf.NoChange(),), gf.selectall())
    assert f(w) == 0.0
    close(new.score, hier_logp(new, 0.0))


def test_regenerate_structure_change_weight():
    @gf.gen
    def model():
        coin = gf.bernoulli(0.5) @ "coin"
        if f(coin) == 1.0:
            x = gf.normal(0.0, 1.0) @ "u"
        else:
            x = gf.normal(3.0, 2.0) @ "v"
        return gf.normal(x, 1.0) @ "obs"

    tr, _ = model.generate((), {"coin": 1.0, "u": 0.5, "obs": 0.2})
    for _ in range(8):  # both outcomes of the coin show up with probability 1 - 2^-8
        new, w, _ = model.regenerate(tr, (), (), gf.select("coin"))
        x_new = new["u"] if f(new["coin"]) == 1.0 else new["v"]
        # only "obs" is retained and unselected
        close(w, lnorm(0.2, x_new, 1.0) - lnorm(0.2, 0.5, 1.0))
        close(new.score, branchy_logp(new, 0.5))


def test_regenerate_with_argument_change_and_selection():
    tr, _ = chain.generate((0.0,), {"a": 0.3, "b": -0.4, "c": 0.9})
    new, w, _ = chain.regenerate(tr, (1.5,), (gf.UnknownChange(),), gf.select("b"))
    b2 = new["b"]
    close(new["a"], 0.3)
    close(new["c"], 0.9)
    # retained, unselected: a (its argument mu changed) and c (its parent b was resampled)
    close(w, lnorm(0.3, 1.5, 1.0) - lnorm(0.3, 0.0, 1.0)
          + lnorm(0.9, b2, 0.5) - lnorm(0.9, -0.4, 0.5))


# ================================================================================= project
def test_project_selected_hand_densities():
    tr, _ = chain.generate((0.0,), {"a": 0.3, "b": -0.4, "c": 0.9})
    close(chain.project(tr, gf.select("a")), lnorm(0.3, 0.0, 1.0))
    close(chain.project(tr, gf.select("b", "c")), lnorm(-0.4, 0.3, 2.0) + lnorm(0.9, -0.4, 0.5))
    close(chain.project(tr, gf.selectall()), tr.score)
    assert f(chain.project(tr, gf.Selection.none())) == 0.0
    close(tr.project(gf.select("c")), lnorm(0.9, -0.4, 0.5))


def test_project_is_additive():
    tr = hier.simulate((0.2,))
    for s in (gf.select("a"), gf.select("y"), gf.select(("s", "z"), ("y", 1)), gf.select("s")):
        close(hier.project(tr, s) + hier.project(tr, ~s), tr.score)
    a = hier.project(tr, gf.select("a"))
    y = hier.project(tr, gf.select("y"))
    close(hier.project(tr, gf.select("a", "y")), a + y)


def test_project_nested_and_tuple_addresses():
    tr, _ = hier.generate((0.0,), {"a": 0.1, ("s", "z"): 0.3, "y": {0: 0.0, 1: 0.5, 2: 1.0}})
    close(hier.project(tr, gf.select(("s", "z"))), lnorm(0.3, 0.1, 1.0))
    close(hier.project(tr, gf.select(("y", 1))), lnorm(0.5, 0.3, 0.5))
    close(hier.project(tr, gf.select("y")),
          sum(lnorm(y, 0.3, 0.5) for y in (0.0, 0.5, 1.0)))


# =========================================================================== hierarchical
def test_nested_call_addresses_and_reads():
    tr = hier.simulate((0.0,))
    addrs = set(tr.choices.addresses())
    assert addrs == {("a",), ("s", "z"), ("y", 0), ("y", 1), ("y", 2)}
    assert torch.equal(tr["s", "z"], tr.choices["s", "z"])
    assert torch.equal(tr[("y", 2)], tr.choices["y", 2])
    st = tr.subtrace("s")
    assert st.gen_fn is sub
    close(st.score, lnorm(st["z"], f(tr["a"]), 1.0))
    close(tr.score, hier_logp(tr, 0.0))
    close(tr.retval, sum(f(tr["y", i]) for i in range(3)), 1e-12)


def test_deeper_nesting():
    @gf.gen
    def outer():
        return hier(1.0) @ "h"

    tr = outer.simulate(())
    assert ("h", "s", "z") in tr.choices
    assert torch.equal(tr["h", "s", "z"], tr.subtrace("h")["s", "z"])
    _, w = outer.generate((), {("h", "s", "z"): 0.25, ("h", "a"): 0.0})
    close(w, lnorm(0.0, 0.0, 1.0) + lnorm(0.25, 1.0, 1.0))


def test_tuple_addresses_in_a_loop():
    @gf.gen
    def model(n):
        for i in range(n):
            gf.normal(float(i), 1.0) @ ("y", i)

    tr, w = model.generate((4,), {("y", i): 0.5 * i for i in range(4)})
    close(w, sum(lnorm(0.5 * i, i, 1.0) for i in range(4)))
    close(tr["y", 3], 1.5)
    assert set(tr.choices.get_submap("y").keys()) == {0, 1, 2, 3}


def test_splice_places_choices_in_the_callers_namespace():
    @gf.gen
    def model(m):
        a = gf.normal(0.0, 1.0) @ "a"
        return gf.splice(sub(a + m))

    tr, w = model.generate((1.0,), {"a": 0.5, "z": 2.0})
    assert set(tr.choices.addresses()) == {("a",), ("z",)}
    close(w, lnorm(0.5, 0.0, 1.0) + lnorm(2.0, 1.5, 1.0))
    close(tr.retval, 2.0)
    new, w2, _, discard = model.update(tr, (1.0,), (gf.NoChange(),), {"z": 0.0})
    close(w2, lnorm(0.0, 1.5, 1.0) - lnorm(2.0, 1.5, 1.0))
    close(discard["z"], 2.0)


def test_splice_only_accepts_gen_calls():
    @gf.gen
    def model():
        return gf.splice(gf.normal(0.0, 1.0))

    with pytest.raises(TypeError, match="splice"):
        model.simulate(())


def test_trace_getitem_missing_names_the_full_address():
    tr = hier.simulate((0.0,))
    with pytest.raises(gf.AddressError) as info:
        tr["s", "nope"]
    assert "('s', 'nope')" in str(info.value)
    with pytest.raises(KeyError, match="nope"):
        tr["nope"]
    with pytest.raises(gf.AddressError, match="'q'"):
        tr.subtrace("q")


def test_traced_call_outside_a_body_raises():
    with pytest.raises(RuntimeError, match="inside the body"):
        gf.normal(0.0, 1.0) @ "x"


def test_invocation_repr_and_gen_repr():
    assert "line" in repr(line)
    assert "Invocation" in repr(line(1.0))
    assert "GenTrace" in repr(line.simulate((1.0,)))


# ======================================================================== callee argdiffs
class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


def _counting_model():
    calls = {"sub": 0}

    @gf.gen
    def counted(m):
        calls["sub"] += 1
        return gf.normal(m, 1.0) @ "z"

    net = _Counting()
    tg = gf.TorchGenerativeFunction(net)

    @gf.gen
    def model(x, k):
        a = gf.normal(0.0, 1.0) @ "a"
        s1 = counted(x) @ "s1"      # x: the model's argument (same object if unchanged)
        s2 = counted(k) @ "s2"      # k: a plain Python value
        h = tg(x) @ "h"
        return gf.normal(a + s1 + s2 + h.sum(), 1.0) @ "y"

    return model, calls, net


def test_unchanged_callees_do_no_work_on_update():
    model, calls, net = _counting_model()
    x = torch.ones(1)
    tr = model.simulate((x, 3))
    assert calls["sub"] == 2 and net.calls == 1
    new, w, _, _ = model.update(tr, (x, 3), (gf.NoChange(), gf.NoChange()), {"a": 0.3})
    assert calls["sub"] == 2 and net.calls == 1
    h = tr.subtrace("h").retval.sum()
    mean_old = f(tr["a"]) + f(tr["s1", "z"]) + f(tr["s2", "z"]) + f(h)
    mean_new = 0.3 + f(tr["s1", "z"]) + f(tr["s2", "z"]) + f(h)
    close(w, lnorm(0.3, 0.0, 1.0) + lnorm(tr["y"], mean_new, 1.0)
          - lnorm(tr["a"], 0.0, 1.0) - lnorm(tr["y"], mean_old, 1.0))
    # same object / same Python value: no work even when the caller was told UnknownChange
    model.update(tr, (x, 3), (gf.UnknownChange(), gf.UnknownChange()), {"a": 0.3})
    assert calls["sub"] == 2 and net.calls == 1
    model.regenerate(tr, (x, 3), (gf.NoChange(), gf.NoChange()), gf.select("a"))
    assert calls["sub"] == 2 and net.calls == 1


def test_changed_callee_arguments_rerun_only_that_callee():
    model, calls, net = _counting_model()
    x = torch.ones(1)
    tr = model.simulate((x, 3))
    model.update(tr, (x, 4), (gf.NoChange(), gf.UnknownChange()), None)
    assert calls["sub"] == 3 and net.calls == 1  # only s2 re-ran
    model.update(tr, (x + 0.0, 3), (gf.UnknownChange(), gf.NoChange()), None)
    assert calls["sub"] == 4 and net.calls == 2  # s1 and the module re-ran


def test_callee_return_value_source_propagates_nochange():
    calls = {"n": 0}

    @gf.gen
    def counted(m):
        calls["n"] += 1
        return gf.normal(m, 1.0) @ "z"

    @gf.gen
    def model():
        a = gf.normal(0.0, 1.0) @ "a"
        gf.normal(0.0, 1.0) @ "b"
        return counted(a) @ "s"

    tr = model.simulate(())
    model.update(tr, (), (), {"b": 0.1})  # a unchanged: "s" gets NoChange
    assert calls["n"] == 1
    new, w, _, _ = model.update(tr, (), (), {"a": 0.1})  # a changed: "s" is rescored
    assert calls["n"] == 2
    close(w, lnorm(0.1, 0, 1) + lnorm(tr["s", "z"], 0.1, 1)
          - lnorm(tr["a"], 0, 1) - lnorm(tr["s", "z"], tr["a"], 1))


def test_tuples_and_dicts_keep_their_items_diffs():
    """A tuple or dict built in the body is unchanged when its items are (a choice kept, an
    argument unchanged, a constant passed again), so the callee is not re-run; when an item
    changes, it is, with the exact weight.  (A constant made anew at every run is compared
    by value in a batch only, where the rows share it: tests/inference/test_pf_shapes.py.)"""
    calls = {"n": 0}
    zero = torch.zeros(())

    @gf.gen
    def counted(pair, named):
        calls["n"] += 1
        return gf.normal(pair[0] + pair[1] + named["c"], 1.0) @ "z"

    @gf.gen
    def model(c):
        a = gf.normal(0.0, 1.0) @ "a"
        gf.normal(0.0, 1.0) @ "b"
        return counted((a, zero), {"c": c}) @ "s"

    c = torch.tensor(0.5)
    tr = model.simulate((c,))
    z, a = tr["s", "z"], tr["a"]
    model.update(tr, (c,), (gf.NoChange(),), {"b": 0.1})
    assert calls["n"] == 1
    _, w, _, _ = model.update(tr, (c,), (gf.NoChange(),), {"a": 0.1})
    assert calls["n"] == 2
    close(w, lnorm(0.1, 0, 1) + lnorm(z, 0.1 + 0.5, 1) - lnorm(a, 0, 1) - lnorm(z, a + 0.5, 1))
    _, w, _, _ = model.update(tr, (torch.tensor(2.0),), (gf.UnknownChange(),), None)
    assert calls["n"] == 3
    close(w, lnorm(z, a + 2.0, 1) - lnorm(z, a + 0.5, 1))


def test_a_remade_constant_under_a_tracer_counts_as_changed():
    """Under compile_step's capture (make_fx), values cannot be read: a remade constant is
    UnknownChange there (rescored), and the step still captures and replays exactly."""
    from gfcomb.inference import compile_step

    @gf.gen
    def model():
        a = gf.normal(0.0, 1.0) @ "a"
        return gf.normal(a, torch.ones(())) @ "b"

    tr = model.simulate(())

    def move(trace, value):
        new, w, _, _ = model.update(trace, (), (), gf.ChoiceMap({"a": value}))
        return new, w

    step = compile_step(move, backend="none")
    gf.set_validation(False)  # (validating the tensor scale would read it on the host)
    try:
        for v in (0.3, 0.7):
            new, w = step(tr, torch.tensor(v))
            close(new.score, lnorm(v, 0, 1) + lnorm(tr["b"], v, 1))
            close(w, new.score - tr.score)
    finally:
        gf.set_validation(True)
    assert len(step.graphs) == 1


# ============================================================================== gradients
@gf.gen
def reg(x, s):
    a = gf.normal(0.0, 1.0) @ "a"
    y = gf.normal(a * x, s) @ "y"
    return a * y


def reg_logp(a, y, x, s):
    return -0.5 * a * a - 0.5 * ((y - a * x) / s) ** 2 - math.log(s) - LOG2PI


def _reg_grads(a, y, x, s, g=0.0):
    r = y - a * x
    return {"a": -a + x * r / s**2 + g * y, "y": -r / s**2 + g * a,
            "x": a * r / s**2, "s": -1.0 / s + r * r / s**3}


def _central(fn, vals, key, eps=1e-6):
    hi, lo = dict(vals), dict(vals)
    hi[key] += eps
    lo[key] -= eps
    return (fn(**hi) - fn(**lo)) / (2 * eps)


@pytest.mark.parametrize("retgrad", [None, 0.7])
def test_choice_gradients_hand_math_and_finite_differences(retgrad):
    vals = {"a": 0.3, "y": -0.8, "x": 1.4, "s": 0.6}
    x, s = torch.tensor(vals["x"]), torch.tensor(vals["s"])
    tr, _ = reg.generate((x, s), {"a": vals["a"], "y": vals["y"]})
    rg = None if retgrad is None else torch.tensor(retgrad)
    (gx, gs), values, grads = reg.choice_gradients(tr, gf.select("a", "y"), rg)
    g = 0.0 if retgrad is None else retgrad
    hand = _reg_grads(**vals, g=g)
    for k, got in (("a", grads["a"]), ("y", grads["y"]), ("x", gx), ("s", gs)):
        close(got, hand[k])

    def objective(a, y, x, s):
        return reg_logp(a, y, x, s) + g * a * y

    for k, got in (("a", grads["a"]), ("y", grads["y"]), ("x", gx), ("s", gs)):
        close(got, _central(objective, vals, k), 1e-7)
    close(values["a"], vals["a"])
    close(values["y"], vals["y"])
    assert set(values.addresses()) == {("a",), ("y",)}


def test_choice_gradients_fd_through_the_library_assess():
    x, s = torch.tensor(0.9), torch.tensor(1.3)
    tr, _ = reg.generate((x, s), {"a": -0.2, "y": 0.4})
    _, _, grads = reg.choice_gradients(tr, gf.select("a"))
    eps = 1e-6
    hi = reg.assess((x, s), {"a": -0.2 + eps, "y": 0.4})[0]
    lo = reg.assess((x, s), {"a": -0.2 - eps, "y": 0.4})[0]
    close(grads["a"], (hi - lo) / (2 * eps), 1e-7)


def test_choice_gradients_partial_selection_and_no_selection():
    x, s = torch.tensor(1.1), torch.tensor(0.8)
    tr, _ = reg.generate((x, s), {"a": 0.5, "y": 0.2})
    hand = _reg_grads(0.5, 0.2, 1.1, 0.8)
    (gx, gs), values, grads = reg.choice_gradients(tr, gf.select("y"))
    assert grads.addresses() == [("y",)]
    close(grads["y"], hand["y"])
    close(gx, hand["x"])
    (gx, gs), values, grads = reg.choice_gradients(tr)
    assert grads.is_empty() and values.is_empty()
    close(gs, hand["s"])


def test_choice_gradients_non_tensor_args_get_none():
    tr, _ = reg.generate((1.1, 0.8), {"a": 0.5, "y": 0.2})
    (gx, gs), _, grads = reg.choice_gradients(tr, gf.select("a"))
    assert gx is None and gs is None
    close(grads["a"], _reg_grads(0.5, 0.2, 1.1, 0.8)["a"])


def test_choice_gradients_nested_choice():
    tr, _ = hier.generate((0.0,), {"a": 0.1, ("s", "z"): 0.3, "y": {0: 0.0, 1: 0.5, 2: 1.0}})
    _, _, grads = hier.choice_gradients(tr, gf.select(("s", "z")))
    # d/dz [log N(z; a, 1) + sum_i log N(y_i; z, 0.5²)]
    hand = -(0.3 - 0.1) + sum((y - 0.3) / 0.25 for y in (0.0, 0.5, 1.0))
    close(grads["s", "z"], hand)


def test_choice_gradients_discrete_choice_in_selection_raises():
    @gf.gen
    def model():
        return gf.categorical(torch.tensor([0.2, 0.8])) @ "k"

    tr = model.simulate(())
    with pytest.raises(TypeError, match="discrete"):
        model.choice_gradients(tr, gf.select("k"))


def test_choice_gradients_under_vmap_equal_the_per_element_loop():
    n = 5
    xs = torch.linspace(-1.0, 2.0, n)
    s = torch.tensor(0.7)
    tr = torch.func.vmap(lambda x: reg.simulate((x, s)), randomness="different")(xs)
    assert tr.score.shape == (n,)
    rg = torch.tensor(0.3)
    (gx, gs), values, grads = torch.func.vmap(
        lambda t: reg.choice_gradients(t, gf.select("a", "y"), rg))(tr)
    assert grads["a"].shape == (n,) and gx.shape == (n,) and gs.shape == (n,)
    for i in range(n):
        tri, _ = reg.generate((xs[i], s), {"a": tr["a"][i], "y": tr["y"][i]})
        (gxi, gsi), _, gi = reg.choice_gradients(tri, gf.select("a", "y"), rg)
        close(grads["a"][i], gi["a"])
        close(grads["y"][i], gi["y"])
        close(gx[i], gxi)
        close(gs[i], gsi)
        hand = _reg_grads(f(tr["a"][i]), f(tr["y"][i]), f(xs[i]), 0.7, g=0.3)
        close(grads["a"][i], hand["a"])
        close(gx[i], hand["x"])


def test_gradients_with_a_pytree_retval_and_retgrad():
    torch.manual_seed(5)
    net = torch.nn.Linear(2, 1)

    @gf.gen
    def model(x):
        h = net(x).squeeze(-1)
        a = gf.normal(h, 1.0) @ "a"
        return (a, h)

    x = torch.tensor([0.3, -0.7])
    tr, _ = model.generate((x,), {"a": 0.4})
    g_a, g_h = torch.tensor(0.5), torch.tensor(-1.5)
    h = f(net(x))
    (gx,), _, grads = model.choice_gradients(tr, gf.select("a"), (g_a, g_h))
    close(grads["a"], -(0.4 - h) + 0.5)
    w = net.weight.detach().squeeze(0)
    close(gx, ((0.4 - h) - 1.5) * w)
    net.zero_grad(set_to_none=True)
    model.accumulate_param_gradients(tr, (g_a, g_h), scale=2.0)
    # d/dθ [log N(a; h, 1) + g_h h] = ((a - h) + g_h) dh/dθ
    close(net.bias.grad, -2.0 * ((0.4 - h) - 1.5))
    close(net.weight.grad, (-2.0 * ((0.4 - h) - 1.5) * x).reshape(1, 2))


# ========================================================================== torch modules
lin_a = torch.nn.Linear(2, 1, dtype=torch.float64)
lin_b = torch.nn.Linear(2, 1, dtype=torch.float64)  # the same shape as lin_a: both kept


@gf.gen
def two_modules(x):
    gf.normal(lin_a(x).squeeze(-1), 1.0) @ "ya"
    gf.normal(lin_b(x).squeeze(-1), 1.0) @ "yb"


def test_parameters_lists_every_module_each_once():
    params = list(two_modules.parameters())
    expected = [lin_a.weight, lin_a.bias, lin_b.weight, lin_b.bias]
    assert len(params) == 4
    assert {id(p) for p in params} == {id(p) for p in expected}


def test_parameters_through_closures_attributes_containers_and_callees():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 2)
            self.b = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.b(self.a(x))

    net = Net()
    holder = {"m": torch.nn.Linear(2, 2)}

    @gf.gen
    def inner(x):
        gf.normal(holder["m"](x), 1.0) @ "w"

    @gf.gen
    def model(x):
        h = net(x)
        gf.normal(h, 1.0) @ "y"
        inner(x) @ "i"
        gf.normal(net(x), 1.0) @ "y2"  # the same module twice: its parameters once

    assert len(list(model.parameters())) == 4  # net found statically (closure)
    model.simulate((torch.ones(2),))  # the container's module is found when it runs
    params = list(model.parameters())
    assert len(params) == 6
    assert len({id(p) for p in params}) == 6
    assert {id(p) for p in holder["m"].parameters()} <= {id(p) for p in params}
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 6


def test_module_hook_is_installed_only_while_a_body_runs():
    """Modules called in a body are recorded by a global forward pre-hook that exists only
    while an outermost @gen body runs (nested bodies included), and is gone afterwards, also
    after an error."""
    from torch.nn.modules.module import _global_forward_pre_hooks as table

    lin = torch.nn.Linear(2, 2)
    seen = []
    plain = {"lin": lin}  # reached through a container: found only by the hook

    @gf.gen
    def inner(x):
        seen.append(len(table))
        return gf.normal(plain["lin"](x).sum(), 1.0) @ "z"

    @gf.gen
    def outer(x):
        seen.append(len(table))
        inner(x) @ "i"
        seen.append(len(table))
        if x.sum() > 100:
            raise ValueError("boom")

    before = len(table)
    outer.simulate((torch.ones(2),))
    assert seen == [before + 1] * 3 and len(table) == before
    assert {id(p) for p in lin.parameters()} <= {id(p) for p in outer.parameters()}
    with pytest.raises(ValueError, match="boom"):
        outer.simulate((torch.full((2,), 100.0),))
    assert len(table) == before
    lin(torch.ones(2))  # outside gfcomb: nothing is recorded
    assert len(table) == before


def test_accumulate_param_gradients_against_autograd_by_hand():
    x = torch.tensor([0.5, -1.5])
    tr, _ = two_modules.generate((x,), {"ya": 0.3, "yb": -0.2})
    for m in (lin_a, lin_b):
        m.zero_grad(set_to_none=True)
    scale = 2.5
    (gx,) = two_modules.accumulate_param_gradients(tr, None, scale)
    # d log N(ya; wa.x + ba, 1) / d wa = (ya - mean) x
    ra = 0.3 - (lin_a.weight.detach() @ x + lin_a.bias.detach())
    rb = -0.2 - (lin_b.weight.detach() @ x + lin_b.bias.detach())
    close(lin_a.weight.grad, (-scale * ra * x).reshape(1, 2))
    close(lin_a.bias.grad, -scale * ra)
    close(lin_b.weight.grad, (-scale * rb * x).reshape(1, 2))
    close(lin_b.bias.grad, -scale * rb)
    close(gx, ra * lin_a.weight.detach().squeeze(0) + rb * lin_b.weight.detach().squeeze(0))
    # a second call adds to .grad
    two_modules.accumulate_param_gradients(tr, None, 1.0)
    close(lin_a.bias.grad, -(scale + 1.0) * ra)
    for m in (lin_a, lin_b):
        m.zero_grad(set_to_none=True)


def test_accumulate_param_gradients_equals_plain_autograd():
    x = torch.tensor([1.0, 2.0])
    tr, _ = two_modules.generate((x,), {"ya": 1.0, "yb": 0.0})
    for m in (lin_a, lin_b):
        m.zero_grad(set_to_none=True)
    two_modules.accumulate_param_gradients(tr, scale=0.5)
    got = [p.grad.clone() for p in (lin_a.weight, lin_a.bias, lin_b.weight, lin_b.bias)]
    for m in (lin_a, lin_b):
        m.zero_grad(set_to_none=True)
    lp = (torch.distributions.Normal(lin_a(x).squeeze(-1), 1.0).log_prob(torch.tensor(1.0))
          + torch.distributions.Normal(lin_b(x).squeeze(-1), 1.0).log_prob(torch.tensor(0.0)))
    (-0.5 * lp).backward()
    for g, p in zip(got, (lin_a.weight, lin_a.bias, lin_b.weight, lin_b.bias)):
        close(g, p.grad)
    for m in (lin_a, lin_b):
        m.zero_grad(set_to_none=True)


def test_optimizer_loop_fits_maximum_likelihood_least_squares():
    torch.manual_seed(1)
    xs = torch.linspace(-2.0, 2.0, 25)
    ys = 1.7 * xs + 0.3 * torch.randn(25)
    w_star = f((xs * ys).sum() / (xs * xs).sum())  # closed-form least squares
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(net.weight, -1.0)

    @gf.gen
    def model(xs):
        return gf.normal(net(xs.unsqueeze(-1)).squeeze(-1), 1.0) @ "ys"

    tr, _ = model.generate((xs,), {"ys": ys})
    assert len(list(model.parameters())) == 1
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        model.accumulate_param_gradients(tr)
        opt.step()
    assert abs(f(net.weight) - w_star) < 1e-3
    sgd = torch.optim.SGD(model.parameters(), lr=0.5 / f((xs * xs).sum()))
    for _ in range(60):
        sgd.zero_grad()
        model.accumulate_param_gradients(tr)
        sgd.step()
    assert abs(f(net.weight) - w_star) < 1e-9


# ============================================================== TorchGenerativeFunction
def _tgf():
    torch.manual_seed(3)
    return gf.TorchGenerativeFunction(torch.nn.Linear(3, 2))


def test_torch_gf_is_deterministic_with_score_zero():
    tg = _tgf()
    x = torch.tensor([0.1, -0.2, 0.3])
    tr = tg.simulate((x,))
    assert f(tr.score) == 0.0
    assert tr.choices.is_empty()
    assert torch.allclose(tr.retval, tg.module(x), atol=0, rtol=0)
    tr2, w = tg.generate((x,), None)
    assert f(w) == 0.0 and torch.equal(tr2.retval, tr.retval)
    w, ret = tg.assess((x,), ChoiceMap.empty())
    assert f(w) == 0.0 and torch.equal(ret, tr.retval)
    assert f(tg.project(tr, gf.selectall())) == 0.0
    new, w, retdiff, discard = tg.update(tr, (x,), (gf.NoChange(),), None)
    assert new is tr and f(w) == 0.0 and isinstance(retdiff, gf.NoChange) and discard.is_empty()
    x2 = torch.tensor([1.0, 1.0, 1.0])
    new, w, retdiff, _ = tg.update(tr, (x2,), (gf.UnknownChange(),), None)
    assert f(w) == 0.0 and torch.equal(new.retval, tg.module(x2))
    new, w, _ = tg.regenerate(tr, (x2,), (gf.UnknownChange(),), gf.selectall())
    assert f(w) == 0.0 and torch.equal(new.retval, tg.module(x2))
    assert len(list(tg.parameters())) == 2
    assert {n for n, _ in tg.named_parameters()} == {"weight", "bias"}


def test_torch_gf_rejects_constraints_and_non_modules():
    tg = _tgf()
    with pytest.raises(gf.UnvisitedConstraintError, match="'q'"):
        tg.generate((torch.zeros(3),), {"q": 1.0})
    with pytest.raises(TypeError):
        gf.TorchGenerativeFunction(lambda x: x)  # type: ignore[arg-type]


def test_torch_gf_argument_gradients_with_retgrad():
    tg = _tgf()
    x = torch.tensor([0.1, -0.2, 0.3])
    tr = tg.simulate((x,))
    g = torch.tensor([0.5, -2.0])
    (gx,), values, grads = tg.choice_gradients(tr, None, g)
    close(gx, tg.module.weight.detach().T @ g)
    assert values.is_empty() and grads.is_empty()


def test_torch_gf_parameter_gradients_with_retgrad():
    tg = _tgf()
    x = torch.tensor([0.1, -0.2, 0.3])
    tr = tg.simulate((x,))
    g = torch.tensor([0.5, -2.0])
    tg.module.zero_grad(set_to_none=True)
    (gx,) = tg.accumulate_param_gradients(tr, g, scale=3.0)
    close(tg.module.weight.grad, -3.0 * torch.outer(g, x))
    close(tg.module.bias.grad, -3.0 * g)
    close(gx, tg.module.weight.detach().T @ g)


def test_torch_gf_as_a_callee_in_gen():
    tg = _tgf()

    @gf.gen
    def model(x):
        h = tg(x) @ "net"
        return gf.normal(h, 1.0) @ "y"

    x = torch.tensor([0.1, -0.2, 0.3])
    y = torch.tensor([0.4, 0.5])
    tr, w = model.generate((x,), {"y": y})
    h = tg.module(x).detach()
    hand = sum(lnorm(y[i], h[i], 1.0) for i in range(2))
    close(w, hand)
    close(tr.score, hand)
    assert set(tr.choices.addresses()) == {("y",)}
    assert {id(p) for p in model.parameters()} == {id(p) for p in tg.parameters()}
    (gx,), _, grads = model.choice_gradients(tr, gf.select("y"))
    close(grads["y"], -(y - h))
    close(gx, tg.module.weight.detach().T @ (y - h))
    tg.module.zero_grad(set_to_none=True)
    model.accumulate_param_gradients(tr)
    close(tg.module.bias.grad, -(y - h))
    close(tg.module.weight.grad, -torch.outer(y - h, x))


def test_torch_gf_under_vmap():
    tg = _tgf()
    xs = torch.randn(4, 3)
    tr = torch.func.vmap(lambda x: tg.simulate((x,)))(xs)
    assert tr.retval.shape == (4, 2) and tr.score.shape == (4,)
    assert torch.allclose(tr.retval, tg.module(xs), atol=1e-12)


# =================================================================================== vmap
def _vmap(fn, *args):
    return torch.func.vmap(fn, randomness="different")(*args)


def test_vmap_simulate_returns_one_batched_trace():
    xs = torch.tensor([0.5, 1.0, 1.5, 2.0])
    tr = _vmap(lambda x: hier.simulate((x,)), xs)
    assert isinstance(tr, gf.GenTrace)
    assert tr.gen_fn is hier
    assert tr.score.shape == (4,)
    assert tr["a"].shape == (4,) and tr["s", "z"].shape == (4,) and tr["y", 2].shape == (4,)
    assert tr.args[0].shape == (4,) and tr.retval.shape == (4,)
    assert tr.choices["s", "z"].shape == (4,)
    for i in range(4):  # every member is a valid trace: its score is its hand log density
        one = {a: v[i] for a, v in tr.choices.items()}
        lp = (lnorm(one[("a",)], 0, 1) + lnorm(one[("s", "z")], f(one[("a",)]) + f(xs[i]), 1)
              + sum(lnorm(one[("y", j)], one[("s", "z")], 0.5) for j in range(3)))
        close(tr.score[i], lp)
    assert len(set(tr["a"].tolist())) == 4  # randomness="different"


def _batched_constraints(n):
    return ChoiceMap({"a": torch.linspace(-1, 1, n), ("s", "z"): torch.linspace(0, 2, n),
                      "y": {j: torch.linspace(-0.5, 0.5, n) + j for j in range(3)}})


def test_vmap_generate_full_constraints_equals_loop():
    n = 4
    xs = torch.linspace(0.0, 1.0, n)
    cm = _batched_constraints(n)
    tr, w = _vmap(lambda x, c: hier.generate((x,), c), xs, cm)
    assert w.shape == (n,)
    for i in range(n):
        ci = ChoiceMap({a: v[i] for a, v in cm.items()})
        tri, wi = hier.generate((xs[i],), ci)
        close(w[i], wi)
        close(tr.score[i], tri.score)
        close(w[i], hier_logp(tri, xs[i]))
        close(tr.retval[i], tri.retval)


def test_vmap_assess_equals_loop():
    n = 4
    xs = torch.linspace(0.0, 1.0, n)
    cm = _batched_constraints(n)
    w, ret = torch.func.vmap(lambda x, c: hier.assess((x,), c))(xs, cm)
    for i in range(n):
        ci = ChoiceMap({a: v[i] for a, v in cm.items()})
        wi, reti = hier.assess((xs[i],), ci)
        close(w[i], wi)
        close(ret[i], reti)


def test_vmap_update_with_constraints_equals_loop():
    n = 4
    xs = torch.linspace(0.0, 1.0, n)
    cm = _batched_constraints(n)
    tr, _ = _vmap(lambda x, c: hier.generate((x,), c), xs, cm)
    new_a = ChoiceMap({"a": torch.tensor([0.1, 0.2, 0.3, 0.4]), ("y", 1): torch.zeros(n)})
    xs2 = xs + 1.0
    new, w, _, discard = _vmap(
        lambda t, x, c: hier.update(t, (x,), (gf.UnknownChange(),), c), tr, xs2, new_a)
    assert w.shape == (n,) and discard["a"].shape == (n,)
    for i in range(n):
        ci = ChoiceMap({a: v[i] for a, v in cm.items()})
        tri, _ = hier.generate((xs[i],), ci)
        newi, wi, _, di = hier.update(tri, (xs2[i],), (gf.UnknownChange(),),
                                      {"a": new_a["a"][i], ("y", 1): 0.0})
        close(w[i], wi)
        close(new.score[i], newi.score)
        close(discard["a"][i], di["a"])
        close(discard["y", 1][i], di["y", 1])
        close(wi, hier_logp(newi, xs2[i]) - hier_logp(tri, xs[i]))


def test_vmap_project_equals_loop():
    n = 3
    xs = torch.linspace(0.0, 1.0, n)
    cm = _batched_constraints(n)
    tr, _ = _vmap(lambda x, c: hier.generate((x,), c), xs, cm)
    sel = gf.select("a", ("y", 2))
    p = torch.func.vmap(lambda t: hier.project(t, sel))(tr)
    for i in range(n):
        ci = ChoiceMap({a: v[i] for a, v in cm.items()})
        tri, _ = hier.generate((xs[i],), ci)
        close(p[i], hier.project(tri, sel))
        close(p[i], lnorm(tri["a"], 0, 1) + lnorm(tri["y", 2], tri["s", "z"], 0.5))


def test_vmap_regenerate_weights_are_per_element_mh_ratios():
    n = 6
    cm = ChoiceMap({"a": torch.linspace(-1, 1, n), "b": torch.linspace(0, 1, n),
                    "c": torch.linspace(1, 2, n)})
    tr, _ = _vmap(lambda c: chain.generate((0.0,), c), cm)
    new, w, _ = _vmap(lambda t: chain.regenerate(t, (0.0,), (gf.NoChange(),), gf.select("a")), tr)
    for i in range(n):
        close(w[i], lnorm(cm["b"][i], new["a"][i], 2.0) - lnorm(cm["b"][i], cm["a"][i], 2.0))
    close(new["b"], cm["b"])


# ========================================================================== immutability
def test_generate_does_not_mutate_the_constraints():
    x = torch.tensor([0.3])
    cm = ChoiceMap({"a": torch.tensor(0.5), ("s", "z"): torch.tensor(1.0)})
    before = {a: v.clone() for a, v in cm.items()}
    hier.generate((x,), cm)
    assert {a: v for a, v in cm.items()}.keys() == before.keys()
    for a, v in cm.items():
        assert torch.equal(v, before[a])
    assert torch.equal(x, torch.tensor([0.3]))


def test_update_and_regenerate_leave_the_old_trace_unchanged():
    tr = hier.simulate((torch.tensor(0.3),))
    snap = snapshot(tr)
    cm = ChoiceMap({"a": torch.tensor(2.0), ("y", 0): torch.tensor(-1.0)})
    cm_before = {a: v.clone() for a, v in cm.items()}
    hier.update(tr, (torch.tensor(0.9),), (gf.UnknownChange(),), cm)
    assert_snapshot(tr, snap)
    for a, v in cm.items():
        assert torch.equal(v, cm_before[a])
    hier.regenerate(tr, (torch.tensor(0.9),), (gf.UnknownChange(),), gf.select("a", "s"))
    assert_snapshot(tr, snap)
    tr.update({"a": 0.0})
    tr.regenerate(gf.selectall())
    assert_snapshot(tr, snap)


def test_structure_change_leaves_the_old_trace_unchanged():
    tr, _ = branchy.generate((0.4,), {"coin": 1.0})
    snap = snapshot(tr)
    branchy.update(tr, (0.4,), (gf.NoChange(),), {"coin": 0.0})
    branchy.regenerate(tr, (0.4,), (gf.NoChange(),), gf.select("coin"))
    assert_snapshot(tr, snap)


def test_traces_are_frozen():
    tr = hier.simulate((0.0,))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        tr.score = torch.tensor(0.0)
    sub_tr = tr.subtrace(("y", 0))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        sub_tr.value = torch.tensor(0.0)


# ============================================================================= bad input
def test_duplicate_address_raises():
    @gf.gen
    def dup():
        gf.normal(0.0, 1.0) @ "a"
        gf.normal(0.0, 1.0) @ "a"

    with pytest.raises(gf.DuplicateAddressError, match="'a'"):
        dup.simulate(())
    with pytest.raises(gf.DuplicateAddressError, match="'a'"):
        dup.generate((), {"a": 1.0})
    with pytest.raises(gf.DuplicateAddressError, match="'a'"):
        dup.assess((), {"a": 1.0})


def test_duplicate_address_through_prefixes_and_splice():
    @gf.gen
    def under():
        gf.normal(0.0, 1.0) @ "a"
        gf.normal(0.0, 1.0) @ ("a", 0)

    with pytest.raises(gf.DuplicateAddressError, match=r"\('a', 0\)"):
        under.simulate(())

    @gf.gen
    def spliced():
        gf.normal(0.0, 1.0) @ "z"
        gf.splice(sub(0.0))

    with pytest.raises(gf.DuplicateAddressError, match="'z'"):
        spliced.simulate(())


def test_duplicate_tuple_address_in_a_loop():
    @gf.gen
    def loop():
        for i in (0, 1, 1):
            gf.normal(0.0, 1.0) @ ("y", i)

    with pytest.raises(gf.DuplicateAddressError, match=r"\('y', 1\)"):
        loop.simulate(())


@pytest.mark.parametrize("addr", ["q", ("y", 7), ("s", "q"), ("a", "deeper"), "s"])
def test_unvisited_constraint_in_generate_names_the_address(addr):
    with pytest.raises(gf.UnvisitedConstraintError) as info:
        hier.generate((0.0,), {addr: 1.0})
    shown = repr(addr) if not isinstance(addr, tuple) else repr(addr)
    assert shown in str(info.value)
    assert "generate" in str(info.value)


@pytest.mark.parametrize("addr", ["q", ("y", 7), ("s", "q")])
def test_unvisited_constraint_in_update_names_the_address(addr):
    tr = hier.simulate((0.0,))
    snap = snapshot(tr)
    with pytest.raises(gf.UnvisitedConstraintError) as info:
        hier.update(tr, (0.0,), (gf.NoChange(),), {addr: 1.0})
    assert repr(addr) in str(info.value)
    assert "update" in str(info.value)
    assert_snapshot(tr, snap)


def test_unvisited_constraint_after_a_structure_change():
    tr, _ = branchy.generate((0.4,), {"coin": 1.0})
    with pytest.raises(gf.UnvisitedConstraintError, match="'u'"):
        branchy.update(tr, (0.4,), (gf.NoChange(),), {"coin": 0.0, "u": 1.0})


@pytest.mark.parametrize("provided,missing", [
    ({"a": 0.0, "y": {0: 0.0, 1: 0.0, 2: 0.0}}, "('s', 'z')"),
    ({"a": 0.0, ("s", "z"): 0.0, "y": {0: 0.0, 2: 0.0}}, "('y', 1)"),
    ({("s", "z"): 0.0}, "'a'"),
])
def test_assess_missing_choice_names_the_address(provided, missing):
    with pytest.raises(gf.MissingChoiceError) as info:
        hier.assess((0.0,), provided)
    assert missing in str(info.value)


def test_assess_missing_choice_is_a_keyerror_and_gfierror():
    with pytest.raises(KeyError):
        line.assess((1.0,), {"slope": 0.0})
    with pytest.raises(gf.GFIError):
        line.assess((1.0,), {"slope": 0.0})


def test_distribution_argument_errors_name_the_argument():
    @gf.gen
    def model(loc, scale):
        return gf.normal(loc, scale) @ "x"

    with pytest.raises(gf.DistributionArgumentError, match="'loc'.*finite"):
        model.simulate((float("nan"), 1.0))
    with pytest.raises(gf.DistributionArgumentError, match="'scale'.*finite"):
        model.simulate((0.0, float("inf")))
    with pytest.raises(gf.DistributionArgumentError, match="'scale'.*> 0"):
        model.simulate((0.0, -1.0))
    with pytest.raises(gf.DistributionArgumentError, match="'scale'.*> 0"):
        model.generate((0.0, 0.0), {"x": 1.0})
    with pytest.raises(gf.DistributionArgumentError, match="'scale'"):
        model.assess((0.0, torch.tensor([1.0, -2.0])), {"x": torch.zeros(2)})
    with pytest.raises(gf.DistributionArgumentError, match=r"loc: \(3,\), scale: \(2,\)"):
        model.simulate((torch.zeros(3), torch.ones(2)))
    with pytest.raises(gf.DistributionArgumentError, match="'probs'"):
        gf.bernoulli.simulate((1.5,))


def test_distribution_argument_error_in_update_leaves_the_trace_intact():
    @gf.gen
    def model(scale):
        return gf.normal(0.0, scale) @ "x"

    tr = model.simulate((1.0,))
    snap = snapshot(tr)
    with pytest.raises(gf.DistributionArgumentError, match="'scale'"):
        model.update(tr, (-1.0,), (gf.UnknownChange(),), None)
    with pytest.raises(gf.DistributionArgumentError, match="'scale'"):
        model.regenerate(tr, (float("nan"),), (gf.UnknownChange(),), gf.select("x"))
    assert_snapshot(tr, snap)
    # the trace is still usable
    _, w, _, _ = model.update(tr, (2.0,), (gf.UnknownChange(),), None)
    close(w, lnorm(tr["x"], 0, 2.0) - lnorm(tr["x"], 0, 1.0))


def test_args_must_be_a_tuple():
    tr = line.simulate((1.0,))
    calls = [lambda: line.simulate(1.0), lambda: line.generate(1.0, {}),
             lambda: line.assess([1.0], {"slope": 0.0, "y": 0.0}),
             lambda: line.update(tr, 1.0, (gf.NoChange(),), None),
             lambda: line.regenerate(tr, [1.0], (gf.NoChange(),), gf.select("y")),
             lambda: gf.normal.simulate(0.0)]
    for call in calls:
        with pytest.raises(gf.ArgumentError, match="tuple"):
            call()


def test_argdiffs_of_the_wrong_length_raise():
    tr = line.simulate((1.0,))
    with pytest.raises(gf.ArgumentError, match="argdiffs"):
        line.update(tr, (1.0,), (gf.NoChange(), gf.NoChange()), None)
    with pytest.raises(gf.ArgumentError, match="argdiffs"):
        line.regenerate(tr, (1.0,), (), gf.select("y"))


def test_trace_of_another_function_raises():
    tr = chain.simulate((0.0,))
    with pytest.raises(gf.ArgumentError, match="another"):
        line.update(tr, (1.0,), (gf.NoChange(),), None)
    with pytest.raises(gf.ArgumentError, match="another"):
        line.regenerate(tr, (1.0,), (gf.NoChange(),), gf.select("y"))
    with pytest.raises(gf.ArgumentError, match="another"):
        line.project(tr, gf.selectall())


def test_tracing_a_non_generative_function_raises():
    from gfcomb.core.gfi import Invocation

    @gf.gen
    def model():
        return Invocation(lambda: 1.0, ()) @ "x"  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="generative functions"):
        model.simulate(())


# ============================================================================ shorthands
def test_trace_update_shorthand_keeps_args():
    tr, _ = chain.generate((0.5,), {"a": 0.1, "b": 0.2, "c": 0.3})
    new, w, _, discard = tr.update({"b": 1.0})
    close(w, chain_logp(0.1, 1.0, 0.3, 0.5) - chain_logp(0.1, 0.2, 0.3, 0.5))
    assert new.args == (0.5,)
    close(discard["b"], 0.2)
    new2, w2, _, _ = tr.update()
    assert f(w2) == 0.0


def test_trace_regenerate_shorthand_keeps_args():
    tr, _ = chain.generate((0.5,), {"a": 0.1, "b": 0.2, "c": 0.3})
    new, w, _ = tr.regenerate(gf.select("c"))
    assert new.args == (0.5,)
    close(new["b"], 0.2)
    assert f(w) == 0.0  # nothing depends on c
    new, w, _ = tr.regenerate(gf.select("a"))
    close(w, lnorm(0.2, new["a"], 2.0) - lnorm(0.2, 0.1, 2.0))


# ============================================================================ regressions
def test_param_gradients_treat_reparameterized_choices_as_data():
    torch.manual_seed(4)
    net = torch.nn.Linear(1, 1)

    @gf.gen
    def model(x):
        return gf.normal(net(x).squeeze(-1), 1.0) @ "z"

    x = torch.ones(1)
    tr = model.simulate((x,))  # z = net(x) + eps carries an autograd graph to net's bias
    net.zero_grad(set_to_none=True)
    model.accumulate_param_gradients(tr)
    z, mu = f(tr["z"]), f(net(x))
    close(net.bias.grad, -(z - mu))  # the score-function gradient, not 0
    close(net.weight.grad, -(z - mu) * 1.0)


def test_bad_addresses_are_rejected_when_traced():
    import numpy as np

    for addr, exc, shown in [((), gf.AddressError, "non-empty"),
                             (("y", np.int64(1)), TypeError, "int64"),
                             (1.5, TypeError, "1.5"), (True, TypeError, "True")]:
        @gf.gen
        def model(addr=addr):
            gf.normal(0.0, 1.0) @ addr

        with pytest.raises(exc, match=shown):
            model.simulate(())


def test_errors_inside_a_body_leave_no_handler_behind():
    @gf.gen
    def broken():
        gf.normal(0.0, 1.0) @ "a"
        sub(0.0) @ "s"
        sub(0.0) @ "s"

    with pytest.raises(gf.DuplicateAddressError, match="'s'"):
        broken.simulate(())
    with pytest.raises(RuntimeError, match="inside the body"):
        gf.normal(0.0, 1.0) @ "x"
    close(line.generate((1.0,), {"slope": 0.4, "y": 0.2})[1], line_logp(0.4, 0.2, 1.0))


def test_nested_errors_name_the_full_address():
    @gf.gen
    def inner():
        gf.normal(0.0, 1.0) @ "w"
        gf.normal(0.0, 1.0) @ "w"

    @gf.gen
    def outer():
        inner() @ ("o", 2)

    with pytest.raises(gf.DuplicateAddressError, match=r"\('o', 2, 'w'\)"):
        outer.simulate(())


def test_integer_constraint_for_a_continuous_choice_is_a_float():
    tr, w = chain.generate((torch.tensor(0.0),), {"a": 1, "b": 2, "c": 0})
    assert tr["a"].dtype == torch.float64
    close(w, chain_logp(1.0, 2.0, 0.0, 0.0))
    _, _, grads = chain.choice_gradients(tr, gf.select("a"))
    close(grads["a"], -(1.0 - 0.0) + (2.0 - 1.0) / 4.0)
    w, ret = gf.normal.assess((0.0, 1.0), ChoiceMap.value(1))
    assert ret.dtype == torch.float64
    close(w, lnorm(1.0, 0.0, 1.0))


def test_masked_distribution_weights_are_zero_not_nan_for_minus_inf_scores():
    from gfcomb.core.selection import MaskSelection

    vals = torch.tensor([0.5, 2.0, 0.3])  # 2.0 lies outside uniform(0, 1)
    tr, w = torch.func.vmap(lambda v: gf.uniform.generate((0.0, 1.0), ChoiceMap.value(v)))(vals)
    assert w.tolist() == [0.0, -math.inf, 0.0]
    flags = torch.tensor([True, False, False])
    p = torch.func.vmap(
        lambda t, fl: gf.uniform.project(t, MaskSelection(ChoiceMap.value(fl))))(tr, flags)
    assert p.tolist() == [0.0, 0.0, 0.0]
    mask = torch.tensor([False, False, True])
    _, w2 = torch.func.vmap(
        lambda v, m: gf.uniform.generate((0.0, 1.0), ChoiceMap.value(v, m)),
        randomness="different")(vals, mask)
    assert w2.tolist() == [0.0, 0.0, 0.0]


def test_torch_gf_update_args_must_be_a_tuple():
    tg = _tgf()
    tr = tg.simulate((torch.zeros(3),))
    with pytest.raises(gf.ArgumentError, match="tuple"):
        tg.update(tr, torch.zeros(3), (gf.NoChange(),), None)


# ============================================================================= properties
_real = st.floats(-3.0, 3.0, allow_nan=False)


@given(_real, _real, _real, _real)
def test_property_generate_assess_score_agree_with_hand(a, b, c, mu):
    cm = {"a": a, "b": b, "c": c}
    tr, w = chain.generate((mu,), cm)
    hand = chain_logp(a, b, c, mu)
    close(w, hand)
    close(tr.score, hand)
    close(chain.assess((mu,), cm)[0], hand)
    close(chain.project(tr, gf.select("a", "c")), lnorm(a, mu, 1.0) + lnorm(c, b, 0.5))


@given(_real, _real, _real, _real, _real)
def test_property_update_round_trip(a, b, c, b_new, mu_new):
    tr, _ = chain.generate((0.0,), {"a": a, "b": b, "c": c})
    new, w, _, discard = chain.update(tr, (mu_new,), (gf.UnknownChange(),), {"b": b_new})
    close(w, chain_logp(a, b_new, c, mu_new) - chain_logp(a, b, c, 0.0))
    back, w2, _, _ = chain.update(new, (0.0,), (gf.UnknownChange(),), discard)
    close(w2, -w)
    close(back.score, tr.score)
    for addr, v in tr.choices.items():
        close(back[addr], v)


# ================================================== custom generative functions (defaults)
@attrs.frozen(repr=False)
class _IIDTrace(gf.Trace):
    gen_fn: Any
    args: tuple
    values: torch.Tensor
    score: torch.Tensor
    _layout: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def retval(self):
        return self.values

    @property
    def choices(self):
        return ChoiceMap.stacked(ChoiceMap({"x": self.values}), self.values.shape[0])


register_record(_IIDTrace, dynamic=("args", "values", "score"), static=("gen_fn",))


class _IIDNormal(gf.GenerativeFunction):
    """``n`` iid N(0, 1) choices at ``(i, "x")``, stored stacked; relies on the default
    ``propose``/``assess``/``choice_gradients`` of the base class."""

    @staticmethod
    def _lp(v):
        return -0.5 * v * v - 0.5 * LOG2PI

    def simulate(self, args):
        (n,) = args
        v = torch.randn(n)
        return _IIDTrace(self, args, v, self._lp(v).sum())

    def generate(self, args, constraints=None):
        (n,) = args
        cm = ChoiceMap(constraints)
        v = torch.randn(n)
        given = [(i, "x") in cm for i in range(n)]
        v = torch.stack([cm[i, "x"] if g else v[i] for i, g in enumerate(given)])
        lp = self._lp(v)
        w = sum((lp[i] for i, g in enumerate(given) if g), torch.zeros(()))
        return _IIDTrace(self, args, v, lp.sum()), w


def test_default_assess_of_a_custom_function_with_stacked_choices():
    g = _IIDNormal()
    vals = torch.tensor([0.3, -1.2, 0.8])
    hand = sum(lnorm(v, 0.0, 1.0) for v in vals)
    stacked = ChoiceMap.stacked(ChoiceMap({"x": vals}), 3)
    flat = ChoiceMap({(i, "x"): vals[i] for i in range(3)})
    for cm in (stacked, flat):
        w, ret = g.assess((3,), cm)
        close(w, hand)
        assert torch.equal(ret, vals)
    with pytest.raises(gf.MissingChoiceError, match=r"\(2, 'x'\)"):
        g.assess((3,), ChoiceMap({(i, "x"): vals[i] for i in range(2)}))
    choices, w, _ = g.propose((4,))
    close(w, sum(lnorm(v, 0.0, 1.0) for v in choices[:, "x"]))


def test_custom_function_as_a_callee_in_gen():
    g = _IIDNormal()

    @gf.gen
    def model():
        v = g(3) @ "v"
        return gf.normal(v.sum(), 1.0) @ "s"

    vals = torch.tensor([0.3, -1.2, 0.8])
    cm = ChoiceMap({("v", i, "x"): vals[i] for i in range(3)}).merge(ChoiceMap({"s": 0.5}))
    tr, w = model.generate((), cm)
    hand = sum(lnorm(v, 0.0, 1.0) for v in vals) + lnorm(0.5, f(vals.sum()), 1.0)
    close(w, hand)
    close(model.assess((), tr.choices)[0], hand)
    close(tr["v", 1, "x"], -1.2)
    with pytest.raises(gf.MissingChoiceError, match=r"\('v', 0, 'x'\)"):
        model.assess((), ChoiceMap({"s": 0.5}))
    _, _, grads = model.choice_gradients(tr, gf.select("v"))
    r = 0.5 - f(vals.sum())
    close(grads["v", :, "x"], -vals + r)


# ============================================= argument-source bookkeeping of combined traces
@gf.gen
def _flip_sign(x):
    c = gf.bernoulli(0.5) @ "c"
    m = x if f(c) == 1.0 else -x  # "y" gets the argument itself, or a new object
    return gf.normal(m, 1.0) @ "y"


def test_stacked_traces_with_different_argument_sources_update_correctly():
    from gfcomb.core.pytree import tree_index, tree_stack

    t0, _ = _flip_sign.generate((torch.tensor(1.0),), {"c": 1.0, "y": 0.5})
    t1, _ = _flip_sign.generate((torch.tensor(2.0),), {"c": 0.0, "y": 0.5})
    e1 = tree_index(tree_stack([t0, t1]), 1)
    # element 1's "y" was called with -x, not with x: its bookkeeping must not say otherwise
    new, w, _, _ = _flip_sign.update(e1, e1.args, (gf.NoChange(),), {"c": 1.0})
    close(w, lnorm(0.5, 2.0, 1.0) - lnorm(0.5, -2.0, 1.0))
    close(new.score, lbern(1.0, 0.5) + lnorm(0.5, 2.0, 1.0))


def test_stacked_traces_with_equal_sources_keep_them():
    from gfcomb.core.pytree import tree_index, tree_scatter, tree_stack, tree_where

    t0, _ = _flip_sign.generate((torch.tensor(1.0),), {"c": 1.0, "y": 0.5})
    t1, _ = _flip_sign.generate((torch.tensor(2.0),), {"c": 1.0, "y": 0.7})
    t2, _ = _flip_sign.generate((torch.tensor(3.0),), {"c": 0.0, "y": 0.1})
    st = tree_stack([t0, t1])
    assert st.sources == t0.sources and st.ret_source == t0.ret_source
    assert tree_index(st, 1).sources == t1.sources
    mixed = tree_stack([t0, t2])
    assert mixed.sources is None
    stacked2 = tree_stack([t2, t2])
    assert tree_scatter(st, torch.tensor([0]), tree_stack([t0])).sources == t0.sources
    assert tree_scatter(st, torch.tensor([0]), tree_stack([t2])).sources is None
    assert tree_where(torch.tensor([True, False]), st, stacked2).sources is None
    assert tree_where(torch.tensor([True, False]), st, st).sources == t0.sources


def test_distribution_argument_errors_name_the_address_of_the_call():
    @gf.gen
    def inner(s):
        return gf.normal(0.0, s) @ "x"

    @gf.gen
    def outer(s):
        return inner(s) @ ("o", 1)

    with pytest.raises(gf.DistributionArgumentError) as info:
        outer.simulate((-1.0,))
    assert "'scale'" in str(info.value) and "('o', 1, 'x')" in str(info.value)
    assert info.value.address == ("o", 1, "x")
    with pytest.raises(gf.DistributionArgumentError, match="'scale'") as info:
        gf.normal.simulate((0.0, -1.0))  # called directly: no address
    assert info.value.address == ()


def test_wrong_shaped_constraint_value_is_a_distribution_argument_error():
    @gf.gen
    def model():
        return gf.normal(torch.zeros(3), 1.0) @ "x"

    tr = model.simulate(())
    for call in (lambda: model.generate((), {"x": torch.zeros(2)}),
                 lambda: model.assess((), {"x": torch.zeros(2)}),
                 lambda: model.update(tr, (), (), {"x": torch.zeros(2)})):
        with pytest.raises(gf.DistributionArgumentError) as info:
            call()
        msg = str(info.value)
        assert "(2,)" in msg and "loc: (3,)" in msg and "'x'" in msg
