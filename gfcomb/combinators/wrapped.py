"""The machinery shared by the combinators that wrap ONE inner generative function and keep
its addresses as their own (:class:`~gfcomb.combinators.dimap.Dimap`,
:class:`~gfcomb.combinators.repeat.Repeat`, :class:`~gfcomb.combinators.scan.Scan`).

Such a combinator maps its arguments to the inner function's arguments, its argdiffs to the
inner argdiffs, and the inner return value (and retdiff) to its own; choices, constraints,
selections and scores pass through unchanged.  :class:`Wrapper` writes the GFI once in terms
of those four maps; a subclass defines them.  The trace (:class:`WrappedTrace`) holds the
inner trace and the wrapper's own arguments and return value.

Math: the wrapper adds no choices, so log p(t; x) = log p_inner(t; f(x)) and every weight is
the inner weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import torch

from gfcomb.combinators.edit import Constrain, Edit, Resample
from gfcomb.combinators.parts import Combinator
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.deferred import Deferred
from gfcomb.core.diff import Diff, NoChange, UnknownChange, all_unchanged
from gfcomb.core.gfi import (
    GenerativeFunction,
    as_choicemap,
    check_argdiffs,
    check_args_tuple,
    check_trace,
)
from gfcomb.core.pytree import register_record
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace

_NO_CHANGE = NoChange()
_UNKNOWN = UnknownChange()


@attrs.frozen
class FromInner:
    """A wrapper trace's return value left unbuilt: the wrapper's map of the inner return
    value, made when read (a Scan's: in a batch its ``ys`` may have to be gathered through
    the inner Unfold's shared history)."""


#: the one FromInner value
FROM_INNER = FromInner()


@attrs.frozen(repr=False)
class WrappedTrace(Trace):
    """The trace of a wrapper combinator: its own ``args`` and ``retval`` and the ``inner``
    trace, whose choices and score are the wrapper's.  ``retval`` may be given as
    :class:`FromInner` (then the wrapper's ``batch_retval(trace)`` makes it when read: a
    wrapper that does so does it for every trace it makes, so that all have one layout)."""

    gen_fn: Any
    args: tuple[Any, ...]
    _retval: Any
    score: torch.Tensor
    inner: Trace
    _layout: Any = attrs.field(default=None, eq=False, repr=False)
    _built: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def retval(self) -> Any:  # type: ignore[override]
        """The wrapper's return value (built from the inner one on first read when it was
        left unbuilt)."""
        if type(self._retval) is not FromInner:
            return self._retval
        if self._built is None:
            object.__setattr__(self, "_built", (self.gen_fn.batch_retval(self),))
        return self._built[0]

    def _after_unflatten(self) -> None:
        object.__setattr__(self, "_built", None)

    def caller_retval(self) -> Any:
        """The return value, deferred when it is built from an inner value that is."""
        if type(self._retval) is FromInner and type(self.inner.caller_retval()) is Deferred:
            return Deferred(lambda: self.retval)
        return self.retval

    @property
    def choices(self) -> ChoiceMap:
        return self.inner.choices

    def _retval_at(self, path: tuple[Any, ...]) -> Any:
        return self.inner.get_retval(path)

    def discrete_addresses(self) -> Iterator[tuple[Any, ...]]:
        """The inner trace's (the wrapper keeps its addresses)."""
        return self.inner.discrete_addresses()

    def compacted(self) -> WrappedTrace:
        """The inner trace compacted (see :meth:`Trace.compacted`)."""
        inner = self.inner.compacted()
        return self if inner is self.inner else attrs.evolve(self, inner=inner, layout=None)

    def with_layout_of(self, other: Trace) -> WrappedTrace:
        """The inner trace laid out like ``other``'s (see :meth:`Trace.with_layout_of`)."""
        if not isinstance(other, WrappedTrace):
            return self
        inner = self.inner.with_layout_of(other.inner)
        return self if inner is self.inner else attrs.evolve(self, inner=inner, layout=None)


register_record(WrappedTrace, dynamic=("args", "_retval", "score", "inner"),
                static=("gen_fn",))


class Wrapper(Combinator):
    """A generative function that runs ``self.inner_fn`` on mapped arguments (see the module
    docstring).  Subclasses set ``inner_fn`` and override :meth:`inner_args` (and, as
    needed, :meth:`inner_argdiffs`, :meth:`outer_retval`, :meth:`outer_retdiff`)."""

    inner_fn: GenerativeFunction

    def parts(self) -> tuple[Any, ...]:
        """The wrapper's class and the inner function (a subclass adds its options)."""
        return (type(self), self.inner_fn)

    # ------------------------------------------------------------------ the maps
    def inner_gen_fn(self, args: tuple[Any, ...]) -> GenerativeFunction:
        """The inner generative function for a call with ``args`` (``inner_fn``)."""
        return self.inner_fn

    def inner_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The inner function's arguments for the wrapper's ``args``."""
        return args

    def inner_argdiffs(self, args: tuple[Any, ...], inner_args: tuple[Any, ...],
                       argdiffs: tuple[Diff, ...]) -> tuple[Diff, ...]:
        """The inner argdiffs: all NoChange when nothing changed, else UnknownChange."""
        d = _NO_CHANGE if all_unchanged(argdiffs) else _UNKNOWN
        return (d,) * len(inner_args)

    def outer_retval(self, args: tuple[Any, ...], inner_retval: Any) -> Any:
        """The wrapper's return value from the inner one."""
        return inner_retval

    def outer_retdiff(self, argdiffs: tuple[Diff, ...], inner_retdiff: Diff) -> Diff:
        """The wrapper's retdiff from the inner one."""
        return inner_retdiff

    # ------------------------------------------------------------------ helpers
    def _check_trace(self, trace: Any) -> WrappedTrace:
        return check_trace(self, trace, WrappedTrace)

    def _wrap(self, args: tuple[Any, ...], inner: Trace) -> WrappedTrace:
        return WrappedTrace(self, args, self.outer_retval(args, inner.retval), inner.score,
                            inner)

    # ------------------------------------------------------------------ the GFI
    def simulate(self, args: tuple[Any, ...]) -> WrappedTrace:
        """Run the inner function on the mapped arguments.

        Math: t ~ p_inner(·; f(x)); score = log p_inner(t; f(x)).
        """
        args = check_args_tuple(args)
        return self._wrap(args, self.inner_gen_fn(args).simulate(self.inner_args(args)))

    def generate(self, args: tuple[Any, ...], constraints: ChoiceMap | None = None,
                 ) -> tuple[WrappedTrace, torch.Tensor]:
        """Generate the inner function with the same constraints.

        Math: weight = the inner generate weight (log density of the constrained choices with
        prior proposals); full constraints: weight == score.
        """
        args = check_args_tuple(args)
        inner, w = self.inner_gen_fn(args).generate(self.inner_args(args),
                                                    as_choicemap(constraints))
        return self._wrap(args, inner), w

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
        """Math: weight = log p_inner(t; f(x)); retval = the mapped inner return value."""
        args = check_args_tuple(args)
        w, r = self.inner_gen_fn(args).assess(self.inner_args(args), as_choicemap(choices))
        return w, self.outer_retval(args, r)

    def update(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
               constraints: ChoiceMap | None = None,
               ) -> tuple[WrappedTrace, torch.Tensor, Diff, ChoiceMap]:
        """Update the inner trace with the mapped arguments and argdiffs.

        Math: weight = the inner update weight = log p(t'; x') − log p(t; x) − log q(fresh);
        discard = the inner discard; retdiff mapped from the inner retdiff.
        """
        return self._edit(trace, args, argdiffs, Constrain(as_choicemap(constraints)))

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[WrappedTrace, torch.Tensor, Diff]:
        """Regenerate the inner trace's selected choices.

        Math: weight = the inner regenerate weight = Σ over retained, unselected choices of
        (log p' − log p).
        """
        new, w, rd, _ = self._edit(trace, args, argdiffs, Resample(selection))
        return new, w, rd

    def _edit(self, trace: Trace, args: tuple[Any, ...], argdiffs: Any, edit: Edit,
              ) -> tuple[WrappedTrace, torch.Tensor, Diff, ChoiceMap]:
        """The edit engine of update and regenerate: ``edit`` applied to the inner trace with
        the mapped arguments and argdiffs."""
        old = self._check_trace(trace)
        args = check_args_tuple(args)
        argdiffs = check_argdiffs(args, argdiffs, repr(self))
        if all_unchanged(argdiffs) and edit.is_empty():
            return old, torch.zeros_like(old.score), _NO_CHANGE, ChoiceMap.empty()
        in_args = self.inner_args(args)
        inner, w, rd, discard = edit.apply(self.inner_gen_fn(args), old.inner, in_args,
                                           self.inner_argdiffs(args, in_args, argdiffs))
        return self._wrap(args, inner), w, self.outer_retdiff(argdiffs, rd), discard

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Math: project(t, S) = the inner project(t, S)."""
        old = self._check_trace(trace)
        return self.inner_gen_fn(old.args).project(old.inner, selection)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The inner function's parameters."""
        return self.inner_fn.parameters()
