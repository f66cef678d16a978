"""The laws under torch.func transforms: gradients against finite differences, and vmap."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from gfcomb.core.choicemap import ChoiceMap, short_repr
from gfcomb.core.errors import GFIError
from gfcomb.core.pytree import tree_index, tree_stack
from gfcomb.testing.laws.context import LawContext, num, select_addrs
from gfcomb.testing.laws.report import GFILawError, LawSkipped
from gfcomb.testing.strategies import Address, choice_dict


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
    sel = select_addrs(cont)
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
                           f"{num(w_b[i])} != per-element {num(w_i)}", cm)
        if not ctx.close(row.score, tr_i.score):
            raise ctx.fail(f"vmapped generate (over {mode}) element {i}: score "
                           f"{num(row.score)} != per-element {num(tr_i.score)}", cm)
        if not ctx.same_tree(row.retval, tr_i.retval):
            raise ctx.fail(f"vmapped generate (over {mode}) element {i}: retval "
                           f"{short_repr(row.retval)} != per-element {short_repr(tr_i.retval)}", cm)
        why = ctx.choice_diff(row.choices, tr_i.choices)
        if why:
            raise ctx.fail(f"vmapped generate (over {mode}) element {i}: choices differ: "
                           f"{why}", cm)
        wa_i, r_i = ctx.call("assess", a, cm)
        if not ctx.close(tree_index(wa_b, i), wa_i) or not ctx.same_tree(tree_index(r_b, i), r_i):
            raise ctx.fail(f"vmapped assess (over {mode}) element {i}: weight "
                           f"{num(wa_b[i])} != per-element {num(wa_i)} (or retvals differ)",
                           cm)
        srow = tree_index(sim_b, i)
        ws, _ = ctx.call("assess", a, srow.choices)
        if not ctx.close(srow.score, ws):
            raise ctx.fail(f"vmapped simulate element {i}: score {num(srow.score)} != "
                           f"assess of its choices {num(ws)}", srow.choices)
