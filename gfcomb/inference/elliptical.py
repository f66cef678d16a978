"""Elliptical slice sampling (Murray, Adams & MacKay 2010; Gen.jl's ``elliptical_slice``) of
a choice whose prior is Gaussian, on one trace or on a batched trace of many chains.

The chains run the shrinking-bracket loop in lockstep: every iteration is one vmapped
``update`` of all chains, and a chain that has found its point keeps it while the others go
on shrinking.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError
from gfcomb.core.pytree import tree_index, tree_scatter, tree_where
from gfcomb.core.selection import select
from gfcomb.core.trace import Trace
from gfcomb.inference._breadth import (
    check_positive_int,
    check_trace,
    inside_functorch_transform,
    over_chains,
    write,
)
from gfcomb.inference.mcmc import is_batched_trace

__all__ = ["elliptical_slice"]


def _factor(value: torch.Tensor, mean: Any, cov: Any,
            ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(mean, cholesky factor or std, is_scalar)`` checked against one chain's value."""
    mean_t = torch.as_tensor(mean, dtype=value.dtype, device=value.device)
    cov_t = torch.as_tensor(cov, dtype=value.dtype, device=value.device)
    if value.dim() == 0:
        if cov_t.numel() != 1:
            raise ArgumentError(f"elliptical_slice: the choice is a scalar, so cov must be its "
                                f"variance (a number), got shape {tuple(cov_t.shape)}")
        if not bool(cov_t.reshape(()) > 0):
            raise ArgumentError("elliptical_slice: cov (the prior variance) must be positive")
        return mean_t.reshape(()), cov_t.reshape(()).sqrt(), True
    if value.dim() != 1:
        raise ArgumentError(f"elliptical_slice: the choice must be a scalar or a vector, got "
                            f"shape {tuple(value.shape)}")
    d = value.shape[0]
    if cov_t.shape != (d, d):
        raise ArgumentError(f"elliptical_slice: cov must have shape {(d, d)} for a choice of "
                            f"shape {(d,)}, got {tuple(cov_t.shape)}")
    if mean_t.dim() > 1 or (mean_t.dim() == 1 and mean_t.shape[0] != d):
        raise ArgumentError(f"elliptical_slice: mean must be a number or have shape {(d,)}, "
                            f"got {tuple(mean_t.shape)}")
    chol, info = torch.linalg.cholesky_ex(cov_t)
    if int(info) != 0:
        raise ArgumentError("elliptical_slice: cov must be symmetric positive definite")
    return mean_t.expand(d), chol, False


def elliptical_slice(trace: Trace, addr: Any, mean: Any, cov: Any, *,
                     max_shrinks: int = 200) -> tuple[Trace, Any]:
    """One elliptical slice sampling move of the choice at ``addr``: ``(new_trace, accepted)``.

    The prior of the choice must be Gaussian with ``mean`` and covariance ``cov`` (a number:
    the variance of a scalar choice; a ``[d, d]`` matrix for a ``[d]`` vector).  The move
    always finds a point (``accepted`` True) unless ``max_shrinks`` bracket shrinks do not
    suffice (then the chain keeps its state).  A batched trace (leading chain axis) runs every
    chain in lockstep, one vmapped ``update`` per iteration.

    Math: with log L(t) = log p(t) − log p(t[addr]) (the score minus the prior term of the
    choice, :meth:`project`), draw ν ~ N(0, cov), log y = log L(t) + log U, θ ~ U(0, 2π),
    bracket [θ − 2π, θ]; propose f' = (f − μ) cos θ + ν sin θ + μ and accept the first with
    log L > log y, shrinking the bracket towards 0 after each rejection.  The move leaves
    p(f | rest) ∝ N(f; μ, cov) L(f) invariant.
    """
    who = "elliptical_slice"
    check_trace(trace, who)
    if inside_functorch_transform():
        raise ArgumentError(f"{who}: call it on a (batched) trace outside torch.func.vmap; it "
                            "vmaps over the chains itself")
    check_positive_int(max_shrinks, "max_shrinks", who)
    path = addr if isinstance(addr, tuple) else (addr,)
    value = trace[path]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ArgumentError(f"{who}: the choice at {path!r} must be a floating-point tensor")
    chain_dims = trace.score.dim()
    mu, factor, scalar = _factor(value[(0,) * chain_dims] if chain_dims else value, mean, cov)
    sel = select(path)

    def loglik(t: Trace) -> torch.Tensor:
        return t.score - t.gen_fn.project(t, sel)

    def start(t: Trace) -> tuple[Any, ...]:
        f = t[path]
        eps = torch.randn_like(f)
        nu = factor * eps if scalar else factor @ eps
        log_y = loglik(t) + torch.log(torch.rand_like(t.score).clamp_min(1e-300))
        theta = torch.rand_like(t.score) * (2 * math.pi)
        twin, _, _ = write(t, ChoiceMap({path: f}))  # the state in the record type of moves
        return twin, f - mu, nu, log_y, theta, theta - 2 * math.pi, theta

    def attempt(t: Trace, f0: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor,
                ) -> tuple[Trace, torch.Tensor]:
        f_new = f0 * torch.cos(theta) + nu * torch.sin(theta) + mu
        new, _, _ = write(t, ChoiceMap({path: f_new}))
        return new, loglik(new)

    current, f0, nu, log_y, theta, lo, hi = over_chains(start, who, trace)
    result = current
    done = torch.zeros_like(log_y, dtype=torch.bool)
    subset = chain_dims == 1  # one chain axis: only the chains still searching are run
    for _ in range(max_shrinks):
        if subset:
            rows = torch.nonzero(~done).reshape(-1)
            proposed, ll = over_chains(attempt, who, tree_index(current, rows), f0[rows],
                                       nu[rows], theta[rows])
            ok_rows = torch.nonzero(ll > log_y[rows]).reshape(-1)
            result = tree_scatter(result, rows[ok_rows], tree_index(proposed, ok_rows))
            done = done.index_fill(0, rows[ok_rows], True)
        else:
            proposed, ll = over_chains(attempt, who, current, f0, nu, theta)
            ok = (ll > log_y) & ~done
            result = tree_where(ok, proposed, result)
            done = done | ok
        if bool(done.all()):
            break
        lo = torch.where(theta < 0, theta, lo)
        hi = torch.where(theta < 0, hi, theta)
        theta = torch.where(done, theta, lo + torch.rand_like(theta) * (hi - lo))
    if not is_batched_trace(trace):
        return (result, True) if bool(done) else (trace, False)
    return result, done
