"""Selections: sets of addresses, with an algebra (``~s``, ``s | t``, ``s & t``).

``select("x", ("ys", 0, "y"))`` selects the two addresses and everything under them
(``select("ys")`` selects every choice under ``"ys"``).  ``selectall()`` selects everything;
``Selection.none()`` nothing.

A selection is walked one key at a time: ``s.get_subselection(key)`` is the selection of the
sub-tree under ``key``, and ``s.leaf_flag()`` says whether the value at the empty address is
selected.  Inside a vmapped kernel the flag may be a boolean tensor (one flag per element):
that is how Map selects element 3 but not element 4 in one batched call.  Such selections
(:class:`MaskSelection`) are built by the combinators, not by users.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch.utils import _pytree as pytree

from gfcomb.core.address import check_key, normalize
from gfcomb.core.choicemap import ChoiceMap

Flag = Union[bool, torch.Tensor]


def flag_not(f: Flag) -> Flag:
    return (not f) if isinstance(f, bool) else ~f


def flag_or(a: Flag, b: Flag) -> Flag:
    """``a or b`` of two flags (bools, or per-element bool tensors)."""
    return _flag_op(a, b, True, operator.or_)


def flag_and(a: Flag, b: Flag) -> Flag:
    """``a and b`` of two flags (bools, or per-element bool tensors)."""
    return _flag_op(a, b, False, operator.and_)


def _flag_op(a: Flag, b: Flag, absorbing: bool, op: Callable[[Any, Any], Any]) -> Flag:
    """``or`` (``absorbing`` True) or ``and`` of two flags without a tensor op where a bool
    decides: the absorbing value wins, the other bool is neutral."""
    if a is absorbing or b is absorbing:
        return absorbing
    if isinstance(a, bool):
        return b
    if isinstance(b, bool):
        return a
    result: Flag = op(a, b)
    return result


class Selection:
    """Base class of selections.  Subclasses implement the three primitive queries."""

    __slots__ = ()

    # -- primitives
    def get_subselection(self, key: Any) -> Selection:
        """The selection of the sub-tree under ``key``."""
        raise NotImplementedError

    def leaf_flag(self) -> Flag:
        """Whether the value at the empty address is selected (bool, or a bool tensor)."""
        raise NotImplementedError

    def explicit_keys(self) -> frozenset[Any]:
        """Keys this selection treats specially at the first level (others share one answer)."""
        return frozenset()

    # -- static shortcuts (conservative: False means "don't know")
    def is_all_static(self) -> bool:
        """True if this selection certainly selects everything."""
        return False

    def is_empty_static(self) -> bool:
        """True if this selection certainly selects nothing."""
        return False

    # -- derived
    def get_subselection_at(self, addr: Any) -> Selection:
        """The selection of the sub-tree at address ``addr``."""
        s = self
        for key in normalize(addr):
            s = s.get_subselection(key)
        return s

    def __contains__(self, addr: Any) -> bool:
        flag = self.get_subselection_at(addr).leaf_flag()
        return bool(flag) if isinstance(flag, bool) else bool(flag.all())

    def __invert__(self) -> Selection:
        return Complement(self)

    def __or__(self, other: Selection) -> Selection:
        return Union_(self, other)

    def __and__(self, other: Selection) -> Selection:
        return Intersection(self, other)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle/deepcopy support: rebuilt from the constructor arguments, which every
        selection class keeps in its slots, in order (``selectall()`` and
        ``Selection.none()`` come back as the shared instances)."""
        slots: tuple[str, ...] = type(self).__slots__
        return (type(self), tuple(getattr(self, name) for name in slots))

    def reduce_parts(self) -> tuple[type[Selection], tuple[Any, ...]]:
        """``(class, constructor arguments)``: what :mod:`gfcomb.persistence` stores."""
        slots: tuple[str, ...] = type(self).__slots__
        return type(self), tuple(getattr(self, name) for name in slots)

    @staticmethod
    def none() -> Selection:
        """The empty selection."""
        return _NONE

    @staticmethod
    def all() -> Selection:
        """The selection of every address."""
        return _ALL


