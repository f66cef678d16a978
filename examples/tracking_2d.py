"""2-D target tracking with a nearly-constant-velocity model and a vectorized particle filter.

The state s_t = (x, y, vx, vy) moves as s_t = F s_{t-1} + w_t, w_t ~ N(0, Q) (the discrete
white-noise-acceleration model: F advances the position by the velocity, Q is the
acceleration noise integrated over one step); the sensor sees the position,
o_t = (x, y) + N(0, r² I).  The model is ``Unfold(ncv_step)`` -- one kernel, built from a
multivariate normal and a normal -- and the filter is gfcomb's ``pf_*`` API: every step is ONE
vmapped ``update`` of all particles (extend each particle's trace by one step with the
observation constrained), then systematic resampling when the effective sample size drops
below half the particles.

The model is linear-Gaussian, so the Kalman filter gives the exact log marginal likelihood
and filtered means: both are printed next to the particle filter's.  A plot of the true path,
the observations and the filtered mean with a ±2σ band is written to
examples/output/tracking_2d.png.

Run: ``python examples/tracking_2d.py [--size small|full]``

- ``--size small`` (the default, as in CI): T = 30 steps, 2,000 particles, about 10 s;
- ``--size full``: T = 100 steps, 10,000 particles, about 20 s.

``--steps`` and ``--particles`` override either size.  A warning is printed if the
filter's effective sample size ever falls below the collapse threshold of examples/common.py.
"""

from __future__ import annotations

import math
import os
import time

import torch
from common import parse_args, show_progress, warn_if_collapsed

import gfcomb as gf
from gfcomb.inference.particle_filter import (
    effective_sample_size,
    log_ml_estimate,
    pf_initialize,
    pf_resample,
    pf_update,
)


@gf.gen
def ncv_step(t: int, s: torch.Tensor, F: torch.Tensor, Q: torch.Tensor,
             r: torch.Tensor) -> torch.Tensor:
    """One step: s_t ~ N(F s_{t-1}, Q) at "s", the observed position o_t ~ N(s_t[:2], r) at
    "obs"."""
    s = gf.mv_normal(F @ s, Q) @ "s"
    gf.normal(s[:2], r) @ "obs"
    return s


tracker = gf.Unfold(ncv_step)


