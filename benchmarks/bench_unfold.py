"""Benchmark: extending a particle-batched Unfold trace by one step, at n = 10 vs n = 1,000.

The particle-filter step of DESIGN §4: an ``Unfold`` of a linear-Gaussian kernel::

    x_t ~ N(a x_{t-1} + b, s);  y_t ~ N(x_t, 1)

is run under ``torch.func.vmap`` over P particles.  One filter step is

1. ``vmap(unfold.update, in_dims=(0, None, None, None))(trace, (n + 1, init, a, b, s),
   (UnknownChange(), NoChange(), ...), {(n, "y"): y_n})`` -- extend by one step with the
   observation constrained, and
2. ``select_batch(compact_history(trace), ancestors)`` -- resampling: move the new step into
   the shared history and re-index the particle axis with a random ancestor index.

We time that step for traces of n = 10 and n = 1,000 steps and report both and their ratio
(DESIGN §4 wants ≈ 1×: a step should cost the same at any n), with the time split into
update and resampling, the trace's size, and a torch.profiler breakdown of one step at the
larger n.

    python benchmarks/bench_unfold.py            # full run (P = 10,000); rewrites its section
    python benchmarks/bench_unfold.py --quick    # smoke run (seconds); RESULTS.md untouched
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _results
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for gfcomb

from _results import save_section  # noqa: E402

import gfcomb as gf  # noqa: E402
from gfcomb.combinators.unfold import Unfold  # noqa: E402
from gfcomb.core.batched import compact_history, select_batch  # noqa: E402
from gfcomb.core.pytree import tree_tensors  # noqa: E402

SECTION = "Unfold extension (issue 3)"


@gf.gen
def lg_kernel(t, x, a, b, s):
    """One step of the linear-Gaussian state-space model."""
    x = gf.normal(a * x + b, s) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


def build(unfold: Unfold, n: int, P: int, params: tuple) -> gf.Trace:
    """A particle-batched trace of ``n`` steps (P particles), its steps in the shared
    history."""
    init = torch.tensor(0.0)
    return compact_history(torch.func.vmap(lambda _: unfold.simulate((n, init) + params),
                                           randomness="different")(torch.zeros(P)))


def trace_megabytes(tr: gf.Trace) -> float:
    """Logical size of the trace's tensor leaves plus its stored history blocks (expanded
    views counted in full; blocks shared with other traces counted too)."""
    tensors = list(tree_tensors(tr))
    block = getattr(tr, "history", None)
    while block is not None:
        tensors += tree_tensors(block.steps) + [block.parent_rows]
        block = block.parent
    return sum(x.numel() * x.element_size() for x in tensors if x is not None) / 2**20


def run_steps(unfold: Unfold, tr: gf.Trace, n: int, P: int, params: tuple, steps: int,
              warmup: int) -> tuple[list[float], list[float], gf.Trace]:
    """Run ``warmup + steps`` filter steps from a trace of ``n`` steps; time the last ones."""
    init = torch.tensor(0.0)
    diffs = (gf.UnknownChange(),) + (gf.NoChange(),) * (1 + len(params))
    vupdate = torch.func.vmap(unfold.update, in_dims=(0, None, None, None),
                              randomness="different")
    upd, res = [], []
    for k in range(warmup + steps):
        m = n + k
        obs = gf.ChoiceMap({(m, "y"): torch.tensor(0.1)})
        t0 = time.perf_counter()
        tr, w, _, _ = vupdate(tr, (m + 1, init) + params, diffs, obs)
        t1 = time.perf_counter()
        anc = torch.multinomial(torch.softmax(w, 0), P, replacement=True)
        t2 = time.perf_counter()
        tr = select_batch(compact_history(tr), anc)
        t3 = time.perf_counter()
        if k >= warmup:
            upd.append((t1 - t0) * 1e3)
            res.append((t3 - t2) * 1e3)
    return upd, res, tr


def profile_step(unfold: Unfold, tr: gf.Trace, n: int, P: int, params: tuple,
                 top: int = 6) -> str:
    """torch.profiler table (self CPU time) of one filter step at ``n``."""
    from torch.profiler import ProfilerActivity, profile

    init = torch.tensor(0.0)
    diffs = (gf.UnknownChange(),) + (gf.NoChange(),) * (1 + len(params))
    obs = gf.ChoiceMap({(n, "y"): torch.tensor(0.1)})
    vupdate = torch.func.vmap(unfold.update, in_dims=(0, None, None, None),
                              randomness="different")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tr2, w, _, _ = vupdate(tr, (n + 1, init) + params, diffs, obs)
        select_batch(compact_history(tr2), torch.randint(0, P, (P,)))
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    lines = ["| op | calls | self CPU ms | share |", "|---|---:|---:|---:|"]
    for e in rows[:top]:
        lines.append(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
                     f"{100 * e.self_cpu_time_total / total:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run; no RESULTS.md")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared, oversubscribed "
                             "machine 2 threads add ~200 ms of barrier waiting to every op)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    P = 1_000 if opts.quick else 10_000
    sizes = (10, 100) if opts.quick else (10, 1_000)
    steps, warmup = (3, 1) if opts.quick else (7, 2)
    params = (torch.tensor(0.9), torch.tensor(0.1), torch.tensor(0.5))
    unfold = Unfold(lg_kernel)

    results = {}
    for n in sizes:
        t0 = time.perf_counter()
        tr = build(unfold, n, P, params)
        build_s = time.perf_counter() - t0
        upd, res, tr_end = run_steps(unfold, tr, n, P, params, steps, warmup)
        tot = [u + r for u, r in zip(upd, res)]
        results[n] = dict(update=statistics.median(upd), resample=statistics.median(res),
                          total=statistics.median(tot), best=min(tot),
                          mb=trace_megabytes(tr_end),
                          leaves=len(tree_tensors(tr_end)), build=build_s)
        print(f"n={n:5d}: update {results[n]['update']:9.2f} ms, resample "
              f"{results[n]['resample']:9.2f} ms, step {results[n]['total']:9.2f} ms, "
              f"trace {results[n]['mb']:8.1f} MiB in {results[n]['leaves']} leaves "
              f"(built in {build_s:.2f} s)", flush=True)
        del tr, tr_end
    small, large = sizes
    ratio = results[large]["total"] / results[small]["total"]
    ratio_u = results[large]["update"] / results[small]["update"]
    print(f"ratio n={large} / n={small}: step {ratio:.1f}x (update alone {ratio_u:.1f}x)")
    prof_table = profile_step(unfold, build(unfold, large, P, params), large, P, params)
    print(prof_table)

    env = (f"torch {torch.__version__}, Python {platform.python_version()}, "
           f"{platform.machine()} CPU ({os.cpu_count()} cores, torch threads "
           f"{torch.get_num_threads()}), dtype float64")
    table = ["| n (steps in the trace) | update ms | resample ms | step ms | fastest step ms "
             "| trace MiB |", "|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        r = results[n]
        table.append(f"| {n:,} | {r['update']:.2f} | {r['resample']:.2f} | {r['total']:.2f} "
                     f"| {r['best']:.2f} | {r['mb']:.0f} |")
    body = f"""Written by `benchmarks/bench_unfold.py`. {env}. 1-min load average
{os.getloadavg()[0]:.2f} at the end (other jobs on the machine make single timings noisy:
medians and the fastest step shown).

