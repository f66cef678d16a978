"""A sequential Monte Carlo driver: a whole particle filter in one call.

:func:`smc` runs :func:`pf_initialize` on the first observations, then for every further
step resamples when the effective sample size falls below a fraction of the particles
(:func:`pf_resample`), optionally moves the particles with an MCMC rejuvenation kernel
(:func:`pf_rejuvenate`), and extends them with the step's observations (:func:`pf_update`),
with a progress bar.  It returns the final state, the log marginal-likelihood estimate and
the per-step ESS history.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import attrs
import torch

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange
from gfcomb.core.errors import ArgumentError
from gfcomb.core.gfi import GenerativeFunction, check_args_tuple
from gfcomb.inference import particle_filter as pf
from gfcomb.inference.breadth import check_positive_int
from gfcomb.inference.importance import check_gen_fn
from gfcomb.inference.progress import progress_bar
from gfcomb.inference.resampling import Resampler

__all__ = ["SMCResult", "default_argdiffs", "smc"]

ArgsFn = Callable[[int], tuple[Any, ...]]
Observation = Union[ChoiceMap, dict[Any, Any], None]


@attrs.frozen
class SMCResult:
    """What :func:`smc` returns.

    ``state``: the final :class:`ParticleFilterState` (weighted particles after the last
    step); ``log_ml``: its log marginal-likelihood estimate; ``ess``: the effective sample size
    at every step, before any resampling (a list of floats, one per observation);
    ``resampled``: the steps (0-based, the step whose weights were resampled) at which
    resampling happened.
    """

    state: pf.ParticleFilterState
    log_ml: torch.Tensor
    ess: list[float]
    resampled: list[int]


def default_argdiffs(old_args: tuple[Any, ...], new_args: tuple[Any, ...]) -> tuple[Diff, ...]:
    """Argdiffs between two argument tuples: ``NoChange`` for an argument that is the same
    object (or an equal Python number) as before, ``UnknownChange`` otherwise.

    Math: none; a conservative diff (an equal tensor that is a new object counts as changed).
    """
    if len(old_args) != len(new_args):
        raise ArgumentError(f"smc: args_fn returned {len(new_args)} arguments after "
                            f"{len(old_args)}; the model's argument count must not change")

    def same(a: Any, b: Any) -> bool:
        if a is b:
            return True
        if isinstance(a, (int, float, str, bool)) and type(a) is type(b):
            return bool(a == b)
        return False

    return tuple(NoChange() if same(a, b) else UnknownChange() for a, b in zip(old_args,
                                                                               new_args))


def smc(model: GenerativeFunction, args_fn: ArgsFn, observations: Sequence[Observation],
        n_particles: int, *, ess_threshold: float = 0.5,
        resample_method: str | Resampler = "systematic",
        argdiffs_fn: Callable[[tuple[Any, ...], tuple[Any, ...]], tuple[Diff, ...]] | None = None,
        proposal: GenerativeFunction | None = None,
        proposal_args: Callable[[int], tuple[Any, ...]] | None = None,
        rejuvenation: Callable[..., Any] | None = None, rejuvenate: str = "resampled",
        progress: bool | None = None, desc: str = "smc") -> SMCResult:
    """Run a particle filter over a sequence of observations in one call.

    Step ``t`` (0-based) has model arguments ``args_fn(t)`` and constraints
    ``observations[t]`` (a ChoiceMap, a dict or None): step 0 is :func:`pf_initialize` with
    ``n_particles`` particles; each later step first resamples (``resample_method``) when the
    ESS is below ``ess_threshold · n_particles`` (a fraction in [0, 1]: 0 never resamples, 1
    resamples whenever the weights are not uniform), then applies ``rejuvenation`` (when given:
    a kernel called as ``rejuvenation(traces, t)`` on the batched traces, returning traces or
    ``(traces, accepted)``, e.g. ``lambda tr, t: mh(tr, gf.select((t - 1, "x")))``) after each
    resampling (``rejuvenate="resampled"``) or at every step (``"always"``), then extends every
    particle with :func:`pf_update` (argdiffs from ``argdiffs_fn(old_args, new_args)``, by
    default :func:`default_argdiffs`).  ``proposal`` (optional) is passed to
    :func:`pf_initialize` / :func:`pf_update` with ``proposal_args(t)``.  A tqdm bar shows the
    ESS and the running log-ML when stdout is a terminal (``progress=False`` turns it off).

    Math: the bootstrap (or proposal) particle filter of :mod:`gfcomb.inference.particle_filter`
    with adaptive resampling; log p̂(y_{0:T−1}) = Σ over resampling steps of
    [logsumexp(lw) − log N] + logsumexp(lw_final) − log N, unbiased in p.  MCMC moves that
    leave the current posterior invariant keep the weights and the estimate unchanged.
    """
    who = "smc"
    check_gen_fn(model, "model", who)
    if not callable(args_fn):
        raise ArgumentError(f"{who}: args_fn must be a function step -> model args tuple, got "
                            f"{args_fn!r}")
    if isinstance(observations, (str, bytes, ChoiceMap, dict)) or not isinstance(
            observations, Sequence):
        raise ArgumentError(f"{who}: observations must be a sequence (one choice map per step), "
                            f"got {type(observations).__name__}")
    n_steps = len(observations)
    if n_steps == 0:
        raise ArgumentError(f"{who}: observations is empty (no step to run)")
    n = check_positive_int(n_particles, "n_particles", who)
    threshold = float(ess_threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ArgumentError(f"{who}: ess_threshold is a fraction of the particles in [0, 1], "
                            f"got {ess_threshold!r}")
    if rejuvenate not in ("resampled", "always"):
        raise ArgumentError(f"{who}: rejuvenate must be 'resampled' or 'always', got "
                            f"{rejuvenate!r}")
    if rejuvenation is not None and not callable(rejuvenation):
        raise ArgumentError(f"{who}: rejuvenation must be a kernel (traces, t) -> traces")
    if proposal is not None:
        check_gen_fn(proposal, "proposal", who)
    diffs = argdiffs_fn or default_argdiffs

    def p_args(t: int) -> tuple[Any, ...]:
        return () if proposal_args is None else check_args_tuple(proposal_args(t),
                                                                 "proposal_args(t)")

    ess: list[float] = []
    resampled: list[int] = []
    bar = progress_bar(n_steps, desc=desc, progress=progress)
    state: pf.ParticleFilterState | None = None
    for t in bar:
        args = check_args_tuple(args_fn(t), "args_fn(t)")
        if state is None:
            state = pf.pf_initialize(model, args, observations[t], n, proposal, p_args(t))
        else:
            did = False
            if threshold > 0 and ess[-1] < threshold * n:
                state = pf.pf_resample(state, resample_method)
                resampled.append(t - 1)
                did = True
            if rejuvenation is not None and (did or rejuvenate == "always"):
                state = pf.pf_rejuvenate(state, rejuvenation, t)
            state = pf.pf_update(state, args, diffs(state.args, args), observations[t], proposal,
                              p_args(t))
        ess.append(float(pf.effective_sample_size(state)))
        if (t + 1) % 10 == 0 or t + 1 == n_steps:
            lml = float(pf.log_ml_estimate(state))
            bar.set_postfix(ess=f"{ess[-1]:.0f}", log_ml=f"{lml:.4g}")
    bar.close()
    assert state is not None
    return SMCResult(state, pf.log_ml_estimate(state), ess, resampled)
