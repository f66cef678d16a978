"""Tests of the Unfold combinator, ported from Gen.jl's Unfold tests to 0-based step keys.

Reference log densities are written out by hand (``ln`` below), never taken from gfcomb.
Kernels:

- ``lg``: linear-Gaussian state space, x_t ~ N(a x_{t-1} + b, s), y_t ~ N(x_t, 1), state x_t;
- ``walk``: the simpler x_t ~ N(x_{t-1} + t, 1) (checks the step index the kernel gets);
- ``shift``: e_t ~ N(0, 1), state z_t = z_{t-1} + e_t (a state that is not a choice, so
  an init change propagates through every step).

Each kernel body bumps a call counter, so tests can check which steps an update revisited.
"""

from __future__ import annotations

import math

import pytest
import torch

import gfcomb as gf
from gfcomb.combinators.unfold import Unfold, UnfoldTrace
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import NoChange, UnknownChange, VectorDiff
from gfcomb.core.errors import ArgumentError, MissingChoiceError, UnvisitedConstraintError
from gfcomb.core.pytree import tree_index, tree_tensors

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
TOL = 1e-9

CALLS = {"lg": 0, "walk": 0, "shift": 0}


def ln(x: float, mu: float, s: float) -> float:
    """log N(x; mu, s) by hand."""
    x, mu, s = float(x), float(mu), float(s)
    return -0.5 * ((x - mu) / s) ** 2 - math.log(s) - HALF_LOG_2PI


@gf.gen
def lg(t, x, a, b, s):
    CALLS["lg"] += 1
    x = gf.normal(a * x + b, s) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


@gf.gen
def walk(t, x):
    CALLS["walk"] += 1
    return gf.normal(x + t, 1.0) @ "x"


@gf.gen
def shift(t, z):
    CALLS["shift"] += 1
    e = gf.normal(0.0, 1.0) @ "e"
    return z + e


A, B, S = 0.8, 0.3, 0.5
INIT = 0.2


def params(a=A, b=B, s=S):
    return torch.tensor(a), torch.tensor(b), torch.tensor(s)


def lg_args(n, init=INIT, a=A, b=B, s=S):
    return (n, torch.tensor(init)) + params(a, b, s)


def nochange(k: int) -> tuple:
    return (NoChange(),) * k


def extend_diffs() -> tuple:
    return (UnknownChange(),) + nochange(4)


def xs(tr):
    return [float(v) for v in tr[:, "x"]]


def ys(tr):
    return [float(v) for v in tr[:, "y"]]


def lg_logp(x, y, init=INIT, a=A, b=B, s=S, steps=None):
    """Σ over ``steps`` of log N(x_t; a x_{t-1} + b, s) + log N(y_t; x_t, 1)."""
    steps = range(len(x)) if steps is None else steps
    total = 0.0
    for t in steps:
        prev = init if t == 0 else x[t - 1]
        total += ln(x[t], a * prev + b, s) + ln(y[t], x[t], 1.0)
    return total


def full_choices(x, y) -> ChoiceMap:
    cm = {}
    for t in range(len(x)):
        cm[(t, "x")] = torch.tensor(x[t])
        cm[(t, "y")] = torch.tensor(y[t])
    return ChoiceMap(cm)


def snapshot(tree):
    return [x.clone() for x in tree_tensors(tree)]


def unchanged(tree, snap) -> bool:
    now = tree_tensors(tree)
    return len(now) == len(snap) and all(torch.equal(a, b) for a, b in zip(now, snap))


def reset():
    for k in CALLS:
        CALLS[k] = 0


# ---------------------------------------------------------------------------- simulate etc.
def test_simulate_score_retval_and_addresses():
    u = Unfold(lg)
    tr = u.simulate(lg_args(6))
    assert isinstance(tr, UnfoldTrace) and tr.length == 6
    x, y = xs(tr), ys(tr)
    assert tr.score.shape == ()
    assert abs(float(tr.score) - lg_logp(x, y)) < TOL
    assert torch.equal(tr.retval, tr[:, "x"])
    assert tr.retval.shape == (6,)
    for t in range(6):
        assert float(tr[t, "x"]) == x[t]
        assert float(tr.choices[t, "y"]) == y[t]
    assert (5, "y") in tr.choices and (6, "y") not in tr.choices
    # step scores: one per step
    assert tr.element_scores.shape == (6,)
    assert abs(float(tr.element_scores[3]) - lg_logp(x, y, steps=[3])) < TOL


def test_walk_kernel_gets_the_step_index():
    u = Unfold(walk)
    tr = u.simulate((5, torch.tensor(1.0)))
    x = xs(tr)
    ref = sum(ln(x[t], (1.0 if t == 0 else x[t - 1]) + t, 1.0) for t in range(5))
    assert abs(float(tr.score) - ref) < TOL
    # extension continues the step count: new step t = 5 has mean x_4 + 5
    reset()
    tr2, w, rd, _ = u.update(tr, (7, torch.tensor(1.0)), (UnknownChange(), NoChange()),
                             ChoiceMap({(5, "x"): 3.0, (6, "x"): 9.5}))
    assert CALLS["walk"] == 2
    assert abs(float(w) - (ln(3.0, x[4] + 5, 1.0) + ln(9.5, 3.0 + 6, 1.0))) < TOL
    assert rd == VectorDiff(7, 5, [])


