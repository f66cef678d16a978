"""Resampling schemes, effective sample size and weight normalization for batched particles.

Every resampler takes nonnegative weights ``w`` (a 1-d tensor, normalized or not: they are
divided by their sum) and returns a 1-d long tensor of ``n`` ancestor indices (``n`` defaults
to ``len(w)``) such that the number of offspring of particle i,
``count_i = #{k : ancestors[k] = i}``, is unbiased: ``E[count_i] = n w̄_i`` (w̄ = w / Σ w).
The schemes differ in the variance of the counts:

* :func:`systematic_resample` -- one uniform u, points (u + k)/n;
* :func:`stratified_resample` -- one uniform per stratum, points (k + u_k)/n;
* :func:`multinomial_resample` -- n i.i.d. draws;
* :func:`residual_resample` -- ⌊n w̄_i⌋ deterministic copies, the rest multinomial on the
  residual weights.

All four are O(n) or O(n log n) tensor code without Python loops.  Systematic and stratified
need no binary search: the number of points below each cumulative weight is computed in
closed form and turned into ancestors with one ``bincount`` and one ``cumsum``
(:func:`_ancestors_from_below`), ~4x faster than ``searchsorted`` at 10,000 particles on CPU.
Ancestors come out sorted (grouped by parent).

:func:`log_normalize` turns log weights into normalized ones and raises
:class:`~gfcomb.core.errors.DegenerateWeightsError` (naming the step) when they are all
``-inf`` or contain ``NaN``."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import torch

from gfcomb.core.batching import cached_arange
from gfcomb.core.errors import ArgumentError, DegenerateWeightsError

Resampler = Callable[..., torch.Tensor]


def _where(step: int | str | None) -> str:
    return "" if step is None else f" at step {step}"


def log_normalize(log_weights: torch.Tensor, who: str = "resampling",
                  step: int | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_weights − logsumexp(log_weights), logsumexp(log_weights))``.

    Math: the normalized log weights log w̄_i = log w_i − log Σ_j w_j, and log Σ_j w_j.
    Raises :class:`DegenerateWeightsError` (message naming ``who`` and ``step``) when every
    weight is ``-inf`` (no particle is consistent with the data), any weight is ``NaN``, or
    the sum is ``+inf``.  One scalar check (one host sync).
    """
    check_log_weights(log_weights, who)
    lse = torch.logsumexp(log_weights, 0)
    if not math.isfinite(float(lse)):
        _raise_degenerate(log_weights, who, step)
    return log_weights - lse, lse


def _raise_degenerate(log_weights: torch.Tensor, who: str, step: int | str | None) -> None:
    n = log_weights.shape[0]
    n_nan = int(torch.isnan(log_weights).sum())
    n_pinf = int((log_weights == math.inf).sum())
    if n_nan:
        what = f"{n_nan} of the {n} log weights are NaN"
    elif n_pinf:
        what = f"{n_pinf} of the {n} log weights are +inf"
    else:
        what = f"all {n} log weights are -inf (no particle is consistent with the observations)"
    raise DegenerateWeightsError(
        f"{who}{_where(step)}: degenerate importance weights: {what}. Check the observations "
        "against the model's support, or use a proposal that reaches the data.")


def check_log_weights(log_weights: torch.Tensor, who: str) -> None:
    """ArgumentError unless ``log_weights`` is a non-empty 1-d floating tensor."""
    if (not isinstance(log_weights, torch.Tensor) or log_weights.dim() != 1
            or log_weights.shape[0] == 0 or not log_weights.is_floating_point()):
        raise ArgumentError(f"{who}: log_weights must be a non-empty 1-d floating tensor, got "
                            f"{type(log_weights).__name__} "
                            f"{tuple(getattr(log_weights, 'shape', ()))}")


