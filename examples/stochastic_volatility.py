"""Stochastic volatility: an Unfold model, a particle filter with MCMC rejuvenation moves, and
batched HMC on the whole latent path.

The model (``Unfold(step)``): the log-volatility follows an AR(1) process and scales the
observation noise,

    x_t ~ Normal(phi * x_{t-1}, sigma),        y_t ~ Normal(0, beta * exp(x_t / 2)),

with x_{-1} = 0.  We simulate a series, then

1. run a bootstrap particle filter with ``pf_initialize`` / ``pf_update`` / ``pf_resample``
   (all particles advance in one vmapped ``update`` per step), and after each resampling
   *rejuvenate* the particles with MCMC moves that leave the filtering posterior invariant:
   ``mh`` resampling x_t from its prior (a resample-move step), and ``mala`` on the window
   (x_{t-1}, x_t) -- each move runs every particle in one vmapped call;
2. run the same filter without rejuvenation, for comparison (both estimate the same log p(y);
   the number of distinct values of the newest state shows the moves undoing the copies that
   resampling makes);
3. treat the final particles as initial states of N chains and run batched ``hmc`` on the
   whole path x_0..x_{T-1} (:func:`gfcomb.inference.run_chain`), giving smoothed
   estimates of the volatility.

A plot (examples/output/stochastic_volatility.png) shows the returns, the true log-volatility,
the filtered mean with a 90% band, and the HMC-smoothed mean.

Run: ``python examples/stochastic_volatility.py [--size small|full]``

- ``--size small`` (the default, as in CI): T = 30, 400 particles, 15 HMC iterations, about
  40 s;
- ``--size full``: T = 100, 1,000 particles, 30 HMC iterations, about 10 min
  (most of it the HMC: 30 iterations of 5 leapfrog steps on the whole path).  (Larger
  runs grow fast: the MH rejuvenation move and HMC on the whole path cost O(T) per call, so
  T = 200 with 5,000 particles and 100 HMC iterations took over 20 minutes here.)

Each stage prints its own time; progress bars show in a terminal.  A warning is printed if a
filter's effective sample size falls below the collapse threshold of examples/common.py.
"""

from __future__ import annotations

import os
import time

import torch
from common import parse_args, show_progress, warn_if_collapsed

import gfcomb as gf
from gfcomb.inference import hmc, mala, mh, run_chain
from gfcomb.inference.particle_filter import (
    effective_sample_size,
    log_ml_estimate,
    pf_initialize,
    pf_rejuvenate,
    pf_resample,
    pf_update,
)
from gfcomb.inference.progress import progress_bar


@gf.gen
def step(t: int, x_prev: torch.Tensor, phi: torch.Tensor, sigma: torch.Tensor,
         beta: torch.Tensor) -> torch.Tensor:
    """One step: x_t ~ N(phi x_{t-1}, sigma); y_t ~ N(0, beta exp(x_t / 2))."""
    x = gf.normal(phi * x_prev, sigma) @ "x"
    gf.normal(0.0, beta * torch.exp(x / 2)) @ "y"
    return x


sv = gf.Unfold(step)


def particle_filter(ys: torch.Tensor, params: tuple[torch.Tensor, ...], n_particles: int,
                    rejuvenate: bool, mala_every: int, progress: bool | None):
    """Bootstrap filter over ``ys``; returns (final state, filtered means, 5%/95% quantiles,
    acceptance rates of the MH and MALA moves)."""
    x0 = torch.tensor(0.0)
    nc, uc = gf.NoChange(), gf.UnknownChange()
    state = pf_initialize(sv, (1, x0, *params), {(0, "y"): ys[0]}, n_particles)
    means, lo, hi, acc_mh, acc_mala = [], [], [], [], []
    min_ess = [float(n_particles)]

    def summarize(state) -> None:
        x = state.traces.last_state()  # the newest x_t of every particle: O(1)
        w = torch.softmax(state.log_weights, 0)
        means.append((w * x).sum())
        order = torch.argsort(x)
        cdf = torch.cumsum(w[order], 0)
        lo.append(x[order][torch.searchsorted(cdf, torch.tensor(0.05)).clamp(max=len(x) - 1)])
        hi.append(x[order][torch.searchsorted(cdf, torch.tensor(0.95)).clamp(max=len(x) - 1)])

    summarize(state)
    label = "pf + rejuvenation" if rejuvenate else "bootstrap pf"
    for t in progress_bar(range(1, len(ys)), desc=label, progress=progress):
        state = pf_update(state, (t + 1, x0, *params), (uc, nc, nc, nc, nc), {(t, "y"): ys[t]})
        min_ess[0] = min(min_ess[0], float(effective_sample_size(state)))
        state = pf_resample(state, "systematic")
        if rejuvenate:
            state = pf_rejuvenate(state, mh, gf.select((t, "x")))
            acc_mh.append(state.accepted.double().mean().item())
            if t % mala_every == 0:
                state = pf_rejuvenate(state, mala, gf.select((t - 1, "x"), (t, "x")), 0.02)
                acc_mala.append(state.accepted.double().mean().item())
        summarize(state)
    warn_if_collapsed(min_ess[0], n_particles, f"the {label} (at its worst step)")
    return state, torch.stack(means), torch.stack(lo), torch.stack(hi), acc_mh, acc_mala


