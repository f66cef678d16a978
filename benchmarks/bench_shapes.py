"""Benchmark: particle filters for the model shapes users write, each against the same filter
hand-written in batched PyTorch, in the same process, interleaved.

The 1-D linear-Gaussian SSM x_t = 0.9 x_(t-1) + N(0, 0.5²), y_t = x_t + N(0, 1), written six
ways, each filtered with ``pf_update`` + ``pf_resample(state, "systematic")``:

1. ``bare``: ``Unfold(step)`` itself, args ``(T, x_init)``;
2. ``wrapped``: a ``@gen`` model drawing ``x0 ~ N(0, 1)`` and calling ``Unfold(step)`` at
   ``"steps"`` (Gen.jl's standard pattern);
3. ``proposal``: the wrapped model with the locally optimal proposal
   q(x_t | x_(t-1), y_t) (a ``@gen`` function reading the particle's x_(t-1));
4. ``rejuvenate``: the wrapped model plus one ``mh`` move on the newest x after every
   resample (``pf_rejuvenate(state, mh, select(("steps", t, "x")))``);
5. ``switch``: a regime-switching kernel: z_t ~ Bernoulli(0.2) picks one of two Switch
   branches (x_t ~ N(0.9 x, 0.5) or N(0.5 x, 1.0));
6. ``module``: a kernel whose mean is a small ``nn.Module`` (1-16-1 tanh MLP) of x_(t-1).

Each hand-written filter keeps only the current states and does what a user would write
(propagate, weight, logsumexp, systematic resampling with ``searchsorted``, ``x[ancestors]``;
the proposal, the MH move, the regime and the MLP written out as tensor ops).  gfcomb keeps
every particle's whole trace.  Reported: median ms per step (median of the per-step times of
each run, median over interleaved runs), the ratio to hand-written, the per-step time after
1,000 steps against after 10 for the wrapped model with and without rejuvenation (beside the
same ratio of the hand-written filter run in lockstep, whose state does not grow: the
machine's drift), and a wrapped-model step at N = 100 (the last two each in a fresh process).

    python benchmarks/bench_shapes.py            # full run; rewrites its section of RESULTS.md
    python benchmarks/bench_shapes.py --quick    # smoke run (seconds); RESULTS.md untouched
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _results
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for gfcomb

from _results import load_average, save_section  # noqa: E402

import gfcomb as gf  # noqa: E402
from gfcomb.inference import (  # noqa: E402
    log_ml_estimate,
    mh,
    pf_initialize,
    pf_rejuvenate,
    pf_resample,
    pf_update,
)

SECTION = "Model shapes (issue 10)"
A, S = 0.9, 0.5
P_REGIME = 0.2
LOG_2PI = math.log(2 * math.pi)
UC, NC = gf.UnknownChange(), gf.NoChange()
#: the clock of the per-step times: wall time, or (``--cpu``) the CPU time of the calling
#: thread (with one torch thread all the work runs there; other jobs on a shared machine
#: do not count, as they do in wall time)
CLOCK = [time.perf_counter]


# ------------------------------------------------------------------ the models
@gf.gen
def lg_step(t, x):
    """x_t ~ N(a x_(t-1), s), y_t ~ N(x_t, 1)."""
    x = gf.normal(A * x, S) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


LG = gf.Unfold(lg_step)


@gf.gen
def wrapped(T):
    """x0 ~ N(0, 1), then T steps of the SSM at "steps"."""
    x0 = gf.normal(0.0, 1.0) @ "x0"
    return LG(T, x0) @ "steps"


@gf.gen
def optimal_proposal(trace, t, y):
    """The locally optimal proposal q(x_t | x_(t-1), y_t) = p(x_t | x_(t-1), y_t)."""
    prev = trace["x0"] if t == 0 else trace["steps", t - 1, "x"]
    v = 1.0 / (1.0 / S ** 2 + 1.0)
    gf.normal(v * (A * prev / S ** 2 + y), math.sqrt(v)) @ ("steps", t, "x")


@gf.gen
def calm(x):
    return gf.normal(A * x, S) @ "x"


@gf.gen
def wild(x):
    return gf.normal(0.5 * x, 1.0) @ "x"


REGIME = gf.Switch(calm, wild)


@gf.gen
def regime_step(t, x):
    """z_t ~ Bernoulli(0.2) picks the dynamics; y_t ~ N(x_t, 1)."""
    z = gf.bernoulli(P_REGIME) @ "z"
    x = REGIME(z.long(), x) @ "dyn"
    gf.normal(x, 1.0) @ "y"
    return x


@gf.gen
def regime_model(T):
    x0 = gf.normal(0.0, 1.0) @ "x0"
    return gf.Unfold(regime_step)(T, x0) @ "steps"


torch.manual_seed(0)
MLP = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
MLP = MLP.double().requires_grad_(False)


@gf.gen
def module_step(t, x):
    """x_t ~ N(mlp(x_(t-1)), s), y_t ~ N(x_t, 1)."""
    x = gf.normal(MLP(x.unsqueeze(-1)).squeeze(-1), S) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


@gf.gen
def module_model(T):
    x0 = gf.normal(0.0, 1.0) @ "x0"
    return gf.Unfold(module_step)(T, x0) @ "steps"


# ------------------------------------------------------------------ the gfcomb filters
def gfcomb_steps(shape: str, ys: torch.Tensor, n: int) -> Generator[float, None, float]:
    """One gfcomb filter of ``shape``, step by step: yields the ms of each step; returns the
    log-ML estimate."""
    bare = shape == "bare"
    model = {"bare": LG, "switch": regime_model, "module": module_model}.get(shape, wrapped)
    x_init = torch.tensor(0.0)
    state = pf_initialize(model, (0, x_init) if bare else (0,), None, n)
    for t in range(ys.shape[0]):
        t0 = CLOCK[0]()
        if bare:
            state = pf_update(state, (t + 1, x_init), (UC, NC), {(t, "y"): ys[t]})
        elif shape == "proposal":
            state = pf_update(state, (t + 1,), (UC,), {("steps", t, "y"): ys[t]},
                              optimal_proposal, (t, ys[t]))
        else:
            state = pf_update(state, (t + 1,), (UC,), {("steps", t, "y"): ys[t]})
        state = pf_resample(state, "systematic")
        if shape == "rejuvenate":
            state = pf_rejuvenate(state, mh, gf.select(("steps", t, "x")))
        yield (CLOCK[0]() - t0) * 1e3
    return float(log_ml_estimate(state))


# ------------------------------------------------------------------ the hand-written filters
def _normal_lp(x: torch.Tensor, mean: torch.Tensor | float, sd: float) -> torch.Tensor:
    return -0.5 * ((x - mean) / sd) ** 2 - math.log(sd) - 0.5 * LOG_2PI


def hand_steps(shape: str, ys: torch.Tensor, n: int) -> Generator[float, None, float]:
    """The same filter written by hand in batched torch, step by step: yields the ms of each
    step; returns the log-ML estimate."""
    x = torch.zeros(n) if shape == "bare" else torch.randn(n)
    ar = torch.arange(n, dtype=x.dtype)
    log_ml = torch.zeros(())
    v = 1.0 / (1.0 / S ** 2 + 1.0)
    for t in range(ys.shape[0]):
        y = ys[t]
        t0 = CLOCK[0]()
        prev = x
        if shape == "proposal":
            x = v * (A * prev / S ** 2 + y) + math.sqrt(v) * torch.randn(n)
            lw = _normal_lp(y, A * prev, math.sqrt(S ** 2 + 1.0))  # the predictive weight
        elif shape == "switch":
            z = torch.rand(n) < P_REGIME
            x = torch.where(z, 0.5 * prev + torch.randn(n), A * prev + S * torch.randn(n))
            lw = _normal_lp(y, x, 1.0)
        elif shape == "module":
            x = MLP(prev.unsqueeze(-1)).squeeze(-1) + S * torch.randn(n)
            lw = _normal_lp(y, x, 1.0)
        else:
            x = A * prev + S * torch.randn(n)
            lw = _normal_lp(y, x, 1.0)
        lse = torch.logsumexp(lw, 0)
        log_ml = log_ml + lse - math.log(n)
        w = torch.exp(lw - lse)
        u = torch.rand(())
        anc = torch.searchsorted(torch.cumsum(w, 0), (u + ar) / n).clamp_(max=n - 1)
        x, prev = x[anc], prev[anc]
        if shape == "rejuvenate":  # prior-proposal MH on x_t
            prop = A * prev + S * torch.randn(n)
            log_a = _normal_lp(y, prop, 1.0) - _normal_lp(y, x, 1.0)
            x = torch.where(torch.log(torch.rand(n)) < log_a, prop, x)
        yield (CLOCK[0]() - t0) * 1e3
    return float(log_ml)


def run_filter(steps: Generator[float, None, float]) -> tuple[float, list[float]]:
    """Run a filter's steps to the end: (log-ML estimate, ms per step)."""
    times = []
    while True:
        try:
            times.append(next(steps))
        except StopIteration as done:
            return done.value, times


