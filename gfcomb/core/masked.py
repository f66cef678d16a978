"""The masked choice-map algebra: choice maps whose values carry presence masks (a Switch
under vmap holds every branch's choices, each present where its branch was taken).

Every function walks choice maps structurally (never ``items()``, which reads masks with
``bool()``), so they run inside vmap.  ``depth`` counts the stacked maps above the current
node: a value there has ``depth`` element axes in front (after ``bdim`` batch axes when used
outside vmap), and its mask has exactly those leading axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gfcomb.core.batching import is_batched
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError, ChoiceMapMergeError
from gfcomb.core.selection import (
    Flag,
    Selection,
    flag_and,
    flag_not,
    flag_or,
    selection_flags_for_vector,
)

_EMPTY = ChoiceMap.empty()


def indices_of(cm: ChoiceMap) -> tuple[int, ...] | None:
    ix = cm.stacked_indices
    return None if ix == tuple(range(cm.stacked_length)) else ix


def stack_like(inner: ChoiceMap, like: ChoiceMap, lead: int) -> ChoiceMap:
    return ChoiceMap.from_stacked_block(inner, like.stacked_length, indices_of(like),
                                        batch_ndim=lead)


def lead_flag(flag: Flag, value: torch.Tensor, lead: int) -> Flag:
    """A per-element flag broadcast to a value's ``lead`` leading (batch/element) axes."""
    if isinstance(flag, bool):
        return flag
    f = flag.reshape(flag.shape + (1,) * (lead - flag.dim()))
    return f.expand(value.shape[:lead])


def union(sources: Sequence[tuple[ChoiceMap, Flag]], bdim: int = 0, depth: int = 0,
           path: tuple[Any, ...] = (), exhaustive: bool = False) -> ChoiceMap:
    """The union of choice maps, each present where its flag is (flags have ``bdim`` axes).

    Where several sources hold a value at one address, the value of the (last) source present
    is taken, element by element; the result's mask is where any source is present.
    ``exhaustive`` says that the flags partition the elements (one branch per element): an
    address where every source holds an unmasked value is then present everywhere (no mask).
    """
    live = [(cm, f) for cm, f in sources if f is not False]
    srcs = [(cm, f) for cm, f in live if not cm.is_empty()]
    if not srcs:
        return _EMPTY
    if len(srcs) == 1 and srcs[0][1] is True:
        return srcs[0][0]
    everywhere = exhaustive and len(srcs) == len(live)
    n_values = sum(cm.is_value() for cm, _ in srcs)
    if n_values:
        if n_values != len(srcs):
            raise ArgumentError(
                f"Switch: the branches disagree at address {path!r}: a choice in one, "
                "deeper addresses in another")
        value: Any = None
        mask: Flag = False
        # (every source present and unmasked, the flags a partition: present everywhere, so
        # the flags need not be or-ed into a mask)
        unmasked = everywhere and all(cm.mask is None for cm, _ in srcs)
        for cm, f in srcs:
            v = cm.get_value()
            present = flag_and(lead_flag(f, v, bdim + depth),
                           True if cm.mask is None else cm.mask)
            if present is False:
                continue
            if value is None:
                value = v
            elif v.shape != value.shape:
                raise ArgumentError(
                    f"Switch: the branches' choices at address {path!r} differ in shape "
                    f"({tuple(value.shape)} vs {tuple(v.shape)})")
            elif present is True:
                value = v
            else:
                m = present.reshape(present.shape + (1,) * (v.dim() - present.dim()))
                value = torch.where(m, v, value)
            mask = True if unmasked else flag_or(mask, present)
        if value is None or mask is False:
            return _EMPTY
        return ChoiceMap.value(value, None if mask is True or mask is False else mask)
    first = srcs[0][0]
    if all(cm.is_stacked() and cm.stacked_length == first.stacked_length
           and cm.stacked_indices == first.stacked_indices for cm, _ in srcs):
        inner = union([(_EMPTY if cm.is_empty() else cm.stacked_inner, f) for cm, f in live],
                       bdim, depth + 1, path + (":",), exhaustive)
        return stack_like(inner, first, bdim + depth)
    nodes = [(cm.unstacked(), f) for cm, f in live]
    keys: dict[Any, None] = {}
    for cm, _ in nodes:
        keys.update(dict.fromkeys(cm.keys()))
    return ChoiceMap.node({k: union([(cm.get_submap(k), f) for cm, f in nodes], bdim, depth,
                                     path + (k,), exhaustive) for k in keys})


