"""Edits: ``update`` and ``regenerate`` as one mechanism (Gen.jl's ``generic_update``, GenJAX's
edit requests).

An edit is what changes in a trace besides its arguments: new values (:class:`Constrain`,
``update``) or choices to resample (:class:`Resample`, ``regenerate``).  A combinator's edit
engine walks its keys (Map elements, Unfold steps, Switch branches) once, asks the edit which
keys it touches, and applies the edit's part at each touched key to the callee with
:meth:`Edit.apply`; ``update`` and ``regenerate`` are that engine run with one edit or the
other.  The two differ in one convention only, :attr:`Edit.counts_discards` (DESIGN §1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gfcomb.combinators.vector import constrained_elements, stack_constraints
from gfcomb.core import masked
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff
from gfcomb.core.gfi import GenerativeFunction, as_choicemap, rows_submap
from gfcomb.core.selection import (
    Selection,
    element_selections,
    has_mask_flags,
    selection_flags_for_vector,
)
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import unwrap_rows

_EMPTY = ChoiceMap.empty()
# (new trace, weight, retdiff, discard): what applying an edit to a callee returns
EditResult = tuple[Trace, torch.Tensor, Diff, ChoiceMap]


class Edit:
    """An edit of a trace at some keys: constraints (:class:`Constrain`) or a selection
    (:class:`Resample`).

    ``counts_discards`` is the one convention in which the two differ: an update's weight
    counts −log p of every old choice it removes or overwrites and returns those choices as
    the discard; a regenerate's weight is Σ over retained, unselected choices only (removed
    and selected choices contribute 0) and it discards nothing.
    """

    counts_discards: bool
    #: The constraints or the selection.
    payload: Any
    #: What new elements are generated against (empty for a selection).
    constraints: Any = _EMPTY

    def is_empty(self) -> bool:
        """True when the edit writes nothing (only argument changes remain)."""
        raise NotImplementedError

    def keys(self, n: int, who: str) -> Sequence[int]:
        """The element keys below ``n`` the edit touches, sorted (``range(n)`` when it may
        touch all of them); a constraint at a key that is not an element index raises."""
        raise NotImplementedError

    def generated(self, keys: Sequence[int]) -> Sequence[int]:
        """The keys among ``keys`` whose new elements are generated against constraints (the
        others are simulated)."""
        return ()

    def at(self, key: Any) -> Edit:
        """The edit of the callee at ``key``."""
        raise NotImplementedError

    def for_elements(self, keys: Sequence[int], choices: ChoiceMap) -> tuple[Edit, bool]:
        """The edit of the elements ``keys`` of a stacked vector whose stacked choices are
        ``choices``: ``(edit, True)`` when its :attr:`payload` differs per element (it then
        travels into vmap, leading axis = ``keys``), ``(edit, False)`` when one edit serves
        every element."""
        raise NotImplementedError

    def with_payload(self, payload: Any) -> Edit:
        """The same kind of edit with another payload (one element's, inside vmap)."""
        return type(self)(payload)  # type: ignore[call-arg]

    def restricted(self, structure: ChoiceMap) -> tuple[Edit, ChoiceMap]:
        """The edit limited to the addresses of ``structure`` (a masked choice map, per
        element), and the constraints left out."""
        return self, _EMPTY

    def reusable(self, old: ChoiceMap) -> ChoiceMap:
        """The old choices ``old`` a callee that is generated afresh may keep: those the edit
        neither overwrites nor selects."""
        raise NotImplementedError

    def apply(self, gen_fn: GenerativeFunction, trace: Trace, args: tuple[Any, ...],
              argdiffs: tuple[Diff, ...], batch: bool = False) -> EditResult:
        """``gen_fn.update`` or ``gen_fn.regenerate`` of ``trace`` with this edit (the discard
        of a regenerate is empty); ``batch``: ``batch_update`` / ``batch_regenerate`` of a
        batch of traces."""
        raise NotImplementedError


class Constrain(Edit):
    """``update``'s edit: new values at some addresses (``constraints`` may be a batch
    method's :class:`~gfcomb.core.vmap.PerRow` choice map)."""

    counts_discards = True

    def __init__(self, constraints: Any) -> None:
        if isinstance(constraints, ChoiceMap):  # (the common case: no unwrapping)
            self.cm = self.constraints = self.payload = constraints
            return
        cm, per_row = unwrap_rows(constraints)
        self.cm = as_choicemap(cm)
        self.constraints = self.payload = constraints if per_row else self.cm

    def is_empty(self) -> bool:
        return self.cm.is_empty()

    def keys(self, n: int, who: str) -> Sequence[int]:
        return constrained_elements(self.cm, n, who)

    def generated(self, keys: Sequence[int]) -> Sequence[int]:
        return keys

    def at(self, key: Any) -> Edit:
        if self.constraints is self.cm:
            return Constrain(self.cm.get_submap(key))
        return Constrain(rows_submap(self.constraints, key))

    def for_elements(self, keys: Sequence[int], choices: ChoiceMap) -> tuple[Edit, bool]:
        return Constrain(stack_constraints(self.cm, keys)), True

    def restricted(self, structure: ChoiceMap) -> tuple[Edit, ChoiceMap]:
        kept, dropped = masked.restrict(self.cm, structure)
        return Constrain(kept), dropped

    def reusable(self, old: ChoiceMap) -> ChoiceMap:
        return masked.minus(old, self.cm)

    def apply(self, gen_fn: GenerativeFunction, trace: Trace, args: tuple[Any, ...],
              argdiffs: tuple[Diff, ...], batch: bool = False) -> EditResult:
        method = gen_fn.batch_update if batch else gen_fn.update
        return method(trace, args, argdiffs, self.constraints)


class Resample(Edit):
    """``regenerate``'s edit: the selected choices are drawn afresh from the prior."""

    counts_discards = False

    def __init__(self, selection: Selection) -> None:
        self.selection = self.payload = selection

    def is_empty(self) -> bool:
        return self.selection.is_empty_static()

    def keys(self, n: int, who: str) -> Sequence[int]:
        sel = self.selection
        if sel.is_empty_static():
            return []
        default, special = element_selections(sel, range(n))
        if not default.is_empty_static() or has_mask_flags(sel):
            return range(n)
        return sorted(k for k, s in special.items() if not s.is_empty_static())

    def at(self, key: Any) -> Edit:
        return Resample(self.selection.get_subselection(key))

    def for_elements(self, keys: Sequence[int], choices: ChoiceMap) -> tuple[Edit, bool]:
        sel = selection_flags_for_vector(self.selection, keys, choices)
        return Resample(sel), has_mask_flags(sel)

    def reusable(self, old: ChoiceMap) -> ChoiceMap:
        return masked.drop_selected(old, self.selection)

    def apply(self, gen_fn: GenerativeFunction, trace: Trace, args: tuple[Any, ...],
              argdiffs: tuple[Diff, ...], batch: bool = False) -> EditResult:
        method = gen_fn.batch_regenerate if batch else gen_fn.regenerate
        new, w, rd = method(trace, args, argdiffs, self.selection)
        return new, w, rd, _EMPTY