def exp_normalized(log_weights: torch.Tensor, who: str = "resampling",
                   step: int | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(log_weights − max), logsumexp(log_weights))``: weights proportional to
    exp(log_weights), scaled so that the largest is 1 (what the resamplers take), and the log
    normalizer -- cheaper than :func:`log_normalize` followed by ``exp``.

    Raises :class:`DegenerateWeightsError` like :func:`log_normalize`.
    """
    check_log_weights(log_weights, who)
    m = torch.amax(log_weights, 0)
    if not math.isfinite(float(m)):
        _raise_degenerate(log_weights, who, step)
    w = torch.exp(log_weights - m)
    return w, m + torch.log(w.sum())


def check_finite_max(log_weights: torch.Tensor, who: str, step: int | str | None) -> None:
    """Raise :class:`DegenerateWeightsError` (naming ``who``/``step``) if every log weight is
    ``-inf``, one is NaN or one is ``+inf`` -- one max and one host sync."""
    if not math.isfinite(float(torch.amax(log_weights, 0))):
        _raise_degenerate(log_weights, who, step)


# -- the degeneracy check kept on the device (pf_initialize(check_every=k), k > 1)
Flag = tuple[torch.Tensor, torch.Tensor]


def check_every_arg(check_every: object, who: str) -> int:
    """``check_every`` as a positive int, else :class:`ArgumentError` naming it."""
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ArgumentError(f"{who}: check_every must be a positive int (the number of steps "
                            f"between host reads of the degeneracy check), got {check_every!r}")
    return check_every


def no_flag(log_weights: torch.Tensor) -> Flag:
    """A clear degeneracy flag on the device of ``log_weights``: (first bad step = -1, the
    maximum log weight at that step = 0)."""
    return (torch.full((), -1, dtype=torch.long, device=log_weights.device),
            log_weights.new_zeros(()))


def mark_flag(flag: Flag, max_log_weight: torch.Tensor, step: int | torch.Tensor) -> Flag:
    """``flag`` with ``step`` recorded if it is the first whose maximum log weight is not
    finite (all -inf, or a NaN or +inf among the weights).  Device ops only, no host read."""
    bad_step, bad_max = flag
    first = (bad_step < 0) & ~torch.isfinite(max_log_weight)
    return torch.where(first, step, bad_step), torch.where(first, max_log_weight, bad_max)


def raise_flagged(flag: Flag, n: int, who: str) -> None:
    """Read ``flag`` (one host sync when it is clear) and raise
    :class:`DegenerateWeightsError` naming the first degenerate step, as
    :func:`check_finite_max` would have at that step."""
    bad_step = int(flag[0])
    if bad_step < 0:
        return
    bad_max = float(flag[1])
    if math.isnan(bad_max):
        what = f"some of the {n} log weights are NaN"
    elif bad_max > 0:
        what = f"some of the {n} log weights are +inf"
    else:
        what = f"all {n} log weights are -inf (no particle is consistent with the observations)"
    raise DegenerateWeightsError(
        f"{who}{_where(bad_step)}: degenerate importance weights: {what} (found by the "
        "deferred check, pf_initialize(check_every=...)). Check the observations against the "
        "model's support, or use a proposal that reaches the data.")


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size of unnormalized log weights.

    Math: ESS = (Σ w_i)² / Σ w_i² = exp(2 logsumexp(lw) − logsumexp(2 lw)); between 1 and n.
    """
    return torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0))


def _check(weights: torch.Tensor, n: int | None, who: str) -> int:
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or weights.shape[0] == 0:
        raise ArgumentError(f"{who}: weights must be a non-empty 1-d tensor, got "
                            f"{type(weights).__name__} {tuple(getattr(weights, 'shape', ()))}")
    n = weights.shape[0] if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ArgumentError(f"{who}: n (the number of ancestors to draw) must be a positive "
                            f"int, got {n!r}")
    return n


_STATIC = contextvars.ContextVar("gfcomb_static_shapes", default=False)


@contextlib.contextmanager
def static_shapes() -> Iterator[None]:
    """Inside, the resamplers use only ops whose output shapes do not depend on the data
    (``scatter_add`` into n + 1 bins instead of ``bincount``, which is ~1.5x faster on CPU
    but whose output size is data-dependent): what a captured, compiled step needs
    (:func:`gfcomb.inference.compile_step` enters it while capturing).  Same ancestors."""
    token = _STATIC.set(True)
    try:
        yield
    finally:
        _STATIC.reset(token)