def test_generate_constraints_on_steps_0_and_2():
    u = Unfold(lg)
    cm = ChoiceMap({(0, "x"): 0.3, (2, "x"): 0.7, (2, "y"): -0.4})
    tr, w = u.generate(lg_args(4), cm)
    x, y = xs(tr), ys(tr)
    assert x[0] == 0.3 and x[2] == 0.7 and y[2] == -0.4
    ref = ln(0.3, A * INIT + B, S) + ln(0.7, A * x[1] + B, S) + ln(-0.4, 0.7, 1.0)
    assert abs(float(w) - ref) < TOL
    assert abs(float(tr.score) - lg_logp(x, y)) < TOL


def test_generate_full_constraints_weight_equals_score_and_assess():
    u = Unfold(lg)
    x = [0.1, -0.2, 0.5, 0.9]
    y = [0.0, 0.3, -1.0, 1.2]
    cm = full_choices(x, y)
    tr, w = u.generate(lg_args(4), cm)
    ref = lg_logp(x, y)
    assert abs(float(w) - ref) < TOL and abs(float(tr.score) - ref) < TOL
    wa, ret = u.assess(lg_args(4), cm)
    assert abs(float(wa) - ref) < TOL
    assert torch.allclose(ret, torch.tensor(x), atol=0)
    # assess also takes the (stacked) choice map of a trace
    wa2, _ = u.assess(lg_args(4), tr.choices)
    assert abs(float(wa2) - ref) < TOL
    # propose: weight == score of the proposed choices
    choices, wp, _ = u.propose(lg_args(4))
    assert abs(float(wp) - float(u.assess(lg_args(4), choices)[0])) < TOL


def test_zero_steps():
    u = Unfold(lg)
    tr = u.simulate(lg_args(0))
    assert tr.length == 0 and float(tr.score) == 0.0
    assert tr.retval.shape == (0,)
    assert tr.choices.is_empty()
    w, ret = u.assess(lg_args(0), ChoiceMap.empty())
    assert float(w) == 0.0 and ret.shape == (0,)
    reset()
    tr2, w, rd, d = u.update(tr, lg_args(2), extend_diffs(), ChoiceMap({(1, "y"): 0.5}))
    assert CALLS["lg"] == 2 and tr2.length == 2
    x, y = xs(tr2), ys(tr2)
    assert abs(float(w) - ln(0.5, x[1], 1.0)) < TOL
    assert abs(float(tr2.score) - lg_logp(x, y)) < TOL
    tr3, w3, rd3, d3 = u.update(tr2, lg_args(0), extend_diffs(), None)
    assert tr3.length == 0 and abs(float(w3) + float(tr2.score)) < TOL
    assert rd3 == VectorDiff(0, 2, [])
    assert float(d3[1, "y"]) == 0.5


# ---------------------------------------------------------------------------- update
def _lg_trace(n=5, x=None, y=None):
    x = x or [0.4, -0.1, 0.6, 0.2, 0.9, -0.3, 0.05][:n]
    y = y or [0.5, 0.1, 0.2, -0.7, 1.1, 0.0, 0.3][:n]
    tr, _ = Unfold(lg).generate(lg_args(n), full_choices(x, y))
    return tr, x, y


def test_extension_runs_only_the_new_steps():
    u = Unfold(lg)
    tr, x, y = _lg_trace(5)
    snap = snapshot(tr)
    reset()
    tr2, w, rd, d = u.update(tr, lg_args(8), extend_diffs(), ChoiceMap({(6, "y"): 0.25}))
    assert CALLS["lg"] == 3
    x2, y2 = xs(tr2), ys(tr2)
    assert x2[:5] == x and y2[:5] == y
    assert abs(float(w) - ln(0.25, x2[6], 1.0)) < TOL
    assert abs(float(tr2.score) - lg_logp(x2, y2)) < TOL
    assert abs(float(tr2.score) - float(tr.score) - lg_logp(x2, y2, steps=[5, 6, 7])) < TOL
    assert rd == VectorDiff(8, 5, [])
    assert d.is_empty()
    assert unchanged(tr, snap)
    # one more step from a longer trace still costs one kernel call
    reset()
    tr3, *_ = u.update(tr2, lg_args(9), extend_diffs(), None)
    assert CALLS["lg"] == 1 and xs(tr3)[:8] == x2


