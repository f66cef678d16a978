"""Importance sampling and importance resampling, vectorized over samples: the evidence
against the Beta–Bernoulli closed form, per-sample weights against hand-computed densities,
an exact custom proposal, bad input and degenerate weights."""

from __future__ import annotations

import math

import pytest
import torch

import gfcomb as gf
from gfcomb.core.errors import ArgumentError, DegenerateWeightsError
from gfcomb.inference.importance import (
    ImportanceResult,
    importance_resampling,
    importance_sampling,
)

YS = [1, 0, 1, 1, 1, 0, 1, 1, 0, 1]
A, B = 2.0, 3.0


@gf.gen
def beta_bernoulli(n, a, b):
    p = gf.beta(a, b) @ "p"
    for i in range(n):
        gf.bernoulli(p) @ ("y", i)
    return p


@gf.gen
def exact_posterior(a, b):
    """The exact posterior of p as a proposal (its address is the model's "p")."""
    gf.beta(a, b) @ "p"


def observations():
    return gf.ChoiceMap({("y", i): torch.tensor(float(v)) for i, v in enumerate(YS)})


def args():
    return (len(YS), torch.tensor(A), torch.tensor(B))


def log_beta_fn(a, b):
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def exact_log_evidence():
    k, n = sum(YS), len(YS)
    return log_beta_fn(A + k, B + n - k) - log_beta_fn(A, B)


def log_lik(p):
    k, n = sum(YS), len(YS)
    return k * torch.log(p) + (n - k) * torch.log1p(-p)


def test_evidence_matches_beta_bernoulli_closed_form():
    """20,000 prior samples: the estimator's standard deviation here is ~0.003 (measured over
    10 seeds), so 0.05 is > 10 sigma."""
    res = importance_sampling(beta_bernoulli, args(), observations(), 20_000)
    assert isinstance(res, ImportanceResult)
    assert abs(float(res.log_ml_estimate) - exact_log_evidence()) < 0.05
    assert res.n_samples == 20_000
    assert res.log_weights.shape == (20_000,)
    assert res.traces["p"].shape == (20_000,)
    assert 1 <= float(res.effective_sample_size) <= 20_000
    assert float(res.normalized_weights.sum()) == pytest.approx(1.0, abs=1e-12)


def test_weights_and_scores_per_sample_are_exact():
    res = importance_sampling(beta_bernoulli, args(), observations(), 50)
    p = res.traces["p"]
    # log w_i = log p(y | p_i), written out by hand
    assert torch.allclose(res.log_weights, log_lik(p), atol=1e-9, rtol=0)
    prior = torch.distributions.Beta(A, B).log_prob(p)
    assert torch.allclose(res.traces.score, prior + log_lik(p), atol=1e-9, rtol=0)
    for i in (0, 17, 49):  # every observation is in every sample's trace
        for j, v in enumerate(YS):
            assert float(res.traces[("y", j)][i]) == v
    lse = torch.logsumexp(res.log_weights, 0) - math.log(50)
    assert float(res.log_ml_estimate) == pytest.approx(float(lse), abs=1e-12)


def test_batched_samples_equal_a_per_sample_loop_under_the_same_seed():
    """The vmapped draw uses the RNG as one batched call: compare against assess, which
    re-scores each sample's choices one by one."""
    res = importance_sampling(beta_bernoulli, args(), observations(), 8)
    for i in range(8):
        choices = observations().merge(gf.ChoiceMap({"p": res.traces["p"][i]}))
        w, _ = beta_bernoulli.assess(args(), choices)
        assert float(w) == pytest.approx(float(res.traces.score[i]), abs=1e-9)


def test_exact_posterior_proposal_gives_exact_weights():
    """With q = the exact posterior Beta(a + k, b + n − k), every weight equals log p(y)."""
    k, n = sum(YS), len(YS)
    res = importance_sampling(beta_bernoulli, args(), observations(), 1000,
                              proposal=exact_posterior,
                              proposal_args=(torch.tensor(A + k), torch.tensor(B + n - k)))
    assert torch.allclose(res.log_weights, torch.full((1000,), exact_log_evidence()),
                          atol=1e-9, rtol=0)
    assert float(res.log_ml_estimate) == pytest.approx(exact_log_evidence(), abs=1e-9)
    assert float(res.effective_sample_size) == pytest.approx(1000, abs=1e-6)


