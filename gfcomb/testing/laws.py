"""The laws of the Generative Function Interface, checked on any generative function.

:func:`check_gfi` runs every law on many arguments drawn by hypothesis and raises
:class:`GFILawError` (an ``AssertionError``) naming the law, the arguments and the choice
map involved when one fails; hypothesis first shrinks the arguments and the random decisions
(constraint subsets, selections) to a small counterexample.

The laws (names as accepted by ``laws=``), for a trace ``t ~ simulate(x)``:

``simulate_assess``
    ``assess(x, t.choices)`` gives ``t.score`` and ``t.retval``.
``generate_full``
    ``generate(x, t.choices)``: weight == score == ``t.score``, same choices and retval.
``generate_empty``
    ``generate(x, {})``: weight == 0 (not for functions with untraced randomness).
``generate_partial``
    ``generate(x, c)`` with ``c`` a subset of the choices (some values perturbed): the
    constrained values are kept and weight == ``project(trace, select(c))``.
``update_noop``
    ``update(t, x, NoChange, {})``: weight 0, same choices and score, empty discard.
``update_roundtrip``
    ``(t', w, _, d) = update(t, x', Δ, c)`` then ``update(t', x, Δ, d)`` restores ``t``
    (choices and score) with weight ``-w - project(t', fresh)`` (``-w`` when no choice
    appeared).
``update_weight``
    weight == ``t'.score - t.score - project(t', fresh)``, where ``fresh`` are the choices of
    ``t'`` that were neither in ``t`` nor constrained (so weight == new score − old score
    when no choice appears); assumes prior proposals for fresh choices.
``update_discard``
    the discard holds exactly the old values of the constrained and the removed choices.
``regenerate_empty``
    ``regenerate(t, x, NoChange, none)``: weight 0, same choices.
``regenerate_weight``
    ``regenerate(t, x', Δ, S)``: unselected retained choices keep their values and weight ==
    ``project(t', R) - project(t, R)`` for R the retained unselected choices (with an
    unchanged structure, R is everything unselected).
``project``
    ``project(selectall) == score``, ``project(none) == 0``, additive over disjoint
    selections, ``project(S) + project(~S) == score``.
``gradients``
    ``choice_gradients`` (continuous choices, float arguments) match central finite
    differences of ``assess`` in float64.  Discrete choices are skipped: integer/bool dtypes
    and values that are all exact integers.
``no_mutation``
    no GFI call changes a tensor of its inputs (traces, arguments, choice maps): every call
    of the other laws is checked (clone before, ``torch.equal`` after).
``vmap``
    ``torch.func.vmap`` of ``simulate``/``generate``/``assess`` over a batch of arguments (or,
    when the arguments cannot be stacked, over constrained choice values) equals per-element
    calls under fully constrained values.

A law that does not apply to an example (no continuous choice for ``gradients``, a function
that cannot run under vmap, a partial constraint the function never visits) is skipped for
that example; :class:`GFIReport` says which laws ran how often and why others were skipped.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

from gfcomb.core.choicemap import ChoiceMap, short_repr
from gfcomb.core.diff import NoChange, UnknownChange
from gfcomb.core.errors import GFIError, UnvisitedConstraintError
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.core.pytree import tree_index, tree_stack
from gfcomb.core.selection import Selection, select
from gfcomb.core.trace import Trace
from gfcomb.testing.strategies import (
    Address,
    Draw,
    HypothesisDraw,
    RandomDraw,
    choice_dict,
    draw_constraints,
    draw_selection,
    draw_subset,
)

LAW_NAMES: tuple[str, ...] = (
    "simulate_assess", "generate_full", "generate_empty", "generate_partial", "update_noop",
    "update_roundtrip", "update_weight", "update_discard", "regenerate_empty",
    "regenerate_weight", "project", "gradients", "no_mutation", "vmap",
)


# ============================================================================ errors, report
class GFILawError(AssertionError):
    """A generative function broke a GFI law.  ``law`` names it; the message shows the
    arguments and the choice map involved."""

    def __init__(self, law: str, gen_fn: Any, detail: str, args: Any = None,
                 choices: Any = None, extra: dict[str, Any] | None = None) -> None:
        self.law = law
        self.gen_fn = gen_fn
        self.detail = detail
        self.args = args
        self.choices = choices
        lines = [f"GFI law '{law}' violated by {gen_fn!r}: {detail}"]
        if args is not None:
            lines.append(f"  args: {_show_args(args)}")
        if choices is not None:
            lines.append("  choice map: " + _indent(repr(choices)))
        for k, v in (extra or {}).items():
            lines.append(f"  {k}: " + _indent(v if isinstance(v, str) else repr(v)))
        super().__init__("\n".join(lines))


class LawSkipped(Exception):
    """Raised by a law check that does not apply to this example (the reason is the message)."""


@attrs.define
class GFIReport:
    """What :func:`check_gfi` ran: examples, and per law how often it ran or was skipped."""

    gen_fn: Any
    laws: tuple[str, ...]
    examples: int = 0
    ran: collections.Counter[str] = attrs.field(factory=collections.Counter)
    skipped: dict[str, collections.Counter[str]] = attrs.field(factory=dict)

    def skip(self, law: str, reason: str) -> None:
        """Record that ``law`` did not apply to one example."""
        self.skipped.setdefault(law, collections.Counter())[reason] += 1

    @property
    def laws_run(self) -> tuple[str, ...]:
        """The laws that ran on at least one example."""
        return tuple(law for law in self.laws if self.ran[law] > 0)

    @property
    def laws_never_run(self) -> tuple[str, ...]:
        """The selected laws that applied to no example."""
        return tuple(law for law in self.laws if self.ran[law] == 0)

    def summary(self) -> str:
        """A readable table: law, examples run, skip reasons."""
        lines = [f"check_gfi({self.gen_fn!r}): {self.examples} examples"]
        for law in self.laws:
            reasons: dict[str, int] = self.skipped.get(law, {})
            why = "; ".join(f"{r} (x{n})" for r, n in reasons.items())
            lines.append(f"  {law:18s} ran {self.ran[law]:4d}" + (f"  skipped: {why}" if why
                                                                  else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _indent(text: str) -> str:
    return text.replace("\n", "\n    ")


def _show_args(args: Any) -> str:
    if isinstance(args, tuple):
        return "(" + ", ".join(short_repr(a) for a in args) + ("," if len(args) == 1 else "") + ")"
    return short_repr(args)


# ============================================================================ comparisons
def _is_close(a: Any, b: Any, rtol: float, atol: float) -> bool:
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


def _num(x: Any) -> str:
    t = torch.as_tensor(x).detach()
    if t.numel() == 1:
        return f"{float(t):.10g}"
    return short_repr(t)


def _same_tree(a: Any, b: Any, rtol: float, atol: float) -> bool:
    """Pytrees with equal structure and close tensor leaves (other leaves compared with ==)."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                if not _is_close(x, y, rtol, atol):
                    return False
                continue
            if x.shape != y.shape or not _is_close(x, y, rtol, atol):
                return False
        else:
            try:
                if bool(x != y):
                    return False
            except Exception:  # noqa: BLE001 - uncomparable Python objects are not checked
                pass
    return True


