"""Micro-benchmark of the core GFI on a 10-choice @gen model (the "Core (issue 2)" results).

The model is a Gaussian AR(1) chain::

    x0 ~ N(0, 1);  x_i ~ N(0.9 x_{i-1}, 1),  i = 1..9

Measured, in one process:

1. Python overhead of one GFI call -- ``simulate``, ``generate`` (one observed choice) and
   ``update`` (x5 changed; x1..x9 are revisited since their means are recomputed in the body,
   x6 alone rescored: the other means hold the same numbers; x0's constant arguments are
   NoChange) -- in µs per call and per
   choice, with distribution argument validation on and off (``gf.set_validation``), next to
   the same chain written as plain torch ops (no GFI) for scale.
2. ``torch.func.vmap(lambda _: model.simulate(()), randomness="different")`` over N particles
   against the same chain hand-written in batched torch (``torch.randn(N)`` etc., with the log
   density accumulated), and their ratio.

Timing (:func:`_results.time_calls`): ``time.perf_counter``, warm-up first, then the median
(``--best``: the best) of several repeats; ``--cpu`` times the calling thread's CPU time
with one torch thread instead (steady on a shared machine).  Runs in
float64 (as the test suite does) on CPU with torch's default thread count.

    python benchmarks/bench_core.py            # full run; rewrites its section of RESULTS.md
    python benchmarks/bench_core.py --quick    # smoke run (seconds); RESULTS.md untouched
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _results

from _results import load_average, save_section, time_calls  # noqa: E402

import gfcomb as gf  # noqa: E402

SECTION = "Core (issue 2)"
N_CHOICES = 10
RHO = 0.9
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@gf.gen
def chain():
    x = gf.normal(0.0, 1.0) @ "x0"
    for i in range(1, N_CHOICES):
        x = gf.normal(RHO * x, 1.0) @ f"x{i}"
    return x


def chain_plain_torch() -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same chain as plain (unbatched) torch ops: no traces, no GFI."""
    x = torch.randn(())
    xs = [x]
    lp = -0.5 * x * x - HALF_LOG_2PI
    for _ in range(1, N_CHOICES):
        mu = RHO * x
        x = mu + torch.randn(())
        xs.append(x)
        lp = lp + (-0.5 * (x - mu) ** 2 - HALF_LOG_2PI)
    return xs, lp


