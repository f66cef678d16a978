"""Run the Python examples of the documentation, so that they cannot silently rot.

Every ```python block of each page runs, in order, in one namespace per page (a page is one
script). A block right after an ``<!-- norun ... -->`` comment is skipped (for API that is
shown but not runnable yet). For README.md only the Quickstart block runs.

A block followed by a paragraph starting with "prints" and a ```text block must print exactly
that text (trailing whitespace aside). In the expected text a line ``...`` stands for any
number of lines and ``...`` inside a line for any characters (doctest's ELLIPSIS), for output
that varies between runs (timings, a shrunk counterexample).

    python docs/check_examples.py            # README.md and docs/*.md
    python docs/check_examples.py docs/dsl.md
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- norun[^>]*-->\s*\n)?```python\n(.*?)```"
                   r"(?:\s*\nprints[^\n]*\n\s*```text\n(.*?)```)?", re.S)


def blocks_with_output(path: Path) -> list[tuple[str, str | None]]:
    """``(code, expected printed text or None)`` for every block that runs."""
    text = path.read_text(encoding="utf-8")
    if path.name == "README.md":
        text = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [(m.group(2), m.group(3)) for m in BLOCK.finditer(text) if not m.group(1)]


def blocks(path: Path) -> list[str]:
    return [code for code, _ in blocks_with_output(path)]


def matches(expected: str, got: str) -> bool:
    """Does the printed text ``got`` match ``expected`` (with ``...`` wildcards)?"""
    parts = []
    for line in expected.rstrip().splitlines():
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*".join(re.escape(p) for p in line.rstrip().split("...")) + r"\n")
    norm = "\n".join(line.rstrip() for line in got.rstrip().splitlines()) + "\n"
    return re.fullmatch("".join(parts), norm, re.S) is not None


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_page(path: Path) -> bool:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    found = blocks_with_output(path)
    for i, (code, expected) in enumerate(found):
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception:
            print(f"FAILED {_name(path)} block {i}:\n{code}")
            traceback.print_exc()
            return False
        if expected is not None and not matches(expected, out.getvalue()):
            print(f"FAILED {_name(path)} block {i}: printed output differs from the "
                  f"page's \"prints\" block.\n--- expected\n{expected.rstrip()}\n--- printed\n"
                  f"{out.getvalue().rstrip()}")
            return False
    checked = sum(e is not None for _, e in found)
    print(f"ok     {_name(path)} ({len(found)} blocks, {checked} outputs compared)")
    return True


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    pages = [Path(a).resolve() for a in argv] or [ROOT / "README.md",
                                                 *sorted((ROOT / "docs").glob("*.md"))]
    results = [run_page(p) for p in pages]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