def test_parameter_change_rescores_every_step():
    u = Unfold(lg)
    tr, x, y = _lg_trace(5)
    reset()
    diffs = (NoChange(), NoChange(), UnknownChange(), NoChange(), UnknownChange())
    tr2, w, rd, d = u.update(tr, lg_args(5, a=0.5, s=0.9), diffs, None)
    assert CALLS["lg"] == 5
    assert xs(tr2) == x and ys(tr2) == y
    new = lg_logp(x, y, a=0.5, s=0.9)
    assert abs(float(w) - (new - lg_logp(x, y))) < TOL
    assert abs(float(tr2.score) - new) < TOL
    assert rd == NoChange()  # states are the choices x_t, which were kept
    assert d.is_empty()
    assert float(tr2.args[2]) == 0.5


def test_init_change_revisits_only_step_0_when_its_state_is_kept():
    u = Unfold(lg)
    tr, x, y = _lg_trace(5)
    reset()
    diffs = (NoChange(), UnknownChange()) + nochange(3)
    tr2, w, rd, d = u.update(tr, lg_args(5, init=-1.0), diffs, None)
    assert CALLS["lg"] == 1
    ref = ln(x[0], A * -1.0 + B, S) - ln(x[0], A * INIT + B, S)
    assert abs(float(w) - ref) < TOL
    assert abs(float(tr2.score) - lg_logp(x, y, init=-1.0)) < TOL
    assert rd == NoChange() and d.is_empty()


def test_init_change_propagates_while_the_state_changes():
    u = Unfold(shift)
    tr = u.simulate((4, torch.tensor(0.0)))
    e = [float(v) for v in tr[:, "e"]]
    reset()
    tr2, w, rd, d = u.update(tr, (4, torch.tensor(2.0)), (NoChange(), UnknownChange()), None)
    assert CALLS["shift"] == 4
    assert abs(float(w)) < TOL  # e_t's density does not depend on the state
    assert [float(v) for v in tr2[:, "e"]] == e
    expect = torch.tensor(2.0) + torch.cumsum(torch.tensor(e), 0)
    assert torch.allclose(tr2.retval, expect, atol=1e-12)
    assert rd == VectorDiff(4, 4, [0, 1, 2, 3])


def test_shrink_drops_steps_and_subtracts_their_scores():
    u = Unfold(lg)
    tr, x, y = _lg_trace(6)
    snap = snapshot(tr)
    reset()
    tr2, w, rd, d = u.update(tr, lg_args(3), extend_diffs(), None)
    assert CALLS["lg"] == 0
    assert tr2.length == 3 and xs(tr2) == x[:3] and ys(tr2) == y[:3]
    assert abs(float(w) + lg_logp(x, y, steps=[3, 4, 5])) < TOL
    assert abs(float(tr2.score) - lg_logp(x[:3], y[:3])) < TOL
    assert rd == VectorDiff(3, 6, [])
    for t in (3, 4, 5):
        assert float(d[t, "x"]) == x[t] and float(d[t, "y"]) == y[t]
    assert (2, "x") not in d
    with pytest.raises(KeyError):
        tr2[4, "x"]
    assert unchanged(tr, snap)
    # and back: the discard restores the old trace, with the opposite weight
    tr3, w3, _, _ = u.update(tr2, lg_args(6), extend_diffs(), d)
    assert xs(tr3) == x and ys(tr3) == y
    assert abs(float(w3) + float(w)) < TOL


def test_constraint_midway_revisits_from_that_step_while_the_state_changes():
    u = Unfold(lg)
    tr, x, y = _lg_trace(5)
    snap = snapshot(tr)
    reset()
    tr2, w, rd, d = u.update(tr, lg_args(5), nochange(5), ChoiceMap({(2, "x"): 1.5}))
    assert CALLS["lg"] == 2  # step 2 (constrained) and step 3 (its state changed)
    x2 = list(x)
    x2[2] = 1.5
    assert xs(tr2) == x2 and ys(tr2) == y
    ref = lg_logp(x2, y, steps=[2, 3]) - lg_logp(x, y, steps=[2, 3])
    assert abs(float(w) - ref) < TOL
    assert abs(float(tr2.score) - lg_logp(x2, y)) < TOL
    assert rd == VectorDiff(5, 5, [2])
    assert float(d[2, "x"]) == x[2] and len(d) == 1
    assert unchanged(tr, snap)
    # round trip through the discard
    tr3, w3, _, d3 = u.update(tr2, lg_args(5), nochange(5), d)
    assert xs(tr3) == x and abs(float(w3) + float(w)) < TOL and float(d3[2, "x"]) == 1.5


def test_constraint_on_an_observation_revisits_one_step():
    u = Unfold(lg)
    tr, x, y = _lg_trace(5)
    reset()
    tr2, w, rd, d = u.update(tr, lg_args(5), nochange(5),
                             ChoiceMap({(1, "y"): 2.0, (3, "y"): -2.0}))
    assert CALLS["lg"] == 2  # steps 1 and 3 only: their states did not change
    ref = ln(2.0, x[1], 1) - ln(y[1], x[1], 1) + ln(-2.0, x[3], 1) - ln(y[3], x[3], 1)
    assert abs(float(w) - ref) < TOL
    assert rd == NoChange()
    assert float(d[1, "y"]) == y[1] and float(d[3, "y"]) == y[3]