def chain_batched_torch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same chain hand-written in batched torch: n samples, values and log density."""
    x = torch.randn(n)
    xs = [x]
    lp = -0.5 * x * x - HALF_LOG_2PI
    for _ in range(1, N_CHOICES):
        mu = RHO * x
        x = mu + torch.randn(n)
        xs.append(x)
        lp = lp + (-0.5 * (x - mu) ** 2 - HALF_LOG_2PI)
    return torch.stack(xs), lp


def bench(*fns: Callable[[], object], inner: int, repeats: int, warmup: int) -> list[float]:
    """For each of ``fns``: the median over ``repeats`` of the mean wall seconds per call over
    ``inner`` calls, the functions taking turns (:func:`_results.time_calls`; kept under this
    name for the benchmarks that import it from here)."""
    return time_calls(*fns, inner=inner, repeats=repeats, warmup=warmup)


def gfi_calls() -> dict[str, Callable[[], object]]:
    """The three GFI calls measured, each a closure over prepared inputs."""
    tr = chain.simulate(())
    observed = gf.ChoiceMap({f"x{N_CHOICES - 1}": 0.5})
    changed = gf.ChoiceMap({"x5": 1.0})
    no_args: tuple = ()
    return {
        "simulate": lambda: chain.simulate(no_args),
        "generate (1 constraint)": lambda: chain.generate(no_args, observed),
        "update (1 changed choice)": lambda: chain.update(tr, no_args, no_args, changed),
    }


def run(quick: bool, best: bool = False, cpu: bool = False) -> str:
    load = load_average()
    inner, repeats, warmup = (50, 3, 20) if quick else (1000, 7, 200)
    n_vmap = 10_000
    v_inner, v_repeats, v_warmup = (3, 3, 2) if quick else (20, 7, 5)

    stat = "Best" if best else "Median"

    def timed(*fns: Callable[[], object], inner: int, repeats: int,
              warmup: int) -> list[float]:
        return time_calls(*fns, inner=inner, repeats=repeats, warmup=warmup,
                          reduce=min if best else statistics.median,
                          clock=time.thread_time if cpu else time.perf_counter)

    rows = []
    for validation in (True, False):
        gf.set_validation(validation)
        try:
            for name, fn in gfi_calls().items():
                (t,) = timed(fn, inner=inner, repeats=repeats, warmup=warmup)
                rows.append((name, "on" if validation else "off", t * 1e6, t * 1e6 / N_CHOICES))
        finally:
            gf.set_validation(True)
    (t_plain,) = timed(chain_plain_torch, inner=inner, repeats=repeats, warmup=warmup)
    t_plain *= 1e6
    rows.append(("plain torch ops, no GFI (reference)", "-", t_plain, t_plain / N_CHOICES))

    # vmap over simulate vs. hand-written batched torch, same process, same N.
    batch = torch.zeros(n_vmap)
    vsim = torch.func.vmap(lambda _: chain.simulate(()), randomness="different")
    btr = vsim(batch)
    assert btr.score.shape == (n_vmap,) and btr["x3"].shape == (n_vmap,)
    t_vmap, t_hand = timed(lambda: vsim(batch), lambda: chain_batched_torch(n_vmap),
                           inner=v_inner, repeats=v_repeats, warmup=v_warmup)
    ratio = t_vmap / t_hand

    flag = " --quick (smoke run, not real figures)" if quick else ""
    dtype = str(torch.get_default_dtype()).replace("torch.", "")
    lines = [
        f"Written by `benchmarks/bench_core.py`{flag}. "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} CPU ({os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}), dtype {dtype}.",
        "",
        f"Model: a {N_CHOICES}-choice Gaussian chain, x0 ~ N(0,1), x_i ~ N({RHO} x_(i-1), 1). "
        "`generate` constrains the last choice; `update` changes x5 (x1..x9 are revisited, "
        "their means being recomputed in the body; x6 alone is rescored, the other means "
        f"holding the same numbers as before). {stat} of "
        f"{repeats} repeats of {inner} calls after {warmup} warm-up calls; "
        f"1-min load average {load:.2f} at the start; "
        + ("CPU time of the calling thread (`--cpu`: one torch thread, so all the work is "
           "timed, and time other processes hold the CPU is not)." if cpu else
           "wall-clock time."),
        "",
        "| call | validation | µs / call | µs / choice |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {n} | {v} | {t:.1f} | {c:.1f} |" for n, v, t, c in rows]
    lines += [
        "",
        f"Batched: N = {n_vmap:,} samples of the whole chain, {stat.lower()} of {v_repeats} "
        f"repeats of {v_inner} calls after {v_warmup} warm-up calls (the two take turns).",
        "",
        "| implementation | ms / call | ratio |",
        "|---|---:|---:|",
        f"| `torch.func.vmap(lambda _: chain.simulate(()), randomness=\"different\")` "
        f"| {t_vmap * 1e3:.2f} | {ratio:.2f} |",
        f"| hand-written batched torch (`torch.randn(N)`, log density accumulated) "
        f"| {t_hand * 1e3:.2f} | 1.00 |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="few repeats, for a smoke run; does not touch RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; 1 is steadier on a "
                        "shared machine)")
    parser.add_argument("--cpu", action="store_true",
                        help="time the CPU time of the calling thread with one torch thread "
                        "(steady on a shared machine) instead of wall time")
    parser.add_argument("--best", action="store_true",
                        help="report the best repeat (as timeit does) instead of the median: "
                        "on a loaded machine noise only adds time")
    opts = parser.parse_args(argv)
    if opts.threads is not None or opts.cpu:
        torch.set_num_threads(1 if opts.cpu else opts.threads)

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    table = run(opts.quick, opts.best, opts.cpu)
    print(f"## {SECTION}\n\n{table}")
    save_section(SECTION, table, write=not (opts.quick or opts.no_write))


if __name__ == "__main__":
    main()
