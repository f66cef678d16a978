"""Running MCMC chains: :func:`run_chain` applies kernels (``trace -> (trace, accepted)``,
e.g. :func:`gfcomb.inference.mh`) step after step and keeps samples; :class:`ChainResult`
is what it returns.  With a process group, chains are spread over ranks and R-hat / ESS are
computed over all of them (:mod:`gfcomb.inference.convergence`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from gfcomb.core.errors import ArgumentError
from gfcomb.core.trace import Trace
from gfcomb.inference.convergence import chains_over_group
from gfcomb.inference.distributed import as_group
from gfcomb.inference.progress import progress_bar

__all__ = ["ChainResult", "Kernel", "run_chain"]

#: An MCMC kernel: ``trace -> (trace, accepted)``.
Kernel = Callable[[Trace], tuple[Trace, Any]]


@attrs.frozen
class ChainResult:
    """What :func:`run_chain` returns.

    ``trace``: the final trace (batched when the chains were); ``samples``: address → tensor
    of the kept values stacked along a new first dimension (``[n_kept, *chain_dims,
    *value_shape]``); ``acceptance_rate``: the fraction of accepted moves over all steps,
    kernels and chains; ``acceptance_rates``: per kernel and chain, shape
    ``[n_kernels, *chain_dims]``.  With ``run_chain(..., group=...)`` (chains spread over
    the ranks of a process group): ``trace``, ``samples`` and ``acceptance_rates`` are this
    rank's chains, ``acceptance_rate`` is over every chain of every rank, and ``rhat`` /
    ``ess`` (address -> split R-hat / ESS of each scalar value, over all chains:
    :func:`gfcomb.inference.convergence.rhat_ess`) are filled in (None otherwise).
    """

    trace: Trace
    samples: dict[Any, torch.Tensor]
    acceptance_rate: float
    acceptance_rates: torch.Tensor
    rhat: dict[Any, torch.Tensor] | None = None
    ess: dict[Any, torch.Tensor] | None = None


def run_chain(trace: Trace, kernel: Kernel | Sequence[Kernel], n_steps: int, *,
              addresses: Sequence[Any] = (), burn_in: int = 0, thin: int = 1,
              progress: bool | None = None, desc: str = "mcmc",
              group: Any = None) -> ChainResult:
    """Run an MCMC chain (or a batch of chains) for ``n_steps`` steps.

    ``kernel`` is a function ``trace -> (trace, accepted)`` (e.g.
    ``lambda t: hmc(t, gf.select("mu"), 10, 0.1)``) or a sequence of them, applied in turn at
    every step (a cycle).  After ``burn_in`` steps, every ``thin``-th step records
    ``trace[addr]`` for each address in ``addresses``.  A tqdm bar (with the running
    acceptance rate) is shown when stdout is a terminal, unless ``progress=False``.

    Math: the composition of the kernels leaves the posterior invariant when each one does;
    the samples are the chain's states t_k for k = burn_in + thin·j (1-based steps).

    ``group`` (a ``torch.distributed`` process group, a
    :class:`gfcomb.inference.distributed.Group` or ``"world"``): ``trace`` is this rank's
    batch of chains; each rank runs its own, and at the end the acceptance rate and the
    R-hat / ESS of ``addresses`` (``result.rhat``, ``result.ess``) are computed over the
    chains of every rank (collective: every rank must call it; a rank that raised makes
    every rank raise :class:`gfcomb.RankFailedError`).  Only rank 0 shows a progress bar.
    """
    if group is not None:
        g = as_group(group, "run_chain")
        assert g is not None
        res, rate, rhat, ess = chains_over_group(
            lambda: run_chain(trace, kernel, n_steps, addresses=addresses, burn_in=burn_in,
                              thin=thin, progress=progress if g.rank == 0 else False,
                              desc=desc), list(addresses), g)
        return ChainResult(res.trace, res.samples, rate, res.acceptance_rates, rhat, ess)
    kernels: list[Kernel] = [kernel] if callable(kernel) else list(kernel)
    if not kernels or not all(callable(k) for k in kernels):
        raise ArgumentError("run_chain: kernel must be a callable trace -> (trace, accepted) "
                            "or a non-empty sequence of them")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ArgumentError(f"run_chain: n_steps must be a non-negative int, got {n_steps!r}")
    if burn_in < 0 or thin < 1:
        raise ArgumentError(f"run_chain: need burn_in >= 0 and thin >= 1, got {burn_in}, "
                            f"{thin}")
    addresses = list(addresses)
    chain_shape = tuple(trace.score.shape)
    counts = torch.zeros((len(kernels), *chain_shape), dtype=torch.get_default_dtype(),
                         device=trace.score.device)
    kept: dict[Any, list[torch.Tensor]] = {a: [] for a in addresses}
    bar = progress_bar(n_steps, desc=desc, progress=progress)
    for step in bar:
        for j, k in enumerate(kernels):
            trace, accepted = k(trace)
            counts[j] += torch.as_tensor(accepted, device=counts.device).to(counts.dtype)
        if step + 1 > burn_in and (step + 1 - burn_in) % thin == 0:
            for a in addresses:
                kept[a].append(trace[a])
        if (step + 1) % 10 == 0 or step + 1 == n_steps:
            bar.set_postfix(accept=f"{counts.mean().item() / (step + 1):.2f}")
    bar.close()
    rates = counts / max(n_steps, 1)
    samples = {a: torch.stack(v) if v else torch.empty(0) for a, v in kept.items()}
    return ChainResult(trace, samples, float(rates.mean()) if n_steps else float("nan"), rates)