A particle-filter step on `Unfold(lg_kernel)` (x_t ~ N(a x_(t-1) + b, s), y_t ~ N(x_t, 1)),
P = {P:,} particles under `torch.func.vmap`: extend the batched trace by one step with the
observation y_n constrained (`vmap(unfold.update, in_dims=(0, None, None, None))`, argdiffs
`(UnknownChange(), NoChange(), ...)`), then resample
(`select_batch(compact_history(trace), ancestors)` with a multinomial ancestor index).
Median of {steps} steps after {warmup} warm-up steps.

{chr(10).join(table)}

**Ratio n = {large:,} / n = {small}: {ratio:.2f}x per step** (update alone {ratio_u:.2f}x);
the target is at most 1.1x.

How: the steps of a particle batch live in a shared chain of immutable history blocks
(`gfcomb/combinators/unfold/history.py`).  `compact_history` closes the newly appended step into a
block without copying it, and resampling re-indexes one row pointer per particle
({results[large]['leaves']} small leaves in all: the score, the row pointers, the arguments)
instead of the {results[large]['mb']:.0f} MiB of stored steps.  The extension reads the
previous state with one gather through the row pointer.  Reading the whole history
(`trace.choices`, the stacked states, an update that revisits old steps) gathers it along
the ancestry, in O(steps), only when asked.  One step at n = {large:,} (torch.profiler,
self CPU time, top ops):

{prof_table}
"""
    save_section(SECTION, body, write=not opts.quick)


if __name__ == "__main__":
    main()