def ncv_matrices(dt: float, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """F and Q of the nearly-constant-velocity model (white acceleration noise of
    intensity q)."""
    F = torch.eye(4)
    F[0, 2] = F[1, 3] = dt
    Q = torch.zeros(4, 4)
    for i in (0, 1):
        Q[i, i] = dt ** 3 / 3
        Q[i, i + 2] = Q[i + 2, i] = dt ** 2 / 2
        Q[i + 2, i + 2] = dt
    return F, q * Q


def kalman(obs: torch.Tensor, s_init: torch.Tensor, F: torch.Tensor, Q: torch.Tensor,
           r: float) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Exact log p(o_0:T), filtered means [T, 4] and variances [T, 4] (s_{-1} known)."""
    H = torch.eye(4)[:2]
    R = r ** 2 * torch.eye(2)
    m, P = s_init.clone(), torch.zeros(4, 4)
    ll, means, variances = 0.0, [], []
    for o in obs:
        m, P = F @ m, F @ P @ F.T + Q
        S = H @ P @ H.T + R
        ll += float(torch.distributions.MultivariateNormal(H @ m, S).log_prob(o))
        K = P @ H.T @ torch.linalg.inv(S)
        m = m + K @ (o - H @ m)
        P = (torch.eye(4) - K @ H) @ P
        means.append(m)
        variances.append(torch.diagonal(P))
    return ll, torch.stack(means), torch.stack(variances)


def main() -> None:
    def extra(parser):
        parser.add_argument("--steps", type=int, default=None)
        parser.add_argument("--particles", type=int, default=None)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--threads", type=int, default=1,
                            help="torch intra-op threads (default 1: the per-step ops are "
                                 "small, and extra threads mostly add synchronization)")

    opts = parse_args(__doc__, {"small": "T=30, 2,000 particles",
                                "full": "T=100, 10,000 particles"}, extra)
    torch.set_num_threads(opts.threads)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(opts.seed)
    small = opts.size == "small"
    t_len = opts.steps or (30 if small else 100)
    n = opts.particles or (2_000 if small else 10_000)

    F, Q = ncv_matrices(dt=1.0, q=0.05)
    r = torch.tensor(2.0)
    s_init = torch.tensor([0.0, 0.0, 1.0, 0.5])

    truth = tracker.simulate((t_len, s_init, F, Q, r))
    states = truth[:, "s"]  # [T, 4]
    obs = truth[:, "obs"]  # [T, 2]
    print(f"simulated T={t_len} steps of a 2-D nearly-constant-velocity target")

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        def tqdm(it, **_):
            return it

    nc = gf.NoChange()
    diffs = (gf.UnknownChange(), nc, nc, nc, nc)
    state = pf_initialize(tracker, (0, s_init, F, Q, r), None, n)
    means, sds, n_resampled, min_ess = [], [], 0, float(n)
    t0 = time.perf_counter()
    for t in tqdm(range(t_len), desc="particle filter", unit="step",
                  disable=not show_progress(opts)):
        state = pf_update(state, (t + 1, s_init, F, Q, r), diffs, {(t, "obs"): obs[t]})
        ess = float(effective_sample_size(state))
        min_ess = min(min_ess, ess)
        current = state.traces.last_state()  # [particles, 4]: the newest state, O(1)
        w = state.normalized_weights[:, None]
        mean = (w * current).sum(0)
        means.append(mean)
        sds.append(((w * (current - mean) ** 2).sum(0)).sqrt())
        if ess < n / 2:
            state = pf_resample(state, "systematic")
            n_resampled += 1
    elapsed = time.perf_counter() - t0
    means_t, sds_t = torch.stack(means), torch.stack(sds)

    pf_log_ml = float(log_ml_estimate(state))
    kf_log_ml, kf_means, kf_vars = kalman(obs, s_init, F, Q, float(r))
    rmse = float(((means_t[:, :2] - states[:, :2]) ** 2).sum(1).mean().sqrt())
    kf_gap = float((means_t[:, :2] - kf_means[:, :2]).abs().max())
    print(f"particle filter: {n:,} particles, {t_len} steps in {elapsed:.2f} s "
          f"({1e3 * elapsed / t_len:.2f} ms/step), resampled at {n_resampled} steps")
    warn_if_collapsed(min_ess, n, "the particle filter (at its worst step)")
    print(f"log marginal likelihood (particle filter): {pf_log_ml:.4f}")
    print(f"log marginal likelihood (Kalman, exact)  : {kf_log_ml:.4f}")
    print(f"position RMSE of the filtered mean vs the true path: {rmse:.3f}")
    print(f"max |PF mean - Kalman mean| (position): {kf_gap:.3f}")

    if not opts.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "tracking_2d.png")
        fig = plt.figure(figsize=(11, 5))
        ax = fig.add_subplot(1, 2, 1)
        ax.plot(states[:, 0], states[:, 1], "g-", lw=2, label="true path")
        ax.plot(obs[:, 0], obs[:, 1], "k.", ms=4, label="observations")
        ax.plot(means_t[:, 0], means_t[:, 1], "b-", label="filtered mean")
        for i in range(0, t_len, max(1, t_len // 15)):  # ±2σ boxes along the path
            ax.add_patch(plt.Rectangle((float(means_t[i, 0] - 2 * sds_t[i, 0]),
                                        float(means_t[i, 1] - 2 * sds_t[i, 1])),
                                       float(4 * sds_t[i, 0]), float(4 * sds_t[i, 1]),
                                       color="tab:blue", alpha=0.15, lw=0))
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title("x–y plane (shaded: ±2σ)")
        ax.legend(loc="best", fontsize=8)
        steps = torch.arange(t_len)
        for k, (row, name) in enumerate(((0, "x"), (1, "y"))):
            a = fig.add_subplot(2, 2, 2 + 2 * k)
            a.fill_between(steps, means_t[:, row] - 2 * sds_t[:, row],
                           means_t[:, row] + 2 * sds_t[:, row], color="tab:blue", alpha=0.25,
                           label="filtered mean ±2σ")
            a.plot(steps, means_t[:, row], "b-", lw=1)
            a.plot(steps, states[:, row], "g-", label="true")
            a.plot(steps, obs[:, row], "k.", ms=3, label="observed")
            a.set_ylabel(name)
            if k == 1:
                a.set_xlabel("t")
            else:
                a.legend(loc="best", fontsize=7)
        fig.suptitle(f"NCV tracking, {n:,} particles: log p(obs) PF {pf_log_ml:.2f}, "
                     f"Kalman {kf_log_ml:.2f}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        print(f"plot written to {os.path.relpath(path)}")
    if not math.isfinite(pf_log_ml):
        raise SystemExit("the particle filter's log marginal likelihood is not finite")


if __name__ == "__main__":
    main()
