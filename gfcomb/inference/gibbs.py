"""Enumerative Gibbs sampling of discrete choices with finite support, batched over the
elements of a Map (or the steps of an Unfold) and over chains.

``gibbs(trace, selection)`` visits the selected discrete choices in turn:

* a single choice (``"z"``, ``("zs", 3, "z")``) is resampled from its exact full conditional:
  one ``update`` per value of its support gives log p(t[z := v]) − log p(t), and a value is
  drawn from their softmax (Gumbel-max, so it runs under vmap);
* a block of the same choice in many elements of a Map (``select_pattern(("zs",
  slice(None), "z"))``; with ``block=True`` also the steps of an Unfold) is moved in one
  step: one ``update`` per support value sets the choice to that value in *every* element at
  once, and the elements' kernel scores (``element_scores`` of the vector trace) give each
  element's conditional π_i(v) ∝ exp s_i(v); all elements are drawn in parallel from Π_i π_i
  and the move is accepted with the Metropolis–Hastings ratio, which is exactly 1 when the
  elements are conditionally independent (a Map whose return value is not used by later
  choices): then this is exact block Gibbs; otherwise it is a valid MH move with the same proposal.

The support of each choice is read from the distribution that made it (``bernoulli``:
{0, 1}; ``categorical``: {0, ..., K−1}; ``uniform_discrete``: {low, ..., high};
``binomial``: {0, ..., n}) or given with ``support=``.  A batched trace (a leading chain axis)
runs every chain in one vmapped call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import attrs
import torch

from gfcomb.combinators import Map
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError
from gfcomb.core.pytree import tree_index
from gfcomb.core.trace import Trace
from gfcomb.distributions import Bernoulli, Binomial, Categorical, UniformDiscrete
from gfcomb.inference.breadth import (
    accept,
    check_selection,
    check_trace,
    distribution_at,
    inside_functorch_transform,
    over_chains,
    show_address,
    trace_at,
    write,
)
from gfcomb.inference.mcmc import is_batched_trace

__all__ = ["gibbs"]

Support = Union[int, Sequence[Any], torch.Tensor]


@attrs.frozen
class _Site:
    """One Gibbs move: a single choice (``keys`` None) or the choice at ``inner`` in the
    elements ``keys`` of the vector combinator at ``prefix``."""

    prefix: tuple[Any, ...]
    keys: tuple[int, ...] | None
    length: int
    inner: tuple[Any, ...]
    support: torch.Tensor

    @property
    def address(self) -> tuple[Any, ...]:
        if self.keys is None:
            return self.prefix
        return self.prefix + (slice(None),) + self.inner


# ------------------------------------------------------------------ finding the choices
def _walk(cm: ChoiceMap, prefix: tuple[Any, ...], out: list[Any]) -> None:
    """Collect ``(prefix, keys, inner address)`` for the values of a filtered choice map:
    blocks for one level of stacking, single addresses otherwise."""
    if cm.is_empty():
        return
    if cm.is_value():
        if cm.mask is None or bool(cm.mask.all()):
            out.append((prefix, None, ()))
    elif cm.is_stacked():
        keys = tuple(cm.stacked_indices)
        for inner, _ in cm.stacked_inner.items(stacked=True):
            mask = cm.stacked_inner.get_submap(inner).mask
            if any(isinstance(k, slice) for k in inner) or mask is not None:
                # nested vectors, or some elements only: element by element
                out.extend((prefix + a, None, ()) for a, _v in cm.items() if _under(a, inner))
            else:
                out.append((prefix, keys, inner))
    else:
        for k in cm.keys():
            _walk(cm.get_submap(k), prefix + (k,), out)


def _under(addr: tuple[Any, ...], pattern: tuple[Any, ...]) -> bool:
    rest = addr[1:]
    return len(rest) == len(pattern) and all(
        isinstance(p, slice) or p == a for a, p in zip(rest, pattern))


def _as_support(given: Any, like: torch.Tensor, addr: tuple[Any, ...]) -> torch.Tensor:
    if isinstance(given, bool):
        raise ArgumentError(f"gibbs: support for {show_address(addr)} must be an int, a "
                            f"sequence or a tensor of values, got {given!r}")
    if isinstance(given, int):
        if given < 1:
            raise ArgumentError(f"gibbs: support for {show_address(addr)} must be positive, "
                                f"got {given}")
        values = torch.arange(given)
    else:
        values = torch.as_tensor(given)
    values = values.reshape(-1).to(dtype=like.dtype, device=like.device)
    if values.numel() == 0:
        raise ArgumentError(f"gibbs: the support for {show_address(addr)} is empty")
    return values


def _inferred_support(trace: Trace, addr: tuple[Any, ...], like: torch.Tensor) -> torch.Tensor:
    found = distribution_at(trace, addr)
    name = "an unknown generative function" if found is None else found[0].name
    if found is not None:
        dist, args = found
        if isinstance(dist, Bernoulli):
            return torch.tensor([0.0, 1.0], dtype=like.dtype, device=like.device)
        if isinstance(dist, Categorical):
            return torch.arange(torch.as_tensor(args[0]).shape[-1], device=like.device).to(
                like.dtype)
        if isinstance(dist, UniformDiscrete):
            lo = int(torch.as_tensor(args[0]).min())
            hi = int(torch.as_tensor(args[1]).max())
            return torch.arange(lo, hi + 1, device=like.device).to(like.dtype)
        if isinstance(dist, Binomial):
            n = int(torch.as_tensor(args[0]).max())
            return torch.arange(0, n + 1, device=like.device).to(like.dtype)
    raise ArgumentError(
        f"gibbs: cannot enumerate the support of the choice at address {show_address(addr)} "
        f"(made by {name}); gibbs moves discrete choices with finite support (bernoulli, "
        "categorical, uniform_discrete, binomial): pass support= for others")


def _support_for(support: Any, trace: Trace, addr: tuple[Any, ...],
                 like: torch.Tensor) -> torch.Tensor:
    if isinstance(support, Mapping):
        for key in (addr, addr[0] if len(addr) == 1 else None):
            if key is not None and key in support:
                return _as_support(support[key], like, addr)
        return _inferred_support(trace, addr, like)
    if support is not None:
        return _as_support(support, like, addr)
    return _inferred_support(trace, addr, like)


def _sites(trace: Trace, selection: Any, support: Any) -> list[_Site]:
    view = trace  # one chain's trace: the selection is resolved on it (no per-chain masks)
    for _ in range(trace.score.dim()):
        view = tree_index(view, 0)
    cm = view.choices.filter(selection)
    found: list[Any] = []
    _walk(cm, (), found)
    if not found:
        raise ArgumentError(f"gibbs: the selection {selection!r} selects no choice of the "
                            "trace")
    sites = []
    for prefix, keys, inner in found:
        sub = cm.get_submap(prefix)
        if keys is None:
            value, length = view[prefix], 0
        else:
            value, length = sub.stacked_inner[inner], sub.stacked_length
        addr = prefix if keys is None else prefix + (slice(None),) + inner
        if not isinstance(value, torch.Tensor) or value.dtype == torch.bool:
            raise ArgumentError(f"gibbs: the choice at {show_address(addr)} is not a numeric "
                                "tensor")
        if value.dim() != (0 if keys is None else 1):
            shape = tuple(value.shape if keys is None else value.shape[1:])
            raise ArgumentError(
                f"gibbs: the choice at {show_address(addr)} has shape {shape}; gibbs "
                "enumerates scalar choices (one value per address or per vector element)")
        sites.append(_Site(prefix, keys, length, inner,
                           _support_for(support, trace, addr, value)))
    return sites


# ------------------------------------------------------------------ the moves
def _gumbel_argmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """A draw from softmax(logits) along ``dim`` (Gumbel-max; -inf entries are never drawn
    unless all are)."""
    u = torch.rand_like(logits).clamp_min(torch.finfo(logits.dtype).tiny)
    g = -torch.log(-torch.log(u))
    return torch.argmax(torch.where(torch.isneginf(logits), logits, logits + g), dim=dim)


def _single_move(trace: Trace, site: _Site) -> tuple[Trace, torch.Tensor]:
    addr = site.prefix
    values = site.support
    weights = torch.stack([write(trace, ChoiceMap({addr: v}))[1] for v in values])
    pick = _gumbel_argmax(weights, 0)
    new, w_new, _ = write(trace, ChoiceMap({addr: values[pick]}))
    zero = torch.zeros_like(w_new)
    log_alpha = torch.where(torch.isfinite(w_new), zero, zero - float("inf"))
    return accept(trace, new, log_alpha, lambda: ChoiceMap({addr: trace[addr]}))


def _vector_trace(trace: Trace, prefix: tuple[Any, ...]) -> Trace | None:
    """The trace of the vector combinator at ``prefix`` when it reports ``element_scores``."""
    sub: Any = trace
    if prefix:
        found = trace_at(trace, prefix)
        if found is None or found[1]:
            return None
        sub = found[0]
    return sub if hasattr(sub, "element_scores") else None


def _block(site: _Site, values: torch.Tensor) -> ChoiceMap:
    keys = site.keys
    assert keys is not None
    dense = keys == tuple(range(site.length))
    inner = ChoiceMap({site.inner: values}) if site.inner else ChoiceMap.value(values)
    block = ChoiceMap.from_stacked_block(inner, len(keys), None if dense else keys)
    return block.prefixed(site.prefix)


def _block_move(trace: Trace, site: _Site) -> tuple[Trace, torch.Tensor]:
    keys = site.keys
    assert keys is not None
    rows = torch.tensor(keys, dtype=torch.long, device=trace.score.device)
    m = len(keys)
    values = site.support

    def scores(t: Trace) -> torch.Tensor:
        vec: Any = _vector_trace(t, site.prefix)
        return vec.element_scores.index_select(-1, rows)

    table = torch.stack([scores(write(trace, _block(site, v.expand(m)))[0]) for v in values])
    pick = _gumbel_argmax(table, 0)  # [m]
    new_values = values[pick]
    new, w_new, _ = write(trace, _block(site, new_values))
    gain = table.gather(0, pick.unsqueeze(0)).squeeze(0) - scores(trace)
    log_alpha = w_new - gain.sum()
    log_alpha = torch.where(torch.isnan(log_alpha), torch.full_like(log_alpha, -float("inf")),
                            log_alpha)
    old = site.prefix + (slice(None),) + site.inner
    return accept(trace, new, log_alpha,
                  lambda: _block(site, trace.choices.get_submap(site.prefix).stacked_inner[
                      site.inner] if site.inner else trace[old]))


def _expanded(site: _Site) -> list[_Site]:
    keys = site.keys
    assert keys is not None
    return [_Site(site.prefix + (k,) + site.inner, None, 0, (), site.support) for k in keys]


def gibbs(trace: Trace, selection: Any, *, support: Support | Mapping[Any, Support] | None = None,
          block: bool | None = None) -> tuple[Trace, Any]:
    """One sweep of enumerative Gibbs over the selected discrete choices: ``(trace, accepted)``.

    ``selection`` names the choices to move: ``gf.select("z", ("zs", 3, "z"))`` for single
    choices, :func:`gfcomb.inference.select_pattern` with ``slice(None)`` for the same choice
    in every element of a Map/Unfold.  ``block``: move such a choice in all elements at once
    (True), or element by element, each from its exact conditional (False); by default
    (None) Map elements move as one block and Unfold steps (coupled through the state) one
    by one.  ``support`` overrides
    the enumerated values: an int K (values 0..K−1), a sequence or tensor of values, or a dict
    from address (pattern) to either.  ``accepted`` is True when every move of the sweep was
    taken (always, for exact Gibbs moves); a bool tensor per chain for a batched trace.

    Math: a single choice z is drawn from p(z = v | rest) = exp(w_v) / Σ_u exp(w_u),
    w_v = log p(t[z := v]) − log p(t) (the ``update`` weight; exact, whatever depends on z).
    A block over elements i draws z_i' ~ π_i ∝ exp s_i(v) in parallel, s_i(v) the kernel score
    of element i with z_i = v, and accepts with
    log α = [log p(t') − log p(t)] − Σ_i [s_i(z_i') − s_i(z_i)], which is 0 when the elements
    are conditionally independent given the rest (then the move is exact block Gibbs).
    """
    who = "gibbs"
    check_trace(trace, who)
    check_selection(selection, who)
    if inside_functorch_transform():
        raise ArgumentError("gibbs: call gibbs on a (batched) trace outside torch.func.vmap; it "
                            "vmaps over the chains itself")
    sites = _sites(trace, selection, support)
    blocks: list[tuple[_Site, bool]] = []
    for site in sites:
        if site.keys is None:
            blocks.append((site, False))
            continue
        vec = _vector_trace(trace, site.prefix)  # (the record type is the same per chain)
        as_block = isinstance(getattr(vec, "gen_fn", None), Map) if block is None else block
        if vec is None or not as_block:
            blocks.extend((s, False) for s in _expanded(site))
        else:
            blocks.append((site, True))

    def sweep(t: Trace) -> tuple[Trace, torch.Tensor]:
        ok = torch.ones((), dtype=torch.bool, device=t.score.device)
        for site, is_block in blocks:
            t, acc = (_block_move if is_block else _single_move)(t, site)
            ok = ok & torch.as_tensor(acc, device=ok.device)
        return t, ok

    new, accepted = over_chains(sweep, who, trace)
    if not is_batched_trace(trace):
        return new, bool(accepted)
    return new, accepted

