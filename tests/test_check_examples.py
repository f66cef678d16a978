"""docs/check_examples.py compares what a block prints with the page's "prints" block."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_examples",
                                              ROOT / "docs" / "check_examples.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_matches_exact_text_and_ellipsis():
    assert check.matches("a 1\nb 2\n", "a 1  \nb 2\n")
    assert not check.matches("a 1\nb 2\n", "a 1\nb 3\n")
    assert check.matches("took ... s\nend", "took 3.2 s\nend\n")
    assert check.matches("head\n...\nend", "head\nx\ny\nend")
    assert check.matches("head\n...\n", "head\nx\ny\n")
    assert not check.matches("head\n", "head\nextra\n")


def test_a_page_whose_prints_block_is_wrong_fails(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("```python\nprint(1 + 1)\n```\n\nprints\n\n```text\n3\n```\n")
    assert not check.run_page(page)
    assert "differs" in capsys.readouterr().out
    page.write_text("```python\nprint(1 + 1)\n```\n\nprints\n\n```text\n2\n```\n")
    assert check.run_page(page)
