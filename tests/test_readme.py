"""The README quickstart runs verbatim and prints a trace."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_quickstart_runs_verbatim(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "GenTrace of <@gen 'line'>" in proc.stdout
    assert "'slope'" in proc.stdout and "'y'" in proc.stdout
    assert "log weight:" in proc.stdout


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"## Install\s*```bash\n(.*?)\n```", readme, re.S).group(1).strip()
    test = re.search(r"## Test\s*```bash\n(.*?)\n```", readme, re.S).group(1).strip()
    assert install in ci and test in ci


def test_documentation_examples_run():
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "check_examples.py")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok     docs/dsl.md" in proc.stdout
