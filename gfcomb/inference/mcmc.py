"""MCMC kernels on top of the GFI: Metropolis–Hastings (prior and custom proposals), MALA and
HMC, each on one trace or on a *batched* trace of many chains at once.

Every kernel returns ``(new_trace, accepted)``; nothing is mutated.  A trace whose score has a
leading dimension (``trace.score.dim() > 0``) is a batch of independent chains: with one such
dimension the move runs on the whole batch with the model's batch methods and batched
gradients (:mod:`gfcomb.core.gradients`), otherwise per chain under ``torch.func.vmap``
(results equal); each chain accepts or rejects on its own and ``accepted`` is a bool tensor
with one entry per chain.  For one chain ``accepted`` is a Python bool.

The kernels follow Gen.jl (``mh``, ``mala``, ``hmc`` in ``Gen.inference``):

* ``mh(trace, selection)`` proposes the selected choices from the prior with ``regenerate``,
  whose weight is the log acceptance ratio;
* ``mh(trace, proposal, proposal_args)`` runs the generative function
  ``proposal(trace, *proposal_args)``, writes its choices into the trace with ``update`` and
  accepts with log ratio ``update weight + log q(discard; t') − log q(proposed; t)``
  (Gen.jl's involution-free variant: the proposal's choices must be at model addresses, and the
  reverse move proposes the discarded old values);
* ``mala(trace, selection, tau)``: Langevin proposal ``t' ~ N(t + τ ∇log p(t), 2τ)``;
* ``hmc(trace, selection, n_steps, step_size)``: leapfrog with unit mass.

Each kernel is the composition of a *proposal* function (:func:`mh_propose`,
:func:`mh_propose_custom`, :func:`mala_propose`, :func:`hmc_propose`), which returns the
proposed trace and the log acceptance ratio, and :func:`accept_reject`.  The random inputs
that are not drawn by a GFI method (the accept uniform, MALA's noise, HMC's momentum) may be
passed in (``log_u=``, ``noise=``, ``momentum=``) to make a move reproducible.

:func:`run_chain` runs a kernel for many steps with a progress bar and collects samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from gfcomb.core.address import format_address
from gfcomb.core.batching import inside_functorch_transform, is_batched
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import NoChange
from gfcomb.core.errors import ArgumentError, DistributionArgumentError
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.core.gradients import (
    batch_gradients_at,
    choice_value_gradients,
    grads_or_zeros,
    has_default_gradients,
    is_row_batch,
)
from gfcomb.core.pytree import same_tree_structure, tree_map_tensors, tree_where
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import PerRow, batched_call, own_args
from gfcomb.inference.rows import accept_rows

__all__ = [
    "accept_reject",
    "hmc",
    "hmc_propose",
    "is_batched_trace",
    "mala",
    "mala_propose",
    "mh",
    "mh_propose",
    "mh_propose_custom",
]

_LOG_2PI = math.log(2 * math.pi)


# ------------------------------------------------------------------------------ helpers
def is_batched_trace(trace: Trace) -> bool:
    """True if ``trace`` is a batch of traces (a leading chain/particle dimension).

    Inside a vmapped kernel a batched trace looks like one trace (its score is 0-d), so this
    is also the test of "is there still a batch dimension to map over".
    """
    score = trace.score
    return isinstance(score, torch.Tensor) and score.dim() > 0


def _over_chains(fn: Callable[..., Any], who: str, trace: Trace, *per_chain: Any) -> Any:
    """``fn(trace, *per_chain)``, run per chain under one vmap when ``trace`` is batched.

    ``per_chain`` are optional inputs with the same leading dimension as the trace (None is
    allowed).  Several leading dimensions are handled by nesting.
    """
    if not is_batched_trace(trace):
        return fn(trace, *per_chain)
    n = trace.score.shape[0]

    def one(t: Trace, *extra: Any) -> Any:
        return _over_chains(fn, who, t, *extra)

    call = batched_call(one, (0,) * (1 + len(per_chain)), vectorize=True, length=n, who=who)
    return call(trace, *per_chain)


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _map_values(fn: Callable[..., torch.Tensor], tree: Any, *others: Any) -> Any:
    """Apply ``fn`` to the floating-point leaves of ``tree`` (and the matching leaves of
    ``others``, trees of the same structure); other leaves (masks) are kept from ``tree``."""
    leaves, spec = pytree.tree_flatten(tree)
    other_leaves = [pytree.tree_leaves(o) for o in others]
    for o in other_leaves:
        if len(o) != len(leaves):
            raise ArgumentError("MCMC: a given momentum/noise does not have the structure of "
                                "the selected choices")
    out = [fn(x, *(o[j] for o in other_leaves)) if _is_float(x) else x
           for j, x in enumerate(leaves)]
    return pytree.tree_unflatten(out, spec)


def _sum_values(fn: Callable[..., torch.Tensor], tree: Any, *others: Any,
                rows: bool = False) -> torch.Tensor:
    """Σ over the floating-point leaves of ``fn(leaf, *matching leaves).sum()``; with
    ``rows`` (a batch: a leading row axis on every leaf) one sum per row."""
    leaves = pytree.tree_leaves(tree)
    other_leaves = [pytree.tree_leaves(o) for o in others]
    total: torch.Tensor | float = 0.0
    for j, x in enumerate(leaves):
        if _is_float(x):
            v = fn(x, *(o[j] for o in other_leaves))
            total = total + (v.reshape(v.shape[0], -1).sum(1) if rows else v.sum())
    return torch.as_tensor(total)


def _normal_logpdf(x: torch.Tensor, mu: torch.Tensor, std: float) -> torch.Tensor:
    return -0.5 * ((x - mu) / std) ** 2 - math.log(std) - 0.5 * _LOG_2PI


def _no_change(trace: Trace) -> tuple[NoChange, ...]:
    return (NoChange(),) * len(trace.args)


def _write_values(trace: Trace, values: ChoiceMap) -> tuple[Trace, torch.Tensor, ChoiceMap]:
    """``update`` with the selected choices set to ``values``: ``(trace', weight, discard)``;
    on a batch (:func:`is_row_batch`) ``batch_update`` with one set of values per row (which
    keeps the batch's storage: an Unfold's shared step history stays shared)."""
    if is_row_batch(trace):
        new, weight, _, discard = trace.gen_fn.batch_update(
            trace, own_args(trace), _no_change(trace), PerRow(values))
    else:
        new, weight, _, discard = trace.gen_fn.update(trace, trace.args, _no_change(trace),
                                                      values)
    return new, weight, discard


def _moved(trace: Trace, selection: Selection,
           values: ChoiceMap) -> tuple[Trace, torch.Tensor, ChoiceMap]:
    """``(trace', weight, ∇ log p(trace'))`` with the selected choices set to ``values``.  On
    the batch path the gradient comes from the ``batch_update``'s own graph (one forward
    pass, not a second one to differentiate); per chain, update then gradients."""
    if not _rows_path(trace):
        new, weight, _ = _write_values(trace, values)
        return new, weight, _gradients(new, selection)[1]
    leaves, spec = pytree.tree_flatten(values)
    live = [x.detach().requires_grad_(True) if _is_float(x) else x for x in leaves]
    with torch.enable_grad():
        new, weight, _ = _write_values(trace, pytree.tree_unflatten(live, spec))
        found = iter(grads_or_zeros(new.score.sum(), [x for x in live if _is_float(x)]))
    grads = [next(found).detach() if _is_float(x) else x for x in live]
    return (tree_map_tensors(_detached, new), weight.detach(),
            pytree.tree_unflatten(grads, spec))


def _detached(x: torch.Tensor) -> torch.Tensor:
    return x.detach() if x.requires_grad else x


def _rows_path(trace: Trace) -> bool:
    """Whether a gradient move on ``trace`` runs on the whole batch at once: a batch (see
    :func:`is_row_batch`) of a function with the default gradients (else per chain)."""
    return is_row_batch(trace) and has_default_gradients(trace.gen_fn)


def _continuous_selected(trace: Trace, selection: Selection, who: str) -> ChoiceMap:
    """The selected choices of ``trace``; ArgumentError if there are none or one of them is
    discrete (gradient-based moves need continuous choices)."""
    if not isinstance(selection, Selection):
        raise ArgumentError(f"{who}: selection must be a gfcomb Selection (gf.select(...)), "
                            f"got {type(selection).__name__}")
    selected = ChoiceMap.empty() if selection.is_empty_static() else \
        trace.choices.filter(selection)
    items = list(_selected_items(selected, ()))
    if not items:
        raise ArgumentError(f"{who}: the selection {selection!r} selects no choice of the "
                            "trace; select the continuous choices to move")
    discrete = list(trace.discrete_addresses())
    for addr, value in items:
        if not _is_float(value) or any(_matches(addr, pat) for pat in discrete):
            raise ArgumentError(
                f"{who}: the choice at address {_show_address(addr)} is discrete; {who} moves "
                "continuous choices only (use mh for discrete ones)")
    return selected


_ANY = slice(None)  # "every element" in an address pattern


def _selected_items(cm: ChoiceMap, prefix: tuple[Any, ...]) -> Iterator[tuple[Any, Any]]:
    """``(address, value)`` for the values of ``cm`` present somewhere (stacked blocks once,
    with ``:`` for the element key; a masked value counts when its mask is true for some
    element, or when the mask is only known per element under vmap)."""
    if cm.is_value():
        mask = cm.mask
        if mask is None or is_batched(mask) or bool(mask.any()):
            yield prefix, cm.get_value()
    elif cm.is_stacked():
        yield from _selected_items(cm.stacked_inner, prefix + (_ANY,))
    else:
        for key in cm.keys():
            yield from _selected_items(cm.get_submap(key), prefix + (key,))


def _matches(addr: tuple[Any, ...], pattern: tuple[Any, ...]) -> bool:
    """Whether a (stacked) choice address and a pattern can name the same choice."""
    if len(addr) != len(pattern):
        return False
    return all(isinstance(a, slice) or isinstance(p, slice) or a == p
               for a, p in zip(addr, pattern))


def _show_address(addr: tuple[Any, ...]) -> str:
    """An address for messages; ``:`` stands for all elements of a stacked block."""
    if any(isinstance(k, slice) for k in addr):
        return "(" + ", ".join(":" if isinstance(k, slice) else repr(k) for k in addr) + ")"
    return format_address(addr)


def _gradients(trace: Trace, selection: Selection) -> tuple[ChoiceMap, ChoiceMap]:
    """``(values, ∇ log p)`` of the selected choices (retval gradient zero, as in Gen.jl;
    no argument gradients); on a batch, every row's at once."""
    return choice_value_gradients(trace, selection)