def _choice_diff(a: ChoiceMap, b: ChoiceMap, rtol: float, atol: float) -> str | None:
    """None if the two choice maps hold the same addresses with close values; else why not."""
    da, db = choice_dict(a), choice_dict(b)
    only_a = [k for k in da if k not in db]
    only_b = [k for k in db if k not in da]
    if only_a or only_b:
        return f"addresses only in the first: {only_a[:5]}, only in the second: {only_b[:5]}"
    for k, v in da.items():
        w = db[k]
        if (isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor)
                and v.shape != w.shape) or not _is_close(v, w, rtol, atol):
            return f"value at {k}: {short_repr(v)} vs {short_repr(w)}"
    return None


# ============================================================================ mutation guard
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


# ============================================================================ the context
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
        return _is_close(a, b, self.rtol, self.atol)

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


def _nochange(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(NoChange() for _ in args)


def _unknown(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(UnknownChange() for _ in args)


def _select_addrs(addrs: Iterable[Address]) -> Selection:
    addrs = list(addrs)
    return select(*addrs) if addrs else Selection.none()


# ============================================================================ the laws
def law_simulate_assess(ctx: LawContext) -> None:
    """``assess(x, t.choices) == (t.score, t.retval)`` for ``t ~ simulate(x)``."""
    tr = ctx.trace
    w, r = ctx.call("assess", ctx.args, tr.choices)
    if not ctx.close(w, tr.score):
        raise ctx.fail(f"assess weight {_num(w)} != simulate score {_num(tr.score)}",
                       tr.choices)
    if not _same_tree(r, tr.retval, ctx.rtol, ctx.atol):
        raise ctx.fail(f"assess retval {short_repr(r)} != simulate retval {short_repr(tr.retval)}",
                       tr.choices)


def law_generate_full(ctx: LawContext) -> None:
    """``generate`` with all choices constrained: weight == score == simulate's score."""
    tr = ctx.trace
    new, w = ctx.call("generate", ctx.args, tr.choices)
    if not ctx.close(w, tr.score):
        raise ctx.fail(f"generate with all choices: weight {_num(w)} != score "
                       f"{_num(tr.score)}", tr.choices)
    if not ctx.close(new.score, tr.score):
        raise ctx.fail(f"generate with all choices: trace score {_num(new.score)} != "
                       f"{_num(tr.score)}", tr.choices)
    why = _choice_diff(new.choices, tr.choices, ctx.rtol, ctx.atol)
    if why:
        raise ctx.fail(f"generate with all choices changed the choices: {why}", tr.choices)
    if not _same_tree(new.retval, tr.retval, ctx.rtol, ctx.atol):
        raise ctx.fail(f"generate with all choices: retval {short_repr(new.retval)} != "
                       f"{short_repr(tr.retval)}", tr.choices)


def law_generate_empty(ctx: LawContext) -> None:
    """``generate`` without constraints: weight == 0."""
    new, w = ctx.call("generate", ctx.args, ChoiceMap.empty())
    if not ctx.close(w, 0.0):
        raise ctx.fail(f"generate without constraints: weight {_num(w)} != 0", new.choices)


def law_generate_partial(ctx: LawContext) -> None:
    """``generate(x, c)``: constrained values kept; weight == project(trace, select(c))."""
    c = draw_constraints(ctx.draw, ctx.trace, ctx.alternative, "generate constraints")
    if c.is_empty():
        raise LawSkipped("no constraint drawn")
    try:
        new, w = ctx.call("generate", ctx.args, c, allow=(UnvisitedConstraintError,))
    except UnvisitedConstraintError as err:
        raise LawSkipped("a perturbed constraint changed the structure") from err
    if bool(torch.isnan(torch.as_tensor(w)).any()):
        # under vmap a constraint that an element's branch does not visit is a NaN weight
        raise LawSkipped("a constraint was not visited (NaN weight)")
    got = choice_dict(new.choices)
    for a, v in choice_dict(c).items():
        if a not in got or not ctx.close(got[a], v):
            raise ctx.fail(f"generate did not keep the constrained value at {a}: "
                           f"{short_repr(got.get(a))} instead of {short_repr(v)}", c)
    p = ctx.call("project", new, _select_addrs(choice_dict(c)))
    if not ctx.close(w, p):
        raise ctx.fail(f"generate weight {_num(w)} != project(trace, constrained selection) "
                       f"{_num(p)} (difference {_num(torch.as_tensor(w) - p)})", c,
                       trace_choices=new.choices)


def law_update_noop(ctx: LawContext) -> None:
    """``update`` with no change: weight 0, same choices and score, empty discard."""
    tr = ctx.trace
    new, w, _, d = ctx.call("update", tr, ctx.args, _nochange(ctx.args), ChoiceMap.empty())
    if not ctx.close(w, 0.0):
        raise ctx.fail(f"update with no change: weight {_num(w)} != 0", tr.choices)
    why = _choice_diff(new.choices, tr.choices, ctx.rtol, ctx.atol)
    if why:
        raise ctx.fail(f"update with no change changed the choices: {why}", tr.choices)
    if not ctx.close(new.score, tr.score):
        raise ctx.fail(f"update with no change: score {_num(new.score)} != {_num(tr.score)}",
                       tr.choices)
    if len(d) != 0:
        raise ctx.fail("update with no change: discard is not empty", tr.choices, discard=d)


def _fresh_and_removed(old: Trace, new: Trace, c: ChoiceMap) -> tuple[list[Address],
                                                                     list[Address]]:
    do, dn, dc = choice_dict(old.choices), choice_dict(new.choices), choice_dict(c)
    fresh = [a for a in dn if a not in do and a not in dc]
    removed = [a for a in do if a not in dn]
    return fresh, removed


def _update_move(ctx: LawContext, label: str) -> tuple[Any, ...] | None:
    """One update move ``(old, args', diffs, c, new, w, discard)`` or None (skipped)."""
    tr = ctx.trace
    new_args = ctx.args
    diffs = _nochange(ctx.args)
    if ctx.alt_args is not None and ctx.draw.boolean(label=f"{label}: change the arguments"):
        new_args, diffs = ctx.alt_args, _unknown(ctx.alt_args)
    c = draw_constraints(ctx.draw, tr, ctx.alternative, f"{label} constraints")
    allow: tuple[type[BaseException], ...] = (UnvisitedConstraintError,)
    if new_args is not ctx.args:
        allow = (GFIError,)  # other arguments may not fit this trace (another dimension)
    try:
        new, w, _, d = ctx.call("update", tr, new_args, diffs, c, allow=allow)
    except UnvisitedConstraintError:
        return None
    except GFIError as err:
        raise LawSkipped("the other arguments do not fit the trace") from err
    if bool(torch.isnan(torch.as_tensor(w)).any()):
        raise LawSkipped("a constraint was not visited (NaN weight)")
    if not bool(torch.isfinite(torch.as_tensor(new.score)).all()):
        raise LawSkipped("the new arguments give the trace zero density")
    return tr, new_args, diffs, c, new, w, d


def law_update_weight(ctx: LawContext) -> None:
    """update weight == new score − old score − project(new, fresh choices)."""
    move = _update_move(ctx, "update_weight")
    if move is None:
        raise LawSkipped("a constraint was not visited under the new structure")
    tr, new_args, _, c, new, w, _d = move
    fresh, _ = _fresh_and_removed(tr, new, c)
    q = ctx.call("project", new, _select_addrs(fresh)) if fresh else 0.0
    expect = new.score - tr.score - q
    if not ctx.close(w, expect):
        what = ("new score - old score - log q(fresh)" if fresh else "new score - old score")
        raise ctx.fail(f"update weight {_num(w)} != {what} = {_num(expect)} (difference "
                       f"{_num(torch.as_tensor(w) - expect)}); fresh choices: {fresh[:5]}",
                       c, new_args=_show_args(new_args), old_choices=tr.choices,
                       new_choices=new.choices)


def law_update_discard(ctx: LawContext) -> None:
    """The discard holds exactly the old values of constrained and removed choices."""
    move = _update_move(ctx, "update_discard")
    if move is None:
        raise LawSkipped("a constraint was not visited under the new structure")
    tr, new_args, _, c, new, _w, d = move
    do, dn, dc = choice_dict(tr.choices), choice_dict(new.choices), choice_dict(c)
    expected = {a: v for a, v in do.items() if a in dc or a not in dn}
    got = choice_dict(d)
    missing = [a for a in expected if a not in got]
    extra = [a for a in got if a not in expected]
    if missing or extra:
        raise ctx.fail(f"update discard is wrong: missing entries {missing[:5]}, unexpected "
                       f"entries {extra[:5]}", c, discard=d, old_choices=tr.choices,
                       new_args=_show_args(new_args))
    for a, v in expected.items():
        if not ctx.close(got[a], v):
            raise ctx.fail(f"update discard at {a} holds {short_repr(got[a])}, the old value was "
                           f"{short_repr(v)}", c, discard=d)


def law_update_roundtrip(ctx: LawContext) -> None:
    """update(c) then update(discard) restores the trace and negates the weight."""
    move = _update_move(ctx, "update_roundtrip")
    if move is None:
        raise LawSkipped("a constraint was not visited under the new structure")
    tr, new_args, diffs, c, new, w, d = move
    back_diffs = _nochange(ctx.args) if all(isinstance(x, NoChange) for x in diffs) \
        else _unknown(ctx.args)
    back, w2, _, _ = ctx.call("update", new, ctx.args, back_diffs, d)
    why = _choice_diff(back.choices, tr.choices, ctx.rtol, ctx.atol)
    if why:
        raise ctx.fail(f"update(update(t, c), discard) did not restore the choices: {why}",
                       c, discard=d, old_choices=tr.choices, new_args=_show_args(new_args))
    if not ctx.close(back.score, tr.score):
        raise ctx.fail(f"update(update(t, c), discard) did not restore the score: "
                       f"{_num(back.score)} != {_num(tr.score)}", c, discard=d)
    fresh, _ = _fresh_and_removed(tr, new, c)
    q = ctx.call("project", new, _select_addrs(fresh)) if fresh else 0.0
    if not ctx.close(torch.as_tensor(w) + w2, -torch.as_tensor(q)):
        raise ctx.fail(f"update(update(t, c), discard) did not negate the weight: first "
                       f"{_num(w)}, back {_num(w2)}, log q(fresh) {_num(q)}", c, discard=d,
                       old_choices=tr.choices, new_args=_show_args(new_args))


def law_regenerate_empty(ctx: LawContext) -> None:
    """regenerate with an empty selection: weight 0, same choices."""
    tr = ctx.trace
    new, w, _ = ctx.call("regenerate", tr, ctx.args, _nochange(ctx.args), Selection.none())
    if not ctx.close(w, 0.0):
        raise ctx.fail(f"regenerate with an empty selection: weight {_num(w)} != 0",
                       tr.choices)
    why = _choice_diff(new.choices, tr.choices, ctx.rtol, ctx.atol)
    if why:
        raise ctx.fail(f"regenerate with an empty selection changed the choices: {why}",
                       tr.choices)


def law_regenerate_weight(ctx: LawContext) -> None:
    """weight == project(t', R) − project(t, R), R = retained unselected choices."""
    tr = ctx.trace
    sel, inside = draw_selection(ctx.draw, tr, "regenerate selection")
    new_args, diffs = ctx.args, _nochange(ctx.args)
    if ctx.alt_args is not None and ctx.draw.boolean(label="regenerate: change the arguments"):
        new_args, diffs = ctx.alt_args, _unknown(ctx.alt_args)
    try:
        new, w, _ = ctx.call("regenerate", tr, new_args, diffs, sel,
                             allow=(GFIError,) if new_args is not ctx.args else ())
    except GFIError as err:
        raise LawSkipped("the other arguments do not fit the trace") from err
    if not bool(torch.isfinite(torch.as_tensor(new.score)).all()):
        raise LawSkipped("the new arguments give the trace zero density")
    do, dn = choice_dict(tr.choices), choice_dict(new.choices)
    retained = [a for a in do if a in dn and not inside(a)]
    for a in retained:
        if not ctx.close(dn[a], do[a]):
            raise ctx.fail(f"regenerate changed the unselected choice at {a}: "
                           f"{short_repr(do[a])} -> {short_repr(dn[a])}", tr.choices, selection=sel)
    r = _select_addrs(retained)
    expect = (ctx.call("project", new, r) - ctx.call("project", tr, r)) if retained else 0.0
    if not ctx.close(w, expect):
        raise ctx.fail(f"regenerate weight {_num(w)} != project(new, unselected) - "
                       f"project(old, unselected) = {_num(expect)} (difference "
                       f"{_num(torch.as_tensor(w) - expect)})", tr.choices, selection=sel,
                       new_args=_show_args(new_args), new_choices=new.choices)


def law_project(ctx: LawContext) -> None:
    """project(all) == score, project(none) == 0, additive over disjoint selections."""
    tr = ctx.trace
    p_all = ctx.call("project", tr, Selection.all())
    if not ctx.close(p_all, tr.score):
        raise ctx.fail(f"project(selectall) = {_num(p_all)} != score {_num(tr.score)}",
                       tr.choices)
    p_none = ctx.call("project", tr, Selection.none())
    if not ctx.close(p_none, 0.0):
        raise ctx.fail(f"project(empty selection) = {_num(p_none)} != 0", tr.choices)
    addrs = list(choice_dict(tr.choices))
    first = draw_subset(ctx.draw, addrs, "project first part")
    rest = [a for a in addrs if a not in set(first)]
    second = draw_subset(ctx.draw, rest, "project second part")
    s1, s2 = _select_addrs(first), _select_addrs(second)
    p1, p2 = ctx.call("project", tr, s1), ctx.call("project", tr, s2)
    p12 = ctx.call("project", tr, s1 | s2)
    if not ctx.close(p12, p1 + p2):
        raise ctx.fail(f"project is not additive: project(S1 | S2) = {_num(p12)} but "
                       f"project(S1) + project(S2) = {_num(p1)} + {_num(p2)}", tr.choices,
                       S1=first[:8], S2=second[:8])
    sel, _ = draw_selection(ctx.draw, tr, "project selection")
    ps, pc = ctx.call("project", tr, sel), ctx.call("project", tr, ~sel)
    if not ctx.close(ps + pc, tr.score):
        raise ctx.fail(f"project(S) + project(~S) = {_num(ps)} + {_num(pc)} != score "
                       f"{_num(tr.score)}", tr.choices, selection=sel)


def _continuous(v: Any) -> bool:
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.numel() == 0:
        return False
    return not bool((v == torch.round(v)).all())


def law_gradients(ctx: LawContext) -> None:
    """choice_gradients match central finite differences of assess (float64)."""
    tr = ctx.trace
    values = choice_dict(tr.choices)
    cont = [a for a, v in values.items() if _continuous(v)]
    arg_leaves, arg_spec = pytree.tree_flatten(ctx.args)
    arg_idx = [i for i, a in enumerate(arg_leaves) if _continuous(a)]
    if not cont and not arg_idx:
        raise LawSkipped("no continuous choice or float argument")
    dtypes = {values[a].dtype for a in cont} | {arg_leaves[i].dtype for i in arg_idx}
    if dtypes != {torch.float64}:
        raise LawSkipped("values are not float64")
    sel = _select_addrs(cont)
    arg_grads, _, grads = ctx.call("choice_gradients", tr, sel if cont else None)
    gdict = choice_dict(grads) if cont else {}
    h = ctx.fd_step

    def f_choices(a: Address, v: torch.Tensor) -> float:
        cm = ChoiceMap({**values, a: v})
        try:
            return float(ctx.call("assess", ctx.args, cm, allow=(GFIError,))[0].detach())
        except GFIError:
            return math.nan  # outside the support / the valid values

    def f_args(i: int, v: torch.Tensor) -> float:
        leaves = list(arg_leaves)
        leaves[i] = v
        args = tuple(pytree.tree_unflatten(leaves, arg_spec))
        try:
            return float(ctx.call("assess", args, tr.choices, allow=(GFIError,))[0].detach())
        except GFIError:
            return math.nan  # outside the valid arguments

    targets: list[tuple[str, Any, torch.Tensor, Any, Callable[[Any, torch.Tensor], float]]] = []
    for a in cont:
        targets.append((f"choice {a}", a, values[a], gdict.get(a), f_choices))
    g_leaves = pytree.tree_leaves(arg_grads, is_leaf=lambda x: x is None) \
        if arg_grads is not None else []
    for i in arg_idx:
        g = g_leaves[i] if i < len(g_leaves) else None
        targets.append((f"argument {i}", i, arg_leaves[i], g, f_args))
    ran = 0
    for what, key, v, g, fn in targets[:8]:
        j = ctx.draw.integer(0, v.numel() - 1, label=f"gradient coordinate of {what}")
        e = torch.zeros_like(v).reshape(-1)
        e[j] = h
        e = e.reshape(v.shape)
        fp, fm = fn(key, v + e), fn(key, v - e)
        if not (math.isfinite(fp) and math.isfinite(fm)):
            continue  # at the edge of the support
        fd = (fp - fm) / (2 * h)
        if g is None:
            ad = 0.0
        else:
            ad = float(torch.as_tensor(g).reshape(-1)[j]) if torch.as_tensor(g).numel() > 1 \
                else float(g)
        ran += 1
        if not abs(ad - fd) <= ctx.grad_atol + ctx.grad_rtol * max(abs(ad), abs(fd)):
            raise ctx.fail(f"gradient with respect to {what} (coordinate {j}) is {ad:.10g}, "
                           f"finite differences give {fd:.10g}", tr.choices)
    if ran == 0:
        raise LawSkipped("every perturbed value left the support")


def _stack_args(args_list: Sequence[tuple[Any, ...]]) -> tuple[list[int], Any] | None:
    """(positions of batched leaves, stacked leaves + spec) or None if not stackable."""
    flat = [pytree.tree_flatten(a) for a in args_list]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        return None
    batched: list[int] = []
    for j, leaf in enumerate(flat[0][0]):
        col = [leaves[j] for leaves, _ in flat]
        if all(isinstance(x, torch.Tensor) for x in col):
            if any(x.shape != leaf.shape or x.dtype != leaf.dtype for x in col):
                return None
            batched.append(j)
        else:
            try:
                if any(bool(x != leaf) for x in col):
                    return None
            except Exception:  # noqa: BLE001
                return None
    return batched, flat


def law_vmap(ctx: LawContext) -> None:
    """vmap of simulate / generate / assess equals per-element calls."""
    n = ctx.batch_size
    args_list = [ctx.args] + [a for a in ctx.batch_args[: n - 1]]
    stacked = _stack_args(args_list) if len(args_list) > 1 else None
    over_args = stacked is not None and bool(stacked[0])
    if not over_args:
        args_list = [ctx.args] * n
    traces = [ctx.call("simulate", a) for a in args_list]
    # keep the elements whose choice maps have the first one's structure
    spec0 = pytree.tree_structure(traces[0].choices)
    keep = [i for i, t in enumerate(traces) if pytree.tree_structure(t.choices) == spec0]
    if len(keep) < 2:
        raise LawSkipped("elements have different choice structures")
    args_list = [args_list[i] for i in keep]
    traces = [traces[i] for i in keep]
    cms = [t.choices for t in traces]
    leaves0, spec = pytree.tree_flatten(args_list[0])
    if over_args:
        batched_pos, flat = _stack_args(args_list)  # type: ignore[misc]
        arg_cols = [torch.stack([f[0][j] for f in flat]) for j in batched_pos]
    else:
        batched_pos, arg_cols = [], []

    def rebuild(cols: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        leaves = list(leaves0)
        for j, c in zip(batched_pos, cols):
            leaves[j] = c
        return tuple(pytree.tree_unflatten(leaves, spec))

    try:
        cm_b = tree_stack(cms)
        vm = lambda f: torch.func.vmap(f, randomness="different")  # noqa: E731
        tr_b, w_b = vm(lambda cols, cm: ctx.gen_fn.generate(rebuild(cols), cm))(arg_cols, cm_b)
        wa_b, r_b = vm(lambda cols, cm: ctx.gen_fn.assess(rebuild(cols), cm))(arg_cols, cm_b)
        sim_b = vm(lambda cols, _: ctx.gen_fn.simulate(rebuild(cols)))(
            arg_cols, torch.zeros(len(cms)))
    except GFILawError:
        raise
    except Exception as err:  # noqa: BLE001
        if ctx.require_vmap:
            raise ctx.fail(f"cannot run under torch.func.vmap: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}", cms[0]) from err
        raise LawSkipped(f"cannot run under vmap ({type(err).__name__})") from err
    mode = "arguments" if over_args else "constrained values"
    for i, (a, cm) in enumerate(zip(args_list, cms)):
        tr_i, w_i = ctx.call("generate", a, cm)
        row = tree_index(tr_b, i)
        if not ctx.close(tree_index(w_b, i), w_i):
            raise ctx.fail(f"vmapped generate (over {mode}) element {i}: weight "
                           f"{_num(w_b[i])} != per-element {_num(w_i)}", cm)
        if not ctx.close(row.score, tr_i.score):
            raise ctx.fail(f"vmapped generate (over {mode}) element {i}: score "
                           f"{_num(row.score)} != per-element {_num(tr_i.score)}", cm)
        if not _same_tree(row.retval, tr_i.retval, ctx.rtol, ctx.atol):
            raise ctx.fail(f"vmapped generate (over {mode}) element {i}: retval "
                           f"{short_repr(row.retval)} != per-element {short_repr(tr_i.retval)}", cm)
        why = _choice_diff(row.choices, tr_i.choices, ctx.rtol, ctx.atol)
        if why:
            raise ctx.fail(f"vmapped generate (over {mode}) element {i}: choices differ: "
                           f"{why}", cm)
        wa_i, r_i = ctx.call("assess", a, cm)
        if not ctx.close(tree_index(wa_b, i), wa_i) or not _same_tree(
                tree_index(r_b, i), r_i, ctx.rtol, ctx.atol):
            raise ctx.fail(f"vmapped assess (over {mode}) element {i}: weight "
                           f"{_num(wa_b[i])} != per-element {_num(wa_i)} (or retvals differ)",
                           cm)
        srow = tree_index(sim_b, i)
        ws, _ = ctx.call("assess", a, srow.choices)
        if not ctx.close(srow.score, ws):
            raise ctx.fail(f"vmapped simulate element {i}: score {_num(srow.score)} != "
                           f"assess of its choices {_num(ws)}", srow.choices)


LAWS: dict[str, Callable[[LawContext], None]] = {
    "simulate_assess": law_simulate_assess,
    "generate_full": law_generate_full,
    "generate_empty": law_generate_empty,
    "generate_partial": law_generate_partial,
    "update_noop": law_update_noop,
    "update_roundtrip": law_update_roundtrip,
    "update_weight": law_update_weight,
    "update_discard": law_update_discard,
    "regenerate_empty": law_regenerate_empty,
    "regenerate_weight": law_regenerate_weight,
    "project": law_project,
    "gradients": law_gradients,
    "vmap": law_vmap,
}


def resolve_laws(laws: Iterable[str] | None = None, skip: Iterable[str] = ()) -> tuple[str, ...]:
    """The law names to check: ``laws`` (default: all) minus ``skip``; unknown names raise."""
    chosen = LAW_NAMES if laws is None else tuple(laws)
    skip = tuple(skip)
    for name in chosen + skip:
        if name not in LAW_NAMES:
            raise ValueError(f"unknown GFI law {name!r}; the laws are {', '.join(LAW_NAMES)}")
    return tuple(name for name in chosen if name not in skip)


# ============================================================================ entry points
_DEFAULTS: dict[str, Any] = dict(rtol=1e-7, atol=1e-9, grad_rtol=1e-4, grad_atol=1e-6,
                                 fd_step=1e-6, require_vmap=False, batch_size=3)


def check_gfi_example(gen_fn: GenerativeFunction, args: tuple[Any, ...], draw: Draw, *,
                      laws: Iterable[str] | None = None, skip: Iterable[str] = (),
                      report: GFIReport | None = None, args_strategy: Any = None,
                      **options: Any) -> GFIReport:
    """Check the selected laws on one argument tuple (the body of :func:`check_gfi`).

    ``draw`` supplies the random decisions (a :class:`HypothesisDraw` inside a hypothesis
    test, e.g. ``@given(st.data())``, or a :class:`RandomDraw`).  With ``args_strategy`` and a
    hypothesis draw, other arguments are drawn for the argument-changing updates and the
    batched (vmap) law.  Options: ``rtol``, ``atol`` (weights, scores, values),
    ``grad_rtol``, ``grad_atol``, ``fd_step`` (gradients), ``require_vmap`` (a failure to run
    under vmap is a violation instead of a skip), ``batch_size``.
    """
    names = resolve_laws(laws, skip)
    opts = {**_DEFAULTS, **options}
    unknown = set(opts) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown check_gfi option(s): {sorted(unknown)}")
    report = report if report is not None else GFIReport(gen_fn, names)
    report.examples += 1
    alt_args = None
    batch_args: list[tuple[Any, ...]] = []
    if args_strategy is not None:
        if any(n in names for n in ("update_roundtrip", "update_weight", "update_discard",
                                    "regenerate_weight")):
            alt_args = draw.strategy(args_strategy, label="other args")
        if "vmap" in names:
            batch_args = [b for b in (draw.strategy(args_strategy, label="batch args")
                                      for _ in range(opts["batch_size"] - 1)) if b is not None]
    seed = draw.integer(0, 2**31 - 1, label="torch seed")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ctx = LawContext(gen_fn, args, draw, rtol=opts["rtol"], atol=opts["atol"],
                         grad_rtol=opts["grad_rtol"], grad_atol=opts["grad_atol"],
                         fd_step=opts["fd_step"], check_mutation="no_mutation" in names,
                         require_vmap=opts["require_vmap"], batch_size=opts["batch_size"],
                         alt_args=alt_args, batch_args=batch_args)
        ctx.law = "simulate_assess"
        _ = ctx.trace
        for name in names:
            if name == "no_mutation":
                continue
            ctx.law = name
            try:
                LAWS[name](ctx)
            except LawSkipped as why:
                report.skip(name, str(why))
                continue
            report.ran[name] += 1
        if "no_mutation" in names:
            report.ran["no_mutation"] += 1
    return report


def check_law(law: str, gen_fn: GenerativeFunction, args: tuple[Any, ...], *, seed: int = 0,
              **options: Any) -> GFIReport:
    """Check one law (by name, see :data:`LAW_NAMES`) on one argument tuple, with the random
    decisions drawn from ``random.Random(seed)``.  Raises :class:`GFILawError` on failure;
    the returned report says whether the law applied."""
    laws = (law,) if law == "no_mutation" else (law, "no_mutation")
    return check_gfi_example(gen_fn, args, RandomDraw(seed), laws=laws, **options)


def check_gfi(gen_fn: GenerativeFunction, args_strategy: Any, *,
              max_examples: int | None = None, rtol: float = 1e-7, atol: float = 1e-9,
              laws: Iterable[str] | None = None, skip: Iterable[str] = (),
              grad_rtol: float = 1e-4, grad_atol: float = 1e-6, fd_step: float = 1e-6,
              require_vmap: bool = False, batch_size: int = 3,
              shrink: bool = True, derandomize: bool = False,
              max_shrink_seconds: float = 30.0) -> GFIReport:
    """Check the GFI laws on ``gen_fn`` for arguments drawn from ``args_strategy``.

    Args:
        gen_fn: any generative function (a distribution, a ``@gen`` function, a combinator,
            a custom subclass of :class:`gfcomb.GenerativeFunction`).
        args_strategy: a hypothesis strategy of argument tuples (a plain tuple is taken as
            the only argument tuple).
        max_examples: examples to run (default: the active hypothesis profile's).
        rtol: relative tolerance of weight/score/value comparisons.
        atol: absolute tolerance of weight/score/value comparisons.
        laws: the law names to check (default: all of :data:`LAW_NAMES`).
        skip: law names not to check (e.g. ``("generate_empty",)`` for a function with
            untraced randomness, ``("vmap",)`` for one that cannot be batched).
        grad_rtol: relative tolerance of the gradient check.
        grad_atol: absolute tolerance of the gradient check.
        fd_step: the central finite-difference step.
        require_vmap: treat a failure to run under ``torch.func.vmap`` as a violation (by
            default the ``vmap`` law is skipped for such a function).
        batch_size: elements of the batched (vmap) calls.
        shrink: let hypothesis shrink a failing example (slower, smaller counterexample).
        derandomize: draw the examples from a fixed seed (the same examples every run).
        max_shrink_seconds: stop shrinking a failing example after this long (hypothesis'
            own bound is 5 minutes); the error still names the law and shows the smallest
            example found so far.

    Returns:
        A :class:`GFIReport` of the laws that ran and those skipped (with reasons).

    Raises:
        GFILawError: a law failed; the message names the law, the (shrunk) arguments and the
            choice map involved.
    """
    names = resolve_laws(laws, skip)
    strat = args_strategy if isinstance(args_strategy, st.SearchStrategy) \
        else st.just(args_strategy)
    report = GFIReport(gen_fn, names)
    opts: dict[str, Any] = dict(rtol=rtol, atol=atol, grad_rtol=grad_rtol, grad_atol=grad_atol,
                fd_step=fd_step, require_vmap=require_vmap, batch_size=batch_size)
    if set(names) == {"no_mutation"}:
        names = LAW_NAMES  # mutation is checked on the calls of the other laws
    overrides: dict[str, Any] = dict(
        deadline=None, report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much])
    if max_examples is not None:
        overrides["max_examples"] = max_examples
    if derandomize:
        overrides["derandomize"] = True
    if not shrink:
        overrides["phases"] = [Phase.explicit, Phase.reuse, Phase.generate]

    @settings(**overrides)
    @given(data=st.data())
    def run(data: Any) -> None:
        args = data.draw(strat, label="args")
        check_gfi_example(gen_fn, args, HypothesisDraw(data), laws=names, report=report,
                          args_strategy=strat, **opts)

    with _shrink_time_bound(max_shrink_seconds):
        run()
    return report


class _shrink_time_bound:  # noqa: N801 - used like a function: ``with _shrink_time_bound(s):``
    """Bound hypothesis' shrinking time while a check runs (its engine reads the module
    constant ``MAX_SHRINKING_SECONDS`` when shrinking starts; no public setting exists).
    A hypothesis without that constant keeps its own bound."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.old: Any = None
        self.reporting: Any = None

    def __enter__(self) -> None:
        from hypothesis.internal.conjecture import engine
        from hypothesis.reporting import current_reporter, with_reporter

        self.old = getattr(engine, "MAX_SHRINKING_SECONDS", None)
        if self.old is not None:
            engine.MAX_SHRINKING_SECONDS = min(self.old, self.seconds)  # type: ignore[assignment]
        outer = current_reporter()

        def reporter(msg: object) -> None:  # (its note says "five minutes", whatever the bound)
            if "spent more than five minutes working to shrink" not in str(msg):
                outer(msg)

        self.reporting = with_reporter(reporter)
        self.reporting.__enter__()

    def __exit__(self, *exc: object) -> None:
        from hypothesis.internal.conjecture import engine

        self.reporting.__exit__(*exc)
        if self.old is not None:
            engine.MAX_SHRINKING_SECONDS = self.old


__all__ = [
    "GFILawError", "GFIReport", "LAWS", "LAW_NAMES", "LawContext", "LawSkipped", "check_gfi",
    "check_gfi_example", "check_law", "law_generate_empty", "law_generate_full",
    "law_generate_partial", "law_gradients", "law_project", "law_regenerate_empty",
    "law_regenerate_weight", "law_simulate_assess", "law_update_discard", "law_update_noop",
    "law_update_roundtrip", "law_update_weight", "law_vmap", "resolve_laws",
]
