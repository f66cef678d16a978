"""Wrap any ``torch.distributions.Distribution`` class as a gfcomb distribution.

Example::

    import torch
    from gfcomb.distributions.wrapper import TorchDistribution

    gumbel = TorchDistribution(torch.distributions.Gumbel)      # gumbel(loc, scale)
    x = gumbel.sample(0.0, 1.0)
    lp = gumbel.logpdf(x, 0.0, 1.0)

Caveats -- prefer the built-in distributions where one exists:

- Some torch samplers do **not** work under ``torch.func.vmap`` (measured on torch 2.13,
  DESIGN §3): ``Normal.rsample`` and ``MultivariateNormal.rsample`` (in-place randomness into
  an unbatched tensor), ``Beta`` and ``Dirichlet`` sampling (an ``autograd.Function``
  without ``setup_context``), and other samplers that draw in place into a fresh tensor
  (measured: ``Exponential``, ``Cauchy``, ``Laplace`` rsample).  ``Gamma.rsample`` works but
  falls back to a slow per-element loop (warning) for its in-place clamp and its gradient.
  Such a wrapped distribution works outside vmap only, so it cannot be used inside a
  Map/Unfold kernel.  ``sample`` (no ``rsample``) often *is* vmap-safe: pass
  ``reparameterized=False`` to use it (e.g. ``Normal.sample`` works under vmap).
- ``log_prob`` is called with ``validate_args=False`` (torch's validation calls ``.item()``,
  which fails under vmap), so out-of-support values are not turned into errors; whether they
  give ``-inf`` or garbage depends on the torch class.  Use :meth:`check_args` outside vmap.
- ``logpdf`` is whatever ``log_prob`` returns: per event for multivariate classes.
- Values keep torch's dtypes (e.g. Poisson and Binomial give floating counts).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

import torch

from gfcomb.core.errors import DistributionArgumentError
from gfcomb.distributions.base import Distribution
from gfcomb.distributions.continuous import param_tensors


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _constructor_params(dist_cls: type) -> tuple[tuple[str, ...], int]:
    """Positional constructor parameters (minus ``validate_args``) and how many are required."""
    sig = inspect.signature(dist_cls.__init__)  # type: ignore[misc]
    names: list[str] = []
    required = 0
    for p in list(sig.parameters.values())[1:]:
        if p.name == "validate_args" or p.kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            continue
        names.append(p.name)
        if p.default is inspect.Parameter.empty:
            required += 1
    return tuple(names), required


def _is_discrete(dist_cls: type) -> bool:
    support = getattr(dist_cls, "support", None)
    try:
        return bool(support.is_discrete)  # type: ignore[union-attr]
    except (AttributeError, NotImplementedError):
        return False


class TorchDistribution(Distribution):
    r"""A gfcomb distribution backed by a ``torch.distributions.Distribution`` class.

    The density is the torch class's: :math:`\log p(x) = \texttt{dist\_cls(*params).log\_prob}(x)`.

    Args:
        dist_cls: the torch distribution class, e.g. ``torch.distributions.Gumbel``.
        name: the distribution's name (default: the class name in snake case, ``"gumbel"``).
        discrete: whether values are discrete (default: ``dist_cls.support.is_discrete``
            where torch knows it, else ``False``).
        reparameterized: sample with ``rsample`` (pathwise gradients) if ``True``, with
            ``sample`` under ``torch.no_grad`` if ``False`` (default: ``dist_cls.has_rsample``).
            ``Normal.rsample`` fails under vmap but ``Normal.sample`` does not.
        param_names: the parameter names, in positional order (default: the constructor's
            positional parameters minus ``validate_args``; trailing parameters with defaults
            -- e.g. ``StudentT``'s ``loc, scale``, ``Bernoulli``'s ``logits`` -- may be left
            out when calling).

    Parameters are passed positionally in the constructor's order: ``Bernoulli`` gets
    ``probs`` first, so ``TorchDistribution(torch.distributions.Bernoulli).sample(0.3)``
    works; for a logits parametrization pass ``None`` first (not under vmap).  See the module
    docstring for which torch samplers fail under vmap.
    """

    def __init__(
        self,
        dist_cls: type[torch.distributions.Distribution],
        name: str | None = None,
        discrete: bool | None = None,
        reparameterized: bool | None = None,
        param_names: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        if not (
            isinstance(dist_cls, type) and issubclass(dist_cls, torch.distributions.Distribution)
        ):
            raise TypeError(
                f"TorchDistribution needs a torch.distributions.Distribution subclass, "
                f"got {dist_cls!r}"
            )
        self.dist_cls = dist_cls
        self.name = name if name is not None else _snake_case(dist_cls.__name__)
        names, required = _constructor_params(dist_cls)
        if param_names is not None:
            names, required = tuple(param_names), len(param_names)
        self.param_names = names
        self._n_required = required
        self.discrete = _is_discrete(dist_cls) if discrete is None else bool(discrete)
        self.reparameterized = (
            bool(getattr(dist_cls, "has_rsample", False))
            if reparameterized is None
            else bool(reparameterized)
        )

    def __repr__(self) -> str:
        return f"TorchDistribution({self.dist_cls.__module__}.{self.dist_cls.__qualname__})"

    def _make(
        self, params: tuple[Any, ...], validate_args: bool = False
    ) -> torch.distributions.Distribution:
        """Instantiate the torch class; parameters become tensors of one dtype/device."""
        given = [p for p in params if p is not None]
        tensors = iter(param_tensors(*given))
        converted = [None if p is None else next(tensors) for p in params]
        ctor: Any = self.dist_cls
        return ctor(*converted, validate_args=validate_args)

    def _prepare(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Parameters as given (``None`` picks another parametrization; :meth:`_make`
        converts the others)."""
        return args

    def value_shape(self, params: Sequence[Any]) -> tuple[int, ...]:
        """``batch_shape + event_shape`` of the torch distribution built from ``params``."""
        d = self._make(tuple(params))
        return tuple(d.batch_shape) + tuple(d.event_shape)

    def sample(self, *params: Any) -> torch.Tensor:
        """Draw one value: ``rsample()`` if reparameterized, else ``sample()`` without grad."""
        d = self._make(params)
        if self.reparameterized:
            return d.rsample()
        with torch.no_grad():
            return d.sample()

    def logpdf(self, value: Any, *params: Any) -> torch.Tensor:
        """``dist_cls(*params, validate_args=False).log_prob(value)``."""
        if not isinstance(value, torch.Tensor):
            ref = param_tensors(*[p for p in params if p is not None])
            device = ref[0].device if ref else None
            value = torch.as_tensor(value, device=device)
            if value.is_floating_point() and ref:
                value = value.to(ref[0].dtype)
        return self._make(params).log_prob(value)

    def check_args(self, *params: Any) -> None:
        """Arity, finiteness, and torch's own argument validation (outside vmap only)."""
        n = len(params)
        if not self._n_required <= n <= len(self.param_names):
            raise DistributionArgumentError(
                f"{self.name} takes {self._n_required} to {len(self.param_names)} argument(s) "
                f"({', '.join(self.param_names)}), got {n}"
            )
        for pname, p in zip(self.param_names, params):
            if p is not None:
                self._check_finite(pname, p)
        try:
            self._make(params, validate_args=True)
        except ValueError as e:
            raise DistributionArgumentError(f"{self.name}: {e}") from None


__all__ = ["TorchDistribution"]
