"""Involutive MCMC, elliptical slice sampling and MAP optimisation against exact posteriors
and modes (conjugate Gamma–Poisson and linear-Gaussian models)."""

from __future__ import annotations

import math

import pytest
import torch

import gfcomb as gf
from gfcomb.inference import (
    elliptical_slice,
    involutive_mcmc,
    log_abs_det_jacobian,
    map_optimize,
    run_chain,
)

KS = [3.0, 5.0, 2.0, 4.0]
A0, B0 = 2.0, 1.0  # Gamma(shape, rate) prior of the Poisson rate


@gf.gen
def gamma_poisson(n):
    lam = gf.gamma(A0, B0) @ "lam"
    for i in range(n):
        gf.poisson(lam) @ ("k", i)


GP_OBS = {("k", i): v for i, v in enumerate(KS)}


@gf.gen
def log_scale_proposal(trace, step):
    gf.normal(0.0, step) @ "u"


def scale_involution(trace, fwd, _ret, _args):
    """(λ, u) -> (λ e^u, −u): its own inverse; |det J| = e^u, from log_abs_det_jacobian."""
    (lam2, u2), logdet = log_abs_det_jacobian(lambda lam, u: (lam * torch.exp(u), -u),
                                              trace["lam"], fwd["u"])
    new, w, _, _ = trace.update({"lam": lam2})
    return new, gf.ChoiceMap({"u": u2}), w + logdet


def many(model, args, obs, n):
    return torch.func.vmap(lambda _: model.generate(args, obs)[0],
                           randomness="different")(torch.zeros(n))


def test_involutive_mcmc_matches_gamma_poisson_posterior():
    chains = many(gamma_poisson, (4,), GP_OBS, 2000)
    rates = []
    for _ in range(40):
        chains, acc = involutive_mcmc(chains, log_scale_proposal, (0.5,), scale_involution)
        rates.append(float(acc.double().mean()))
    a, b = A0 + sum(KS), B0 + len(KS)  # exact posterior Gamma(16, 5): mean 3.2, var 0.64
    lam = chains["lam"]
    n = lam.shape[0]
    assert abs(float(lam.mean()) - a / b) < 4 * math.sqrt(a / b**2 / n)
    assert abs(float(lam.var()) - a / b**2) < 0.1
    assert 0.2 < sum(rates) / len(rates) < 0.9


def test_involutive_mcmc_without_the_jacobian_is_wrong():
    """The same move without log|det J| targets λ·p(λ | k) instead: the oracle catches it."""
    def no_jacobian(trace, fwd, ret, args):
        new, bwd, w = scale_involution(trace, fwd, ret, args)
        return new, bwd, w - fwd["u"]

    chains = many(gamma_poisson, (4,), GP_OBS, 2000)
    for _ in range(40):
        chains, _ = involutive_mcmc(chains, log_scale_proposal, (0.5,), no_jacobian)
    a, b = A0 + sum(KS), B0 + len(KS)
    assert abs(float(chains["lam"].mean()) - (a - 1) / b) < 0.08  # Gamma(15, 5): mean 3.0


def test_involutive_mcmc_one_chain_with_run_chain():
    tr, _ = gamma_poisson.generate((4,), GP_OBS)
    res = run_chain(tr, lambda t: involutive_mcmc(t, log_scale_proposal, (0.5,),
                                                  scale_involution), 30,
                    addresses=["lam"], progress=False)
    assert res.samples["lam"].shape == (30,)
    assert 0 < res.acceptance_rate <= 1
    # forced rejection and acceptance through log_u
    same, acc = involutive_mcmc(tr, log_scale_proposal, (0.5,), scale_involution,
                                log_u=torch.tensor(0.0) + float("inf"))
    assert acc is False and same is tr