# ------------------------------------------------------------------------------ accept
def accept_reject(trace: Trace, proposed: Trace, log_alpha: torch.Tensor,
                  log_u: torch.Tensor | None = None) -> tuple[Trace, Any]:
    """Metropolis–Hastings accept step: ``(proposed, True)`` if ``log u < log_alpha`` else
    ``(trace, False)``, with ``u ~ Uniform(0, 1)`` (or ``log_u`` when given).

    Math: accept with probability min(1, exp(log_alpha)); a NaN or −inf ``log_alpha``
    rejects.  On batched inputs (a leading chain dimension, or inside vmap) every chain
    decides on its own: leaves are picked with ``torch.where`` and ``accepted`` is a bool
    tensor; for one chain ``accepted`` is a Python bool and the chosen record is returned
    as it is.
    """
    if not isinstance(log_alpha, torch.Tensor):
        log_alpha = torch.as_tensor(log_alpha, dtype=torch.get_default_dtype())
    if log_u is None:
        log_u = torch.log(torch.rand_like(log_alpha))
    accepted = log_u < log_alpha
    if inside_functorch_transform() or accepted.dim() > 0:
        return tree_where(accepted, proposed, trace), accepted
    if bool(accepted):
        return proposed, True
    return trace, False


def _accept(trace: Trace, move: tuple[Trace, torch.Tensor, Callable[[], ChoiceMap]],
            log_u: torch.Tensor | None) -> tuple[Trace, Any]:
    """Accept step of a kernel: ``move`` = (proposed, log α, old values of the moved
    choices).  Under vmap, when the proposed trace's record structure differs from the old
    one's (an Unfold trace whose steps sit in a shared history, say), the old trace is
    re-expressed in the proposal's structure -- by :meth:`Trace.with_layout_of` (O(the steps
    the move touched)), else by ``update``-ing it with its own values (a no-op on values and
    score) -- so that the two can be merged per chain."""
    proposed, log_alpha, old_values = move
    if inside_functorch_transform():
        if not same_tree_structure(trace, proposed):
            trace = trace.with_layout_of(proposed)  # (a history split where the move's is)
        if not same_tree_structure(trace, proposed):
            twin, _, _ = _write_values(trace, old_values())
            if not same_tree_structure(twin, proposed):
                raise ArgumentError(
                    f"{type(trace.gen_fn).__name__}: the proposed trace and the current trace "
                    "have different structures (different addresses per chain?), so the "
                    "chains cannot be merged in one vmapped accept step")
            trace = twin
    return accept_reject(trace, proposed, log_alpha, log_u)


