"""nox sessions for gfcomb: ``nox -l`` lists them, ``nox -s NAME`` runs one.

Every session installs with ``-c constraints.txt``, which pins the torch the suite is tested
with (so pip does not fetch the newest torch and its CUDA packages).  ``tests`` runs exactly
the README's (and CI's) test command; extra arguments go to the tool, e.g.
``nox -s tests -- -k choicemap`` or ``nox -s bench -- --quick``.
"""

from __future__ import annotations

from pathlib import Path

import nox

CONSTRAINTS = ("-c", "constraints.txt")
ROOT = Path(__file__).resolve().parent

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]  # slow and bench on request


def install(session: nox.Session, *args: str) -> None:
    session.install(*CONSTRAINTS, *args)


@nox.session
def tests(session: nox.Session) -> None:
    """The README's install and test commands (what .ci/run does)."""
    install(session, "-e", ".[test,examples]")
    session.run("python", "-m", "pytest", "-n", "2", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """The slow statistical and exhaustive tests (deselected by default)."""
    install(session, "-e", ".[test,examples]")
    session.run("python", "-m", "pytest", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check over the whole repository."""
    install(session, "ruff>=0.5")
    session.run("ruff", "check", *(session.posargs or ["."]))


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package (settings in pyproject.toml)."""
    install(session, "-e", ".[dev]")
    session.run("mypy", *(session.posargs or ["gfcomb"]))


@nox.session
def docs(session: nox.Session) -> None:
    """Build the MkDocs site into site/, failing on any warning; run the pages' examples."""
    install(session, "-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs)
    session.run("python", "docs/check_examples.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Run every benchmarks/bench_*.py (each rewrites its own section of RESULTS.md)."""
    install(session, "-e", ".")
    scripts = sorted((ROOT / "benchmarks").glob("bench_*.py"))
    if not scripts:
        session.error("no benchmarks/bench_*.py found")
    for script in scripts:
        session.run("python", str(script.relative_to(ROOT)), *session.posargs)


@nox.session
def site(session: nox.Session) -> None:
    """Build the site and render every page in headless Chromium (served from 127.0.0.1):
    fails on a console error, a broken link or an empty API page.  Needs ``chromium`` on
    PATH (Debian: ``apt-get install chromium``)."""
    install(session, "-e", ".[docs]")
    session.run("python", "docs/check_site.py", *session.posargs)