class _Constant(Selection):
    """A selection that answers the same at every address: everything or nothing."""

    __slots__ = ()
    selects: bool

    def get_subselection(self, key: Any) -> Selection:
        return self

    def leaf_flag(self) -> Flag:
        return self.selects

    def is_all_static(self) -> bool:
        return self.selects

    def is_empty_static(self) -> bool:
        return not self.selects

    def __repr__(self) -> str:
        return "selectall()" if self.selects else "Selection.none()"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Selection.all if self.selects else Selection.none, ())


class AllSelection(_Constant):
    """Selects every address."""

    __slots__ = ()
    selects = True


class NoneSelection(_Constant):
    """Selects nothing."""

    __slots__ = ()
    selects = False


_ALL = AllSelection()
_NONE = NoneSelection()


class AddressSelection(Selection):
    """A trie of selected addresses; a selected address selects everything beneath it."""

    __slots__ = ("_children",)

    def __init__(self, children: Mapping[Any, Selection]) -> None:
        self._children = dict(children)

    def get_subselection(self, key: Any) -> Selection:
        return self._children.get(key, _NONE)

    def leaf_flag(self) -> Flag:
        return False

    def explicit_keys(self) -> frozenset[Any]:
        return frozenset(self._children)

    def is_empty_static(self) -> bool:
        return not self._children

    def __repr__(self) -> str:
        return f"AddressSelection({self._children!r})"


class Complement(Selection):
    """Every address that ``inner`` does not select."""

    __slots__ = ("inner",)

    def __init__(self, inner: Selection) -> None:
        self.inner = inner

    def get_subselection(self, key: Any) -> Selection:
        sub = self.inner.get_subselection(key)
        if sub.is_empty_static():
            return _ALL
        if sub.is_all_static():
            return _NONE
        return Complement(sub)

    def leaf_flag(self) -> Flag:
        return flag_not(self.inner.leaf_flag())

    def explicit_keys(self) -> frozenset[Any]:
        return self.inner.explicit_keys()

    def is_all_static(self) -> bool:
        return self.inner.is_empty_static()

    def is_empty_static(self) -> bool:
        return self.inner.is_all_static()

    def __invert__(self) -> Selection:
        return self.inner

    def __repr__(self) -> str:
        return f"~{self.inner!r}"


class _Binary(Selection):
    """A union (``any_``) or an intersection of two selections: the two are duals, so one
    class holds both (the union's neutral element is the empty selection and everything
    absorbs it; the intersection's the other way round)."""

    __slots__ = ("a", "b")
    any_: bool  # union: True
    symbol: str

    def __init__(self, a: Selection, b: Selection) -> None:
        self.a, self.b = a, b

    def _absorbing(self, s: Selection) -> bool:
        return s.is_all_static() if self.any_ else s.is_empty_static()

    def _neutral(self, s: Selection) -> bool:
        return s.is_empty_static() if self.any_ else s.is_all_static()

    def get_subselection(self, key: Any) -> Selection:
        sa, sb = self.a.get_subselection(key), self.b.get_subselection(key)
        if self._absorbing(sa) or self._absorbing(sb):
            return _ALL if self.any_ else _NONE
        if self._neutral(sa):
            return sb
        if self._neutral(sb):
            return sa
        return type(self)(sa, sb)

    def leaf_flag(self) -> Flag:
        combine = flag_or if self.any_ else flag_and
        return combine(self.a.leaf_flag(), self.b.leaf_flag())

    def explicit_keys(self) -> frozenset[Any]:
        return self.a.explicit_keys() | self.b.explicit_keys()

    def is_all_static(self) -> bool:
        if self.any_:
            return self.a.is_all_static() or self.b.is_all_static()
        return self.a.is_all_static() and self.b.is_all_static()

    def is_empty_static(self) -> bool:
        if self.any_:
            return self.a.is_empty_static() and self.b.is_empty_static()
        return self.a.is_empty_static() or self.b.is_empty_static()

    def __repr__(self) -> str:
        return f"({self.a!r} {self.symbol} {self.b!r})"


