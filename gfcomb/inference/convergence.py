"""Split R-hat and effective sample size of MCMC chains, over the chains of one process or
of every rank of a ``torch.distributed`` group (``run_chain(..., group=...)``, DESIGN §11).

The formulas are ArviZ's ``rhat(method="split")`` and ``ess(method="mean")`` (Gelman et
al., BDA3; Geyer's initial monotone sequence): each chain's kept draws are split into two
halves, giving M split chains of h draws.  Over a group each rank sends only sums over its
own chains -- the per-chain means (pass 1), then the squared deviations from the global
mean, the within-chain variances and the autocovariances summed over its chains (pass 2) --
so the traffic is O(h · P) numbers per rank for P scalar values, whatever the number of
chains, and every rank computes the same R-hat and ESS from the same gathered sums.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from gfcomb.core.errors import ArgumentError, DistributedError
from gfcomb.inference import distributed as dist_

__all__ = ["chains_over_group", "rhat_ess"]


def _split(x: torch.Tensor, chain_ndim: int, addr: Any) -> torch.Tensor:
    """[n_kept, *chains, *value] -> split chains [2C, h, P] (float64)."""
    if x.dim() < 1 + chain_ndim or x.shape[0] < 4:
        raise ArgumentError(f"rhat_ess: the samples at {addr!r} need at least 4 kept draws and "
                            f"{chain_ndim} chain dimension(s), got shape {tuple(x.shape)}")
    n = x.shape[0]
    flat = x.detach().to(torch.float64).reshape(n, math.prod(x.shape[1:1 + chain_ndim]), -1)
    h = n // 2
    return torch.cat([flat[:h], flat[n - h:]], 1).transpose(0, 1)


def _local_moments(chains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per split chain: mean [M, P], variance (ddof 1) [M, P], autocovariance [M, h, P]."""
    h = chains.shape[1]
    mean = chains.mean(1)
    centred = chains - mean[:, None]
    f = torch.fft.rfft(centred, n=2 * h, dim=1)
    acov = torch.fft.irfft(f * f.conj(), n=2 * h, dim=1)[:, :h] / h
    return mean, centred.pow(2).sum(1) / (h - 1), acov


