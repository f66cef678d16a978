"""Numerical helpers of the distribution layer, written for ``torch.func.vmap``: log
densities that are ``-inf`` (not NaN) outside the support, ``xlogy``-style products, and
vmap-safe gamma samplers with reparameterization gradients (torch's own fail under vmap)."""

from __future__ import annotations

import math
from typing import Any

import torch


# ===================================================================================== helpers
def neg_inf_outside(support: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``logp`` where ``support`` holds, ``-inf`` elsewhere (broadcast)."""
    return torch.where(support, logp, torch.full_like(logp, -math.inf))


def safe(support: torch.Tensor, x: torch.Tensor, fill: float) -> torch.Tensor:
    """Replace ``x`` outside ``support`` by a harmless in-support ``fill``.

    The "double where" trick: the out-of-support branch of a later ``torch.where`` is then
    finite, so its (discarded) gradient is 0 instead of NaN.
    """
    return torch.where(support, x, torch.full_like(x, fill))


#: the longest last dim summed as a product with ones (see :func:`sum_last`)
_SHORT_SUM = 16


def sum_last(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(-1)``; for a short floating last dim computed as ``x @ ones``: torch's CPU
    reduction over a short innermost axis is about 15x slower than that product (docs/
    distributions.md, "vmap")."""
    d = x.shape[-1] if x.dim() else 0
    if 0 < d <= _SHORT_SUM and x.is_floating_point():
        return x @ torch.ones(d, dtype=x.dtype, device=x.device)
    return x.sum(-1)


def xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x * log(y)`` with ``0 * log(0) = 0``, finite gradients there (unlike ``torch.xlogy``,
    whose gradient in ``y`` is NaN at ``x = y = 0``)."""
    x, y = torch.broadcast_tensors(x, y)
    both0 = (x == 0) & (y == 0)
    return torch.xlogy(x, torch.where(both0, torch.ones_like(y), y))


def xlog1py(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x * log1p(y)`` with ``0 * log(0) = 0`` and finite gradients there."""
    x, y = torch.broadcast_tensors(x, y)
    bad = (x == 0) & (y == -1)
    return torch.special.xlog1py(x, torch.where(bad, torch.zeros_like(y), y))


def to_front(t: torch.Tensor, dim: int | None, batch_size: int) -> torch.Tensor:
    """Move a vmap batch dim to the front (or add an expanded one) -- for custom vmap rules."""
    if dim is None:
        return t.unsqueeze(0).expand(batch_size, *t.shape)
    return t.movedim(dim, 0)


def elementwise_vmap(fn: type[torch.autograd.Function], info: Any, in_dims: Any,
                     *args: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The vmap rule of an elementwise autograd function ``fn``: every argument's batch dim
    to the front (:func:`to_front`), broadcast, one call of ``fn``."""
    moved = [to_front(a, d, info.batch_size) for a, d in zip(args, in_dims)]
    return fn.apply(*torch.broadcast_tensors(*moved)), 0


class _StandardGammaGrad(torch.autograd.Function):
    """``torch._standard_gamma_grad`` with a real vmap rule.

    PyTorch has no batching rule for ``aten::_standard_gamma_grad``; under ``vmap(grad(...))``
    it falls back to a per-example loop (about 30x slower at 100k elements, plus a warning).
    The op is elementwise, so the rule is: move batch dims to the front and call it once.
    """

    @staticmethod
    def forward(alpha: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch._standard_gamma_grad(alpha, x)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # type: ignore[override]
        raise NotImplementedError(
            "gfcomb: second derivatives of gamma-based samples are not implemented"
        )

    @staticmethod
    def vmap(info: Any, in_dims: Any, alpha: torch.Tensor, x: torch.Tensor) -> Any:
        return elementwise_vmap(_StandardGammaGrad, info, in_dims, alpha, x)


class _GammaReparam(torch.autograd.Function):
    """Identity on a standard-gamma sample ``x`` that attaches the implicit reparameterization
    gradient ``dx/dalpha`` (Figurnov et al. 2018; the same formula torch uses).

    The sample itself is drawn by the native ``torch._standard_gamma`` (which handles
    ``randomness="different"`` for batched and unbatched ``alpha``); only the gradient goes
    through here, so that ``vmap(grad(...))`` stays vectorized.
    """

    @staticmethod
    def forward(alpha: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # type: ignore[override]
        alpha, x = ctx.saved_tensors
        return grad * _StandardGammaGrad.apply(alpha, x), None

    @staticmethod
    def vmap(info: Any, in_dims: Any, alpha: torch.Tensor, x: torch.Tensor) -> Any:
        return elementwise_vmap(_GammaReparam, info, in_dims, alpha, x)


def standard_gamma(alpha: torch.Tensor) -> torch.Tensor:
    """A Gamma(alpha, 1) draw, reparameterized, vmap-safe, clamped to ``finfo.tiny``.

    Draws exactly what ``torch.distributions.Gamma(alpha, 1).rsample()`` draws under the same
    seed, with the same gradient.
    """
    x = torch._standard_gamma(alpha.detach())
    x = _GammaReparam.apply(alpha, x)
    return torch.clamp(x, min=torch.finfo(x.dtype).tiny)


def log_standard_gamma(alpha: torch.Tensor) -> torch.Tensor:
    """``log`` of a Gamma(alpha, 1) draw, computed without underflow for small ``alpha``.

    Uses the boosting identity ``G(alpha) = G(alpha + 1) * U ** (1 / alpha)`` (valid for every
    alpha > 0), so ``log G = log G(alpha + 1) + log(U) / alpha`` stays finite even where
    ``G(alpha)`` itself underflows (alpha << 1).  Reparameterized in ``alpha``.
    """
    u = 1.0 - torch.rand_like(alpha)  # in (0, 1]
    return torch.log(standard_gamma(alpha + 1.0)) + torch.log(u) / alpha


def uniform_open(like: torch.Tensor) -> torch.Tensor:
    """Uniform noise in ``(0, 1)`` (both ends excluded), shaped like ``like``."""
    eps = torch.finfo(like.dtype).eps
    return torch.clamp(torch.rand_like(like), min=eps, max=1.0 - eps)
