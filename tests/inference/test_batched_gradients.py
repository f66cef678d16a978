"""Gradients and gradient-based MCMC on a batch of traces (issue 12): every batch route
(one batched forward and autograd on the sum of the rows' weights; mala/hmc with batch methods;
the accept step passing shared leaves through) equals the general route (the per-row methods
under vmap, or a loop over rows) in weights, scores and gradients, float64 to 1e-10."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils import _pytree as pytree

import gfcomb as gf
from gfcomb.core.batched import compact_history
from gfcomb.core.flat import flatten
from gfcomb.core.gradients import batch_gradients_at, choice_value_gradients
from gfcomb.core.pytree import tree_index
from gfcomb.core.vmap import batched_call
from gfcomb.inference.mcmc import hmc, hmc_propose, mala, mala_propose, mh

TOL = {"rtol": 0.0, "atol": 1e-10}
TAU, STEP = 0.3, 0.45  # large enough that some chains reject
D, N, C = 4, 12, 6


def logreg_problem(chains: int = C):
    """Bayesian logistic regression with a shared design matrix X (a float argument)."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(N, D, generator=g)
    y = (torch.rand(N, generator=g) < 0.5).to(X.dtype)

    @gf.gen
    def logreg(X):
        w = gf.normal(torch.zeros(D), 1.0) @ "w"
        gf.bernoulli(torch.sigmoid(X @ w)) @ "y"
        return (X @ w).sum()

    traces, _ = logreg.batch_generate(chains, (X,), gf.ChoiceMap({"y": y}))
    return logreg, traces, X, y


@gf.gen
def point(mu: torch.Tensor) -> torch.Tensor:
    z = gf.normal(mu, 1.0) @ "z"
    gf.normal(z, 0.5) @ "y"
    return z


@gf.gen
def hierarchical(n: int) -> torch.Tensor:
    """No float argument: the summed route with a Map's stacked choices."""
    mu = gf.normal(0.0, 1.0) @ "mu"
    return gf.Map(point, in_dims=0)(mu.expand(n)) @ "ys"


def hier_traces(chains: int = C, n: int = 3):
    obs = gf.ChoiceMap({("ys", i, "y"): torch.tensor(0.3 * i - 0.2) for i in range(n)})
    traces, _ = hierarchical.batch_generate(chains, (n,), obs)
    return traces


HIER_SEL = gf.select("mu", "ys")  # mu and every z (the y are observed but continuous too)


@gf.gen
def ar_step(t: int, x_prev: torch.Tensor) -> torch.Tensor:
    x = gf.normal(0.9 * x_prev, 0.5) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


def unfold_particles(chains: int = C):
    """Particles of an Unfold whose steps sit in a shared history (what a filter holds)."""
    model = gf.Unfold(ar_step)
    obs = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": torch.tensor([0.3, -0.4, 1.0, 0.2])}), 4)
    traces, _ = model.batch_generate(chains, (4, torch.tensor(0.0)), obs)
    return compact_history(traces)


UNFOLD_SEL = gf.select((3, "x"), (2, "x"))


def per_row(fn, traces, *extra):
    """``fn(trace_i, *extra_i)`` for every row, under one vmap (the general route)."""
    return batched_call(fn, (0,) * (1 + len(extra)), vectorize=True,
                        length=traces.score.shape[0], who="test")(traces, *extra)


def assert_trees_close(a, b):
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert type(x) is type(y)
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, **TOL)


# ----------------------------------------------------------------------------- gradients
def test_choice_gradients_on_a_batch_equal_vmapped_rows_shared_argument():
    model, traces, X, _ = logreg_problem()
    sel = gf.select("w")
    retgrad = torch.linspace(-1.0, 1.0, C)
    got = model.choice_gradients(traces, sel, retgrad)
    want = per_row(lambda t, r: model.choice_gradients(t, sel, r), traces, retgrad)
    assert_trees_close(got, want)
    arg_grads, values, grads = got
    assert arg_grads[0].shape == (C, N, D)  # per row ∂/∂X, not summed
    assert not torch.allclose(arg_grads[0][0], arg_grads[0][1])
    torch.testing.assert_close(values["w"], traces["w"], **TOL)
    # against the closed form: ∇_w = Xᵀ(y − σ(Xw)) − w + retgrad·Σ_j X_j
    w, y = traces["w"], traces["y"]
    closed = (y - torch.sigmoid(w @ X.T)) @ X - w + retgrad[:, None] * X.sum(0)
    torch.testing.assert_close(grads["w"], closed, **TOL)