def restrict(cm: ChoiceMap, structure: ChoiceMap,
              depth: int = 0) -> tuple[ChoiceMap, ChoiceMap]:
    """Split ``cm`` into (values at addresses ``structure`` has, the others)."""
    if cm.is_empty():
        return _EMPTY, _EMPTY
    if structure.is_empty():
        return _EMPTY, cm
    if cm.is_value():
        return (cm, _EMPTY) if structure.is_value() else (_EMPTY, cm)
    if structure.is_value():
        return _EMPTY, cm
    if (cm.is_stacked() and structure.is_stacked()
            and set(cm.stacked_indices) <= set(structure.stacked_indices)):
        kept, dropped = restrict(cm.stacked_inner, structure.stacked_inner, depth + 1)
        return stack_like(kept, cm, depth), stack_like(dropped, cm, depth)
    node = cm.unstacked()
    kept_d, dropped_d = {}, {}
    for k in node.keys():
        kept_d[k], dropped_d[k] = restrict(node.get_submap(k), structure.get_submap(k), depth)
    return ChoiceMap.node(kept_d), ChoiceMap.node(dropped_d)


def minus(a: ChoiceMap, b: ChoiceMap, depth: int = 0) -> ChoiceMap:
    """The values of ``a`` where ``b`` holds no (present) value."""
    return _by_presence(a, b, False, depth)


def where_present(a: ChoiceMap, b: ChoiceMap, depth: int = 0) -> ChoiceMap:
    """The values of ``a`` where ``b`` holds a present value (element by element)."""
    return _by_presence(a, b, True, depth)


def _by_presence(a: ChoiceMap, b: ChoiceMap, present: bool, depth: int) -> ChoiceMap:
    """:func:`where_present` (``present``) or :func:`minus`: the values of ``a``, each kept
    where ``b`` does (or does not) hold a present value."""
    if a.is_empty() or b.is_empty() or (a.is_value() != b.is_value()):
        return _EMPTY if present else a
    if a.is_value():
        if b.mask is None:
            return a if present else _EMPTY
        keep = b.mask if present else ~b.mask
        return ChoiceMap.value(a.get_value(), keep if a.mask is None else a.mask & keep)
    if a.is_stacked() and b.is_stacked() and a.stacked_indices == b.stacked_indices:
        return stack_like(_by_presence(a.stacked_inner, b.stacked_inner, present, depth + 1),
                          a, depth)
    node = a.unstacked()
    return ChoiceMap.node({k: _by_presence(node.get_submap(k), b.get_submap(k), present, depth)
                           for k in node.keys()})


def drop_selected(cm: ChoiceMap, selection: Selection, depth: int = 0) -> ChoiceMap:
    """The values of ``cm`` that ``selection`` does not select."""
    if cm.is_empty() or selection.is_empty_static():
        return cm
    if selection.is_all_static():
        return _EMPTY
    if cm.is_value():
        flag = selection.leaf_flag()
        if flag is True:
            return _EMPTY
        if flag is False:
            return cm
        keep = ~flag
        return ChoiceMap.value(cm.get_value(), keep if cm.mask is None else cm.mask & keep)
    if cm.is_stacked():
        inner_sel = selection_flags_for_vector(selection, cm.stacked_indices, cm.stacked_inner)
        return stack_like(drop_selected(cm.stacked_inner, inner_sel, depth + 1), cm, depth)
    return ChoiceMap.node({k: drop_selected(cm.get_submap(k), selection.get_subselection(k),
                                             depth) for k in cm.keys()})


def presence_flags(cm: ChoiceMap, depth: int = 0) -> ChoiceMap:
    """Boolean flags mirroring ``cm``: where each value is present (for a MaskSelection)."""
    if cm.is_value():
        v = cm.get_value()
        m = cm.mask
        if m is None:
            m = torch.ones(v.shape[:depth], dtype=torch.bool, device=v.device)
        return ChoiceMap.value(m)
    if cm.is_stacked():
        return stack_like(presence_flags(cm.stacked_inner, depth + 1), cm, depth)
    return ChoiceMap.node({k: presence_flags(cm.get_submap(k), depth) for k in cm.keys()})


def children(cm: ChoiceMap) -> list[ChoiceMap]:
    if cm.is_stacked():
        return [cm.stacked_inner]
    return [cm.get_submap(k) for k in cm.keys()]


def any_present(cm: ChoiceMap) -> Flag:
    """Per element: does ``cm`` hold any present value."""
    return _presence(cm, True)