def gfcomb_filter(shape: str, ys: torch.Tensor, n: int) -> tuple[float, list[float]]:
    """One gfcomb filter of ``shape``: (log-ML estimate, ms per step)."""
    return run_filter(gfcomb_steps(shape, ys, n))


def hand_filter(shape: str, ys: torch.Tensor, n: int) -> tuple[float, list[float]]:
    """The same filter hand-written in batched torch: (log-ML estimate, ms per step)."""
    return run_filter(hand_steps(shape, ys, n))


# ------------------------------------------------------------------ measuring
def simulate_data(T: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, ys = 0.0, []
    for _ in range(T):
        x = A * x + S * torch.randn((), generator=g).item()
        ys.append(x + torch.randn((), generator=g).item())
    return torch.tensor(ys)


def kalman_log_ml(ys: torch.Tensor, p0: float) -> float:
    """Exact log p(y) of the SSM with x_(-1) ~ N(0, p0)."""
    m, p, ll = 0.0, p0, 0.0
    for y in ys.tolist():
        m, p = A * m, A * A * p + S * S
        s = p + 1.0
        ll += -0.5 * (math.log(2 * math.pi * s) + (y - m) ** 2 / s)
        k = p / s
        m, p = m + k * (y - m), (1 - k) * p
    return ll


def compare(shape: str, ys: torch.Tensor, n: int, runs: int) -> dict[str, float]:
    """gfcomb and hand-written filters of ``shape``, interleaved ``runs`` times: medians."""
    g_ms, h_ms, g_ml, h_ml = [], [], [], []
    for _ in range(runs):
        ml, times = gfcomb_filter(shape, ys, n)
        g_ms.append(statistics.median(times[5:]))
        g_ml.append(ml)
        ml, times = hand_filter(shape, ys, n)
        h_ms.append(statistics.median(times[5:]))
        h_ml.append(ml)
    g, h = statistics.median(g_ms), statistics.median(h_ms)
    return {"gfcomb": g, "hand": h, "ratio": g / h, "ml": statistics.median(g_ml),
            "hand_ml": statistics.median(h_ml)}


def growth_run(shape: str, n: int, steps: int, lo: tuple[int, int],
               hi: tuple[int, int]) -> dict[str, list[float]]:
    """One ``steps``-step filter of ``shape`` with the hand-written one run in lockstep (one
    step of each in turn): the median ms per step of each over the windows ``lo`` and
    ``hi``, and gfcomb's median minor page faults per step there."""
    ys = simulate_data(steps)
    times: dict[str, list[float]] = {"gfcomb": [], "hand": []}
    faults = []
    both = {"gfcomb": gfcomb_steps(shape, ys, n), "hand": hand_steps(shape, ys, n)}
    for _t in range(steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times["gfcomb"].append(next(both["gfcomb"]))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        times["hand"].append(next(both["hand"]))
    out = {who: [statistics.median(ts[lo[0]:lo[1]]), statistics.median(ts[hi[0]:hi[1]])]
           for who, ts in times.items()}
    out["faults"] = [statistics.median(faults[lo[0]:lo[1]]), statistics.median(faults[hi[0]:hi[1]])]
    return out


def growth(shape: str, n: int, steps: int, lo: tuple[int, int], hi: tuple[int, int],
           runs: int) -> dict[str, tuple[float, float]]:
    """:func:`growth_run` ``runs`` times, each in a fresh process, medians over the runs.

    A fresh process because a filter run after another one starts on the memory the first
    freed: its early steps store their history in pages already mapped (no page faults),
    its late steps, past that memory, in new pages (about 60 faults per step at N = 10,000),
    which makes late / early about 1.18x with the work per step unchanged."""
    results = [in_fresh_process("--growth-run", shape, "--n", str(n), "--steps", str(steps),
                                "--windows", *map(str, lo + hi)) for _ in range(runs)]
    return {who: (statistics.median(r[who][0] for r in results),
                  statistics.median(r[who][1] for r in results))
            for who in ("gfcomb", "hand", "faults")}


def in_fresh_process(*args: str) -> Any:
    """Run this benchmark with ``args`` in a new Python process (same clock): the JSON it
    prints last."""
    cmd = [sys.executable, __file__, *args]
    if CLOCK[0] is time.thread_time:
        cmd.append("--cpu")
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


SHAPES: dict[str, str] = {
    "bare": "bare `Unfold`",
    "wrapped": "`@gen` model wrapping the Unfold",
    "proposal": "wrapped + locally optimal proposal",
    "rejuvenate": "wrapped + `mh` on the newest x",
    "switch": "regime-switching kernel (Bernoulli + `Switch`)",
    "module": "kernel calling an `nn.Module`",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run; no RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--n", type=int, default=10_000, help="particles (default 10,000)")
    parser.add_argument("--cpu", action="store_true",
                        help="time the calling thread's CPU time instead of wall time")
    parser.add_argument("--growth-run", metavar="SHAPE", help=argparse.SUPPRESS)
    parser.add_argument("--compare-run", metavar="SHAPE", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1_020, help=argparse.SUPPRESS)
    parser.add_argument("--windows", type=int, nargs=4, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.cpu:
        CLOCK[0] = time.thread_time
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    if opts.growth_run:  # (one run of growth(), in its own process)
        w = opts.windows
        print(json.dumps(growth_run(opts.growth_run, opts.n, opts.steps, (w[0], w[1]),
                                    (w[2], w[3]))))
        return
    T = 20 if opts.quick else 100
    if opts.compare_run:  # (one compare(), in its own process)
        print(json.dumps(compare(opts.compare_run, simulate_data(T), opts.n, opts.runs)))
        return
    runs = 1 if opts.quick else 5
    n = 1_000 if opts.quick else opts.n
    ys = simulate_data(T)
    print(f"load average at start: {load_average():.2f}; N = {n:,}, T = {T}, {runs} runs")
    rows = {}
    for shape in SHAPES:
        r = rows[shape] = compare(shape, ys, n, runs)
        print(f"{shape:>10}: gfcomb {r['gfcomb']:.3f} ms/step, hand-written {r['hand']:.3f}, "
              f"ratio {r['ratio']:.2f}x  (log-ML gfcomb {r['ml']:.2f}, hand {r['hand_ml']:.2f})",
              flush=True)
    exact = {"bare": kalman_log_ml(ys, 0.0), "wrapped": kalman_log_ml(ys, 1.0)}

    long_steps = 60 if opts.quick else 1_020
    lo, hi = ((10, 30), (long_steps - 20, long_steps))
    grow = {}
    for shape in ("wrapped", "rejuvenate"):
        g = grow[shape] = growth(shape, n, long_steps, lo, hi, 1 if opts.quick else 5)
        (early, late), (h_early, h_late) = g["gfcomb"], g["hand"]
        print(f"growth {shape}: steps {lo[0]}-{lo[1]} {early:.3f} ms/step, steps "
              f"{hi[0]}-{hi[1]} {late:.3f} ms/step: {late / early:.2f}x (hand-written in "
              f"lockstep: {h_early:.3f} -> {h_late:.3f}, {h_late / h_early:.2f}x; page faults "
              f"per step {g['faults'][0]:.0f} -> {g['faults'][1]:.0f})", flush=True)
    # (in a fresh process too: after the filters above, the same steps run slower, the
    # hand-written ones most -- 0.10-0.14 ms against 0.065 -- which flatters the ratio)
    small = in_fresh_process("--compare-run", "wrapped", "--n", "100", "--runs",
                             str(max(runs, 3)), *(["--quick"] if opts.quick else []))
    print(f"N = 100, wrapped: gfcomb {small['gfcomb']:.3f} ms/step, hand-written "
          f"{small['hand']:.3f}, ratio {small['ratio']:.2f}x")
    load = load_average()
    print(f"load average at end: {load:.2f}")

    table = ["| shape | gfcomb ms/step | hand-written ms/step | ratio | log-ML gfcomb | "
             "log-ML hand |", "|---|---:|---:|---:|---:|---:|"]
    for shape, r in rows.items():
        table.append(f"| {SHAPES[shape]} | {r['gfcomb']:.3f} | {r['hand']:.3f} | "
                     f"**{r['ratio']:.2f}x** | {r['ml']:.2f} | {r['hand_ml']:.2f} |")
    g_lines = []
    for s, g in grow.items():
        (e, late), (he, hl), (fe, fl) = g["gfcomb"], g["hand"], g["faults"]
        g_lines.append(f"| {SHAPES[s]} | {e:.3f} | {late:.3f} | **{late / e:.2f}x** | {he:.3f} | "
                       f"{hl:.3f} | {hl / he:.2f}x | {fe:.0f} / {fl:.0f} |")
    growth_header = (
        f"| shape | gfcomb steps {lo[0]}–{lo[1]} ms | gfcomb steps {hi[0]}–{hi[1]} ms | "
        "gfcomb late / early | hand-written early ms | hand-written late ms | "
        "hand-written late / early | page faults per step, early / late |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|")
    body = f"""Written by `benchmarks/bench_shapes.py`. torch {torch.__version__}, Python
{platform.python_version()}, {platform.machine()} CPU ({os.cpu_count()} cores, torch threads 1),
float64, {"CPU time of the calling thread" if opts.cpu else "wall time"}, load average {load:.1f}
at the end.

Bootstrap particle filters of the 1-D linear-Gaussian SSM at N = {n:,}, T = {T}, written as
six model shapes, each against the same filter hand-written in batched torch (current states
only), in the same process, interleaved {runs} times; median over runs of the median ms per
step (`pf_update` + `pf_resample`, and `pf_rejuvenate` where named).  Kalman log p(y):
{exact['bare']:.2f} (x_init = 0: bare), {exact['wrapped']:.2f} (x0 ~ N(0, 1): wrapped,
proposal, rejuvenate).

{chr(10).join(table)}

Per-step time as the trace grows (N = {n:,}, {long_steps} steps, median per window, median of
{1 if opts.quick else 5} runs, each in a fresh process), with the hand-written filter run in
lockstep (a step of each in turn): its state does not grow, so its late / early ratio is the
machine's drift over the run.  A fresh process because a filter run after another starts on the
memory the first freed: its early steps then store their history in pages already mapped (no
page faults) and its late steps in new ones, which reads as growth (about 1.18x) with the same
work per step.

{growth_header}
{chr(10).join(g_lines)}

At N = 100 (in a fresh process, {max(runs, 3)} interleaved runs) a wrapped-model step takes
{small['gfcomb']:.3f} ms against {small['hand']:.3f} ms hand-written: {small['ratio']:.2f}x.
"""
    save_section(SECTION, body, write=not (opts.quick or opts.no_write))


if __name__ == "__main__":
    main()


