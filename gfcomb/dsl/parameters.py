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

    __slots__ = ("owner", "_token", "before")

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self._token: Token[Any] | None = None

    def __enter__(self) -> None:
        self.before = len(getattr(self.owner, "_modules", ()))
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
        owner = self.owner
        d = getattr(owner, "__dict__", None)
        if d is not None:
            d[_RUNS] = d.get(_RUNS, 0) + 1
        if d is not None and len(getattr(owner, "_modules", ())) > self.before:
            _modules_created_in_body(owner, self.before)
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
