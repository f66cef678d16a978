"""Importance sampling and importance resampling, vectorized over samples.

All samples are drawn in ONE vmapped ``generate`` call of the model (and one vmapped
``propose`` of the proposal, if there is one): the result holds one *batched* trace (every
leaf has a leading sample axis) and its log weights.

Math (prior proposal): t_i ~ p(· | x) with the observations c fixed, log w_i = log p(c | t_i, x)
(the ``generate`` weight).  With a custom proposal q(·; proposal_args): u_i ~ q, t_i = the
model trace with constraints c ∪ u_i, log w_i = log p(t_i; x) − log q(u_i).  In both cases
log p̂(c) = logsumexp(log w) − log n is an unbiased-in-p estimate of the evidence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import torch

from gfcomb.core.batching import expanded_rows
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError
from gfcomb.core.gfi import GenerativeFunction, as_choicemap, check_args_tuple
from gfcomb.core.pytree import tree_map_tensors
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import PerRow, vectorized
from gfcomb.inference.resampling import (
    Resampler,
    effective_sample_size,
    get_resampler,
    log_normalize,
)


@attrs.frozen
class ImportanceResult:
    """The outcome of :func:`importance_sampling`.

    ``traces``: one batched trace (leading axis = sample); ``log_weights``: [n] unnormalized
    log importance weights; ``log_ml_estimate``: logsumexp(log_weights) − log n.
    """

    traces: Trace
    log_weights: torch.Tensor
    log_ml_estimate: torch.Tensor

    @property
    def n_samples(self) -> int:
        """The number of samples."""
        return int(self.log_weights.shape[0])

    @property
    def normalized_weights(self) -> torch.Tensor:
        """The self-normalized importance weights w_i / Σ_j w_j."""
        return torch.softmax(self.log_weights, 0)

    @property
    def effective_sample_size(self) -> torch.Tensor:
        """Kish's ESS of the weights, (Σ w)² / Σ w²."""
        return effective_sample_size(self.log_weights)


@attrs.frozen
class ImportanceResamplingResult:
    """The outcome of :func:`importance_resampling`: ``traces`` (a batched trace of the
    ``n_draws`` resampled traces) and the evidence estimate of the underlying importance
    sampler."""

    traces: Trace
    log_ml_estimate: torch.Tensor


def check_n(n: Any, name: str, who: str) -> int:
    """``n`` as a positive Python int (ArgumentError naming ``name`` otherwise)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ArgumentError(f"{who}: {name} must be a positive int, got {n!r}")
    return n


def check_gen_fn(gen_fn: Any, name: str, who: str) -> GenerativeFunction:
    """``gen_fn`` if it is a generative function (ArgumentError naming ``name`` otherwise)."""
    if not isinstance(gen_fn, GenerativeFunction):
        raise ArgumentError(f"{who}: {name} must be a generative function, got {gen_fn!r}")
    return gen_fn


def batched_generate(model: GenerativeFunction, args: tuple[Any, ...], observations: ChoiceMap,
                     n: int, proposal: GenerativeFunction | None,
                     proposal_args: tuple[Any, ...]) -> tuple[Trace, torch.Tensor]:
    """``n`` independent ``(trace, log weight)`` pairs from one batch call.

    Math: without a proposal, ``model.generate(args, observations)`` per sample.  With one,
    u ~ q(·; proposal_args) with score log q(u), and (t, w) = ``model.generate(args,
    observations ∪ u)``; the log weight is w − log q(u) (= log p(t) − log q(u) when the
    constraints fix every choice the proposal does not).
    """
    if proposal is None:
        traces, weights = model.batch_generate(n, args, observations)
        return traces, weights
    proposed, _ = proposal.batch_generate(n, proposal_args, None)
    traces, weights = model.batch_generate(n, args,
                                           merged_rows(observations, proposed.choices, n))
    return traces, weights - proposed.score


def merged_rows(shared: ChoiceMap, per_row: ChoiceMap, n: int) -> PerRow:
    """Shared constraints and per-row ones (a batch of proposed choices) as one per-row
    constraint map (the shared values expanded to every row, not copied)."""
    if shared.is_empty():
        return PerRow(per_row)
    return PerRow(tree_map_tensors(partial(expanded_rows, n=n), shared).merge(per_row))


def importance_sampling(model: GenerativeFunction, args: tuple[Any, ...],
                        observations: ChoiceMap | dict[Any, Any] | None, n_samples: int,
                        proposal: GenerativeFunction | None = None,
                        proposal_args: tuple[Any, ...] = (), *,
                        vectorize: bool = True) -> ImportanceResult:
    """Importance sampling of ``model``'s posterior given ``observations``, all
    ``n_samples`` samples in one vmapped call.

    ``proposal`` (optional) is a generative function called as ``proposal(*proposal_args)``
    whose choices are used as constraints of the model (its addresses are model addresses).

    Math: log w_i = log p(t_i; args) − log q(u_i) where q is the prior for the unconstrained
    choices by default (then log w_i = log p(observations | t_i)); the evidence estimate
    log p̂ = logsumexp_i(log w_i) − log n.  Raises :class:`DegenerateWeightsError` if every
    weight is -inf or one is NaN.

    A model that cannot run under vmap (Python control flow on a choice, ``.item()``) raises
    :class:`VmapError` naming the cause; ``vectorize=False`` then runs the samples one after
    the other (same results, slower).
    """
    who = "importance_sampling"
    args = check_args_tuple(args)
    check_gen_fn(model, "model", who)
    n = check_n(n_samples, "n_samples", who)
    if proposal is not None:
        check_gen_fn(proposal, "proposal", who)
    proposal_args = check_args_tuple(proposal_args, "proposal_args")
    obs = as_choicemap(observations)
    with vectorized(vectorize):
        traces, log_w = batched_generate(model, args, obs, n, proposal, proposal_args)
    _, lse = log_normalize(log_w, who, "0 (the initial importance sample)")
    return ImportanceResult(traces, log_w, lse - math.log(n))


def importance_resampling(model: GenerativeFunction, args: tuple[Any, ...],
                          observations: ChoiceMap | dict[Any, Any] | None, n_samples: int,
                          proposal: GenerativeFunction | None = None,
                          proposal_args: tuple[Any, ...] = (), n_draws: int = 1,
                          method: str | Resampler | Callable[..., torch.Tensor] = "multinomial",
                          *, vectorize: bool = True,
                          ) -> ImportanceResamplingResult:
    """Sampling importance resampling: run :func:`importance_sampling` with ``n_samples``
    samples, then draw ``n_draws`` traces from the weighted samples (i.i.d. by default).

    Math: each returned trace is t_{a_k} with P(a_k = i) = w_i / Σ_j w_j (``method`` =
    "multinomial"; the other resamplers of :mod:`gfcomb.inference.resampling` give the same
    marginals with correlated draws).  As n_samples → ∞ the draws follow the posterior.
    """
    check_n(n_draws, "n_draws", "importance_resampling")
    result = importance_sampling(model, args, observations, n_samples, proposal, proposal_args,
                                 vectorize=vectorize)
    from gfcomb.core.batched import select_batch

    log_w, _ = log_normalize(result.log_weights, "importance_resampling")
    ancestors = get_resampler(method)(torch.exp(log_w), n_draws)
    return ImportanceResamplingResult(select_batch(result.traces, ancestors),
                                      result.log_ml_estimate)
