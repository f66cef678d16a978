"""The two edits a Recurse GFI method applies at the nodes: :class:`Constrain` (constraints:
``simulate`` with none, ``generate``, ``assess`` with all of them, ``update``) and
:class:`Resample` (a selection: ``regenerate``).  An edit says which nodes it touches, how one
kernel call (or one batch of them) is made and what it adds to the weight; the pass that
walks the tree is :class:`~gfcomb.combinators.recurse.edit.EditPass`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from gfcomb.combinators.recurse.batch import (
    rows_generate,
    rows_regenerate,
    rows_simulate,
    rows_update,
)
from gfcomb.combinators.recurse.trace import PARTS
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff
from gfcomb.core.errors import MissingChoiceError
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.core.pytree import tree_stack
from gfcomb.core.selection import MaskSelection, Selection, element_selections
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import PerRow

if TYPE_CHECKING:
    from gfcomb.combinators.recurse.combinator import Recurse
    from gfcomb.combinators.recurse.trace import RecurseTrace

EMPTY = ChoiceMap.empty()
NodeConstraints = dict[int, tuple[ChoiceMap, ChoiceMap]]
KernelResult = tuple[Trace, Any, Diff, Any]  # (trace, weight or None, retdiff, discard or None)


def _check_given(tr: Trace, given: ChoiceMap) -> None:
    """MissingChoiceError at the first choice of ``tr`` that ``given`` lacks (assess)."""
    for addr, _ in tr.choices.items():
        if not given.get_submap(addr).is_value():
            raise MissingChoiceError("assess: no choice given at address {addr}", addr)


class Constrain:
    """The edit of simulate/generate/assess/update: constraints per node.

    Nodes new to the tree are generated with their constraints (simulated without); retained
    ones are updated.  Removed nodes leave the weight (−score) and go to the discard.
    ``strict`` (assess): every choice must be constrained.
    """

    counts_removed = True
    nothing = EMPTY

    def __init__(self, cons: NodeConstraints, strict: bool = False) -> None:
        self.cons = cons
        self.strict = strict

    def must(self, gf: Recurse, old: RecurseTrace) -> set[int]:
        """The nodes constrained, and their ancestors."""
        return gf.with_ancestors(self.cons)

    def edited(self, old: RecurseTrace, part: str) -> list[int]:
        """The nodes whose ``part`` kernel is constrained."""
        j = PARTS.index(part)
        return [i for i, c in self.cons.items() if not c[j].is_empty()]

    def touches(self, nodes: Sequence[int]) -> bool:
        """Might some of ``nodes`` carry an edit?"""
        cons = self.cons
        return bool(cons) and not cons.keys().isdisjoint(nodes)

    def at(self, idx: int, part: str) -> ChoiceMap:
        """Node ``idx``'s constraints for kernel ``part``."""
        c = self.cons.get(idx)
        return EMPTY if c is None else c[PARTS.index(part)]

    @staticmethod
    def empty(sub: ChoiceMap) -> bool:
        """Is the sub-edit nothing at all?"""
        return sub.is_empty()

    @staticmethod
    def key(sub: ChoiceMap) -> Hashable:
        """Nodes whose sub-edits have equal keys may share one batched call."""
        if sub.is_empty():
            return ()
        key = tuple((tuple((k.start, k.stop, k.step) if isinstance(k, slice) else k for k in a),
                     tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (a, v)
                    for a, v in sub.items(stacked=True))
        try:
            hash(key)
        except TypeError:
            return ("id", id(sub))  # (nothing to batch it with)
        return key

    @staticmethod
    def _stacked(subs: Sequence[ChoiceMap]) -> Any:
        return None if subs[0].is_empty() else PerRow(tree_stack(list(subs)))

    def fresh(self, kernel: GenerativeFunction, args: tuple[Any, ...],
              sub: ChoiceMap) -> tuple[Trace, Any]:
        """A node new to the tree: (trace, generate weight or None)."""
        if sub.is_empty() and not self.strict:
            return kernel.simulate(args), None
        tr, w = kernel.generate(args, sub)
        if self.strict:
            _check_given(tr, sub)
        return tr, w

    def fresh_rows(self, kernel: GenerativeFunction, n: int, args: tuple[Any, ...],
                   subs: Sequence[ChoiceMap], who: str) -> tuple[Trace, Any]:
        """``fresh`` for ``n`` rows of one batch."""
        cm = self._stacked(subs)
        if cm is None and not self.strict:
            return rows_simulate(kernel, n, args, who), None
        tr, w = rows_generate(kernel, n, args, cm)
        if self.strict:
            _check_given(tr, EMPTY if cm is None else cm.value)
        return tr, w

    def revisit(self, kernel: GenerativeFunction, old: Trace, args: tuple[Any, ...],
                diffs: tuple[Diff, ...], sub: ChoiceMap) -> KernelResult:
        """A retained node whose input changed or that is constrained: ``update``."""
        return kernel.update(old, args, diffs, sub)

    def revisit_rows(self, kernel: GenerativeFunction, olds: Trace, args: tuple[Any, ...],
                     diffs: tuple[Diff, ...], subs: Sequence[ChoiceMap]) -> KernelResult:
        """``revisit`` for the rows of the batch ``olds``."""
        return rows_update(kernel, olds, args, diffs, self._stacked(subs))


class Resample:
    """The edit of regenerate: a selection.  Retained nodes are regenerated; nodes new to
    the tree are simulated; removed ones contribute nothing to the weight."""

    counts_removed = False
    nothing = Selection.none()

    def __init__(self, selection: Selection) -> None:
        self.selection = selection

    def must(self, gf: Recurse, old: RecurseTrace) -> set[int]:
        """The nodes with something selected, and their ancestors."""
        nodes = list(old.productions)
        default, special = element_selections(self.selection, nodes)
        if not default.is_empty_static() or isinstance(self.selection, MaskSelection):
            return set(nodes)
        return gf.with_ancestors(k for k, s in special.items() if not s.is_empty_static())

    def edited(self, old: RecurseTrace, part: str) -> list[int]:
        """The nodes whose ``part`` kernel has something selected."""
        nodes = list(old.productions)
        default, special = element_selections(self.selection, nodes)
        if default.is_empty_static() and not isinstance(self.selection, MaskSelection):
            nodes = list(special)
        return [i for i in nodes if not self.at(i, part).is_empty_static()]

    def touches(self, nodes: Sequence[int]) -> bool:
        """Might some of ``nodes`` carry an edit?"""
        return not self.selection.is_empty_static()

    def at(self, idx: int, part: str) -> Selection:
        """Node ``idx``'s sub-selection for kernel ``part``."""
        return self.selection.get_subselection(idx).get_subselection(part)

    @staticmethod
    def empty(sub: Selection) -> bool:
        """Is the sub-edit nothing at all?"""
        return sub.is_empty_static()

    @staticmethod
    def key(sub: Selection) -> Hashable:
        """Nodes share a batched call when their selections are equal: everything,
        nothing, or built alike from the same addresses (a selection holding tensors only
        with itself)."""
        if sub.is_empty_static():
            return ()
        if sub.is_all_static():
            return "all"
        return selection_key(sub)

    def fresh(self, kernel: GenerativeFunction, args: tuple[Any, ...],
              sub: Selection) -> tuple[Trace, Any]:
        """A node new to the tree: simulated (its choices add nothing to the weight)."""
        return kernel.simulate(args), None

    def fresh_rows(self, kernel: GenerativeFunction, n: int, args: tuple[Any, ...],
                   subs: Sequence[Selection], who: str) -> tuple[Trace, Any]:
        """``fresh`` for ``n`` rows of one batch."""
        return rows_simulate(kernel, n, args, who), None

    def revisit(self, kernel: GenerativeFunction, old: Trace, args: tuple[Any, ...],
                diffs: tuple[Diff, ...], sub: Selection) -> KernelResult:
        """A retained node: ``regenerate``."""
        tr, w, rd = kernel.regenerate(old, args, diffs, sub)
        return tr, w, rd, None

    def revisit_rows(self, kernel: GenerativeFunction, olds: Trace, args: tuple[Any, ...],
                     diffs: tuple[Diff, ...], subs: Sequence[Selection]) -> KernelResult:
        """``revisit`` for the rows of the batch ``olds`` (one selection for all)."""
        tr, w, rd = rows_regenerate(kernel, olds, args, diffs, subs[0])
        return tr, w, rd, None


Edit = Constrain | Resample


def selection_key(sel: Selection) -> Hashable:
    """A key that is equal for selections built alike (same classes, same addresses, equal
    parts), so they select the same; a selection holding anything else (tensor masks) is
    its own key (kept alive in it, so its id is not reused meanwhile)."""
    if sel.is_empty_static():
        return ()
    if sel.is_all_static():
        return "all"
    cls, args = sel.reduce_parts()
    parts: list[Hashable] = []
    for a in args:
        if isinstance(a, Selection):
            parts.append(selection_key(a))
        elif type(a) is dict:
            parts.append(tuple((k, selection_key(v) if isinstance(v, Selection) else v)
                               for k, v in a.items()))
        elif a is None or isinstance(a, (int, float, str, tuple)):
            parts.append(a)
        else:
            return ("object", sel)
    key = (cls, tuple(parts))
    try:
        hash(key)
    except TypeError:
        return ("object", sel)
    return key