def test_update_with_constraints_and_growth_together():
    u = Unfold(lg)
    tr, x, y = _lg_trace(4)
    reset()
    cm = ChoiceMap({(3, "x"): 0.0, (4, "x"): 1.0, (4, "y"): 1.5})
    tr2, w, rd, d = u.update(tr, lg_args(5), extend_diffs(), cm)
    assert CALLS["lg"] == 2
    x2 = x[:3] + [0.0, 1.0]
    y2 = y + [1.5]
    assert xs(tr2) == x2 and ys(tr2) == y2
    ref = (lg_logp(x2, y2, steps=[3]) - lg_logp(x, y, steps=[3])
           + lg_logp(x2, y2, steps=[4]))
    assert abs(float(w) - ref) < TOL
    assert rd == VectorDiff(5, 4, [3])


def test_update_nothing_changes():
    tr, *_ = _lg_trace(4)
    reset()
    tr2, w, rd, d = tr.update(None)
    assert CALLS["lg"] == 0 and float(w) == 0.0 and rd == NoChange() and d.is_empty()
    assert torch.equal(tr2.score, tr.score)


# ---------------------------------------------------------------------------- regenerate
def test_regenerate_one_step():
    u = Unfold(lg)
    tr, x, y = _lg_trace(5)
    snap = snapshot(tr)
    reset()
    tr2, w, rd = u.regenerate(tr, lg_args(5), nochange(5), gf.select((2, "x")))
    assert CALLS["lg"] == 2
    x2 = xs(tr2)
    assert x2[2] != x[2]
    assert x2[:2] == x[:2] and x2[3:] == x[3:] and ys(tr2) == y
    # retained, unselected choices whose density changed: y_2 and x_3
    ref = (ln(y[2], x2[2], 1) - ln(y[2], x[2], 1)
           + ln(x[3], A * x2[2] + B, S) - ln(x[3], A * x[2] + B, S))
    assert abs(float(w) - ref) < TOL
    assert abs(float(tr2.score) - lg_logp(x2, y)) < TOL
    assert rd == VectorDiff(5, 5, [2])
    assert unchanged(tr, snap)


def test_regenerate_an_observation_and_a_parameter_change():
    u = Unfold(lg)
    tr, x, y = _lg_trace(4)
    reset()
    tr2, w, rd = u.regenerate(tr, lg_args(4), nochange(5), gf.select((1, "y")))
    assert CALLS["lg"] == 1 and abs(float(w)) < TOL and rd == NoChange()
    assert xs(tr2) == x and ys(tr2)[1] != y[1]
    # a parameter change with an empty selection: every step rescored
    reset()
    diffs = (NoChange(), NoChange(), NoChange(), UnknownChange(), NoChange())
    tr3, w3, _ = u.regenerate(tr, lg_args(4, b=-0.4), diffs, gf.Selection.none())
    assert CALLS["lg"] == 4
    assert abs(float(w3) - (lg_logp(x, y, b=-0.4) - lg_logp(x, y))) < TOL


def test_regenerate_whole_step_and_growth():
    u = Unfold(lg)
    tr, x, y = _lg_trace(4)
    reset()
    tr2, w, rd = u.regenerate(tr, lg_args(6), extend_diffs(), gf.select(3))
    assert CALLS["lg"] == 3  # step 3 resampled, steps 4 and 5 new
    assert xs(tr2)[:3] == x[:3] and tr2.length == 6
    assert abs(float(w)) < TOL  # nothing retained and unselected depends on step 3's choices
    assert abs(float(tr2.score) - lg_logp(xs(tr2), ys(tr2))) < TOL


# ---------------------------------------------------------------------------- project
def test_project():
    u = Unfold(lg)
    tr, x, y = _lg_trace(5)
    assert torch.equal(u.project(tr, gf.selectall()), tr.score)
    assert float(u.project(tr, gf.Selection.none())) == 0.0
    w = u.project(tr, gf.select((1, "y"), (3, "x")))
    assert abs(float(w) - (ln(y[1], x[1], 1) + ln(x[3], A * x[2] + B, S))) < TOL
    w2 = u.project(tr, gf.select(2))
    assert abs(float(w2) - lg_logp(x, y, steps=[2])) < TOL
    w3 = u.project(tr, ~gf.select((0, "x")))
    assert abs(float(w3) - (lg_logp(x, y) - ln(x[0], A * INIT + B, S))) < TOL


# ---------------------------------------------------------------------------- gradients
def _lg_logp_t(x, y, init, a, b, s):
    """The same log density as lg_logp, in torch (for finite differences)."""
    prev = torch.cat([init.reshape(1), x[:-1]])
    d = torch.distributions
    return (d.Normal(a * prev + b, s).log_prob(x).sum() + d.Normal(x, 1.0).log_prob(y).sum())


