"""Default gradient methods, built on a differentiable ``assess``.

``choice_gradients`` uses ``torch.func.grad`` so it also runs inside ``vmap`` (per-particle
gradients).  ``accumulate_param_gradients`` uses ordinary autograd so that gradients land in
the ``.grad`` of the torch parameters that the function uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from gfcomb.core.batching import inside_functorch_transform
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace

if TYPE_CHECKING:
    from gfcomb.core.gfi import GenerativeFunction


def _retval_term(retgrad: Any, retval: Any) -> torch.Tensor | float:
    if retgrad is None:
        return 0.0
    total: torch.Tensor | float = 0.0
    for g, r in zip(pytree.tree_leaves(retgrad), pytree.tree_leaves(retval)):
        if isinstance(g, torch.Tensor) and isinstance(r, torch.Tensor):
            total = total + (g * r).sum()
    return total


def _detached(tree: Any) -> Any:
    """``tree`` with every tensor leaf detached: gradients and choice values are results,
    not part of an autograd graph (module parameters require grad, so without this they
    would carry ``grad_fn`` and keep the graph alive)."""
    return pytree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def _differentiable(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _present_discrete(cm: ChoiceMap) -> torch.dtype | None:
    """The dtype of a discrete choice present in ``cm``, else None.  A masked-out value (a
    filtered Map element or Switch branch that is not selected) does not count; under vmap a
    masked value cannot be inspected and is let through."""
    if cm.is_value():
        v, m = cm.get_value(), cm.mask
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype != torch.bool:
            if m is None or (not inside_functorch_transform() and bool(m.any())):
                return v.dtype
        return None
    if cm.is_stacked():
        return _present_discrete(cm.stacked_inner)
    for k in cm.keys():
        found = _present_discrete(cm.get_submap(k))
        if found is not None:
            return found
    return None


def choice_gradients(gen_fn: GenerativeFunction, trace: Trace, selection: Selection | None,
                     retgrad: Any) -> tuple[tuple[Any, ...], ChoiceMap, ChoiceMap]:
    """See :meth:`GenerativeFunction.choice_gradients`."""
    choices = trace.choices
    if selection is None or selection.is_empty_static():
        selected = ChoiceMap.empty()
        others = choices
    else:
        selected = choices.filter(selection)
        others = choices.filter(~selection)
    args = trace.args
    arg_leaves, arg_spec = pytree.tree_flatten(args)
    arg_diff = [i for i, a in enumerate(arg_leaves) if _differentiable(a)]
    sel_leaves, sel_spec = pytree.tree_flatten(selected)
    # masks (bool tensors) ride along in the flattened selection; only values are differentiated
    sel_diff = [i for i, a in enumerate(sel_leaves) if _differentiable(a)]
    bad = _present_discrete(selected)
    if bad is not None:
        raise TypeError("choice_gradients: the selection includes a discrete choice "
                        f"(dtype {bad}); select continuous choices only")

    def objective(arg_vals: list[torch.Tensor], sel_vals: list[torch.Tensor]) -> torch.Tensor:
        a_leaves = list(arg_leaves)
        for i, v in zip(arg_diff, arg_vals):
            a_leaves[i] = v
        s_leaves = list(sel_leaves)
        for i, v in zip(sel_diff, sel_vals):
            s_leaves[i] = v
        new_args = pytree.tree_unflatten(a_leaves, arg_spec)
        new_sel = pytree.tree_unflatten(s_leaves, sel_spec)
        weight, retval = gen_fn.assess(tuple(new_args), others.merge(new_sel))
        return weight + _retval_term(retgrad, retval)

    arg_vals = [arg_leaves[i] for i in arg_diff]
    sel_vals = [sel_leaves[i] for i in sel_diff]
    with torch.no_grad():  # torch.func.grad still differentiates; no outer graph is built
        g_args, g_sel = torch.func.grad(objective, argnums=(0, 1))(arg_vals, sel_vals)
    out_arg_leaves: list[Any] = [None] * len(arg_leaves)
    for i, g in zip(arg_diff, g_args):
        out_arg_leaves[i] = g
    arg_grads = tuple(pytree.tree_unflatten(out_arg_leaves, arg_spec))
    grad_leaves = list(sel_leaves)
    for i, g in zip(sel_diff, g_sel):
        grad_leaves[i] = g
    choice_grads = pytree.tree_unflatten(grad_leaves, sel_spec)
    return _detached(arg_grads), _detached(selected), _detached(choice_grads)


def accumulate_param_gradients(gen_fn: GenerativeFunction, trace: Trace, retgrad: Any,
                               scale: float) -> tuple[Any, ...]:
    """See :meth:`GenerativeFunction.accumulate_param_gradients`."""
    arg_leaves, arg_spec = pytree.tree_flatten(trace.args)
    arg_diff = [i for i, a in enumerate(arg_leaves) if _differentiable(a)]
    leaves = list(arg_leaves)
    for i in arg_diff:
        leaves[i] = arg_leaves[i].detach().requires_grad_(True)
    args = tuple(pytree.tree_unflatten(leaves, arg_spec))
    params = [p for p in gen_fn.parameters() if p.requires_grad]
    with torch.enable_grad():
        # the choices are data here: a reparameterized sample's autograd graph must not leak in
        choices = pytree.tree_map(
            lambda x: x.detach() if isinstance(x, torch.Tensor) else x, trace.choices)
        weight, retval = gen_fn.assess(args, choices)
        objective = weight + _retval_term(retgrad, retval)
        inputs = [leaves[i] for i in arg_diff] + params
        if not isinstance(objective, torch.Tensor) or not objective.requires_grad or not inputs:
            grads: tuple[Any, ...] = (None,) * len(inputs)
        else:
            grads = torch.autograd.grad(objective, inputs, allow_unused=True)
    n = len(arg_diff)
    for p, g in zip(params, grads[n:]):
        if g is None:
            continue
        g = g * (-scale)
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad = p.grad + g.detach()
    out: list[Any] = [None] * len(arg_leaves)
    for i, g in zip(arg_diff, grads[:n]):
        out[i] = g
    return tuple(pytree.tree_unflatten(out, arg_spec))