def _propose_or_reject(trace: Trace, make_move: Callable[[], tuple[Trace, torch.Tensor, Any]],
                       log_u: torch.Tensor | None) -> tuple[Trace, Any]:
    """Propose with ``make_move()`` and accept or reject; a proposal whose values or
    densities are not finite is rejected, not raised.

    Math: a proposal outside the support (or overflowing: a step size of 1e200, a stiff
    model) has target density 0 or undefined, so its acceptance probability is 0.  Under
    vmap such proposals give a NaN or -inf log α, which :func:`accept_reject` rejects per
    chain; on a single trace, where arguments are validated, the DistributionArgumentError
    (non-finite or out-of-support parameters) or the non-finite values it would raise on
    are that rejection.
    """
    try:
        move = make_move()
    except DistributionArgumentError:
        if inside_functorch_transform():
            raise
        return trace, False
    return _accept(trace, move, log_u)  # (a NaN or -inf log α rejects there)


# ------------------------------------------------------------------------------ MH
def mh_propose(trace: Trace, selection: Selection) -> tuple[Trace, torch.Tensor]:
    """Propose the selected choices from the prior: ``(proposed trace, log acceptance ratio)``.

    Math: ``regenerate``'s weight, Σ over unselected retained choices of
    log p(t'[a] | ...) − log p(t[a] | ...), which is the MH log acceptance ratio of the
    prior (resimulation) proposal.  Runs per chain on a batched trace.
    """
    if not isinstance(selection, Selection):
        raise ArgumentError(f"mh: selection must be a gfcomb Selection, got "
                            f"{type(selection).__name__}")

    return _over_chains(lambda t: _mh_move(t, selection)[:2], "mh", trace)


