"""Benchmark of Switch under Map with a batched index (the "Switch under Map (issue 3)" results).

Model: ``Map(Switch(b_0, ..., b_{K-1}))(idx, xs)`` with K = 2 and 4 branches, each

    b_k(x):  y ~ N(a_k x + c_k, s_k)

over N = 10,000 elements.  Under vmap the index is batched, so every branch runs for every
element and the results are merged with ``torch.where`` on the index.  Measured against the
same computation hand-written in batched torch (every branch's mean computed, the chosen one
gathered by the index, the log density summed):

1. ``simulate``;
2. ``generate`` with every y constrained (the log-likelihood of observed data);
3. ``update`` moving every element to the next branch (y reused and rescored; weight =
   new log p − old log p).

Timing: ``time.perf_counter``, warm-up first, then the median of several repeats, the GFI
call and the hand-written one taking turns.  float64 on CPU, torch's default thread count.

    python benchmarks/bench_switch.py            # full run; rewrites its section of RESULTS.md
    python benchmarks/bench_switch.py --quick    # smoke run (seconds); RESULTS.md untouched
    python benchmarks/bench_switch.py --threads 1   # one torch thread (shared machines)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _results, bench_core

from _results import write_section  # noqa: E402
from bench_core import bench  # noqa: E402

import gfcomb as gf  # noqa: E402
from gfcomb.combinators.map import Map  # noqa: E402
from gfcomb.combinators.switch import Switch  # noqa: E402

SECTION = "Switch under Map (issue 3)"
N = 10_000
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
PARAMS = [(1.0, 0.0, 1.0), (-0.5, 1.0, 0.5), (2.0, -1.0, 1.5), (0.3, 0.2, 0.8)]  # (a, c, s)


def make_branch(a: float, c: float, s: float) -> gf.GenFunction:
    """The branch ``y ~ N(a x + c, s)``."""

    @gf.gen
    def branch(x):
        return gf.normal(a * x + c, s) @ "y"

    return branch


class Hand:
    """The same model hand-written in batched torch, for K branches."""

    def __init__(self, k: int) -> None:
        p = torch.tensor(PARAMS[:k])
        self.a, self.c, self.s = p[:, 0], p[:, 1], p[:, 2]

    def mean_scale(self, idx: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mu_all = self.a[:, None] * xs[None, :] + self.c[:, None]  # every branch: (K, N)
        return mu_all.gather(0, idx[None, :])[0], self.s[idx]

    def logp(self, y: torch.Tensor, idx: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        mu, s = self.mean_scale(idx, xs)
        return (-0.5 * ((y - mu) / s) ** 2 - torch.log(s) - HALF_LOG_2PI).sum()

    def simulate(self, idx: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mu, s = self.mean_scale(idx, xs)
        y = mu + s * torch.randn_like(mu)
        return y, (-0.5 * ((y - mu) / s) ** 2 - torch.log(s) - HALF_LOG_2PI).sum()

    def update(self, y: torch.Tensor, idx_old: torch.Tensor, idx_new: torch.Tensor,
               xs: torch.Tensor) -> torch.Tensor:
        return self.logp(y, idx_new, xs) - self.logp(y, idx_old, xs)


def cases(k: int) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(name, GFI call, hand-written call) for K = k branches, checked against each other."""
    model = Map(Switch(*[make_branch(*PARAMS[j]) for j in range(k)]))
    hand = Hand(k)
    xs = torch.randn(N)
    idx = torch.randint(0, k, (N,))
    idx2 = (idx + 1) % k
    ys = torch.randn(N)
    observed = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys}), N)
    tr, w = model.generate((idx, xs), observed)
    torch.testing.assert_close(w, hand.logp(ys, idx, xs), rtol=0, atol=1e-8)
    _, wu, _, _ = model.update(tr, (idx2, xs), (gf.UnknownChange(), gf.NoChange()), None)
    torch.testing.assert_close(wu, hand.update(ys, idx, idx2, xs), rtol=0, atol=1e-8)
    sim = model.simulate((idx, xs))
    torch.testing.assert_close(sim.score, hand.logp(sim[:, "y"], idx, xs), rtol=0, atol=1e-8)
    args = (idx, xs)
    new_args = (idx2, xs)
    diffs = (gf.UnknownChange(), gf.NoChange())
    return [
        ("simulate", lambda: model.simulate(args), lambda: hand.simulate(idx, xs)),
        ("generate (all y observed)", lambda: model.generate(args, observed),
         lambda: hand.logp(ys, idx, xs)),
        ("update (every element changes branch)",
         lambda: model.update(tr, new_args, diffs, None),
         lambda: hand.update(ys, idx, idx2, xs)),
    ]


def run(quick: bool) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    inner, repeats, warmup = (2, 3, 1) if quick else (20, 7, 5)
    rows = []
    for k in (2, 4):
        for name, gfi, hand in cases(k):
            t_gfi, t_hand = bench(gfi, hand, inner=inner, repeats=repeats, warmup=warmup)
            rows.append((name, k, t_gfi * 1e3, t_hand * 1e3, t_gfi / t_hand))
    flag = " --quick (smoke run, not real figures)" if quick else ""
    dtype = str(torch.get_default_dtype()).replace("torch.", "")
    lines = [
        f"Written by `benchmarks/bench_switch.py`{flag}. "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} CPU ({os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}), dtype {dtype}.",
        "",
        f"Model: `Map(Switch(b_0, ..., b_(K-1)))(idx, xs)`, N = {N:,} elements, branch "
        "b_k: y ~ N(a_k x + c_k, s_k). The index is batched under vmap, so every branch runs "
        "for every element and the results are merged with `torch.where`. Reference: the "
        "same hand-written in batched torch (all K means computed, the chosen one gathered by "
        "the index, log density summed). `update` moves every element to the next branch "
        "(y reused and rescored). Median of "
        f"{repeats} repeats of {inner} calls after {warmup} warm-up calls (the two take "
        f"turns); 1-min load average {load:.2f} at the start.",
        "",
        "| call | K | gfcomb ms / call | hand-written torch ms / call | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {k} | {tg:.2f} | {th:.3f} | {r:.1f} |" for n, k, tg, th, r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="few repeats, for a smoke run; does not touch RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) first (on a shared, loaded machine, 1 "
                             "avoids thread contention that makes small ops erratic)")
    opts = parser.parse_args(argv)

    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    table = run(opts.quick)
    print(f"## {SECTION}\n\n{table}")
    if not (opts.quick or opts.no_write):
        path = write_section(SECTION, table)
        print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
