"""Micro-benchmark of the core GFI on a 10-choice @gen model (the "Core (issue 2)" results).

The model is a Gaussian AR(1) chain::

    x0 ~ N(0, 1);  x_i ~ N(0.9 x_{i-1}, 1),  i = 1..9

Measured, in one process:

1. Python overhead of one GFI call -- ``simulate``, ``generate`` (one observed choice) and
   ``update`` (x5 changed; x1..x9 are rescored since their means are recomputed in the body;
   x0's constant arguments are NoChange) -- in µs per call and per
   choice, with distribution argument validation on and off (``gf.set_validation``), next to
   the same chain written as plain torch ops (no GFI) for scale.
2. ``torch.func.vmap(lambda _: model.simulate(()), randomness="different")`` over N particles
   against the same chain hand-written in batched torch (``torch.randn(N)`` etc., with the log
   density accumulated), and their ratio.

Timing: ``time.perf_counter``, warm-up first, then the median of several repeats.  Runs in
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

from _results import write_section  # noqa: E402

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
    """For each of ``fns``: the median over ``repeats`` of the mean seconds per call over
    ``inner`` calls.  The functions take turns within each repeat, so that a change in the
    machine's load affects all of them alike (their ratio is what gets compared)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - t0) / inner)
    return [statistics.median(out) for out in samples]


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


def run(quick: bool) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    inner, repeats, warmup = (50, 3, 20) if quick else (1000, 7, 200)
    n_vmap = 10_000
    v_inner, v_repeats, v_warmup = (3, 3, 2) if quick else (20, 7, 5)

    rows = []
    for validation in (True, False):
        gf.set_validation(validation)
        try:
            for name, fn in gfi_calls().items():
                (t,) = bench(fn, inner=inner, repeats=repeats, warmup=warmup)
                rows.append((name, "on" if validation else "off", t * 1e6, t * 1e6 / N_CHOICES))
        finally:
            gf.set_validation(True)
    (t_plain,) = bench(chain_plain_torch, inner=inner, repeats=repeats, warmup=warmup)
    t_plain *= 1e6
    rows.append(("plain torch ops, no GFI (reference)", "-", t_plain, t_plain / N_CHOICES))

    # vmap over simulate vs. hand-written batched torch, same process, same N.
    batch = torch.zeros(n_vmap)
    vsim = torch.func.vmap(lambda _: chain.simulate(()), randomness="different")
    btr = vsim(batch)
    assert btr.score.shape == (n_vmap,) and btr["x3"].shape == (n_vmap,)
    t_vmap, t_hand = bench(lambda: vsim(batch), lambda: chain_batched_torch(n_vmap),
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
        "`generate` constrains the last choice; `update` changes x5 (x1..x9 are rescored, "
        "their means being recomputed in the body). Median of "
        f"{repeats} repeats of {inner} calls after {warmup} warm-up calls; "
        f"1-min load average {load:.2f} at the start.",
        "",
        "| call | validation | µs / call | µs / choice |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {n} | {v} | {t:.1f} | {c:.1f} |" for n, v, t, c in rows]
    lines += [
        "",
        f"Batched: N = {n_vmap:,} samples of the whole chain, median of {v_repeats} repeats "
        f"of {v_inner} calls after {v_warmup} warm-up calls (the two take turns).",
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
    opts = parser.parse_args(argv)

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    table = run(opts.quick)
    print(f"## {SECTION}\n\n{table}")
    if not (opts.quick or opts.no_write):
        path = write_section(SECTION, table)
        print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
