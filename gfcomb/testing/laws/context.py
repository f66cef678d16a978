"""The context of one example's law checks (:class:`LawContext`): the traces the laws share,
tolerance comparisons, and the guard that every GFI call leaves its inputs unchanged."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch
from torch.utils import _pytree as pytree

from gfcomb.core.choicemap import ChoiceMap, short_repr
from gfcomb.core.diff import NoChange, UnknownChange
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.core.selection import Selection, select
from gfcomb.core.trace import Trace
from gfcomb.testing.laws.report import GFILawError, LawSkipped
from gfcomb.testing.strategies import Address, Draw, choice_dict


def is_close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    """``a`` and ``b`` (tensors or numbers, broadcastable) agree within ``atol + rtol·max|.|``
    elementwise (equal infinities agree; integer tensors must be equal)."""
    a = torch.as_tensor(a).detach()
    b = torch.as_tensor(b).detach()
    if a.shape != b.shape:
        try:
            torch.broadcast_shapes(a.shape, b.shape)
        except RuntimeError:
            return False
    if not (a.is_floating_point() or b.is_floating_point()):
        return bool(torch.equal(*torch.broadcast_tensors(a, b)))
    a, b = a.double(), b.double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = (a - b).abs()
    tol = atol + rtol * torch.maximum(a.abs(), b.abs())
    ok = same_inf | (diff <= tol)
    return bool(ok.all())


def num(x: Any) -> str:
    """A number (or a short tensor summary) for failure messages."""
    t = torch.as_tensor(x).detach()
    if t.numel() == 1:
        return f"{float(t):.10g}"
    return short_repr(t)


def same_tree(a: Any, b: Any, rtol: float, atol: float) -> bool:
    """Pytrees with equal structure and close tensor leaves (other leaves compared with ==)."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                if not is_close(x, y, rtol, atol):
                    return False
                continue
            if x.shape != y.shape or not is_close(x, y, rtol, atol):
                return False
        else:
            try:
                if bool(x != y):
                    return False
            except Exception:  # noqa: BLE001 - uncomparable Python objects are not checked
                pass
    return True


def choice_diff(a: ChoiceMap, b: ChoiceMap, rtol: float, atol: float) -> str | None:
    """None if the two choice maps hold the same addresses with close values; else why not."""
    da, db = choice_dict(a), choice_dict(b)
    only_a = [k for k in da if k not in db]
    only_b = [k for k in db if k not in da]
    if only_a or only_b:
        return f"addresses only in the first: {only_a[:5]}, only in the second: {only_b[:5]}"
    for k, v in da.items():
        w = db[k]
        if (isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor)
                and v.shape != w.shape) or not is_close(v, w, rtol, atol):
            return f"value at {k}: {short_repr(v)} vs {short_repr(w)}"
    return None


def _tensor_leaves(obj: Any, out: list[torch.Tensor], seen: set[int], depth: int = 0) -> None:
    if depth > 12 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return
    if isinstance(obj, (GenerativeFunction, torch.nn.Module, str, bytes, int, float, bool,
                        type(None), type)):
        return
    if isinstance(obj, (tuple, list)):
        for x in obj:
            _tensor_leaves(x, out, seen, depth + 1)
        return
    if isinstance(obj, dict):
        for x in obj.values():
            _tensor_leaves(x, out, seen, depth + 1)
        return
    leaves, spec = pytree.tree_flatten(obj)
    if not (len(leaves) == 1 and leaves[0] is obj):
        for x in leaves:
            _tensor_leaves(x, out, seen, depth + 1)
        return
    if attrs.has(type(obj)):
        for f in attrs.fields(type(obj)):
            _tensor_leaves(getattr(obj, f.name, None), out, seen, depth + 1)
        return
    for name in getattr(type(obj), "__slots__", ()):
        _tensor_leaves(getattr(obj, name, None), out, seen, depth + 1)
    if hasattr(obj, "__dict__"):
        for x in vars(obj).values():
            _tensor_leaves(x, out, seen, depth + 1)


