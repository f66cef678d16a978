"""Default gradient methods, built on a differentiable ``assess``.

On one trace, ``choice_gradients`` uses ``torch.func.grad``, so it also runs inside ``vmap``
(per-particle gradients); ``accumulate_param_gradients`` uses ordinary autograd so that
gradients land in the ``.grad`` of the torch parameters that the function uses.

On a *batched* trace (a leading row axis on every leaf, outside any torch.func transform) both
run the rows' ``assess`` once over the batch, with the batch's differentiable leaves as
autograd leaves, and take one ``torch.autograd.grad`` of the sum of the rows' weights: rows
are independent, so the gradient of the sum with respect to row i's leaves is row i's
gradient.  Autograd then records the operations the batched forward ran (one ``mm`` for a
design matrix shared by all rows), not a per-row ``vmap(grad)``.  A shared argument (stored
as expanded rows) is copied to one row each only when its per-row gradient is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from gfcomb.core.batching import inside_functorch_transform
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import PerRow, map_rows

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


def is_row_batch(trace: Trace) -> bool:
    """True if ``trace`` is a batch of traces (a leading row axis: a 1-d score) seen from
    outside any torch.func transform, where the batched gradient methods apply."""
    score = trace.score
    return (isinstance(score, torch.Tensor) and score.dim() == 1
            and not inside_functorch_transform())


class _Split:
    """A trace's choices split for differentiation: the selected choices' leaves (values
    and, riding along, their bool masks), the positions of the differentiable ones, the
    unselected choices, the argument leaves and the positions of the differentiable ones."""

    def __init__(self, trace: Trace, selection: Selection | None, with_args: bool) -> None:
        choices = trace.choices
        if selection is None or selection.is_empty_static():
            selected, self.others = ChoiceMap.empty(), choices
        else:
            selected, self.others = choices.filter(selection), choices.filter(~selection)
        bad = _present_discrete(selected)
        if bad is not None:
            raise TypeError("choice_gradients: the selection includes a discrete choice "
                            f"(dtype {bad}); select continuous choices only")
        self.selected = selected
        self.sel_leaves, self.sel_spec = pytree.tree_flatten(selected)
        self.sel_diff = [i for i, a in enumerate(self.sel_leaves) if _differentiable(a)]
        self.arg_leaves, self.arg_spec = pytree.tree_flatten(trace.args)
        self.arg_diff = ([i for i, a in enumerate(self.arg_leaves) if _differentiable(a)]
                         if with_args else [])

    def args_with(self, vals: list[Any]) -> tuple[Any, ...]:
        """The arguments with the differentiable leaves replaced by ``vals``."""
        leaves = list(self.arg_leaves)
        for i, v in zip(self.arg_diff, vals):
            leaves[i] = v
        return tuple(pytree.tree_unflatten(leaves, self.arg_spec))

    def choices_with(self, vals: list[Any], others: ChoiceMap) -> ChoiceMap:
        """All choices: ``others`` merged with the selected ones, their differentiable
        leaves replaced by ``vals``."""
        leaves = list(self.sel_leaves)
        for i, v in zip(self.sel_diff, vals):
            leaves[i] = v
        return others.merge(pytree.tree_unflatten(leaves, self.sel_spec))

    def results(self, g_args: Any, g_sel: Any) -> tuple[tuple[Any, ...], ChoiceMap, ChoiceMap]:
        """``(arg_grads, choice_values, choice_grads)`` from the gradients of the
        differentiable leaves (None for the arguments that are not differentiated)."""
        out: list[Any] = [None] * len(self.arg_leaves)
        for i, g in zip(self.arg_diff, g_args):
            out[i] = g
        grads = list(self.sel_leaves)
        for i, g in zip(self.sel_diff, g_sel):
            grads[i] = g
        return (_detached(tuple(pytree.tree_unflatten(out, self.arg_spec))),
                _detached(self.selected),
                _detached(pytree.tree_unflatten(grads, self.sel_spec)))


def _shared_rows(x: torch.Tensor, n: int) -> bool:
    """Whether a batch leaf is one row expanded to all (stride 0: a shared argument or
    observation), which a batched forward runs unbatched."""
    return n > 1 and x.dim() > 0 and x.stride(0) == 0


def _one_row_each(x: torch.Tensor, n: int) -> torch.Tensor:
    """A batch leaf as a fresh autograd leaf whose rows are its own: a leaf stored as one row
    expanded to all is copied, since its gradient must be per row, not summed."""
    x = x.detach()
    if _shared_rows(x, n):
        x = x.contiguous()
    return x.requires_grad_(True)


def _per_row(a: Any) -> Any:
    """A batch's argument as a batch-method argument: per row when it holds a tensor."""
    return PerRow(a) if any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(a)) else a


