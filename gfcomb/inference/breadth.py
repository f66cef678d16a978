"""Small helpers shared by the VI, Gibbs, elliptical-slice, involutive-MCMC, MAP and SMC
modules of :mod:`gfcomb.inference` (argument checks, vmapping over samples and chains,
address patterns).  Built only on the public GFI and ``torch.func.vmap``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch._C import _functorch
from torch.utils import _pytree as pytree

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import NoChange
from gfcomb.core.errors import AddressError, ArgumentError, VmapError
from gfcomb.core.pytree import same_tree_structure
from gfcomb.core.selection import Selection, selectall
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import batched_call, vmap_error
from gfcomb.distributions.base import Distribution
from gfcomb.inference.mcmc import accept_reject, is_batched_trace

_BATCHED_CALL: Callable[..., Any] | None = batched_call  # (gfcomb's vmap engine)

#: The "every element" key of an address pattern (``trace["ys", :, "y"]`` reads the same way).
ANY = slice(None)

def inside_functorch_transform() -> bool:
    """True while a torch.func transform (vmap, grad, ...) is running."""
    return _functorch.peek_interpreter_stack() is not None


def check_positive_int(n: Any, name: str, who: str, minimum: int = 1) -> int:
    """``n`` as a Python int >= ``minimum`` (ArgumentError naming ``name`` otherwise)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        kind = "positive" if minimum == 1 else f">= {minimum}"
        raise ArgumentError(f"{who}: {name} must be a {kind} int, got {n!r}")
    return n


