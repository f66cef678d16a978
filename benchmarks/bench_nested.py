"""Map of Unfold and Unfold of Map against the same computation hand-written in batched torch
(the "Map of Unfold and Unfold of Map (issue 12)" results).

N = 1,000 independent AR(1) series of T = 100 steps, float64::

    x_t ~ N(0.9 x_(t-1), 0.5),   y_t ~ N(x_t, 1),   x_(-1) = x0[i]

written two ways:

- ``Map(Unfold(step), in_dims=(None, 0))(T, x0s)``: series i is Unfold i (``(i, t, "x")``);
- ``Unfold(Map(elem, in_dims=(None, 0)))(T, x0s)``: the state is the vector of the N series'
  values, and each step maps ``elem`` over its elements (``(t, i, "x")``).

Each is timed for ``simulate`` and for ``generate`` with every y constrained (one stacked
choice map), against hand-written batched torch doing the same work (per step: draw x, draw
or read y, both log densities; the stacked states and the total log density -- and for
generate the weight, Σ log p(y | x) -- at the end).  Before timing, every gfcomb result is
checked against the hand-written log densities of its own draws.  In one process, the
implementations take turns; CPU time of the calling thread (one torch thread), median over
repeats; the load average is printed.

    python benchmarks/bench_nested.py            # full run; rewrites its section of RESULTS.md
    python benchmarks/bench_nested.py --quick    # smoke run (seconds); RESULTS.md untouched

(``python -m cProfile -s tottime benchmarks/bench_nested.py --quick`` shows where the time
of the gfcomb calls goes.)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _results
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for gfcomb

from _results import load_average, save_section, time_calls  # noqa: E402

import gfcomb as gf  # noqa: E402
from gfcomb.core.vmap import vmap_rows  # noqa: E402

SECTION = "Map of Unfold and Unfold of Map (issue 12)"
A, S = 0.9, 0.5
LOG_2PI = math.log(2 * math.pi)
TARGET = 1.3
CLOCK = time.thread_time  # (one torch thread: all the work is this thread's CPU time)


@gf.gen
def step(t, x):
    """One AR(1) step of one series: x_t ~ N(a x_(t-1), s), y_t ~ N(x_t, 1)."""
    x = gf.normal(A * x, S) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


MAP_OF_UNFOLD = gf.Map(gf.Unfold(step), in_dims=(None, 0))
UNFOLD_OF_MAP = gf.Unfold(gf.Map(step, in_dims=(None, 0)))


def normal_lp(x: torch.Tensor, mean: torch.Tensor, sd: float) -> torch.Tensor:
    """Elementwise log N(x; mean, sd)."""
    return -0.5 * ((x - mean) / sd) ** 2 - (math.log(sd) + 0.5 * LOG_2PI)


def hand_simulate(x0: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every series simulated by hand: (xs [N, T], ys [N, T], total log density)."""
    x, xs, ys, lp = x0, [], [], torch.zeros((), dtype=x0.dtype)
    for _ in range(T):
        mean = A * x
        x = mean + S * torch.randn_like(mean)
        y = x + torch.randn_like(x)
        lp = lp + (normal_lp(x, mean, S) + normal_lp(y, x, 1.0)).sum()
        xs.append(x)
        ys.append(y)
    return torch.stack(xs, 1), torch.stack(ys, 1), lp


