"""Dimap: deterministic, untraced transforms of a generative function's arguments and
return value (GenJAX's ``dimap``/``contramap``/``map``).

``Dimap(gen_fn, pre=None, post=None)(*args)`` runs ``gen_fn(*pre(*args))`` and returns
``post(args, retval)``.  ``pre`` returns the inner argument tuple; ``post`` gets the outer
arguments and the inner return value.  Both must be deterministic and, for the default
gradient methods, differentiable torch code; under ``torch.func.vmap`` they run batched like
any other code.  The choices are ``gen_fn``'s, at the same addresses.

Incremental: with ``pre=None`` the argdiffs pass through unchanged (so a wrapped Map or
Unfold keeps its own incremental update); with a ``pre``, unchanged arguments (all NoChange)
give NoChange inner argdiffs and anything else UnknownChange for every inner argument.  The
retdiff is the inner one with ``post=None``; with a ``post`` it is NoChange only when the
arguments and the inner return value did not change.

Math: log p(t; x) = log p_gen_fn(t; pre(x)); every weight is the inner weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gfcomb.combinators.parts import gen_fn_part
from gfcomb.combinators.wrapped import Wrapper
from gfcomb.core.diff import Diff, NoChange, UnknownChange, all_unchanged
from gfcomb.core.errors import ArgumentError
from gfcomb.core.gfi import GenerativeFunction


class Dimap(Wrapper):
    """``gen_fn`` with its arguments mapped by ``pre`` and its return value by ``post`` (see
    the module docstring)."""

    def __init__(self, gen_fn: GenerativeFunction,
                 pre: Callable[..., tuple[Any, ...]] | None = None,
                 post: Callable[[tuple[Any, ...], Any], Any] | None = None) -> None:
        gen_fn_part(gen_fn, "Dimap", "gen_fn")
        for name, f in (("pre", pre), ("post", post)):
            if f is not None and not callable(f):
                raise TypeError(f"Dimap: '{name}' must be callable or None, got {f!r}")
        self.inner_fn = gen_fn
        self.pre = pre
        self.post = post

    def parts(self) -> tuple[Any, ...]:
        """The inner function and the two maps."""
        return (Dimap, self.inner_fn, self.pre, self.post)

    def inner_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if self.pre is None:
            return args
        mapped = self.pre(*args)
        if not isinstance(mapped, tuple):
            raise ArgumentError(f"Dimap: 'pre' must return the tuple of the inner arguments, "
                                f"got {type(mapped).__name__} (write (x,) for one argument)")
        return mapped

    def inner_argdiffs(self, args: tuple[Any, ...], inner_args: tuple[Any, ...],
                       argdiffs: tuple[Diff, ...]) -> tuple[Diff, ...]:
        if self.pre is None:
            return argdiffs
        return super().inner_argdiffs(args, inner_args, argdiffs)

    def outer_retval(self, args: tuple[Any, ...], inner_retval: Any) -> Any:
        if self.post is None:
            return inner_retval
        return self.post(args, inner_retval)

    def outer_retdiff(self, argdiffs: tuple[Diff, ...], inner_retdiff: Diff) -> Diff:
        if self.post is None:
            return inner_retdiff
        if isinstance(inner_retdiff, NoChange) and all_unchanged(argdiffs):
            return inner_retdiff
        return UnknownChange()
