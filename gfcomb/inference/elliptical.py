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
from torch.utils import _pytree as pytree

from gfcomb.core.batched import select_batch
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError
from gfcomb.core.selection import select
from gfcomb.core.trace import Trace
from gfcomb.inference.breadth import (
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
        return f, f - mu, nu, log_y, theta, theta - 2 * math.pi, theta

    def point(f0: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return f0 * torch.cos(theta) + nu * torch.sin(theta) + mu

    def attempt(t: Trace, f_new: torch.Tensor) -> torch.Tensor:
        new, _, _ = write(t, ChoiceMap({path: f_new}))
        return loglik(new)

    f_acc, f0, nu, log_y, theta, lo, hi = over_chains(start, who, trace)
    done = torch.zeros_like(log_y, dtype=torch.bool)
    subset = chain_dims == 1  # one chain axis: only the chains still searching are run
    for _ in range(max_shrinks):
        f_new = point(f0, nu, theta.reshape(theta.shape + (1,) * (f0.dim() - theta.dim())))
        sub = None
        if subset:
            rows = torch.nonzero(~done).reshape(-1)
            sub = select_batch(trace, rows)
            if any(x.dim() == 0 or x.shape[0] != rows.shape[0] for x in
                   pytree.tree_leaves(sub) if isinstance(x, torch.Tensor)):
                sub = None  # rows over a shared store (Unfold history): run every chain
        if sub is not None:
            ll = over_chains(attempt, who, sub, f_new[rows])
            ok_rows = rows[ll > log_y[rows]]
            f_acc = f_acc.index_copy(0, ok_rows, f_new[ok_rows])
            done = done.index_fill(0, ok_rows, True)
        else:
            ll = over_chains(attempt, who, trace, f_new)
            ok = (ll > log_y) & ~done
            f_acc = torch.where(ok.reshape(ok.shape + (1,) * (f_acc.dim() - ok.dim())), f_new,
                                f_acc)
            done = done | ok
        if bool(done.all()):
            break
        lo = torch.where(theta < 0, theta, lo)
        hi = torch.where(theta < 0, hi, theta)
        theta = torch.where(done, theta, lo + torch.rand_like(theta) * (hi - lo))
    if not is_batched_trace(trace):
        if not bool(done):
            return trace, False
        return write(trace, ChoiceMap({path: f_acc}))[0], True
    result = over_chains(lambda t, f: write(t, ChoiceMap({path: f}))[0], who, trace, f_acc)
    return result, done