def _mh_move(t: Trace, selection: Selection) -> tuple[Trace, torch.Tensor, Any]:
    """One chain's prior proposal, or every row's of a batch (:func:`is_row_batch`: one
    ``batch_regenerate``): (proposed, log α, old values of the selection)."""
    if is_row_batch(t):
        new, weight, _ = t.gen_fn.batch_regenerate(t, own_args(t), _no_change(t), selection)
    else:
        new, weight, _ = t.gen_fn.regenerate(t, t.args, _no_change(t), selection)
    return new, weight, lambda: t.choices.filter(selection)


def mh_propose_custom(trace: Trace, proposal: GenerativeFunction,
                      proposal_args: tuple[Any, ...] = ()) -> tuple[Trace, torch.Tensor]:
    """Propose with a custom proposal generative function: ``(proposed, log ratio)``.

    The proposal is called as ``proposal(trace, *proposal_args)``; its choices (at model
    addresses) are written into the trace with ``update``; the reverse move is scored by
    ``assess``-ing the proposal, from the new trace, on the ``discard`` (the old values).

    Math: log α = w_update + log q(discard; t', args) − log q(proposed; t, args), where
    w_update = log p(t') − log p(t) (Gen.jl's ``metropolis_hastings`` without involution).
    ``proposal_args`` are shared by all chains of a batched trace.
    """
    if not isinstance(proposal, GenerativeFunction):
        raise ArgumentError(f"mh: proposal must be a generative function, got {proposal!r}")
    proposal_args = tuple(proposal_args)

    return _over_chains(lambda t: _mh_custom_move(t, proposal, proposal_args)[:2], "mh", trace)


