"""A hidden Markov model built only from combinators, checked against the forward algorithm.

The model is ``Unfold(step)``: at step t the hidden state z_t ~ Categorical(A[z_{t-1}]) and the
observation y_t ~ Normal(means[z_t], noise).  The initial distribution is the extra row K of the
transition table (the initial "previous state" is K).

We simulate a data set, then estimate log p(y_0:T) by importance sampling with the prior as
proposal: ``torch.func.vmap`` runs ``model.generate`` for all particles in one call (one
batched trace comes back), and log-mean-exp of the weights is the estimate.  The exact value
comes from the forward algorithm.  A plot (examples/output/hmm.png) shows the observations,
the true states and the posterior state probabilities (exact, forward–backward) next to the
importance-sampling estimate.

Run: ``python examples/hmm_combinators.py [--size small|full]``

- ``--size small`` (the default, as in CI): T = 12 steps, 20,000 particles, about 15 s;
- ``--size full``: T = 50 steps, 200,000 particles, about 55 s.  With 50 observations
  the prior proposal collapses (a few particles carry all the weight) and the script says
  so: importance sampling with the prior is the wrong tool at that length; a particle filter
  (examples/tracking_2d.py) is the right one.
"""

from __future__ import annotations

import math
import os

import torch
from common import parse_args, warn_if_collapsed

import gfcomb as gf
from gfcomb import Unfold


@gf.gen
def step(t: int, z_prev: torch.Tensor, trans: torch.Tensor, means: torch.Tensor,
         noise: torch.Tensor) -> torch.Tensor:
    """One HMM step: z_t ~ Categorical(trans[z_{t-1}]), y_t ~ Normal(means[z_t], noise)."""
    z = gf.categorical(trans[z_prev]) @ "z"
    gf.normal(means[z], noise) @ "y"
    return z


hmm = Unfold(step)


def forward_algorithm(ys: torch.Tensor, trans: torch.Tensor, means: torch.Tensor,
                      noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log p(y) and the smoothed marginals p(z_t | y) (forward–backward, log space)."""
    k = means.shape[0]
    log_a = trans[:k].log()
    log_init = trans[k].log()
    emit = torch.distributions.Normal(means, noise).log_prob(ys[:, None])  # [T, K]
    t_len = ys.shape[0]
    alpha = [log_init + emit[0]]
    for t in range(1, t_len):
        alpha.append(torch.logsumexp(alpha[-1][:, None] + log_a, 0) + emit[t])
    log_ml = torch.logsumexp(alpha[-1], 0)
    beta = [torch.zeros(k)]
    for t in range(t_len - 1, 0, -1):
        beta.insert(0, torch.logsumexp(log_a + emit[t] + beta[0], 1))
    post = torch.stack([(a + b - log_ml).exp() for a, b in zip(alpha, beta)])
    return log_ml, post


def main() -> None:
    opts = parse_args(__doc__, {"small": "T=12, 20,000 particles",
                                "full": "T=50, 200,000 particles"})
    torch.manual_seed(1)
    torch.set_default_dtype(torch.float64)
    t_len, n_particles = (50, 200_000) if opts.size == "full" else (12, 20_000)

    trans = torch.tensor([[0.90, 0.05, 0.05],
                          [0.05, 0.90, 0.05],
                          [0.05, 0.05, 0.90],
                          [1 / 3, 1 / 3, 1 / 3]])  # last row: initial distribution
    means = torch.tensor([-2.0, 0.0, 2.0])
    noise = torch.tensor(1.0)
    z_init = torch.tensor(3)
    args = (t_len, z_init, trans, means, noise)

    truth = hmm.simulate(args)
    ys = truth[:, "y"]
    print(f"simulated T={t_len} steps; true states {truth[:, 'z'].tolist()}")

    observations = gf.ChoiceMap.stacked({"y": ys})  # every step's y at once
    traces, log_w = torch.func.vmap(
        lambda _: hmm.generate(args, observations), randomness="different"
    )(torch.zeros(n_particles))
    is_log_ml = torch.logsumexp(log_w, 0) - math.log(n_particles)
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))

    exact_log_ml, post = forward_algorithm(ys, trans, means, noise)
    print(f"log p(y) exact (forward algorithm): {exact_log_ml.item():.4f}")
    print(f"log p(y) importance sampling     : {is_log_ml.item():.4f} "
          f"({n_particles} particles in one vmapped generate, ESS {ess.item():.0f})")
    warn_if_collapsed(ess.item(), n_particles, "the importance-sampling estimate",
                      "use a better proposal, more particles, or a particle filter")

    w = torch.softmax(log_w, 0)
    zs = traces[:, "z"]  # [particles, T]: the stacked hidden states of every particle
    is_post = torch.stack([(w[:, None] * (zs == k).double()).sum(0) for k in range(3)], 1)
    err = (is_post - post).abs().max().item()
    print(f"max |posterior marginal error| of the IS estimate: {err:.3f}")

    if not opts.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(os.path.join(os.path.dirname(__file__), "output"), exist_ok=True)
        path = os.path.join(os.path.dirname(__file__), "output", "hmm.png")
        fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
        steps = range(t_len)
        axes[0].plot(steps, ys, "k.", label="observations y_t")
        axes[0].plot(steps, means[truth[:, "z"]], "g-", label="true means[z_t]")
        axes[0].legend(loc="upper right")
        for k, color in enumerate(["tab:blue", "tab:orange", "tab:red"]):
            axes[1].plot(steps, post[:, k], color=color, label=f"p(z_t={k} | y) exact")
            axes[1].plot(steps, is_post[:, k], color=color, ls="--", label=f"IS estimate k={k}")
        axes[1].set_xlabel("t")
        axes[1].legend(loc="upper right", fontsize=7, ncol=2)
        fig.suptitle(f"HMM from combinators: log p(y) exact {exact_log_ml:.3f}, "
                     f"IS {is_log_ml:.3f}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        print(f"plot written to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
