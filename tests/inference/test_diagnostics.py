"""ArviZ export of chains, particle filters, SMC and importance-sampling results."""

from __future__ import annotations

import pytest
import torch

import gfcomb as gf
from gfcomb.inference import (
    hmc,
    importance_sampling,
    run_chain,
    smc,
    to_inference_data,
    variable_name,
)

az = pytest.importorskip("arviz")


@gf.gen
def model(n):
    mu = gf.normal(0.0, 1.0) @ "mu"
    v = gf.mv_normal(torch.zeros(2), torch.eye(2)) @ "v"
    for i in range(n):
        gf.normal(mu + v.sum(), 0.5) @ ("y", i)


OBS = {("y", i): y for i, y in enumerate([0.9, 1.3, 0.7])}


def chains(n):
    return torch.func.vmap(lambda _: model.generate((3,), OBS)[0],
                           randomness="different")(torch.zeros(n))


def test_chain_result_to_inference_data():
    res = run_chain(chains(4), lambda t: hmc(t, gf.select("mu", "v"), 5, 0.1), 60,
                    addresses=["mu", "v"], burn_in=10, progress=False)
    idata = to_inference_data(res)
    post = idata.posterior
    assert dict(post["mu"].sizes) == {"chain": 4, "draw": 50}
    assert post["v"].shape == (4, 50, 2)
    # the values are the samples, chain-major
    assert torch.allclose(torch.as_tensor(post["mu"].values), res.samples["mu"].T)
    rhat = az.rhat(idata)
    ess = az.ess(idata)
    assert float(rhat["mu"]) < 1.2 and float(ess["mu"]) > 10
    assert idata.attrs["acceptance_rate"] == pytest.approx(res.acceptance_rate)
    summary = az.summary(idata)
    assert {"r_hat", "ess_bulk"} <= set(summary.columns)
    only = to_inference_data(res, ["mu"])
    assert list(only.posterior.data_vars) == ["mu"]
    with pytest.raises(gf.ArgumentError, match="no samples recorded"):
        to_inference_data(res, ["w"])


def test_single_chain_is_one_arviz_chain():
    tr, _ = model.generate((3,), OBS)
    res = run_chain(tr, lambda t: hmc(t, gf.select("mu"), 5, 0.1), 20, addresses=["mu"],
                    progress=False)
    assert dict(to_inference_data(res).posterior["mu"].sizes) == {"chain": 1, "draw": 20}


@gf.gen
def step(t, x):
    x = gf.normal(0.9 * x, 0.5) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


def test_particle_results_to_inference_data():
    ys = [0.3, -0.2, 0.5]
    res = smc(gf.Unfold(step), lambda t: (t + 1, torch.tensor(0.0)),
              [{(t, "y"): y} for t, y in enumerate(ys)], 3000, progress=False)
    idata = to_inference_data(res)
    x = idata.posterior[variable_name((slice(None), "x"))]
    assert x.shape == (1, 3000, 3)
    w = res.state.normalized_weights
    weighted = (w.unsqueeze(-1) * res.state.traces[:, "x"]).sum(0)
    assert torch.allclose(torch.as_tensor(x.values[0].mean(0)), weighted, atol=0.05)
    assert idata.attrs["log_ml_estimate"] == pytest.approx(float(res.log_ml))
    raw = to_inference_data(res.state, [(2, "x")], resample=False)
    assert raw.sample_stats["log_weight"].shape == (1, 3000)
    assert torch.allclose(torch.as_tensor(raw.posterior["2/x"].values[0]),
                          res.state.traces[2, "x"])
    imp = importance_sampling(model, (3,), OBS, 500)
    assert to_inference_data(imp, ["mu"]).posterior["mu"].shape == (1, 500)


def test_variable_names_and_bad_input():
    assert variable_name("mu") == "mu"
    assert variable_name(("ys", 0, "y")) == "ys/0/y"
    assert variable_name(("ys", slice(None), "y")) == "ys/:/y"
    with pytest.raises(gf.ArgumentError, match="ChainResult"):
        to_inference_data({"mu": torch.zeros(3)})