def test_choice_gradients_on_a_batch_equal_vmapped_rows_summed_route():
    traces = hier_traces()
    model = traces.gen_fn
    for sel in (HIER_SEL, gf.select("mu"), None):
        got = model.choice_gradients(traces, sel)
        want = per_row(lambda t, s=sel: model.choice_gradients(t, s), traces)
        assert_trees_close(got[1:], want[1:])
    # and against a loop of single-trace calls
    for i in range(C):
        _, _, g_i = model.choice_gradients(tree_index(traces, i), HIER_SEL)
        _, _, g = model.choice_gradients(traces, HIER_SEL)
        torch.testing.assert_close(g["mu"][i], g_i["mu"], **TOL)
        torch.testing.assert_close(g["ys", :, "z"][i], g_i["ys", :, "z"], **TOL)


def test_per_row_float_argument_gets_per_row_gradients_by_the_summed_route():
    @gf.gen
    def shifted(m: torch.Tensor) -> torch.Tensor:
        return gf.normal(m, 2.0) @ "x"

    ms = torch.linspace(-1.0, 1.0, C)
    traces, _ = shifted.batch_generate(C, (gf.PerRow(ms),))
    got = shifted.choice_gradients(traces, gf.select("x"))
    want = per_row(lambda t: shifted.choice_gradients(t, gf.select("x")), traces)
    assert_trees_close(got, want)
    torch.testing.assert_close(got[0][0], (traces["x"] - ms) / 4.0, **TOL)


def test_choice_value_gradients_equal_choice_gradients_without_argument_gradients():
    model, traces, _, _ = logreg_problem()
    sel = gf.select("w")
    values, grads = choice_value_gradients(traces, sel)
    _, want_v, want_g = per_row(lambda t: model.choice_gradients(t, sel), traces)
    assert_trees_close((values, grads), (want_v, want_g))
    one = tree_index(traces, 2)
    v1, g1 = choice_value_gradients(one, sel)
    _, v2, g2 = model.choice_gradients(one, sel)
    assert_trees_close((v1, g1), (v2, g2))


def test_batched_gradient_records_one_mm_for_the_shared_matrix_not_a_bmm():
    model, traces, _, _ = logreg_problem(64)
    with torch.profiler.profile(record_shapes=True) as prof:
        choice_value_gradients(traces, gf.select("w"))
    names = {e.name for e in prof.events()}
    assert "aten::mm" in names
    assert "aten::bmm" not in names and "aten::mul" not in {
        e.name for e in prof.events() if e.input_shapes and len(e.input_shapes[0]) == 3}


def test_batch_gradients_at_equals_update_then_gradients():
    traces = hier_traces()
    values, _ = choice_value_gradients(traces, HIER_SEL)
    moved = pytree.tree_map(lambda x: x + 0.25 if x.is_floating_point() else x, values)
    score, grads = batch_gradients_at(traces, HIER_SEL, moved)
    upd = per_row(lambda t, v: t.gen_fn.update(t, t.args, (gf.NoChange(),), v)[0], traces,
                  moved)
    torch.testing.assert_close(score, upd.score, **TOL)
    _, want = per_row(lambda t: choice_value_gradients(t, HIER_SEL), upd)
    assert_trees_close(grads, want)
    # values shared by every row (expanded) still get one gradient per row
    shared = pytree.tree_map(lambda x: x[:1].expand(x.shape) if x.is_floating_point() else x,
                             moved)
    _, g_shared = batch_gradients_at(traces, HIER_SEL, shared)
    upd = per_row(lambda t, v: t.gen_fn.update(t, t.args, (gf.NoChange(),), v)[0], traces,
                  shared)
    assert_trees_close(g_shared, per_row(lambda t: choice_value_gradients(t, HIER_SEL), upd)[1])
    with pytest.raises(gf.ArgumentError, match="batch of traces"):
        batch_gradients_at(tree_index(traces, 0), HIER_SEL, tree_index(moved, 0))
    with pytest.raises(gf.ArgumentError, match="structure"):
        batch_gradients_at(traces, gf.select("mu"), moved)


