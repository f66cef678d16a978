"""The command line every example shares: one size flag (``--size small|full``; small is
the default and what CI runs), ``--no-plot``, ``--no-progress``, ``--help`` (which prints the
script's docstring, sizes and run times included, and runs nothing), and the warning printed
when an importance-sampling or particle-filter estimate has collapsed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

#: an estimate whose effective sample size falls below this fraction of the particles (and
#: at least ESS_MIN) is reported as collapsed: its log-marginal-likelihood estimate is then
#: dominated by a few particles
ESS_FRACTION = 0.01
ESS_MIN = 10


def parse_args(doc: str | None, sizes: dict[str, str],
               extra: Callable[[argparse.ArgumentParser], None] | None = None,
               ) -> argparse.Namespace:
    """Parse the example's command line; ``sizes`` maps "small"/"full" to what they run."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The run times above are of the whole script, measured on a shared 2-core CPU "
               "machine under load (load average about 8); expect less on a quiet machine.")
    parser.add_argument("--size", choices=("small", "full"), default="small",
                        help="; ".join(f"{k}: {v}" for k, v in sizes.items())
                        + " (default: small, as in CI)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they show only in a terminal anyway)")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def show_progress(opts: argparse.Namespace) -> bool:
    """Progress bars: on when stderr (where tqdm draws) is a terminal, unless --no-progress."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and not opts.no_progress


def ess_threshold(n: int) -> float:
    """The collapse threshold for ``n`` particles: 1% of them, at least 10."""
    return max(ESS_MIN, ESS_FRACTION * n)


def warn_if_collapsed(ess: float, n: int, what: str,
                      advice: str = "use a better proposal or more particles") -> None:
    """Print a warning when ``what``'s effective sample size ``ess`` (of ``n`` particles) is
    below :func:`ess_threshold`: the estimate rests on a handful of particles and may be far
    off."""
    limit = ess_threshold(n)
    if ess < limit:
        print(f"WARNING: {what} has collapsed: effective sample size {ess:.0f} of {n:,} "
              f"particles (below {limit:.0f}, 1% of them); the estimate rests on a few "
              f"particles and may be far off ({advice})")