def _mh_custom_move(t: Trace, proposal: GenerativeFunction,
                    proposal_args: tuple[Any, ...]) -> tuple[Trace, torch.Tensor, Any]:
    """One chain's custom-proposal move: (proposed, log α, old values = the discard)."""
    fwd_choices, fwd_score, _ = proposal.propose((t, *proposal_args))
    new, weight, discard = _write_values(t, fwd_choices)
    bwd_score, _ = proposal.assess((new, *proposal_args), discard)
    return new, weight - fwd_score + bwd_score, lambda: discard


def mh(trace: Trace, selection_or_proposal: Selection | GenerativeFunction,
       proposal_args: tuple[Any, ...] = (), *,
       log_u: torch.Tensor | None = None) -> tuple[Trace, Any]:
    """One Metropolis–Hastings move: ``(new_trace, accepted)``.

    ``mh(trace, selection)`` resamples the selected choices from the prior (``regenerate``);
    ``mh(trace, proposal, proposal_args)`` uses a custom proposal generative function called
    as ``proposal(trace, *proposal_args)`` (see :func:`mh_propose_custom`).  ``log_u`` is the
    log of the accept uniform (one per chain; drawn when None).

    Math: accept with probability min(1, exp(log α)), log α from :func:`mh_propose` (prior
    proposal: the regenerate weight) or :func:`mh_propose_custom`.  A batched trace runs
    every chain in one vmapped call and ``accepted`` is a bool tensor per chain.
    """
    batch_move: Callable[[], tuple[Trace, torch.Tensor, Any]] | None = None
    if isinstance(selection_or_proposal, Selection):
        if proposal_args:
            raise ArgumentError("mh(trace, selection) takes no proposal_args")
        if is_row_batch(trace):
            def batch_move() -> tuple[Trace, torch.Tensor, Any]:
                return _mh_move(trace, selection_or_proposal)

        def one(t: Trace, lu: torch.Tensor | None) -> tuple[Trace, Any]:
            return _propose_or_reject(t, lambda: _mh_move(t, selection_or_proposal), lu)
    elif isinstance(selection_or_proposal, GenerativeFunction):
        def one(t: Trace, lu: torch.Tensor | None) -> tuple[Trace, Any]:
            return _propose_or_reject(
                t, lambda: _mh_custom_move(t, selection_or_proposal, proposal_args), lu)
    else:
        raise ArgumentError("mh: the second argument must be a Selection or a proposal "
                            f"generative function, got {selection_or_proposal!r}")
    return _run(trace, "mh", one, batch_move, log_u)


