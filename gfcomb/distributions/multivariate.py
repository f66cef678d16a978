"""Multivariate distributions, written for ``torch.func.vmap``.

``logpdf`` returns one log density *per event*: for values of shape ``(..., d)`` the result
has the broadcast batch shape ``...``.  torch's own ``MultivariateNormal.rsample`` and
``Dirichlet`` sampling fail under vmap (DESIGN §3); these samplers are built from
``randn_like`` and vmap-safe gamma draws instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from gfcomb.core.errors import DistributionArgumentError
from gfcomb.distributions.base import Distribution
from gfcomb.distributions.numerics import (
    log_standard_gamma,
    neg_inf_outside,
    safe,
    sum_last,
    xlogy,
)
from gfcomb.distributions.params import (
    POSITIVE_DEFINITE,
    POSITIVE_VECTOR,
    REAL_VECTOR,
    ArrayLike,
    param_tensors,
    shape_of,
)

_LOG_2PI = math.log(2.0 * math.pi)


class MvNormal(Distribution, name="mv_normal",
               params={"mean": REAL_VECTOR, "cov": POSITIVE_DEFINITE}, reparameterized=True):
    r"""Multivariate normal distribution ``mv_normal(mean, cov)``.

    ``mean`` has shape ``(..., d)``, ``cov`` shape ``(..., d, d)`` (symmetric positive
    definite); batch dims broadcast.  With ``L = cholesky(cov)`` and ``z = L^{-1}(x - mu)``:

    .. math:: \log p(x) = -\tfrac12 z^\top z - \textstyle\sum_i \log L_{ii}
              - \tfrac{d}{2}\log(2\pi)

    Sampler: ``mean + L @ eps`` with ``eps = randn_like`` (reparameterized in ``mean`` and
    ``cov``).  ``logpdf`` returns one value per event (shape: the broadcast batch shape).
    """

    def sample(self, mean: ArrayLike, cov: ArrayLike) -> torch.Tensor:
        """Draw ``mean + L @ eps``."""
        mean, cov = param_tensors(mean, cov)
        chol = torch.linalg.cholesky(cov)
        batch = torch.broadcast_shapes(mean.shape[:-1], chol.shape[:-2])
        mean = mean.expand(*batch, mean.shape[-1])
        eps = torch.randn_like(mean)
        return mean + (chol @ eps.unsqueeze(-1)).squeeze(-1)

    def sample_with_logpdf(self, mean: ArrayLike,
                           cov: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean + L @ eps`` and its log density from ``eps`` itself (``z = eps``): one
        Cholesky factorization, no triangular solve."""
        return self._draw_scored(*param_tensors(mean, cov))

    def _draw_scored(self, mean: torch.Tensor,
                     cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chol = torch.linalg.cholesky(cov)
        batch = torch.broadcast_shapes(mean.shape[:-1], chol.shape[:-2])
        d = mean.shape[-1]
        mean = mean.expand(*batch, d)
        eps = torch.randn_like(mean)  # (the draw ``sample`` makes)
        value = mean + (chol @ eps.unsqueeze(-1)).squeeze(-1)
        half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return value, -0.5 * sum_last(eps * eps) - half_logdet - 0.5 * d * _LOG_2PI

    def logpdf(self, value: ArrayLike, mean: ArrayLike, cov: ArrayLike) -> torch.Tensor:
        """Log density per event (the last dim of ``value`` is the event dim)."""
        x, mean, cov = param_tensors(value, mean, cov)
        chol = torch.linalg.cholesky(cov)
        diff = x - mean
        batch = torch.broadcast_shapes(diff.shape[:-1], chol.shape[:-2])
        d = diff.shape[-1]
        diff = diff.expand(*batch, d).unsqueeze(-1)
        chol = chol.expand(*batch, d, d)
        z = torch.linalg.solve_triangular(chol, diff, upper=False).squeeze(-1)
        half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * sum_last(z * z) - half_logdet - 0.5 * d * _LOG_2PI

    def event_shape(self, params: Sequence[Any]) -> tuple[int, ...]:
        """``(d,)``: one value is a vector like ``mean``'s last dimension."""
        return shape_of(params[0])[-1:]

    def _check_relations(self, values: dict[str, Any]) -> None:
        """``cov`` is ``(..., d, d)`` with the ``d`` of ``mean`` (``(..., d)``)."""
        m, c = shape_of(values["mean"]), shape_of(values["cov"])
        if c[-1] != m[-1]:
            raise DistributionArgumentError(
                f"{self.name}: argument 'cov' has shape {c}, which does not match "
                f"'mean' of shape {m} (need (..., d, d) with d = {m[-1]})")



class Dirichlet(Distribution, name="dirichlet", params={"concentration": POSITIVE_VECTOR},
                reparameterized=True):
    r"""Dirichlet distribution ``dirichlet(concentration)`` on the simplex.

    ``concentration`` has shape ``(..., K)``; values have the same shape.

    .. math:: \log p(x) = \textstyle\sum_k (\alpha_k - 1)\log x_k
              + \log\Gamma(\sum_k \alpha_k) - \sum_k \log\Gamma(\alpha_k)

    Sampler: normalized gamma draws ``G_k / sum(G)``, computed as ``softmax(log G)`` with
    log-gammas that do not underflow for small concentrations (torch's Dirichlet sampler fails
    under vmap).  Reparameterized through the gamma draws.  ``logpdf`` returns one value per
    event and ``-inf`` for values with a negative entry or whose sum differs from 1 by more
    than ``K * sqrt(eps)`` of the dtype.
    """

    def sample(self, concentration: ArrayLike) -> torch.Tensor:
        """Draw one point of the simplex."""
        (alpha,) = param_tensors(concentration)
        x = torch.softmax(log_standard_gamma(alpha), dim=-1)
        return torch.clamp(x, min=torch.finfo(x.dtype).tiny)

    def logpdf(self, value: ArrayLike, concentration: ArrayLike) -> torch.Tensor:
        """Log density per event (the last dim is the simplex dim)."""
        x, alpha = param_tensors(value, concentration)
        n_cat = x.shape[-1]
        tol = n_cat * math.sqrt(torch.finfo(x.dtype).eps)
        support = ((x >= 0).all(-1)) & ((x.sum(-1) - 1).abs() <= tol)
        xs = safe(support.unsqueeze(-1), x, 1.0 / n_cat)
        lp = (
            xlogy(alpha - 1, xs).sum(-1)
            + torch.lgamma(alpha.sum(-1))
            - torch.lgamma(alpha).sum(-1)
        )
        return neg_inf_outside(support, lp)

    def event_shape(self, params: Sequence[Any]) -> tuple[int, ...]:
        """``(K,)``: one value is a point of the simplex like ``concentration``'s last dim."""
        return shape_of(params[0])[-1:]


__all__ = ["Dirichlet", "MvNormal"]
