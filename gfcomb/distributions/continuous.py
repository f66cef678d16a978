"""Univariate continuous distributions, written for ``torch.func.vmap``.

Every sampler here

- allocates its noise with ``torch.randn_like`` / ``torch.rand_like`` (or a native random op
  that has a vmap batching rule, ``torch._standard_gamma``) *after* broadcasting the
  parameters, so it works under ``vmap(..., randomness="different")`` with batched or
  unbatched parameters, and on any device;
- has no ``.item()``, no Python ``if`` on tensor values and no in-place writes;
- is *reparameterized*: the sample is a differentiable function of the parameters (pathwise
  gradients), also under ``torch.func.grad`` and ``vmap(grad(...))``.  Gamma-based samples
  (gamma, inv_gamma, beta, student_t, dirichlet) support first derivatives only, with
  torch's implicit gamma gradient (an approximation good to about 2e-4 relative).

Every ``logpdf`` is elementwise in the broadcast shape of value and parameters, exact (written
with ``lgamma``/``log1p``/``xlogy``), differentiable in value and parameters, and returns
``-inf`` (not NaN) outside the support.

Parameter conventions are those of ``torch.distributions``.  Python numbers are turned into
tensors of the floating dtype and device of the tensor parameters (default dtype if none).

The numerical helpers they share with :mod:`.discrete` and :mod:`.multivariate` live in
:mod:`.numerics`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch._C import _functorch

from gfcomb.distributions.base import Distribution
from gfcomb.distributions.numerics import (
    log_standard_gamma,
    neg_inf_outside,
    safe,
    standard_gamma,
    uniform_open,
    xlog1py,
    xlogy,
)
from gfcomb.distributions.params import (
    POSITIVE,
    REAL,
    ArrayLike,
    broadcast_params,
    constant_tensor,
    constant_value,
    param_tensors,
)

_LOG_2PI = math.log(2.0 * math.pi)
_HALF_LOG_2PI = 0.5 * _LOG_2PI
_LOG_PI = math.log(math.pi)


# ============================================================================= distributions
class Normal(Distribution, samples_per_element=True,
             name="normal", params={"loc": REAL, "scale": POSITIVE},
             reparameterized=True):
    r"""Normal distribution ``normal(loc, scale)``.

    .. math:: \log p(x) = -\tfrac12 \left(\frac{x-\mu}{\sigma}\right)^2 - \log\sigma
              - \tfrac12\log(2\pi)

    Sampler: ``loc + scale * randn_like`` (reparameterized).  Support: all reals.
    """

    def sample(self, loc: ArrayLike, scale: ArrayLike) -> torch.Tensor:
        """Draw ``loc + scale * eps`` with ``eps ~ N(0, 1)``."""
        loc, scale = param_tensors(loc, scale)
        if scale.dim() == 0:  # (a scalar scale already fits loc)
            return _shifted_noise(loc, scale)[1]
        loc, scale = broadcast_params(loc, scale)
        return loc + scale * torch.randn_like(loc)

    def _batch_draw(self, params: tuple[Any, ...], n: int,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale = params
        if self._fused and loc.shape == (n,) and scale.dim() == 0:
            # (the noise has loc's shape, one per row: no need to expand the scale)
            both = self._draw_scored(loc, scale)
            assert both is not None  # (a scalar scale)
            return both
        return super()._batch_draw(params, n)

    def sample_with_logpdf(self, loc: ArrayLike,
                           scale: ArrayLike) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``loc + scale * eps`` and its log density from ``eps`` itself,
        −eps²/2 − log σ − log(2π)/2 (no subtraction and division to recover it): three tensor
        operations in all.  None when ``scale`` is not a scalar (then sample, then score)."""
        return self._draw_scored(*param_tensors(loc, scale))

    def _draw_scored(self, loc: torch.Tensor,
                     scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if scale.dim() != 0:
            return None
        eps, value = _shifted_noise(loc, scale)
        return value, torch.addcmul(_neg_log_normalizer(scale), eps, eps, value=-0.5)

    def logpdf(self, value: ArrayLike, loc: ArrayLike, scale: ArrayLike) -> torch.Tensor:
        """Elementwise log density (−z²/2 − log σ − log(2π)/2 as one ``addcmul``)."""
        return self._logpdf_prepared(*param_tensors(value, loc, scale))

    def _logpdf_prepared(self, x: torch.Tensor, loc: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
        s = constant_value(scale)
        if s is not None and s > 0 and scale.dim() == 0:  # 1/σ² in Python
            z = x - loc
            return torch.addcmul(_neg_log_normalizer(scale), z, z, value=-0.5 / (s * s))
        z = (x - loc) / scale
        return torch.addcmul(_neg_log_normalizer(scale), z, z, value=-0.5)


def _shifted_noise(loc: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eps, loc + scale * eps)`` with ``eps ~ N(0, 1)`` shaped like ``loc``, for a scalar
    ``scale``: the one Normal draw of ``sample`` and the fused ``simulate`` (one operation
    after the noise; ``alpha`` for a Python-number scale)."""
    eps = torch.randn_like(loc)
    s = constant_value(scale)
    return eps, (torch.add(loc, eps, alpha=s) if s is not None
                 else torch.addcmul(loc, scale, eps))


_NEG_LOG_NORMALIZERS: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}


def _neg_log_normalizer(scale: torch.Tensor) -> torch.Tensor:
    """−(log σ + log(2π)/2), the Normal's log normalizer, as a tensor.

    A cached constant for a Python-number σ; cached per plain tensor σ that needs no grad
    (keyed by identity and version counter, so an in-place change of σ is seen, as autograd
    sees it -- writes through ``.data`` are not, for autograd either: a particle filter
    passes the same σ every step); otherwise computed (σ batched by vmap, differentiated, or
    an inference-mode tensor, which has no version counter).
    """
    hit = _NEG_LOG_NORMALIZERS.get(id(scale))
    if hit is not None and hit[0] is scale and hit[1] == scale._version:
        return hit[2]
    s = constant_value(scale)
    if s is not None and s > 0:
        out = constant_tensor(-(math.log(s) + _HALF_LOG_2PI), scale.dtype, scale.device)
    elif (scale.requires_grad or _functorch.is_functorch_wrapped_tensor(scale)
            or torch.is_inference_mode_enabled() or scale.is_inference()):
        return torch.log(scale).add_(_HALF_LOG_2PI).neg_()
    else:
        out = torch.log(scale).add_(_HALF_LOG_2PI).neg_()
    if len(_NEG_LOG_NORMALIZERS) > 256:
        _NEG_LOG_NORMALIZERS.clear()
    _NEG_LOG_NORMALIZERS[id(scale)] = (scale, scale._version, out)
    return out


class Uniform(Distribution, samples_per_element=True,
              name="uniform", params={"low": REAL, "high": REAL},
              relations=(("low", "<", "high"),), reparameterized=True):
    r"""Continuous uniform distribution ``uniform(low, high)`` on the closed interval.

    .. math:: \log p(x) = -\log(\mathrm{high} - \mathrm{low}) \quad
              \text{for } \mathrm{low} \le x \le \mathrm{high}, \; -\infty \text{ otherwise.}

    Sampler: ``low + (high - low) * rand_like`` (reparameterized).  Unlike torch (half-open
    ``[low, high)``) the log density is finite at ``x == high`` too, as in Gen.jl/scipy.
    """

    def sample(self, low: ArrayLike, high: ArrayLike) -> torch.Tensor:
        """Draw ``low + (high - low) * U`` with ``U ~ U[0, 1)``."""
        low, high = broadcast_params(low, high)
        return low + (high - low) * torch.rand_like(low)

    def logpdf(self, value: ArrayLike, low: ArrayLike, high: ArrayLike) -> torch.Tensor:
        """Elementwise log density (``-inf`` outside ``[low, high]``)."""
        x, low, high = param_tensors(value, low, high)
        support = (x >= low) & (x <= high)
        return neg_inf_outside(support, -torch.log(high - low))



class Beta(Distribution, samples_per_element=True,
           name="beta",
           params={"concentration1": POSITIVE, "concentration0": POSITIVE}, reparameterized=True):
    r"""Beta distribution ``beta(concentration1, concentration0)`` (torch naming: ``a, b``).

    .. math:: \log p(x) = (a-1)\log x + (b-1)\log(1-x) - \log B(a, b), \quad 0 \le x \le 1

    Sampler: ``X / (X + Y)`` with ``X ~ Gamma(a)``, ``Y ~ Gamma(b)``, computed as
    ``sigmoid(log X - log Y)`` with log-gammas that do not underflow for small concentrations;
    reparameterized through the gamma draws (torch's own Beta sampler fails under vmap).
    Samples are clamped to ``[tiny, 1 - eps/2]`` so that the log density stays finite.
    """

    def sample(self, concentration1: ArrayLike, concentration0: ArrayLike) -> torch.Tensor:
        """Draw one Beta value via two (log-)gamma draws."""
        a, b = broadcast_params(concentration1, concentration0)
        x = torch.sigmoid(log_standard_gamma(a) - log_standard_gamma(b))
        fi = torch.finfo(x.dtype)
        return torch.clamp(x, min=fi.tiny, max=1.0 - fi.eps / 2)

    def logpdf(self, value: ArrayLike, concentration1: ArrayLike,
               concentration0: ArrayLike) -> torch.Tensor:
        """Elementwise log density (``-inf`` outside ``[0, 1]``)."""
        x, a, b = param_tensors(value, concentration1, concentration0)
        support = (x >= 0) & (x <= 1)
        xs = safe(support, x, 0.5)
        lbeta = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
        lp = xlogy(a - 1, xs) + xlog1py(b - 1, -xs) - lbeta
        return neg_inf_outside(support, lp)



class Gamma(Distribution, samples_per_element=True,
            name="gamma", params={"concentration": POSITIVE, "rate": POSITIVE},
            reparameterized=True):
    r"""Gamma distribution ``gamma(concentration, rate)`` (shape ``k``, rate ``\beta``).

    .. math:: \log p(x) = k\log\beta + (k-1)\log x - \beta x - \log\Gamma(k), \quad x \ge 0

    Sampler: ``torch._standard_gamma(k) / rate`` with the implicit reparameterization
    gradient (identical draws and gradients to ``torch.distributions.Gamma.rsample`` under the
    same seed), but with a vectorized vmap rule for the gradient.  Clamped to ``finfo.tiny``.
    """

    def sample(self, concentration: ArrayLike, rate: ArrayLike) -> torch.Tensor:
        """Draw ``G / rate`` with ``G ~ Gamma(concentration, 1)``."""
        k, rate = broadcast_params(concentration, rate)
        x = standard_gamma(k) / rate
        return torch.clamp(x, min=torch.finfo(x.dtype).tiny)

    def logpdf(self, value: ArrayLike, concentration: ArrayLike, rate: ArrayLike) -> torch.Tensor:
        """Elementwise log density (``-inf`` for ``x < 0``)."""
        x, k, rate = param_tensors(value, concentration, rate)
        support = x >= 0
        xs = safe(support, x, 1.0)
        lp = k * torch.log(rate) + xlogy(k - 1, xs) - rate * xs - torch.lgamma(k)
        return neg_inf_outside(support, lp)



class InvGamma(Distribution, samples_per_element=True,
               name="inv_gamma", params={"concentration": POSITIVE, "rate": POSITIVE},
               reparameterized=True):
    r"""Inverse-gamma distribution ``inv_gamma(concentration, rate)``: the law of ``1/X`` for
    ``X ~ Gamma(concentration, rate)``.  (So ``rate`` is the *scale* of the inverse gamma;
    scipy: ``invgamma(a=concentration, scale=rate)``.)

    .. math:: \log p(y) = k\log\beta - \log\Gamma(k) - (k+1)\log y - \beta / y, \quad y > 0

    Sampler: ``rate / G`` with ``G ~ Gamma(k, 1)`` (reparameterized).
    """

    def sample(self, concentration: ArrayLike, rate: ArrayLike) -> torch.Tensor:
        """Draw ``rate / G`` with ``G ~ Gamma(concentration, 1)``."""
        k, rate = broadcast_params(concentration, rate)
        return rate / standard_gamma(k)

    def logpdf(self, value: ArrayLike, concentration: ArrayLike, rate: ArrayLike) -> torch.Tensor:
        """Elementwise log density (``-inf`` for ``y <= 0``)."""
        y, k, rate = param_tensors(value, concentration, rate)
        support = y > 0
        ys = safe(support, y, 1.0)
        lp = k * torch.log(rate) - torch.lgamma(k) - (k + 1) * torch.log(ys) - rate / ys
        return neg_inf_outside(support, lp)



class Exponential(Distribution, samples_per_element=True,
                  name="exponential", params={"rate": POSITIVE},
                  reparameterized=True):
    r"""Exponential distribution ``exponential(rate)``.

    .. math:: \log p(x) = \log\lambda - \lambda x, \quad x \ge 0

    Sampler: inverse CDF ``-log1p(-U) / rate`` (reparameterized).
    """

    def sample(self, rate: ArrayLike) -> torch.Tensor:
        """Draw ``-log(1 - U) / rate``."""
        (rate,) = param_tensors(rate)
        return -torch.log1p(-torch.rand_like(rate)) / rate

    def logpdf(self, value: ArrayLike, rate: ArrayLike) -> torch.Tensor:
        """Elementwise log density (``-inf`` for ``x < 0``)."""
        x, rate = param_tensors(value, rate)
        support = x >= 0
        xs = safe(support, x, 1.0)
        return neg_inf_outside(support, torch.log(rate) - rate * xs)



class Laplace(Distribution, samples_per_element=True,
              name="laplace", params={"loc": REAL, "scale": POSITIVE},
              reparameterized=True):
    r"""Laplace distribution ``laplace(loc, scale)``.

    .. math:: \log p(x) = -\log(2b) - |x - \mu| / b

    Sampler: inverse CDF ``loc - scale * sign(u) * log1p(-|u|)``, ``u ~ U(eps - 1, 1)``
    (torch's formula, reparameterized).
    """

    def sample(self, loc: ArrayLike, scale: ArrayLike) -> torch.Tensor:
        """Draw by inverse CDF."""
        loc, scale = broadcast_params(loc, scale)
        eps = torch.finfo(loc.dtype).eps
        u = torch.rand_like(loc) * (2.0 - eps) + (eps - 1.0)
        return loc - scale * torch.sign(u) * torch.log1p(-torch.abs(u))

    def logpdf(self, value: ArrayLike, loc: ArrayLike, scale: ArrayLike) -> torch.Tensor:
        """Elementwise log density."""
        x, loc, scale = param_tensors(value, loc, scale)
        return -math.log(2.0) - torch.log(scale) - torch.abs(x - loc) / scale



class Cauchy(Distribution, samples_per_element=True,
             name="cauchy", params={"loc": REAL, "scale": POSITIVE},
             reparameterized=True):
    r"""Cauchy distribution ``cauchy(loc, scale)``.

    .. math:: \log p(x) = -\log\pi - \log\gamma - \log\left(1 + ((x-x_0)/\gamma)^2\right)

    Sampler: inverse CDF ``loc + scale * tan(pi * (U - 1/2))`` with ``U`` in ``(0, 1)``
    (reparameterized).
    """

    def sample(self, loc: ArrayLike, scale: ArrayLike) -> torch.Tensor:
        """Draw by inverse CDF."""
        loc, scale = broadcast_params(loc, scale)
        return loc + scale * torch.tan(math.pi * (uniform_open(loc) - 0.5))

    def logpdf(self, value: ArrayLike, loc: ArrayLike, scale: ArrayLike) -> torch.Tensor:
        """Elementwise log density."""
        x, loc, scale = param_tensors(value, loc, scale)
        z = (x - loc) / scale
        return -_LOG_PI - torch.log(scale) - torch.log1p(z * z)



class StudentT(Distribution, samples_per_element=True,
               name="student_t",
               params={"df": POSITIVE, "loc": REAL, "scale": POSITIVE}, reparameterized=True):
    r"""Student's t distribution ``student_t(df, loc, scale)`` (all three positional; use
    ``loc=0, scale=1`` for the standard one).

    .. math:: \log p(x) = \log\Gamma\!\left(\tfrac{\nu+1}{2}\right)
              - \log\Gamma\!\left(\tfrac{\nu}{2}\right) - \tfrac12\log(\nu\pi) - \log\sigma
              - \tfrac{\nu+1}{2}\log\!\left(1 + \tfrac{1}{\nu}\left(\tfrac{x-\mu}{\sigma}
              \right)^2\right)

    Sampler: ``loc + scale * Z / sqrt(2 G / df)`` with ``Z ~ N(0, 1)``, ``G ~ Gamma(df/2, 1)``
    (so ``2G`` is chi-square with ``df`` degrees of freedom); reparameterized in all three.
    """

    def sample(self, df: ArrayLike, loc: ArrayLike, scale: ArrayLike) -> torch.Tensor:
        """Draw a normal over the square root of a scaled chi-square."""
        df, loc, scale = broadcast_params(df, loc, scale)
        z = torch.randn_like(loc)
        chi2 = 2.0 * standard_gamma(0.5 * df)
        return loc + scale * z * torch.rsqrt(chi2 / df)

    def logpdf(self, value: ArrayLike, df: ArrayLike, loc: ArrayLike,
               scale: ArrayLike) -> torch.Tensor:
        """Elementwise log density."""
        x, df, loc, scale = param_tensors(value, df, loc, scale)
        z = (x - loc) / scale
        return (
            torch.lgamma(0.5 * (df + 1))
            - torch.lgamma(0.5 * df)
            - 0.5 * (torch.log(df) + _LOG_PI)
            - torch.log(scale)
            - 0.5 * (df + 1) * torch.log1p(z * z / df)
        )



class HalfNormal(Distribution, samples_per_element=True,
                 name="half_normal", params={"scale": POSITIVE},
                 reparameterized=True):
    r"""Half-normal distribution ``half_normal(scale)``: ``|X|`` for ``X ~ N(0, scale)``.

    .. math:: \log p(x) = \tfrac12\log(2/\pi) - \log\sigma - x^2/(2\sigma^2), \quad x \ge 0

    Sampler: ``|scale * randn_like|`` (reparameterized).
    """

    def sample(self, scale: ArrayLike) -> torch.Tensor:
        """Draw ``|scale * eps|``."""
        (scale,) = param_tensors(scale)
        return torch.abs(scale * torch.randn_like(scale))

    def logpdf(self, value: ArrayLike, scale: ArrayLike) -> torch.Tensor:
        """Elementwise log density (``-inf`` for ``x < 0``)."""
        x, scale = param_tensors(value, scale)
        support = x >= 0
        z = safe(support, x, 0.0) / scale
        lp = 0.5 * (math.log(2.0) - _LOG_PI) - torch.log(scale) - 0.5 * z * z
        return neg_inf_outside(support, lp)



class LogNormal(Distribution, samples_per_element=True,
                name="log_normal", params={"loc": REAL, "scale": POSITIVE},
                reparameterized=True):
    r"""Log-normal distribution ``log_normal(loc, scale)``: ``exp(X)`` for ``X ~ N(loc, scale)``.

    .. math:: \log p(x) = -\tfrac12\left(\frac{\log x - \mu}{\sigma}\right)^2 - \log\sigma
              - \tfrac12\log(2\pi) - \log x, \quad x > 0

    Sampler: ``exp(loc + scale * randn_like)`` (reparameterized).
    """

    def sample(self, loc: ArrayLike, scale: ArrayLike) -> torch.Tensor:
        """Draw ``exp(loc + scale * eps)``."""
        loc, scale = broadcast_params(loc, scale)
        return torch.exp(loc + scale * torch.randn_like(loc))

    def logpdf(self, value: ArrayLike, loc: ArrayLike, scale: ArrayLike) -> torch.Tensor:
        """Elementwise log density (``-inf`` for ``x <= 0``)."""
        x, loc, scale = param_tensors(value, loc, scale)
        support = x > 0
        logx = torch.log(safe(support, x, 1.0))
        z = (logx - loc) / scale
        lp = -0.5 * z * z - torch.log(scale) - 0.5 * _LOG_2PI - logx
        return neg_inf_outside(support, lp)



class HalfCauchy(Distribution, samples_per_element=True,
                 name="half_cauchy", params={"scale": POSITIVE},
                 reparameterized=True):
    r"""Half-Cauchy distribution ``half_cauchy(scale)``: ``|X|`` for ``X ~ Cauchy(0, scale)``.

    .. math:: \log p(x) = \log 2 - \log\pi - \log\gamma - \log(1 + (x/\gamma)^2), \quad x \ge 0

    Sampler: inverse CDF ``scale * tan(pi U / 2)`` with ``U`` in ``(0, 1)``
    (reparameterized).
    """

    def sample(self, scale: ArrayLike) -> torch.Tensor:
        """Draw by inverse CDF."""
        (scale,) = param_tensors(scale)
        return scale * torch.tan(0.5 * math.pi * uniform_open(scale))

    def logpdf(self, value: ArrayLike, scale: ArrayLike) -> torch.Tensor:
        """Elementwise log density (``-inf`` for ``x < 0``)."""
        x, scale = param_tensors(value, scale)
        support = x >= 0
        z = safe(support, x, 0.0) / scale
        lp = math.log(2.0) - _LOG_PI - torch.log(scale) - torch.log1p(z * z)
        return neg_inf_outside(support, lp)



class Weibull(Distribution, samples_per_element=True,
              name="weibull", params={"scale": POSITIVE, "concentration": POSITIVE},
              reparameterized=True):
    r"""Weibull distribution ``weibull(scale, concentration)`` (torch's argument order).

    .. math:: \log p(x) = \log k - \log\lambda + (k-1)\log(x/\lambda) - (x/\lambda)^k,
              \quad x \ge 0

    Sampler: inverse CDF ``scale * E ** (1/k)`` with ``E = -log(1 - U)`` exponential
    (computed in log space; reparameterized).
    """

    def sample(self, scale: ArrayLike, concentration: ArrayLike) -> torch.Tensor:
        """Draw by inverse CDF."""
        scale, k = broadcast_params(scale, concentration)
        e = torch.clamp(-torch.log1p(-torch.rand_like(scale)), min=torch.finfo(scale.dtype).tiny)
        return scale * torch.exp(torch.log(e) / k)

    def logpdf(self, value: ArrayLike, scale: ArrayLike, concentration: ArrayLike) -> torch.Tensor:
        """Elementwise log density (``-inf`` for ``x < 0``)."""
        x, scale, k = param_tensors(value, scale, concentration)
        support = x >= 0
        z = safe(support, x, 1.0) / scale
        lp = torch.log(k) - torch.log(scale) + xlogy(k - 1, z) - torch.pow(z, k)
        return neg_inf_outside(support, lp)



__all__ = [
    "Beta",
    "Cauchy",
    "Exponential",
    "Gamma",
    "HalfCauchy",
    "HalfNormal",
    "InvGamma",
    "Laplace",
    "LogNormal",
    "Normal",
    "StudentT",
    "Uniform",
    "Weibull",
]