class Union_(_Binary):
    """Addresses selected by either selection."""

    any_ = True
    symbol = "|"


class Intersection(_Binary):
    """Addresses selected by both selections."""

    any_ = False
    symbol = "&"


class MaskSelection(Selection):
    """A selection given by a choice map of boolean flags (tensor-valued under vmap).

    A flag at an address selects that address and everything beneath it.  Built by the
    combinators to pass element-dependent selections into a vmapped kernel; it is a pytree.
    """

    __slots__ = ("flags",)

    def __init__(self, flags: ChoiceMap) -> None:
        self.flags = flags

    def get_subselection(self, key: Any) -> Selection:
        if self.flags.is_value():
            return self
        sub = self.flags.get_submap(key)
        if sub.is_empty():
            return _NONE
        return MaskSelection(sub)

    def leaf_flag(self) -> Flag:
        if self.flags.is_value():
            return self.flags.get_value()
        return False

    def is_empty_static(self) -> bool:
        return self.flags.is_empty()

    def __repr__(self) -> str:
        return f"MaskSelection({self.flags!r})"


pytree.register_pytree_node(
    MaskSelection, lambda s: ([s.flags], None), lambda ch, _: MaskSelection(list(ch)[0])
)
# the selection algebra around a MaskSelection travels into vmap too (its flags batched)
pytree.register_pytree_node(
    Complement, lambda s: ([s.inner], None), lambda ch, _: Complement(list(ch)[0]))
pytree.register_pytree_node(
    Union_, lambda s: ([s.a, s.b], None), lambda ch, _: Union_(*ch))
pytree.register_pytree_node(
    Intersection, lambda s: ([s.a, s.b], None), lambda ch, _: Intersection(*ch))


def select(*addrs: Any) -> Selection:
    """The selection of the given addresses (and everything under each of them)."""
    root: dict[Any, Any] = {}
    for addr in addrs:
        path = normalize(addr)
        if not path:
            return _ALL
        node = root
        for k in path[:-1]:
            check_key(k, "selection address")
            nxt = node.get(k)
            if nxt is True:
                break
            node = node.setdefault(k, {})
        else:
            check_key(path[-1], "selection address")
            node[path[-1]] = True
    return _build(root)


def _build(tree: dict[Any, Any]) -> Selection:
    return AddressSelection({k: (_ALL if v is True else _build(v)) for k, v in tree.items()})


def selectall() -> Selection:
    """The selection of every address."""
    return _ALL


# ------------------------------------------------------------------ per-element selections
_OTHER = object()  # a key no selection mentions explicitly


def element_selections(selection: Selection,
                       keys: Sequence[int]) -> tuple[Selection, dict[int, Selection]]:
    """Split a selection over vector elements: (the selection shared by most elements,
    {key: its own selection} for the elements the selection names explicitly)."""
    default = selection.get_subselection(_OTHER)
    special = {}
    explicit = selection.explicit_keys()
    if explicit:
        keyset = keys if isinstance(keys, range) else set(keys)  # (range: O(1) lookups)
        for k in explicit:
            if isinstance(k, int) and not isinstance(k, bool) and k in keyset:
                special[k] = selection.get_subselection(k)
    return default, special