def _presence(cm: ChoiceMap, any_: bool) -> Flag:
    """:func:`any_present` (``any_``) or :func:`all_present`: the values' masks folded with
    ``or`` / ``and``, stopping as soon as the answer is the same for every element."""
    if cm.is_empty():
        return not any_
    if cm.is_value():
        m = cm.mask
        return True if m is None else (m.any() if any_ else m.all())
    combine = flag_or if any_ else flag_and
    acc: Flag = not any_
    for sub in children(cm):
        acc = combine(acc, _presence(sub, any_))
        if acc is any_:
            return acc
    return acc


def missing(made: ChoiceMap, given: ChoiceMap) -> Flag:
    """Per element: does ``made`` hold a present value where ``given`` holds none."""
    if made.is_empty():
        return False
    if made.is_value():
        present: Flag = True if made.mask is None else made.mask
        g: Flag = (True if given.mask is None else given.mask) if given.is_value() else False
        miss = flag_and(present, flag_not(g))
        return miss if isinstance(miss, bool) else miss.any()
    if made.is_stacked() and given.is_stacked() and (
            made.stacked_indices == given.stacked_indices):
        return missing(made.stacked_inner, given.stacked_inner)
    made, given = made.unstacked(), given.unstacked()
    acc: Flag = False
    for k in made.keys():
        acc = flag_or(acc, missing(made.get_submap(k), given.get_submap(k)))
        if acc is True:
            return True
    return acc


def all_present(cm: ChoiceMap) -> Flag:
    """Per element: is every value of ``cm`` present."""
    return _presence(cm, False)


def without(cm: ChoiceMap, addr: tuple[Any, ...], depth: int = 0) -> ChoiceMap | None:
    """``cm`` without its value at ``addr`` (``":"`` for a stacked level), or None if it holds
    no value there."""
    if not addr:
        return _EMPTY if cm.is_value() else None
    if cm.is_stacked() and addr[0] == ":":
        sub = without(cm.stacked_inner, addr[1:], depth + 1)
        return None if sub is None else stack_like(sub, cm, depth)
    node = cm.unstacked()
    if cm.is_value() or addr[0] not in set(node.keys()):
        return None
    sub = without(node.get_submap(addr[0]), addr[1:], depth)
    if sub is None:
        return None
    return ChoiceMap.node({**{k: node.get_submap(k) for k in node.keys()}, addr[0]: sub})


def addresses(cm: ChoiceMap) -> set[tuple[Any, ...]]:
    """The addresses of ``cm``'s values (a stacked level is ``":"``), masks ignored."""
    if cm.is_empty():
        return set()
    if cm.is_value():
        return {()}
    if cm.is_stacked():
        return {(":",) + a for a in addresses(cm.stacked_inner)}
    return {(k,) + a for k in cm.keys() for a in addresses(cm.get_submap(k))}


def all_absent(cm: ChoiceMap) -> bool:
    """True if every value of ``cm`` carries a presence mask that is all False, known where
    the mask carries no vmap batch dimension (a batched mask may be present: False)."""
    if cm.is_value():
        return _absent(cm)
    if cm.is_stacked():
        return all_absent(cm.stacked_inner)
    return all(all_absent(cm.get_submap(k)) for k in cm.keys())


def _absent(value: ChoiceMap) -> bool:
    m = value.mask
    return m is not None and not is_batched(m) and not bool(m.any())


def present_addresses(cm: ChoiceMap) -> set[tuple[Any, ...]]:
    """:func:`addresses` of the values that may be present: not those :func:`all_absent`
    says are absent for every element."""
    if cm.is_empty():
        return set()
    if cm.is_value():
        return set() if _absent(cm) else {()}
    if cm.is_stacked():
        return {(":",) + a for a in present_addresses(cm.stacked_inner)}
    return {(k,) + a for k in cm.keys() for a in present_addresses(cm.get_submap(k))}


def merge_values(a: ChoiceMap, b: ChoiceMap, prefix: tuple[Any, ...]) -> ChoiceMap:
    """Merge two values of which at least one is masked, element by element: ``a``'s value
    where ``a`` is present, else ``b``'s; present where either is.  An overlap (both present
    for some element) is an error where the masks can be read; under vmap (batched masks)
    it cannot be detected without data-dependent control flow, and ``a``'s value wins."""
    ma, mb = a.mask, b.mask
    overlap = mb if ma is None else (ma if mb is None else ma & mb)
    assert overlap is not None  # (at least one of the two is masked)
    if not is_batched(overlap) and bool(overlap.any()):
        raise ChoiceMapMergeError("merge: both choice maps hold a value at {addr}", prefix)
    if ma is None:  # b is present nowhere: a as it is
        return a
    if mb is None:
        return b
    m = ma.reshape(ma.shape + (1,) * (a.get_value().dim() - ma.dim()))
    return ChoiceMap.value(torch.where(m, a.get_value(), b.get_value()), ma | mb)
