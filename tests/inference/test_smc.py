"""The SMC driver against the Kalman filter, and against the hand-written pf_* loop."""

from __future__ import annotations

import math

import pytest
import torch

import gfcomb as gf
from gfcomb.inference import (
    SMCResult,
    default_argdiffs,
    effective_sample_size,
    log_ml_estimate,
    mh,
    pf_initialize,
    pf_resample,
    pf_update,
    smc,
)

A, Q, R = 0.9, 0.5, 1.0
YS = [0.3, -0.2, 0.5, 1.1, 0.8, 1.5, 0.2, -0.4, 0.1, 0.9]


@gf.gen
def lg_step(t, x, a):
    x = gf.normal(a * x, Q) @ "x"
    gf.normal(x, R) @ "y"
    return x


SSM = gf.Unfold(lg_step)
X0 = torch.tensor(0.0, dtype=torch.float64)
AT = torch.tensor(A, dtype=torch.float64)


def args_fn(t):
    return (t + 1, X0, AT)


OBS = [{(t, "y"): y} for t, y in enumerate(YS)]


def kalman_log_ml(ys):
    m, p, ll = 0.0, 0.0, 0.0
    for y in ys:
        m, p = A * m, A * A * p + Q * Q
        s = p + R * R
        ll += -0.5 * (math.log(2 * math.pi * s) + (y - m) ** 2 / s)
        k = p / s
        m, p = m + k * (y - m), (1 - k) * p
    return ll


def test_smc_log_ml_matches_kalman():
    res = smc(SSM, args_fn, OBS, 2000, progress=False)
    assert isinstance(res, SMCResult)
    assert len(res.ess) == len(YS) and res.state.step == len(YS) - 1
    # 2,000 particles, T = 10: the estimate's sd is ~0.05; 0.25 is ~5 sd
    assert abs(float(res.log_ml) - kalman_log_ml(YS)) < 0.25
    assert res.resampled  # the default threshold (N/2) is crossed at least once
    assert all(0 < e <= 2000 + 1e-6 for e in res.ess)


def test_smc_is_the_pf_loop():
    torch.manual_seed(5)
    res = smc(SSM, args_fn, OBS, 500, ess_threshold=0.7, progress=False)
    torch.manual_seed(5)
    state = pf_initialize(SSM, args_fn(0), OBS[0], 500)
    for t in range(1, len(YS)):
        if float(effective_sample_size(state)) < 0.7 * 500:
            state = pf_resample(state)
        state = pf_update(state, args_fn(t), default_argdiffs(state.args, args_fn(t)), OBS[t])
    assert float(res.log_ml) == pytest.approx(float(log_ml_estimate(state)), abs=1e-12)
    assert torch.equal(res.state.traces[:, "x"], state.traces[:, "x"])


def test_smc_with_rejuvenation_keeps_the_estimate():
    seen = []

    def kernel(traces, t):
        seen.append(t)
        return mh(traces, gf.select((t - 1, "x")))

    res = smc(SSM, args_fn, OBS, 2000, rejuvenation=kernel, progress=False)
    assert seen == [t + 1 for t in res.resampled]
    assert abs(float(res.log_ml) - kalman_log_ml(YS)) < 0.25
    seen.clear()
    smc(SSM, args_fn, OBS[:4], 100, rejuvenation=kernel, rejuvenate="always", progress=False)
    assert seen == [1, 2, 3]


def test_smc_thresholds():
    never = smc(SSM, args_fn, OBS, 200, ess_threshold=0.0, progress=False)
    assert never.resampled == []
    always = smc(SSM, args_fn, OBS, 200, ess_threshold=1.0, progress=False)
    assert always.resampled == list(range(len(YS) - 1))


def test_smc_progress_and_bad_input(capsys):
    smc(SSM, args_fn, OBS[:3], 50, progress=True)
    assert "smc" in capsys.readouterr().err
    with pytest.raises(gf.ArgumentError, match="observations"):
        smc(SSM, args_fn, OBS[0], 10)
    with pytest.raises(gf.ArgumentError, match="empty"):
        smc(SSM, args_fn, [], 10)
    with pytest.raises(gf.ArgumentError, match="ess_threshold"):
        smc(SSM, args_fn, OBS, 10, ess_threshold=50)
    with pytest.raises(gf.ArgumentError, match="n_particles"):
        smc(SSM, args_fn, OBS, 0)
    with pytest.raises(gf.ArgumentError, match="args_fn"):
        smc(SSM, (1, X0, AT), OBS, 10)
    with pytest.raises(gf.ArgumentError, match="rejuvenate"):
        smc(SSM, args_fn, OBS, 10, rejuvenate="sometimes")


def test_default_argdiffs():
    x = torch.tensor(1.0)
    d = default_argdiffs((1, x, "a"), (2, x, "a"))
    assert isinstance(d[0], gf.UnknownChange) and isinstance(d[1], gf.NoChange)
    assert isinstance(d[2], gf.NoChange)
    assert isinstance(default_argdiffs((x,), (x.clone(),))[0], gf.UnknownChange)


def test_smc_with_gibbs_rejuvenation_on_a_discrete_hmm():
    from gfcomb.inference import gibbs

    trans = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
    mus = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    ys = [-0.5, 0.8, 1.2, -0.1]

    @gf.gen
    def hstep(_t, s):
        s = gf.categorical(trans[s]) @ "s"
        gf.normal(mus[s], 1.0) @ "y"
        return s

    # exact log p(y): the forward algorithm
    alpha = trans[0] * torch.exp(torch.distributions.Normal(mus, 1.0).log_prob(
        torch.tensor(ys[0])))
    for y in ys[1:]:
        alpha = (alpha @ trans) * torch.exp(torch.distributions.Normal(mus, 1.0).log_prob(
            torch.tensor(y)))
    exact = float(alpha.sum().log())
    res = smc(gf.Unfold(hstep), lambda t: (t + 1, torch.tensor(0)),
              [{(t, "y"): y} for t, y in enumerate(ys)], 2000,
              rejuvenation=lambda tr, t: gibbs(tr, gf.select((t - 1, "s"))),
              rejuvenate="always", progress=False)
    assert abs(float(res.log_ml) - exact) < 0.1