def test_log_abs_det_jacobian_against_closed_forms():
    x = torch.tensor([0.3, -1.2])
    y, ld = log_abs_det_jacobian(lambda v: torch.exp(v), x)
    assert torch.allclose(y, x.exp()) and abs(float(ld) - float(x.sum())) < 1e-12
    # polar -> cartesian: |det J| = r
    (a, b), ld = log_abs_det_jacobian(lambda r, t: (r * torch.cos(t), r * torch.sin(t)),
                                      torch.tensor(2.0), torch.tensor(0.7), mode="rev")
    assert abs(float(ld) - math.log(2.0)) < 1e-12
    # under vmap (one per chain)
    rs = torch.tensor([0.5, 1.0, 3.0])
    lds = torch.func.vmap(lambda r: log_abs_det_jacobian(
        lambda rr, t: (rr * torch.cos(t), rr * torch.sin(t)), r, torch.tensor(0.1))[1])(rs)
    assert torch.allclose(lds, rs.log())
    with pytest.raises(gf.ArgumentError, match="bijection"):
        log_abs_det_jacobian(lambda v: v.sum(), x)
    with pytest.raises(gf.ArgumentError, match="mode"):
        log_abs_det_jacobian(lambda v: v, x, mode="central")


# ------------------------------------------------------------------ elliptical slice
M0 = torch.tensor([0.5, -0.5], dtype=torch.float64)
C0 = torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=torch.float64)
Y = torch.tensor([1.2, 0.3], dtype=torch.float64)
NOISE = 0.7


@gf.gen
def latent_gaussian():
    f = gf.mv_normal(M0, C0) @ "f"
    gf.normal(f, NOISE) @ "y"


def gaussian_posterior():
    prec = torch.linalg.inv(C0) + torch.eye(2) / NOISE**2
    cov = torch.linalg.inv(prec)
    return cov @ (torch.linalg.solve(C0, M0) + Y / NOISE**2), cov


def test_elliptical_slice_chains_match_gaussian_posterior():
    chains = many(latent_gaussian, (), {"y": Y}, 1000)
    for _ in range(12):
        chains, accepted = elliptical_slice(chains, "f", M0, C0)
        assert bool(accepted.all())
    mean, cov = gaussian_posterior()
    f = chains["f"]
    se = (cov.diagonal() / f.shape[0]).sqrt()
    assert bool(((f.mean(0) - mean).abs() < 4 * se).all())
    assert torch.allclose(torch.cov(f.T), cov, atol=0.08)


@gf.gen
def scalar_probit(ys):
    x = gf.normal(0.3, 1.5) @ "x"
    for i in range(ys.shape[0]):
        gf.bernoulli(torch.sigmoid(x)) @ ("y", i)


def test_elliptical_slice_scalar_non_gaussian_likelihood():
    """x ~ N(0.3, 1.5²), y_i ~ Bernoulli(σ(x)): compare with quadrature of the posterior."""
    ys = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    obs = {("y", i): v for i, v in enumerate(ys)}
    grid = torch.linspace(-6, 8, 20001)
    logp = torch.distributions.Normal(0.3, 1.5).log_prob(grid) + (
        ys.sum() * torch.nn.functional.logsigmoid(grid)
        + (len(ys) - ys.sum()) * torch.nn.functional.logsigmoid(-grid))
    w = torch.softmax(logp, 0)
    exact_mean = float((w * grid).sum())
    exact_sd = float((w * (grid - exact_mean) ** 2).sum().sqrt())
    chains = many(scalar_probit, (ys,), obs, 1000)
    for _ in range(10):
        chains, _ = elliptical_slice(chains, "x", 0.3, 1.5**2)
    x = chains["x"]
    assert abs(float(x.mean()) - exact_mean) < 4 * exact_sd / math.sqrt(1000)
    assert abs(float(x.std()) - exact_sd) < 0.08
    _, acc = elliptical_slice(many(scalar_probit, (ys,), obs, 1), "x", 0.3, 1.5**2)
    assert acc.shape == (1,)  # a batch of one chain stays a batch


