"""Parameter learning (gfcomb.inference.learning): exact gradients of the batched (Map)
objective against hand-computed ones and a per-datum loop, maximum likelihood converging to
least squares, an amortized proposal approaching the exact posterior-mean map, bad input."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.distributions import Normal

import gfcomb as gf
from gfcomb.inference.learning import (
    batch_log_likelihood,
    simulated_data,
    train,
    train_proposal,
)

SIGMA = 0.5


def make_regression(n: int = 200):
    torch.manual_seed(3)
    xs = torch.randn(n, 2)
    ys = xs @ torch.tensor([1.5, -0.7]) + 0.3 + SIGMA * torch.randn(n)
    return xs, ys


def linear_model():
    lin = torch.nn.Linear(2, 1)

    @gf.gen
    def point(x: torch.Tensor) -> torch.Tensor:
        return gf.normal(lin(x)[0], SIGMA) @ "y"

    return lin, point


def hand_mean_loglik(lin: torch.nn.Linear, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    return Normal(lin(xs)[:, 0], SIGMA).log_prob(ys).mean()


def test_one_sgd_step_is_the_hand_computed_gradient_step():
    xs, ys = make_regression(50)
    lin, point = linear_model()
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    ref = torch.nn.Linear(2, 1)
    ref.load_state_dict(lin.state_dict())
    gw, gb = torch.autograd.grad(hand_mean_loglik(ref, xs, ys), [ref.weight, ref.bias])
    xs0, ys0 = xs.clone(), ys.clone()
    losses = train(point, [((xs, ), {"y": ys})], torch.optim.SGD(lin.parameters(), lr=0.1), 1,
                   progress=False)
    torch.testing.assert_close(lin.weight.detach(), w0 + 0.1 * gw, rtol=0, atol=1e-12)
    torch.testing.assert_close(lin.bias.detach(), b0 + 0.1 * gb, rtol=0, atol=1e-12)
    # the loss is the negative mean log-likelihood before the step
    ref.load_state_dict({"weight": w0, "bias": b0})
    assert abs(losses[0] + hand_mean_loglik(ref, xs, ys).item()) < 1e-9
    # data not mutated
    assert torch.equal(xs, xs0) and torch.equal(ys, ys0)


def test_batched_map_gradient_equals_per_datum_loop():
    xs, ys = make_regression(7)
    lin, point = linear_model()
    # the loop: generate each datum alone and accumulate with scale 1/B
    for i in range(7):
        tr, _ = point.generate((xs[i],), {"y": ys[i]})
        point.accumulate_param_gradients(tr, None, 1 / 7)
    loop = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad(set_to_none=True)
    trace, weight, n = batch_log_likelihood(point, (xs,), {"y": ys})
    assert n == 7
    assert abs(weight.item() - 7 * hand_mean_loglik(lin, xs, ys).item()) < 1e-9
    gf.Map(point).accumulate_param_gradients(trace, None, 1 / 7)
    for p, g in zip(lin.parameters(), loop):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-12)


def test_maximum_likelihood_converges_to_least_squares():
    xs, ys = make_regression(200)
    lin, point = linear_model()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    losses = train(point, [((xs,), {"y": ys})], opt, 300, progress=False)
    design = torch.cat([xs, torch.ones(200, 1)], 1)
    ls = torch.linalg.lstsq(design, ys[:, None]).solution[:, 0]
    torch.testing.assert_close(lin.weight.detach()[0], ls[:2], rtol=0, atol=1e-8)
    torch.testing.assert_close(lin.bias.detach(), ls[2:], rtol=0, atol=1e-8)
    assert len(losses) == 300 and losses[-1] < losses[0]
    # at the optimum the loss is the hand-computed negative mean log-likelihood
    resid = ys - design @ ls
    expected = -Normal(0.0, SIGMA).log_prob(resid).mean().item()
    assert abs(losses[-1] - expected) < 1e-8


def test_minibatches_from_list_iterator_and_function():
    xs, ys = make_regression(40)
    batches = [((xs[i:i + 10],), {"y": ys[i:i + 10]}) for i in range(0, 40, 10)]
    results = []
    for data in (batches, iter(batches), None):
        lin, point = linear_model()
        torch.manual_seed(5)
        lin.reset_parameters()
        if data is None:
            data = functools.partial(next, iter(batches))
        seen: list[tuple[int, float]] = []
        train(point, data, torch.optim.SGD(lin.parameters(), lr=0.05), 4, progress=False,
              callback=lambda step, loss, seen=seen: seen.append((step, loss)))
        assert [s for s, _ in seen] == [0, 1, 2, 3]
        results.append(torch.cat([lin.weight.detach()[0], lin.bias.detach()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch.testing.assert_close(results[0], results[2], rtol=0, atol=0)
    # cycling: 8 steps over 4 batches = two epochs
    lin, point = linear_model()
    assert len(train(point, batches, torch.optim.SGD(lin.parameters(), lr=0.05), 8,
                     progress=False)) == 8


def test_shared_argument_with_in_dims_none():
    xs, ys = make_regression(30)
    lin, point0 = linear_model()

    @gf.gen
    def point(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return gf.normal(lin(x)[0], scale) @ "y"

    losses = train(point, [((xs, torch.tensor(SIGMA)), {"y": ys})],
                   torch.optim.SGD(lin.parameters(), lr=0.0), 1, in_dims=(0, None),
                   progress=False)
    assert abs(losses[0] + hand_mean_loglik(lin, xs, ys).item()) < 1e-9


# ------------------------------------------------------------------------------ amortized
# mu ~ N(0, 1), y_i ~ N(mu, 0.5), i < 5: posterior N(v Σy / 0.25, v), 1/v = 1 + 5 / 0.25.
N_OBS = 5
POST_VAR = 1.0 / (1.0 + N_OBS / SIGMA**2)


@gf.gen
def conjugate_model() -> None:
    mu = gf.normal(0.0, 1.0) @ "mu"
    for i in range(N_OBS):
        gf.normal(mu, SIGMA) @ ("y", i)


def observed(tr: gf.Trace) -> tuple[torch.Tensor]:
    return (torch.stack([tr["y", i] for i in range(N_OBS)]),)


class Encoder(torch.nn.Module):
    """q(mu; y) = N(w·y + b, exp(log_s)): the family contains the exact posterior."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(N_OBS, 1)
        self.log_s = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(ys)[0], self.log_s.exp()


