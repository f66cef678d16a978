"""Run the Python examples of the documentation, so that they cannot silently rot.

Every ```python block of each page runs, in order, in one namespace per page (a page is one
script). A block right after an ``<!-- norun ... -->`` comment is skipped (for API that is
shown but not runnable yet). For README.md only the Quickstart block runs.

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
BLOCK = re.compile(r"(<!-- norun[^>]*-->\s*\n)?```python\n(.*?)```", re.S)


def blocks(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.name == "README.md":
        text = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [m.group(2) for m in BLOCK.finditer(text) if not m.group(1)]


def run_page(path: Path) -> bool:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(path)):
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception:
            print(f"FAILED {path.relative_to(ROOT)} block {i}:\n{code}")
            traceback.print_exc()
            return False
    print(f"ok     {path.relative_to(ROOT)} ({len(blocks(path))} blocks)")
    return True


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    pages = [Path(a).resolve() for a in argv] or [ROOT / "README.md",
                                                 *sorted((ROOT / "docs").glob("*.md"))]
    results = [run_page(p) for p in pages]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
