"""The laws of ``update``."""

from __future__ import annotations

from typing import Any

import torch

from gfcomb.core.choicemap import ChoiceMap, short_repr
from gfcomb.core.diff import NoChange
from gfcomb.core.errors import GFIError, UnvisitedConstraintError
from gfcomb.core.trace import Trace
from gfcomb.testing.laws.context import LawContext, nochange, num, select_addrs, unknown
from gfcomb.testing.laws.report import LawSkipped, show_args
from gfcomb.testing.strategies import Address, choice_dict, draw_constraints


def law_update_noop(ctx: LawContext) -> None:
    """``update`` with no change: weight 0, same choices and score, empty discard."""
    tr = ctx.trace
    new, w, _, d = ctx.call("update", tr, ctx.args, nochange(ctx.args), ChoiceMap.empty())
    if not ctx.close(w, 0.0):
        raise ctx.fail(f"update with no change: weight {num(w)} != 0", tr.choices)
    why = ctx.choice_diff(new.choices, tr.choices)
    if why:
        raise ctx.fail(f"update with no change changed the choices: {why}", tr.choices)
    if not ctx.close(new.score, tr.score):
        raise ctx.fail(f"update with no change: score {num(new.score)} != {num(tr.score)}",
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
    diffs = nochange(ctx.args)
    if ctx.alt_args is not None and ctx.draw.boolean(label=f"{label}: change the arguments"):
        new_args, diffs = ctx.alt_args, unknown(ctx.alt_args)
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
    q = ctx.call("project", new, select_addrs(fresh)) if fresh else 0.0
    expect = new.score - tr.score - q
    if not ctx.close(w, expect):
        what = ("new score - old score - log q(fresh)" if fresh else "new score - old score")
        raise ctx.fail(f"update weight {num(w)} != {what} = {num(expect)} (difference "
                       f"{num(torch.as_tensor(w) - expect)}); fresh choices: {fresh[:5]}",
                       c, new_args=show_args(new_args), old_choices=tr.choices,
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
                       new_args=show_args(new_args))
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
    back_diffs = nochange(ctx.args) if all(isinstance(x, NoChange) for x in diffs) \
        else unknown(ctx.args)
    back, w2, _, _ = ctx.call("update", new, ctx.args, back_diffs, d)
    why = ctx.choice_diff(back.choices, tr.choices)
    if why:
        raise ctx.fail(f"update(update(t, c), discard) did not restore the choices: {why}",
                       c, discard=d, old_choices=tr.choices, new_args=show_args(new_args))
    if not ctx.close(back.score, tr.score):
        raise ctx.fail(f"update(update(t, c), discard) did not restore the score: "
                       f"{num(back.score)} != {num(tr.score)}", c, discard=d)
    fresh, _ = _fresh_and_removed(tr, new, c)
    q = ctx.call("project", new, select_addrs(fresh)) if fresh else 0.0
    if not ctx.close(torch.as_tensor(w) + w2, -torch.as_tensor(q)):
        raise ctx.fail(f"update(update(t, c), discard) did not negate the weight: first "
                       f"{num(w)}, back {num(w2)}, log q(fresh) {num(q)}", c, discard=d,
                       old_choices=tr.choices, new_args=show_args(new_args))