def test_accumulate_param_gradients_on_a_batch_sums_the_rows():
    lin = torch.nn.Linear(2, 1).double()

    @gf.gen
    def reg(x: torch.Tensor) -> torch.Tensor:
        return gf.normal(lin(x)[0], 0.5) @ "y"

    xs = torch.randn(C, 2)
    traces, _ = reg.batch_generate(C, (gf.PerRow(xs),))
    lin.zero_grad()
    arg_grads = reg.accumulate_param_gradients(traces, None, 0.5)
    got = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    want_args = []
    for i in range(C):
        want_args.append(reg.accumulate_param_gradients(tree_index(traces, i), None, 0.5)[0])
    for g, p in zip(got, lin.parameters()):
        torch.testing.assert_close(g, p.grad, **TOL)
    torch.testing.assert_close(arg_grads[0], torch.stack(want_args), **TOL)
    # a shared argument (expanded rows) still gets one gradient per row
    x0 = torch.tensor([0.3, -1.2])
    shared, _ = reg.batch_generate(C, (x0,))
    lin.zero_grad()
    a = reg.accumulate_param_gradients(shared, None, 1.0)[0]
    rows = torch.stack([reg.choice_gradients(tree_index(shared, i))[0][0] for i in range(C)])
    torch.testing.assert_close(a, rows, **TOL)


# ----------------------------------------------------------------------------- moves
def _noise(traces, sel, seed):
    values, _ = choice_value_gradients(traces, sel)
    g = torch.Generator().manual_seed(seed)
    return pytree.tree_map(lambda v: torch.randn(v.shape, generator=g, dtype=v.dtype)
                           if v.is_floating_point() else v, values)


@pytest.mark.parametrize("kernel", ["mala", "hmc"])
@pytest.mark.parametrize("problem", ["logreg", "hierarchical", "unfold"])
def test_gradient_moves_on_a_batch_equal_the_per_chain_route(kernel, problem):
    if problem == "logreg":
        _, traces, _, _ = logreg_problem()
        sel = gf.select("w")
    elif problem == "hierarchical":
        traces, sel = hier_traces(), HIER_SEL
    else:
        traces, sel = unfold_particles(), UNFOLD_SEL
    noise = _noise(traces, sel, 1)
    log_u = torch.log(torch.linspace(0.05, 0.95, C))
    if kernel == "mala":
        def move(t, e, lu):
            return mala(t, sel, TAU, noise=e, log_u=lu)

        def prop(t, e):
            return mala_propose(t, sel, TAU, e)
    else:
        def move(t, e, lu):
            return hmc(t, sel, 4, STEP, momentum=e, log_u=lu)

        def prop(t, e):
            return hmc_propose(t, sel, 4, STEP, e)
    new, acc = move(traces, noise, log_u)
    want, want_acc = per_row(move, traces, noise, log_u)
    assert acc.dtype == torch.bool and torch.equal(acc, want_acc)
    assert 0 < int(acc.sum()) < C  # both branches of the accept step are exercised
    torch.testing.assert_close(new.score, want.score, **TOL)
    assert_trees_close(new.choices, want.choices)
    proposed, log_alpha = prop(traces, noise)
    want_p, want_la = per_row(prop, traces, noise)
    torch.testing.assert_close(log_alpha, want_la, **TOL)
    torch.testing.assert_close(proposed.score, want_p.score, **TOL)
    # (the gradient at the proposal came from its update's own graph: none of it is kept)
    leaves = []
    flatten((new, proposed, log_alpha), leaves)
    assert not any(x.requires_grad for x in leaves)
    # a row of the batch equals the single-trace move
    i = 3
    one, one_acc = move(tree_index(traces, i), tree_index(noise, i), log_u[i])
    assert one_acc == bool(acc[i])
    torch.testing.assert_close(one.score, new.score[i], **TOL)


