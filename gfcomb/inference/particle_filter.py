"""Particle filtering on top of the GFI, all particles advanced in one vmapped call per step.

A :class:`ParticleFilterState` holds ONE batched trace (every leaf has a leading particle
axis), the particles' log weights and the running log marginal-likelihood estimate.  The API
is functional: every function returns a new state and never mutates its input.

.. code-block:: python

    state = pf_initialize(model, (0, x0, *params), None, 10_000)
    for t in range(T):
        state = pf_update(state, (t + 1, x0, *params),
                          (UnknownChange(), NoChange(), *[NoChange()] * len(params)),
                          {(t, "y"): ys[t]})
        state = pf_resample(state, "systematic", ess_threshold=5_000)
    log_ml_estimate(state)

Math (Gen.jl's particle filter): at step s the particles are updated to the new arguments with
the step's observations as constraints; the incremental weight is the ``update`` weight,
log p(t'; x') − log p(t; x) − log q(fresh choices), i.e. log p(y_s | x_s) for a bootstrap
filter.  Resampling banks logsumexp(lw) − log N into the running log-ML and resets the
weights to 0; ``log_ml_estimate = banked + logsumexp(lw) − log N``, an unbiased estimate of
p(observations) (in p, not in log p).

Every step is one call of the model's batch methods (``batch_generate``, ``batch_update``,
``batch_select``: :class:`gfcomb.core.gfi.GenerativeFunction`), so a model whose batch
methods do work proportional to what changed -- a ``@gen`` function wrapping an ``Unfold``,
with or without a proposal -- costs the same per step after 1,000 steps as after 10.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import attrs
import torch

from gfcomb.core.batched import select_batch
from gfcomb.core.batching import zero_rows
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff
from gfcomb.core.errors import ArgumentError
from gfcomb.core.gfi import GenerativeFunction, as_choicemap, check_argdiffs, check_args_tuple
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import RowView, vectorized
from gfcomb.inference import distributed as dist_
from gfcomb.inference.importance import batched_generate, check_gen_fn, check_n, merged_rows
from gfcomb.inference.resampling import (
    Resampler,
    check_every_arg,
    check_finite_max,
    exp_normalized,
    get_resampler,
    mark_flag,
    no_flag,
    raise_flagged,
    static_shapes,
    systematic_from_cdf,
    systematic_resample,
)
from gfcomb.inference.resampling import effective_sample_size as weights_ess

Kernel = Callable[..., Any]


@attrs.frozen
class ParticleFilterState:
    """The state of a particle filter (immutable; each pf_* function returns a new one).

    * ``traces`` -- ONE batched trace of ``model``: every tensor leaf has a leading axis of
      ``n_particles``; ``state.traces[addr]`` reads a choice of all particles at once;
    * ``log_weights`` -- [n_particles] unnormalized log weights;
    * ``log_ml_base`` -- the part of the log marginal-likelihood estimate banked at the
      resampling steps so far (``log_ml`` / :func:`log_ml_estimate` add the current weights);
    * ``step`` -- the number of :func:`pf_update` calls made (0 after :func:`pf_initialize`);
    * ``model``, ``args`` -- the model and the (unbatched) arguments the traces were made with;
    * ``accepted`` -- per-particle acceptance of the last :func:`pf_rejuvenate` move, if any;
    * ``group`` -- the process group the particles are spread over (``pf_initialize(...,
      group=...)``; None in one process): ``traces`` and ``log_weights`` then hold this
      rank's share, ``n_particles`` is the global count, and every ``pf_*`` call on the
      state is collective (:mod:`gfcomb.inference.distributed`).  Not saved by ``gf.save``
      (a saved rank's state loads as a one-process state of its share).
    """

    traces: Trace
    log_weights: torch.Tensor
    log_ml_base: torch.Tensor
    step: int
    model: GenerativeFunction
    args: tuple[Any, ...]
    accepted: torch.Tensor | None = None
    # True when every log weight is 0 (just resampled): pf_update then skips adding them
    _uniform: bool = attrs.field(default=False, eq=False, repr=False)
    # max of log_weights when pf_update has already computed it (and found it finite)
    _max: torch.Tensor | None = attrs.field(default=None, eq=False, repr=False)
    _group: dist_.Group | None = attrs.field(default=None, eq=False, repr=False)
    _n_total: int | None = attrs.field(default=None, eq=False, repr=False)
    # pf_initialize(check_every=k): the degeneracy check reads the device only every k steps
    _check_every: int = attrs.field(default=1, eq=False, repr=False)
    # with k > 1: (first degenerate step or -1, max log weight then), kept on the device
    _flag: tuple[torch.Tensor, torch.Tensor] | None = attrs.field(default=None, eq=False,
                                                                   repr=False)

    @property
    def n_particles(self) -> int:
        """The number of particles (over all ranks of the group, if any)."""
        if self._n_total is not None:
            return self._n_total
        return int(self.log_weights.shape[0])

    @property
    def group(self) -> dist_.Group | None:
        """The process group the particles are spread over (None: one process)."""
        return self._group

    @property
    def log_ml(self) -> torch.Tensor:
        """The running log marginal-likelihood estimate (:func:`log_ml_estimate`)."""
        return log_ml_estimate(self)

    @property
    def normalized_weights(self) -> torch.Tensor:
        """w_i / Σ_j w_j (this rank's share of the globally normalized weights when the
        state has a group: collective)."""
        if self._group is not None:
            lse = dist_.global_logsumexp(self.log_weights, self._group, "normalized_weights")
            return torch.exp(self.log_weights - lse)
        return torch.softmax(self.log_weights, 0)


def _check_state(state: Any, who: str) -> ParticleFilterState:
    if not isinstance(state, ParticleFilterState):
        raise ArgumentError(f"{who}: state must be a ParticleFilterState (from pf_initialize), "
                            f"got {type(state).__name__}")
    return state


def pf_initialize(model: GenerativeFunction, args: tuple[Any, ...],
                  observations: ChoiceMap | dict[Any, Any] | None, n_particles: int,
                  proposal: GenerativeFunction | None = None,
                  proposal_args: tuple[Any, ...] = (), *,
                  vectorize: bool = True, group: Any = None,
                  check_every: int = 1) -> ParticleFilterState:
    """Start a particle filter: ``n_particles`` traces of ``model(*args)`` with
    ``observations`` as constraints, generated in one vmapped call.

    ``proposal`` (optional): a generative function called as ``proposal(*proposal_args)``
    whose choices constrain the model.

    Math: log w_i = generate weight of particle i (prior proposal: log p(observations | t_i));
    with a proposal, log w_i = log p(t_i; args) − log q(u_i).  Step 0; nothing banked.
    Raises :class:`DegenerateWeightsError` naming step 0 if every weight is -inf or one NaN.
    A model that cannot run under vmap raises :class:`VmapError` naming the cause; with
    ``vectorize=False`` (here and in :func:`pf_update`) the particles run one after the
    other instead, with the same results.

    ``group`` (a ``torch.distributed`` process group, a
    :class:`gfcomb.inference.distributed.Group` or ``"world"``): spread the particles over
    its ranks -- ``n_particles`` is the global count, each rank generates its share
    (:func:`gfcomb.inference.distributed.share`), and every later ``pf_*`` call on the state
    is collective (every rank must make it).  See docs/distributed.md.

    ``check_every`` (a positive int, default 1): how often the later ``pf_update`` calls read
    the degeneracy check on the host.  With 1 every :func:`pf_update` and :func:`pf_resample`
    checks at once (one host sync each) and raises before returning.  With k > 1 they keep
    the check on the device (the first degenerate step and its maximum log weight, a few
    tensor ops, no sync), ``pf_resample(ess_threshold=...)`` decides on the device too, and
    the same :class:`DegenerateWeightsError`, naming the step where the weights went bad, is
    raised by the ``pf_update`` of every k-th step and by :func:`pf_check` -- call it at the
    end (see docs/compiling.md).  Not with a ``group`` (its checks are collective).  ``gf.save``
    keeps neither the setting nor a pending flag (a loaded state checks every step): call
    :func:`pf_check` before saving.
    """
    who = "pf_initialize"
    check_gen_fn(model, "model", who)
    args = check_args_tuple(args)
    n = check_n(n_particles, "n_particles", who)
    if proposal is not None:
        check_gen_fn(proposal, "proposal", who)
    proposal_args = check_args_tuple(proposal_args, "proposal_args")
    k = check_every_arg(check_every, who)
    if group is not None and k != 1:
        raise ArgumentError(f"{who}: check_every must be 1 with a group (its degeneracy "
                            f"checks are collective), got {check_every!r}")
    g = dist_.as_group(group, who)
    if g is not None and n < g.size:
        raise ArgumentError(f"{who}: n_particles ({n}) must be at least the number of ranks "
                            f"({g.size})")

    def generate() -> tuple[torch.Tensor, Trace]:
        with vectorized(vectorize):
            traces, log_w = batched_generate(model, args, as_choicemap(observations),
                                             n if g is None else dist_.share(n, g), proposal,
                                             proposal_args)
        return log_w, traces

    if g is not None:
        log_w, traces = dist_.global_max(generate, g, who, 0)
        return ParticleFilterState(traces, log_w, log_w.new_zeros(()), 0, model, args,
                                   None, False, None, g, n)
    log_w, traces = generate()
    check_finite_max(log_w, who, 0)
    flag = None if k == 1 else no_flag(log_w)
    return ParticleFilterState(traces, log_w, log_w.new_zeros(()), 0, model, args,
                               check_every=k, flag=flag)


def pf_update(state: ParticleFilterState, new_args: tuple[Any, ...],
              argdiffs: tuple[Diff, ...], observations: ChoiceMap | dict[Any, Any] | None,
              proposal: GenerativeFunction | None = None,
              proposal_args: tuple[Any, ...] = (), *,
              vectorize: bool = True) -> ParticleFilterState:
    """Advance every particle to ``new_args`` with ``observations`` (shared by all particles,
    unbatched) as constraints: one vmapped ``model.update`` call.

    ``proposal`` (optional): a generative function called per particle as
    ``proposal(trace, *proposal_args)`` (the particle's current trace first, as in Gen.jl);
    its choices are added to the constraints.

    Math: log w_i' = log w_i + update weight_i, where update weight =
    log p(t_i'; x') − log p(t_i; x) − log q(fresh choices) (prior proposal: the likelihood of
    the new observations); with a proposal, − log q(u_i; t_i, ...) as well.  Raises
    :class:`DegenerateWeightsError` naming the step when every new weight is -inf or one is
    NaN (the input state is left as it was); with ``pf_initialize(check_every=k)``, k > 1,
    only at every k-th step, naming the first step that went bad.
    """
    who = "pf_update"
    state = _check_state(state, who)
    new_args = check_args_tuple(new_args, "new_args")
    argdiffs = check_argdiffs(new_args, argdiffs, who)
    if proposal is not None:
        check_gen_fn(proposal, "proposal", who)
    proposal_args = check_args_tuple(proposal_args, "proposal_args")
    obs = as_choicemap(observations)
    n = int(state.log_weights.shape[0])  # (this rank's share when there is a group)
    model = state.model

    def advance() -> tuple[torch.Tensor, Trace]:
        with vectorized(vectorize):
            if proposal is None:
                traces, inc, _rd, _disc = model.batch_update(state.traces, new_args,
                                                             argdiffs, obs)
            else:
                proposed, _ = proposal.batch_generate(n, (RowView(state.traces),)
                                                      + proposal_args)
                traces, w, _rd, _disc = model.batch_update(
                    state.traces, new_args, argdiffs, merged_rows(obs, proposed.choices, n))
                inc = w - proposed.score
        return (inc if state._uniform else state.log_weights + inc), traces

    step = state.step + 1
    if state._group is not None:
        log_w, traces = dist_.global_max(advance, state._group, who, step)
        return ParticleFilterState(traces, log_w, state.log_ml_base, step, model, new_args,
                                   None, False, None, state._group, state._n_total)
    log_w, traces = advance()
    m = torch.amax(log_w, 0)
    flag = state._flag
    if flag is None:
        if not math.isfinite(float(m)):
            check_finite_max(log_w, who, step)
    else:
        flag = mark_flag(flag, m, step)
        if step % state._check_every == 0:
            raise_flagged(flag, n, who)
    return ParticleFilterState(traces, log_w, state.log_ml_base, step, model, new_args, None,
                               False, m, check_every=state._check_every, flag=flag)


def pf_resample(state: ParticleFilterState, method: str | Resampler = "systematic",
                ess_threshold: float | None = None) -> ParticleFilterState:
    """Resample the particles (``method``: "systematic", "multinomial", "stratified",
    "residual", or a callable ``(weights, n) -> ancestors``).

    With ``ess_threshold`` (a number of particles, as in Gen.jl's ``maybe_resample!``), resample
    only when the effective sample size is below it; otherwise the same state is returned.

    Math: ancestors a_k drawn with E[#{k : a_k = i}] = N w̄_i; the new particles are
    t_{a_k} with log weight 0, and logsumexp(lw) − log N is banked into the running log-ML.
    The traces are re-indexed with the model's ``batch_select`` (Unfold histories are not
    copied).  With a group the draw is global (ancestors from the weights of every rank, one
    shared offset) and only the rows that must change rank are sent
    (:func:`gfcomb.inference.distributed.resample_rows`).  With
    ``pf_initialize(check_every=k)``, k > 1, nothing is read on the host: degenerate weights
    are flagged for the next check and ``ess_threshold`` is applied per row on the device
    (every row is re-indexed, to itself where the ESS is high enough).
    """
    who = "pf_resample"
    state = _check_state(state, who)
    resampler = get_resampler(method)
    log_w = state.log_weights
    n = state.n_particles
    if state._group is not None:
        out = dist_.resample_rows(state.traces, log_w, n, state._group, who, state.step,
                                  None if resampler is systematic_resample else resampler,
                                  ess_threshold)
        if out is None:
            return state
        new, lse_all = out
        mine = dist_.share(n, state._group)
        return ParticleFilterState(new, zero_rows(mine, log_w.dtype, log_w.device),
                                   state.log_ml_base + (lse_all - math.log(n)), state.step,
                                   state.model, state.args, None, True, None, state._group, n)
    if state._flag is not None:
        return _resample_on_device(state, resampler, ess_threshold)
    if ess_threshold is not None:
        if state._max is None:
            check_finite_max(log_w, who, state.step)
        if bool(weights_ess(log_w) >= ess_threshold):
            return state
    if resampler is systematic_resample:  # the default: reuse the cumulative sum for lse
        m = state._max
        if m is None:
            m = torch.amax(log_w, 0)
            if not math.isfinite(float(m)):
                check_finite_max(log_w, who, state.step)
        cdf = torch.cumsum((log_w - m).exp_(), 0)
        mean_w = cdf[-1] / n  # (the mean weight, scaled by exp(-m): shared with the points)
        banked = (m + torch.log(mean_w)).add_(state.log_ml_base)
        ancestors = systematic_from_cdf(cdf, n, mean=mean_w)
    else:
        weights, lse = exp_normalized(log_w, who, state.step)
        ancestors = resampler(weights, n)
        banked = state.log_ml_base + (lse - math.log(n))
    return ParticleFilterState(select_batch(state.traces, ancestors),
                               zero_rows(n, log_w.dtype, log_w.device),
                               banked, state.step, state.model, state.args, None, True)


def _resample_on_device(state: ParticleFilterState, resampler: Resampler,
                        ess_threshold: float | None) -> ParticleFilterState:
    """pf_resample without a host read (``check_every`` > 1): the degeneracy check goes into
    the state's flag; weights that fail it resample uniformly until the check raises."""
    log_w, n, base = state.log_weights, state.n_particles, state.log_ml_base
    assert state._flag is not None
    flag, m = state._flag, state._max
    if m is None:  # (else pf_update has computed the max and marked the flag with it)
        m = torch.amax(log_w, 0)
        flag = mark_flag(flag, m, state.step)
    w = torch.where(torch.isfinite(m), log_w - m, 0.0).exp_()
    # bincount reads its output size from the data: a sync on a GPU (not on a CPU)
    with static_shapes() if log_w.device.type != "cpu" else contextlib.nullcontext():
        if resampler is systematic_resample:
            cdf = torch.cumsum(w, 0)
            mean_w = cdf[-1] / n
            ancestors = systematic_from_cdf(cdf, n, mean=mean_w)
        else:
            mean_w = w.sum() / n
            ancestors = resampler(w, n)
    banked = (m + torch.log(mean_w)).add_(base)
    zeros = zero_rows(n, log_w.dtype, log_w.device)
    if ess_threshold is None:
        return ParticleFilterState(select_batch(state.traces, ancestors), zeros, banked,
                                   state.step, state.model, state.args, None, True,
                                   check_every=state._check_every, flag=flag)
    low = weights_ess(log_w) < ess_threshold  # (False for flagged weights: NaN ESS)
    ancestors = torch.where(low, ancestors, torch.arange(n, device=ancestors.device))
    return ParticleFilterState(select_batch(state.traces, ancestors),
                               torch.where(low, zeros, log_w), torch.where(low, banked, base),
                               state.step, state.model, state.args, None, False,
                               check_every=state._check_every, flag=flag)


def pf_check(state: ParticleFilterState) -> ParticleFilterState:
    """Read the degeneracy check of a filter started with ``pf_initialize(check_every=k)``
    (one host sync) and raise :class:`DegenerateWeightsError`, naming the first step whose
    weights were all -inf or had a NaN or +inf, if there was one; return ``state`` otherwise.
    A no-op for ``check_every=1`` (those filters raise at once)."""
    state = _check_state(state, "pf_check")
    if state._flag is not None:
        raise_flagged(state._flag, state.n_particles, "pf_check")
    return state


def pf_rejuvenate(state: ParticleFilterState, kernel: Kernel,
                  *kernel_args: Any) -> ParticleFilterState:
    """Apply an MCMC move to every particle: ``kernel(state.traces, *kernel_args)``.

    ``kernel`` acts on the whole batched trace (e.g. gfcomb's ``mh``/``mala``/``hmc``, which
    run all chains in one vmapped call) and returns the new batched traces, or
    ``(traces, accepted)`` with a per-particle acceptance flag (kept in ``state.accepted``).

    Math: a kernel that leaves the model's posterior given the observations invariant keeps
    the weighted particle system properly weighted, so the weights and the log-ML estimate are
    unchanged.
    """
    who = "pf_rejuvenate"
    state = _check_state(state, who)
    if not callable(kernel):
        raise ArgumentError(f"{who}: kernel must be callable (traces, *kernel_args) -> traces, "
                            f"got {kernel!r}")

    def move() -> tuple[Trace, Any]:
        out = kernel(state.traces, *kernel_args)
        accepted = None
        if isinstance(out, tuple):
            if len(out) != 2:
                raise ArgumentError(f"{who}: the kernel must return traces or (traces, "
                                    f"accepted); got a tuple of {len(out)} items")
            out, accepted = out
        if not isinstance(out, Trace):
            raise ArgumentError(f"{who}: the kernel returned {type(out).__name__}, not a "
                                "trace")
        return out, accepted

    out, accepted = move() if state._group is None else \
        dist_.guarded(state._group, who, move)
    return ParticleFilterState(out, state.log_weights, state.log_ml_base,
                               state.step, state.model, state.args, accepted, state._uniform,
                               state._max, state._group, state._n_total,
                               check_every=state._check_every, flag=state._flag)


def log_ml_estimate(state: ParticleFilterState) -> torch.Tensor:
    """The particle filter's log marginal-likelihood estimate.

    Math: log p̂(y_{0:s}) = banked + logsumexp_i(lw_i) − log N, where banked is the sum of
    logsumexp(lw) − log N over the resampling steps so far.
    """
    state = _check_state(state, "log_ml_estimate")
    n = state.n_particles
    if state._group is not None:
        lse = dist_.global_logsumexp(state.log_weights, state._group, "log_ml_estimate")
        return state.log_ml_base + lse - math.log(n)
    return state.log_ml_base + torch.logsumexp(state.log_weights, 0) - math.log(n)


def effective_sample_size(state: ParticleFilterState) -> torch.Tensor:
    """Kish's effective sample size of the particle weights, (Σ w)² / Σ w² ∈ [1, N] (over
    every rank when the state has a group: collective, the same value on every rank)."""
    state = _check_state(state, "effective_sample_size")
    if state._group is not None:
        return dist_.global_ess(state.log_weights, state._group, "effective_sample_size")
    return weights_ess(state.log_weights)
