"""MAP optimisation of selected continuous choices (Gen.jl's ``map_optimize``): gradient
ascent on log p(t) with a backtracking line search, on one trace or on a batched trace of
many chains (each with its own step sizes, all in lockstep)."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError
from gfcomb.core.pytree import tree_where
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.inference.breadth import (
    check_positive_float,
    check_positive_int,
    check_selection,
    check_trace,
    distribution_at,
    float_leaves,
    inside_functorch_transform,
    over_chains,
    write,
)

__all__ = ["map_optimize"]


def _step(values: ChoiceMap, grads: ChoiceMap, size: torch.Tensor) -> ChoiceMap:
    """values + size · grads on the floating-point leaves (others kept)."""
    lv, spec = pytree.tree_flatten(values)
    lg = pytree.tree_leaves(grads)
    if len(lv) != len(lg):
        raise ArgumentError("map_optimize: the gradients do not have the structure of the "
                            "selected values")
    out = [v + size * g if isinstance(v, torch.Tensor) and v.is_floating_point()
           and isinstance(g, torch.Tensor) else v for v, g in zip(lv, lg)]
    return pytree.tree_unflatten(out, spec)


def map_optimize(trace: Trace, selection: Selection, n_steps: int = 100, lr: float = 0.1, *,
                 tau: float = 0.5, max_backtracks: int = 30) -> Trace:
    """Maximise log p(t) over the selected continuous choices: the optimised trace.

    Each of ``n_steps`` iterations takes the gradient g = ∇ log p at the selected choices
    (``choice_gradients``) and tries step sizes ``lr``, ``lr·tau``, ``lr·tau²``, ... (at most
    ``max_backtracks`` shrinks) until the score increases; a chain whose score does not
    increase at any of them keeps its state and stops (it is at a maximum, to that
    precision).  A batched trace optimises every chain in lockstep, one
    vmapped ``update`` per trial.

    Math: x ← x + s g with s = lr·τ^j, j the smallest integer with log p(x + s g) > log p(x)
    (Gen.jl's backtracking ``map_optimize``, max_step_size = lr); log p never decreases and
    for a smooth concave log p the iterates converge to the mode.
    """
    who = "map_optimize"
    check_trace(trace, who)
    check_selection(selection, who)
    if inside_functorch_transform():
        raise ArgumentError(f"{who}: call it on a (batched) trace outside torch.func.vmap; it "
                            "vmaps over the chains itself")
    check_positive_int(n_steps, "n_steps", who, minimum=0)
    lr = check_positive_float(lr, "lr", who)
    tau = check_positive_float(tau, "tau", who)
    if tau >= 1:
        raise ArgumentError(f"{who}: tau must be in (0, 1), got {tau}")
    check_positive_int(max_backtracks, "max_backtracks", who)
    selected = trace.choices.filter(selection)
    leaves = [v for _, v in selected.items(stacked=True)]
    if not leaves:
        raise ArgumentError(f"{who}: the selection {selection!r} selects no choice of the trace")
    for addr, v in selected.items(stacked=True):
        found = distribution_at(trace, addr)
        if not (isinstance(v, torch.Tensor) and v.is_floating_point()) or (
                found is not None and found[0].discrete):
            raise ArgumentError(f"{who}: the choice at {addr!r} is not continuous; map_optimize "
                                "moves continuous choices only")

    def gradient(t: Trace) -> tuple[Trace, ChoiceMap, ChoiceMap]:
        _, values, grads = t.gen_fn.choice_gradients(t, selection, None)
        twin, _, _ = write(t, values)  # the state in the record type of the trial moves
        return twin, values, grads

    def trial(t: Trace, values: ChoiceMap, grads: ChoiceMap,
              size: torch.Tensor) -> Trace:
        new, _, _ = write(t, _step(values, grads, size))
        return new

    current = trace
    active = torch.ones_like(trace.score, dtype=torch.bool)  # chains not yet at a maximum
    for _ in range(n_steps):
        current, values, grads = over_chains(gradient, who, current)
        if not float_leaves(grads):
            break
        size = torch.full_like(current.score, lr)
        best = current
        done = ~active
        for _ in range(max_backtracks):
            proposed = over_chains(trial, who, current, values, grads, size)
            ok = (proposed.score > current.score) & ~done
            best = tree_where(ok, proposed, best)
            done = done | ok
            if bool(done.all()):
                break
            size = torch.where(done, size, size * tau)
        improved = done & active
        active = improved  # no step size improved the score: converged (Gen.jl stops there)
        current = best
        if not bool(active.any()):
            break
    return current
