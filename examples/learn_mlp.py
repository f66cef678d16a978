"""Learning an MLP inside a generative model by maximum likelihood.

The model of one data point is a ``@gen`` function that calls a torch MLP:

    y_i ~ Normal(mlp(x_i), exp(log_sigma)),

and the data set is ``Map(point)`` over the points (element i at key i).  Training uses
:func:`gfcomb.inference.learning.train`: each minibatch of points is ONE ``Map(point)``
``generate`` call (vmapped over the points) with the observed y's as constraints, and
``accumulate_param_gradients`` with scale 1/B puts the gradient of the negative mean
log-likelihood into the parameters' ``.grad`` for ``torch.optim.Adam``.  The noise level
``log_sigma`` is a parameter of the same module and is learned too.

Printed: the held-out mean log-likelihood (``Map(point).assess`` on test points) before and
after training, next to that of the true function with the true noise.  A plot
(examples/output/learn_mlp.png) shows the data, the true function and the fit with a ±2σ band.

Run: ``python examples/learn_mlp.py [--size small|full]``

- ``--size small`` (the default, as in CI): 512 points, 300 Adam steps, about 80 s;
- ``--size full``: 2,048 points, 3,000 Adam steps, about 420 s.
"""

from __future__ import annotations

import math
import os
import time

import torch
from common import parse_args, show_progress

import gfcomb as gf
from gfcomb.inference.learning import train


class Regressor(torch.nn.Module):
    """An MLP for the mean and a learned log noise scale."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(1, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, 1))
        self.log_sigma = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mlp(x.reshape(1))[0], self.log_sigma.exp()


def true_function(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * x) + 0.3 * x


TRUE_SIGMA = 0.2


def make_model(net: Regressor) -> gf.GenerativeFunction:
    """``point(x)``: y ~ N(mlp(x), sigma), the model of one data point."""

    @gf.gen
    def point(x: torch.Tensor) -> torch.Tensor:
        mean, sigma = net(x)
        return gf.normal(mean, sigma) @ "y"

    return point


def held_out_loglik(point: gf.GenerativeFunction, xs: torch.Tensor, ys: torch.Tensor) -> float:
    """Mean log p(y_i | x_i) over held-out points: one ``Map(point).assess`` call."""
    obs = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys}), len(ys))
    with torch.no_grad():
        weight, _ = gf.Map(point).assess((xs,), obs)
    return weight.item() / len(ys)


def main() -> None:
    opts = parse_args(__doc__, {"small": "512 points, 300 Adam steps",
                                "full": "2,048 points, 3,000 Adam steps"})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    n_points, n_steps, batch = (2048, 3000, 128) if opts.size == "full" else (512, 300, 64)

    xs = torch.rand(n_points) * 6 - 3
    ys = true_function(xs) + TRUE_SIGMA * torch.randn(n_points)
    x_test = torch.rand(1000) * 6 - 3
    y_test = true_function(x_test) + TRUE_SIGMA * torch.randn(1000)

    net = Regressor()
    point = make_model(net)
    print(f"model parameters found by point.parameters(): "
          f"{sum(p.numel() for p in point.parameters())}")
    before = held_out_loglik(point, x_test, y_test)

    perm = torch.randperm(n_points)
    batches = [((xs[idx],), {"y": ys[idx]}) for idx in perm.split(batch)]
    opt = torch.optim.Adam(point.parameters(), lr=2e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n_steps)
    t0 = time.perf_counter()
    losses = train(point, batches, opt, n_steps, callback=lambda step, loss: sched.step(),
                   progress=show_progress(opts), desc="train mlp")
    elapsed = time.perf_counter() - t0
    after = held_out_loglik(point, x_test, y_test)
    oracle = torch.distributions.Normal(true_function(x_test), TRUE_SIGMA).log_prob(
        y_test).mean().item()
    print(f"trained {n_steps} Adam steps on minibatches of {batch} (one Map call each) "
          f"in {elapsed:.1f} s")
    print(f"training loss: first {losses[0]:.3f}, last {sum(losses[-20:]) / 20:.3f}")
    print(f"held-out mean log-likelihood: before {before:.3f}, after {after:.3f}, "
          f"true function {oracle:.3f}")
    print(f"learned noise sigma: {net.log_sigma.exp().item():.3f} (true {TRUE_SIGMA})")

    if not opts.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "learn_mlp.png")
        grid = torch.linspace(-3, 3, 300)
        with torch.no_grad():
            fit, sigma = torch.func.vmap(net)(grid)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        axes[0].plot(xs, ys, ".", color="0.6", ms=3, label="data")
        axes[0].plot(grid, true_function(grid), "g-", label="true function")
        axes[0].plot(grid, fit, "b-", label="MLP mean")
        axes[0].fill_between(grid, fit - 2 * sigma, fit + 2 * sigma, color="b", alpha=0.15,
                             label="±2σ (learned)")
        axes[0].legend(loc="upper left", fontsize=8)
        axes[0].set_xlabel("x")
        axes[1].plot(losses)
        axes[1].axhline(-oracle, color="g", ls="--", label="true model")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("negative mean log-likelihood")
        axes[1].legend()
        fig.suptitle(f"MLP inside a model: held-out log-lik {after:.3f} "
                     f"(true {oracle:.3f}); σ̂ = {net.log_sigma.exp().item():.3f}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        print(f"plot written to {os.path.relpath(path)}")
    assert math.isfinite(after)


if __name__ == "__main__":
    main()