def test_choice_gradients_of_a_middle_step_and_argument_gradients():
    u = Unfold(lg)
    tr, x, y = _lg_trace(5)
    arg_grads, values, grads = u.choice_gradients(tr, gf.select((2, "x")))
    # analytic: d/dx2 [log N(x2; a x1 + b, s) + log N(y2; x2, 1) + log N(x3; a x2 + b, s)]
    exact = (-(x[2] - (A * x[1] + B)) / S**2 - (x[2] - y[2])
             + A * (x[3] - (A * x[2] + B)) / S**2)
    assert abs(float(grads[2, "x"]) - exact) < TOL
    assert float(values[2, "x"]) == x[2]
    # finite differences of the hand-written density
    X, Y = torch.tensor(x), torch.tensor(y)
    init, a, b, s = torch.tensor(INIT), *params()
    h = 1e-6

    def fd(f):
        return (f(h) - f(-h)) / (2 * h)

    def with_x2(dh):
        X2 = X.clone()
        X2[2] += dh
        return float(_lg_logp_t(X2, Y, init, a, b, s))

    assert abs(float(grads[2, "x"]) - fd(with_x2)) < 1e-6
    # argument gradients: n gets None; init, a, b, s summed over steps
    assert arg_grads[0] is None
    fds = [fd(lambda dh: float(_lg_logp_t(X, Y, init + dh, a, b, s))),
           fd(lambda dh: float(_lg_logp_t(X, Y, init, a + dh, b, s))),
           fd(lambda dh: float(_lg_logp_t(X, Y, init, a, b + dh, s))),
           fd(lambda dh: float(_lg_logp_t(X, Y, init, a, b, s + dh)))]
    for g, ref in zip(arg_grads[1:], fds):
        assert abs(float(g) - ref) < 1e-6
    # exact init gradient: a (x0 - (a init + b)) / s^2
    assert abs(float(arg_grads[1]) - A * (x[0] - (A * INIT + B)) / S**2) < TOL


def test_choice_gradients_under_vmap_match_a_loop():
    u = Unfold(lg)
    P = 3
    X = torch.randn(P, 4)
    Y = torch.randn(P, 4)
    cm = ChoiceMap({(t, "x"): X[:, t] for t in range(4)}).merge(
        ChoiceMap({(t, "y"): Y[:, t] for t in range(4)}))
    btr, _ = torch.func.vmap(lambda c: u.generate(lg_args(4), c))(cm)
    sel = gf.select((1, "x"))
    g_b = torch.func.vmap(lambda tr: u.choice_gradients(tr, sel)[2][1, "x"])(btr)
    for p in range(P):
        g = u.choice_gradients(tree_index(btr, p), sel)[2][1, "x"]
        assert abs(float(g) - float(g_b[p])) < TOL


# ---------------------------------------------------------------------------- vmap over particles
def test_vmap_generate_full_constraints_matches_a_loop():
    u = Unfold(lg)
    P, n = 4, 5
    X = torch.randn(P, n)
    Y = torch.randn(P, n)
    cm = ChoiceMap({(t, "x"): X[:, t] for t in range(n)}).merge(
        ChoiceMap({(t, "y"): Y[:, t] for t in range(n)}))
    btr, bw = torch.func.vmap(lambda c: u.generate(lg_args(n), c), randomness="different")(cm)
    assert bw.shape == (P,) and btr.score.shape == (P,)
    assert torch.equal(btr[:, "x"], X) and btr.retval.shape == (P, n)
    for p in range(P):
        x, y = X[p].tolist(), Y[p].tolist()
        tr, w = u.generate(lg_args(n), full_choices(x, y))
        assert abs(float(w) - float(bw[p])) < TOL
        assert abs(float(bw[p]) - lg_logp(x, y)) < TOL
        assert torch.equal(tree_index(btr, p).retval, tr.retval)


def test_vmap_update_matches_a_loop():
    """The particle-filter step: extend by one step with batched observations."""
    u = Unfold(lg)
    P, n = 4, 3
    btr = torch.func.vmap(lambda _: u.simulate(lg_args(n)), randomness="different")(
        torch.zeros(P))
    snap = snapshot(btr)
    new_x, new_y = torch.randn(P), torch.randn(P)
    obs = ChoiceMap({(n, "x"): new_x, (n, "y"): new_y, (1, "x"): torch.randn(P)})
    diffs = extend_diffs()
    btr2, bw, rd, bd = torch.func.vmap(u.update, in_dims=(0, None, None, 0),
                                       randomness="different")(btr, lg_args(n + 1), diffs, obs)
    assert rd == VectorDiff(n + 1, n, [1])
    assert btr2[:, "x"].shape == (P, n + 1)
    assert unchanged(btr, snap)
    for p in range(P):
        tr_p = tree_index(btr, p)
        obs_p = tree_index(obs, p)
        tr2, w, rd_p, d = u.update(tr_p, lg_args(n + 1), diffs, obs_p)
        assert abs(float(w) - float(bw[p])) < TOL
        assert torch.equal(tr2[:, "x"], btr2[:, "x"][p])
        assert torch.allclose(tr2.score, btr2.score[p], atol=TOL, rtol=0)
        assert float(d[1, "x"]) == float(bd[1, "x"][p])
        x_old, y_old = xs(tr_p), ys(tr_p)
        x_new, y_new = xs(tr2), ys(tr2)
        ref = lg_logp(x_new, y_new) - lg_logp(x_old, y_old)
        assert abs(float(w) - ref) < TOL


