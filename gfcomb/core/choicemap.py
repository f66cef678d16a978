"""ChoiceMap: an immutable, hierarchical map from addresses to tensor values.

A node is one of four kinds:

- *empty*;
- a *value* at the empty address (optionally with a boolean ``mask`` saying, per element of a
  batch, whether the value is present: this is how a Map passes "constraint only for some
  elements" into a vmapped kernel);
- a *node*: keys (``str`` or ``int``) to sub-maps;
- a *stacked* map: the choices of ``length`` elements of a vector (Map elements, Unfold steps)
  stored as one sub-map whose leaves carry a leading element axis.  Element ``i`` (key ``i``,
  or ``indices[i]`` for a sparse one) is the sub-map with every leaf indexed at ``i``.

Choice maps are pytrees, so ``torch.func.vmap`` can take and return them.  A stacked map
remembers the logical rank of its leaves when it was built, so that element indexing still
finds the element axis after an outer vmap has added batch dimensions in front of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from gfcomb.core.address import check_key, normalize
from gfcomb.core.errors import AddressError, ArgumentError, ChoiceMapMergeError
from gfcomb.core.values import short_repr, to_tensor

if TYPE_CHECKING:
    from gfcomb.core.selection import Selection

_EMPTY, _VALUE, _NODE, _STACKED = 0, 1, 2, 3


class ChoiceMap:
    """An immutable hierarchical map from addresses to values.

    ``ChoiceMap({"x": 1.0, ("ys", 0, "y"): 2.0})`` builds one from a flat mapping of
    addresses (a key or a tuple of keys) to values; nested dicts and ChoiceMaps are accepted
    as values too.  ``ChoiceMap.empty()`` is the empty map.

    Reading: ``cm["ys", 0, "y"]`` (a value; ``KeyError`` if absent), ``cm.get_submap("ys")``,
    ``cm.has_value(addr)``, ``addr in cm``, ``cm.items()``.  For stacked (vectorized) sub-maps,
    ``cm["ys", :, "y"]`` returns the stacked tensor of all elements at once.

    Combining: ``cm.merge(other)`` (error on overlap), ``cm.filter(selection)``.
    """

    __slots__ = ("_kind", "_value", "_mask", "_submaps", "_inner", "_length", "_indices",
                 "_ref_ndim", "_pos")

    _kind: int
    _value: Any
    _mask: Any
    _submaps: dict[Any, ChoiceMap]
    _inner: Any
    _length: int
    _indices: tuple[int, ...] | None
    _ref_ndim: int
    _pos: dict[int, int] | None

    def __init__(self, mapping: Mapping[Any, Any] | ChoiceMap | None = None) -> None:
        built = ChoiceMap._from_mapping(mapping)
        for slot in ChoiceMap.__slots__:
            object.__setattr__(self, slot, getattr(built, slot))

    # ------------------------------------------------------------------ raw constructors
    @staticmethod
    def _raw(kind: int, value: Any = None, mask: Any = None, submaps: Any = None,
             inner: Any = None, length: int = 0, indices: tuple[int, ...] | None = None,
             ref_ndim: int = -1) -> ChoiceMap:
        cm = object.__new__(ChoiceMap)
        # (the slots' own setters: about half the cost of object.__setattr__ by name)
        set_kind, set_value, set_mask, set_submaps, set_inner, set_length, set_indices, \
            set_ref_ndim, set_pos = _SLOT_SETTERS
        set_kind(cm, kind)
        set_value(cm, value)
        set_mask(cm, mask)
        set_submaps(cm, submaps if submaps is not None else {})
        set_inner(cm, inner)
        set_length(cm, length)
        set_indices(cm, indices)
        set_ref_ndim(cm, ref_ndim)
        set_pos(cm, None)
        return cm

    @staticmethod
    def empty() -> ChoiceMap:
        """The empty choice map."""
        return _EMPTY_MAP

    @staticmethod
    def value(value: Any, mask: torch.Tensor | None = None) -> ChoiceMap:
        """A map holding ``value`` at the empty address (present where ``mask`` is true)."""
        return ChoiceMap._raw(_VALUE, value=to_tensor(value), mask=mask)

    @staticmethod
    def node(submaps: Mapping[Any, ChoiceMap]) -> ChoiceMap:
        """A map from keys to sub-maps (empty sub-maps are dropped)."""
        subs = {}
        for k, v in submaps.items():
            check_key(k)
            if not v.is_empty():
                subs[k] = v
        if not subs:
            return _EMPTY_MAP
        return ChoiceMap._raw(_NODE, submaps=subs)

    @staticmethod
    def stacked(values: Mapping[Any, Any] | ChoiceMap, length: int | None = None,
                indices: tuple[int, ...] | None = None, batch_ndim: int = 0, *,
                mask: torch.Tensor | None = None) -> ChoiceMap:
        """The choice map of all elements of a Map or all steps of an Unfold at once.

        ``ChoiceMap.stacked({"y": ys})``: element ``i`` holds ``ys[i]`` at ``"y"`` (every
        value's leading axis is the element axis; all must have the same length).  Nest it
        under the combinator's address: ``ChoiceMap({"ys": ChoiceMap.stacked({"y": ys})})``
        constrains ``("ys", i, "y")`` for every ``i`` in one write, with the same weights as
        the per-address constraints.  Raises :class:`~gfcomb.core.errors.ArgumentError`
        naming the address whose values have no element axis or another length.

        ``mask`` (a bool tensor with one entry per element) makes element ``i``'s values
        present only where ``mask[i]`` is true: observations of ragged data, e.g. for
        ``Map(Mask(obs))``.  With ``length`` given: :meth:`from_stacked_block`.
        """
        if length is not None:
            if not isinstance(values, ChoiceMap):
                values = ChoiceMap._from_mapping(values)
            return ChoiceMap.from_stacked_block(values, length, indices, batch_ndim)
        if indices is not None or batch_ndim:
            raise ArgumentError("ChoiceMap.stacked: 'indices' and 'batch_ndim' need 'length' "
                                "(ChoiceMap.from_stacked_block)")
        inner = values if isinstance(values, ChoiceMap) else ChoiceMap._from_mapping(values)
        n: int | None = None
        first: tuple[Any, ...] = ()
        for addr, v in inner.items(stacked=True):
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                raise ArgumentError(
                    f"ChoiceMap.stacked: the value at address {addr!r} has no leading element "
                    "axis (give one row per element)")
            if n is None:
                n, first = int(v.shape[0]), addr
            elif v.shape[0] != n:
                raise ArgumentError(
                    f"ChoiceMap.stacked: the value at address {addr!r} has {v.shape[0]} "
                    f"elements, the value at {first!r} has {n}")
        if n is None:
            return _EMPTY_MAP
        if mask is not None:
            if mask.shape != (n,):
                raise ArgumentError(f"ChoiceMap.stacked: 'mask' must have shape ({n},), got "
                                    f"{tuple(mask.shape)}")
            inner = ChoiceMap._from_mapping({a: ChoiceMap.value(v, mask.to(torch.bool))
                                             for a, v in inner.items(stacked=True)})
        return ChoiceMap.from_stacked_block(inner, n)

    @staticmethod
    def from_stacked_block(inner: ChoiceMap, length: int, indices: tuple[int, ...] | None = None,
                           batch_ndim: int = 0) -> ChoiceMap:
        """The choices of ``length`` vector elements whose leaves in ``inner`` are stacked:
        element ``j`` has key ``indices[j]`` (``j`` when ``indices`` is None); ``batch_ndim``
        counts batch dimensions *in front of* the element axis (a batched trace's map)."""
        if inner.is_empty() or length == 0:
            return _EMPTY_MAP
        first = _first_tensor(inner)
        ref_ndim = first.dim() - batch_ndim if first is not None else -1
        if indices is not None:
            indices = tuple(int(i) for i in indices)
            if len(indices) != length:
                raise ValueError("stacked choice map: len(indices) != length")
        return ChoiceMap._raw(_STACKED, inner=inner, length=length, indices=indices,
                              ref_ndim=ref_ndim)

    @staticmethod
    def _from_mapping(mapping: Any) -> ChoiceMap:
        if mapping is None:
            return _EMPTY_MAP
        if isinstance(mapping, ChoiceMap):
            return mapping
        if type(mapping) is not dict and not isinstance(mapping, Mapping):
            raise TypeError(f"ChoiceMap expects a mapping of addresses to values, got {mapping!r}")
        result = _EMPTY_MAP
        for addr, val in mapping.items():
            path = normalize(addr)
            for k in path:
                if type(k) is not str and type(k) is not int:  # (the common keys: no call)
                    check_key(k)
            if isinstance(val, ChoiceMap):
                sub = val
            elif isinstance(val, torch.Tensor) or not isinstance(val, Mapping):
                sub = ChoiceMap._raw(_VALUE, value=to_tensor(val, path))  # (no ABC check)
            else:
                sub = ChoiceMap._from_mapping(val)
            if not sub.is_empty():
                for k in reversed(path):  # (the keys are checked: build the nodes directly)
                    sub = ChoiceMap._raw(_NODE, submaps={k: sub})
            result = sub if result is _EMPTY_MAP else result.merge(sub)
        return result

    # ------------------------------------------------------------------ immutability
    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ChoiceMap is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("ChoiceMap is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle/deepcopy support (an immutable map cannot be restored slot by slot):
        rebuilt by :func:`rebuild_choicemap` from :meth:`reduce_parts`."""
        return (rebuild_choicemap, self.reduce_parts())

    def reduce_parts(self) -> tuple[Any, ...]:
        """``(kind, value, mask, submaps, inner, length, indices, ref_ndim)``: the map's
        state as plain values, what :func:`rebuild_choicemap` takes (and what
        :mod:`gfcomb.persistence` stores)."""
        return (self._kind, self._value, self._mask, dict(self._submaps), self._inner,
                self._length, self._indices, self._ref_ndim)

    # ------------------------------------------------------------------ structure queries
    def is_empty(self) -> bool:
        """True if the map holds no value at all (structurally)."""
        return self._kind == _EMPTY

    def is_value(self) -> bool:
        """True if this map holds a value at the empty address."""
        return self._kind == _VALUE

    def is_stacked(self) -> bool:
        """True for a stacked (vectorized) map of vector elements."""
        return self._kind == _STACKED

    @property
    def mask(self) -> torch.Tensor | None:
        """For a value map: the presence mask (None = present everywhere)."""
        return self._mask

    def get_value(self) -> Any:
        """The value at the empty address (error if this map is not a value)."""
        if self._kind != _VALUE:
            raise AddressError("no value at the empty address {addr} of this choice map")
        return self._value

    @property
    def stacked_inner(self) -> ChoiceMap:
        """For a stacked map: the sub-map whose leaves carry the element axis."""
        if self._kind != _STACKED:
            raise TypeError("not a stacked choice map")
        return self._inner

    @property
    def stacked_length(self) -> int:
        """For a stacked map: the number of elements."""
        return self._length

    @property
    def stacked_indices(self) -> tuple[int, ...]:
        """For a stacked map: the element keys, in stack order."""
        return tuple(range(self._length)) if self._indices is None else self._indices

    @property
    def stacked_is_dense(self) -> bool:
        """For a stacked map built without ``indices``: its element keys are
        ``0..length-1`` in order (known without building the key tuple)."""
        return self._kind == _STACKED and self._indices is None

    def _element_axis(self) -> int:
        first = _first_tensor(self._inner)
        return 0 if first is None else first.dim() - self._ref_ndim

    def _restacked(self, inner: ChoiceMap) -> ChoiceMap:
        """A stacked map like this one (same elements) holding ``inner``, whose element axis
        is this map's: leaves that carry outer batch dimensions keep them in front."""
        return ChoiceMap.from_stacked_block(inner, self._length, self._indices,
                                 batch_ndim=self._element_axis())

    def _position(self, key: int) -> int | None:
        if self._indices is None:
            return key if 0 <= key < self._length else None
        if self._pos is None:
            object.__setattr__(self, "_pos", {k: j for j, k in enumerate(self._indices)})
        assert self._pos is not None
        return self._pos.get(key)

    def keys(self) -> Iterator[Any]:
        """The keys of the first level (element keys for a stacked map)."""
        if self._kind == _NODE:
            return iter(self._submaps.keys())
        return iter(self.stacked_indices if self._kind == _STACKED else ())

    def _child(self, key: Any) -> ChoiceMap:
        kind = self._kind
        if kind == _NODE:
            if isinstance(key, slice):  # ``:`` only reads stacked maps (slices are unhashable)
                return _EMPTY_MAP
            try:
                return self._submaps.get(key, _EMPTY_MAP)
            except TypeError:  # an unhashable key (a list): name it
                check_key(key)
                raise
        if kind == _STACKED:
            if isinstance(key, slice) and key == slice(None):
                return self._inner
            if isinstance(key, bool) or not isinstance(key, int):
                return _EMPTY_MAP
            j = self._position(key)
            if j is None:
                return _EMPTY_MAP
            axis = self._element_axis()
            # (an Unfold reads its constraints step by step this way)
            return _indexed(self._inner, (slice(None),) * axis + (j,))
        return _EMPTY_MAP

    def get_submap(self, addr: Any) -> ChoiceMap:
        """The sub-map at ``addr`` (the empty map if there is none)."""
        cm = self
        for key in normalize(addr):
            cm = cm._child(key)
            if cm._kind == _EMPTY:
                return cm
        return cm

    def has_value(self, addr: Any = ()) -> bool:
        """True if a value is present at ``addr`` (a masked-out value is absent)."""
        sub = self.get_submap(addr)
        if sub._kind != _VALUE:
            return False
        if sub._mask is None:
            return True
        return bool(sub._mask.all())

    def __contains__(self, addr: Any) -> bool:
        return self.has_value(addr)

    def __getitem__(self, addr: Any) -> Any:
        sub = self.get_submap(addr)
        if sub._kind != _VALUE:
            raise AddressError("no value at address {addr}", normalize(addr))
        if sub._mask is not None and slice(None) not in normalize(addr):
            if not bool(sub._mask.all()):
                raise AddressError("no value at address {addr} (masked out)", normalize(addr))
        return sub._value

    # ------------------------------------------------------------------ iteration
    def items(self, stacked: bool = False) -> Iterator[tuple[tuple[Any, ...], Any]]:
        """Yield ``(address tuple, value)`` for every value in the map.

        Stacked sub-maps are expanded element by element; with ``stacked=True`` they are
        yielded once per inner address, with ``slice(None)`` standing for the element key and
        the stacked tensor as the value.
        """
        yield from self._items((), stacked)

    def _items(self, prefix: tuple[Any, ...],
               stacked: bool) -> Iterator[tuple[tuple[Any, ...], Any]]:
        kind = self._kind
        if kind == _VALUE:
            if self._mask is None or stacked or bool(self._mask.all()):
                yield prefix, self._value
        elif kind == _NODE:
            for k, sub in self._submaps.items():
                yield from sub._items(prefix + (k,), stacked)
        elif kind == _STACKED:
            if stacked:
                yield from self._inner._items(prefix + (slice(None),), stacked)
            else:
                for k in self.stacked_indices:
                    yield from self._child(k)._items(prefix + (k,), stacked)

    def addresses(self) -> list[tuple[Any, ...]]:
        """All addresses holding a value (stacked maps expanded)."""
        return [a for a, _ in self.items()]

    def __iter__(self) -> Iterator[tuple[tuple[Any, ...], Any]]:
        return self.items()

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    def to_dict(self) -> Any:
        """Nested plain dicts (stacked maps expanded); a value map gives its value."""
        if self._kind == _VALUE:
            return self._value
        out = {}
        for k in self.keys():
            child = self._child(k)
            if child._kind == _VALUE and not child.has_value():
                continue  # masked out: absent, as in items()
            d = child.to_dict()
            if isinstance(d, dict) and not d:
                continue  # nothing present below
            out[k] = d
        return out

    # ------------------------------------------------------------------ building
    def prefixed(self, addr: Any) -> ChoiceMap:
        """This map placed under ``addr``."""
        cm = self
        for key in reversed(normalize(addr)):
            cm = ChoiceMap.node({key: cm})
        return cm

    def set(self, addr: Any, value: Any) -> ChoiceMap:
        """A copy with ``value`` at ``addr`` (replacing what was there)."""
        path = normalize(addr)
        if not path:
            return value if isinstance(value, ChoiceMap) else ChoiceMap.value(value)
        head, rest = path[0], path[1:]
        check_key(head)
        if self._kind == _STACKED:
            return self.unstacked().set(addr, value)
        subs = dict(self._submaps) if self._kind == _NODE else {}
        subs[head] = subs.get(head, _EMPTY_MAP).set(rest, value)
        return ChoiceMap.node(subs)

    def unstacked(self) -> ChoiceMap:
        """A stacked map rewritten as a node of per-element sub-maps (other kinds unchanged)."""
        if self._kind != _STACKED:
            return self
        return ChoiceMap.node({k: self._child(k) for k in self.stacked_indices})

    def merge(self, other: ChoiceMap) -> ChoiceMap:
        """The union of two maps; raises ChoiceMapMergeError if both hold a value somewhere."""
        return self._merge(other, ())

    def __or__(self, other: ChoiceMap) -> ChoiceMap:
        return self.merge(other)

    def _merge(self, other: ChoiceMap, prefix: tuple[Any, ...]) -> ChoiceMap:
        if other._kind == _EMPTY:
            return self
        if self._kind == _EMPTY:
            return other
        if self._kind == _VALUE or other._kind == _VALUE:
            if (self._kind == _VALUE and other._kind == _VALUE
                    and (self._mask is not None or other._mask is not None)):
                from gfcomb.core.masked import merge_values  # (masked.py builds on this module)

                return merge_values(self, other, prefix)
            raise ChoiceMapMergeError("merge: both choice maps hold a value at {addr}", prefix)
        if self._kind == _STACKED and other._kind == _STACKED and (
                self._length == other._length and self._indices == other._indices):
            return self._restacked(self._inner._merge(other._inner, prefix + (slice(None),)))
        a, b = self.unstacked(), other.unstacked()
        subs = dict(a._submaps)
        for k, sub in b._submaps.items():
            subs[k] = subs[k]._merge(sub, prefix + (k,)) if k in subs else sub
        return ChoiceMap.node(subs)

    def filter(self, selection: Selection) -> ChoiceMap:
        """The sub-map of values whose addresses are in ``selection``."""
        from gfcomb.core.selection import selection_flags_for_vector

        if selection.is_all_static():
            return self
        if selection.is_empty_static() or self._kind == _EMPTY:
            return _EMPTY_MAP
        kind = self._kind
        if kind == _VALUE:
            flag = selection.leaf_flag()
            if isinstance(flag, bool):
                return self if flag else _EMPTY_MAP
            mask = flag if self._mask is None else (self._mask & flag)
            return ChoiceMap.value(self._value, mask)
        if kind == _NODE:
            return ChoiceMap.node({k: sub.filter(selection.get_subselection(k))
                                   for k, sub in self._submaps.items()})
        narrowed = self._only_named_elements(selection)
        if narrowed is not self:
            return narrowed.filter(selection)
        inner_sel = selection_flags_for_vector(selection, self.stacked_indices, self._inner,
                                               axis=self._element_axis())
        return self._restacked(self._inner.filter(inner_sel))

    def _only_named_elements(self, selection: Selection) -> ChoiceMap:
        """A stacked map cut down to the elements ``selection`` names explicitly, when it
        selects nothing in the others (``select((7, "x"))`` keeps element 7 only, so that an
        update given the filtered map revisits one element, not all of them)."""
        from gfcomb.core.selection import element_selections, has_mask_flags

        if has_mask_flags(selection):  # per-element flags (also inside ~, |, &): all elements
            return self
        keys = self.stacked_indices
        default, special = element_selections(selection, keys)
        if not default.is_empty_static():
            return self
        rows = [j for j, k in enumerate(keys)
                if k in special and not special[k].is_empty_static()]
        if len(rows) == len(keys):
            return self
        if not rows:
            return _EMPTY_MAP
        axis = self._element_axis()
        first = _first_tensor(self._inner)
        index = torch.tensor(rows, dtype=torch.long,
                             device=None if first is None else first.device)
        inner = pytree.tree_map(
            lambda x: x.index_select(axis, index) if isinstance(x, torch.Tensor) else x,
            self._inner)
        return ChoiceMap.from_stacked_block(inner, len(rows), tuple(keys[j] for j in rows),
                                 batch_ndim=axis)

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        if self._kind == _EMPTY:
            return "ChoiceMap.empty()"
        lines = ["ChoiceMap("]
        for addr, val in self.items(stacked=True):
            shown = ", ".join(":" if k == slice(None) else repr(k) for k in addr)
            lines.append(f"  ({shown}): {short_repr(val)},")
        lines.append(")")
        return "\n".join(lines)

def rebuild_choicemap(kind: int, value: Any, mask: Any, submaps: dict[Any, ChoiceMap],
                      inner: Any, length: int, indices: tuple[int, ...] | None,
                      ref_ndim: int) -> ChoiceMap:
    """The map :meth:`ChoiceMap.reduce_parts` describes (the empty map is the shared one)."""
    if kind == _EMPTY:
        return _EMPTY_MAP
    if kind not in (_VALUE, _NODE, _STACKED):
        raise ValueError(f"rebuild_choicemap: unknown kind {kind!r}")
    for k in submaps:
        check_key(k)
    return ChoiceMap._raw(kind, value=value, mask=mask, submaps=dict(submaps), inner=inner,
                          length=int(length),
                          indices=None if indices is None else tuple(int(i) for i in indices),
                          ref_ndim=int(ref_ndim))


def _first_tensor(cm: ChoiceMap) -> torch.Tensor | None:
    """The first tensor leaf of ``cm`` in pytree order (a direct walk, no tree_leaves)."""
    kind = cm._kind
    if kind == _VALUE:
        for x in (cm._value, cm._mask):
            if isinstance(x, torch.Tensor):
                return x
        return None
    if kind == _NODE:
        for sub in cm._submaps.values():
            t = _first_tensor(sub)
            if t is not None:
                return t
        return None
    if kind == _STACKED:
        return _first_tensor(cm._inner) if isinstance(cm._inner, ChoiceMap) else None
    return None


_SLOT_SETTERS = tuple(ChoiceMap.__dict__[name].__set__ for name in (
    "_kind", "_value", "_mask", "_submaps", "_inner", "_length", "_indices", "_ref_ndim",
    "_pos"))
_EMPTY_MAP = ChoiceMap._raw(_EMPTY)


# ------------------------------------------------------------------------------- pytree
def _indexed(cm: ChoiceMap, index: tuple[Any, ...]) -> ChoiceMap:
    """``cm`` with every tensor (values and masks) indexed by ``index``, walked directly."""
    kind = cm._kind
    if kind == _VALUE:
        v, m = cm._value, cm._mask
        return ChoiceMap._raw(_VALUE, value=v[index] if isinstance(v, torch.Tensor) else v,
                              mask=None if m is None else m[index])
    if kind == _NODE:
        return ChoiceMap._raw(_NODE, submaps={k: _indexed(v, index)
                                              for k, v in cm._submaps.items()})
    if kind == _STACKED:
        return ChoiceMap._raw(_STACKED, inner=_indexed(cm._inner, index), length=cm._length,
                              indices=cm._indices, ref_ndim=cm._ref_ndim)
    return cm


def _cm_flatten(cm: ChoiceMap) -> tuple[list[Any], Any]:
    kind = cm._kind
    if kind == _EMPTY:
        return [], (kind,)
    if kind == _VALUE:
        if cm._mask is None:
            return [cm._value], (kind, False)
        return [cm._value, cm._mask], (kind, True)
    if kind == _NODE:
        keys = tuple(cm._submaps.keys())
        return [cm._submaps[k] for k in keys], (kind, keys)
    return [cm._inner], (kind, cm._length, cm._indices, cm._ref_ndim)


def _cm_unflatten(children: Any, ctx: Any) -> ChoiceMap:
    kind = ctx[0]
    children = list(children)
    if kind == _EMPTY:
        return _EMPTY_MAP
    if kind == _VALUE:
        return ChoiceMap._raw(_VALUE, value=children[0], mask=children[1] if ctx[1] else None)
    if kind == _NODE:
        return ChoiceMap._raw(_NODE, submaps=dict(zip(ctx[1], children)))
    return ChoiceMap._raw(_STACKED, inner=children[0], length=ctx[1], indices=ctx[2],
                          ref_ndim=ctx[3])


pytree.register_pytree_node(ChoiceMap, _cm_flatten, _cm_unflatten)