def test_custom_proposal_weights_are_model_minus_proposal_score():
    res = importance_sampling(beta_bernoulli, args(), observations(), 200,
                              proposal=exact_posterior,
                              proposal_args=(torch.tensor(1.0), torch.tensor(1.0)))
    p = res.traces["p"]
    expected = (torch.distributions.Beta(A, B).log_prob(p) + log_lik(p)
                - torch.distributions.Beta(1.0, 1.0).log_prob(p))
    assert torch.allclose(res.log_weights, expected, atol=1e-9, rtol=0)
    assert abs(float(res.log_ml_estimate) - exact_log_evidence()) < 0.1


def test_importance_resampling():
    k, n = sum(YS), len(YS)
    res = importance_resampling(beta_bernoulli, args(), observations(), 20_000, n_draws=500)
    p = res.traces["p"]
    assert p.shape == (500,)
    assert abs(float(res.log_ml_estimate) - exact_log_evidence()) < 0.05
    # the draws follow the posterior Beta(a+k, b+n-k): mean (a+k)/(a+b+n), sd ~0.12, so the
    # mean of 500 draws has a standard error ~0.006 (plus the SIR error, smaller)
    assert abs(float(p.mean()) - (A + k) / (A + B + n)) < 0.03
    one = importance_resampling(beta_bernoulli, args(), observations(), 100,
                                method="systematic")
    assert one.traces["p"].shape == (1,)


def test_importance_sampling_does_not_mutate_observations():
    obs = observations()
    before = {a: v.clone() for a, v in obs.items()}
    importance_sampling(beta_bernoulli, args(), obs, 10)
    assert all(torch.equal(obs[a], v) for a, v in before.items())


@gf.gen
def impossible(p):
    gf.bernoulli(p) @ "y"


def test_degenerate_weights_raise():
    with pytest.raises(DegenerateWeightsError, match="importance_sampling at step 0.*all 10 "
                                                     "log weights are -inf"):
        importance_sampling(impossible, (torch.tensor(0.0),), {"y": torch.tensor(1.0)}, 10)


def test_bad_input_is_named():
    with pytest.raises(ArgumentError, match="n_samples must be a positive int"):
        importance_sampling(beta_bernoulli, args(), observations(), 0)
    with pytest.raises(ArgumentError, match="model must be a generative function"):
        importance_sampling(lambda: None, args(), observations(), 5)
    with pytest.raises(ArgumentError, match="proposal must be a generative function"):
        importance_sampling(beta_bernoulli, args(), observations(), 5, proposal=3)
    with pytest.raises(ArgumentError, match="args must be a tuple"):
        importance_sampling(beta_bernoulli, [1], observations(), 5)
    with pytest.raises(ArgumentError, match="n_draws"):
        importance_resampling(beta_bernoulli, args(), observations(), 5, n_draws=0)


# ------------------------------------------------ a model that cannot run under vmap
@gf.gen
def _branchy(T):
    z = gf.bernoulli(0.5) @ "z"
    # Python control flow on a choice: not vmappable (the scales are tensors, so that the
    # per-particle traces of vectorize=False can be stored stacked)
    p = torch.tensor(0.3) if z else torch.tensor(0.4)
    x = gf.normal(0.0, 1.0) @ "x0"
    for t in range(T):
        x = gf.normal(x, p) @ ("x", t)
    return x


def test_a_model_that_cannot_be_vmapped_names_the_cause_and_runs_per_particle():
    from gfcomb.inference import pf_initialize, pf_update

    obs = {("x", 0): torch.tensor(0.2)}
    with pytest.raises(gf.VmapError, match="control flow"):
        importance_sampling(_branchy, (1,), obs, 10)
    with pytest.raises(gf.VmapError, match="control flow"):
        pf_initialize(_branchy, (1,), obs, 10)
    torch.manual_seed(3)
    res = importance_sampling(_branchy, (1,), obs, 6, vectorize=False)
    torch.manual_seed(3)
    loop = [_branchy.generate((1,), obs) for _ in range(6)]
    torch.testing.assert_close(res.log_weights, torch.stack([w for _, w in loop]),
                               rtol=0, atol=0)
    torch.testing.assert_close(res.traces["z"], torch.stack([t["z"] for t, _ in loop]),
                               rtol=0, atol=0)
    # a particle filter step, per particle, equals the per-particle update
    state = pf_initialize(_branchy, (1,), obs, 5, vectorize=False)
    y = torch.tensor(-0.1)
    torch.manual_seed(4)
    new = pf_update(state, (2,), (gf.UnknownChange(),), {("x", 1): y}, vectorize=False)
    for i in range(5):
        row = gf.core.pytree.tree_index(state.traces, i)
        _, w, _, _ = _branchy.update(row, (2,), (gf.UnknownChange(),), {("x", 1): y})
        torch.testing.assert_close(new.log_weights[i], state.log_weights[i] + w,
                                   rtol=0, atol=1e-12)