def test_elliptical_slice_one_trace_and_bad_input():
    tr, _ = latent_gaussian.generate((), {"y": Y})
    new, acc = elliptical_slice(tr, "f", M0, C0)
    assert acc is True and torch.isfinite(new.score) and torch.equal(new["y"], Y)
    with pytest.raises(gf.ArgumentError, match="cov"):
        elliptical_slice(tr, "f", M0, torch.eye(3))
    with pytest.raises(gf.ArgumentError, match="positive definite"):
        elliptical_slice(tr, "f", M0, -torch.eye(2))


# ------------------------------------------------------------------ MAP
def test_map_optimize_reaches_the_exact_mode():
    mean, _ = gaussian_posterior()  # the mode of a Gaussian posterior is its mean
    tr, _ = latent_gaussian.generate((), {"y": Y})
    opt = map_optimize(tr, gf.select("f"), 40, 0.5)
    assert torch.allclose(opt["f"], mean, atol=1e-6)
    assert float(opt.score) >= float(tr.score)
    assert torch.equal(opt["y"], Y)
    # batched: every chain reaches the mode
    chains = many(latent_gaussian, (), {"y": Y}, 20)
    opt = map_optimize(chains, gf.select("f"), 80, 0.5)
    assert float((opt["f"] - mean).abs().max()) < 1e-6


def test_map_optimize_gamma_poisson_mode():
    tr, _ = gamma_poisson.generate((4,), GP_OBS)
    opt = map_optimize(tr, gf.select("lam"), 25, 0.5)
    a, b = A0 + sum(KS), B0 + len(KS)
    assert abs(float(opt["lam"]) - (a - 1) / b) < 1e-5  # the mode of Gamma(16, 5) is 3.0


def test_map_optimize_bad_input():
    tr, _ = gamma_poisson.generate((4,), GP_OBS)
    with pytest.raises(gf.ArgumentError, match="not continuous"):
        map_optimize(tr, gf.select(("k", 0)), 5, 0.1)
    with pytest.raises(gf.ArgumentError, match="selects no choice"):
        map_optimize(tr, gf.select("nope"), 5, 0.1)
    with pytest.raises(gf.ArgumentError, match="lr"):
        map_optimize(tr, gf.select("lam"), 5, -1.0)


@gf.gen
def ar_step(_t, x, a):
    x = gf.normal(a * x, 0.5) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


def test_elliptical_slice_rejuvenates_particle_filter_traces():
    """Particle traces of an Unfold (steps in a shared history) move through pf_rejuvenate;
    x_0's posterior mean given y_0, y_1 is known by quadrature."""
    from gfcomb.inference import pf_initialize, pf_rejuvenate, pf_resample, pf_update

    ssm, x0, a = gf.Unfold(ar_step), torch.tensor(0.3), torch.tensor(0.9)
    ys = (0.3, -0.2)
    state = pf_initialize(ssm, (1, x0, a), {(0, "y"): ys[0]}, 4000)
    state = pf_update(state, (2, x0, a), (gf.UnknownChange(), gf.NoChange(), gf.NoChange()),
                      {(1, "y"): ys[1]})
    state = pf_resample(state)
    for _ in range(3):
        state = pf_rejuvenate(state, lambda tr: elliptical_slice(tr, (0, "x"), 0.27, 0.25))
    assert bool(state.accepted.all())
    g = torch.linspace(-5, 5, 20001)
    normal = torch.distributions.Normal
    lp = (normal(0.27, 0.5).log_prob(g) + normal(g, 1.0).log_prob(torch.tensor(ys[0]))
          + normal(0.9 * g, math.sqrt(1.25)).log_prob(torch.tensor(ys[1])))
    exact = float((torch.softmax(lp, 0) * g).sum())
    # 4,000 resampled particles (sd of x_0 ~0.45): the particle mean is within ~0.03
    assert abs(float(state.traces[:, "x"][:, 0].mean()) - exact) < 0.05
