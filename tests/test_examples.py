"""The examples run (small sizes, as in CI) and print what they claim; ``--help`` runs
nothing; progress bars show under a pseudo-terminal."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["custom_gf_testing.py", "hmm_combinators.py", "learn_mlp.py",
            "stochastic_volatility.py", "tracking_2d.py"]


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


def test_stochastic_volatility_example_runs_filter_rejuvenation_and_hmc():
    out = run_example("stochastic_volatility.py", "--no-progress")
    boot = float(re.search(r"bootstrap pf\s+: (-?[\d.]+)", out).group(1))
    rejuv = float(re.search(r"pf \+ rejuvenation : (-?[\d.]+)", out).group(1))
    # two unbiased estimates of the same log p(y) (400 particles, T=30): their sd is ~0.1;
    # rejuvenation moves leave the weights alone, so the estimates must agree
    assert abs(boot - rejuv) < 0.5
    acc = re.search(r"rejuvenation acceptance: mh ([\d.]+), mala ([\d.]+)", out)
    assert 0.2 < float(acc.group(1)) <= 1 and 0.2 < float(acc.group(2)) <= 1
    assert float(re.search(r"HMC on the whole path.*acceptance ([\d.]+)", out).group(1)) > 0.2
    assert (ROOT / "examples" / "output" / "stochastic_volatility.png").exists()


def test_learn_mlp_example_fits_the_data():
    out = run_example("learn_mlp.py", "--no-progress")
    m = re.search(r"before (-?[\d.]+), after (-?[\d.]+), true function (-?[\d.]+)", out)
    before, after, oracle = (float(m.group(i)) for i in (1, 2, 3))
    assert after > before + 0.5
    assert abs(after - oracle) < 0.4
    sigma = float(re.search(r"learned noise sigma: ([\d.]+)", out).group(1))
    assert abs(sigma - 0.2) < 0.1
    assert (ROOT / "examples" / "output" / "learn_mlp.png").exists()


def test_tracking_example_matches_kalman_filter():
    out = run_example("tracking_2d.py", "--size", "small")
    pf = float(re.search(r"log marginal likelihood \(particle filter\): (-?[\d.]+)", out).group(1))
    exact = float(re.search(r"log marginal likelihood \(Kalman, exact\)\s*: (-?[\d.]+)",
                            out).group(1))
    # 2,000 particles, T = 30: the estimate's standard deviation is ~0.3 (5 seeds), so 1.2 is
    # a ~4-sigma tolerance (and the seed is fixed)
    assert abs(pf - exact) < 1.2
    gap = float(re.search(r"max \|PF mean - Kalman mean\| \(position\): ([\d.]+)", out).group(1))
    assert gap < 0.5
    assert "%|" not in out and "WARNING" not in out  # not a terminal: no bar; no collapse
    assert (ROOT / "examples" / "output" / "tracking_2d.png").exists()


def test_custom_gf_testing_example_checks_and_catches():
    out = run_example("custom_gf_testing.py")
    assert "AR1 satisfies the GFI laws." in out
    assert "ForgetfulAR1 is caught" in out
    assert "GFI law 'update_weight' violated by ForgetfulAR1(T=3)" in out
    assert "law: update_weight" in out


@pytest.mark.parametrize("name", EXAMPLES)
def test_help_runs_nothing_and_documents_the_sizes(name):
    t0 = time.perf_counter()
    out = run_example(name, "--help")
    assert "--size {small,full}" in out and "small:" in out and "full:" in out
    assert "about" in out  # the run time of each size, from the docstring
    assert "simulated" not in out and "particles:" not in out and "satisfies" not in out
    assert time.perf_counter() - t0 < 60


def test_bad_size_is_refused():
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "tracking_2d.py"),
                           "--size", "huge"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


def run_in_pty(name: str, *args: str) -> str:
    """Run an example with stdout and stderr on a pseudo-terminal (as in a terminal)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT), COLUMNS="100")
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / name), *args],
                            stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_bars_show_in_a_terminal():
    out = run_in_pty("tracking_2d.py", "--no-plot")
    assert "particle filter: 100%|" in out  # tqdm's bar (drawn on the terminal's stderr)
    assert "log marginal likelihood (particle filter)" in out


@pytest.mark.slow
def test_readme_main_job_output_is_what_the_command_prints():
    """The README's main-job block is the output of `tracking_2d.py --size full` (the
    timing line aside)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Main job", 1)[1]
    command = re.search(r"```bash\npython examples/(\S+) (.*?)\n```", section)
    expected = re.search(r"```text\n(.*?)```", section, re.S).group(1).splitlines()
    got = run_example(command.group(1), *command.group(2).split()).splitlines()
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        if e.startswith("particle filter:"):
            assert re.sub(r"[\d.]+ (m?s)", "", e) == re.sub(r"[\d.]+ (m?s)", "", g)
        else:
            assert e == g
