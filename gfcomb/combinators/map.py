"""Map: apply a kernel generative function to every element of its mapped arguments.

``Map(kernel, in_dims=0)(*args)`` calls ``kernel(*args_i)`` for i = 0..n-1, where mapped
arguments (``in_dims`` as in ``torch.func.vmap``; ``None`` = shared) are sliced along their
mapped dimension.  Element i's choices live under key ``i``; the return value is the stacked
kernel return values.  All kernel calls run as ONE ``torch.func.vmap`` call (torch modules
inside the kernel see the whole batch); the trace holds one batched kernel trace.

A kernel with a batch method of its own that runs over the whole batch
(:meth:`~gfcomb.core.gfi.GenerativeFunction.batch_runs_whole`: an ``Unfold``'s batch edit, a
``@gen`` body run once over the batch, a distribution with scalar parameters) is called
through it instead, with the elements as the rows (:meth:`Map._batch_call`); otherwise the
kernel runs per element under the vmap.  Same results (the batch methods' contract: row i
equals the per-row method).

Math: log p(t; x) = Σ_i log p_kernel(t_i; x_i), the elements being independent given x.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gfcomb.combinators.edit import Constrain, Edit, Resample
from gfcomb.combinators.parts import Combinator, gen_fn_part
from gfcomb.combinators.vector import (
    VectorTrace,
    changed_elements,
    concat_elements,
    constrained_elements,
    has_masks,
    index_tensor,
    mapped_length,
    normalize_in_dims,
    require_given,
    select_elements,
    stack_constraints,
)
from gfcomb.core.batching import inside_functorch_transform
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange, VectorDiff
from gfcomb.core.errors import AddressError
from gfcomb.core.gfi import (
    GenerativeFunction,
    as_choicemap,
    check_argdiffs,
    check_args_tuple,
    zero_weight,
)
from gfcomb.core.harmonize import harmonize
from gfcomb.core.pytree import tree_index, tree_map_tensors, tree_scatter
from gfcomb.core.selection import Selection, has_mask_flags
from gfcomb.core.selection import selection_flags_for_vector as element_flags
from gfcomb.core.trace import Trace
from gfcomb.core.validation import check_selection, check_vmapped_scores
from gfcomb.core.vmap import PerRow, batched_call


class Map(Combinator):
    """Map a kernel over the elements of its arguments (see the module docstring).

    ``vectorize=False`` runs the kernel element by element in Python instead of under vmap
    (for kernels with data-dependent control flow); results have the same layout.
    """

    def __init__(self, kernel: GenerativeFunction, in_dims: Any = 0, *,
                 vectorize: bool = True) -> None:
        self.kernel = gen_fn_part(kernel, "Map", "kernel")
        self.in_dims = in_dims
        self.vectorize = vectorize

    def parts(self) -> tuple[Any, ...]:
        """The kernel, ``in_dims`` and ``vectorize``."""
        return (Map, self.kernel, self.in_dims, self.vectorize)

    # ------------------------------------------------------------------ helpers
    def _who(self) -> str:
        """``repr(self)``, for error messages: built once (every call names the Map to the
        vmap layer, ~10 µs a time for a nested combinator)."""
        name = self.__dict__.get("_name")
        if name is None:
            name = self.__dict__["_name"] = repr(self)
        return name

    def _dims(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return normalize_in_dims(self.in_dims, len(args), "Map")

    def _run(self, fn: Any, in_dims: tuple[Any, ...], n: int, keys: Sequence[int] | None = None,
             cm: ChoiceMap | None = None) -> Any:
        """``fn`` batched over ``n`` elements (keys ``keys``, default 0..n-1).  An address
        error raised by the kernel gets the key of the element it concerns in front (the
        first one whose constraints ``cm`` hold that address, else the first element)."""
        call = batched_call(fn, in_dims, vectorize=self.vectorize, length=n, who=self._who())
        return self._checked(call, fn, in_dims, n, keys, cm)

    def _checked(self, call: Any, elem_fn: Any, in_dims: tuple[Any, ...], n: int,
                 keys: Sequence[int] | None, cm: ChoiceMap | None) -> Any:
        """``call`` (of the ``n`` elements' arguments) with the kernel's address errors
        given the element's key in front (:func:`_at_element`), and NaN or +inf element
        scores and NaN element weights over concrete tensors named at their element
        (:func:`~gfcomb.core.validation.check_vmapped_scores`, ``elem_fn`` running it
        alone)."""
        def run(*args: Any) -> Any:
            try:
                out = call(*args)
            except AddressError as err:
                raise _at_element(err, range(n) if keys is None else keys, cm) from None
            return check_vmapped_scores(out, elem_fn, in_dims, args, keys, self._who(), cm)

        return run

    def _batch_call(self, method: str, fn: Any, elem_fn: Any, in_dims: tuple[Any, ...],
                    n: int, args: tuple[Any, ...], keys: Sequence[int] | None = None,
                    cm: ChoiceMap | None = None) -> Any:
        """``fn`` (a call of the kernel's ``batch_<method>`` on the elements as rows) when the
        kernel has that batch method of its own, runs its batch calls with the arguments
        ``args`` over the whole batch
        (:meth:`~gfcomb.core.gfi.GenerativeFunction.batch_runs_whole`) and no torch.func
        transform is running, else None (the caller vmaps ``elem_fn``, the per-element
        method).  ``fn(*args)`` is called with the mapped arguments as :class:`PerRow`
        values (mapped axis first).  Address errors get the element key in front and NaN or
        +inf element scores are named as :meth:`_run` does (``elem_fn`` runs the element
        alone to find why)."""
        name = "batch_" + method
        if (not self.vectorize or n == 0 or inside_functorch_transform()
                or getattr(type(self.kernel), name) is getattr(GenerativeFunction, name)):
            # (inside a transform -- a batch of models' rows, a user's vmap or grad -- the
            # per-element method: a batch edit may keep tensors in static storage, such
            # as Unfold's shared history, which must not hold the transform's tensors; the
            # default batch method: the vmap of the per-element method, which Map runs itself)
            return None
        kernel_dims = in_dims[len(in_dims) - len(args):]
        if not self.kernel.batch_runs_whole(
                tuple(_as_rows(a, d) for a, d in zip(args, kernel_dims))):
            return None

        def on_rows(*args: Any) -> Any:
            return fn(*(_as_rows(a, d) for a, d in zip(args, in_dims)))

        return self._checked(on_rows, elem_fn, in_dims, n, keys, cm)

    def _trace(self, args: tuple[Any, ...], inner: Trace, n: int) -> VectorTrace:
        return VectorTrace(self, args, inner.retval, inner.score.sum(0), inner, n)

    def _simulate_inner(self, args: tuple[Any, ...], dims: tuple[Any, ...], n: int) -> Trace:
        kernel = self.kernel
        elem = lambda *a: kernel.simulate(a)  # noqa: E731
        batch = self._batch_call("generate", lambda *a: kernel.batch_generate(n, a)[0], elem,
                                 dims, n, args)
        if batch is not None:
            return batch(*args)
        return self._run(elem, dims, n)(*args)

    def _generate_inner(self, args: tuple[Any, ...], dims: tuple[Any, ...], n: int,
                        cm: ChoiceMap, keys: Sequence[int]) -> tuple[Trace, torch.Tensor]:
        """Generate elements ``keys`` (0..n-1 of ``args``) with constraints ``cm``."""
        stacked = stack_constraints(cm, keys)
        kernel = self.kernel
        elem = lambda c, *a: kernel.generate(a, c)  # noqa: E731
        batch = self._batch_call("generate", lambda c, *a: kernel.batch_generate(n, a, c),
                                 elem, (0,) + dims, n, args, keys, cm)
        if batch is not None:
            return batch(stacked, *args)
        return self._run(elem, (0,) + dims, n, keys, cm)(stacked, *args)

    # ------------------------------------------------------------------ the GFI
    def simulate(self, args: tuple[Any, ...]) -> VectorTrace:
        """Math: t_i ~ p_kernel(·; x_i) independently; score = Σ_i score_i."""
        args = check_args_tuple(args)
        dims = self._dims(args)
        n = mapped_length(args, dims, self._who())
        return self._trace(args, self._simulate_inner(args, dims, n), n)

    def generate(self, args: tuple[Any, ...], constraints: ChoiceMap | None = None,
                 ) -> tuple[VectorTrace, torch.Tensor]:
        """Math: weight = Σ_i generate weight of element i (0 for unconstrained elements)."""
        args = check_args_tuple(args)
        dims = self._dims(args)
        n = mapped_length(args, dims, self._who())
        cm = as_choicemap(constraints)
        constrained_elements(cm, n, "generate")
        if cm.is_empty():
            tr = self.simulate(args)
            return tr, zero_weight(tr.score)
        inner, w = self._generate_inner(args, dims, n, cm, range(n))
        return self._trace(args, inner, n), w.sum(0)

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
        """Math: weight = Σ_i log p_kernel(t_i; x_i); every element's choices must be given."""
        args = check_args_tuple(args)
        dims = self._dims(args)
        n = mapped_length(args, dims, self._who())
        cm = as_choicemap(choices)
        constrained_elements(cm, n, "assess")
        if n == 0:  # no elements, no choices: log p = 0
            tr = self.simulate(args)
            return tr.score, tr.retval
        keys = range(n)
        stacked = stack_constraints(cm, keys)
        if has_masks(stacked):
            # an address given for some elements only: missing, or not visited by those
            # elements (a Switch branch without it)?  Generate with the choices, then require
            # that every choice the trace holds was given (full constraints: weight = log p)
            inner, w = self._run(lambda c, *a: self.kernel.generate(a, c), (0,) + dims, n,
                                 keys, cm)(stacked, *args)
            bad = require_given(inner.choices, stacked, keys, "assess")
            if bad is not None:  # under an outer vmap: NaN for the elements missing a choice
                w = torch.where(bad, torch.full_like(w, math.nan), w)
            return w.sum(0), inner.retval
        w, retval = self._run(lambda c, *a: self.kernel.assess(a, c), (0,) + dims, n, keys,
                              cm)(stacked, *args)
        return w.sum(0), retval

    def update(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
               constraints: ChoiceMap | None = None,
               ) -> tuple[VectorTrace, torch.Tensor, Diff, ChoiceMap]:
        """Revisit only the changed, constrained, new and removed elements.

        Math: weight = Σ_{revisited i} kernel update weight_i + Σ_{new i} generate weight_i
        − Σ_{removed i} score_i.  discard = the revisited elements' discards and the removed
        elements' choices.  retdiff = VectorDiff(n', n, revisited).
        """
        return self._edit(trace, args, argdiffs, Constrain(as_choicemap(constraints)))

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[VectorTrace, torch.Tensor, Diff]:
        """Regenerate the selected choices of each element.

        Math: weight = Σ_{revisited i} kernel regenerate weight_i; new elements are
        simulated and removed ones dropped, contributing 0.
        """
        check_selection(selection, self, "regenerate")
        new, w, rd, _ = self._edit(trace, args, argdiffs, Resample(selection))
        return new, w, rd

    def _edit(self, trace: Trace, args: tuple[Any, ...], argdiffs: Any, edit: Edit,
              ) -> tuple[VectorTrace, torch.Tensor, Diff, ChoiceMap]:
        """The edit engine of update and regenerate: drop the removed elements, apply
        ``edit`` to the changed and touched ones (one batched kernel call), generate the new
        ones against the edit's constraints."""
        assert isinstance(trace, VectorTrace)
        args = check_args_tuple(args)
        argdiffs = check_argdiffs(args, argdiffs, self._who())
        dims = self._dims(args)
        n_new, n_old = mapped_length(args, dims, self._who()), trace.length
        touched = edit.keys(n_new, "update")
        all_changed, changed = changed_elements(argdiffs, dims, n_old)
        keep = min(n_old, n_new)
        revisit = _revisit(all_changed, changed, touched, keep)
        if not revisit and n_new == n_old:
            return trace, torch.zeros_like(trace.score), NoChange(), ChoiceMap.empty()
        inner = trace.inner
        weight = torch.zeros_like(trace.score)
        discard = ChoiceMap.empty()
        if n_new < n_old:  # shrink: drop the tail
            if edit.counts_discards:
                removed = tree_index(inner, slice(n_new, n_old))
                weight = weight - removed.score.sum(0)
                discard = ChoiceMap.from_stacked_block(removed.choices, n_old - n_new,
                                                       tuple(range(n_new, n_old)))
            inner = tree_index(inner, slice(0, n_new))
        if revisit:
            whole = len(revisit) == keep  # every kept element: no gather / scatter
            # (all kept elements of an unchanged length: no index tensor, gather or scatter)
            idx: Any = None if whole and keep == n_new else index_tensor(revisit, trace.score)
            old_sub = inner if whole else tree_index(inner, idx)
            sub_args = args if whole and keep == n_new else select_elements(args, dims, idx)
            el_diffs = tuple(UnknownChange() if not isinstance(d, NoChange) else d
                             for d in argdiffs)
            new_sub, w, d = self._edit_elements(edit, revisit, old_sub, sub_args, dims,
                                                el_diffs)
            weight = weight + w.sum(0)
            if whole:
                inner = new_sub
            else:  # (a batch edit may store its steps otherwise: one layout for both)
                inner, new_sub = _one_layout(inner, new_sub)
                inner = tree_scatter(inner, idx, new_sub)
            if not d.is_empty():
                discard = discard.merge(ChoiceMap.from_stacked_block(
                    d, len(revisit), None if whole else tuple(revisit)))
        if n_new > n_old:  # grow: generate the new elements
            new_keys = list(range(n_old, n_new))
            idx = index_tensor(new_keys, trace.score)
            sub_args = select_elements(args, dims, idx)
            sub_cm = _shift_keys(edit.constraints, new_keys)
            if sub_cm.is_empty():
                grown = self._simulate_inner(sub_args, dims, len(new_keys))
            else:
                try:
                    grown, w = self._generate_inner(sub_args, dims, len(new_keys), sub_cm,
                                                    range(len(new_keys)))
                except AddressError as err:  # named at the new element's own key
                    k, rest = err.address[0], err.address[1:]
                    raise type(err)(err.what, (new_keys[k],) + tuple(rest)) from None
                weight = weight + w.sum(0)
            if n_old > 0:
                inner, grown = _one_layout(inner, grown)
                inner = concat_elements(inner, grown)
            else:
                inner = grown
        new_trace = VectorTrace(self, args, inner.retval, inner.score.sum(0), inner, n_new)
        return new_trace, weight, _retdiff(all_changed, revisit, n_new, n_old), discard

    def _edit_elements(self, edit: Edit, revisit: Sequence[int], old_sub: Trace,
                       sub_args: tuple[Any, ...], dims: tuple[Any, ...],
                       el_diffs: tuple[Diff, ...]) -> tuple[Trace, torch.Tensor, ChoiceMap]:
        """``edit`` applied to the elements ``revisit`` (their stacked kernel traces
        ``old_sub``, arguments ``sub_args``): one batch call of the kernel's batch edit
        where it has one, else one vmap of the per-element edit.  Returns (the new stacked
        traces, per-element weights, stacked discards)."""
        if len(revisit) == 1:  # one element: its own edit, static (a selection of one step
            sub, per_element = edit.at(revisit[0]), False  # stays one step, not flags)
        else:
            sub, per_element = edit.for_elements(revisit, old_sub.choices)
        kernel = self.kernel
        n = len(revisit)
        if per_element:  # the edit travels into vmap: one element's part per call
            elem = lambda tr, p, *a: sub.with_payload(p).apply(  # noqa: E731
                kernel, tr, a, el_diffs)
            if edit.counts_discards:  # (a batch update takes per-row constraints)
                batch = self._batch_call(
                    "update", lambda tr, p, *a: sub.with_payload(p).apply(
                        kernel, tr.value, a, el_diffs, batch=True),
                    elem, (0, 0) + dims, n, sub_args, revisit, edit.constraints)
                if batch is not None:
                    new_sub, w, _, d = batch(old_sub, sub.payload, *sub_args)
                    return new_sub, w, d
            run = self._run(elem, (0, 0) + dims, n, revisit, edit.constraints)
            new_sub, w, _, d = run(old_sub, sub.payload, *sub_args)
            return new_sub, w, d
        elem = lambda tr, *a: sub.apply(kernel, tr, a, el_diffs)  # noqa: E731
        batch = self._batch_call(
            "update" if edit.counts_discards else "regenerate",
            lambda tr, *a: sub.apply(kernel, tr.value, a, el_diffs, batch=True), elem,
            (0,) + dims, n, sub_args, revisit)
        if batch is not None:
            new_sub, w, _, d = batch(old_sub, *sub_args)
            return new_sub, w, d
        new_sub, w, _, d = self._run(elem, (0,) + dims, n, revisit)(old_sub, *sub_args)
        return new_sub, w, d

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Math: project(t, S) = Σ_i kernel project(t_i, S[i])."""
        check_selection(selection, self, "project")
        assert isinstance(trace, VectorTrace)
        if selection.is_all_static():
            return trace.score
        if selection.is_empty_static() or trace.length == 0:
            return torch.zeros_like(trace.score)
        keys = range(trace.length)
        sel = element_flags(selection, keys, trace.inner.choices)
        if has_mask_flags(sel):
            w = self._run(lambda tr, s: self.kernel.project(tr, s), (0, 0), trace.length)(
                trace.inner, sel)
        else:
            w = self._run(lambda tr: self.kernel.project(tr, sel), (0,), trace.length)(
                trace.inner)
        return w.sum(0)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The kernel's parameters."""
        return self.kernel.parameters()


def _one_layout(a: Trace, b: Trace) -> tuple[Trace, Trace]:
    """``a`` and ``b`` (stacked kernel traces) re-expressed in one record layout so that
    they can be combined leaf by leaf (:meth:`Trace.with_layout_of`: a batch edit of an
    Unfold may keep its steps in a shared history the other does not have; :func:`harmonize`:
    a Switch edited for one element runs one branch, under vmap every branch)."""
    b = b.with_layout_of(a)
    a, b = harmonize([a.with_layout_of(b), b])  # (Switch traces on one branch or on all)
    return a, b


def _as_rows(a: Any, dim: Any) -> Any:
    """A Map argument as a batch-method argument: mapped along ``dim`` -> a :class:`PerRow`
    with the mapped axis first; shared (``dim`` None) -> as it is."""
    if dim is None:
        return a
    return PerRow(a if dim == 0 else tree_map_tensors(lambda x: x.movedim(dim, 0), a))


def _at_element(err: AddressError, keys: Sequence[int], cm: ChoiceMap | None) -> AddressError:
    """``err`` (raised by the kernel of the batch of elements ``keys``) with the element's key
    in front: the first element whose constraints hold the address, else the first element."""
    key = keys[0] if len(keys) else 0
    if cm is not None and not cm.is_empty():
        batch = set(keys)
        for k in sorted(k for k in cm.keys() if k in batch):
            if not cm.get_submap((k,) + tuple(err.address)).is_empty():
                key = k
                break
    return err.prefixed((key,))


def _revisit(all_changed: bool, changed: set[int], extra: Sequence[int],
             keep: int) -> Sequence[int]:
    """The sorted element indices below ``keep`` that an update must revisit: the changed
    ones and ``extra`` (constrained or selected).  ``range(keep)`` when that is all of them
    (no per-element Python work for a dense stacked constraint or a shared-argument change)."""
    if all_changed:
        return range(keep)
    if isinstance(extra, range) and extra.start == 0 and extra.step == 1 and (
            not changed or max(changed) < extra.stop):
        return range(min(extra.stop, keep))
    return sorted(k for k in changed.union(extra) if k < keep)


def _retdiff(all_changed: bool, revisit: Sequence[int], n_new: int, n_old: int) -> Diff:
    """The return-value diff: which stacked return values may have changed."""
    if all_changed or (n_old > 0 and len(revisit) == min(n_new, n_old)):
        return UnknownChange()  # every element may have changed: no index set to build
    return VectorDiff(n_new, n_old, revisit)


def _shift_keys(cm: ChoiceMap, keys: list[int]) -> ChoiceMap:
    """Constraints of elements ``keys`` re-keyed 0..len(keys)-1."""
    if cm.is_empty():
        return cm
    return ChoiceMap.node({j: cm.get_submap(k) for j, k in enumerate(keys)})
