"""The handler stack: which interpreter receives ``gen_fn(*args) @ addr`` right now."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gfcomb.core.address import normalize

if TYPE_CHECKING:
    from gfcomb.core.gfi import GenerativeFunction
    from gfcomb.dsl.handlers import Handler

_STACK: list[Handler] = []


class running:  # noqa: N801 - used like a function: ``with running(handler):``
    """Make ``handler`` receive the traced calls of the body run inside the block.

    (A class rather than a ``@contextmanager`` generator: entered on every GFI call of a
    @gen function, where the generator machinery costs a few microseconds.)"""

    __slots__ = ("handler",)

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def __enter__(self) -> Handler:
        _STACK.append(self.handler)
        return self.handler

    def __exit__(self, *exc: object) -> None:
        _STACK.pop()


def current_handler() -> Handler:
    """The innermost active handler (error outside a @gen body)."""
    if not _STACK:
        raise RuntimeError(
            "`gen_fn(args) @ addr` can only be used inside the body of a @gen function "
            "while one of its GFI methods runs; outside, call gen_fn.simulate(args) etc."
        )
    return _STACK[-1]


def trace_call(gen_fn: GenerativeFunction, args: tuple[Any, ...], addr: Any) -> Any:
    """Hand a traced call to the active handler; returns the callee's return value."""
    handler = _STACK[-1] if _STACK else current_handler()  # (no extra call when inside)
    return handler.visit(addr if type(addr) is tuple else normalize(addr), gen_fn, args)


def splice(invocation: Any) -> Any:
    """Run a ``@gen`` callee with its choices placed in the caller's own namespace.

    ``gf.splice(sub(x))`` is Gen.jl's ``{*} ~ sub(x)``: the callee's addresses are not
    prefixed.  Only ``@gen`` functions can be spliced.
    """
    from gfcomb.core.gfi import Invocation
    from gfcomb.dsl.gen_function import GenFunction

    if not isinstance(invocation, Invocation) or not isinstance(invocation.gen_fn, GenFunction):
        raise TypeError("gf.splice takes a call of a @gen function, e.g. gf.splice(sub(x))")
    return current_handler().splice(invocation.gen_fn, invocation.args)
