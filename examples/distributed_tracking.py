"""2-D target tracking with one particle filter spread over several processes
(torch.distributed; DESIGN §11, docs/distributed.md).

The model and data are those of examples/tracking_2d.py (a nearly-constant-velocity target
seen through a noisy position sensor, ``Unfold(ncv_step)``).  ``pf_initialize(...,
group=...)`` splits the particles over the ranks; every ``pf_*`` call is then collective:
the log marginal likelihood and the ESS are global (the same on every rank), and
resampling draws ancestors from the weights of every rank and sends only the particles that
must change rank.  Rank 0 prints the particle filter's log p(observations) next to the
Kalman filter's exact value, and the global filtered mean of the last position.

Run it on one machine's CPUs (gloo) with two processes::

    torchrun --nproc-per-node 2 examples/distributed_tracking.py

or without torchrun (one process, no group: the ordinary filter)::

    python examples/distributed_tracking.py

Several GPUs (NCCL, one process per GPU) and several machines: docs/distributed.md.

- ``--size small`` (the default, as in CI): T = 30 steps, 4,000 particles in all, about
  10 s with two processes (most of it start-up);
- ``--size full``: T = 100 steps, 20,000 particles in all, about 25 s with two processes
  on two shared cores (a receiving rank rebuilds its batch from its particles' gathered
  histories at each resample: docs/distributed.md).

``--particles`` (the global count) and ``--steps`` override either size; ``--backend``
picks gloo or nccl (default: nccl when CUDA is available).
"""

from __future__ import annotations

import math
import os
import time

import torch
from common import parse_args
from tracking_2d import kalman, ncv_matrices, tracker

import gfcomb as gf
from gfcomb.inference import distributed
from gfcomb.inference.particle_filter import (
    effective_sample_size,
    log_ml_estimate,
    pf_initialize,
    pf_resample,
    pf_update,
)


def main() -> None:
    def extra(parser):
        parser.add_argument("--steps", type=int, default=None)
        parser.add_argument("--particles", type=int, default=None,
                            help="the global number of particles (split over the ranks)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--backend", choices=("gloo", "nccl"), default=None)
        parser.add_argument("--timeout", type=float, default=120.0,
                            help="seconds any collective may take before every rank stops")

    opts = parse_args(__doc__, {"small": "T=30, 4,000 particles",
                                "full": "T=100, 20,000 particles"}, extra)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    small = opts.size == "small"
    t_len = opts.steps or (30 if small else 100)
    n = opts.particles or (4_000 if small else 20_000)

    # under torchrun: one process per rank; without it: one process, no group
    group = (distributed.init_group(opts.backend, opts.timeout)
             if "WORLD_SIZE" in os.environ else None)
    rank, size = (group.rank, group.size) if group is not None else (0, 1)
    device = group.device if group is not None else torch.device("cpu")

    torch.manual_seed(opts.seed)  # the same data on every rank
    F, Q = ncv_matrices(dt=1.0, q=0.05)
    r = torch.tensor(2.0)
    s_init = torch.tensor([0.0, 0.0, 1.0, 0.5])
    truth = tracker.simulate((t_len, s_init, F, Q, r))
    obs = truth[:, "obs"]
    F, Q, r, s_init, obs = (x.to(device) for x in (F, Q, r, s_init, obs))
    torch.manual_seed(opts.seed + 1 + rank)  # each rank its own particles

    nc = gf.NoChange()
    diffs = (gf.UnknownChange(), nc, nc, nc, nc)
    t0 = time.perf_counter()
    state = pf_initialize(tracker, (0, s_init, F, Q, r), None, n, group=group)
    n_resampled = 0
    for t in range(t_len):
        state = pf_update(state, (t + 1, s_init, F, Q, r), diffs, {(t, "obs"): obs[t]})
        before = state
        state = pf_resample(state, "systematic", ess_threshold=n / 2)  # collective
        n_resampled += state is not before
    log_ml = float(log_ml_estimate(state))
    ess = float(effective_sample_size(state))
    last = state.traces.last_state()[:, :2]  # this rank's particles' newest positions
    mean = distributed.global_sum((state.normalized_weights[:, None] * last).sum(0), group)
    elapsed = time.perf_counter() - t0

    if rank == 0:
        kf_log_ml, kf_means, _ = kalman(obs.cpu(), s_init.cpu(), F.cpu(), Q.cpu(), float(r))
        gap = float((mean.cpu() - kf_means[-1, :2]).abs().max())
        print(f"{size} rank(s), {n:,} particles in all ({n // size:,} per rank), "
              f"{t_len} steps in {elapsed:.2f} s, resampled at {n_resampled} steps "
              f"(backend: {'none' if group is None else torch.distributed.get_backend()})")
        print(f"log marginal likelihood (particle filter): {log_ml:.4f}")
        print(f"log marginal likelihood (Kalman, exact)  : {kf_log_ml:.4f}")
        print(f"effective sample size (global): {ess:.1f}")
        print(f"|filtered mean - Kalman mean| of the last position: {gap:.3f}")
    if group is not None:
        torch.distributed.destroy_process_group()
    if not math.isfinite(log_ml):
        raise SystemExit("the particle filter's log marginal likelihood is not finite")


if __name__ == "__main__":
    main()