def test_simulated_data_batches():
    data = simulated_data(conjugate_model, (), observed, gf.select("mu"), 16)
    args, latents = data()
    assert args[0].shape == (16, N_OBS)
    assert latents["mu"].shape == (16,)
    assert not latents.has_value(("y", 0))


def test_amortized_proposal_approaches_exact_posterior():
    torch.manual_seed(0)
    enc = Encoder()

    @gf.gen
    def proposal(ys: torch.Tensor) -> None:
        m, s = enc(ys)
        gf.normal(m, s) @ "mu"

    opt = torch.optim.Adam(proposal.parameters(), lr=0.03)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=150, gamma=0.3)
    losses = train_proposal(proposal, conjugate_model, (), observed, gf.select("mu"), opt, 600,
                            batch_size=256, progress=False,
                            callback=lambda step, loss: sched.step())
    assert len(losses) == 600
    # the exact posterior mean map m(y) = v Σy / σ², on fresh observations
    test_ys = simulated_data(conjugate_model, (), observed, gf.select("mu"), 2000)()[0][0]
    with torch.no_grad():
        m, s = torch.func.vmap(enc)(test_ys)
    exact = POST_VAR * test_ys.sum(-1) / SIGMA**2
    rms = (m - exact).pow(2).mean().sqrt().item()
    assert rms < 0.02, rms  # posterior sd is 0.218
    assert abs(s[0].item() - math.sqrt(POST_VAR)) < 0.01
    # the final loss estimates the conditional entropy E[log sd + 1/2 log 2πe] of the posterior
    entropy = 0.5 * math.log(2 * math.pi * math.e * POST_VAR)
    assert abs(sum(losses[-100:]) / 100 - entropy) < 0.03


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_named():
    xs, ys = make_regression(10)
    lin, point = linear_model()
    other = torch.nn.Linear(1, 1)
    with pytest.raises(gf.ArgumentError, match="optimizer holds none"):
        train(point, [((xs,), {"y": ys})], torch.optim.SGD(other.parameters(), lr=0.1), 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(gf.ArgumentError, match="n_steps"):
        train(point, [((xs,), {"y": ys})], opt, -1)
    with pytest.raises(gf.ArgumentError, match="pair"):
        train(point, [(xs, ys, 1)], opt, 1)
    with pytest.raises(gf.ArgumentError, match="ran out"):
        train(point, iter([((xs,), {"y": ys})]), opt, 2, progress=False)
    with pytest.raises(gf.ArgumentError, match="empty list"):
        train(point, [], opt, 1)
    with pytest.raises(gf.ArgumentError, match="latents"):
        simulated_data(conjugate_model, (), observed, "mu", 4)
    with pytest.raises(gf.ArgumentError, match="batch_size"):
        simulated_data(conjugate_model, (), observed, gf.select("mu"), 0)
    with pytest.raises(gf.AddressError, match="z"):
        train(point, [((xs,), {"z": ys})], opt, 1, progress=False)