def _rows_assess(gen_fn: GenerativeFunction, n: int, args: tuple[Any, ...],
                 choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
    """The rows' ``assess`` run over the batch: ``(weights [n], retvals)``."""
    return map_rows(lambda c, *a: gen_fn.assess(a, c), n, PerRow(choices),
                    *[_per_row(a) for a in args], who=f"{gen_fn!r}.choice_gradients")


def _rows_objective(gen_fn: GenerativeFunction, split: _Split, n: int, retgrad: Any,
                    arg_vals: list[torch.Tensor], sel_vals: list[torch.Tensor]) -> Any:
    """Σ over rows of [assess weight + retgrad·retval] (call under enable_grad)."""
    weights, retvals = _rows_assess(gen_fn, n, split.args_with(arg_vals),
                                    split.choices_with(sel_vals, _detached(split.others)))
    return weights.sum() + _retval_term(retgrad, retvals)


def grads_or_zeros(objective: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """∂objective/∂input for each input; zeros where the objective does not use one (what
    ``torch.func.grad`` gives).

    Math: grads[i] = ∂objective/∂inputs[i] (reverse mode, one backward pass)."""
    if not inputs:
        return []
    if not isinstance(objective, torch.Tensor) or not objective.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(objective, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _choice_gradients(gen_fn: GenerativeFunction, trace: Trace, selection: Selection | None,
                      retgrad: Any, with_args: bool
                      ) -> tuple[tuple[Any, ...], ChoiceMap, ChoiceMap]:
    """choice_gradients, with (``with_args``) or without the argument gradients."""
    split = _Split(trace, selection, with_args)
    if is_row_batch(trace):
        n = trace.score.shape[0]
        if any(_shared_rows(split.arg_leaves[i], n) for i in split.arg_diff):
            # a shared argument's per-row gradient needs a per-row backward: vmap the rows
            # (copying it to every row for the summed route costs more: a bmm each way)
            return map_rows(lambda t, rg: _choice_gradients(gen_fn, t, selection, rg, True),
                            n, PerRow(trace), None if retgrad is None else PerRow(retgrad),
                            who=f"{gen_fn!r}.choice_gradients")
        arg_vals = [_one_row_each(split.arg_leaves[i], n) for i in split.arg_diff]
        sel_vals = [_one_row_each(split.sel_leaves[i], n) for i in split.sel_diff]
        with torch.enable_grad():
            grads = grads_or_zeros(
                _rows_objective(gen_fn, split, n, retgrad, arg_vals, sel_vals),
                arg_vals + sel_vals)
        k = len(arg_vals)
        return split.results(grads[:k], grads[k:])

    def objective(arg_vals: list[torch.Tensor], sel_vals: list[torch.Tensor]) -> torch.Tensor:
        weight, retval = gen_fn.assess(split.args_with(arg_vals),
                                       split.choices_with(sel_vals, split.others))
        return weight + _retval_term(retgrad, retval)

    arg_vals = [split.arg_leaves[i] for i in split.arg_diff]
    sel_vals = [split.sel_leaves[i] for i in split.sel_diff]
    with torch.no_grad():  # torch.func.grad still differentiates; no outer graph is built
        g_args, g_sel = torch.func.grad(objective, argnums=(0, 1))(arg_vals, sel_vals)
    return split.results(g_args, g_sel)


def choice_gradients(gen_fn: GenerativeFunction, trace: Trace, selection: Selection | None,
                     retgrad: Any) -> tuple[tuple[Any, ...], ChoiceMap, ChoiceMap]:
    """See :meth:`GenerativeFunction.choice_gradients`; on a batched trace every result has
    the row axis (row i's gradients), and ``retgrad`` has the batch's retval layout."""
    return _choice_gradients(gen_fn, trace, selection, retgrad, with_args=True)


def choice_value_gradients(trace: Trace, selection: Selection) -> tuple[ChoiceMap, ChoiceMap]:
    """``(values, ∇ log p)`` of the selected choices of ``trace`` (one trace or a batch),
    without the argument gradients: what gradient-based MCMC needs.

    Math: grads[a] = ∂ log p(t; x) / ∂t[a] for the selected continuous choices a (the
    ``choice_values`` and ``choice_grads`` of ``choice_gradients(trace, selection)``).  A
    generative function with its own ``choice_gradients`` gets it called; for the default
    (built on ``assess``) the argument gradients, which can cost more than the choices'
    (a per-row outer product for a shared design matrix), are not computed.
    """
    gen_fn = trace.gen_fn
    if not has_default_gradients(gen_fn):
        _, values, grads = gen_fn.choice_gradients(trace, selection, None)
        return values, grads
    _, values, grads = _choice_gradients(gen_fn, trace, selection, None, with_args=False)
    return values, grads


def has_default_gradients(gen_fn: GenerativeFunction) -> bool:
    """True when ``gen_fn`` uses the default ``choice_gradients`` (built on ``assess``, this
    module's), so that :func:`batch_gradients_at` computes what it would."""
    from gfcomb.core.gfi import GenerativeFunction  # (gfi imports this module lazily)

    return type(gen_fn).choice_gradients is GenerativeFunction.choice_gradients


def batch_gradients_at(traces: Trace, selection: Selection,
                       values: ChoiceMap) -> tuple[torch.Tensor, ChoiceMap]:
    """Every row's log density and its gradient at new values of the selected choices of a
    batch, without building the moved traces: ``(log p per row, ∇ log p)``, from one
    batched ``assess`` and one backward.  (HMC needs log p's gradient at every leapfrog
    point but a trace only at the last one.)

    ``values`` has the structure of ``traces.choices.filter(selection)`` (as returned by
    :func:`choice_value_gradients`), one value per row; the other choices and the arguments
    are the batch's own.

    Math: row i: w_i = log p(t_i[S ← v_i]; x_i), grads_i = ∂w_i / ∂v_i; rows are
    independent, so grads = ∂(Σ_i w_i)/∂v.  Requires :func:`is_row_batch` and
    :func:`has_default_gradients`.
    """
    if not is_row_batch(traces) or not has_default_gradients(traces.gen_fn):
        raise ArgumentError("batch_gradients_at: needs a batch of traces (a 1-d score, "
                            "outside torch.func transforms) of a generative function with "
                            "the default choice_gradients")
    split = _Split(traces, selection, with_args=False)
    leaves, spec = pytree.tree_flatten(values)
    if spec != split.sel_spec:
        raise ArgumentError("batch_gradients_at: values must have the structure of the "
                            "selected choices of the traces")
    n = traces.score.shape[0]
    sel_vals = [_one_row_each(leaves[i], n) for i in split.sel_diff]
    with torch.enable_grad():
        weights, _ = _rows_assess(traces.gen_fn, n, traces.args,
                                  split.choices_with(sel_vals, _detached(split.others)))
        grads = grads_or_zeros(weights.sum(), sel_vals)
    out = list(leaves)
    for i, g in zip(split.sel_diff, grads):
        out[i] = g.detach()
    return weights.detach(), pytree.tree_unflatten(out, spec)


def accumulate_param_gradients(gen_fn: GenerativeFunction, trace: Trace, retgrad: Any,
                               scale: float) -> tuple[Any, ...]:
    """See :meth:`GenerativeFunction.accumulate_param_gradients`; on a batched trace the
    rows' parameter gradients are summed into ``.grad`` (as if each row were accumulated in
    turn) and the argument gradients have the row axis."""
    split = _Split(trace, None, with_args=True)
    params = [p for p in gen_fn.parameters() if p.requires_grad]
    batch = is_row_batch(trace)
    n = trace.score.shape[0] if batch else 1
    arg_vals = [_one_row_each(split.arg_leaves[i], n) if batch
                else split.arg_leaves[i].detach().requires_grad_(True) for i in split.arg_diff]
    with torch.enable_grad():
        if batch:
            objective = _rows_objective(gen_fn, split, n, retgrad, arg_vals, [])
        else:
            # the choices are data here: a reparameterized sample's graph must not leak in
            weight, retval = gen_fn.assess(split.args_with(arg_vals), _detached(trace.choices))
            objective = weight + _retval_term(retgrad, retval)
        inputs = arg_vals + params
        if not isinstance(objective, torch.Tensor) or not objective.requires_grad or not inputs:
            grads: tuple[Any, ...] = (None,) * len(inputs)
        else:
            grads = torch.autograd.grad(objective, inputs, allow_unused=True)
    k = len(arg_vals)
    for p, g in zip(params, grads[k:]):
        if g is None:
            continue
        g = g * (-scale)
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad = p.grad + g.detach()
    arg_grads, _, _ = split.results(grads[:k], [])
    return arg_grads
