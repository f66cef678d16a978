"""Map over an MLP kernel against the same computation hand-written in batched torch
(the "Map over an MLP (issue 3)" results).

The kernel, for one element x (a vector of D_IN features)::

    h = mlp(x)            # 2-layer MLP: Linear(D_IN, HIDDEN) -> tanh -> Linear(HIDDEN, 1)
    y ~ normal(h, 1)

``gf.Map(kernel)`` runs it over N elements in one ``torch.func.vmap`` call.  Measured in one
process, with the two implementations taking turns (so machine load hits both alike):

- ``simulate((xs,))`` against ``h = mlp(xs); y = h + randn; log density summed``;
- ``generate((xs,), constraints)`` with every y constrained through one stacked choice map
  (``gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys}), N)``) against
  ``mlp(xs)`` and the Normal log density summed.

Both run under ``torch.no_grad()`` (inference; parameter learning goes through
``accumulate_param_gradients``).  The Map's weights are checked against the hand-written log
density before timing.  Reported: ms per call (median over repeats), the ratio Map / torch, and
(``--profile``) the cProfile of Map.generate, to see where the Map's overhead goes.

    python benchmarks/bench_map.py            # full run; rewrites its section of RESULTS.md
    python benchmarks/bench_map.py --quick    # smoke run (seconds); RESULTS.md untouched
    python benchmarks/bench_map.py --profile  # also print the cProfile of Map.generate
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import io
import math
import os
import platform
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _results
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for gfcomb

from _results import load_average, save_section, time_calls  # noqa: E402

import gfcomb as gf  # noqa: E402
from gfcomb.combinators.map import Map  # noqa: E402

SECTION = "Map over an MLP (issue 3)"
N_MAIN = 10_000
D_IN, HIDDEN = 8, 64
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
TARGET = 1.3
#: CPU time of the calling thread: with one torch thread all the work runs there, and on a
#: shared machine it does not count the time other processes hold the CPU (wall time does).
CLOCK = time.thread_time


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory instead of returning it to the OS (mallopt).

    Without this every large tensor (above the 128 KiB mmap threshold) is a fresh mmap whose
    pages fault in on first touch; in a VM those faults are slow and erratic and dominate
    the spread of the timings (both implementations allocate, the Map a little more).
    Equivalent to running with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set.
    Returns False where glibc is not available (the benchmark then runs untuned).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
    ok &= libc.mallopt(m_trim_threshold, 1 << 34) == 1  # (clamped by glibc where smaller)
    ok &= libc.mallopt(m_top_pad, 1 << 28) == 1
    return bool(ok)


def make_problem(n: int, dtype: torch.dtype) -> dict[str, object]:
    """An MLP, a Map over a kernel that calls it, inputs, observations and both
    implementations of simulate/generate, all in ``dtype``."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(HIDDEN, 1)).to(dtype)

    @gf.gen
    def kernel(x):
        h = mlp(x).squeeze(-1)
        return gf.normal(h, 1.0) @ "y"

    model = Map(kernel)
    xs = torch.randn(n, D_IN, dtype=dtype)
    ys = torch.randn(n, dtype=dtype)
    observed = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys}), n)
    args = (xs,)

    def torch_simulate() -> tuple[torch.Tensor, torch.Tensor]:
        h = mlp(xs).squeeze(-1)
        y = h + torch.randn_like(h)
        return y, (-0.5 * (y - h) ** 2 - HALF_LOG_2PI).sum()

    def torch_generate() -> torch.Tensor:
        h = mlp(xs).squeeze(-1)
        return (-0.5 * (ys - h) ** 2 - HALF_LOG_2PI).sum()

    return {
        "map_simulate": lambda: model.simulate(args),
        "map_generate": lambda: model.generate(args, observed),
        "torch_simulate": torch_simulate,
        "torch_generate": torch_generate,
        "model": model, "mlp": mlp, "xs": xs, "ys": ys,
    }


def check(problem: dict[str, object], dtype: torch.dtype) -> None:
    """The Map computes what the hand-written torch computes."""
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    tr, w = problem["map_generate"]()
    ref = problem["torch_generate"]()
    assert abs(float(w) - float(ref)) <= tol * max(1.0, abs(float(ref))), (w, ref)
    assert abs(float(tr.score) - float(ref)) <= tol * max(1.0, abs(float(ref)))
    assert torch.equal(tr[:, "y"], problem["ys"])
    st = problem["map_simulate"]()
    h = problem["mlp"](problem["xs"]).squeeze(-1)
    y = st[:, "y"]
    by_hand = (-0.5 * (y - h) ** 2 - HALF_LOG_2PI).sum()
    assert abs(float(st.score) - float(by_hand)) <= tol * max(1.0, abs(float(by_hand)))
    assert torch.equal(st.retval, y)