def distinct_latest(state) -> int:
    """How many distinct values of the newest x_t the particles carry (after resampling the
    bootstrap filter holds copies; the rejuvenation moves spread them out again)."""
    return int(torch.unique(state.traces.last_state()).numel())


def main() -> None:
    opts = parse_args(__doc__, {"small": "T=30, 400 particles, 15 HMC iterations",
                                "full": "T=100, 1,000 particles, 30 HMC iterations"})
    torch.manual_seed(2)
    torch.set_default_dtype(torch.float64)
    progress = show_progress(opts)
    full = opts.size == "full"
    t_len, n_particles, hmc_iters = (100, 1_000, 30) if full else (30, 400, 15)
    mala_every = 5

    params = (torch.tensor(0.95), torch.tensor(0.3), torch.tensor(0.6))  # phi, sigma, beta
    truth = sv.simulate((t_len, torch.tensor(0.0), *params))
    xs, ys = truth[:, "x"], truth[:, "y"]
    print(f"simulated T={t_len} returns; phi={params[0]:.2f} sigma={params[1]:.2f} "
          f"beta={params[2]:.2f}")

    t0 = time.perf_counter()
    state, f_mean, f_lo, f_hi, acc_mh, acc_mala = particle_filter(
        ys, params, n_particles, True, mala_every, progress)
    t_rejuv = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain, p_mean, _, _, _, _ = particle_filter(ys, params, n_particles, False, mala_every,
                                                progress)
    t_plain = time.perf_counter() - t0
    rmse = lambda m: (m - xs).pow(2).mean().sqrt().item()  # noqa: E731
    print(f"particles: {n_particles}")
    print(f"log p(y) estimate, bootstrap pf      : {log_ml_estimate(plain).item():.3f} "
          f"({t_plain:.1f} s)")
    print(f"log p(y) estimate, pf + rejuvenation : {log_ml_estimate(state).item():.3f} "
          f"({t_rejuv:.1f} s)")
    print(f"rejuvenation acceptance: mh {sum(acc_mh) / len(acc_mh):.2f}, "
          f"mala {sum(acc_mala) / max(len(acc_mala), 1):.2f}")
    print(f"distinct x_T-1 values at the end: bootstrap {distinct_latest(plain)}, "
          f"with rejuvenation {distinct_latest(state)}")
    print(f"filtered-mean RMSE vs true x: bootstrap {rmse(p_mean):.3f}, "
          f"with rejuvenation {rmse(f_mean):.3f}; ESS at the end "
          f"{effective_sample_size(state).item():.0f}")

    # smoothing: every particle's path is the start of one HMC chain on x_0..x_{T-1}
    path = gf.select(*[(t, "x") for t in range(t_len)])
    t0 = time.perf_counter()
    result = run_chain(state.traces, lambda tr: hmc(tr, path, 5, 0.05), hmc_iters,
                       desc="hmc smoothing", progress=progress)
    smooth = result.trace[:, "x"].mean(0)  # [chains, T] -> [T]
    print(f"batched HMC on the whole path: {n_particles} chains x {hmc_iters} iterations in "
          f"{time.perf_counter() - t0:.1f} s, acceptance {result.acceptance_rate:.2f}, "
          f"smoothed-mean RMSE {rmse(smooth):.3f}")

    if not opts.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
        os.makedirs(out_dir, exist_ok=True)
        path_png = os.path.join(out_dir, "stochastic_volatility.png")
        steps = range(t_len)
        fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        axes[0].plot(steps, ys, "k-", lw=0.8, label="returns y_t")
        axes[0].legend(loc="upper right")
        axes[1].plot(steps, xs, "g-", label="true log-volatility x_t")
        axes[1].plot(steps, f_mean, "b-", label="filtered mean (pf + rejuvenation)")
        axes[1].fill_between(steps, f_lo, f_hi, color="b", alpha=0.2, label="90% band")
        axes[1].plot(steps, smooth, "r--", label="HMC-smoothed mean")
        axes[1].set_xlabel("t")
        axes[1].legend(loc="upper right", fontsize=8)
        fig.suptitle(f"Stochastic volatility, {n_particles} particles: "
                     f"log p(y) ≈ {log_ml_estimate(state).item():.2f}")
        fig.tight_layout()
        fig.savefig(path_png, dpi=100)
        print(f"plot written to {os.path.relpath(path_png)}")


if __name__ == "__main__":
    main()
