"""The laws of ``regenerate`` and ``project``."""

from __future__ import annotations

import torch

from gfcomb.core.choicemap import short_repr
from gfcomb.core.errors import GFIError
from gfcomb.core.selection import Selection
from gfcomb.testing.laws.context import LawContext, nochange, num, select_addrs, unknown
from gfcomb.testing.laws.report import LawSkipped, show_args
from gfcomb.testing.strategies import choice_dict, draw_selection, draw_subset


def law_regenerate_empty(ctx: LawContext) -> None:
    """regenerate with an empty selection: weight 0, same choices."""
    tr = ctx.trace
    new, w, _ = ctx.call("regenerate", tr, ctx.args, nochange(ctx.args), Selection.none())
    if not ctx.close(w, 0.0):
        raise ctx.fail(f"regenerate with an empty selection: weight {num(w)} != 0",
                       tr.choices)
    why = ctx.choice_diff(new.choices, tr.choices)
    if why:
        raise ctx.fail(f"regenerate with an empty selection changed the choices: {why}",
                       tr.choices)


def law_regenerate_weight(ctx: LawContext) -> None:
    """weight == project(t', R) − project(t, R), R = retained unselected choices."""
    tr = ctx.trace
    sel, inside = draw_selection(ctx.draw, tr, "regenerate selection")
    new_args, diffs = ctx.args, nochange(ctx.args)
    if ctx.alt_args is not None and ctx.draw.boolean(label="regenerate: change the arguments"):
        new_args, diffs = ctx.alt_args, unknown(ctx.alt_args)
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
    r = select_addrs(retained)
    expect = (ctx.call("project", new, r) - ctx.call("project", tr, r)) if retained else 0.0
    if not ctx.close(w, expect):
        raise ctx.fail(f"regenerate weight {num(w)} != project(new, unselected) - "
                       f"project(old, unselected) = {num(expect)} (difference "
                       f"{num(torch.as_tensor(w) - expect)})", tr.choices, selection=sel,
                       new_args=show_args(new_args), new_choices=new.choices)


def law_project(ctx: LawContext) -> None:
    """project(all) == score, project(none) == 0, additive over disjoint selections."""
    tr = ctx.trace
    p_all = ctx.call("project", tr, Selection.all())
    if not ctx.close(p_all, tr.score):
        raise ctx.fail(f"project(selectall) = {num(p_all)} != score {num(tr.score)}",
                       tr.choices)
    p_none = ctx.call("project", tr, Selection.none())
    if not ctx.close(p_none, 0.0):
        raise ctx.fail(f"project(empty selection) = {num(p_none)} != 0", tr.choices)
    addrs = list(choice_dict(tr.choices))
    first = draw_subset(ctx.draw, addrs, "project first part")
    rest = [a for a in addrs if a not in set(first)]
    second = draw_subset(ctx.draw, rest, "project second part")
    s1, s2 = select_addrs(first), select_addrs(second)
    p1, p2 = ctx.call("project", tr, s1), ctx.call("project", tr, s2)
    p12 = ctx.call("project", tr, s1 | s2)
    if not ctx.close(p12, p1 + p2):
        raise ctx.fail(f"project is not additive: project(S1 | S2) = {num(p12)} but "
                       f"project(S1) + project(S2) = {num(p1)} + {num(p2)}", tr.choices,
                       S1=first[:8], S2=second[:8])
    sel, _ = draw_selection(ctx.draw, tr, "project selection")
    ps, pc = ctx.call("project", tr, sel), ctx.call("project", tr, ~sel)
    if not ctx.close(ps + pc, tr.score):
        raise ctx.fail(f"project(S) + project(~S) = {num(ps)} + {num(pc)} != score "
                       f"{num(tr.score)}", tr.choices, selection=sel)
