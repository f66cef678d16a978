"""How a :class:`~gfcomb.combinators.switch.Switch` edit changes branch: the parts of its edit
engine (``Switch._edit``, which ``update`` and ``regenerate`` run) that generate a new
branch reusing the old choices.

Changing branch (update, regenerate)
------------------------------------
Under vmap with a changed batched index, ``update`` runs ONE ``generate`` per branch for all
elements, whether they stay on the branch or move to it: the elements that stay reuse every
old choice, which for branches with prior proposals (every @gen function, distribution and
combinator of gfcomb) is exactly the branch's update: same weight (new score − old score −
Σ log p of fresh choices), same discard (the overwritten values).  (Running the branch's
update AND a generate and merging the two traces with ``torch.where`` cost twice as much.)
With an unchanged index (``NoChange``) every element stays and the branch's own update runs.

The new branch is *generated* with the old choices it can reuse as constraints: the old
choices at addresses the new branch visits, minus those overwritten by new constraints
(update) or selected (regenerate).  To know which addresses the new branch visits without
making it fail on the ones it does not, we first try a ``generate`` with all of them; if the
branch rejects one (UnvisitedConstraintError), we take the branch's address structure from a
``simulate`` (or, under vmap, from the branch's trace already held in the old trace), keep the
old choices at those addresses, generate, and check that the new trace visits no other old
address.  A branch whose addresses depend on its choices (possible outside vmap only) is
re-generated with the structure it actually showed (an old choice it then rejects is left
out), until the reused set is stable, so every old choice at an address the new trace
visits is reused, as in Gen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gfcomb.combinators.switch.merge import Flag, equals, where
from gfcomb.combinators.switch.trace import SwitchTrace
from gfcomb.combinators.vector import has_masks
from gfcomb.core import masked
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange
from gfcomb.core.errors import UnvisitedConstraintError
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.core.selection import MaskSelection
from gfcomb.core.trace import Trace

_EMPTY = ChoiceMap.empty()
_MAX_PASSES = 8  # re-generations for branches whose structure depends on their choices


def generate_reusing(branch: GenerativeFunction, bargs: tuple[Any, ...], cm: ChoiceMap,
                     provided: ChoiceMap, structure: ChoiceMap | None, batched: bool,
                     ) -> tuple[Trace, torch.Tensor, ChoiceMap, ChoiceMap]:
    """Generate ``branch`` with constraints ``cm`` and, where it visits their addresses,
    the old choices ``provided`` (disjoint from ``cm``).

    Returns ``(trace, weight, reused, dropped)``: ``reused`` are the old choices passed
    on; ``dropped`` the constraints of ``cm`` at addresses the branch never visits
    (batched mode only; outside it the branch raises for them).  ``structure`` is a
    choice map with the branch's addresses, if known.
    """
    if structure is None:
        try:
            tr, w = branch.generate(bargs, masked.union([(cm, True), (provided, True)]))
            return tr, w, provided, _EMPTY
        except UnvisitedConstraintError:
            if not batched and provided.is_empty():
                raise
            structure = branch.simulate(bargs).choices
    cm_use, dropped = masked.restrict(cm, structure) if batched else (cm, _EMPTY)
    reused = masked.restrict(provided, structure)[0]
    best = None
    for _ in range(_MAX_PASSES):
        # (under vmap the structure is static and the first pass succeeds; outside it a
        # branch whose addresses depend on its choices may need a few passes)
        try:
            tr, w = branch.generate(bargs, masked.union([(cm_use, True), (reused, True)]))
        except UnvisitedConstraintError as err:
            smaller = masked.without(reused, tuple(err.address))
            if smaller is None:  # not an old choice: a bad constraint
                raise
            reused = smaller
            continue
        if batched and has_masks(tr.choices):
            # the branch's addresses differ per element (a nested Switch): an old choice
            # reused for an element whose new trace does not visit its address must not
            # count as a constraint it ignores (NaN weight) -- pass only the old choices
            # each element's new trace visits, and generate again
            reused = masked.where_present(reused, tr.choices)
            tr, w = branch.generate(bargs, masked.union([(cm_use, True), (reused, True)]))
            best = (tr, w, reused)
            break
        best = (tr, w, reused)
        visited = masked.restrict(provided, tr.choices)[0]
        if masked.addresses(visited) == masked.addresses(reused):
            break
        reused = visited
    if best is None:  # no stable reuse found: reuse nothing (still a valid update)
        tr, w = branch.generate(bargs, cm_use)
        best = (tr, w, _EMPTY)
    return best[0], best[1], best[2], dropped


def same_flags(trace: SwitchTrace, index_diff: Diff) -> list[Flag]:
    """Per new branch k: is the element's old branch k too (bool or per-element tensor)."""
    old = trace.selector
    out: list[Flag] = []
    for k in range(len(trace.traces)):
        if trace.traces[k] is None:
            out.append(False)  # no element was on branch k (widened by harmonize)
        elif isinstance(index_diff, NoChange):
            out.append(True)  # the index did not change: every element stays
        else:
            out.append(equals(old, k))
    return out


def old_logp(branches: Sequence[GenerativeFunction], trace: SwitchTrace,
             reused: ChoiceMap) -> torch.Tensor:
    """Σ over the reused old choices of their log density under the old branch."""
    if reused.is_empty():
        return torch.zeros_like(trace.score)
    sel = MaskSelection(masked.presence_flags(reused))
    old = trace.selector
    total: Any = None
    for i, (b, t) in enumerate(zip(branches, trace.traces)):
        if t is None:
            continue
        lp = b.project(t, sel)
        f = equals(old, i)
        lp = where(f, lp, torch.zeros_like(lp), "weights")
        total = lp if total is None else total + lp
    return total
