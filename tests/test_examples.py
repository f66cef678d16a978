"""The examples run (small sizes, as in CI) and print what they claim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_hmm_example_matches_forward_algorithm():
    out = run_example("hmm_combinators.py")
    exact = float(re.search(r"exact \(forward algorithm\): (-?[\d.]+)", out).group(1))
    estimate = float(re.search(r"importance sampling\s+: (-?[\d.]+)", out).group(1))
    # 20,000 prior-proposal particles with an ESS of a few hundred: the log-ML estimate's
    # standard deviation is below 0.1, so 0.3 is a >3-sigma tolerance (fixed seed anyway).
    assert abs(estimate - exact) < 0.3
    err = float(re.search(r"marginal error\| of the IS estimate: ([\d.]+)", out).group(1))
    assert err < 0.1
    assert (ROOT / "examples" / "output" / "hmm.png").exists()
