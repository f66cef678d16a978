"""The tracing runtime: which interpreter (handler) receives ``gen_fn(*args) @ addr`` now.

The stack is *context-local* (a :class:`contextvars.ContextVar` holding the innermost
handler; entering a body sets it, leaving resets it to the one before), so two threads (or
two asyncio tasks) running @gen functions at the same time each see only their own
handlers.  Reading it costs one ``ContextVar.get`` per traced call (about the cost of the
module-level list it replaces); entering and leaving a body, a ``set`` and a ``reset``.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Protocol

from gfcomb.core.address import normalize
from gfcomb.core.errors import OutsideGenBodyError

if TYPE_CHECKING:
    from gfcomb.core.gfi import GenerativeFunction


class Handler(Protocol):
    """What the runtime hands traced calls to (the @gen language's interpreters)."""

    def visit(self, addr: tuple[Any, ...], gen_fn: GenerativeFunction,
              args: tuple[Any, ...]) -> Any:
        """Trace one call of ``gen_fn(*args)`` at ``addr``; return its return value."""

    def splice(self, gen_fn: Any, args: tuple[Any, ...]) -> Any:
        """Run a @gen callee's body with this handler."""

#: The innermost active handler of this context (None outside every @gen body).
_CURRENT: ContextVar[Handler | None] = ContextVar("gfcomb_current_handler", default=None)
_get_current = _CURRENT.get


class running:  # noqa: N801 - used like a function: ``with running(handler):``
    """Make ``handler`` receive the traced calls of the body run inside the block.

    (A class rather than a ``@contextmanager`` generator: entered on every GFI call of a
    @gen function, where the generator machinery costs a few microseconds.)  An instance is
    entered once.
    """

    __slots__ = ("handler", "_token")

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self._token: Token[Handler | None] | None = None

    def __enter__(self) -> Handler:
        self._token = _CURRENT.set(self.handler)
        return self.handler

    def __exit__(self, *exc: object) -> None:
        token = self._token
        if token is not None:
            self._token = None
            _CURRENT.reset(token)


def current_handler() -> Handler:
    """The innermost active handler of this thread/context (error outside a @gen body)."""
    handler = _get_current()
    if handler is None:
        raise OutsideGenBodyError(
            "`gen_fn(args) @ addr` can only be used inside the body of a @gen function "
            "while one of its GFI methods runs; outside, call gen_fn.simulate(args) etc."
        )
    return handler


def trace_call(gen_fn: GenerativeFunction, args: tuple[Any, ...], addr: Any) -> Any:
    """Hand a traced call to the active handler; returns the callee's return value."""
    handler = _get_current()
    if handler is None:
        handler = current_handler()  # (raises)
    t = type(addr)
    return handler.visit(addr if t is tuple else (addr,) if t is str else normalize(addr),
                         gen_fn, args)
