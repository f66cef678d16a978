"""MCMC kernels (gfcomb.inference.mcmc): exact log acceptance ratios against hand-computed
densities, batched chains equal to per-chain runs under fixed randomness, conjugate posterior
moments, bad input, no mutation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal
from torch.utils import _pytree as pytree

import gfcomb as gf
from gfcomb.core.pytree import tree_index
from gfcomb.inference.chains import run_chain
from gfcomb.inference.mcmc import (
    accept_reject,
    hmc,
    hmc_propose,
    is_batched_trace,
    mala,
    mala_propose,
    mh,
    mh_propose,
    mh_propose_custom,
)
from gfcomb.inference.progress import progress_bar, progress_enabled

# ----------------------------------------------------------------------------- the model
# mu ~ N(0, 1), y_i ~ N(mu, 0.5), i = 0..4: posterior N(m, v) with
# 1/v = 1 + 5/0.25, m = v * Σy/0.25.
YS = [0.3, 0.5, -0.1, 0.9, 0.4]
SIGMA = 0.5


@gf.gen
def normal_model(n: int) -> torch.Tensor:
    mu = gf.normal(0.0, 1.0) @ "mu"
    for i in range(n):
        gf.normal(mu, SIGMA) @ ("y", i)
    return mu


def observations() -> gf.ChoiceMap:
    return gf.ChoiceMap({("y", i): torch.tensor(y) for i, y in enumerate(YS)})


def exact_posterior() -> tuple[float, float]:
    prec = 1.0 + len(YS) / SIGMA**2
    var = 1.0 / prec
    return var * sum(YS) / SIGMA**2, var


def log_joint(mu: torch.Tensor) -> torch.Tensor:
    ys = torch.tensor(YS)
    return Normal(0.0, 1.0).log_prob(mu) + Normal(mu[..., None], SIGMA).log_prob(ys).sum(-1)


def grad_log_joint(mu: torch.Tensor) -> torch.Tensor:
    ys = torch.tensor(YS)
    return -mu + (ys - mu[..., None]).sum(-1) / SIGMA**2


def one_trace(mu: float = 0.7) -> gf.Trace:
    cm = observations().merge(gf.ChoiceMap({"mu": torch.tensor(mu)}))
    tr, _ = normal_model.generate((len(YS),), cm)
    return tr


def batched_traces(n: int) -> gf.Trace:
    obs = observations()
    traces, _ = torch.func.vmap(lambda _: normal_model.generate((len(YS),), obs),
                                randomness="different")(torch.zeros(n))
    return traces


def leaves(tree):
    return [x.clone() for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def assert_unchanged(tree, saved):
    now = [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]
    assert len(now) == len(saved)
    for a, b in zip(now, saved):
        assert torch.equal(a, b)


def assert_same_trace(a: gf.Trace, b: gf.Trace) -> None:
    la = [x for x in pytree.tree_leaves(a) if isinstance(x, torch.Tensor)]
    lb = [x for x in pytree.tree_leaves(b) if isinstance(x, torch.Tensor)]
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- exact ratios
def test_mh_regenerate_weight_is_hand_computed_log_ratio():
    tr = one_trace(0.7)
    saved = leaves(tr)
    new, log_alpha = mh_propose(tr, gf.select("mu"))
    expected = (log_joint(new["mu"]) - Normal(0.0, 1.0).log_prob(new["mu"])) \
        - (log_joint(tr["mu"]) - Normal(0.0, 1.0).log_prob(tr["mu"]))
    assert abs(log_alpha.item() - expected.item()) < 1e-9
    assert abs(new.score.item() - log_joint(new["mu"]).item()) < 1e-9
    assert_unchanged(tr, saved)


@gf.gen
def shrink_proposal(trace: gf.Trace, scale: float) -> None:
    # asymmetric: centred at 0.5 * mu + 0.1, so the q-terms do not cancel
    gf.normal(0.5 * trace["mu"] + 0.1, scale) @ "mu"


def custom_log_ratio(old: torch.Tensor, new: torch.Tensor, scale: float) -> torch.Tensor:
    fwd = Normal(0.5 * old + 0.1, scale).log_prob(new)
    bwd = Normal(0.5 * new + 0.1, scale).log_prob(old)
    return log_joint(new) - log_joint(old) + bwd - fwd


def test_mh_custom_proposal_weight_is_hand_computed_log_ratio():
    tr = one_trace(0.7)
    saved = leaves(tr)
    new, log_alpha = mh_propose_custom(tr, shrink_proposal, (0.3,))
    expected = custom_log_ratio(tr["mu"], new["mu"], 0.3)
    assert abs(log_alpha.item() - expected.item()) < 1e-9
    assert_unchanged(tr, saved)


def test_mh_custom_proposal_batched_rows_are_hand_computed():
    trs = batched_traces(64)
    new, log_alpha = mh_propose_custom(trs, shrink_proposal, (0.3,))
    assert log_alpha.shape == (64,)
    expected = custom_log_ratio(trs["mu"], new["mu"], 0.3)
    torch.testing.assert_close(log_alpha, expected, rtol=0, atol=1e-9)


def test_mh_regenerate_batched_rows_are_hand_computed():
    trs = batched_traces(64)
    new, log_alpha = mh_propose(trs, gf.select("mu"))
    lik = lambda mu: log_joint(mu) - Normal(0.0, 1.0).log_prob(mu)
    torch.testing.assert_close(log_alpha, lik(new["mu"]) - lik(trs["mu"]), rtol=0, atol=1e-9)
    torch.testing.assert_close(new.score, log_joint(new["mu"]), rtol=0, atol=1e-9)


def test_mala_log_ratio_with_given_noise():
    tr = one_trace(0.7)
    saved = leaves(tr)
    tau, eps = 0.03, torch.tensor(0.4)
    new, log_alpha = mala_propose(tr, gf.select("mu"), tau, noise=gf.ChoiceMap({"mu": eps}))
    mu = tr["mu"]
    std = math.sqrt(2 * tau)
    mu_new = mu + tau * grad_log_joint(mu) + std * eps
    assert abs(new["mu"].item() - mu_new.item()) < 1e-12
    expected = (log_joint(mu_new) - log_joint(mu)
                + Normal(mu_new + tau * grad_log_joint(mu_new), std).log_prob(mu)
                - Normal(mu + tau * grad_log_joint(mu), std).log_prob(mu_new))
    assert abs(log_alpha.item() - expected.item()) < 1e-9
    assert_unchanged(tr, saved)


def leapfrog(mu: torch.Tensor, p: torch.Tensor, n_steps: int, eps: float):
    p0 = p
    for _ in range(n_steps):
        p = p + eps / 2 * grad_log_joint(mu)
        mu = mu + eps * p
        p = p + eps / 2 * grad_log_joint(mu)
    return mu, p, p0


def test_hmc_log_ratio_with_given_momentum():
    tr = one_trace(0.7)
    saved = leaves(tr)
    p = torch.tensor(-0.8)
    new, log_alpha = hmc_propose(tr, gf.select("mu"), 4, 0.05, momentum=gf.ChoiceMap({"mu": p}))
    mu_new, p_new, _ = leapfrog(tr["mu"], p, 4, 0.05)
    assert abs(new["mu"].item() - mu_new.item()) < 1e-12
    expected = log_joint(mu_new) - log_joint(tr["mu"]) - 0.5 * p_new**2 + 0.5 * p**2
    assert abs(log_alpha.item() - expected.item()) < 1e-9
    assert abs(new.score.item() - log_joint(mu_new).item()) < 1e-9
    assert_unchanged(tr, saved)


def test_accept_reject_single_chain():
    a, b = one_trace(0.1), one_trace(0.2)
    out, acc = accept_reject(a, b, torch.tensor(-0.5), log_u=torch.tensor(-0.6))
    assert acc is True and out is b
    out, acc = accept_reject(a, b, torch.tensor(-0.5), log_u=torch.tensor(-0.4))
    assert acc is False and out is a
    out, acc = accept_reject(a, b, torch.tensor(float("nan")), log_u=torch.tensor(-1e9))
    assert acc is False and out is a
    out, acc = accept_reject(a, b, torch.tensor(float("-inf")), log_u=torch.tensor(-1e300))
    assert acc is False


# ----------------------------------------------------------------------------- batched = loop
def per_chain(fn, trs, *per, n):
    outs = [fn(tree_index(trs, i), *[None if x is None else tree_index(x, i) for x in per])
            for i in range(n)]
    return outs


def test_hmc_batched_equals_per_chain_loop():
    n = 16
    trs = batched_traces(n)
    saved = leaves(trs)
    momentum = gf.ChoiceMap({"mu": torch.randn(n)})
    sel = gf.select("mu")
    _, log_alpha = hmc_propose(trs, sel, 3, 0.2, momentum=momentum)
    log_u = log_alpha + torch.where(torch.arange(n) % 2 == 0, 0.01, -0.01)  # half accept
    new, acc = hmc(trs, sel, 3, 0.2, momentum=momentum, log_u=log_u)
    assert is_batched_trace(new) and acc.shape == (n,) and acc.dtype == torch.bool
    torch.testing.assert_close(acc, torch.arange(n) % 2 == 1)
    loop = per_chain(lambda t, m, u: hmc(t, sel, 3, 0.2, momentum=m, log_u=u),
                     trs, momentum, log_u, n=n)
    for i, (t_i, a_i) in enumerate(loop):
        assert bool(acc[i]) == a_i
        assert_same_trace(tree_index(new, i), t_i)
    assert_unchanged(trs, saved)


def test_mala_batched_equals_per_chain_loop():
    n = 16
    trs = batched_traces(n)
    noise = gf.ChoiceMap({"mu": torch.randn(n)})
    sel = gf.select("mu")
    _, log_alpha = mala_propose(trs, sel, 0.05, noise=noise)
    log_u = log_alpha + torch.where(torch.arange(n) % 2 == 0, 0.01, -0.01)  # half accept
    new, acc = mala(trs, sel, 0.05, noise=noise, log_u=log_u)
    torch.testing.assert_close(acc, torch.arange(n) % 2 == 1)
    loop = per_chain(lambda t, e, u: mala(t, sel, 0.05, noise=e, log_u=u),
                     trs, noise, log_u, n=n)
    for i, (t_i, a_i) in enumerate(loop):
        assert bool(acc[i]) == a_i
        assert_same_trace(tree_index(new, i), t_i)


def test_mh_accept_logic_batched_equals_per_chain():
    n = 32
    trs = batched_traces(n)
    proposed, log_alpha = mh_propose(trs, gf.select("mu"))
    log_u = torch.log(torch.rand(n))
    new, acc = accept_reject(trs, proposed, log_alpha, log_u)
    torch.testing.assert_close(acc, log_u < log_alpha)
    assert 0 < int(acc.sum()) < n
    for i in range(n):
        t_i, a_i = accept_reject(tree_index(trs, i), tree_index(proposed, i), log_alpha[i],
                                 log_u[i])
        assert a_i == bool(acc[i])
        assert_same_trace(tree_index(new, i), t_i)
    # the kernel with the same uniforms: every chain either kept its state or moved
    new2, acc2 = mh(trs, gf.select("mu"), log_u=log_u)
    kept = ~acc2
    torch.testing.assert_close(new2["mu"][kept], trs["mu"][kept], rtol=0, atol=0)
    torch.testing.assert_close(new2.score, log_joint(new2["mu"]), rtol=0, atol=1e-9)


def test_mh_extreme_uniforms_accept_all_or_none():
    n = 8
    trs = batched_traces(n)
    sel = gf.select("mu")
    none, acc = mh(trs, sel, log_u=torch.full((n,), float("inf")))
    assert not acc.any()
    assert_same_trace(none, trs)
    new, acc = mh(trs, shrink_proposal, (0.3,), log_u=torch.full((n,), float("-inf")))
    assert acc.all()
    assert not torch.equal(new["mu"], trs["mu"])


@gf.gen
def hier_kernel(mu: torch.Tensor) -> torch.Tensor:
    x = gf.normal(mu, 1.0) @ "x"
    return gf.normal(x, SIGMA) @ "y"


def test_hmc_on_map_choices_batched_equals_loop():
    # Map choices (stacked per element) selected element by element, under vmap over chains
    @gf.gen
    def model(xs_len: torch.Tensor) -> torch.Tensor:
        mu = gf.normal(0.0, 1.0) @ "mu"
        mus = mu + 0.0 * xs_len
        return gf.Map(hier_kernel)(mus) @ "pts"

    ys = torch.tensor([0.5, -0.2, 1.1])
    obs = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys}), 3).prefixed("pts")
    n = 8
    trs, _ = torch.func.vmap(lambda _: model.generate((torch.zeros(3),), obs),
                             randomness="different")(torch.zeros(n))
    sel = gf.select("mu", ("pts", 0, "x"), ("pts", 1, "x"), ("pts", 2, "x"))
    _, values, _ = torch.func.vmap(lambda t: model.choice_gradients(t, sel),
                                   randomness="different")(trs)
    momentum = pytree.tree_map(
        lambda v: torch.randn_like(v) if isinstance(v, torch.Tensor) and v.is_floating_point()
        else v, values)
    log_u = torch.log(torch.rand(n))
    new, acc = hmc(trs, sel, 2, 0.1, momentum=momentum, log_u=log_u)
    assert new["pts", 0, "x"].shape == (n,)
    loop = per_chain(lambda t, m, u: hmc(t, sel, 2, 0.1, momentum=m, log_u=u),
                     trs, momentum, log_u, n=n)
    for i, (t_i, a_i) in enumerate(loop):
        assert bool(acc[i]) == a_i
        assert_same_trace(tree_index(new, i), t_i)
    # the score is the hand-computed joint density
    mu, x = new["mu"], torch.stack([new["pts", j, "x"] for j in range(3)], -1)
    expected = (Normal(0.0, 1.0).log_prob(mu) + Normal(mu[:, None], 1.0).log_prob(x).sum(-1)
                + Normal(x, SIGMA).log_prob(ys).sum(-1))
    torch.testing.assert_close(new.score, expected, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- posteriors
N_CHAINS = 2000


def check_posterior(mu: torch.Tensor) -> None:
    """Final states of N independent chains: mean within 5 standard errors, variance too."""
    m, v = exact_posterior()
    n = mu.numel()
    se_mean = math.sqrt(v / n)
    se_var = v * math.sqrt(2.0 / (n - 1))
    assert abs(mu.mean().item() - m) < 5 * se_mean, (mu.mean().item(), m, se_mean)
    assert abs(mu.var().item() - v) < 5 * se_var, (mu.var().item(), v, se_var)


@pytest.mark.parametrize("name", ["mh_prior", "mh_random_walk", "mala", "hmc"])
def test_posterior_moments_match_normal_normal(name):
    torch.manual_seed(1)
    trs = batched_traces(N_CHAINS)
    sel = gf.select("mu")
    kernel = {
        "mh_prior": lambda t: mh(t, sel),
        "mh_random_walk": lambda t: mh(t, rw_proposal, (0.25,)),
        "mala": lambda t: mala(t, sel, 0.02),
        "hmc": lambda t: hmc(t, sel, 5, 0.1),
    }[name]
    steps = {"mh_prior": 150, "mh_random_walk": 150, "mala": 100, "hmc": 60}[name]
    result = run_chain(trs, kernel, steps, addresses=["mu"], progress=False)
    assert result.samples["mu"].shape == (steps, N_CHAINS)
    assert 0.1 < result.acceptance_rate <= 1.0
    check_posterior(result.trace["mu"])
    # the final traces are proper traces: score = hand-computed joint
    torch.testing.assert_close(result.trace.score, log_joint(result.trace["mu"]),
                               rtol=0, atol=1e-9)


@gf.gen
def rw_proposal(trace: gf.Trace, scale: float) -> None:
    gf.normal(trace["mu"], scale) @ "mu"


def test_single_chain_run():
    tr = one_trace(0.0)
    result = run_chain(tr, [lambda t: mh(t, gf.select("mu")),
                            lambda t: hmc(t, gf.select("mu"), 3, 0.1)],
                       300, addresses=["mu"], burn_in=100, thin=2, progress=False)
    assert result.samples["mu"].shape == (100,)
    assert result.acceptance_rates.shape == (2,)
    m, v = exact_posterior()
    # a correlated chain: a loose check only (the batched tests are the precise ones)
    assert abs(result.samples["mu"].mean().item() - m) < 0.1
    assert isinstance(mh(tr, gf.select("mu"))[1], bool)


def test_run_chain_counts_and_thinning():
    trs = batched_traces(5)
    calls = []

    def kernel(t):
        calls.append(1)
        return t, torch.tensor([True, False, True, False, True])

    r = run_chain(trs, kernel, 10, addresses=["mu", ("y", 0)], burn_in=4, thin=3,
                  progress=False)
    assert len(calls) == 10
    assert r.samples["mu"].shape == (2, 5)  # steps 7 and 10
    assert r.samples["y", 0].shape == (2, 5)
    torch.testing.assert_close(r.acceptance_rates, torch.tensor([[1.0, 0, 1, 0, 1]]))
    assert abs(r.acceptance_rate - 0.6) < 1e-12


# ----------------------------------------------------------------------------- bad input
@gf.gen
def mixed_model() -> None:
    gf.bernoulli(0.3) @ "b"
    mu = gf.normal(0.0, 1.0) @ "mu"
    gf.normal(mu, 1.0) @ "y"


def test_gradient_moves_reject_discrete_choice_naming_it():
    tr, _ = mixed_model.generate((), {"y": 0.2})
    for move in (lambda: hmc(tr, gf.select("b", "mu"), 2, 0.1),
                 lambda: mala(tr, gf.select("b"), 0.1)):
        with pytest.raises(gf.ArgumentError, match="'b'.*discrete"):
            move()
    # the discrete choice left out: fine
    new, _ = hmc(tr, gf.select("mu"), 2, 0.1)
    assert new["b"] == tr["b"]


@gf.gen
def coin_kernel(p: torch.Tensor) -> None:
    gf.bernoulli(p) @ "b"
    gf.normal(0.0, 1.0) @ "x"


def test_discrete_choice_inside_map_is_named():
    model = gf.Map(coin_kernel)
    tr = model.simulate((torch.full((3,), 0.4),))
    with pytest.raises(gf.ArgumentError, match="'b'.*discrete"):
        mala(tr, gf.select((1, "b")), 0.1)
    new, _ = mala(tr, gf.select((1, "x")), 0.1)
    assert torch.equal(new[:, "b"], tr[:, "b"])


def test_gradient_moves_reject_empty_selection():
    tr = one_trace()
    with pytest.raises(gf.ArgumentError, match="selects no choice"):
        hmc(tr, gf.select(), 2, 0.1)
    with pytest.raises(gf.ArgumentError, match="selects no choice"):
        hmc(tr, gf.select("nowhere"), 2, 0.1)
    with pytest.raises(gf.ArgumentError, match="selects no choice"):
        mala(batched_traces(3), gf.Selection.none(), 0.1)


def test_bad_arguments_are_named():
    tr = one_trace()
    with pytest.raises(gf.ArgumentError, match="n_steps"):
        hmc(tr, gf.select("mu"), 0, 0.1)
    with pytest.raises(gf.ArgumentError, match="step_size"):
        hmc(tr, gf.select("mu"), 3, -0.1)
    with pytest.raises(gf.ArgumentError, match="tau"):
        mala(tr, gf.select("mu"), float("nan"))
    with pytest.raises(gf.ArgumentError, match="Selection or a proposal"):
        mh(tr, "mu")
    with pytest.raises(gf.ArgumentError, match="proposal_args"):
        mh(tr, gf.select("mu"), (1.0,))
    with pytest.raises(gf.ArgumentError, match="kernel"):
        run_chain(tr, [], 3)


def test_progress_bar_off_when_not_a_terminal():
    assert progress_enabled(False) is False
    assert progress_enabled(True) is True
    assert progress_enabled(None) is False  # pytest captures stdout
    bar = progress_bar(3, progress=None)
    assert list(bar) == [0, 1, 2]
    bar.set_postfix(x=1)
    bar.close()


# ----------------------------------------------------------------------------- Unfold particles
@gf.gen
def ar_step(t: int, x_prev: torch.Tensor) -> torch.Tensor:
    x = gf.normal(0.9 * x_prev, 0.5) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


def ar_log_joint(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    prev = torch.cat([torch.zeros_like(xs[..., :1]), xs[..., :-1]], -1)
    return (Normal(0.9 * prev, 0.5).log_prob(xs) + Normal(xs, 1.0).log_prob(ys)).sum(-1)


@pytest.mark.parametrize("kernel", ["mh", "mala", "hmc"])
def test_moves_on_batched_unfold_particles_with_shared_history(kernel):
    """Particle traces whose steps sit in a shared history (what a particle filter holds):
    the proposal has another record layout; rejected chains must keep their values."""
    from gfcomb.core.batched import compact_history

    model = gf.Unfold(ar_step)
    ys = torch.tensor([0.3, -0.4, 1.0, 0.2])
    obs = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys}), 4)
    n = 12
    trs, _ = torch.func.vmap(lambda _: model.generate((4, torch.tensor(0.0)), obs),
                             randomness="different")(torch.zeros(n))
    trs = compact_history(trs)
    old_x = trs[:, "x"].clone()
    sel = gf.select((3, "x"), (2, "x"))
    half = torch.arange(n) % 2 == 0
    inf = torch.where(half, float("-inf"), float("inf"))  # even chains accept, odd reject
    if kernel == "mh":
        new, acc = mh(trs, sel, log_u=inf)
    elif kernel == "mala":
        new, acc = mala(trs, sel, 0.05, log_u=inf)
    else:
        new, acc = hmc(trs, sel, 2, 0.1, log_u=inf)
    torch.testing.assert_close(acc, half)
    new_x = new[:, "x"]
    assert torch.equal(new_x[~half], old_x[~half])
    assert torch.equal(new_x[half][:, :2], old_x[half][:, :2])
    assert not torch.equal(new_x[half][:, 3], old_x[half][:, 3])
    torch.testing.assert_close(new.score, ar_log_joint(new_x, ys), rtol=0, atol=1e-9)
    torch.testing.assert_close(trs[:, "x"], old_x, rtol=0, atol=0)  # input untouched


# ------------------------------------------------------- proposals that leave the support
@gf.gen
def _stiff():
    x = gf.normal(0.0, 1.0) @ "x"
    gf.normal(x ** 3, 0.01) @ "y"


def test_moves_whose_proposal_is_not_finite_reject_instead_of_raising():
    """hmc with a huge step size and a stiff model, mala with a huge tau: the proposal's
    values or densities are not finite, so the move rejects (single trace and batch alike),
    and the trace is returned unchanged."""
    from gfcomb.inference import hmc, mala

    tr, _ = _stiff.generate((), {"x": torch.tensor(0.3), "y": torch.tensor(0.1)})
    sel = gf.select("x")
    for move in (lambda t: hmc(t, sel, 3, 1e200), lambda t: hmc(t, sel, 10, 0.5),
                 lambda t: mala(t, sel, 1e200)):
        new, accepted = move(tr)
        assert accepted is False and new is tr
    batch = torch.func.vmap(lambda _: _stiff.generate(
        (), {"x": torch.tensor(0.3), "y": torch.tensor(0.1)})[0], randomness="different")(
        torch.zeros(4))
    new, accepted = hmc(batch, sel, 3, 1e200)
    assert not bool(accepted.any())
    torch.testing.assert_close(new["x"], batch["x"])