def test_mh_on_a_batch_equals_per_chain_and_keeps_shared_leaves_shared():
    _, traces, X, _ = logreg_problem()
    sel = gf.select("w")
    torch.manual_seed(11)
    new, acc = mh(traces, sel, log_u=torch.log(torch.full((C,), 0.5)))
    assert 0 < int(acc.sum()) < C
    assert new.args[0].stride(0) == 0  # the shared X was not merged row by row
    assert new["y"].stride(0) == 0
    torch.testing.assert_close(new.args[0][0], X, **TOL)
    # accepted rows hold the proposal's values and score, rejected rows the old ones
    for i in range(C):
        row = tree_index(new, i)
        old = tree_index(traces, i)
        if not bool(acc[i]):
            torch.testing.assert_close(row["w"], old["w"], **TOL)
        score, _ = row.gen_fn.assess(row.args, row.choices)
        torch.testing.assert_close(row.score, score, **TOL)


@pytest.mark.parametrize("kernel", ["mala", "hmc"])
def test_non_finite_proposals_on_a_batch_reject_every_row(kernel):
    _, traces, _, _ = logreg_problem()
    sel = gf.select("w")
    if kernel == "mala":
        new, acc = mala(traces, sel, 1e300)
    else:
        new, acc = hmc(traces, sel, 3, 1e200)
    assert not bool(acc.any())
    torch.testing.assert_close(new.score, traces.score, **TOL)
    torch.testing.assert_close(new["w"], traces["w"], **TOL)
    # one trace: the same move rejects instead of raising (unchanged behaviour)
    one = tree_index(traces, 0)
    t1, a1 = (mala(one, sel, 1e300) if kernel == "mala" else hmc(one, sel, 3, 1e200))
    assert a1 is False and t1 is one


def test_custom_choice_gradients_are_used_on_a_batch():
    calls = []

    class Counted(type(point)):  # a @gen function whose own choice_gradients is counted
        def choice_gradients(self, trace, selection=None, retgrad=None):
            calls.append(trace.score.dim())
            return super().choice_gradients(trace, selection, retgrad)

    @gf.gen
    def base(s: float) -> torch.Tensor:
        return gf.normal(0.0, s) @ "x"

    counted = Counted.__new__(Counted)
    counted.__dict__.update(base.__dict__)
    traces, _ = counted.batch_generate(C, (1.5,))
    new, acc = mala(traces, gf.select("x"), 0.1, log_u=torch.zeros(C))
    assert calls and all(d == 0 for d in calls)  # per chain, under vmap
    want = per_row(lambda t: base.choice_gradients(t, gf.select("x")), traces)
    _, got = choice_value_gradients(traces, gf.select("x"))
    assert_trees_close(got, want[2])
    assert new.score.shape == (C,) and acc.shape == (C,)


def test_gradient_moves_on_a_batch_still_name_a_discrete_choice():
    _, traces, _, _ = logreg_problem()
    with pytest.raises(gf.ArgumentError, match="discrete"):
        mala(traces, gf.select("y"), 0.1)
    with pytest.raises(gf.ArgumentError, match="discrete"):
        hmc(traces, gf.select("w", "y"), 2, 0.1)


def test_hmc_on_a_batch_samples_the_normal_normal_posterior():
    """Statistical check of the batch route: mu ~ N(0, 1), y_i ~ N(mu, 0.5), 5 points;
    1,000 chains x 30 HMC moves; exact posterior mean and variance, tolerance 5 standard
    errors of the mean over chains (seed fixed)."""
    ys = [0.3, 0.5, -0.1, 0.9, 0.4]

    @gf.gen
    def nn(n: int) -> torch.Tensor:
        mu = gf.normal(0.0, 1.0) @ "mu"
        for i in range(n):
            gf.normal(mu, 0.5) @ ("y", i)
        return mu

    obs = gf.ChoiceMap({("y", i): torch.tensor(v) for i, v in enumerate(ys)})
    torch.manual_seed(2)
    traces, _ = nn.batch_generate(1000, (5,), obs)
    for _ in range(30):
        traces, _ = hmc(traces, gf.select("mu"), 5, 0.1)
    var = 1.0 / (1.0 + 5 / 0.25)
    mean = var * sum(ys) / 0.25
    mus = traces["mu"]
    assert abs(float(mus.mean()) - mean) < 5 * math.sqrt(var / 1000)
    assert abs(float(mus.var()) / var - 1.0) < 0.15
