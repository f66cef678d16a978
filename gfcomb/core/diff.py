"""Argument and return-value diffs: what changed since the previous trace.

``update``/``regenerate`` take one diff per argument; combinators use them to skip work.
``NoChange()`` promises the value is the same as in the old trace; ``UnknownChange()`` says
nothing is known; ``VectorDiff(new_length, prev_length, updated)`` says, for a vector-valued
argument (or return value), which elements changed (``updated`` is a collection of indices;
elements at or beyond ``prev_length`` are new).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from torch.utils import _pytree as pytree


class Diff:
    """Base class of diffs."""

    __slots__ = ()


@attrs.frozen
class NoChange(Diff):
    """The value is unchanged."""


@attrs.frozen
class UnknownChange(Diff):
    """The value may have changed in any way."""


@attrs.frozen
class VectorDiff(Diff):
    """A vector whose length went from ``prev_length`` to ``new_length`` and whose elements
    ``updated`` (indices below ``min(new_length, prev_length)``) may have changed."""

    new_length: int
    prev_length: int
    updated: frozenset[int] = attrs.field(converter=lambda x: frozenset(int(i) for i in x),
                                          factory=frozenset)


for _cls in (NoChange, UnknownChange, VectorDiff):
    # diffs are static: invisible to vmap (no tensor leaves)
    pytree.register_pytree_node(_cls, lambda d: ([], d), lambda _, d: d)


def all_unchanged(diffs: Sequence[Diff]) -> bool:
    """True if every diff is NoChange (a loop: this runs once per traced call)."""
    for d in diffs:
        if not isinstance(d, NoChange):
            return False
    return True