def hand_generate(x0: torch.Tensor, ys: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every y given (``ys`` [N, T]), x drawn from the prior: (xs [N, T], score, weight)."""
    x, xs = x0, []
    lp_x = lp_y = torch.zeros((), dtype=x0.dtype)
    for t in range(ys.shape[1]):
        mean = A * x
        x = mean + S * torch.randn_like(mean)
        lp_x = lp_x + normal_lp(x, mean, S).sum()
        lp_y = lp_y + normal_lp(ys[:, t], x, 1.0).sum()
        xs.append(x)
    return torch.stack(xs, 1), lp_x + lp_y, lp_y


def log_density(x0: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x, y), log p(y | x)) of given draws ([N, T] each), by hand."""
    prev = torch.cat([x0.unsqueeze(1), xs[:, :-1]], 1)
    lp_y = normal_lp(ys, xs, 1.0).sum()
    return normal_lp(xs, A * prev, S).sum() + lp_y, lp_y


def kernel_calls(x0: torch.Tensor, ys: torch.Tensor | None, T: int, nested: str) -> Any:
    """The ``@gen`` kernel calls alone, without the combinators: for ``map_unfold`` one vmap
    over the series running T ``step`` calls each; for ``unfold_map`` T vmapped calls over
    the series, one per step.  ``ys`` given: generate with y constrained.  The part of each
    combinator's time that is the kernel's own fixed cost (the @gen body, vmap)."""
    n = x0.shape[0]

    def one(t: int, x: Any, y: Any) -> Any:
        if y is None:
            return step.simulate((t, x))
        return step.generate((t, x), gf.ChoiceMap({"y": y}))[0]

    if nested == "map_unfold":
        def series(x: torch.Tensor, y_row: torch.Tensor | None) -> torch.Tensor:
            for t in range(T):
                x = one(t, x, None if y_row is None else y_row[t]).retval
            return x

        if ys is None:
            return vmap_rows(lambda x: series(x, None), (0,), [x0], n)
        return vmap_rows(series, (0, 0), [x0, ys], n)
    x = x0
    for t in range(T):
        if ys is None:
            x = vmap_rows(lambda v, t=t: one(t, v, None).retval, (0,), [x], n)
        else:
            x = vmap_rows(lambda v, y, t=t: one(t, v, y).retval, (0, 0), [x, ys[:, t]], n)
    return x


def make_problem(n: int, T: int) -> dict[str, Any]:
    """Inputs, observations and the gfcomb and hand-written calls of every case."""
    torch.manual_seed(0)
    x0 = torch.randn(n)
    ys = torch.randn(n, T)
    per_step = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys}), T, batch_ndim=1)
    map_obs = gf.ChoiceMap.stacked(per_step)  # (i, t, "y") = ys[i, t]
    per_elem = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys.T}), n, batch_ndim=1)
    unfold_obs = gf.ChoiceMap.stacked(per_elem)  # (t, i, "y") = ys[i, t]
    args = (T, x0)
    return {
        "x0": x0, "ys": ys, "T": T,
        "map_unfold simulate": lambda: MAP_OF_UNFOLD.simulate(args),
        "map_unfold generate": lambda: MAP_OF_UNFOLD.generate(args, map_obs),
        "unfold_map simulate": lambda: UNFOLD_OF_MAP.simulate(args),
        "unfold_map generate": lambda: UNFOLD_OF_MAP.generate(args, unfold_obs),
        "map_unfold simulate kernel": lambda: kernel_calls(x0, None, T, "map_unfold"),
        "map_unfold generate kernel": lambda: kernel_calls(x0, ys, T, "map_unfold"),
        "unfold_map simulate kernel": lambda: kernel_calls(x0, None, T, "unfold_map"),
        "unfold_map generate kernel": lambda: kernel_calls(x0, ys, T, "unfold_map"),
        "hand simulate": lambda: hand_simulate(x0, T),
        "hand generate": lambda: hand_generate(x0, ys),
    }


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """``a`` equals ``b`` to float64 round-off (relative 1e-10)."""
    a, b = float(a), float(b)
    assert abs(a - b) <= 1e-10 * max(1.0, abs(b)), f"{what}: gfcomb {a!r}, by hand {b!r}"


def check(p: dict[str, Any]) -> None:
    """Every gfcomb call computes the hand-written log densities of its own draws."""
    x0, ys = p["x0"], p["ys"]
    for shape, order in (("map_unfold", (0, 1)), ("unfold_map", (1, 0))):
        def series(tr: Any, addr: str, order: tuple[int, int] = order) -> torch.Tensor:
            return tr[:, :, addr].permute(*order)  # [N, T]

        tr = p[f"{shape} simulate"]()
        score, _ = log_density(x0, series(tr, "x"), series(tr, "y"))
        close(tr.score, score, f"{shape} simulate score")
        assert torch.equal(tr.retval.permute(*order), series(tr, "x"))
        tr, w = p[f"{shape} generate"]()
        assert torch.equal(series(tr, "y"), ys)
        score, weight = log_density(x0, series(tr, "x"), ys)
        close(tr.score, score, f"{shape} generate score")
        close(w, weight, f"{shape} generate weight")
    xs, ys_h, lp = p["hand simulate"]()
    close(lp, log_density(x0, xs, ys_h)[0], "hand simulate")
    xs, score, weight = p["hand generate"]()
    score_ref, weight_ref = log_density(x0, xs, ys)
    close(score, score_ref, "hand generate score")
    close(weight, weight_ref, "hand generate weight")


