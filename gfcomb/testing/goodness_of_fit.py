"""Goodness of fit of a generative function's ``simulate`` against its ``assess`` density.

``goodness_of_fit(gen_fn, args, alpha=1e-4)`` draws ``n`` samples with ``simulate`` and tests
them against the density that ``assess`` gives, for a function with one choice (a
distribution, or anything whose choice map has a single address):

- *discrete* values (integer dtype, or every sample an exact integer): Pearson's chi-square
  test, expected counts ``n · exp(assess(k))`` for every observed value ``k`` with an expected
  count of at least 5, all other values pooled into one cell whose probability is 1 − Σ of the
  listed ones (so a mass function that does not sum to 1 fails too);
- *continuous* values: a Kolmogorov–Smirnov test of the probability integral transform
  ``u = F(x)``, with ``F`` integrated numerically from ``exp(assess)`` on a grid adapted to
  the samples (for vector values: the conditional CDF of coordinate ``j`` given the others,
  along a coordinate direction; ``simplex=True`` moves the last coordinate against it, for
  distributions on the simplex).  The numerically integrated total mass must be 1 within
  ``mass_tol`` (scalar values).

Each call is one test at false-alarm rate ``alpha`` (for the KS test of vector values, one
test per coordinate at ``alpha / d``, Bonferroni); ``GOFResult.passed`` is ``p >= alpha``.
With a fixed ``seed`` the outcome is deterministic.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import torch
from scipy import stats

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.gfi import GenerativeFunction


@attrs.frozen
class GOFResult:
    """The outcome of :func:`goodness_of_fit`."""

    test: str
    statistic: float
    p_value: float
    alpha: float
    n: int
    detail: str = ""

    @property
    def passed(self) -> bool:
        """True if the test does not reject at level ``alpha``."""
        return self.p_value >= self.alpha

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"{self.test}: statistic {self.statistic:.4g}, p = {self.p_value:.3g} "
                f"(alpha {self.alpha:g}, n = {self.n}) {verdict}" +
                (f"; {self.detail}" if self.detail else ""))


def _samples(gen_fn: GenerativeFunction, args: tuple[Any, ...], n: int) -> tuple[Any, torch.Tensor]:
    """(address, stacked values) of ``n`` simulate calls (one vmapped call when possible)."""
    try:
        tr = torch.func.vmap(lambda _: gen_fn.simulate(args), randomness="different")(
            torch.zeros(n))
        items = list(tr.choices.items(stacked=True))
        if len(items) == 1:
            addr, v = items[0]
            return tuple(a for a in addr if not isinstance(a, slice)), v
    except Exception:  # noqa: BLE001 - fall back to a loop
        pass
    vals = []
    found: Any = None
    for _ in range(n):
        items = list(gen_fn.simulate(args).choices.items())
        if len(items) != 1:
            raise ValueError("goodness_of_fit needs a generative function with one choice, "
                             f"got {len(items)}")
        found, v = items[0]
        vals.append(v)
    return found, torch.stack(vals)


def _logp(gen_fn: GenerativeFunction, args: tuple[Any, ...], addr: Any,
          values: torch.Tensor) -> np.ndarray:
    """log density of each value (leading axis), non-finite and invalid values -> -inf."""
    def one(v: torch.Tensor) -> torch.Tensor:
        return gen_fn.assess(args, ChoiceMap({addr: v}) if addr else ChoiceMap.value(v))[0]

    try:
        out = torch.func.vmap(one)(values)
    except Exception:  # noqa: BLE001
        out = torch.stack([one(v) for v in values])
    lp = out.detach().double().cpu().numpy()
    return np.where(np.isfinite(lp), lp, -np.inf)


def _chi_square(gen_fn: GenerativeFunction, args: tuple[Any, ...], addr: Any,
                x: torch.Tensor, alpha: float) -> GOFResult:
    n = x.shape[0]
    keys, counts = torch.unique(x, dim=0, return_counts=True)
    p = np.exp(_logp(gen_fn, args, addr, keys))
    expected = n * p
    big = expected >= 5
    obs = counts.cpu().numpy().astype(float)
    f_obs = list(obs[big])
    f_exp = list(expected[big])
    rest_p = 1.0 - p[big].sum()
    rest_obs = obs[~big].sum()
    if rest_p * n >= 1e-9 or rest_obs > 0:
        f_obs.append(rest_obs)
        f_exp.append(max(rest_p, 0.0) * n)
    f_obs_a, f_exp_a = np.array(f_obs), np.array(f_exp)
    if len(f_obs_a) < 2:
        return GOFResult("chi-square", 0.0, 1.0, alpha, n, "a single cell")
    if np.any(f_exp_a <= 0) and np.any(f_obs_a[f_exp_a <= 0] > 0):
        return GOFResult("chi-square", float("inf"), 0.0, alpha, n,
                         "values observed where assess gives probability 0")
    stat = float(((f_obs_a - f_exp_a) ** 2 / np.maximum(f_exp_a, 1e-300)).sum())
    pval = float(stats.chi2.sf(stat, df=len(f_obs_a) - 1))
    return GOFResult("chi-square", stat, pval, alpha, n,
                     f"{len(f_obs_a)} cells, total listed probability {p[big].sum():.4f}")


def _grid(lo: float, hi: float, anchors: np.ndarray, points: int) -> np.ndarray:
    """A grid over [lo, hi] dense where the anchors (sample quantiles) are dense."""
    knots = np.unique(np.concatenate([[lo], anchors, [hi]]))
    per = max(points // max(len(knots) - 1, 1), 4)
    pieces = [np.linspace(a, b, per, endpoint=False) for a, b in zip(knots[:-1], knots[1:])]
    return np.concatenate(pieces + [[hi]])


def _cdf_on(grid: np.ndarray, logp: np.ndarray) -> tuple[np.ndarray, float]:
    """Unnormalized CDF by the trapezoid rule."""
    dens = np.exp(logp - np.max(logp[np.isfinite(logp)])) if np.any(np.isfinite(logp)) \
        else np.zeros_like(logp)
    return np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid))]), \
        np.max(logp[np.isfinite(logp)]) if np.any(np.isfinite(logp)) else 0.0


def _ks_scalar(gen_fn: GenerativeFunction, args: tuple[Any, ...], addr: Any, x: torch.Tensor,
               alpha: float, points: int, mass_tol: float) -> GOFResult:
    xs = np.sort(x.detach().double().cpu().numpy().reshape(-1))
    n = len(xs)
    span = xs[-1] - xs[0]
    lo, hi = xs[0] - 0.5 * span - 1e-3, xs[-1] + 0.5 * span + 1e-3
    # dense near the extreme samples (log-spaced), where a support boundary may sit
    steps = np.geomspace(1e-7 * span, 0.5 * span, 300)
    anchors = np.concatenate([np.quantile(xs, np.linspace(0, 1, 201)), xs[0] - steps,
                              xs[-1] + steps])
    grid = _grid(lo, hi, anchors, points)
    lp = _logp(gen_fn, args, addr, torch.tensor(grid, dtype=x.dtype if x.is_floating_point()
                                                else torch.float64))
    cum, shift = _cdf_on(grid, lp)
    mass = cum[-1] * np.exp(shift)
    u = np.interp(xs, grid, cum / cum[-1])
    res = stats.kstest(u, "uniform")
    detail = f"numerically integrated mass {mass:.5f} on [{lo:.3g}, {hi:.3g}]"
    if abs(mass - 1.0) > mass_tol:
        return GOFResult("KS (probability integral transform)", float(res.statistic), 0.0,
                         alpha, n, "assess does not integrate to 1: " + detail)
    return GOFResult("KS (probability integral transform)", float(res.statistic),
                     float(res.pvalue), alpha, n, detail)


def _ks_vector(gen_fn: GenerativeFunction, args: tuple[Any, ...], addr: Any, x: torch.Tensor,
               alpha: float, points: int, simplex: bool) -> GOFResult:
    n, d = x.shape[0], x.shape[-1]
    coords = range(d - 1) if simplex else range(d)
    worst: GOFResult | None = None
    m = len(coords)
    for j in coords:
        col = x[:, j].detach().double().cpu().numpy()
        span = col.max() - col.min()
        lo, hi = col.min() - 0.5 * span - 1e-3, col.max() + 0.5 * span + 1e-3
        t = torch.linspace(lo, hi, points, dtype=x.dtype)
        # values along the line through each sample: coordinate j set to t (and, on the
        # simplex, the last coordinate absorbing the change)
        line = x.unsqueeze(1).repeat(1, points, 1)
        delta = t.unsqueeze(0) - x[:, j].unsqueeze(1)
        line[:, :, j] = t.unsqueeze(0).expand(n, points)
        if simplex:
            line[:, :, d - 1] = x[:, d - 1].unsqueeze(1) - delta
        lp = _logp(gen_fn, args, addr, line.reshape(n * points, d)).reshape(n, points)
        g = t.double().numpy()
        u = np.empty(n)
        for i in range(n):
            cum, _ = _cdf_on(g, lp[i])
            u[i] = np.interp(col[i], g, cum / cum[-1]) if cum[-1] > 0 else np.nan
        res = stats.kstest(u[np.isfinite(u)], "uniform")
        r = GOFResult(f"KS (conditional PIT, coordinate {j}, Bonferroni over {m})",
                      float(res.statistic), min(1.0, float(res.pvalue) * m), alpha, n)
        if worst is None or r.p_value < worst.p_value:
            worst = r
    assert worst is not None
    return worst


def goodness_of_fit(gen_fn: GenerativeFunction, args: tuple[Any, ...], *, n: int = 2000,
                    alpha: float = 1e-4, seed: int = 0, discrete: bool | None = None,
                    simplex: bool = False, grid_points: int = 20001,
                    mass_tol: float = 0.01) -> GOFResult:
    """Test ``simulate`` against ``assess`` for a generative function with one choice.

    Args:
        gen_fn: the generative function (e.g. a distribution).
        args: its arguments.
        n: samples.
        alpha: the false-alarm rate of the test (the probability of rejecting a correct
            ``simulate``/``assess`` pair).
        seed: the torch seed of the samples (the global RNG state is restored afterwards).
        discrete: force the discrete (chi-square) or continuous (KS) test; default: integer
            dtype or all samples integral means discrete.
        simplex: for vector values on the simplex (Dirichlet): move the last coordinate
            against the tested one.
        grid_points: grid size of the numerical CDF (per sample line for vector values: a
            tenth of it).
        mass_tol: tolerance of the numerically integrated total mass (scalar continuous).

    Returns:
        A :class:`GOFResult`; ``result.passed`` is False when the test rejects.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        addr, x = _samples(gen_fn, args, n)
    if discrete is None:
        discrete = (not x.is_floating_point()) or bool((x == torch.round(x)).all())
    if discrete:
        return _chi_square(gen_fn, args, addr, x, alpha)
    if x.dim() == 1:
        return _ks_scalar(gen_fn, args, addr, x, alpha, grid_points, mass_tol)
    return _ks_vector(gen_fn, args, addr, x.reshape(n, -1), alpha,
                      max(grid_points // 10, 201), simplex)


__all__ = ["GOFResult", "goodness_of_fit"]
