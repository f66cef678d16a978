"""Machinery shared by the vector combinators (Map, Unfold): running a kernel over many
elements in one batched call, lengths of mapped arguments, constraints and selections per
element, which elements an update must revisit, and the vector trace record.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs
import torch
from torch.utils import _pytree as pytree

from gfcomb.core.batching import is_batched
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, VectorDiff
from gfcomb.core.errors import (
    ArgumentError,
    MissingChoiceError,
    UnvisitedConstraintError,
)
from gfcomb.core.pytree import register_record, tree_index, tree_tensors
from gfcomb.core.trace import Trace

InDims = tuple[Any, ...]

def normalize_in_dims(in_dims: Any, nargs: int, who: str) -> InDims:
    """``in_dims`` as a tuple with one entry per argument."""
    if isinstance(in_dims, int) or in_dims is None:
        return (in_dims,) * nargs
    in_dims = tuple(in_dims)
    if len(in_dims) != nargs:
        raise ArgumentError(f"{who}: in_dims has {len(in_dims)} entries for {nargs} arguments")
    return in_dims


def mapped_length(args: Sequence[Any], in_dims: InDims, who: str) -> int:
    """The common length of the mapped arguments (ArgumentError naming the odd one out)."""
    n: int | None = None
    first = -1
    for i, (a, d) in enumerate(zip(args, in_dims)):
        if d is None:
            continue
        leaves = [a] if isinstance(a, torch.Tensor) else tree_tensors(a)
        if not leaves:
            raise ArgumentError(f"{who}: argument {i} is mapped (in_dims={d}) but holds no tensor")
        for x in leaves:
            if x.dim() <= d:
                raise ArgumentError(f"{who}: argument {i} has no dimension {d} to map over "
                                    f"(shape {tuple(x.shape)})")
            m = x.shape[d]
            if n is None:
                n, first = m, i
            elif m != n:
                raise ArgumentError(f"{who}: mapped arguments have unequal lengths: argument "
                                    f"{first} has {n} elements, argument {i} has {m}")
    if n is None:
        raise ArgumentError(f"{who}: no argument is mapped (all in_dims are None)")
    return n


def select_elements(args: Sequence[Any], in_dims: InDims, idx: torch.Tensor) -> tuple[Any, ...]:
    """The mapped arguments restricted to elements ``idx`` (shared ones unchanged)."""
    out = []
    for a, d in zip(args, in_dims):
        if d is None:
            out.append(a)
        else:
            out.append(pytree.tree_map(
                lambda x, d=d: x.index_select(d, idx.to(x.device))
                if isinstance(x, torch.Tensor) else x, a))
    return tuple(out)


def index_tensor(keys: Iterable[int], like: Any = None) -> torch.Tensor:
    """A long tensor of element indices (on the device of ``like`` if given)."""
    device = like.device if isinstance(like, torch.Tensor) else None
    if isinstance(keys, range):
        return torch.arange(keys.start, keys.stop, keys.step, dtype=torch.long, device=device)
    return torch.tensor(sorted(keys), dtype=torch.long, device=device)


# ------------------------------------------------------------------ constraints per element
def constrained_elements(cm: ChoiceMap, length: int, who: str) -> Sequence[int]:
    """The element keys ``cm`` constrains, sorted; errors for keys that are not element
    indices.  A dense stacked map costs O(1) Python work (``range`` returned)."""
    if cm.is_empty():
        return []
    if cm.is_value():
        raise UnvisitedConstraintError(
            f"{who}: constraint at address {{addr}} is never visited (a vector combinator has "
            "choices only under integer element keys)", ())
    if cm.is_stacked():
        if cm.stacked_is_dense:
            if cm.stacked_length <= length:
                return range(cm.stacked_length)
            _unvisited_element(cm, length, length, who)
        idx = cm.stacked_indices
        if min(idx) >= 0 and max(idx) < length:
            return sorted(idx)
    keys = list(cm.keys())
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < length:
            _unvisited_element(cm, k, length, who)
    return sorted(keys)


def _unvisited_element(cm: ChoiceMap, k: Any, length: int, who: str) -> None:
    """Raise the UnvisitedConstraintError for element key ``k`` (naming its first address)."""
    first = next(iter(cm.get_submap(k).items(stacked=True)), ((), None))[0]
    raise UnvisitedConstraintError(
        f"{who}: constraint at address {{addr}} is never visited (elements are keyed "
        f"0..{length - 1})", (k,) + tuple(":" if isinstance(x, slice) else x for x in first))


def _is_identity(keys: Sequence[int], n: int) -> bool:
    """True if ``keys`` is 0..n-1 in order (O(1) for a ``range``)."""
    if isinstance(keys, range):
        return keys == range(n)
    return len(keys) == n and tuple(keys) == tuple(range(n))


def stack_constraints(cm: ChoiceMap, keys: Sequence[int]) -> ChoiceMap:
    """The constraints of elements ``keys`` as one stacked map (leading axis = ``keys``).

    Addresses constrained for some elements but not others get a presence mask.  Python
    work is per constrained element (none for a stacked map holding exactly ``keys``).
    """
    n = len(keys)
    if cm.is_stacked():
        if cm.stacked_is_dense and _is_identity(keys, cm.stacked_length):
            return drop_absent(cm.stacked_inner)
        src = cm.stacked_indices
        if tuple(src) == tuple(keys):
            return drop_absent(cm.stacked_inner)
        pos = {k: j for j, k in enumerate(src)}
        found = [pos.get(k, -1) for k in keys]
        present = torch.tensor([r >= 0 for r in found])
        gather = torch.tensor([max(r, 0) for r in found], dtype=torch.long)
        return _gather_with_mask(cm.stacked_inner, gather, present)
    if _is_identity(keys, n):
        where = {k: k for k in cm.keys() if isinstance(k, int) and 0 <= k < n}
    else:
        pos = {k: j for j, k in enumerate(keys)}
        where = {k: pos[k] for k in cm.keys() if k in pos}
    per_path: dict[tuple[Any, ...], dict[int, Any]] = {}
    masks: dict[tuple[Any, ...], dict[int, Any]] = {}
    for k, j in where.items():
        # masked values (an element of an outer Map's batch) keep their mask: reading it with
        # items() would need bool(mask) (data-dependent under vmap)
        for path, value, vmask in _values_with_masks(cm.get_submap(k), ()):
            per_path.setdefault(path, {})[j] = value
            if vmask is not None:
                masks.setdefault(path, {})[j] = vmask
    result = ChoiceMap.empty()
    for path, vals in per_path.items():
        ref = next(iter(vals.values()))
        ref = ref if isinstance(ref, torch.Tensor) else torch.as_tensor(ref)
        rows = torch.tensor(list(vals), dtype=torch.long, device=ref.device)
        given = torch.stack([torch.as_tensor(v, device=ref.device).to(ref.dtype)
                             for v in vals.values()])
        stacked = given.new_zeros((n,) + ref.shape).index_copy(0, rows, given)
        mask = None
        if path in masks:
            m0 = next(iter(masks[path].values()))
            present = torch.stack([masks[path].get(j, torch.ones_like(m0)) for j in vals])
            mask = present.new_zeros((n,) + m0.shape).index_copy(0, rows, present)
        elif len(vals) < n:
            mask = torch.zeros(n, dtype=torch.bool, device=ref.device).index_fill(0, rows, True)
        result = result.merge(ChoiceMap.value(stacked, mask).prefixed(path))
    return result


def drop_absent(cm: ChoiceMap) -> ChoiceMap:
    """``cm`` without the values whose presence mask is all False (e.g. the other Switch
    branch's choices in a row of a batched trace): absent, so a kernel that never visits
    their address must not see them.  Masks with a vmap batch dimension cannot be read: kept."""
    if cm.is_stacked():
        return cm
    if cm.is_value():
        m = cm.mask
        absent = m is not None and not is_batched(m) and not bool(m.any())
        return ChoiceMap.empty() if absent else cm
    subs = {k: cm.get_submap(k) for k in cm.keys()}
    kept = {k: drop_absent(v) for k, v in subs.items()}
    if all(kept[k] is subs[k] for k in subs):
        return cm
    return ChoiceMap.node(kept)


def _values_with_masks(cm: ChoiceMap, prefix: tuple[Any, ...]
                       ) -> Iterable[tuple[tuple[Any, ...], Any, Any]]:
    """``(address, value, mask or None)`` for every value of ``cm`` (stacked maps expanded),
    masked values included."""
    if cm.is_value():
        yield prefix, cm.get_value(), cm.mask
        return
    for k in cm.keys():
        yield from _values_with_masks(cm.get_submap(k), prefix + (k,))


def _gather_with_mask(inner: ChoiceMap, rows: torch.Tensor, present: torch.Tensor) -> ChoiceMap:
    leaves, spec = pytree.tree_flatten(inner)
    out = [x.index_select(0, rows.to(x.device)) if isinstance(x, torch.Tensor) else x
           for x in leaves]
    gathered = pytree.tree_unflatten(out, spec)
    return _and_masks(gathered, present)


def _and_masks(cm: ChoiceMap, present: torch.Tensor) -> ChoiceMap:
    if cm.is_value():
        m = present.to(cm.get_value().device)
        return ChoiceMap.value(cm.get_value(), m if cm.mask is None else (cm.mask & m))
    if cm.is_stacked():
        return ChoiceMap.from_stacked_block(_and_masks(cm.stacked_inner, present.unsqueeze(-1)),
                                 cm.stacked_length, cm.stacked_indices)
    return ChoiceMap.node({k: _and_masks(cm.get_submap(k), present) for k in cm.keys()})


def has_masks(cm: ChoiceMap) -> bool:
    """True if some value of ``cm`` carries a presence mask (constrained for some elements
    only, or present only on some elements' Switch branch)."""
    if cm.is_value():
        return cm.mask is not None
    if cm.is_stacked():
        return has_masks(cm.stacked_inner)
    return any(has_masks(cm.get_submap(k)) for k in cm.keys())


def require_given(made: ChoiceMap, given: ChoiceMap, keys: Sequence[int],
                  who: str) -> torch.Tensor | None:
    """assess with per-element (masked) choices: every choice that the batched kernel trace's
    choices ``made`` hold (where present) must be present in ``given`` (both with a leading
    element axis, elements ``keys``).  Outside vmap: MissingChoiceError naming the first
    missing element and address.  With batched masks (under an outer vmap) the check cannot
    raise per element: returns a per-element bool tensor "some choice missing" (else None)."""
    missing: list[tuple[tuple[Any, ...], torch.Tensor]] = []
    _collect_missing(made, given, (), missing)
    flag = None
    for path, miss in missing:
        per = miss.reshape(miss.shape[0], -1).any(-1) if miss.dim() > 1 else miss
        if _is_batched(per):
            flag = per if flag is None else flag | per
        elif bool(per.any()):
            raise MissingChoiceError(f"{who}: no choice given at address {{addr}}",
                                     (keys[int(per.nonzero()[0, 0])],) + path)
    return flag


def _is_batched(x: torch.Tensor) -> bool:
    from gfcomb.core.batching import is_batched

    return is_batched(x)


def _collect_missing(made: ChoiceMap, given: ChoiceMap, path: tuple[Any, ...],
                     out: list[tuple[tuple[Any, ...], torch.Tensor]]) -> None:
    if made.is_empty():
        return
    if made.is_value():
        v = made.get_value()
        present = made.mask
        g = given.mask if given.is_value() else torch.zeros((), dtype=torch.bool,
                                                             device=v.device)
        if g is None:
            return
        if present is None:
            miss = ~g
            lead = v.shape[:g.dim()] if g.dim() else v.shape[:1]
            miss = miss.expand(lead) if miss.shape != lead else miss
        else:
            miss = present & ~g
        out.append((path, miss))
        return
    if made.is_stacked():
        if given.is_stacked() and given.stacked_indices == made.stacked_indices:
            _collect_missing(made.stacked_inner, given.stacked_inner, path, out)
            return
        made = made.unstacked()
    for k in made.keys():
        _collect_missing(made.get_submap(k), given.get_submap(k), path + (k,), out)


# ------------------------------------------------------------------ what an update revisits
def changed_elements(argdiffs: Sequence[Diff], in_dims: InDims,
                     old_length: int) -> tuple[bool, set[int]]:
    """From the argdiffs: (every element changed?, the set of changed element indices).

    When every element changed the set is left empty (not built: O(1) work at any length)."""
    updated: set[int] = set()
    for diff, d in zip(argdiffs, in_dims):
        if isinstance(diff, NoChange):
            continue
        if d is not None and isinstance(diff, VectorDiff):
            updated |= {i for i in diff.updated if i < old_length}
            continue
        return True, set()
    return False, updated


def concat_elements(a: Any, b: Any) -> Any:
    """Two stacked trees (e.g. batched kernel traces) of the same structure, concatenated
    leafwise along the element axis: ``a``'s elements, then ``b``'s (non-tensor leaves from
    ``a``)."""
    from gfcomb.core.pytree import tree_map2_tensors

    return tree_map2_tensors(lambda x, y: torch.cat([x, y.to(x.dtype)], 0), a, b)


# ------------------------------------------------------------------ the vector trace record
@attrs.frozen(repr=False)
class VectorTrace(Trace):
    """The trace of a vector combinator: the kernel traces of all elements as ONE batched
    kernel trace (struct of arrays, element axis first); element ``i`` lives at key ``i``."""

    gen_fn: Any
    args: tuple[Any, ...]
    retval: Any
    score: torch.Tensor
    inner: Trace
    length: int
    _layout: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def choices(self) -> ChoiceMap:
        if self.length == 0:
            return ChoiceMap.empty()
        batch_ndim = self.inner.score.dim() - 1
        return ChoiceMap.from_stacked_block(self.inner.choices, self.length, batch_ndim=batch_ndim)

    def discrete_addresses(self) -> Iterator[tuple[Any, ...]]:
        """The kernel's discrete addresses, under every element."""
        for pattern in self.inner.discrete_addresses():
            yield (slice(None),) + pattern

    @property
    def element_scores(self) -> torch.Tensor:
        """The kernel score of each element (a tensor with the element axis last-but-batch)."""
        return self.inner.score

    def _retval_at(self, path: tuple[Any, ...]) -> Any:
        """``get_retval((i, ...))``: element ``i``'s return value (or a call inside it)."""
        from gfcomb.core.errors import AddressError

        k = path[0]
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.length:
            raise AddressError(f"no element at address {{addr}} (elements are keyed "
                               f"0..{self.length - 1})", path)
        axis = self.score.dim()  # (batch axes of a batched trace come first)
        if len(path) == 1:
            return tree_index(self.inner.retval, k, axis)
        try:
            return tree_index(self.inner, k, axis).get_retval(path[1:])
        except AddressError as err:
            raise err.prefixed((k,)) from None


register_record(VectorTrace, dynamic=("args", "retval", "score", "inner"),
                static=("gen_fn", "length"))
