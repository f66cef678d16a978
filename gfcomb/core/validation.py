"""Input checks that turn silent NaN / +inf and unclear errors into named gfcomb errors.

Each check is a small function called with one line from the place it guards, *before*
anything changes (a method that raises has returned nothing and touched no input):

* :func:`check_selection` -- a GFI method given something that is not a Selection (a str, a
  dict) raises :class:`ArgumentTypeError` naming the argument;
* :func:`check_param_type` -- a distribution argument that is not a number, a bool, a
  tensor or a (nested) list of numbers (a str, None) raises
  :class:`DistributionArgumentTypeError` naming the distribution and the argument;
* :func:`checked_sample` -- wraps a distribution's public ``sample`` so that
  ``gf.normal.sample(0.0, -1.0)`` validates its arguments as ``simulate`` does (the GFI
  methods call the unwrapped sampler: they have validated already);
* :func:`check_vmapped_scores` -- after a combinator ran its kernel under vmap over
  concrete tensors (outside any torch.func transform), a NaN or +inf element score (a
  batched Switch index out of range, a zero or negative scale) is traced back to its
  element: the element is run alone, outside vmap, where the distributions' own checks name
  the argument and address; if that run does not raise, :class:`NumericalError` names the
  element.  Inside a user's own vmap nothing can be checked (Python cannot read the values
  there): the scores stay NaN / +inf.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gfcomb.core.batching import inside_functorch_transform
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import (
    AddressError,
    ArgumentTypeError,
    DistributionArgumentError,
    DistributionArgumentTypeError,
    GFIError,
    NumericalError,
    UnvisitedConstraintError,
)
from gfcomb.core.masked import all_absent
from gfcomb.core.pytree import tree_index, tree_map_tensors
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace

_NUMBER_TYPES = (bool, int, float)
_PARAM_TYPES = (torch.Tensor, bool, int, float)


def check_selection(selection: Any, owner: Any, method: str,
                    name: str = "selection") -> None:
    """Raise :class:`ArgumentTypeError` unless ``selection`` is a :class:`Selection`; the
    message names ``owner.method`` (``owner``: a generative function, or a str) and the
    argument (built only when raising: this runs on every ``regenerate``)."""
    if not isinstance(selection, Selection):
        who = f"{owner if isinstance(owner, str) else repr(owner)}.{method}"
        hint = ""
        if isinstance(selection, (str, int, tuple)):
            hint = f"; write gf.select({selection!r})"
        elif isinstance(selection, (dict, list, set, frozenset)):
            hint = "; build one with gf.select(addr, ...) or gf.selectall()"
        raise ArgumentTypeError(f"{who}: {name} must be a gf.Selection, got "
                                f"{type(selection).__name__} {selection!r}{hint}")


def _is_numeric_list(x: Any) -> bool:
    if isinstance(x, (list, tuple)):
        return all(_is_numeric_list(v) for v in x)
    return isinstance(x, _PARAM_TYPES)


def check_param_type(dist_name: str, pname: str, value: Any) -> None:
    """Raise :class:`DistributionArgumentTypeError` unless ``value`` can be a parameter: a
    tensor, a Python number or bool, or a (nested) list/tuple of them."""
    if isinstance(value, _PARAM_TYPES):
        return
    if _is_numeric_list(value):
        return
    try:  # (numpy arrays and scalars, anything torch.as_tensor takes as numbers)
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is not None and (t.is_floating_point() or t.dtype in (torch.bool, torch.int64,
                                                                 torch.int32)):
        return
    raise DistributionArgumentTypeError(
        f"{dist_name}: argument {pname!r} must be a number or a tensor, got "
        f"{type(value).__name__} {value!r}")


def checked_sample(raw: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A distribution's public ``sample`` that validates its parameters first (outside
    vmap, while validation is on: ``Distribution._validate``); ``raw`` is kept as the
    wrapper's ``__wrapped__`` for the GFI methods, which have validated already."""

    @functools.wraps(raw)
    def sample(self: Any, *params: Any) -> torch.Tensor:
        self._validate(params)
        return raw(self, *params)

    sample.__gf_checked__ = True  # type: ignore[attr-defined]
    return sample


def _element_of(args: Sequence[Any], in_dims: Sequence[Any], i: int) -> tuple[Any, ...]:
    """Element ``i`` of ``args`` (tensor leaves indexed at ``i`` along their in_dim)."""
    out = []
    for a, d in zip(args, in_dims):
        if d is None:
            out.append(a)
        else:
            out.append(tree_map_tensors(functools.partial(_select, dim=d, index=i), a))
    return tuple(out)


def _select(x: torch.Tensor, dim: int, index: int) -> torch.Tensor:
    return x.select(dim, index)


