"""Variational inference: ELBO and IWAE estimators with pathwise, score-function (with a
baseline) and VIMCO gradients, and :func:`fit_vi`, a ``torch.optim`` loop over them.

A *guide* is any generative function whose choices sit at latent addresses of the model
(``@gen`` functions with torch modules for amortized guides, combinators, custom ones).  One
estimate draws ``n_samples`` guide traces in ONE ``batch_generate`` call and scores them
under the model with ONE ``batch_generate`` call (observations ∪ guide choices as
constraints).  The estimate is an ordinary differentiable scalar: ``(-elbo(...)).backward()``
puts an unbiased gradient estimate into the ``.grad`` of the guide's parameters (its torch
modules and any tensor argument with ``requires_grad``) and of the model's.

Estimators (``estimator=``):

* ``"reparam"`` — pathwise: every guide choice must be reparameterized (its value carries a
  gradient to the parameters: gfcomb's continuous distributions sample that way);
* ``"score"`` — score function (REINFORCE): the choices are drawn without gradient and
  ∇ log q(z) is weighted by the centred learning signal; the baseline is the leave-one-out
  mean of the other samples' signals when ``n_samples > 1``, else ``baseline`` (``fit_vi``
  passes a running average);
* ``"auto"`` — pathwise for the choices whose values carry a gradient, score function for the
  others (discrete choices), in one surrogate (as Pyro's ``Trace_ELBO``).

For :func:`iwae_bound` with score-function choices the control variate is VIMCO's
leave-one-out (Mnih & Rezende, 2016).  The returned value always equals the plain estimate;
the score-function terms only add gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import torch

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError
from gfcomb.core.gfi import GenerativeFunction, as_choicemap, check_args_tuple
from gfcomb.core.selection import Selection
from gfcomb.core.vmap import PerRow
from gfcomb.inference.breadth import (
    PatternSelection,
    check_positive_int,
    show_address,
    vmapped,
)
from gfcomb.inference.importance import check_gen_fn, merged_rows
from gfcomb.inference.progress import progress_bar

__all__ = ["ESTIMATORS", "VIResult", "elbo", "fit_vi", "iwae_bound"]

#: The gradient estimators accepted by ``estimator=``.
ESTIMATORS = ("auto", "reparam", "score")


@attrs.frozen
class VIResult:
    """What :func:`fit_vi` returns: ``losses`` (the negative objective estimate at every
    step, a list of floats) and the ``guide`` (whose parameters were trained in place)."""

    losses: list[float]
    guide: GenerativeFunction

    @property
    def final_loss(self) -> float:
        """The loss of the last step (NaN when no step was taken)."""
        return self.losses[-1] if self.losses else float("nan")


@attrs.frozen
class _Weights:
    """One batch of importance weights: log w = log p(x, y) − log q(x) per sample, and the
    guide log density of the score-function choices (None when every choice is pathwise)."""

    log_w: torch.Tensor
    log_q_score: torch.Tensor | None


def _check_estimator(estimator: Any, who: str) -> str:
    if estimator not in ESTIMATORS:
        raise ArgumentError(f"{who}: estimator must be one of {', '.join(map(repr, ESTIMATORS))}"
                            f", got {estimator!r}")
    return str(estimator)


def _carries_gradient(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _weights(model: GenerativeFunction, model_args: tuple[Any, ...], observations: ChoiceMap,
             guide: GenerativeFunction, guide_args: tuple[Any, ...], n: int, estimator: str,
             who: str) -> _Weights:
    """Draw ``n`` guide traces and score them under the model (see the module docstring)."""

    if estimator == "score":
        with torch.no_grad():
            drawn = guide.batch_generate(n, guide_args, None)[0].choices
        _, log_q = guide.batch_generate(n, guide_args, PerRow(drawn))
        _, log_p = model.batch_generate(n, model_args, merged_rows(observations, drawn, n))
        return _Weights(log_p - log_q, log_q)

    traces, _ = guide.batch_generate(n, guide_args, None)
    _, log_p = model.batch_generate(n, model_args, merged_rows(observations, traces.choices, n))
    log_w = log_p - traces.score
    if not torch.is_grad_enabled():
        return _Weights(log_w, None)
    items = list(traces.choices.items(stacked=True))
    if not items:
        raise ArgumentError(f"{who}: the guide makes no random choice")
    non_pathwise = [addr for addr, v in items if not _carries_gradient(v)]
    if not non_pathwise:
        return _Weights(log_w, None)
    if len(non_pathwise) == len(items):
        log_q_score = traces.score
    else:
        sel: Selection = PatternSelection(non_pathwise)
        log_q_score = vmapped(lambda t: guide.project(t, sel), who)(traces)
    if not log_q_score.requires_grad:  # q of those choices has no parameter to learn
        return _Weights(log_w, None)
    if estimator == "reparam":
        raise ArgumentError(
            f"{who}: estimator='reparam' needs every guide choice to be reparameterized, but "
            f"the value at address {show_address(non_pathwise[0])} carries no gradient (a "
            "discrete choice?) while its density depends on parameters; use "
            "estimator='auto' or 'score'")
    return _Weights(log_w, log_q_score)


def _prepare(model: Any, model_args: Any, observations: Any, guide: Any, guide_args: Any,
             n_samples: Any, estimator: Any, who: str,
             ) -> tuple[tuple[Any, ...], ChoiceMap, tuple[Any, ...], int, str]:
    check_gen_fn(model, "model", who)
    check_gen_fn(guide, "guide", who)
    model_args = check_args_tuple(model_args, "model_args")
    guide_args = check_args_tuple(guide_args, "guide_args")
    n = check_positive_int(n_samples, "n_samples", who)
    return model_args, as_choicemap(observations), guide_args, n, _check_estimator(estimator,
                                                                                  who)


def _centred(log_w: torch.Tensor, baseline: Any) -> torch.Tensor:
    """The learning signal of each sample minus its baseline (leave-one-out mean for n > 1)."""
    f = log_w.detach()
    n = f.shape[0]
    if n > 1:
        return f - (f.sum() - f) / (n - 1)
    b = 0.0 if baseline is None else baseline
    return f - torch.as_tensor(b, dtype=f.dtype, device=f.device).detach()


def elbo(model: GenerativeFunction, model_args: tuple[Any, ...],
         observations: ChoiceMap | dict[Any, Any] | None, guide: GenerativeFunction,
         guide_args: tuple[Any, ...] = (), n_samples: int = 1, estimator: str = "auto", *,
         baseline: float | torch.Tensor | None = None) -> torch.Tensor:
    """A differentiable estimate of the evidence lower bound from ``n_samples`` guide draws.

    ``guide(*guide_args)`` proposes the latent choices; ``model(*model_args)`` scores them with
    the ``observations`` (``generate`` with observations ∪ guide choices; a latent the guide
    does not make is drawn from the model's prior and so becomes part of the proposal, with
    pathwise gradients only: let the guide make every latent).  ``estimator``: ``"reparam"``,
    ``"score"`` or ``"auto"`` (see the module docstring); ``baseline`` (score function with
    one sample only): a constant subtracted from the learning signal, e.g. a running average
    of past estimates.

    Math: ELBO = E_{z~q}[log p(z, y) − log q(z)] ≤ log p(y), estimated by
    (1/n) Σ_i [log p(z_i, y) − log q(z_i)], z_i ~ q i.i.d.  Score-function choices add the
    zero-valued surrogate (1/n) Σ_i (f_i − b_i)·(log q_s(z_i) − ⊥log q_s(z_i)), f_i the
    (detached) signal, b_i = mean_{j≠i} f_j, so that the gradient is
    E[∇_path f + (f − b) ∇ log q_s(z)], unbiased.  At the exact posterior every term equals
    log p(y).
    """
    who = "elbo"
    model_args, obs, guide_args, n, est = _prepare(model, model_args, observations, guide,
                                                   guide_args, n_samples, estimator, who)
    w = _weights(model, model_args, obs, guide, guide_args, n, est, who)
    value = w.log_w.mean()
    if w.log_q_score is None:
        return value
    signal = _centred(w.log_w, baseline)
    return value + (signal * (w.log_q_score - w.log_q_score.detach())).mean()


def iwae_bound(model: GenerativeFunction, model_args: tuple[Any, ...],
               observations: ChoiceMap | dict[Any, Any] | None, guide: GenerativeFunction,
               guide_args: tuple[Any, ...] = (), n_samples: int = 1,
               estimator: str = "auto", *,
               baseline: float | torch.Tensor | None = None) -> torch.Tensor:
    """A differentiable estimate of the importance-weighted bound with K = ``n_samples``.

    Math: IWAE_K = E[log (1/K) Σ_k w_k], w_k = p(z_k, y) / q(z_k), z_k ~ q i.i.d.;
    ELBO = IWAE_1 ≤ IWAE_K ≤ IWAE_{K+1} ≤ log p(y), and IWAE_K → log p(y) as K → ∞.
    Pathwise choices differentiate through the logsumexp; score-function choices use
    VIMCO's control variate: the surrogate adds Σ_k (L − L_{−k})·(log q_s(z_k) − ⊥), with
    L_{−k} the bound with log w_k replaced by the mean of the others' (K = 1: the ELBO's
    ``baseline``).  The value is the plain estimate log (1/K) Σ_k w_k.
    """
    who = "iwae_bound"
    model_args, obs, guide_args, k, est = _prepare(model, model_args, observations, guide,
                                                   guide_args, n_samples, estimator, who)
    w = _weights(model, model_args, obs, guide, guide_args, k, est, who)
    log_w = w.log_w
    value = torch.logsumexp(log_w, 0) - math.log(k)
    if w.log_q_score is None:
        return value
    if k == 1:
        signal = _centred(log_w, baseline)
        return value + (signal * (w.log_q_score - w.log_q_score.detach())).sum()
    f = log_w.detach()
    loo = (f.sum() - f) / (k - 1)  # the geometric-mean stand-in for each sample
    others = f.unsqueeze(0).expand(k, k)
    eye = torch.eye(k, dtype=torch.bool, device=f.device)
    replaced = torch.where(eye, loo.unsqueeze(1).expand(k, k), others)
    l_minus = torch.logsumexp(replaced, 1) - math.log(k)
    signal = value.detach() - l_minus
    return value + (signal * (w.log_q_score - w.log_q_score.detach())).sum()


_OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {"elbo": elbo, "iwae": iwae_bound}


def fit_vi(model: GenerativeFunction, model_args: tuple[Any, ...],
           observations: ChoiceMap | dict[Any, Any] | None, guide: GenerativeFunction,
           guide_args: tuple[Any, ...], optimizer: torch.optim.Optimizer, n_steps: int,
           n_samples: int = 1, estimator: str = "auto", progress: bool | None = None, *,
           objective: str = "elbo", baseline_decay: float = 0.9,
           callback: Callable[[int, float], None] | None = None) -> VIResult:
    """Fit the guide (and any model parameters the optimizer holds) by stochastic gradient
    ascent on the ELBO (``objective="elbo"``) or the IWAE bound (``objective="iwae"``).

    ``optimizer`` is any ``torch.optim`` optimizer over ``guide.parameters()``, tensor guide
    arguments with ``requires_grad``, and ``model.parameters()`` to learn the model as well.
    Each of the ``n_steps`` steps zeroes the gradients, estimates the objective with
    ``n_samples`` draws (:func:`elbo` / :func:`iwae_bound` with ``estimator``), back-propagates
    its negative and calls ``optimizer.step()``.  With one sample and score-function choices,
    the baseline is an exponential moving average (``baseline_decay``) of past estimates.  A
    tqdm bar shows the loss when stdout is a terminal (``progress=False`` turns it off);
    ``callback(step, loss)`` runs after each step.

    Math: θ ← optimizer step along ∇θ of the estimate (an unbiased estimate of ∇θ ELBO, or of
    ∇θ IWAE_K); the losses are −estimate.  The ELBO's maximiser over a family that contains
    the posterior is the posterior.
    """
    who = "fit_vi"
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentError(f"{who}: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
    if not any(group["params"] for group in optimizer.param_groups):
        raise ArgumentError(f"{who}: the optimizer holds no parameters")
    check_positive_int(n_steps, "n_steps", who, minimum=0)
    if objective not in _OBJECTIVES:
        raise ArgumentError(f"{who}: objective must be 'elbo' or 'iwae', got {objective!r}")
    if not 0.0 <= float(baseline_decay) < 1.0:
        raise ArgumentError(f"{who}: baseline_decay must be in [0, 1), got {baseline_decay!r}")
    model_args, obs, guide_args, n, est = _prepare(model, model_args, observations, guide,
                                                   guide_args, n_samples, estimator, who)
    estimate = _OBJECTIVES[objective]
    losses: list[float] = []
    average: float | None = None
    bar = progress_bar(n_steps, desc="vi", progress=progress)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        value = estimate(model, model_args, obs, guide, guide_args, n, est, baseline=average)
        (-value).backward()
        optimizer.step()
        v = float(value.detach())
        if math.isfinite(v):
            average = v if average is None else baseline_decay * average + (
                1 - baseline_decay) * v
        losses.append(-v)
        if callback is not None:
            callback(step, -v)
        if (step + 1) % 10 == 0 or step + 1 == n_steps:
            bar.set_postfix(loss=f"{-v:.4g}")
    bar.close()
    return VIResult(losses, guide)
