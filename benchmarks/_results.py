"""Shared helper for the benchmark scripts: keep ``benchmarks/RESULTS.md`` in named sections.

Each benchmark owns one ``## <heading>`` section of RESULTS.md and rewrites only that section
(from its heading line up to the next ``## `` heading or the end of the file), so benchmarks
written by different people can share one results file::

    from _results import write_section
    write_section("Core (issue 2)", markdown_text)
"""

from __future__ import annotations

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
