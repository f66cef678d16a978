"""Discrete distributions, written for ``torch.func.vmap``.

Value dtypes (torch's conventions where torch has the distribution):

==================  ===============================  ============================
distribution        value dtype                      support
==================  ===============================  ============================
bernoulli           floating (params' dtype), 0./1.  {0, 1}
categorical         ``torch.int64`` index            {0, ..., K-1}
uniform_discrete    ``torch.int64``                  {low, ..., high} (inclusive)
poisson             floating (params' dtype)         {0, 1, 2, ...}
binomial            floating (params' dtype)         {0, ..., total_count}
geometric           floating (params' dtype)         {0, 1, 2, ...} (failures)
==================  ===============================  ============================

``logpdf`` accepts values of any real or integer dtype (a float ``2.0`` is the same value as
the integer ``2``), returns the log mass in the parameters' floating dtype, ``-inf`` for
values outside the support (negative, too large, or not integer-valued), and is
differentiable in the parameters.  None of these samplers is reparameterized; they run under
``torch.no_grad``-like ``detach`` so that ``torch.func.grad`` through them is simply zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gfcomb.distributions.base import Distribution
from gfcomb.distributions.numerics import neg_inf_outside, safe, xlog1py, xlogy
from gfcomb.distributions.params import (
    INTEGER,
    NONNEGATIVE,
    NONNEGATIVE_INTEGER,
    POSITIVE_PROBABILITY,
    PROBABILITY,
    WEIGHTS,
    ArrayLike,
    broadcast_params,
    constant_tensor,
    constant_value,
    param_tensors,
)


def _is_integer(x: torch.Tensor) -> torch.Tensor:
    """Elementwise: is ``x`` integer-valued (always true for integer dtypes)."""
    if x.is_floating_point():
        return x == torch.floor(x)
    return torch.ones_like(x, dtype=torch.bool)


class Bernoulli(Distribution, samples_per_element=True,
                name="bernoulli", params={"probs": PROBABILITY}, discrete=True):
    r"""Bernoulli distribution ``bernoulli(probs)``; values are floating ``0.``/``1.``.

    .. math:: \log p(x) = x\log p + (1-x)\log(1-p), \quad x \in \{0, 1\}

    Sampler: ``(rand_like(p) < p)`` cast to ``p``'s dtype.
    """

    def sample(self, probs: ArrayLike) -> torch.Tensor:
        """Draw 1. with probability ``probs``, else 0."""
        (p,) = param_tensors(probs)
        p = p.detach()
        return (torch.rand_like(p) < p).to(p.dtype)

    def logpdf(self, value: ArrayLike, probs: ArrayLike) -> torch.Tensor:
        """Elementwise log mass (``-inf`` for values other than 0 and 1)."""
        x, p = param_tensors(value, probs)
        is1 = x == 1
        # one log of the probability of the value (p or 1 - p): p in {0, 1} gives no NaN
        # gradient, and two wheres instead of four (their backward is what a gradient-based
        # move over many chains spends its time in)
        return neg_inf_outside(is1 | (x == 0), torch.log(torch.where(is1, p, 1 - p)))

    def sample_with_logpdf(self, probs: ArrayLike,
                           ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The draw and its log mass from one comparison, for a constant ``probs`` strictly
        between 0 and 1 (log p and log(1 − p) taken in Python); None otherwise (then sample,
        then score).  The value carries no gradient, as ``sample``'s does not."""
        (p,) = param_tensors(probs)
        return self._draw_scored(p)

    def _draw_scored(self, p: torch.Tensor, rows: int | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        logs = _constant_logs(p)
        if logs is None:
            return None
        u = torch.rand_like(p) if rows is None else torch.rand(
            (rows,) + tuple(p.shape), dtype=p.dtype, device=p.device)
        hit = u < p
        log_p, log_q = (constant_tensor(v, p.dtype, p.device) for v in logs)
        return hit.to(p.dtype), torch.where(hit, log_p, log_q)

    def _batch_draw(self, params: tuple[Any, ...], n: int,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        (p,) = params
        if self._fused and p.dim() == 0:
            # (one probability for every row: the fused draw on its n rows, not on the
            # expanded parameter, which is no longer the cached constant)
            both = self._draw_scored(p, n)
            if both is not None:
                return both
        return super()._batch_draw(params, n)

    def _logpdf_prepared(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        logs = _constant_logs(p)
        if logs is None:
            return self.logpdf(x, p)
        log_p, log_q, no = (constant_tensor(v, p.dtype, p.device) for v in logs + (-math.inf,))
        return torch.where(x == 1, log_p, torch.where(x == 0, log_q, no))


def _constant_logs(p: torch.Tensor) -> tuple[float, float] | None:
    """(log p, log(1 − p)) of a constant probability strictly inside (0, 1), else None."""
    c = constant_value(p)
    if c is None or not 0.0 < c < 1.0:
        return None
    return math.log(c), math.log1p(-c)



class Categorical(Distribution, samples_per_element=True,
                  name="categorical", params={"probs": WEIGHTS}, discrete=True):
    r"""Categorical distribution ``categorical(probs)`` over ``{0, ..., K-1}``.

    ``probs`` has shape ``(..., K)``; as in torch it need not be normalized (it is divided by
    its sum along the last dim).  Values are ``torch.int64`` indices of shape ``probs.shape[:-1]``.

    .. math:: \log p(k) = \log \pi_k - \log \textstyle\sum_j \pi_j

    Sampler: inverse CDF -- ``#{k < K-1 : cdf_k <= U * cdf_{K-1}}`` with ``cdf = cumsum(probs)``
    (a sum of booleans; exact: zero-probability categories are never drawn).
    """

    def sample(self, probs: ArrayLike) -> torch.Tensor:
        """Draw one category index (int64)."""
        (p,) = param_tensors(probs)
        cdf = torch.cumsum(p.detach(), dim=-1)
        u = torch.rand_like(cdf[..., -1:]) * cdf[..., -1:]  # u < total (round to nearest)
        return (cdf[..., :-1] <= u).sum(dim=-1)

    def logpdf(self, value: ArrayLike, probs: ArrayLike) -> torch.Tensor:
        """Log mass of the index ``value`` (``-inf`` outside ``{0, ..., K-1}``)."""
        (p,) = param_tensors(probs)
        k = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, device=p.device)
        n_cat = p.shape[-1]
        support = _is_integer(k) & (k >= 0) & (k < n_cat)
        idx = torch.where(support, k, torch.zeros_like(k)).to(torch.int64)
        shape = torch.broadcast_shapes(p.shape[:-1], idx.shape)
        pk = torch.gather(p.expand(*shape, n_cat), -1, idx.expand(shape).unsqueeze(-1))
        lp = torch.log(pk.squeeze(-1)) - torch.log(p.sum(dim=-1))
        return neg_inf_outside(support, lp)



class UniformDiscrete(Distribution, samples_per_element=True,
                      name="uniform_discrete",
                      params={"low": INTEGER, "high": INTEGER}, relations=(("low", "<=", "high"),),
                      discrete=True):
    r"""Discrete uniform distribution ``uniform_discrete(low, high)`` on the integers
    ``low, ..., high`` -- *both ends included*, as Gen.jl's ``uniform_discrete``.
    Values are ``torch.int64``.

    .. math:: \log p(k) = -\log(\mathrm{high} - \mathrm{low} + 1), \quad
              k \in \{\mathrm{low}, \ldots, \mathrm{high}\}

    Sampler: ``floor(low + U * (high - low + 1))`` (computed in the floating dtype, so exact
    for ranges below ``2**24`` in float32 / ``2**53`` in float64).
    """

    def sample(self, low: ArrayLike, high: ArrayLike) -> torch.Tensor:
        """Draw one integer in ``[low, high]`` (int64)."""
        lo, hi = broadcast_params(low, high)
        lo, hi = lo.detach(), hi.detach()
        x = torch.floor(lo + torch.rand_like(lo) * (hi - lo + 1))
        return torch.minimum(x, hi).to(torch.int64)

    def logpdf(self, value: ArrayLike, low: ArrayLike, high: ArrayLike) -> torch.Tensor:
        """Elementwise log mass (``-inf`` outside the integers of ``[low, high]``)."""
        k, lo, hi = param_tensors(value, low, high)
        support = _is_integer(k) & (k >= lo) & (k <= hi)
        return neg_inf_outside(support, -torch.log(hi - lo + 1))



class Poisson(Distribution, samples_per_element=True,
              name="poisson", params={"rate": NONNEGATIVE}, discrete=True):
    r"""Poisson distribution ``poisson(rate)``; values are floating (torch's convention).

    .. math:: \log p(k) = k\log\lambda - \lambda - \log k!, \quad k \in \{0, 1, \ldots\}

    Sampler: ``torch.poisson`` (has a vmap batching rule).  ``rate = 0`` is allowed (point
    mass at 0), as in torch.
    """

    def sample(self, rate: ArrayLike) -> torch.Tensor:
        """Draw one count."""
        (rate,) = param_tensors(rate)
        return torch.poisson(rate.detach())

    def logpdf(self, value: ArrayLike, rate: ArrayLike) -> torch.Tensor:
        """Elementwise log mass (``-inf`` off the non-negative integers)."""
        k, rate = param_tensors(value, rate)
        support = _is_integer(k) & (k >= 0)
        ks = safe(support, k, 0.0)
        lp = xlogy(ks, rate) - rate - torch.lgamma(ks + 1)
        return neg_inf_outside(support, lp)



class Binomial(Distribution, samples_per_element=True,
               name="binomial",
               params={"total_count": NONNEGATIVE_INTEGER, "probs": PROBABILITY}, discrete=True):
    r"""Binomial distribution ``binomial(total_count, probs)``; values are floating.

    .. math:: \log p(k) = \log\binom{n}{k} + k\log p + (n-k)\log(1-p), \quad
              k \in \{0, \ldots, n\}

    Sampler: ``torch.binomial`` (vmap-safe; both arguments are made batched first, since
    torch's batching rule does not broadcast an unbatched ``total_count``).
    """

    def sample(self, total_count: ArrayLike, probs: ArrayLike) -> torch.Tensor:
        """Draw one count in ``[0, total_count]``."""
        n, p = broadcast_params(total_count, probs)
        n, p = n.detach(), p.detach()
        # `x + zeros_like(y)` makes both operands batched if either is (a no-op outside vmap)
        n, p = n + torch.zeros_like(p), p + torch.zeros_like(n)
        return torch.binomial(n, p)

    def logpdf(self, value: ArrayLike, total_count: ArrayLike, probs: ArrayLike) -> torch.Tensor:
        """Elementwise log mass (``-inf`` off ``{0, ..., total_count}``)."""
        k, n, p = param_tensors(value, total_count, probs)
        support = _is_integer(k) & (k >= 0) & (k <= n)
        ks = safe(support, k, 0.0)
        lp = (
            torch.lgamma(n + 1)
            - torch.lgamma(ks + 1)
            - torch.lgamma(n - ks + 1)
            + xlogy(ks, p)
            + xlog1py(n - ks, -p)
        )
        return neg_inf_outside(support, lp)



class Geometric(Distribution, samples_per_element=True,
                name="geometric", params={"probs": POSITIVE_PROBABILITY},
                discrete=True):
    r"""Geometric distribution ``geometric(probs)``: the number of *failures* before the first
    success (torch's convention, support ``0, 1, 2, ...``); values are floating.

    .. math:: \log p(k) = k\log(1-p) + \log p, \quad k \in \{0, 1, \ldots\}

    Sampler: inverse CDF ``floor(log(U) / log1p(-p))`` with ``U`` in ``(0, 1]``.
    """

    def sample(self, probs: ArrayLike) -> torch.Tensor:
        """Draw one count of failures."""
        (p,) = param_tensors(probs)
        p = p.detach()
        u = 1.0 - torch.rand_like(p)  # (0, 1]
        return torch.floor(torch.log(u) / torch.log1p(-p)) + 0.0  # + 0.0 turns -0. into 0.

    def logpdf(self, value: ArrayLike, probs: ArrayLike) -> torch.Tensor:
        """Elementwise log mass (``-inf`` off the non-negative integers)."""
        k, p = param_tensors(value, probs)
        support = _is_integer(k) & (k >= 0)
        ks = safe(support, k, 0.0)
        return neg_inf_outside(support, xlog1py(ks, -p) + torch.log(p))



__all__ = ["Bernoulli", "Binomial", "Categorical", "Geometric", "Poisson", "UniformDiscrete"]
