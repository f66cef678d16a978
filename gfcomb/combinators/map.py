"""Map: apply a kernel generative function to every element of its mapped arguments.

``Map(kernel, in_dims=0)(*args)`` calls ``kernel(*args_i)`` for i = 0..n-1, where mapped
arguments (``in_dims`` as in ``torch.func.vmap``; ``None`` = shared) are sliced along their
mapped dimension.  Element i's choices live under key ``i``; the return value is the stacked
kernel return values.  All kernel calls run as ONE ``torch.func.vmap`` call (torch modules
inside the kernel see the whole batch); the trace holds one batched kernel trace.

Math: log p(t; x) = Σ_i log p_kernel(t_i; x_i), the elements being independent given x.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from gfcomb.combinators.vector import (
    VectorTrace,
    batched_call,
    changed_elements,
    constrained_elements,
    index_tensor,
    mapped_length,
    normalize_in_dims,
    require_dense,
    select_elements,
    stack_constraints,
)
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange, VectorDiff
from gfcomb.core.gfi import GenerativeFunction, as_choicemap, check_args_tuple
from gfcomb.core.pytree import tree_index, tree_scatter
from gfcomb.core.selection import MaskSelection, Selection, element_selections
from gfcomb.core.selection import selection_flags_for_vector as element_flags
from gfcomb.core.trace import Trace


def _cat(a: Any, b: Any) -> Any:
    from gfcomb.core.pytree import tree_map2_tensors

    return tree_map2_tensors(lambda x, y: torch.cat([x, y.to(x.dtype)], 0), a, b)


class Map(GenerativeFunction):
    """Map a kernel over the elements of its arguments (see the module docstring).

    ``vectorize=False`` runs the kernel element by element in Python instead of under vmap
    (for kernels with data-dependent control flow); results have the same layout.
    """

    def __init__(self, kernel: GenerativeFunction, in_dims: Any = 0, *,
                 vectorize: bool = True) -> None:
        if not isinstance(kernel, GenerativeFunction):
            raise TypeError(f"Map needs a generative function kernel, got {kernel!r}")
        self.kernel = kernel
        self.in_dims = in_dims
        self.vectorize = vectorize

    def __repr__(self) -> str:
        return f"Map({self.kernel!r})"

    def _key(self) -> tuple[Any, ...]:
        return (Map, self.kernel, self.in_dims, self.vectorize)

    def __eq__(self, other: object) -> bool:
        # Map(kernel) is often built inside a @gen body: equal parts, same function
        return isinstance(other, Map) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # ------------------------------------------------------------------ helpers
    def _dims(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return normalize_in_dims(self.in_dims, len(args), "Map")

    def _run(self, fn: Any, in_dims: tuple[Any, ...], n: int) -> Any:
        return batched_call(fn, in_dims, vectorize=self.vectorize, length=n, who=repr(self))

    def _trace(self, args: tuple[Any, ...], inner: Trace, n: int) -> VectorTrace:
        return VectorTrace(self, args, inner.retval, inner.score.sum(0), inner, n)

    def _simulate_inner(self, args: tuple[Any, ...], dims: tuple[Any, ...], n: int) -> Trace:
        return self._run(lambda *a: self.kernel.simulate(a), dims, n)(*args)

    def _generate_inner(self, args: tuple[Any, ...], dims: tuple[Any, ...], n: int,
                        cm: ChoiceMap, keys: list[int]) -> tuple[Trace, torch.Tensor]:
        """Generate elements ``keys`` (0..n-1 of ``args``) with constraints ``cm``."""
        stacked = stack_constraints(cm, keys)
        return self._run(lambda c, *a: self.kernel.generate(a, c), (0,) + dims, n)(
            stacked, *args)

    # ------------------------------------------------------------------ the GFI
    def simulate(self, args: tuple[Any, ...]) -> VectorTrace:
        """Math: t_i ~ p_kernel(·; x_i) independently; score = Σ_i score_i."""
        args = check_args_tuple(args)
        dims = self._dims(args)
        n = mapped_length(args, dims, repr(self))
        return self._trace(args, self._simulate_inner(args, dims, n), n)

    def generate(self, args: tuple[Any, ...], constraints: ChoiceMap | None = None,
                 ) -> tuple[VectorTrace, torch.Tensor]:
        """Math: weight = Σ_i generate weight of element i (0 for unconstrained elements)."""
        args = check_args_tuple(args)
        dims = self._dims(args)
        n = mapped_length(args, dims, repr(self))
        cm = as_choicemap(constraints)
        constrained_elements(cm, n, "generate")
        if cm.is_empty():
            tr = self.simulate(args)
            return tr, torch.zeros_like(tr.score)
        inner, w = self._generate_inner(args, dims, n, cm, list(range(n)))
        return self._trace(args, inner, n), w.sum(0)

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
        """Math: weight = Σ_i log p_kernel(t_i; x_i); every element's choices must be given."""
        args = check_args_tuple(args)
        dims = self._dims(args)
        n = mapped_length(args, dims, repr(self))
        cm = as_choicemap(choices)
        constrained_elements(cm, n, "assess")
        keys = list(range(n))
        stacked = stack_constraints(cm, keys)
        require_dense(stacked, keys, "assess")
        w, retval = self._run(lambda c, *a: self.kernel.assess(a, c), (0,) + dims, n)(
            stacked, *args)
        return w.sum(0), retval

    def update(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
               constraints: ChoiceMap | None = None,
               ) -> tuple[VectorTrace, torch.Tensor, Diff, ChoiceMap]:
        """Revisit only the changed, constrained, new and removed elements.

        Math: weight = Σ_{revisited i} kernel update weight_i + Σ_{new i} generate weight_i
        − Σ_{removed i} score_i.  discard = the revisited elements' discards and the removed
        elements' choices.  retdiff = VectorDiff(n', n, revisited).
        """
        assert isinstance(trace, VectorTrace)
        args = check_args_tuple(args)
        dims = self._dims(args)
        n_new = mapped_length(args, dims, repr(self))
        n_old = trace.length
        cm = as_choicemap(constraints)
        ckeys = constrained_elements(cm, n_new, "update")
        all_changed, changed = changed_elements(argdiffs, dims, n_old)
        keep = min(n_old, n_new)
        revisit = sorted((changed | {k for k in ckeys if k < keep}) & set(range(keep)))
        if not revisit and n_new == n_old:
            return trace, torch.zeros_like(trace.score), NoChange(), ChoiceMap.empty()
        inner = trace.inner
        weight = torch.zeros_like(trace.score)
        discard = ChoiceMap.empty()
        if n_new < n_old:  # shrink: drop the tail
            tail = index_tensor(range(n_new, n_old), trace.score)
            removed = tree_index(inner, tail)
            weight = weight - removed.score.sum(0)
            discard = ChoiceMap.stacked(removed.choices, n_old - n_new,
                                        tuple(range(n_new, n_old)))
            inner = tree_index(inner, torch.arange(n_new, device=tail.device))
        if revisit:
            idx = index_tensor(revisit, trace.score)
            old_sub = tree_index(inner, idx)
            sub_args = select_elements(args, dims, idx)
            el_diffs = tuple(UnknownChange() if not isinstance(d, NoChange) else d
                             for d in argdiffs)
            sub_cm = stack_constraints(cm, revisit)
            new_sub, w, _, d = self._run(
                lambda tr, c, *a: self.kernel.update(tr, a, el_diffs, c),
                (0, 0) + dims, len(revisit))(old_sub, sub_cm, *sub_args)
            weight = weight + w.sum(0)
            inner = tree_scatter(inner, idx, new_sub)
            if not d.is_empty():
                discard = discard.merge(ChoiceMap.stacked(d, len(revisit), tuple(revisit)))
        if n_new > n_old:  # grow: generate the new elements
            new_keys = list(range(n_old, n_new))
            idx = index_tensor(new_keys, trace.score)
            sub_args = select_elements(args, dims, idx)
            sub_cm = _shift_keys(cm, new_keys)
            if sub_cm.is_empty():
                grown = self._simulate_inner(sub_args, dims, len(new_keys))
            else:
                grown, w = self._generate_inner(sub_args, dims, len(new_keys), sub_cm,
                                                list(range(len(new_keys))))
                weight = weight + w.sum(0)
            inner = _cat(inner, grown) if n_old > 0 else grown
        new_trace = VectorTrace(self, args, inner.retval, inner.score.sum(0), inner, n_new)
        retdiff = VectorDiff(n_new, n_old, revisit) if not all_changed else UnknownChange()
        return new_trace, weight, retdiff, discard

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[VectorTrace, torch.Tensor, Diff]:
        """Regenerate the selected choices of each element.

        Math: weight = Σ_{revisited i} kernel regenerate weight_i; new elements are
        simulated and removed ones dropped, contributing 0.
        """
        assert isinstance(trace, VectorTrace)
        args = check_args_tuple(args)
        dims = self._dims(args)
        n_new = mapped_length(args, dims, repr(self))
        n_old = trace.length
        all_changed, changed = changed_elements(argdiffs, dims, n_old)
        keep = min(n_old, n_new)
        default, special = element_selections(selection, range(keep))
        if not default.is_empty_static() or isinstance(selection, MaskSelection):
            revisit = list(range(keep))
        else:
            revisit = sorted((changed | {k for k, s in special.items()
                                         if not s.is_empty_static()}) & set(range(keep)))
        if not revisit and n_new == n_old:
            return trace, torch.zeros_like(trace.score), NoChange()
        inner = trace.inner
        weight = torch.zeros_like(trace.score)
        if n_new < n_old:
            inner = tree_index(inner, torch.arange(n_new, device=trace.score.device))
        if revisit:
            idx = index_tensor(revisit, trace.score)
            old_sub = tree_index(inner, idx)
            sub_args = select_elements(args, dims, idx)
            el_diffs = tuple(UnknownChange() if not isinstance(d, NoChange) else d
                             for d in argdiffs)
            sel = element_flags(selection, revisit, old_sub.choices)
            if isinstance(sel, MaskSelection):
                fn = lambda tr, s, *a: self.kernel.regenerate(tr, a, el_diffs, s)  # noqa: E731
                new_sub, w, _ = self._run(fn, (0, 0) + dims, len(revisit))(old_sub, sel, *sub_args)
            else:
                fn = lambda tr, *a: self.kernel.regenerate(tr, a, el_diffs, sel)  # noqa: E731
                new_sub, w, _ = self._run(fn, (0,) + dims, len(revisit))(old_sub, *sub_args)
            weight = weight + w.sum(0)
            inner = tree_scatter(inner, idx, new_sub)
        if n_new > n_old:
            idx = index_tensor(range(n_old, n_new), trace.score)
            grown = self._simulate_inner(select_elements(args, dims, idx), dims, n_new - n_old)
            inner = _cat(inner, grown) if n_old > 0 else grown
        new_trace = VectorTrace(self, args, inner.retval, inner.score.sum(0), inner, n_new)
        retdiff = VectorDiff(n_new, n_old, revisit) if not all_changed else UnknownChange()
        return new_trace, weight, retdiff

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Math: project(t, S) = Σ_i kernel project(t_i, S[i])."""
        assert isinstance(trace, VectorTrace)
        if selection.is_all_static():
            return trace.score
        if selection.is_empty_static() or trace.length == 0:
            return torch.zeros_like(trace.score)
        keys = list(range(trace.length))
        sel = element_flags(selection, keys, trace.inner.choices)
        if isinstance(sel, MaskSelection):
            w = self._run(lambda tr, s: self.kernel.project(tr, s), (0, 0), trace.length)(
                trace.inner, sel)
        else:
            w = self._run(lambda tr: self.kernel.project(tr, sel), (0,), trace.length)(
                trace.inner)
        return w.sum(0)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The kernel's parameters."""
        return self.kernel.parameters()


def _shift_keys(cm: ChoiceMap, keys: list[int]) -> ChoiceMap:
    """Constraints of elements ``keys`` re-keyed 0..len(keys)-1."""
    if cm.is_empty():
        return cm
    return ChoiceMap.node({j: cm.get_submap(k) for j, k in enumerate(keys)})
