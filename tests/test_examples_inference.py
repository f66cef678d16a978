"""The VI and Gibbs examples run at their small (CI) size and print what they claim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def number(pattern: str, out: str, group: int = 1) -> float:
    m = re.search(pattern, out)
    assert m, f"{pattern!r} not in:\n{out}"
    return float(m.group(group))


def test_vae_example_learns_the_model_and_the_guide():
    out = run_example("vae_fit_vi.py", "--size", "small", "--no-progress")
    m = re.search(r"before (-?[\d.]+), after (-?[\d.]+), true model (-?[\d.]+)", out)
    before, after, oracle = (float(m.group(i)) for i in (1, 2, 3))
    # exact (quadrature) held-out log-likelihoods: training gains > 2 nats per point and ends
    # within 0.4 of the true model's (measured: -5.07 -> -1.75, true -1.58)
    assert after > before + 2.0
    assert abs(after - oracle) < 0.4
    m = re.search(r"ELBO (-?[\d.]+) <= IWAE\(K=256\) (-?[\d.]+) <= log p\(x\) (-?[\d.]+)", out)
    e, iw, exact = (float(m.group(i)) for i in (1, 2, 3))
    assert e < iw <= exact + 0.02  # the bounds are ordered (IWAE: 100 points, K = 256)
    assert abs(number(r"learned noise sigma: ([\d.]+)", out) - 0.2) < 0.05


@pytest.mark.filterwarnings("ignore")
def test_mixture_gibbs_example_prints_arviz_diagnostics():
    out = run_example("mixture_gibbs.py", "--size", "small", "--no-progress")
    assert "r_hat" in out and "ess_bulk" in out  # the ArviZ summary table
    r0, r1 = (number(r"R-hat \(ArviZ\): ([\d.]+) ([\d.]+)", out, g) for g in (1, 2))
    assert r0 < 1.1 and r1 < 1.1
    e0, e1 = (number(r"ESS bulk \(ArviZ\): ([\d.]+) ([\d.]+)", out, g) for g in (1, 2))
    assert e0 > 50 and e1 > 50
    m0, m1 = (number(r"posterior means of mus: (-?[\d.]+) (-?[\d.]+)", out, g) for g in (1, 2))
    assert abs(m0 + 1.5) < 0.4 and abs(m1 - 1.8) < 0.4
    assert number(r"gibbs acceptance ([\d.]+)", out) == 1.0  # exact block Gibbs
    assert number(r"true ones: ([\d.]+)", out) > 0.85
    assert number(r"single-site mh \(\d+ calls\): (\d+)x", out) > 5
