"""Benchmark: step latency of a long particle filter -- median, p99 and maximum step time.

A bootstrap filter of the 1-D linear-Gaussian SSM (a ``@gen`` model drawing x0 and calling
``Unfold(step)`` at "steps", as Gen users write it) runs 3,000 steps at N = 1,000 and
N = 10,000; every ``pf_update`` + ``pf_resample`` is timed.  The issue's target: p99 at most
2x the median.  Wall time and the thread's CPU time are both reported: on the shared 2-core
machine, wall-time spikes with no CPU time behind them are pre-emption by other processes.
Each N runs twice: as is, and with ``gc.freeze()`` called once after ``pf_initialize`` (what
docs/reliability.md recommends for latency-bound loops: the objects alive then -- torch,
gfcomb, the model -- are left out of every later collection, so the rare full collection
walks only what the filter made).  The full ("generation 2") collections each run sets off
are counted and timed.

    python benchmarks/bench_latency.py            # full run; rewrites its section of RESULTS.md
    python benchmarks/bench_latency.py --quick    # 300 steps; RESULTS.md untouched
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _results and bench_shapes
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for gfcomb

from _results import load_average, save_section  # noqa: E402
from bench_shapes import UC, simulate_data, wrapped  # noqa: E402

from gfcomb.inference import pf_initialize, pf_resample, pf_update  # noqa: E402

SECTION = "Step latency (issue 11)"


def run(n: int, steps: int, freeze: bool = False) -> tuple[list[float], list[float],
                                                         list[float]]:
    """(wall ms, thread CPU ms) of every step of a ``steps``-step filter at ``n``, and the
    ms of each full garbage collection during it (``freeze``: ``gc.freeze()`` first)."""
    ys = simulate_data(steps)
    state = pf_initialize(wrapped, (0,), None, n)
    full: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                on_gc.t0 = time.perf_counter()  # type: ignore[attr-defined]
            else:
                full.append((time.perf_counter() - on_gc.t0) * 1e3)  # type: ignore[attr-defined]

    if freeze:
        gc.freeze()
    gc.callbacks.append(on_gc)
    wall, cpu = [], []
    try:
        for t in range(steps):
            w0, c0 = time.perf_counter(), time.thread_time()
            state = pf_update(state, (t + 1,), (UC,), {("steps", t, "y"): ys[t]})
            state = pf_resample(state)
            wall.append((time.perf_counter() - w0) * 1e3)
            cpu.append((time.thread_time() - c0) * 1e3)
    finally:
        gc.callbacks.remove(on_gc)
        if freeze:
            gc.unfreeze()
    return wall, cpu, full


def summary(xs: list[float]) -> tuple[float, float, float]:
    """(median, p99, max) of ``xs`` after the first 10 (warm-up) steps."""
    xs = sorted(xs[10:])
    return statistics.median(xs), xs[int(0.99 * (len(xs) - 1))], xs[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 steps; no RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    steps = 300 if opts.quick else 3_000
    rows = ["| N | gc | clock | median ms | p99 ms | max ms | p99 / median | full collections |",
            "|---:|---|---|---:|---:|---:|---:|---|"]
    print(f"load average at start: {load_average():.2f}; {steps} steps")
    for n in (1_000, 10_000):
        for freeze in (False, True):
            wall, cpu, full = run(n, steps, freeze)
            how = "`gc.freeze()`" if freeze else "as is"
            fulls = ", ".join(f"{ms:.0f} ms" for ms in full) or "none"
            for clock, xs in (("wall", wall), ("thread CPU", cpu)):
                med, p99, mx = summary(xs)
                rows.append(f"| {n:,} | {how} | {clock} | {med:.3f} | {p99:.3f} | {mx:.2f} | "
                            f"**{p99 / med:.2f}x** | {fulls} |")
                print(f"N={n:,} {how} {clock}: median {med:.3f} ms, p99 {p99:.3f} ms, "
                      f"max {mx:.2f} ms, p99/median {p99 / med:.2f}x; full collections: "
                      f"{fulls}", flush=True)
    load = load_average()
    body = f"""Written by `benchmarks/bench_latency.py`. torch {torch.__version__}, float64, one
torch thread, load average {load:.1f} at the end.

A bootstrap filter of the wrapped model (`@gen` drawing x0 and calling `Unfold(step)`),
{steps:,} steps of `pf_update` + `pf_resample`, every step timed (the first 10 left out):

{chr(10).join(rows)}

Every step leaves about 9 small Python objects in the history (its block, choice leaves
and state), so now and then Python's young-generation collections run (about one step in
90) and, rarely, a full one, which walks every object alive, torch's own included.  A
filter step makes no reference cycles (tests/inference/test_step_garbage.py), so no
collection frees anything from it.  `gc.freeze()` after setup leaves the objects alive then
out of every later collection.
"""
    save_section(SECTION, body, write=not (opts.quick or opts.no_write))


if __name__ == "__main__":
    main()
