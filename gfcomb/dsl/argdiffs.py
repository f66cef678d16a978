"""Computing callee argdiffs inside ``update``/``regenerate`` of a @gen function.

When a @gen body runs again during ``update``, every traced call needs argdiffs for its
callee.  We know the diff of two kinds of *sources*: the function's own arguments (the
argdiffs we were given) and the return values of earlier callees (their retdiffs).  While
recording a trace we note, for each callee argument, which source object it *is* (identity);
during update, if the new argument is the same source again, it inherits that source's diff.

So ``Unfold(k)(T, init) @ "xs"`` in a body whose argument ``init`` has argdiff NoChange gets
argdiffs ``(UnknownChange, NoChange)``: extending the Unfold costs one step.  Plain Python
values (ints, floats, strings, None) are compared by value; anything else we cannot vouch for
is UnknownChange, which is always correct, only slower.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch._C import _functorch

from gfcomb.core.batching import is_batched
from gfcomb.core.diff import Diff, NoChange, UnknownChange

Source = tuple[Any, ...]  # ("arg", i), ("ret", address) or ("same", object)

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
        the body, a global parameter) is remembered as ``("same", tensor)``: passing the
        very same object again is NoChange (the value stored in the callee's trace is a
        copy after vmap).  (One method for both halves: it runs once per traced call.)
        """
        by_id = self._by_id
        out: list[Source | None] = []
        for a in args:
            if type(a) in _PLAIN_TYPES:  # (a plain value is never a source)
                out.append(None)
                continue
            hit = by_id.get(id(a))
            if hit is not None and hit[0] is a:
                out.append(hit[1])
            elif (isinstance(a, torch.Tensor) and not a.requires_grad
                  and (not _functorch.is_functorch_wrapped_tensor(a) or not is_batched(a))):
                out.append(("same", a))
            else:
                out.append(None)
        if type(retval) is torch.Tensor or not isinstance(retval, _PLAIN):
            src: Source = ("ret", addr)
            by_id[id(retval)] = (retval, src)
            if self._diffs is not None:
                self._diffs[src] = retdiff if retdiff is not None else _UNKNOWN
        return tuple(out)

    def source_of(self, value: Any) -> Source | None:
        """The source ``value`` is, or None."""
        hit = self._by_id.get(id(value))
        return hit[1] if hit is not None and hit[0] is value else None

    def callee_argdiffs(self, new_args: Sequence[Any], old_args: Sequence[Any],
                        old_sources: Sequence[Source | None] | None) -> tuple[Diff, ...]:
        """The argdiffs of a callee called with ``new_args`` now and ``old_args`` before."""
        if len(new_args) != len(old_args):
            return (_UNKNOWN,) * len(new_args)
        diffs: list[Diff] = []
        for j, (new, old) in enumerate(zip(new_args, old_args)):
            if new is old:
                diffs.append(_NO_CHANGE)
                continue
            if isinstance(new, _PLAIN) and isinstance(old, _PLAIN):
                diffs.append(_NO_CHANGE if type(new) is type(old) and new == old
                             else _UNKNOWN)
                continue
            old_src = old_sources[j] if old_sources is not None else None
            if old_src is not None and old_src[0] == "same":
                diffs.append(_NO_CHANGE if old_src[1] is new else _UNKNOWN)
                continue
            src = self.source_of(new)
            if src is not None and old_src == src and self._diffs is not None:
                diffs.append(self._diffs.get(src, _UNKNOWN))
            else:
                diffs.append(_UNKNOWN)
        return tuple(diffs)

    def diff_of_value(self, value: Any, old_value: Any, old_source: Source | None) -> Diff:
        """The diff of a return value (same rules as a callee argument)."""
        return self.callee_argdiffs((value,), (old_value,), (old_source,))[0]
