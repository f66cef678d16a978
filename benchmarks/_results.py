"""Shared helper for the benchmark scripts: keep ``benchmarks/RESULTS.md`` in named sections.

Each benchmark owns one ``## <heading>`` section of RESULTS.md and rewrites only that section
(from its heading line up to the next ``## `` heading or the end of the file), so benchmarks
written by different people can share one results file::

    from _results import write_section
    write_section("Core (issue 2)", markdown_text)

(:func:`save_section` is the end of every script: write unless it was a quick run, and say
so.)  It also holds the one timing routine the benchmarks share (:func:`time_calls`: warm-up,
repeats, the functions taking turns, median or best) and :func:`load_average`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TITLE = "# Benchmark results\n\nEach section is written by the benchmark script named in it.\n"


def replace_section(text: str, heading: str, body: str) -> str:
    """Return ``text`` with the ``## heading`` section replaced by ``body`` (or appended)."""
    marker = f"## {heading}"
    section = f"{marker}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == marker), None)
    if start is None:
        head = text.rstrip("\n")
        return (head + "\n\n" if head else "") + section
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")),
               len(lines))
    before = "".join(lines[:start])
    after = "".join(lines[end:])
    return before + section + ("\n" + after if after else "")


def write_section(heading: str, body: str, path: Path | str = RESULTS) -> Path:
    """Replace (or add) the ``## heading`` section of RESULTS.md, keeping every other section."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else TITLE
    path.write_text(replace_section(text, heading, body), encoding="utf-8")
    return path


def save_section(heading: str, body: str, write: bool) -> None:
    """What every benchmark does at the end: write its section of RESULTS.md (when ``write``;
    not for ``--quick``/``--no-write`` runs) and say so."""
    if write:
        print(f"wrote section {heading!r} of {write_section(heading, body)}")
    else:
        print("(RESULTS.md not written)")


# --------------------------------------------------------------------------- timing
def load_average() -> float:
    """The 1-minute load average (NaN where the OS does not report one): printed next to the
    figures so that readers can judge how noisy the machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def time_calls(*fns: Callable[[], object], inner: int, repeats: int, warmup: int,
               clock: Callable[[], float] = time.perf_counter,
               reduce: Callable[[list[float]], float] = statistics.median) -> list[float]:
    """Seconds per call of each of ``fns``, timed the same way for all of them.

    Each function is first called ``warmup`` times; then, ``repeats`` times over, every
    function in turn is called ``inner`` times and the mean time per call is recorded (the
    functions take turns within each repeat, so that a change in the machine's load affects
    all of them alike: their ratio is what gets compared).  Returns ``reduce`` of each
    function's ``repeats`` samples: the median by default; ``min`` (as ``timeit`` does) on a
    shared machine, where noise only adds time.  ``clock`` is ``time.perf_counter`` (wall
    time) by default; ``time.thread_time`` counts only the calling thread's CPU time.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            t0 = clock()
            for _ in range(inner):
                fn()
            out.append((clock() - t0) / inner)
    return [reduce(out) for out in samples]
