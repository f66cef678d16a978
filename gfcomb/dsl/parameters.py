"""Finding the torch modules (and so the parameters) a @gen function uses.

Two ways, combined: modules referenced by the function's code (globals it names, closure
cells) are found statically, so ``parameters()`` works before the first run; modules
actually called while the body runs are recorded by a forward pre-hook, which also catches
modules reached through attributes or containers.  Modules are kept keyed by identity: two
modules of the same shape are two sets of parameters.

Thread safety: the @gen function whose body is running (the owner the hook reports to) is
context-local (a :class:`contextvars.ContextVar`), so a module called in one thread is noted
on that thread's function only; the global hook is installed while at least one body runs in
any thread (a count kept under a lock).  :func:`collect_once` is the context-local recursion
guard of ``GenFunction.parameters``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar, Token
from types import CodeType
from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: The @gen function whose body runs innermost in this context (None outside every body).
_OWNER: ContextVar[Any] = ContextVar("gfcomb_recording_owner", default=None)
_HOOK: list[Any] = []
#: How many outermost bodies run right now, over all threads; the hook is installed while > 0.
_ACTIVE = [0]
_ACTIVE_LOCK = threading.Lock()


def _forward_pre_hook(module: torch.nn.Module, inputs: Any) -> None:
    owner = _OWNER.get()
    if owner is not None:
        owner._note_module(module)


def _global_hook_table() -> dict[int, Any] | None:
    """torch's table of global forward pre-hooks, where
    ``register_module_forward_pre_hook`` puts them; None if this torch keeps it elsewhere
    (then the public function is used)."""
    table = getattr(torch.nn.modules.module, "_global_forward_pre_hooks", None)
    return table if isinstance(table, dict) else None


_HOOK_TABLE = _global_hook_table()
#: our entry's key in it: hook handles count up from 0, so a negative key never collides
_HOOK_KEY = -0x6766


class recording_modules:  # noqa: N801 - used like a function: ``with recording_modules(f):``
    """While the block runs, modules called are noted on ``owner`` (via ``_note_module``).

    The global forward pre-hook is installed when the outermost @gen body starts (in any
    thread) and removed when the last one ends, so modules called outside gfcomb never pay
    for it.  It is set in torch's
    hook table directly: registering and removing a hook handle on every GFI call of a @gen
    function costs several microseconds of a particle-filter step.  (A class rather than a
    ``@contextmanager`` generator for the same reason.)"""

    __slots__ = ("owner", "_token")

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self._token: Token[Any] | None = None

    def __enter__(self) -> None:
        outermost = _OWNER.get() is None
        self._token = _OWNER.set(self.owner)
        if outermost:  # the first body of this context: count it, install the hook
            with _ACTIVE_LOCK:
                _ACTIVE[0] += 1
                if _ACTIVE[0] == 1:
                    _install_hook()

    def __exit__(self, *exc: object) -> None:
        token = self._token
        if token is None:
            return
        self._token = None
        _OWNER.reset(token)
        if _OWNER.get() is None:  # the last body of this context has ended
            with _ACTIVE_LOCK:
                _ACTIVE[0] -= 1
                if _ACTIVE[0] == 0:
                    _remove_hook()


def _install_hook() -> None:
    if _HOOK_TABLE is not None:
        _HOOK_TABLE[_HOOK_KEY] = _forward_pre_hook
    elif not _HOOK:  # pragma: no cover - other torch versions
        _HOOK.append(torch.nn.modules.module.register_module_forward_pre_hook(
            _forward_pre_hook))


def _remove_hook() -> None:
    if _HOOK_TABLE is not None:
        _HOOK_TABLE.pop(_HOOK_KEY, None)
    elif _HOOK:  # pragma: no cover - other torch versions
        _HOOK.pop().remove()


#: ids of the objects whose parameters are being collected in this context (recursion guard).
_COLLECTING: ContextVar[frozenset[int]] = ContextVar("gfcomb_collecting_parameters",
                                                     default=frozenset())


def collect_once(obj: Any, collect: Callable[[], list[T]]) -> list[T]:
    """``collect()``, or ``[]`` when it is already running for ``obj`` in this context.

    The recursion guard of ``GenFunction.parameters`` (a function that reaches itself
    through its callees): context-local, so two threads asking for the parameters of the
    same function at the same time each get all of them.
    """
    seen = _COLLECTING.get()
    key = id(obj)
    if key in seen:
        return []
    token = _COLLECTING.set(seen | {key})
    try:
        return collect()
    finally:
        _COLLECTING.reset(token)


def _code_names(code: CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _code_names(const)
    return names


def referenced_objects(fn: Callable[..., Any]) -> list[Any]:
    """Globals named by ``fn``'s code and its closure cells' contents."""
    out: list[Any] = []
    code = getattr(fn, "__code__", None)
    if code is None:
        return out
    glb = getattr(fn, "__globals__", {})
    for name in sorted(_code_names(code)):
        if name in glb:
            out.append(glb[name])
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # empty cell
            pass
    return out


def unique_parameters(modules: list[torch.nn.Module], callees: list[Any],
                      seen_fns: set[int] | None = None) -> Iterator[torch.nn.Parameter]:
    """Parameters of ``modules`` and of callee generative functions, each once."""
    seen: set[int] = set()
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p
    for c in callees:
        for p in c.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p