def _geyer_ess(mean_acov: list[float], var_chain_means: float, n_chains: int, h: int) -> float:
    """ArviZ's ``_ess`` from the chain-averaged autocovariances (one scalar value)."""
    mean_var = mean_acov[0] * h / (h - 1.0)
    var_plus = mean_var * (h - 1.0) / h + (var_chain_means if n_chains > 1 else 0.0)
    if not var_plus > 0:
        return float(n_chains * h)  # a constant chain: every draw is worth one
    rho = [0.0] * h
    rho[0] = even = 1.0
    rho[1] = odd = 1.0 - (mean_var - mean_acov[1]) / var_plus
    t = 1
    while t < h - 3 and even + odd > 0.0:
        even = 1.0 - (mean_var - mean_acov[t + 1]) / var_plus
        odd = 1.0 - (mean_var - mean_acov[t + 2]) / var_plus
        if even + odd >= 0:
            rho[t + 1], rho[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:
        rho[max_t + 1] = even
    t = 1
    while t <= max_t - 2:  # Geyer's initial monotone sequence
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2.0
        t += 2
    total = n_chains * h
    tau = -1.0 + 2.0 * sum(rho[:max_t + 1]) + sum(rho[max_t + 1:max_t + 2])
    return total / max(tau, 1.0 / math.log10(total))


def rhat_ess(samples: Mapping[Any, torch.Tensor], chain_ndim: int = 1, group: Any = None
             ) -> tuple[dict[Any, torch.Tensor], dict[Any, torch.Tensor]]:
    """``(rhat, ess)``: address -> split R-hat and ESS of every scalar value (shaped like the
    value), from ``samples[addr]`` shaped ``[n_kept, *chains (chain_ndim dims), *value]``
    (what :func:`gfcomb.inference.run_chain` records).  With ``group`` the chains are those
    of every rank (collective; the same numbers on every rank).

    Math: with M split chains of h draws, chain means m_c and variances s_c²,
    B = h · Var_c(m_c), W = mean_c s_c², R-hat = √((B / W + h − 1) / h); ESS = M h / τ̂,
    τ̂ = −1 + 2 Σ_t ρ̂_t over Geyer's initial monotone sequence of
    ρ̂_t = 1 − (W − mean_c acov_c(t)) / var⁺ (ArviZ ``rhat(method="split")``,
    ``ess(method="mean")``).
    """
    g = dist_.as_group(group, "rhat_ess")
    split = {a: _split(v, chain_ndim, a) for a, v in samples.items()}
    moments = {a: _local_moments(c) for a, c in split.items()}
    sums = {a: (m[0].shape[0], m[0].sum(0)) for a, m in moments.items()}
    if g is not None:  # pass 1: the number of chains and the sum of their means
        stats, _ = dist_.gather_stats(
            g, "rhat_ess", lambda: ([x for c, s in sums.values() for x in (float(c), s)], None),
            sum(1 + s.numel() for _, s in sums.values()))
        total = stats.sum(0)
        off = 0
        for a, (_c, s) in sums.items():
            sums[a] = (int(total[off]), total[off + 1:off + 1 + s.numel()])
            off += 1 + s.numel()
    parts = {}
    for a, (mean, var, acov) in moments.items():
        n_chains, mean_sum = sums[a]
        grand = mean_sum / n_chains
        parts[a] = [(mean - grand).pow(2).sum(0), var.sum(0), acov.sum(0).reshape(-1)]
    if g is not None:  # pass 2: squared deviations, variances, autocovariances
        stats, _ = dist_.gather_stats(g, "rhat_ess", lambda: ([x for p in parts.values()
                                                              for x in p], None),
                                      sum(x.numel() for p in parts.values() for x in p))
        total = stats.sum(0)
        off = 0
        for a, p in parts.items():
            new = []
            for x in p:
                new.append(total[off:off + x.numel()].reshape(x.shape))
                off += x.numel()
            parts[a] = new
    rhat, ess = {}, {}
    for a, (dev, var, acov_sum) in parts.items():
        n_chains, h = sums[a][0], split[a].shape[1]
        var_means = dev / (n_chains - 1)
        within = var / n_chains
        r = torch.sqrt((h * var_means / within + h - 1) / h)
        mean_acov = (acov_sum.reshape(h, -1) / n_chains).T.tolist()
        e = torch.tensor([_geyer_ess(ac, float(vm), n_chains, h)
                          for ac, vm in zip(mean_acov, var_means.tolist())],
                         dtype=torch.float64)
        shape = samples[a].shape[1 + chain_ndim:]
        rhat[a], ess[a] = r.reshape(shape), e.reshape(shape)
    return rhat, ess


def chains_over_group(run: Callable[[], Any], addresses: list[Any], group: Any,
                      who: str = "run_chain") -> tuple[Any, float, dict[Any, torch.Tensor],
                                                       dict[Any, torch.Tensor]]:
    """Run this rank's chains (``run()`` returns a ChainResult) and combine over the group:
    ``(result, global acceptance rate, rhat, ess)``.  A rank whose ``run`` raised makes
    every rank raise :class:`RankFailedError` (at the end of the run: one collective).

    Math: the global acceptance rate is the mean of every kernel's rate over every chain of
    every rank; R-hat and ESS as in :func:`rhat_ess` over all chains.
    """
    g = dist_.as_group(group, who)
    assert g is not None

    def local() -> tuple[list[Any], Any]:
        res = run()
        rates = res.acceptance_rates
        chain_ndim = rates.dim() - 1
        shapes = [(repr(a), tuple(res.samples[a].shape[:1]),
                   tuple(res.samples[a].shape[1 + chain_ndim:])) for a in addresses]
        check = zlib.crc32(repr((chain_ndim, shapes)).encode())
        return [rates.sum(), float(rates.numel()), float(check)], res

    stats, res = dist_.gather_stats(g, who, local, 3)
    if bool((stats[:, 2] != stats[0, 2]).any()):
        raise DistributedError(f"{who}: the ranks recorded different addresses, numbers of "
                               "draws or value shapes: every rank must run the same chains")
    rate = float(stats[:, 0].sum() / stats[:, 1].sum())
    chain_ndim = res.acceptance_rates.dim() - 1
    samples = {a: res.samples[a] for a in addresses  # (R-hat needs 4 draws: else none)
               if res.samples[a].dim() >= 1 + chain_ndim and res.samples[a].shape[0] >= 4}
    if not samples:
        return res, rate, {}, {}
    rhat, ess = rhat_ess(samples, chain_ndim, g)
    return res, rate, rhat, ess
