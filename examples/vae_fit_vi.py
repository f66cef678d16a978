"""An amortized (VAE-style) latent-variable model trained with ``fit_vi`` on synthetic data.

Generative model of one data point (a ``@gen`` function calling a torch decoder; the data
set is ``Map(point)``, element i at key i):

    z_i ~ Normal(0, 1)                          (a 1-D latent)
    x_i ~ Normal(decoder(z_i), sigma)           (4-D observation; sigma learned too)

Amortized guide (a ``@gen`` function calling a torch encoder, ``Map(encode)`` over the data):

    z_i ~ Normal(mu(x_i), exp(log_s(x_i)))

``fit_vi`` maximises the ELBO of all points at once (pathwise gradients: gfcomb's ``normal``
samples are reparameterized), the decoder's and the encoder's parameters in one Adam
optimizer: the model's parameters are learnt at the same time as the guide's.

The data come from a known decoder f(z) = (tanh 2z, z, 0.5 z² − 0.5, sin 2z) with
sigma = 0.2.  Because the latent is 1-D, log p(x) of any decoder is computable by quadrature
over z, so the example prints exact held-out log-likelihoods: the true model's, the learned
model's (before and after training), and the learned model's IWAE estimate (K = 256) next to
the ELBO: ELBO ≤ IWAE ≤ log p(x).

Run: ``python examples/vae_fit_vi.py --size small`` (the default, as in CI: 256 points, 600
steps; 15 s on the 2-core CI machine) or ``--size full`` (2,048 points, 2,000 steps, 4
samples per point; 60 s on the same machine).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import gfcomb as gf
from gfcomb.inference import elbo, fit_vi, iwae_bound

TRUE_SIGMA = 0.2
DIM = 4


def true_decoder(z: torch.Tensor) -> torch.Tensor:
    z = z.unsqueeze(-1)
    return torch.cat([torch.tanh(2 * z), z, 0.5 * z**2 - 0.5, torch.sin(2 * z)], -1)


class Decoder(torch.nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, DIM))
        self.log_sigma = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.unsqueeze(-1))


class Encoder(torch.nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(DIM, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return out[..., 0], out[..., 1]


def make(decoder: Decoder, encoder: Encoder) -> tuple[gf.GenerativeFunction,
                                                      gf.GenerativeFunction]:
    @gf.gen
    def point(_i: torch.Tensor) -> torch.Tensor:
        z = gf.normal(0.0, 1.0) @ "z"
        return gf.normal(decoder(z), decoder.log_sigma.exp()) @ "x"

    @gf.gen
    def encode(x: torch.Tensor) -> torch.Tensor:
        loc, log_scale = encoder(x)
        return gf.normal(loc, log_scale.exp()) @ "z"

    return gf.Map(point), gf.Map(encode)


def exact_log_lik(decode: torch.nn.Module | None, xs: torch.Tensor, sigma: float) -> float:
    """Mean log p(x_i) = log ∫ N(z; 0, 1) N(x_i; f(z), sigma²) dz by quadrature on a grid."""
    grid = torch.linspace(-7, 7, 4001)
    dz = float(grid[1] - grid[0])
    with torch.no_grad():
        means = true_decoder(grid) if decode is None else decode(grid)  # [G, D]
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(grid)  # [G]
        lik = torch.distributions.Normal(means.unsqueeze(0), sigma).log_prob(
            xs.unsqueeze(1)).sum(-1)  # [N, G]
        return float((torch.logsumexp(lik + log_prior, 1) + math.log(dz)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument("--no-progress", action="store_true")
    opts = parser.parse_args()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # small tensors: intra-op threads only add contention here
    n, n_steps, n_samples = (256, 600, 1) if opts.size == "small" else (2048, 2000, 4)

    def data(m: int) -> torch.Tensor:
        return true_decoder(torch.randn(m)) + TRUE_SIGMA * torch.randn(m, DIM)

    xs, x_test = data(n), data(500)
    decoder, encoder = Decoder(), Encoder()
    model, guide = make(decoder, encoder)
    obs = gf.ChoiceMap.stacked(gf.ChoiceMap({"x": xs}), n)
    args = (torch.arange(n),)
    print(f"parameters: model {sum(p.numel() for p in model.parameters())}, "
          f"guide {sum(p.numel() for p in guide.parameters())}")
    before = exact_log_lik(decoder, x_test, float(decoder.log_sigma.detach().exp()))

    opt = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n_steps)
    t0 = time.perf_counter()
    res = fit_vi(model, args, obs, guide, (xs,), opt, n_steps, n_samples=n_samples,
                 progress=False if opts.no_progress else None,
                 callback=lambda step, loss: sched.step())
    elapsed = time.perf_counter() - t0
    print(f"fit_vi: {n_steps} Adam steps on the ELBO of {n} points (one vmapped Map call "
          f"per sample) in {elapsed:.1f} s")
    print(f"ELBO per point: first step {-res.losses[0] / n:.3f}, "
          f"last {-sum(res.losses[-20:]) / 20 / n:.3f}")

    sigma = float(decoder.log_sigma.detach().exp())
    m = 50  # the bounds on the first 50 test points
    test_obs = gf.ChoiceMap.stacked(gf.ChoiceMap({"x": x_test[:m]}), m)
    with torch.no_grad():
        e = float(elbo(model, (torch.arange(m),), test_obs, guide, (x_test[:m],), 64)) / m
        # the IWAE bound is per point: K = 256 guide draws for each of 50 test points
        iw = sum(float(iwae_bound(gf.Map(model.kernel), (torch.arange(1),),
                                  gf.ChoiceMap.stacked(gf.ChoiceMap({"x": x_test[i:i + 1]}),
                                                       1),
                                  gf.Map(guide.kernel), (x_test[i:i + 1],), 256))
                 for i in range(m)) / m
    after = exact_log_lik(decoder, x_test, sigma)
    after_m = exact_log_lik(decoder, x_test[:m], sigma)
    oracle = exact_log_lik(None, x_test, TRUE_SIGMA)
    print(f"held-out mean log p(x) (quadrature): before {before:.3f}, after {after:.3f}, "
          f"true model {oracle:.3f}")
    print(f"held-out bounds of the learned model: ELBO {e:.3f} <= IWAE(K=256) {iw:.3f} "
          f"<= log p(x) {after_m:.3f} (mean per point over the first {m} test points)")
    print(f"learned noise sigma: {sigma:.3f} (true {TRUE_SIGMA})")
    assert math.isfinite(after)


if __name__ == "__main__":
    main()