def test_vmap_particle_filter_steps_with_resampling():
    """Extend, re-index the particle axis (resampling), extend again: per-particle loop."""
    u = Unfold(lg)
    P = 5
    btr = torch.func.vmap(lambda _: u.simulate(lg_args(1)), randomness="different")(
        torch.zeros(P))
    vupdate = torch.func.vmap(u.update, in_dims=(0, None, None, None), randomness="different")
    for t in range(1, 4):
        obs = ChoiceMap({(t, "y"): torch.tensor(0.1 * t)})
        prev = btr
        btr, bw, _, _ = vupdate(btr, lg_args(t + 1), extend_diffs(), obs)
        for p in range(P):  # weight = log N(y_t; x_t, 1) of the new step
            xp = float(btr[:, "x"][p, t])
            assert abs(float(bw[p]) - ln(0.1 * t, xp, 1)) < TOL
            assert torch.equal(btr[:, "x"][p, :t], prev[:, "x"][p])
        anc = torch.randint(0, P, (P,))
        btr = tree_index(btr, anc)
        assert torch.equal(btr[:, "x"][:, :t], prev[:, "x"][anc])
        xs_b, ys_b = btr[:, "x"], btr[:, "y"]
        for p in range(P):
            ref = lg_logp(xs_b[p].tolist(), ys_b[p].tolist())
            assert abs(float(btr.score[p]) - ref) < TOL


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("n", [-1, 2.0, True, torch.tensor(3), "3"])
def test_bad_n(n):
    u = Unfold(lg)
    with pytest.raises(ArgumentError, match="'n'"):
        u.simulate((n, torch.tensor(0.0)) + params())
    tr, *_ = _lg_trace(2)
    with pytest.raises(ArgumentError, match="'n'"):
        u.update(tr, (n, torch.tensor(0.0)) + params(), nochange(5), None)


def test_too_few_args_and_bad_argdiffs():
    u = Unfold(lg)
    with pytest.raises(ArgumentError):
        u.simulate((3,))
    tr, *_ = _lg_trace(2)
    with pytest.raises(ArgumentError, match="argdiffs"):
        u.update(tr, lg_args(2), nochange(2), None)
    with pytest.raises(ArgumentError):
        u.update(Unfold(walk).simulate((2, torch.tensor(0.0))), lg_args(2), nochange(5), None)


def test_constraint_beyond_the_last_step():
    u = Unfold(lg)
    with pytest.raises(UnvisitedConstraintError) as err:
        u.generate(lg_args(3), ChoiceMap({(3, "x"): 1.0}))
    assert err.value.address == (3, "x") and "3" in str(err.value)
    tr, *_ = _lg_trace(3)
    with pytest.raises(UnvisitedConstraintError) as err:
        u.update(tr, lg_args(4), extend_diffs(), ChoiceMap({(5, "y"): 1.0}))
    assert err.value.address == (5, "y")
    with pytest.raises(UnvisitedConstraintError) as err:
        u.generate(lg_args(3), ChoiceMap({(1, "z"): 1.0}))
    assert err.value.address == (1, "z")
    with pytest.raises(UnvisitedConstraintError) as err:
        u.update(tr, lg_args(3), nochange(5), ChoiceMap({(2, "z"): 1.0}))
    assert err.value.address == (2, "z")


def test_assess_missing_choice_names_the_address():
    u = Unfold(lg)
    x = [0.1, 0.2, 0.3, 0.4, 0.5]
    y = [0.0] * 5
    cm = {(t, k): torch.tensor(v[t]) for t in range(5) for k, v in (("x", x), ("y", y))
          if (t, k) != (3, "x")}
    with pytest.raises(MissingChoiceError) as err:
        u.assess(lg_args(5), ChoiceMap(cm))
    assert err.value.address == (3, "x")
    assert "(3, 'x')" in str(err.value)
    # a stacked choice map with step 3's x masked out
    tr, _ = u.generate(lg_args(5), full_choices(x, y))
    partial = tr.choices.filter(~gf.select((3, "x")))
    with pytest.raises(MissingChoiceError) as err:
        u.assess(lg_args(5), partial)
    assert err.value.address == (3, "x")