def _scores_of(out: Any) -> torch.Tensor | None:
    """The per-element scores (or weights) in a vmapped GFI result: the trace's score, or
    the first tensor of an ``assess``-like result."""
    if isinstance(out, Trace):
        return out.score
    if isinstance(out, tuple) and out:
        first = out[0]
        if isinstance(first, Trace):
            return first.score
        if isinstance(first, torch.Tensor):
            return first
    return None


def _weights_of(out: Any) -> torch.Tensor | None:
    """The per-element weights of a vmapped ``generate`` / ``update`` / ``regenerate``
    result ``(trace, weight, ...)``, if it is one."""
    if isinstance(out, tuple) and len(out) > 1 and isinstance(out[0], Trace) \
            and isinstance(out[1], torch.Tensor):
        return out[1]
    return None


def _per_element(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` as [elements, ...] when it is a floating tensor with an element axis."""
    if x is None or not x.is_floating_point() or x.dim() == 0 or x.numel() == 0:
        return None
    return x.detach().reshape(x.shape[0], -1)


def check_vmapped_scores(out: Any, fn: Callable[..., Any], in_dims: Sequence[Any],
                         args: Sequence[Any], keys: Sequence[int] | None, who: str,
                         constraints: ChoiceMap | None = None) -> Any:
    """``out`` (what ``fn`` vmapped over ``args`` returned), after checking that no element
    score is NaN or +inf and no element weight NaN; see the module docstring.
    ``constraints``: the caller's, keyed by element (``keys``), to name a constraint that an
    element's own run did not visit.  Returns ``out`` unchanged."""
    if inside_functorch_transform():
        return out
    s, w = _per_element(_scores_of(out)), _per_element(_weights_of(out))
    if s is None and w is None:
        return out
    # (one host read for both: NaN and +inf survive the sums, -inf alone does not; a NaN
    # from -inf + inf is looked at below and let pass)
    total = float(sum(x.sum() for x in (s, w) if x is not None))
    if not (math.isnan(total) or total == math.inf):
        return out
    if s is not None:
        bad = torch.isnan(s).any(1) | torch.isposinf(s).any(1)
        if bool(bad.any()):
            _explain(int(bad.nonzero()[0, 0]), "score", s, fn, in_dims, args, keys, who)
    if w is not None:
        bad = torch.isnan(w).any(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            if constraints is not None:
                _unvisited_at(out[0], i, constraints, keys, who)
            _explain(i, "weight", w, fn, in_dims, args, keys, who)
    return out


def _unvisited_at(traces: Trace, i: int, constraints: ChoiceMap,
                  keys: Sequence[int] | None, who: str) -> None:
    """Raise :class:`UnvisitedConstraintError` at the first constraint of element ``i`` at
    an address its trace (row ``i`` of ``traces``) has no value at: a Switch branch the
    element did not take, a Mask whose flag is false for it (whose draws -- an index, a flag
    -- a run of the element alone would not repeat)."""
    key = keys[i] if keys is not None else i
    given = constraints.get_submap(key)
    if given.is_empty():
        return
    made = tree_index(traces, i).choices
    for addr, _ in given.items():
        there = made.get_submap(addr)
        if there.is_empty() or all_absent(there):
            raise UnvisitedConstraintError(
                f"{who}: constraint at address {{addr}} is never visited by element {key}'s "
                "run (a Switch branch it did not take, a Mask whose flag is false for it)",
                (key,) + tuple(addr))


def _explain(i: int, what: str, per: torch.Tensor, fn: Callable[..., Any],
             in_dims: Sequence[Any], args: Sequence[Any], keys: Sequence[int] | None,
             who: str) -> None:
    """Raise the named error for element ``i``, whose ``what`` (its row of ``per``) is NaN
    or +inf: what the element raises run alone (an invalid argument, an unvisited
    constraint -- a NaN weight --), its key in front, else NumericalError."""
    key = keys[i] if keys is not None else i
    value = float(per[i].sum())
    try:
        fn(*_element_of(args, in_dims, i))
    except (DistributionArgumentError, AddressError) as err:
        raise err.prefixed((key,)) from None
    except GFIError as err:
        raise NumericalError(f"{who}: element {key} has a {what} of {value} because: {err}"
                             ) from err
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        raise NumericalError(f"{who}: element {key} has a {what} of {value}; run alone it "
                             f"raises {type(err).__name__}: {err}") from err
    raise NumericalError(
        f"{who}: element {key} has a {what} of {value} (NaN or +inf: an argument out of its "
        "support or range, e.g. a non-positive scale or a Switch index out of range)")


__all__ = ["check_param_type", "check_selection", "check_vmapped_scores",
           "checked_sample"]