def _run(trace: Trace, who: str, one: Callable[..., tuple[Trace, Any]],
         batch_move: Callable[[], tuple[Trace, torch.Tensor, Any]] | None,
         log_u: torch.Tensor | None, *per_chain: Any) -> tuple[Trace, Any]:
    """A kernel: ``batch_move()`` on the whole batch, accepted per row (:func:`accept_rows`),
    when given; else ``one(trace, *per_chain, log_u)`` per chain (:func:`_over_chains`)."""
    def general() -> tuple[Trace, Any]:
        return _over_chains(one, who, trace, *per_chain, log_u)

    return general() if batch_move is None else accept_rows(trace, batch_move, log_u, general)


# ------------------------------------------------------------------------------ MALA
def _check_positive(value: float, name: str, who: str) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ArgumentError(f"{who}: {name} must be a positive finite number, got {value}")
    return value


def mala_propose(trace: Trace, selection: Selection, tau: float,
                 noise: ChoiceMap | None = None) -> tuple[Trace, torch.Tensor]:
    """Langevin proposal for the selected continuous choices: ``(proposed, log ratio)``.

    ``noise`` (standard normal values with the structure of the selected choices, one set per
    chain) is drawn when None.

    Math: t' = t + τ ∇log p(t) + √(2τ) ε, ε ~ N(0, I);
    log α = log p(t') − log p(t) + log N(t; t' + τ∇log p(t'), 2τ) − log N(t'; t + τ∇log p(t), 2τ).
    """
    tau = _check_positive(tau, "tau", "mala")
    if _rows_path(trace):
        return _mala_move(trace, selection, tau, noise)[:2]
    return _over_chains(lambda t, e: _mala_move(t, selection, tau, e)[:2], "mala", trace,
                        noise)


def _mala_move(t: Trace, selection: Selection, tau: float,
               eps: ChoiceMap | None) -> tuple[Trace, torch.Tensor, Any]:
    """One chain's MALA proposal, or every row's of a batch at once (:func:`_rows_path`,
    with batch methods and batched gradients): (proposed, log α, old values)."""
    std = math.sqrt(2 * tau)
    rows = _rows_path(t)
    _continuous_selected(t, selection, "mala")
    values, grads = _gradients(t, selection)
    fwd_mu = _map_values(lambda v, g: v + tau * g, values, grads)
    if eps is None:
        eps = _map_values(torch.randn_like, values)
    proposed = _map_values(lambda m, e: m + std * e, fwd_mu, eps)
    fwd_score = _sum_values(lambda x, m: _normal_logpdf(x, m, std), proposed, fwd_mu,
                            rows=rows)
    new, weight, bwd_grads = _moved(t, selection, proposed)
    bwd_mu = _map_values(lambda p, g: p + tau * g, proposed, bwd_grads)
    bwd_score = _sum_values(lambda x, m: _normal_logpdf(x, m, std), values, bwd_mu,
                            rows=rows)
    return new, weight - fwd_score + bwd_score, lambda: values


def mala(trace: Trace, selection: Selection, tau: float, *, noise: ChoiceMap | None = None,
         log_u: torch.Tensor | None = None) -> tuple[Trace, Any]:
    """One Metropolis-adjusted Langevin move on the selected continuous choices.

    Math: see :func:`mala_propose`; accept with probability min(1, exp(log α)).  A batched
    trace runs every chain in one vmapped call (``accepted`` per chain).  A discrete or an
    empty selection raises :class:`gfcomb.ArgumentError` naming the address.
    """
    tau = _check_positive(tau, "tau", "mala")

    def one(t: Trace, eps: ChoiceMap | None, lu: torch.Tensor | None) -> tuple[Trace, Any]:
        return _propose_or_reject(t, lambda: _mala_move(t, selection, tau, eps), lu)

    batch_move = (lambda: _mala_move(trace, selection, tau, noise)) if _rows_path(trace) \
        else None
    return _run(trace, "mala", one, batch_move, log_u, noise)


