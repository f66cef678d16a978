"""The law of the batch protocol (DESIGN §7): a function's batch methods equal its per-row
methods, row by row.

The rows are independent traces of ``simulate(x)`` of one choice structure.  The edits
compared with the per-row calls are deterministic -- every choice constrained, or nothing
selected -- so each row of the batch result matches the per-row call to float64 round-off:
weights, scores, choices, return values.  An edit to other arguments that makes new choices
appear (drawn afresh, differently by the batch and the loop) is left out.  A regenerate of a
drawn selection draws afresh too: each of its rows is checked against regenerate's own
identity instead (unselected choices kept, the weight their score change).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from gfcomb.core.choicemap import ChoiceMap, short_repr
from gfcomb.core.errors import GFIError, VmapError
from gfcomb.core.pytree import tree_index, tree_stack
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import PerRow
from gfcomb.testing.laws.context import LawContext, nochange, num, select_addrs, unknown
from gfcomb.testing.laws.report import LawSkipped
from gfcomb.testing.strategies import choice_dict, draw_selection


def law_batch(ctx: LawContext) -> None:
    """``batch_generate`` (every choice constrained), ``batch_update`` (to other arguments,
    every choice constrained to its row's value), ``batch_regenerate`` (nothing selected)
    and ``batch_select`` equal the per-row methods row by row; ``batch_regenerate`` of a
    drawn selection keeps every row's unselected choices, with regenerate's weight identity
    (the score change of the retained unselected choices) per row."""
    rows = [ctx.trace] + [ctx.call("simulate", ctx.args) for _ in range(ctx.batch_size - 1)]
    spec = pytree.tree_structure(rows[0].choices)
    rows = [t for t in rows if pytree.tree_structure(t.choices) == spec]
    if len(rows) < 2:
        raise LawSkipped("the rows have different choice structures")
    n = len(rows)
    cms = [t.choices for t in rows]
    try:
        stacked = tree_stack(cms)
    except ValueError as err:
        raise LawSkipped("the rows' choices cannot be stacked") from err
    args = ctx.args
    try:  # (the default batch methods run the per-row ones under vmap)
        batch, w = ctx.call("batch_generate", n, args, PerRow(stacked), allow=(VmapError,))
    except VmapError as err:
        if ctx.require_vmap:
            raise ctx.fail(f"the batch methods cannot run: {err}", cms[0]) from err
        raise LawSkipped("cannot run under vmap (the default batch methods)") from err
    singles = [ctx.call("generate", args, cm) for cm in cms]
    _same_rows(ctx, "batch_generate (every choice constrained)", batch, w,
               [t for t, _ in singles], [wi for _, wi in singles], cms)

    new_args = ctx.alt_args if ctx.alt_args is not None else args
    diffs = unknown(new_args)
    try:
        edited = [ctx.call("update", t, new_args, diffs, cm, allow=(GFIError,))
                  for (t, _), cm in zip(singles, cms)]
    except GFIError:
        edited = None  # (the other arguments do not fit these traces)
    if edited is not None and all(pytree.tree_structure(e[0].choices) == spec
                                  for e in edited):
        new, w, _, _ = ctx.call("batch_update", batch, new_args, diffs, PerRow(stacked))
        _same_rows(ctx, "batch_update (other arguments, every choice constrained)", new, w,
                   [e[0] for e in edited], [e[1] for e in edited], cms)

    new, w, _ = ctx.call("batch_regenerate", batch, args, nochange(args), Selection.none())
    again = [ctx.call("regenerate", t, args, nochange(args), Selection.none())
             for t, _ in singles]
    _same_rows(ctx, "batch_regenerate (nothing selected)", new, w, [r[0] for r in again],
               [r[1] for r in again], cms)

    sel, inside = draw_selection(ctx.draw, ctx.trace, "batch_regenerate selection")
    new, w, _ = ctx.call("batch_regenerate", batch, args, nochange(args), sel)
    for i, (old, _) in enumerate(singles):  # (the draws differ: regenerate's identity per row)
        row = tree_index(new, i)
        do, dn = choice_dict(old.choices), choice_dict(row.choices)
        retained = [a for a in do if a in dn and not inside(a)]
        for a in retained:
            if not ctx.close(dn[a], do[a]):
                raise ctx.fail(f"batch_regenerate: row {i} changed the unselected choice at "
                               f"{a}", cms[i], selection=sel)
        r = select_addrs(retained)
        expect = (ctx.call("project", row, r) - ctx.call("project", old, r)) if retained \
            else 0.0
        if not ctx.close(w[i], expect):
            raise ctx.fail(f"batch_regenerate: row {i}'s weight {num(w[i])} != project(new, "
                           f"unselected) - project(old, unselected) = {num(expect)}", cms[i],
                           selection=sel)

    order = torch.arange(n - 1, -1, -1)
    picked = ctx.call("batch_select", batch, order)
    for k, i in enumerate(order.tolist()):
        why = ctx.choice_diff(tree_index(picked, k).choices, cms[i])
        if why or not ctx.close(picked.score[k], batch.score[i]):
            raise ctx.fail(f"batch_select: row {k} is not row {i} of the batch "
                           f"({why or 'the scores differ'})", cms[i])


def _same_rows(ctx: LawContext, what: str, batch: Trace, weights: Any,
               singles: list[Trace], single_weights: list[Any], cms: list[ChoiceMap]) -> None:
    """Row i of ``batch`` (and of ``weights``) is ``singles[i]`` (and its weight)."""
    weights = torch.as_tensor(weights)
    if weights.dim() == 0:
        weights = weights.expand(len(singles))
    for i, (single, w) in enumerate(zip(singles, single_weights)):
        row = tree_index(batch, i)
        if not ctx.close(weights[i], w):
            raise ctx.fail(f"{what}: row {i}'s weight {num(weights[i])} != the per-row "
                           f"call's {num(w)}", cms[i])
        if not ctx.close(row.score, single.score):
            raise ctx.fail(f"{what}: row {i}'s score {num(row.score)} != the per-row "
                           f"call's {num(single.score)}", cms[i])
        why = ctx.choice_diff(row.choices, single.choices)
        if why:
            raise ctx.fail(f"{what}: row {i}'s choices differ from the per-row call's: {why}",
                           cms[i])
        if not ctx.same_tree(row.retval, single.retval):
            raise ctx.fail(f"{what}: row {i}'s return value {short_repr(row.retval)} != the "
                           f"per-row call's {short_repr(single.retval)}", cms[i])
