"""The laws of ``simulate``, ``assess`` and ``generate``."""

from __future__ import annotations

import torch

from gfcomb.core.choicemap import ChoiceMap, short_repr
from gfcomb.core.errors import UnvisitedConstraintError
from gfcomb.testing.laws.context import LawContext, num, select_addrs
from gfcomb.testing.laws.report import LawSkipped
from gfcomb.testing.strategies import choice_dict, draw_constraints


def law_simulate_assess(ctx: LawContext) -> None:
    """``assess(x, t.choices) == (t.score, t.retval)`` for ``t ~ simulate(x)``."""
    tr = ctx.trace
    w, r = ctx.call("assess", ctx.args, tr.choices)
    if not ctx.close(w, tr.score):
        raise ctx.fail(f"assess weight {num(w)} != simulate score {num(tr.score)}",
                       tr.choices)
    if not ctx.same_tree(r, tr.retval):
        raise ctx.fail(f"assess retval {short_repr(r)} != simulate retval {short_repr(tr.retval)}",
                       tr.choices)


def law_generate_full(ctx: LawContext) -> None:
    """``generate`` with all choices constrained: weight == score == simulate's score."""
    tr = ctx.trace
    new, w = ctx.call("generate", ctx.args, tr.choices)
    if not ctx.close(w, tr.score):
        raise ctx.fail(f"generate with all choices: weight {num(w)} != score "
                       f"{num(tr.score)}", tr.choices)
    if not ctx.close(new.score, tr.score):
        raise ctx.fail(f"generate with all choices: trace score {num(new.score)} != "
                       f"{num(tr.score)}", tr.choices)
    why = ctx.choice_diff(new.choices, tr.choices)
    if why:
        raise ctx.fail(f"generate with all choices changed the choices: {why}", tr.choices)
    if not ctx.same_tree(new.retval, tr.retval):
        raise ctx.fail(f"generate with all choices: retval {short_repr(new.retval)} != "
                       f"{short_repr(tr.retval)}", tr.choices)


def law_generate_empty(ctx: LawContext) -> None:
    """``generate`` without constraints: weight == 0."""
    new, w = ctx.call("generate", ctx.args, ChoiceMap.empty())
    if not ctx.close(w, 0.0):
        raise ctx.fail(f"generate without constraints: weight {num(w)} != 0", new.choices)


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
    p = ctx.call("project", new, select_addrs(choice_dict(c)))
    if not ctx.close(w, p):
        raise ctx.fail(f"generate weight {num(w)} != project(trace, constrained selection) "
                       f"{num(p)} (difference {num(torch.as_tensor(w) - p)})", c,
                       trace_choices=new.choices)
