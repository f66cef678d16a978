"""Involutive MCMC (Gen.jl's ``metropolis_hastings(trace, proposal, args, involution)``) and
a helper for the log-Jacobian of a user's bijection, computed with ``torch.func``.

One move: the proposal ``proposal(trace, *proposal_args)`` samples auxiliary choices u; the
user's involution maps (t, u) to (t', u') and returns the new model trace, the backward
proposal choices u' and the weight log p(t') − log p(t) + log|det J|; the move is accepted
with log α = weight + log q(u'; t') − log q(u; t).  The involution must be its own inverse
(applied to (t', u') it gives back (t, u)); then the chain leaves the posterior invariant.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError
from gfcomb.core.gfi import GenerativeFunction, check_args_tuple
from gfcomb.core.trace import Trace
from gfcomb.inference.breadth import accept, check_trace, over_chains
from gfcomb.inference.importance import check_gen_fn

__all__ = ["involutive_mcmc", "log_abs_det_jacobian"]

Involution = Callable[[Trace, ChoiceMap, Any, tuple[Any, ...]],
                      tuple[Trace, ChoiceMap, torch.Tensor]]


def involutive_mcmc(trace: Trace, proposal: GenerativeFunction, proposal_args: tuple[Any, ...],
                    involution: Involution, *,
                    log_u: torch.Tensor | None = None) -> tuple[Trace, Any]:
    """One involutive MCMC move: ``(new_trace, accepted)`` (Gen.jl's semantics).

    ``proposal(trace, *proposal_args)`` is a generative function sampling the forward
    auxiliary choices; ``involution(trace, fwd_choices, fwd_retval, proposal_args)`` returns
    ``(new_trace, bwd_choices, weight)`` with weight = log p(t') − log p(t) + log|det J| (use
    the ``update`` weight of the model plus :func:`log_abs_det_jacobian` of the continuous
    part).  ``log_u`` (one per chain) is the log accept uniform, drawn when None.  A batched
    trace runs every chain in one vmapped call; the involution then runs per chain and must
    be vmap-safe.

    Math: (u, log q(u; t)) ~ proposal; (t', u', w) = involution(t, u); log q(u'; t') by
    ``assess``; log α = w + log q(u'; t') − log q(u; t); accept with probability
    min(1, exp(log α)).  For an involution (its own inverse) with the Jacobian term in w, the
    move satisfies detailed balance with respect to p.
    """
    who = "involutive_mcmc"
    check_trace(trace, who)
    check_gen_fn(proposal, "proposal", who)
    proposal_args = check_args_tuple(proposal_args, "proposal_args")
    if not callable(involution):
        raise ArgumentError(f"{who}: involution must be a function (trace, fwd_choices, "
                            "fwd_retval, proposal_args) -> (new_trace, bwd_choices, weight)")

    def one(t: Trace, lu: torch.Tensor | None) -> tuple[Trace, Any]:
        fwd_choices, fwd_score, fwd_ret = proposal.propose((t, *proposal_args))
        out = involution(t, fwd_choices, fwd_ret, proposal_args)
        if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], Trace)):
            raise ArgumentError(f"{who}: the involution must return (new_trace, bwd_choices, "
                                f"weight), got {type(out).__name__}")
        new, bwd_choices, weight = out
        bwd_score, _ = proposal.assess((new, *proposal_args), bwd_choices)
        log_alpha = weight - fwd_score + bwd_score
        log_alpha = torch.where(torch.isnan(log_alpha),
                                torch.full_like(log_alpha, -float("inf")), log_alpha)
        return accept(t, new, log_alpha, lambda: t.choices, lu)

    return over_chains(one, who, trace, log_u)


def log_abs_det_jacobian(fn: Callable[..., Any], *inputs: torch.Tensor,
                         mode: str = "fwd") -> tuple[Any, torch.Tensor]:
    """``(fn(*inputs), log|det J|)`` for a bijection ``fn`` between equal numbers of reals.

    ``inputs`` are tensors; ``fn`` returns a tensor or a tuple of tensors with as many
    elements in total as the inputs have.  J is the Jacobian of the flattened outputs with
    respect to the flattened inputs, computed with ``torch.func.jacfwd`` (``mode="fwd"``) or
    ``torch.func.jacrev`` (``mode="rev"``); works under vmap (per chain).

    Math: with x = (x_1, ..., x_n) the concatenated inputs and y = fn(x),
    log|det ∂y/∂x| = log|det J| (``torch.linalg.slogdet``).
    """
    if mode not in ("fwd", "rev"):
        raise ArgumentError(f"log_abs_det_jacobian: mode must be 'fwd' or 'rev', got {mode!r}")
    if not inputs:
        raise ArgumentError("log_abs_det_jacobian: give at least one input tensor")
    xs = [torch.as_tensor(x) for x in inputs]
    for i, x in enumerate(xs):
        if not x.is_floating_point():
            raise ArgumentError(f"log_abs_det_jacobian: input {i} must be a floating-point "
                                f"tensor, got dtype {x.dtype}")
    shapes = [x.shape for x in xs]
    sizes = [x.numel() for x in xs]

    def flat_fn(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        out = fn(*[p.reshape(s) for p, s in zip(parts, shapes)])
        outs: Sequence[torch.Tensor] = out if isinstance(out, (tuple, list)) else (out,)
        return torch.cat([torch.as_tensor(o).reshape(-1) for o in outs])

    flat = torch.cat([x.reshape(-1) for x in xs])
    outputs = fn(*xs)
    n_out = sum(torch.as_tensor(o).numel() for o in (
        outputs if isinstance(outputs, (tuple, list)) else (outputs,)))
    if n_out != flat.numel():
        raise ArgumentError(f"log_abs_det_jacobian: fn maps {flat.numel()} reals to {n_out}; "
                            "a bijection needs as many outputs as inputs")
    with warnings.catch_warnings():  # torch's forward AD warns about its own jit scripts once
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated",
                                category=DeprecationWarning)
        jac = (torch.func.jacfwd if mode == "fwd" else torch.func.jacrev)(flat_fn)(flat)
    return outputs, torch.linalg.slogdet(jac)[1]