# ------------------------------------------------------------------------------ HMC
def _check_hmc_args(n_steps: Any, step_size: Any) -> float:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ArgumentError(f"hmc: n_steps must be a positive int, got {n_steps!r}")
    return _check_positive(step_size, "step_size", "hmc")


def hmc_propose(trace: Trace, selection: Selection, n_steps: int = 10,
                step_size: float = 0.1,
                momentum: ChoiceMap | None = None) -> tuple[Trace, torch.Tensor]:
    """Leapfrog trajectory from the selected continuous choices: ``(proposed, log ratio)``.

    ``momentum`` (values with the structure of the selected choices; one set per chain) is
    drawn from N(0, I) when None.

    Math: with unit mass, L = ``n_steps`` leapfrog steps of size ε = ``step_size``:
    p ← p + ε/2 ∇log p(t); t ← t + ε p; p ← p + ε/2 ∇log p(t) (repeated L times);
    log α = log p(t') − log p(t) − ½|p'|² + ½|p|² (Gen.jl's ``hmc``).
    """
    eps = _check_hmc_args(n_steps, step_size)
    if _rows_path(trace):
        return _hmc_move(trace, selection, n_steps, eps, momentum)[:2]
    return _over_chains(lambda t, p: _hmc_move(t, selection, n_steps, eps, p)[:2], "hmc",
                        trace, momentum)


def _hmc_move(t: Trace, selection: Selection, n_steps: int, eps: float,
              p0: ChoiceMap | None) -> tuple[Trace, torch.Tensor, Any]:
    """One chain's leapfrog proposal, or every row's of a batch at once
    (:func:`_rows_path`: the gradient at each inner leapfrog point without a trace, a
    ``batch_update`` at the last): (proposed, log α, old values)."""
    rows = _rows_path(t)
    _continuous_selected(t, selection, "hmc")
    values, grads = _gradients(t, selection)
    old_values = values
    if p0 is None:
        p0 = _map_values(torch.randn_like, values)
    p = p0
    new = t
    for step in range(n_steps):
        p = _map_values(lambda m, g: m + (eps / 2) * g, p, grads)
        values = _map_values(lambda v, m: v + eps * m, values, p)
        if rows and step < n_steps - 1:  # inner leapfrog points need no trace
            _, grads = batch_gradients_at(t, selection, values)
        else:
            new, _, grads = _moved(new, selection, values)
        p = _map_values(lambda m, g: m + (eps / 2) * g, p, grads)
    kinetic_old = _sum_values(lambda m: 0.5 * m * m, p0, rows=rows)
    kinetic_new = _sum_values(lambda m: 0.5 * m * m, p, rows=rows)
    return new, (new.score - t.score) - kinetic_new + kinetic_old, lambda: old_values


def hmc(trace: Trace, selection: Selection, n_steps: int = 10, step_size: float = 0.1, *,
        momentum: ChoiceMap | None = None,
        log_u: torch.Tensor | None = None) -> tuple[Trace, Any]:
    """One Hamiltonian Monte Carlo move on the selected continuous choices.

    Math: see :func:`hmc_propose` (L = ``n_steps`` leapfrog steps of size ``step_size``);
    accept with probability min(1, exp(log α)).  A batched trace runs every chain in one
    vmapped call (``accepted`` per chain).  A discrete or an empty selection raises
    :class:`gfcomb.ArgumentError` naming the address.
    """

    _check_hmc_args(n_steps, step_size)

    def one(t: Trace, p0: ChoiceMap | None, lu: torch.Tensor | None) -> tuple[Trace, Any]:
        return _propose_or_reject(t, lambda: _hmc_move(t, selection, n_steps, step_size, p0),
                                  lu)

    batch_move = (lambda: _hmc_move(trace, selection, n_steps, step_size, momentum)) \
        if _rows_path(trace) else None
    return _run(trace, "hmc", one, batch_move, log_u, momentum)