def selection_flags_for_vector(selection: Selection, keys: Sequence[int],
                               inner: ChoiceMap, axis: int = 0) -> Selection:
    """The selection to apply to a *stacked* sub-map ``inner`` whose elements have ``keys``.

    If every element is selected the same way, that shared selection is returned (no
    tensors).  Otherwise a :class:`MaskSelection` mirrors ``inner``: for each inner address a
    boolean tensor with one flag per element (broadcast over nested element axes).
    ``axis`` is the element axis of ``inner``'s leaves (> 0 when the stacked map carries
    outer batch dimensions in front, e.g. one returned by ``vmap``); the flags then get the
    same leading dimensions.
    """
    n = len(keys)
    if isinstance(selection, (Complement, Union_, Intersection)) and has_mask_flags(selection):
        # per-element flags inside an algebra of selections: map each part over the elements
        # (the default/special split below would read a MaskSelection as selecting nothing)
        parts = [selection_flags_for_vector(p, keys, inner, axis) for p in _parts(selection)]
        if isinstance(selection, Complement):
            return ~parts[0]
        return (parts[0] | parts[1]) if isinstance(selection, Union_) else parts[0] & parts[1]
    if isinstance(selection, MaskSelection):
        flags = selection.flags
        if flags.is_stacked():
            return MaskSelection(flags.stacked_inner)
        if flags.is_value():
            f = flags.get_value()
            ax = min(axis, f.dim())
            return MaskSelection(ChoiceMap.value(
                f.unsqueeze(ax).expand(f.shape[:ax] + (n,) + f.shape[ax:])))
    default, special = element_selections(selection, keys)
    if not special:
        return default
    flags = _stacked_flags(default, special, keys, inner)
    if axis > 0:  # outer batch dimensions in front of the element axis
        first = next(x for x in pytree.tree_leaves(inner) if isinstance(x, torch.Tensor))
        lead = first.shape[:axis]
        flags = pytree.tree_map(
            lambda t: t.reshape((1,) * axis + t.shape).expand(lead + t.shape), flags)
    return MaskSelection(flags)


def _parts(selection: Selection) -> list[Selection]:
    if isinstance(selection, Complement):
        return [selection.inner]
    if isinstance(selection, (Union_, Intersection)):
        return [selection.a, selection.b]
    return []


def has_mask_flags(selection: Selection) -> bool:
    """True if ``selection`` holds per-element flags (a MaskSelection, possibly inside
    complements, unions and intersections): it must then travel into vmap as an argument."""
    if isinstance(selection, MaskSelection):
        return True
    return any(has_mask_flags(p) for p in _parts(selection))


def _element_flags(sel: Selection, cm: ChoiceMap) -> ChoiceMap:
    """Flags for ONE element selected by ``sel``, mirroring its choices ``cm`` (leading
    dimensions of ``cm``'s leaves are ignored).  A leaf's flag has one axis per stacked map
    above it inside ``cm`` (nested vector elements), so ``select((2, "inner", 0, "y"))``
    reaches inner element 0 of outer element 2."""
    if cm.is_value():
        f = sel.leaf_flag()
        flag = f if isinstance(f, bool) else bool(f.all())
        return ChoiceMap.value(torch.tensor(flag, device=cm.get_value().device))
    if cm.is_stacked():
        keys = cm.stacked_indices
        default, special = element_selections(sel, keys)
        return ChoiceMap.from_stacked_block(
            _stacked_flags(default, special, keys, cm.stacked_inner), cm.stacked_length,
            cm.stacked_indices)
    return ChoiceMap.node({k: _element_flags(sel.get_subselection(k), cm.get_submap(k))
                           for k in cm.keys()})


def _stacked_flags(default: Selection, special: Mapping[int, Selection], keys: Sequence[int],
                   inner: ChoiceMap) -> ChoiceMap:
    """Flags for every element of a stacked map (element keys ``keys``, stacked sub-map
    ``inner``): each leaf gets a leading element axis; elements named in ``special`` get their
    own flags, the others ``default``'s.  Python work is per special element, not per element."""
    n = len(keys)
    base = _element_flags(default, inner)
    leaves, spec = pytree.tree_flatten(base)
    out = [x.unsqueeze(0).expand((n,) + x.shape) for x in leaves]
    if special:
        out = [x.clone() for x in out]
        pos = {k: j for j, k in enumerate(keys)}
        for k, sub in special.items():
            for x, row in zip(out, pytree.tree_leaves(_element_flags(sub, inner))):
                x[pos[k]] = row
    return pytree.tree_unflatten(out, spec)