def bench(*fns: Callable[[], object], inner: int, repeats: int, warmup: int) -> list[float]:
    """For each of ``fns``: the best (as ``timeit`` does: on a shared machine noise only adds
    time) over ``repeats`` of the mean CPU seconds per call over ``inner`` calls; the
    functions take turns within each repeat (:func:`_results.time_calls`)."""
    return time_calls(*fns, inner=inner, repeats=repeats, warmup=warmup, clock=CLOCK,
                      reduce=min)


def profile_generate(problem: dict[str, object], calls: int = 200, top: int = 18) -> str:
    """cProfile of Map.generate (internal time), as text."""
    fn = problem["map_generate"]
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def run(quick: bool, profile: bool, malloc_tuned: bool) -> str:
    load = load_average()
    inner, repeats, warmup = (3, 3, 2) if quick else (10, 25, 30)
    rows = []
    cases = [(N_MAIN, torch.float32), (N_MAIN, torch.float64)]
    if not quick:
        cases += [(10, torch.float32), (1_000, torch.float32), (100_000, torch.float32)]
    with torch.no_grad():
        for n, dtype in cases:
            p = make_problem(n, dtype)
            check(p, dtype)
            k = inner * 10 if n <= 100 else inner if n <= N_MAIN else max(1, inner // 5)
            for method in ("simulate", "generate"):
                t_map, t_torch = bench(p[f"map_{method}"], p[f"torch_{method}"],
                                       inner=k, repeats=repeats, warmup=warmup)
                rows.append((method, n, str(dtype).replace("torch.", ""), t_map * 1e3,
                             t_torch * 1e3, t_map / t_torch))
            if profile and n == N_MAIN and dtype == torch.float32:
                print(profile_generate(p))
    flag = " --quick (smoke run, not real figures)" if quick else ""
    lines = [
        f"Written by `benchmarks/bench_map.py`{flag}. "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} CPU ({os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}); 1-min load average {load:.2f} at the start; "
        + ("glibc malloc keeps freed memory (`keep_freed_memory`)." if malloc_tuned else
           "malloc untuned (`--no-malloc-tuning`): expect a wide spread."),
        "",
        f"Kernel: `h = mlp(x)` (Linear({D_IN}, {HIDDEN}) → tanh → Linear({HIDDEN}, 1)), "
        "`y ~ normal(h, 1)`; `gf.Map(kernel)` over N elements vs. the same computation "
        "hand-written in batched torch (`mlp(xs)` on the batch, Normal log density summed), "
        "in the same process under `torch.no_grad()`. `generate` constrains every y through "
        "one stacked choice map. CPU time of the calling thread, best of "
        f"{repeats} repeats of {inner} calls (N = 10: {inner * 10}; N = 100,000: "
        f"{max(1, inner // 5)}) after {warmup} warm-up calls; the two implementations take "
        f"turns. Target: ratio ≤ {TARGET} at N = {N_MAIN:,}.",
        "",
        "| method | N | dtype | Map ms | torch ms | Map − torch ms | ratio |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {m} | {n:,} | {d} | {a:.3f} | {b:.3f} | {a - b:.3f} | {r:.2f} |"
              for m, n, d, a, b, r in rows]
    fixed = [a - b for m, n, _, a, b, _ in rows if n == 10 and m == "generate"]
    if fixed:
        lines += [
            "",
            f"Where the difference goes. At N = 10 it is the fixed cost of a call, "
            f"{fixed[0] * 1e3:.0f} µs for generate: entering vmap and the per-op cost of "
            "batched tensors, the kernel's @gen/distribution bookkeeping, and flattening the "
            "kernel trace (a pytree) out of vmap; `--profile` prints the cProfile. The part that "
            "grows with N is torch's batching rule for `nn.Linear`, which runs `mm` and a "
            "separate bias `add` where the unbatched call fuses them into one `addmm`.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="few repeats, for a smoke run; does not touch RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: steadier on a shared machine)")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc malloc's defaults (see keep_freed_memory)")
    parser.add_argument("--profile", action="store_true",
                        help="print the cProfile of Map.generate (N = 10,000, float32)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    tuned = not opts.no_malloc_tuning and keep_freed_memory()
    table = run(opts.quick, opts.profile, tuned)
    print(f"## {SECTION}\n\n{table}")
    save_section(SECTION, table, write=not (opts.quick or opts.no_write))


if __name__ == "__main__":
    main()