def _snapshot(inputs: Sequence[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    leaves: list[torch.Tensor] = []
    seen: set[int] = set()
    for x in inputs:
        _tensor_leaves(x, leaves, seen)
    return [(t, t.detach().clone()) for t in leaves]


def _unchanged(t: torch.Tensor, before: torch.Tensor) -> bool:
    now = t.detach()
    if now.shape != before.shape or now.dtype != before.dtype:
        return False
    if torch.equal(now, before):
        return True
    if now.is_floating_point() or now.is_complex():
        both_nan = torch.isnan(now) & torch.isnan(before)
        return bool(((now == before) | both_nan).all())
    return False


class LawContext:
    """Everything a law check needs for one example: the function, the arguments, a trace,
    an alternative trace (perturbed values), other arguments, the draws and the tolerances.
    Every GFI call made through :meth:`call` is checked for input mutation."""

    def __init__(self, gen_fn: GenerativeFunction, args: tuple[Any, ...], draw: Draw, *,
                 rtol: float, atol: float, grad_rtol: float, grad_atol: float, fd_step: float,
                 check_mutation: bool, require_vmap: bool, batch_size: int,
                 alt_args: tuple[Any, ...] | None = None,
                 batch_args: Sequence[tuple[Any, ...]] | None = None) -> None:
        self.gen_fn = gen_fn
        self.args = args
        self.draw = draw
        self.rtol, self.atol = rtol, atol
        self.grad_rtol, self.grad_atol, self.fd_step = grad_rtol, grad_atol, fd_step
        self.check_mutation = check_mutation
        self.require_vmap = require_vmap
        self.batch_size = batch_size
        self.alt_args = alt_args
        self.batch_args = list(batch_args) if batch_args else []
        self.law = "?"
        self._trace: Trace | None = None
        self._alt: Trace | None = None

    # -- traces shared by the laws of one example
    @property
    def trace(self) -> Trace:
        """A trace of ``simulate(args)`` (made once per example)."""
        if self._trace is None:
            self._trace = self.call("simulate", self.args)
        return self._trace

    @property
    def alternative(self) -> Trace:
        """A second, independent trace of ``simulate(args)`` (source of perturbed values)."""
        if self._alt is None:
            self._alt = self.call("simulate", self.args)
        return self._alt

    # -- failures
    def fail(self, detail: str, choices: Any = None, **extra: Any) -> GFILawError:
        """The GFILawError for the current law."""
        return GFILawError(self.law, self.gen_fn, detail, self.args, choices, extra)

    def close(self, a: Any, b: Any) -> bool:
        """Tolerance comparison with the law tolerances."""
        return is_close(a, b, self.rtol, self.atol)

    def same_tree(self, a: Any, b: Any) -> bool:
        """:func:`same_tree` with the law tolerances."""
        return same_tree(a, b, self.rtol, self.atol)

    def choice_diff(self, a: ChoiceMap, b: ChoiceMap) -> str | None:
        """:func:`choice_diff` with the law tolerances."""
        return choice_diff(a, b, self.rtol, self.atol)

    # -- GFI calls
    def call(self, method: str, *inputs: Any, allow: tuple[type[BaseException], ...] = ()) -> Any:
        """``gen_fn.<method>(*inputs)``; an exception becomes a GFILawError (those in
        ``allow`` propagate); a changed input tensor is a 'no_mutation' violation."""
        snap = _snapshot(inputs) if self.check_mutation else []
        try:
            out = getattr(self.gen_fn, method)(*inputs)
        except allow:
            raise
        except (GFILawError, LawSkipped):
            raise
        except Exception as err:
            raise GFILawError(self.law, self.gen_fn,
                              f"{method} raised {type(err).__name__}: {err}", self.args,
                              _first_choicemap(inputs)) from err
        for t, before in snap:
            if not _unchanged(t, before):
                raise GFILawError(
                    "no_mutation", self.gen_fn,
                    f"{method} modified one of its inputs in place (a tensor of shape "
                    f"{tuple(before.shape)} was {short_repr(before)}, is now "
                    f"{short_repr(t.detach())})",
                    self.args, _first_choicemap(inputs))
        return out


def _first_choicemap(inputs: Sequence[Any]) -> Any:
    for x in inputs:
        if isinstance(x, ChoiceMap):
            return x
    for x in inputs:
        if isinstance(x, Trace):
            try:
                return x.choices
            except Exception:  # noqa: BLE001
                return None
    return None


def nochange(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A ``NoChange`` argdiff for every argument."""
    return tuple(NoChange() for _ in args)


def unknown(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """An ``UnknownChange`` argdiff for every argument."""
    return tuple(UnknownChange() for _ in args)


def select_addrs(addrs: Iterable[Address]) -> Selection:
    """The selection of ``addrs`` (the empty selection for none)."""
    addrs = list(addrs)
    return select(*addrs) if addrs else Selection.none()