def check_positive_float(x: Any, name: str, who: str) -> float:
    """``x`` as a positive finite float (ArgumentError naming ``name`` otherwise)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ArgumentError(f"{who}: {name} must be a positive number, got {x!r}") from None
    if not (v > 0 and v < float("inf")):
        raise ArgumentError(f"{who}: {name} must be a positive finite number, got {x!r}")
    return v


def check_trace(trace: Any, who: str) -> Trace:
    """``trace`` if it is a gfcomb Trace (ArgumentError otherwise)."""
    if not isinstance(trace, Trace):
        raise ArgumentError(f"{who}: trace must be a gfcomb Trace, got {type(trace).__name__}")
    return trace


def check_selection(selection: Any, who: str) -> Selection:
    """``selection`` if it is a Selection (ArgumentError naming the argument otherwise)."""
    if not isinstance(selection, Selection):
        raise ArgumentError(f"{who}: selection must be a gfcomb Selection (gf.select(...) or "
                            f"select_pattern(...)), got {type(selection).__name__}")
    return selection


def no_change(trace: Trace) -> tuple[NoChange, ...]:
    """NoChange for every argument of ``trace``."""
    return (NoChange(),) * len(trace.args)


def write(trace: Trace, values: ChoiceMap) -> tuple[Trace, torch.Tensor, ChoiceMap]:
    """``update`` keeping the arguments: ``(trace', weight, discard)``."""
    new, weight, _, discard = trace.gen_fn.update(trace, trace.args, no_change(trace), values)
    return new, weight, discard


def vmapped(fn: Callable[..., Any], who: str, in_dims: Any = 0) -> Callable[..., Any]:
    """``torch.func.vmap(fn, randomness="different")``; a function that cannot run under vmap
    gets a :class:`VmapError` naming the cause."""
    mapped = torch.func.vmap(fn, in_dims=in_dims, randomness="different")

    def run(*args: Any) -> Any:
        try:
            return mapped(*args)
        except VmapError:
            raise
        except (RuntimeError, ValueError) as err:
            named = vmap_error(who, err)  # (the vmap engine's list of known causes)
            if named is not None:
                raise named from err
            raise

    return run


def over_chains(fn: Callable[..., Any], who: str, trace: Trace, *per_chain: Any) -> Any:
    """``fn(trace, *per_chain)`` per chain: one vmap over the leading chain axis of a batched
    trace (nested for several leading axes), a plain call for one trace.  ``per_chain``
    inputs carry the same leading axes (None is passed through).

    Batched traces whose Unfold steps sit in a shared history (particle-filter states) are
    mapped with the vector combinators' ``batched_call`` (what ``mh`` uses), which knows that
    layout; plain ``torch.func.vmap`` otherwise."""
    if not is_batched_trace(trace):
        return fn(trace, *per_chain)
    dims = (0,) + tuple(None if x is None else 0 for x in per_chain)

    def one(t: Trace, *extra: Any) -> Any:
        return over_chains(fn, who, t, *extra)

    if _BATCHED_CALL is not None:
        n = int(trace.score.shape[0])
        return _BATCHED_CALL(one, dims, vectorize=True, length=n, who=who)(trace, *per_chain)
    return vmapped(one, who, dims)(trace, *per_chain)


def accept(current: Trace, proposed: Trace, log_alpha: torch.Tensor,
           old_values: Callable[[], ChoiceMap],
           log_u: torch.Tensor | None = None) -> tuple[Trace, Any]:
    """MH accept step (:func:`gfcomb.inference.accept_reject`) that also works when the
    proposal's record structure differs from the current trace's under vmap."""
    if inside_functorch_transform() and (
            not same_tree_structure(proposed, current)):
        current, _, _ = write(current, old_values())
    return accept_reject(current, proposed, log_alpha, log_u)


def float_leaves(tree: Any) -> list[torch.Tensor]:
    """The floating-point tensor leaves of a pytree."""
    return [x for x in pytree.tree_leaves(tree)
            if isinstance(x, torch.Tensor) and x.is_floating_point()]


# ------------------------------------------------------------------ address patterns
class PatternSelection(Selection):
    """The addresses matching any of ``patterns``: tuples of keys in which ``slice(None)``
    (``ANY``) matches every key (every element of a Map or step of an Unfold).  A matched
    address selects everything beneath it, as in :func:`gfcomb.select`."""

    __slots__ = ("_patterns",)

    def __init__(self, patterns: Iterable[tuple[Any, ...]]) -> None:
        self._patterns = tuple(patterns)

    def get_subselection(self, key: Any) -> Selection:
        sub = [p[1:] for p in self._patterns
               if p and (isinstance(p[0], slice) or p[0] == key)]
        if any(not p for p in sub):
            return selectall()
        return PatternSelection(sub) if sub else Selection.none()

    def leaf_flag(self) -> bool:
        return False

    def explicit_keys(self) -> frozenset[Any]:
        return frozenset(p[0] for p in self._patterns if p and not isinstance(p[0], slice))

    def is_empty_static(self) -> bool:
        return not self._patterns

    def __repr__(self) -> str:
        shown = ", ".join(show_address(p) for p in self._patterns)
        return f"select_pattern({shown})"


def select_pattern(*patterns: Any) -> Selection:
    """A selection of address *patterns*: ``slice(None)`` in an address (``gfcomb.inference.
    ANY``) stands for every key at that level, so
    ``select_pattern(("zs", slice(None), "z"))`` selects ``z`` in every element of the Map at
    ``"zs"`` but not the element's other choices.  Plain addresses work as in
    :func:`gfcomb.select`.

    Math: S = {a : a matches some pattern p (key by key, ``:`` matching any key)} and every
    address beneath such an a.
    """
    pats = []
    for p in patterns:
        path = p if isinstance(p, tuple) else (p,)
        if not path:
            return selectall()
        for k in path:
            if not (isinstance(k, slice) and k == ANY) and (
                    isinstance(k, bool) or not isinstance(k, (str, int))):
                raise ArgumentError(f"select_pattern: address components must be str, int or "
                                    f"slice(None), got {k!r} in {p!r}")
        pats.append(path)
    return PatternSelection(pats)


def show_address(addr: tuple[Any, ...]) -> str:
    """An address for messages, ``:`` standing for every element."""
    parts = [":" if isinstance(k, slice) else repr(k) for k in addr]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def trace_at(trace: Trace, path: tuple[Any, ...]) -> tuple[Trace, tuple[Any, ...]] | None:
    """The sub-trace of the call that holds ``path`` (longest traced prefix) and the rest of
    the path, for @gen traces (``subtrace``); None when there is no such call."""
    find = getattr(trace, "subtrace", None)
    if not callable(find):
        return None
    for i in range(len(path), 0, -1):
        try:
            return find(path[:i]), path[i:]
        except (AddressError, TypeError, KeyError):
            continue
    return None


def distribution_at(trace: Trace,
                     path: tuple[Any, ...]) -> tuple[Distribution, tuple[Any, ...]] | None:
    """The distribution (and its arguments, batched as stored) that made the choice at the
    address pattern ``path``, or None when it cannot be found."""
    if isinstance(trace.gen_fn, Distribution):
        return (trace.gen_fn, trace.args) if not path else None
    found = trace_at(trace, path)
    if found is not None:
        return distribution_at(*found)
    inner = getattr(trace, "inner", None)
    if isinstance(inner, Trace) and path and isinstance(path[0], (int, slice)):
        return distribution_at(inner, path[1:])
    return None
