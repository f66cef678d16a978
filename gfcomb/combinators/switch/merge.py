"""Merging the branches of a :class:`~gfcomb.combinators.switch.Switch` by its index: in the
every-branch mode (a batched index under vmap) each branch's results are selected element by
element with ``torch.where``; with one branch running the flags are plain bools and nothing is
merged."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

from gfcomb.core import masked
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError, UnvisitedConstraintError
from gfcomb.core.pytree import tree_map2_tensors
from gfcomb.core.trace import Trace

Flag = Union[bool, torch.Tensor]


def only(k: int, tr: Trace, n: int) -> list[Trace | None]:
    """Branch ``k``'s trace at position ``k`` of ``n``, None elsewhere (one branch ran)."""
    return [tr if i == k else None for i in range(n)]


def equals(index: int | torch.Tensor, k: int) -> Flag:
    """``index == k``: a bool for an int index, a bool tensor for a tensor index."""
    return index == k


def nan_like(x: Any) -> torch.Tensor:
    """A NaN tensor like ``x`` (the value of an element no branch answers for)."""
    return torch.full_like(x, math.nan)


def nan_where(bad: Flag, w: torch.Tensor) -> torch.Tensor:
    """``w`` with NaN where ``bad`` (an element-level error that vmap cannot raise)."""
    if bad is False:
        return w
    if bad is True:
        return nan_like(w)
    return torch.where(bad, nan_like(w), w)


def where(flag: Flag, a: Any, b: Any, what: str) -> Any:
    """Leafwise ``torch.where(flag, a, b)`` over two pytrees of the same structure."""
    if flag is True:
        return a
    if flag is False:
        return b

    def pick(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x is y:  # e.g. the same argument in both traces
            return x
        if x.shape != y.shape:
            raise ArgumentError(
                f"Switch with a batched index (every branch runs under vmap): the branches' "
                f"{what} differ in shape ({tuple(x.shape)} vs {tuple(y.shape)})")
        return torch.where(_flag_for(flag, x), x, y)

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):  # no pytree walk
        return pick(a, b)
    try:
        return tree_map2_tensors(pick, a, b)
    except ValueError as err:
        raise ArgumentError(
            f"Switch with a batched index (every branch runs under vmap): the branches' "
            f"{what} have different structures") from err


def pick(flags: Sequence[Flag], values: Sequence[Any], fill: Callable[[Any], Any],
          what: str) -> Any:
    """The value of the chosen branch: ``values[k]`` where ``flags[k]`` (``fill`` where none)."""
    acc = None
    for f, v in zip(flags, values):
        if f is False or v is None:
            continue
        if f is True:
            return v
        if acc is None and fill is nan_like and isinstance(v, torch.Tensor):
            acc = torch.where(_flag_for(f, v), v, math.nan)  # (no NaN tensor to build)
            continue
        acc = where(f, v, fill(v) if acc is None else acc, what)
    return acc


def _flag_for(flag: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-element flag with trailing singleton dimensions to broadcast against ``x``."""
    extra = x.dim() - flag.dim()
    return flag if extra <= 0 else flag.reshape(flag.shape + (1,) * extra)


def check_some_branch_visits(dropped: Sequence[ChoiceMap], method: str) -> None:
    """Batched mode: a constraint that no branch visits is an error for every element."""
    if not dropped:
        return
    common = masked.present_addresses(dropped[0])  # (a value absent everywhere constrains
    for d in dropped[1:]:                           # nothing: an old branch's, say)
        common &= masked.present_addresses(d)
    if common:
        addr = min(common, key=repr)
        raise UnvisitedConstraintError(
            f"{method}: constraint at address {{addr}} is never visited by any branch of the "
            "Switch", addr)
