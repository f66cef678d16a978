"""Computing callee argdiffs inside ``update``/``regenerate`` of a @gen function.

When a @gen body runs again during ``update``, every traced call needs argdiffs for its
callee.  We know the diff of two kinds of *sources*: the function's own arguments (the
argdiffs we were given) and the return values of earlier callees (their retdiffs).  While
recording a trace we note, for each callee argument, which source object it *is* (identity);
during update, if the new argument is the same source again, it inherits that source's diff.

So ``Unfold(k)(T, init) @ "xs"`` in a body whose argument ``init`` has argdiff NoChange gets
argdiffs ``(UnknownChange, NoChange)``: extending the Unfold costs one step.  A tuple, list or
dict built in the body (``(x0, v0)``) is unchanged when each item is.  Plain Python values
(ints, floats, strings, None) are compared by value; anything else we cannot vouch for is
UnknownChange, which is always correct, only slower.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch._C import _functorch

from gfcomb.core.batching import is_batched
from gfcomb.core.diff import Diff, NoChange, UnknownChange

Source = tuple[Any, ...]  # ("arg", i), ("ret", address), ("same", Constant) or ("items", ...)

_PLAIN = (int, float, str, bool, type(None))
_PLAIN_TYPES = frozenset(_PLAIN)  # (exact types: a set lookup on the hot path)
_UNKNOWN = UnknownChange()  # diffs are frozen: one instance of each serves every call
_NO_CHANGE = NoChange()


_ARG_SOURCES: tuple[Source, ...] = tuple(("arg", i) for i in range(32))


def _arg_source(i: int) -> Source:
    """The source ``("arg", i)`` (one shared tuple for the common argument positions)."""
    return _ARG_SOURCES[i] if i < 32 else ("arg", i)


class SourceTracker:
    """Remembers which live objects are arguments or callee return values, and their diffs."""

    __slots__ = ("_by_id", "_diffs")

    def __init__(self, args: Sequence[Any], argdiffs: Sequence[Diff] | None) -> None:
        by_id: dict[int, tuple[Any, Source]] = {}
        for i, a in enumerate(args):
            if not isinstance(a, _PLAIN):
                by_id.setdefault(id(a), (a, _arg_source(i)))
        self._by_id = by_id
        # None while recording (simulate/generate: no diffs are asked for); else every
        # source's diff, unknown by default
        self._diffs: dict[Source, Diff] | None = (
            None if argdiffs is None else {_arg_source(i): d for i, d in enumerate(argdiffs)})

    def record(self, addr: tuple[Any, ...], args: Sequence[Any], retval: Any,
               retdiff: Diff | None) -> tuple[Source | None, ...]:
        """Note a traced call at ``addr``: returns the sources of its arguments (what each
        is, or None), then registers its return value (retdiff None while recording).

        A tensor argument that is neither an argument nor a return value (a constant of
        the body, a global parameter) is remembered as ``("same", Constant(tensor))``:
        passing the very same object again is NoChange (the value stored in the callee's
        trace is a copy after vmap); so is, in a batch, a small one holding the values the
        callee's rows share (a ``torch.zeros(2)`` made at every run).  (One method for both
        halves: it runs once per traced call.)
        """
        out = [self._source(a) for a in args]
        if type(retval) is torch.Tensor or not isinstance(retval, _PLAIN):
            src: Source = ("ret", addr)
            self._by_id[id(retval)] = (retval, src)
            if self._diffs is not None:
                self._diffs[src] = retdiff if retdiff is not None else _UNKNOWN
        return tuple(out)

    def _source_of_new(self, a: Any) -> Source | None:
        """The source of an argument that is not itself an argument or a return value: a
        constant tensor (``("same", Constant(tensor))``), or a tuple, list or dict built in the body
        (``("items", sources of its items)``: a state ``(x, v)`` of two choices, which is
        unchanged when both are)."""
        t = type(a)
        if t is tuple or t is list:
            return ("items", tuple(self._source(x) for x in a))
        if t is dict:
            return ("items", tuple(self._source(x) for x in a.values()))
        if (isinstance(a, torch.Tensor) and not a.requires_grad
                and (not _functorch.is_functorch_wrapped_tensor(a) or not is_batched(a))):
            return ("same", Constant(a))
        return None

    def _source(self, a: Any) -> Source | None:
        """What the value ``a`` passed to a callee is: an argument or a return value it is
        the very object of, else :meth:`_source_of_new` (a plain value is never a source)."""
        if type(a) in _PLAIN_TYPES:
            return None
        hit = self._by_id.get(id(a))
        return hit[1] if hit is not None and hit[0] is a else self._source_of_new(a)

    def source_of(self, value: Any) -> Source | None:
        """The source ``value`` is, or None."""
        hit = self._by_id.get(id(value))
        return hit[1] if hit is not None and hit[0] is value else None

    def callee_argdiffs(self, new_args: Sequence[Any], old_args: Sequence[Any],
                        old_sources: Sequence[Source | None] | None) -> tuple[Diff, ...]:
        """The argdiffs of a callee called with ``new_args`` now and ``old_args`` before."""
        if len(new_args) != len(old_args):
            return (_UNKNOWN,) * len(new_args)
        return tuple(self._diff(new, old, old_sources[j] if old_sources is not None else None)
                     for j, (new, old) in enumerate(zip(new_args, old_args)))

    def _diff(self, new: Any, old: Any, old_src: Source | None) -> Diff:
        """The diff of one value, ``old`` before (recorded as source ``old_src``)."""
        if new is old:
            return _NO_CHANGE
        if isinstance(new, _PLAIN) and isinstance(old, _PLAIN):
            return _NO_CHANGE if type(new) is type(old) and new == old else _UNKNOWN
        if old_src is not None:
            kind = old_src[0]
            if kind == "same" and old_src[1].tensor is new:
                return _NO_CHANGE
            if kind == "items":
                return self._items_diff(new, old, old_src[1])
        src = self.source_of(new)
        if src is not None and old_src == src and self._diffs is not None:
            diff = self._diffs.get(src, _UNKNOWN)
            if not isinstance(diff, UnknownChange):
                return diff
        # (a small tensor made anew -- a torch.zeros(2) of the body run over a batch --
        # holding the values the callee's batch shares)
        return _NO_CHANGE if _same_values(old, new) else _UNKNOWN

    def _items_diff(self, new: Any, old: Any, sources: tuple[Source | None, ...]) -> Diff:
        """A tuple, list or dict is unchanged when each of its items is (Unknown else: no
        callee reads finer diffs of a container)."""
        t = type(new)
        if t is not type(old) or len(new) != len(old) or len(old) != len(sources):
            return _UNKNOWN
        if t is dict:
            if list(new) != list(old):
                return _UNKNOWN
            pairs = zip(new.values(), old.values(), sources)
        else:
            pairs = zip(new, old, sources)
        for n, o, src in pairs:
            if not isinstance(self._diff(n, o, src), NoChange):
                return _UNKNOWN
        return _NO_CHANGE

    def diff_of_value(self, value: Any, old_value: Any, old_source: Source | None) -> Diff:
        """The diff of a return value (same rules as a callee argument)."""
        return self.callee_argdiffs((value,), (old_value,), (old_source,))[0]


#: the largest constant tensor compared by value (a larger one is UnknownChange when new)
_COMPARED_NUMEL = 4096


class Constant:
    """A tensor a body passed to a callee that is neither an argument nor a return value.
    Passing the very same object again is NoChange.  Two compare equal when they hold the
    same values, so that the bookkeeping of two runs of a body that made their constants
    anew compares equal (an MCMC accept step merging two traces keeps it); which one is
    kept does not matter, as a diff is read from the object's identity only (or else from
    the values of the callee's own old argument)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __eq__(self, other: object) -> bool:
        return type(other) is Constant and (other.tensor is self.tensor
                                            or _equal_small(self.tensor, other.tensor))

    def __hash__(self) -> int:
        return hash((tuple(self.tensor.shape), self.tensor.dtype))

    def __repr__(self) -> str:
        return f"Constant({tuple(self.tensor.shape)})"


def _same_values(old: Any, new: Any) -> bool:
    """Whether ``new``, a small tensor passed now, holds the values of ``old``, the argument
    a batch of callee traces holds, shared by every row (leading axes of stride 0: a
    constant the body made once for the whole batch)."""
    if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor):
        return False
    lead = old.dim() - new.dim()
    if lead < 1 or old.shape[lead:] != new.shape or any(old.stride(i) != 0
                                                        for i in range(lead)):
        return False  # (a single trace's own tensor: compared by identity only)
    return _equal_small(old[(0,) * lead], new)


def _equal_small(a: torch.Tensor, b: Any) -> bool:
    """Two small tensors of one shape, both unbatched and needing no gradient, holding
    equal values (one host read; under a tracer, which cannot read values, no)."""
    if (type(b) is not torch.Tensor or b.requires_grad or b.numel() > _COMPARED_NUMEL
            or b.shape != a.shape or b.dtype != a.dtype or b.device != a.device
            or (_functorch.is_functorch_wrapped_tensor(a) and is_batched(a))
            or (_functorch.is_functorch_wrapped_tensor(b) and is_batched(b))):
        return False
    try:
        return bool(torch.equal(a, b))
    except RuntimeError:  # (a tracer: make_fx, torch.compile)
        return False