CASES = ("map_unfold simulate", "map_unfold generate", "unfold_map simulate",
         "unfold_map generate")
LABELS = {
    "map_unfold simulate": "`Map(Unfold(step))` simulate",
    "map_unfold generate": "`Map(Unfold(step))` generate, every y given",
    "unfold_map simulate": "`Unfold(Map(step))` simulate",
    "unfold_map generate": "`Unfold(Map(step))` generate, every y given",
}


def run(quick: bool) -> str:
    n, T = 1_000, 100
    inner, repeats, warmup = (1, 3, 1) if quick else (2, 15, 3)
    load0 = load_average()
    with torch.no_grad():
        p = make_problem(n, T)
        check(p)
        results = {}
        for case in CASES:
            hand = p["hand " + case.split()[1]]
            t_gf, t_kernel, t_hand = time_calls(p[case], p[case + " kernel"], hand,
                                                inner=inner, repeats=repeats, warmup=warmup,
                                                clock=CLOCK)
            results[case] = (t_gf * 1e3, t_kernel * 1e3, t_hand * 1e3)
            print(f"{case:>20}: gfcomb {t_gf * 1e3:8.2f} ms, kernel calls alone "
                  f"{t_kernel * 1e3:7.2f} ms, hand-written {t_hand * 1e3:7.2f} ms, ratio "
                  f"{t_gf / t_hand:.2f}x (kernel calls alone {t_kernel / t_hand:.2f}x)",
                  flush=True)
    load1 = load_average()
    print(f"load average: {load0:.2f} at the start, {load1:.2f} at the end")
    flag = " --quick (smoke run, not real figures)" if quick else ""
    lines = [
        f"Written by `benchmarks/bench_nested.py`{flag}. torch {torch.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()} CPU ({os.cpu_count()} cores, torch "
        f"threads {torch.get_num_threads()}), float64; 1-min load average {load0:.2f} at the "
        f"start, {load1:.2f} at the end.",
        "",
        f"N = {n:,} AR(1) series × T = {T} steps (x_t ~ N(0.9 x_(t-1), 0.5), y_t ~ N(x_t, 1)), "
        "as `Map(Unfold(step), in_dims=(None, 0))(T, x0s)` and as "
        "`Unfold(Map(step, in_dims=(None, 0)))(T, x0s)` (the state the vector of all series), "
        "against the same work hand-written in batched torch (per step: draw x, draw or read "
        "y, both log densities; stacked states and the summed log density). `generate` "
        "constrains every y through one stacked choice map. Scores and weights checked "
        "against the hand-written log densities of the same draws before timing. CPU time "
        f"of the calling thread, median of {repeats} repeats of {inner} calls after {warmup} "
        f"warm-up calls, the implementations taking turns. Target: ratio ≤ {TARGET}.",
        "",
        "*Kernel calls alone*: the same `@gen` `step` calls without the combinators (Map of "
        "Unfold: one vmap over the series, T calls of `step` in it; Unfold of Map: T vmapped "
        "calls of `step`, one per step), keeping nothing: the part of the time that is the "
        "`@gen` kernel's own fixed cost under vmap, out of the combinators' reach.",
        "",
        "| case | gfcomb ms | kernel calls alone ms | hand-written ms | ratio | "
        "kernel calls alone / hand-written |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {LABELS[c]} | {g:.2f} | {k:.2f} | {h:.2f} | **{g / h:.2f}x** | {k / h:.2f}x |"
              for c, (g, k, h) in results.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag, text in (("--quick", "few repeats, a smoke run; RESULTS.md untouched"),
                       ("--no-write", "print only")):
        parser.add_argument(flag, action="store_true", help=text)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    body = run(opts.quick)
    print(f"## {SECTION}\n\n{body}")
    save_section(SECTION, body, write=not (opts.quick or opts.no_write))


if __name__ == "__main__":
    main()