# ---------------------------------------------------------------------------- structure
def test_structural_equality_and_use_inside_a_gen_body():
    assert Unfold(lg) == Unfold(lg) and hash(Unfold(lg)) == hash(Unfold(lg))
    assert Unfold(lg) != Unfold(walk)
    a, b, s = params()

    @gf.gen
    def model(T, init):
        return Unfold(lg)(T, init, a, b, s) @ "xs"

    init = torch.tensor(INIT)
    tr = model.simulate((6, init))
    x, y = [float(tr["xs", t, "x"]) for t in range(6)], [float(tr["xs", t, "y"]) for t in range(6)]
    assert abs(float(tr.score) - lg_logp(x, y)) < TOL
    reset()
    tr2, w, rd, _ = model.update(tr, (7, init), (UnknownChange(), NoChange()),
                                 ChoiceMap({("xs", 6, "y"): 0.3}))
    assert CALLS["lg"] == 1  # the DSL passed NoChange for init and the parameters
    assert abs(float(w) - ln(0.3, float(tr2["xs", 6, "x"]), 1)) < TOL


def test_batched_trace_reads_and_immutability_of_regenerate():
    u = Unfold(lg)
    btr = torch.func.vmap(lambda _: u.simulate(lg_args(3)), randomness="different")(
        torch.zeros(4))
    assert btr[:, "x"].shape == (4, 3)
    snap = snapshot(btr)
    sel = gf.select((0, "x"))
    out, w, _ = torch.func.vmap(lambda tr: u.regenerate(tr, lg_args(3), nochange(5), sel),
                                randomness="different")(btr)
    assert unchanged(btr, snap)
    assert w.shape == (4,)
    assert torch.equal(out[:, "x"][:, 1:], btr[:, "x"][:, 1:])
    for p in range(4):
        x_old = btr[:, "x"][p].tolist()
        x_new, y_new = out[:, "x"][p].tolist(), out[:, "y"][p].tolist()
        ref = (ln(y_new[0], x_new[0], 1) - ln(y_new[0], x_old[0], 1)
               + ln(x_new[1], A * x_new[0] + B, S) - ln(x_new[1], A * x_old[0] + B, S))
        assert abs(float(w[p]) - ref) < TOL


def test_shrink_with_a_constraint_on_a_kept_step():
    u = Unfold(lg)
    tr, x, y = _lg_trace(6)
    reset()
    tr2, w, rd, d = u.update(tr, lg_args(4), extend_diffs(), ChoiceMap({(1, "x"): -0.5}))
    assert CALLS["lg"] == 2  # steps 1 and 2
    x2 = list(x[:4])
    x2[1] = -0.5
    assert xs(tr2) == x2
    ref = lg_logp(x2, y[:4]) - lg_logp(x, y)
    assert abs(float(w) - ref) < TOL
    assert rd == VectorDiff(4, 6, [1])
    assert float(d[1, "x"]) == x[1]
    assert float(d[4, "x"]) == x[4] and float(d[5, "y"]) == y[5]
    assert len(d) == 5


def test_parameter_gradients_of_a_torch_module_summed_over_steps():
    lin = torch.nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(0.7)
        lin.bias.fill_(-0.1)

    @gf.gen
    def k(t, x):
        return gf.normal(lin(x), 1.0) @ "x"

    u = Unfold(k)
    x = [0.3, -0.2, 0.8, 0.1]
    init = torch.tensor([0.5])
    tr, _ = u.generate((4, init), ChoiceMap({(t, "x"): torch.tensor([x[t]]) for t in range(4)}))
    assert set(map(id, u.parameters())) == {id(lin.weight), id(lin.bias)}
    lin.zero_grad()
    arg_grads = u.accumulate_param_gradients(tr, scale=2.0)
    prev = [0.5] + x[:-1]
    resid = [x[t] - (0.7 * prev[t] - 0.1) for t in range(4)]
    dw = sum(r * p for r, p in zip(resid, prev))
    db = sum(resid)
    assert abs(float(lin.weight.grad) - (-2.0 * dw)) < TOL
    assert abs(float(lin.bias.grad) - (-2.0 * db)) < TOL
    assert abs(float(arg_grads[1]) - 0.7 * resid[0]) < TOL


@gf.gen
def ar(t, x, a):
    return gf.normal(a * x, 1.0) @ "x"


@gf.gen
def nested(t, x):
    inner = Unfold(ar)(2, x, torch.tensor(0.5)) @ "in"
    return inner[-1]


