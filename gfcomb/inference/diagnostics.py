"""ArviZ export: :func:`to_inference_data` turns MCMC chains, particle-filter states, SMC and
importance-sampling results into an ``arviz.InferenceData`` (``chain × draw``), so that
R-hat, ESS, summaries and plots come from ArviZ.

ArviZ is an optional dependency: ``pip install gfcomb[arviz]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from gfcomb.core.errors import ArgumentError
from gfcomb.core.trace import Trace
from gfcomb.inference.chains import ChainResult
from gfcomb.inference.importance import ImportanceResult
from gfcomb.inference.particle_filter import ParticleFilterState
from gfcomb.inference.resampling import systematic_resample

__all__ = ["to_inference_data", "variable_name"]


def _arviz() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # arviz 0.2x announces its refactor
            import arviz
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("to_inference_data needs ArviZ: pip install 'gfcomb[arviz]' "
                          "(or pip install arviz)") from err
    return arviz


def variable_name(addr: Any) -> str:
    """The ArviZ variable name of an address: keys joined with ``/`` (``("ys", 0, "y")`` →
    ``"ys/0/y"``), ``:`` for every element of a stacked block.

    Math: none (a naming convention).
    """
    path = addr if isinstance(addr, tuple) else (addr,)
    return "/".join(":" if isinstance(k, slice) else str(k) for k in path) or "()"


def _numpy(x: torch.Tensor) -> Any:
    return x.detach().to("cpu").numpy()


def _chain_draws(result: ChainResult) -> dict[str, Any]:
    chain_shape = tuple(result.trace.score.shape)
    out = {}
    for addr, v in result.samples.items():
        if v.numel() == 0 and v.dim() == 1:
            raise ArgumentError(f"to_inference_data: no samples kept at address {addr!r} "
                                "(n_steps <= burn_in?)")
        n_kept = v.shape[0]
        value_shape = tuple(v.shape[1 + len(chain_shape):])
        flat = v.reshape((n_kept, -1) + value_shape)  # [draw, chain, ...]
        out[variable_name(addr)] = _numpy(flat.transpose(0, 1))
    return out


def _particle_draws(traces: Trace, log_weights: torch.Tensor, addresses: Sequence[Any] | None,
                    resample: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    n = int(log_weights.shape[0])
    if addresses is None:
        items = [(a, v) for a, v in traces.choices.items(stacked=True)]
    else:
        items = [(a, traces[a]) for a in addresses]
    if not items:
        raise ArgumentError("to_inference_data: no choices to export")
    if resample:
        weights = torch.softmax(log_weights.detach(), 0)
        rows = systematic_resample(weights, n)
    else:
        rows = torch.arange(n, device=log_weights.device)
    draws = {}
    for addr, v in items:
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != n:
            raise ArgumentError(f"to_inference_data: the value at {variable_name(addr)} has no "
                                "particle axis")
        draws[variable_name(addr)] = _numpy(v.index_select(0, rows.to(v.device)).unsqueeze(0))
    stats = {} if resample else {"log_weight": _numpy(log_weights.unsqueeze(0))}
    return draws, stats


def to_inference_data(result: Any, addresses: Sequence[Any] | None = None, *,
                      resample: bool = True) -> Any:
    """An ``arviz.InferenceData`` with the draws of ``result`` in its ``posterior`` group
    (dimensions ``chain × draw × value dims``).

    * a :class:`ChainResult` (from :func:`run_chain`): the kept samples, one ArviZ chain per
      chain of the batched trace (several chain axes are flattened into one); the acceptance
      rates go into the ``attrs``;
    * a :class:`ParticleFilterState`, an ``SMCResult`` or an :class:`ImportanceResult`: one
      chain of ``N`` draws, the particles resampled by their weights (systematic) when
      ``resample`` is True, else the raw particles with their ``log_weight`` in
      ``sample_stats``; the log marginal-likelihood estimate goes into the ``attrs``.
      ``addresses`` picks the choices (default: every choice, stacked blocks as one variable).

    Variable names are :func:`variable_name` of the addresses.  Diagnostics then come from
    ArviZ: ``arviz.rhat(idata)``, ``arviz.ess(idata)``, ``arviz.summary(idata)``.

    Math: for weighted particles, resampled draws are equally weighted samples whose
    empirical distribution has the same expectation as the weighted one.
    """
    az = _arviz()
    if isinstance(result, ChainResult):
        if addresses is not None:
            missing = [a for a in addresses if a not in result.samples]
            if missing:
                raise ArgumentError(f"to_inference_data: no samples recorded at {missing[0]!r}"
                                    " (pass it in run_chain(addresses=...))")
            samples = {a: result.samples[a] for a in addresses}
            result = ChainResult(result.trace, samples, result.acceptance_rate,
                                 result.acceptance_rates)
        if not result.samples:
            raise ArgumentError("to_inference_data: the ChainResult holds no samples (pass "
                                "addresses= to run_chain)")
        attrs = {"acceptance_rate": float(result.acceptance_rate),
                 "acceptance_rates": _numpy(result.acceptance_rates).reshape(
                     result.acceptance_rates.shape[0], -1).tolist()}
        return az.from_dict(posterior=_chain_draws(result), attrs=attrs)
    state = getattr(result, "state", None)
    if isinstance(state, ParticleFilterState):  # an SMCResult
        result = state
    if isinstance(result, ParticleFilterState):
        traces, log_w = result.traces, result.log_weights
        log_ml = float(result.log_ml)
    elif isinstance(result, ImportanceResult):
        traces, log_w = result.traces, result.log_weights
        log_ml = float(result.log_ml_estimate)
    else:
        raise ArgumentError("to_inference_data: result must be a ChainResult, a "
                            "ParticleFilterState, an SMCResult or an ImportanceResult, got "
                            f"{type(result).__name__}")
    draws, stats = _particle_draws(traces, log_w, addresses, resample)
    return az.from_dict(posterior=draws, sample_stats=stats or None,
                        attrs={"log_ml_estimate": log_ml})
