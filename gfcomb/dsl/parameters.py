"""Finding the torch modules (and so the parameters) a @gen function uses.

Two ways, combined: modules referenced by the function's code (globals it names, closure
cells) are found statically, so ``parameters()`` works before the first run; modules
actually called while the body runs are recorded by a forward pre-hook, which also catches
modules reached through attributes or containers.  Modules are kept keyed by identity: two
modules of the same shape are two sets of parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import CodeType
from typing import Any

import torch

_OWNERS: list[Any] = []
_HOOK: list[Any] = []


def _forward_pre_hook(module: torch.nn.Module, inputs: Any) -> None:
    if _OWNERS:
        _OWNERS[-1]._note_module(module)


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

    The global forward pre-hook is installed when the outermost @gen body starts and removed
    when it ends, so modules called outside gfcomb never pay for it.  It is set in torch's
    hook table directly: registering and removing a hook handle on every GFI call of a @gen
    function costs several microseconds of a particle-filter step.  (A class rather than a
    ``@contextmanager`` generator for the same reason.)"""

    __slots__ = ("owner",)

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def __enter__(self) -> None:
        _OWNERS.append(self.owner)
        if len(_OWNERS) == 1:
            if _HOOK_TABLE is not None:
                _HOOK_TABLE[_HOOK_KEY] = _forward_pre_hook
            elif not _HOOK:  # pragma: no cover - other torch versions
                _HOOK.append(torch.nn.modules.module.register_module_forward_pre_hook(
                    _forward_pre_hook))

    def __exit__(self, *exc: object) -> None:
        _OWNERS.pop()
        if not _OWNERS:
            if _HOOK_TABLE is not None:
                _HOOK_TABLE.pop(_HOOK_KEY, None)
            elif _HOOK:  # pragma: no cover - other torch versions
                _HOOK.pop().remove()


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