def _ancestors_from_below(below: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted ancestors from ``below`` (long, nondecreasing): ``below[i]`` = the number of the
    ``n`` sorted points that fall strictly below the cumulative weight C_i.

    Math: ancestor of point k = #{i < N−1 : below_i ≤ k} (point k lies in the first bin whose
    right edge exceeds it; the last bin takes whatever rounding leaves over).  O(N + n): one
    ``bincount`` and one ``cumsum``, no binary search (``bincount`` sizes its output from the
    data, a host sync on a GPU; :func:`static_shapes` avoids it).  Entries of ``below``
    above n (rounding) only make the count vector longer; it is cut at n.
    """
    if _STATIC.get():
        ones = torch.ones((), dtype=below.dtype, device=below.device).expand(below.shape[0] - 1)
        marks = torch.zeros(n + 1, dtype=below.dtype, device=below.device).scatter_add_(
            0, below[:-1].clamp(max=n), ones)
    else:
        marks = torch.bincount(below[:-1], minlength=n + 1)
    return torch.cumsum(marks[:n], 0)


def _scaled_cdf(weights: torch.Tensor, n: int) -> torch.Tensor:
    """n · C_i / C_{N−1}: the cumulative weights rescaled to [0, n] (weights need not be
    normalized)."""
    cdf = torch.cumsum(weights, 0)
    return cdf.mul_(n / cdf[-1])


#: below this many particles the binary-search form of systematic resampling is faster (fewer
#: tensor ops; both give the same ancestors for the same uniform)
SMALL_N = 256


def systematic_resample(weights: torch.Tensor, n: int | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Systematic resampling: ``n`` ancestors for the points (u + k)/n, u ~ U[0, 1).

    Math: ancestor of point k = the i with C_{i−1} ≤ (u + k)/n < C_i (C = cumulative weights).
    Computed in O(n) without a binary search: the number of points below C_i is
    clamp(⌈n C_i − u⌉, 0, n), and :func:`_ancestors_from_below` turns those counts into
    ancestors.  count_i ∈ {⌊n w_i⌋, ⌈n w_i⌉} and E[count_i] = n w_i.  ``weights`` may be
    unnormalized (they are divided by their sum).
    """
    n = _check(weights, n, "systematic_resample")
    return systematic_from_cdf(torch.cumsum(weights, 0), n, generator)


def systematic_from_cdf(cdf: torch.Tensor, n: int, generator: torch.Generator | None = None,
                mean: torch.Tensor | None = None) -> torch.Tensor:
    """Systematic ancestors (as :func:`systematic_resample`) from the unnormalized cumulative
    weights ``cdf``, for a caller that has them already (``mean``: ``cdf[-1] / n``, if the
    caller has that too)."""
    u = torch.rand(1, dtype=cdf.dtype, device=cdf.device, generator=generator)
    if mean is None:
        mean = cdf[-1] / n
    if n < SMALL_N and cdf.shape[0] < SMALL_N:
        points = (u + cached_arange(n, cdf.dtype, cdf.device)).mul_(mean)
        return torch.searchsorted(cdf, points, right=True).clamp_(max=cdf.shape[0] - 1)
    below = cdf.div(mean).sub_(u).ceil_().clamp_(min=0)
    return _ancestors_from_below(below.to(torch.long), n)


