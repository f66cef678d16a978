"""Multivariate distributions, written for ``torch.func.vmap``.

``logpdf`` returns one log density *per event*: for values of shape ``(..., d)`` the result
has the broadcast batch shape ``...``.  torch's own ``MultivariateNormal.rsample`` and
``Dirichlet`` sampling fail under vmap (DESIGN §3); these samplers are built from
``randn_like`` and vmap-safe gamma draws instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gfcomb.core.errors import DistributionArgumentError
from gfcomb.distributions.base import Distribution, as_tensor
from gfcomb.distributions.continuous import (
    ArrayLike,
    _log_standard_gamma,
    _neg_inf_outside,
    _safe,
    _tensors,
    _xlogy,
)

_LOG_2PI = math.log(2.0 * math.pi)


class MvNormal(Distribution):
    r"""Multivariate normal distribution ``mv_normal(mean, cov)``.

    ``mean`` has shape ``(..., d)``, ``cov`` shape ``(..., d, d)`` (symmetric positive
    definite); batch dims broadcast.  With ``L = cholesky(cov)`` and ``z = L^{-1}(x - mu)``:

    .. math:: \log p(x) = -\tfrac12 z^\top z - \textstyle\sum_i \log L_{ii}
              - \tfrac{d}{2}\log(2\pi)

    Sampler: ``mean + L @ eps`` with ``eps = randn_like`` (reparameterized in ``mean`` and
    ``cov``).  ``logpdf`` returns one value per event (shape: the broadcast batch shape).
    """

    name = "mv_normal"
    param_names = ("mean", "cov")
    discrete = False
    reparameterized = True

    def sample(self, mean: ArrayLike, cov: ArrayLike) -> torch.Tensor:  # type: ignore[override]
        """Draw ``mean + L @ eps``."""
        mean, cov = _tensors(mean, cov)
        chol = torch.linalg.cholesky(cov)
        batch = torch.broadcast_shapes(mean.shape[:-1], chol.shape[:-2])
        mean = mean.expand(*batch, mean.shape[-1])
        eps = torch.randn_like(mean)
        return mean + (chol @ eps.unsqueeze(-1)).squeeze(-1)

    def logpdf(  # type: ignore[override]
        self, value: ArrayLike, mean: ArrayLike, cov: ArrayLike
    ) -> torch.Tensor:
        """Log density per event (the last dim of ``value`` is the event dim)."""
        x, mean, cov = _tensors(value, mean, cov)
        chol = torch.linalg.cholesky(cov)
        diff = x - mean
        batch = torch.broadcast_shapes(diff.shape[:-1], chol.shape[:-2])
        d = diff.shape[-1]
        diff = diff.expand(*batch, d).unsqueeze(-1)
        chol = chol.expand(*batch, d, d)
        z = torch.linalg.solve_triangular(chol, diff, upper=False).squeeze(-1)
        half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * (z * z).sum(-1) - half_logdet - 0.5 * d * _LOG_2PI

    def check_args(self, *params: Any) -> None:
        """Shapes ``(..., d)`` and ``(..., d, d)`` with broadcastable batch dims; finite;
        ``cov`` symmetric positive definite."""
        self._check_arity(params)
        mean, cov = params
        self._check_finite("mean", mean)
        self._check_finite("cov", cov)
        m, c = as_tensor(mean), as_tensor(cov)
        if m.dim() < 1:
            raise DistributionArgumentError(
                f"{self.name}: argument 'mean' must have shape (..., d), got a scalar"
            )
        if c.dim() < 2 or c.shape[-1] != c.shape[-2]:
            raise DistributionArgumentError(
                f"{self.name}: argument 'cov' must be square with shape (..., d, d), "
                f"got shape {tuple(c.shape)}"
            )
        if c.shape[-1] != m.shape[-1]:
            raise DistributionArgumentError(
                f"{self.name}: argument 'cov' has shape {tuple(c.shape)}, which does not match "
                f"'mean' of shape {tuple(m.shape)} (need (..., d, d) with d = {m.shape[-1]})"
            )
        try:
            torch.broadcast_shapes(m.shape[:-1], c.shape[:-2])
        except RuntimeError:
            raise DistributionArgumentError(
                f"{self.name}: batch shapes of 'mean' {tuple(m.shape)} and 'cov' "
                f"{tuple(c.shape)} do not broadcast"
            ) from None
        m, c = _tensors(m, c)
        tol = 1e3 * torch.finfo(c.dtype).eps
        scale = torch.clamp(c.abs().amax(dim=(-2, -1), keepdim=True), min=1.0)
        if not bool(((c - c.mT).abs() <= tol * scale).all()):
            raise DistributionArgumentError(f"{self.name}: argument 'cov' must be symmetric")
        _, info = torch.linalg.cholesky_ex(c)
        if not bool((info == 0).all()):
            raise DistributionArgumentError(
                f"{self.name}: argument 'cov' must be positive definite"
            )


class Dirichlet(Distribution):
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

    name = "dirichlet"
    param_names = ("concentration",)
    discrete = False
    reparameterized = True

    def sample(self, concentration: ArrayLike) -> torch.Tensor:  # type: ignore[override]
        """Draw one point of the simplex."""
        (alpha,) = _tensors(concentration)
        x = torch.softmax(_log_standard_gamma(alpha), dim=-1)
        return torch.clamp(x, min=torch.finfo(x.dtype).tiny)

    def logpdf(  # type: ignore[override]
        self, value: ArrayLike, concentration: ArrayLike
    ) -> torch.Tensor:
        """Log density per event (the last dim is the simplex dim)."""
        x, alpha = _tensors(value, concentration)
        n_cat = x.shape[-1]
        tol = n_cat * math.sqrt(torch.finfo(x.dtype).eps)
        support = ((x >= 0).all(-1)) & ((x.sum(-1) - 1).abs() <= tol)
        xs = _safe(support.unsqueeze(-1), x, 1.0 / n_cat)
        lp = (
            _xlogy(alpha - 1, xs).sum(-1)
            + torch.lgamma(alpha.sum(-1))
            - torch.lgamma(alpha).sum(-1)
        )
        return _neg_inf_outside(support, lp)

    def check_args(self, *params: Any) -> None:
        """``concentration`` of shape ``(..., K)``, finite and positive."""
        self._check_arity(params)
        (alpha,) = params
        self._check_finite("concentration", alpha)
        t = as_tensor(alpha)
        if t.dim() < 1 or t.shape[-1] < 1:
            raise DistributionArgumentError(
                f"{self.name}: argument 'concentration' must have shape (..., K) with K >= 1, "
                f"got shape {tuple(t.shape)}"
            )
        self._check_positive("concentration", alpha)


__all__ = ["Dirichlet", "MvNormal"]
