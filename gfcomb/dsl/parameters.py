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

    __slots__ = ("owner", "before")

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def __enter__(self) -> None:
        self.before = len(getattr(self.owner, "_modules", ()))
        _OWNERS.append(self.owner)
        if len(_OWNERS) == 1:
            if _HOOK_TABLE is not None:
                _HOOK_TABLE[_HOOK_KEY] = _forward_pre_hook
            elif not _HOOK:  # pragma: no cover - other torch versions
                _HOOK.append(torch.nn.modules.module.register_module_forward_pre_hook(
                    _forward_pre_hook))

    def __exit__(self, *exc: object) -> None:
        owner = self.owner
        d = getattr(owner, "__dict__", None)
        if d is not None:
            d[_RUNS] = d.get(_RUNS, 0) + 1
        if d is not None and len(getattr(owner, "_modules", ())) > self.before:
            _modules_created_in_body(owner, self.before)
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


def referenced_items(fn: Callable[..., Any]) -> list[tuple[str, Any]]:
    """``(name, object)`` for the globals named by ``fn``'s code and its closure cells."""
    out: list[tuple[str, Any]] = []
    code = getattr(fn, "__code__", None)
    if code is None:
        return out
    glb = getattr(fn, "__globals__", {})
    for name in sorted(_code_names(code)):
        if name in glb:
            out.append((name, glb[name]))
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
        try:
            out.append((name, cell.cell_contents))
        except ValueError:  # empty cell
            pass
    return out


def referenced_objects(fn: Callable[..., Any]) -> list[Any]:
    """Globals named by ``fn``'s code and its closure cells' contents."""
    return [obj for _, obj in referenced_items(fn)]


# ------------------------------------------------------------------ one module view
def _sub_generative_functions(gen_fn: Any) -> list[tuple[str, Any]]:
    """The generative functions and torch modules a generative function holds as attributes
    (a combinator's kernel or branches, a wrapper's inner function, a torch module), with
    the attribute names."""
    from gfcomb.core.gfi import GenerativeFunction

    out: list[tuple[str, Any]] = []
    for name, v in vars(gen_fn).items():
        items = v if isinstance(v, (list, tuple)) else (v,)
        for x in items:
            if isinstance(x, (GenerativeFunction, torch.nn.Module)):
                out.append((name.lstrip("_"), x))
    return out


def named_modules_of(gen_fn: Any) -> dict[str, torch.nn.Module]:
    """Every torch module ``gen_fn`` calls, directly or through callees, kernels and
    branches, each once (by identity), named by the variable that holds it (a global or
    closure name of a @gen body, e.g. ``"encoder"``), else by its class and position
    (``"linear0"``).  A second module under a taken name gets a suffix (``"net_1"``)."""
    from gfcomb.core.gfi import GenerativeFunction

    found: dict[int, tuple[str, torch.nn.Module]] = {}
    seen: set[int] = set()

    def add(name: str, m: torch.nn.Module) -> None:
        if id(m) in found:
            return
        taken = {n for n, _ in found.values()}
        base = name.replace(".", "_") or type(m).__name__.lower()
        n, k = base, 0
        while n in taken:
            k += 1
            n = f"{base}_{k}"
        found[id(m)] = (n, m)

    def visit(g: Any) -> None:
        if id(g) in seen:
            return
        seen.add(id(g))
        fn = getattr(g, "fn", None)
        if callable(fn) and hasattr(g, "modules") and hasattr(g, "callees"):  # a @gen function
            named = {id(obj): nm for nm, obj in referenced_items(fn)}
            for i, m in enumerate(g.modules()):
                add(named.get(id(m), f"{type(m).__name__.lower()}{i}"), m)
            for c in g.callees():
                visit(c)
            return
        for name, x in _sub_generative_functions(g):
            if isinstance(x, torch.nn.Module):
                add(name, x)
            elif isinstance(x, GenerativeFunction):
                visit(x)

    visit(gen_fn)
    return {n: m for n, m in found.values()}


def module_view(gen_fn: Any) -> torch.nn.ModuleDict:
    """One ``nn.ModuleDict`` holding every module ``gen_fn`` calls (see
    :func:`named_modules_of`): ``state_dict``/``load_state_dict`` and ``.to(device)`` act on
    the function's own modules."""
    return torch.nn.ModuleDict(named_modules_of(gen_fn))


# ------------------------------------------------------------------ modules made in a body
# per function, in its instance dict: body runs so far, runs after the first that noted new
# modules, and whether it was warned
_RUNS, _GROWTH, _WARNED = "_gfcomb_body_runs", "_gfcomb_module_growth", "_gfcomb_warned"


def _modules_created_in_body(owner: Any, before: int) -> None:
    """Called when a body run noted new modules: warn (once per function) when the body
    keeps noting new modules run after run, i.e. it builds them inside the body (a model
    whose branches call other modules notes each one once, and is not warned)."""
    d = owner.__dict__
    if d.get(_RUNS, 0) <= 1 or d.get(_WARNED):
        return
    reachable: set[int] = set()  # modules held by what the body names (a ModuleList, ...)
    for obj in referenced_objects(getattr(owner, "fn", None) or (lambda: None)):
        if isinstance(obj, torch.nn.Module):
            reachable.update(id(m) for m in obj.modules())
    mods = [m for m in list(getattr(owner, "_modules", {}).values())[before:]
            if id(m) not in reachable]
    if not mods:
        return
    d[_GROWTH] = d.get(_GROWTH, 0) + 1
    if d[_GROWTH] < 2:
        return
    d[_WARNED] = True
    import warnings

    kinds = ", ".join(sorted({type(m).__name__ for m in mods})) or "modules"
    warnings.warn(
        f"{owner!r} creates new torch modules ({kinds}) on every run of its body: their "
        "parameters are new each time, so they are never trained and they pile up in "
        "parameters(). Create the modules once, outside the body (a global, a closure "
        "variable, or an argument).", UserWarning, stacklevel=4)


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