def systematic_resample_searchsorted(weights: torch.Tensor, n: int | None = None,
                                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The same draw as :func:`systematic_resample` written with ``searchsorted`` (the usual
    hand-written version, O(n log n)); kept as a reference for tests and benchmarks."""
    n = _check(weights, n, "systematic_resample_searchsorted")
    u = torch.rand((), dtype=weights.dtype, device=weights.device, generator=generator)
    points = (u + torch.arange(n, dtype=weights.dtype, device=weights.device)) / n
    cdf = _scaled_cdf(weights, 1)
    idx = torch.searchsorted(cdf, points, right=True)
    return idx.clamp_(max=weights.shape[0] - 1)


def stratified_resample(weights: torch.Tensor, n: int | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Stratified resampling: one uniform per stratum, points (k + u_k)/n.

    Math: ancestor of point k = the i with C_{i−1} ≤ (k + u_k)/n < C_i; E[count_i] = n w_i.
    O(n): point k lies in [k/n, (k+1)/n), so with m = ⌊n C_i⌋ the points below C_i are
    0..m−1 and point m iff u_m < n C_i − m (one gather, no binary search).
    """
    n = _check(weights, n, "stratified_resample")
    u = torch.rand(n + 1, dtype=weights.dtype, device=weights.device, generator=generator)
    scaled = _scaled_cdf(weights, n).clamp_(0, n)
    m = torch.floor(scaled)
    mi = m.to(torch.long)
    below = mi + (u.index_select(0, mi) < scaled - m).to(torch.long)
    return _ancestors_from_below(below, n)


def multinomial_resample(weights: torch.Tensor, n: int | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Multinomial resampling: ``n`` i.i.d. ancestors with P(i) = w_i (returned sorted).

    Math: counts ~ Multinomial(n, w); E[count_i] = n w_i, Var = n w_i (1 − w_i).  The n
    uniforms are drawn already sorted (normalized cumulative sums of n + 1 standard
    exponentials are the order statistics of n uniforms), so the draw is O(n) plus one
    ``searchsorted`` of the N cumulative weights -- ~4x faster than ``torch.multinomial``.
    """
    n = _check(weights, n, "multinomial_resample")
    e = torch.empty(n + 1, dtype=weights.dtype, device=weights.device).exponential_(
        generator=generator)
    s = torch.cumsum(e, 0)
    points = s[:n] / s[n]
    below = torch.searchsorted(points, _scaled_cdf(weights, 1))
    return _ancestors_from_below(below, n)


def residual_resample(weights: torch.Tensor, n: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Residual resampling: ⌊n w_i⌋ copies of particle i, then the remaining
    R = n − Σ⌊n w_i⌋ ancestors drawn multinomially with probabilities ∝ n w_i − ⌊n w_i⌋.

    Math: count_i = ⌊n w_i⌋ + Multinomial(R, r̄)_i with r̄_i = (n w_i − ⌊n w_i⌋)/R, so
    E[count_i] = n w_i.  (One host sync for R.)
    """
    n = _check(weights, n, "residual_resample")
    scaled = weights * (n / weights.sum())
    base = torch.floor(scaled)
    counts = base.to(torch.long)
    rest = n - int(counts.sum())
    if rest > 0:
        resid = (scaled - base).clamp_(min=0)
        extra = multinomial_resample(resid, rest, generator)
        counts = counts + torch.bincount(extra, minlength=weights.shape[0])
    return _ancestors_from_below(torch.cumsum(counts, 0), n)


RESAMPLERS: dict[str, Resampler] = {
    "systematic": systematic_resample,
    "multinomial": multinomial_resample,
    "stratified": stratified_resample,
    "residual": residual_resample,
}


def get_resampler(method: str | Resampler) -> Resampler:
    """The resampler named ``method`` (one of :data:`RESAMPLERS`), or ``method`` itself if it
    is a callable ``(weights, n) -> ancestors``."""
    if callable(method):
        return method
    try:
        return RESAMPLERS[method]
    except (KeyError, TypeError):
        raise ArgumentError(f"unknown resampling method {method!r}; choose one of "
                            f"{sorted(RESAMPLERS)} or pass a callable (weights, n) -> "
                            "ancestors") from None


def resample(log_weights: torch.Tensor, method: str | Resampler = "systematic",
             n: int | None = None, who: str = "resample",
             step: int | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ancestors from unnormalized log weights: ``(ancestors, logsumexp(log_weights))``.

    Raises :class:`DegenerateWeightsError` naming ``who``/``step`` for all-``-inf`` or NaN
    weights.
    """
    resampler = get_resampler(method)
    log_w, lse = log_normalize(log_weights, who, step)
    return resampler(torch.exp(log_w), n), lse