def test_composes_with_map_and_with_itself():
    from gfcomb.combinators.map import Map

    # Map over Unfolds: the Unfold runs its steps inside Map's vmap
    m = Map(Unfold(ar), in_dims=(None, 0, None))
    tr = m.simulate((3, torch.zeros(4), torch.tensor(0.5)))
    x = [[float(tr[i, t, "x"]) for t in range(3)] for i in range(4)]
    ref = sum(ln(x[i][t], 0.5 * (0.0 if t == 0 else x[i][t - 1]), 1) for i in range(4)
              for t in range(3))
    assert abs(float(tr.score) - ref) < TOL
    tr2, w, _, d = m.update(tr, (3, torch.zeros(4), torch.tensor(0.5)), nochange(3),
                            ChoiceMap({(2, 1, "x"): 1.0}))
    ref_w = (ln(1.0, 0.5 * x[2][0], 1) - ln(x[2][1], 0.5 * x[2][0], 1)
             + ln(x[2][2], 0.5, 1) - ln(x[2][2], 0.5 * x[2][1], 1))
    assert abs(float(w) - ref_w) < TOL and float(d[2, 1, "x"]) == x[2][1]
    # an Unfold whose kernel holds an Unfold
    u = Unfold(nested)
    tr = u.simulate((3, torch.tensor(0.0)))
    tr2, w, rd, _ = u.update(tr, (3, torch.tensor(0.0)), nochange(2),
                             ChoiceMap({(1, "in", 1, "x"): 3.0}))
    assert float(tr2[1, "in", 1, "x"]) == 3.0
    assert abs(float(w) - float(tr2.score - tr.score)) < TOL  # no fresh choices
    assert isinstance(rd, VectorDiff) and 1 in rd.updated


def test_a_batched_trace_outside_vmap_is_refused():
    u = Unfold(lg)
    btr = torch.func.vmap(lambda _: u.simulate(lg_args(3)), randomness="different")(
        torch.zeros(2))
    with pytest.raises(ArgumentError, match="vmap"):
        u.update(btr, lg_args(4), extend_diffs(), None)


def test_steps_of_other_structures_are_refused_by_update_as_by_simulate():
    # step t's Recurse tree has t % 2 children: the steps' traces differ in structure.
    # simulate refused them; extending a one-step trace by update concatenated them leaf
    # by leaf, silently (the leaves happened to fit) -- now it refuses them the same way
    from gfcomb.combinators.recurse import Production

    @gf.gen
    def production(inp):
        x, depth, t = inp
        v = gf.normal(x, 1.0) @ "v"
        return Production(v, [(v, depth + 1, t)] * (t % 2 if depth == 0 else 0))

    @gf.gen
    def aggregation(v, results):
        return v + sum(results)

    rec = gf.Recurse(production, aggregation, 1)

    @gf.gen
    def step(t, x):
        return rec((x, 0, t)) @ "r"

    unfold = gf.Unfold(step)
    x0 = torch.tensor(0.0)
    with pytest.raises(gf.StepStructureError, match="different structure"):
        unfold.simulate((2, x0))
    one = unfold.simulate((1, x0))
    with pytest.raises(gf.StepStructureError, match="different structure"):
        unfold.update(one, (2, x0), (gf.UnknownChange(), gf.NoChange()))


@gf.gen
def _step_by_parity(t, x):
    # (a Python `if` on the step number: the steps' traces have different addresses)
    if t == 2:
        return gf.normal(x, 1.0) @ "b"
    return gf.normal(x, 1.0) @ "a"


@gf.gen
def _wrapped_by_parity(T):
    return Unfold(_step_by_parity)(T, gf.normal(0.0, 1.0) @ "x0") @ "steps"


def test_steps_of_other_addresses_raise_a_step_structure_error_naming_the_step():
    """Every path that stores steps -- simulate, generate, update growing the trace, and the
    batched history a particle filter extends one step at a time -- refuses step 2 with a
    StepStructureError (a GFIError and a ValueError) at its full address, before anything
    is made; the filter's state before the step is untouched and still reads."""
    from gfcomb.inference import pf_initialize, pf_update

    assert issubclass(gf.StepStructureError, gf.GFIError)
    assert issubclass(gf.StepStructureError, ValueError)
    unfold = Unfold(_step_by_parity)
    x0 = torch.tensor(0.0)
    for call in (lambda: unfold.simulate((3, x0)),
                 lambda: unfold.generate((3, x0), ChoiceMap({(0, "a"): 1.0}))):
        with pytest.raises(gf.StepStructureError) as err:
            call()
        assert err.value.address == (2,)
    tr = _wrapped_by_parity.simulate((2,))
    with pytest.raises(gf.StepStructureError) as err:
        _wrapped_by_parity.update(tr, (3,), (UnknownChange(),), ChoiceMap.empty())
    assert err.value.address == ("steps", 2)
    state = pf_initialize(_wrapped_by_parity, (0,), None, 5)
    for t in range(2):
        state = pf_update(state, (t + 1,), (UnknownChange(),), None)
    before = [a for a, _ in tree_index(state.traces, 0).choices.items()]
    with pytest.raises(gf.StepStructureError, match="from step 1's") as err:
        pf_update(state, (3,), (UnknownChange(),), None)
    assert err.value.address == ("steps", 2)
    assert [a for a, _ in tree_index(state.traces, 0).choices.items()] == before
    assert before == [("x0",), ("steps", 0, "a"), ("steps", 1, "a")]
