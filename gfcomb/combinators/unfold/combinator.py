"""Unfold: iterate a kernel generative function over time steps, threading a state.

``Unfold(kernel)(n, init_state, *params)`` runs ``state_t = kernel(t, state_{t-1}, *params)``
for t = 0..n-1 (``state_{-1} = init_state``; ``t`` is a Python int, ``n`` a Python int).
Step t's choices live under key ``t``; the return value is the stacked states (leading axis =
step).  The steps depend on each other, so they run one after the other: each step is an
ordinary GFI call of the kernel (inside an outer ``torch.func.vmap`` over particles every step
is batched automatically).  The trace (:class:`UnfoldTrace`) keeps the kernel traces of the
steps stacked (struct of arrays over steps), so ``tr[t, "x"]`` reads one step's choice and
``tr[:, "x"]`` all of them.  In a batch of particle traces the older steps live in a shared
history (:mod:`gfcomb.combinators.unfold.history`) that appending and resampling never copy.

Incremental update (Gen.jl's semantics): extending ``n`` with unchanged ``init_state`` and
parameters runs only the new steps; a parameter change revisits every step; an
``init_state`` change or a constraint at step t revisits from there and keeps going only while
the state changes (the retdiff of step t is the state argdiff of step t + 1).

Kernels must return tensors (or pytrees of tensors) as state, and keep the same address
structure at every step (the steps are stacked).  Python numbers inside a kernel trace (the
step index ``t`` among them) are kept from step 0 when steps are stacked; they are never used
for scores, only to compute callee argdiffs, where a stale value gives a (correct)
``UnknownChange``.

Math: log p(t; n, s_init, θ) = Σ_{t<n} log p_kernel(t_t; t, s_{t-1}, θ).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from gfcomb.combinators.edit import Constrain, Edit, Resample
from gfcomb.combinators.parts import Combinator, gen_fn_part
from gfcomb.combinators.unfold.batch import StepResult, batch_edit, batch_plan
from gfcomb.combinators.unfold.history import StepBlock, concat_steps
from gfcomb.combinators.unfold.trace import (
    UnfoldTrace,
    no_states,
    retdiff_of,
    stack_steps,
    state_at,
    state_tensors,
    zero_like,
)
from gfcomb.combinators.vector import (
    constrained_elements,
    drop_absent,
    index_tensor,
)
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, all_unchanged
from gfcomb.core.errors import AddressError, ArgumentError
from gfcomb.core.gfi import (
    GenerativeFunction,
    as_choicemap,
    check_argdiffs,
    check_args_tuple,
    weight_like,
)
from gfcomb.core.harmonize import harmonize
from gfcomb.core.pytree import tree_index, tree_scatter, tree_stack
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.core.validation import check_selection

_EMPTY = ChoiceMap.empty()
_NO_CHANGE = NoChange()


class Unfold(Combinator):
    """Iterate a kernel over ``n`` steps, threading a state (see the module docstring).

    Arguments of the combinator: ``(n, init_state, *params)``; the kernel is called as
    ``kernel(t, state, *params)`` and returns the next state.
    """

    def __init__(self, kernel: GenerativeFunction) -> None:
        self.kernel = gen_fn_part(kernel, "Unfold", "kernel")

    def parts(self) -> tuple[Any, ...]:
        """The kernel."""
        return (Unfold, self.kernel)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def unpack(args: Any) -> tuple[int, Any, tuple[Any, ...]]:
        args = check_args_tuple(args)
        if len(args) < 2:
            raise ArgumentError(f"Unfold: args must be (n, init_state, *params), got "
                                f"{len(args)} argument(s)")
        n = args[0]
        if isinstance(n, bool) or not isinstance(n, int):
            hint = " (pass int(n))" if isinstance(n, torch.Tensor) else ""
            raise ArgumentError(f"Unfold: argument 'n' (the number of steps) must be a Python "
                                f"int, got {type(n).__name__} {n!r}{hint}")
        if n < 0:
            raise ArgumentError(f"Unfold: argument 'n' (the number of steps) must be >= 0, "
                                f"got {n}")
        return n, state_tensors(args[1]), tuple(args[2:])

    def _check_trace(self, trace: Trace) -> UnfoldTrace:
        if not isinstance(trace, UnfoldTrace) or not (trace.gen_fn is self
                                                      or trace.gen_fn == self):
            raise ArgumentError(f"{self!r}: the trace was not made by this Unfold "
                                f"(got a trace of {getattr(trace, 'gen_fn', trace)!r})")
        if trace.score.dim() != 0:
            raise ArgumentError(f"{self!r}: this trace is batched (score shape "
                                f"{tuple(trace.score.shape)}); call the method under "
                                "torch.func.vmap over the batch, as the trace was made")
        return trace

    def _trace(self, args: tuple[Any, ...], inner: Trace | None, n: int,
               score: torch.Tensor | None = None) -> UnfoldTrace:
        """The Unfold trace of stacked steps ``inner`` (``score``: their total, if known)."""
        if inner is None or n == 0:
            return UnfoldTrace(self, args, zero_like(args[1:]), 0, None)
        if score is None:
            score = inner.score.sum(0)
        return UnfoldTrace(self, args, score, n, inner)

    def _window_trace(self, args: tuple[Any, ...], n: int, score: Any, window: Trace | None,
                      rows: torch.Tensor | None, prefix: StepBlock | None) -> UnfoldTrace:
        """The trace of steps < h in the shared ``prefix`` and steps h..n-1 in ``window``."""
        if prefix is None:
            return self._trace(args, window, n, score)
        return UnfoldTrace(self, args, score, n, window, rows, prefix)

    def _run_steps(self, start: int, stop: int, state: Any, params: tuple[Any, ...],
                   cm: ChoiceMap, ckeys: Sequence[int]) -> tuple[Trace | None, Any]:
        """Steps ``start..stop-1`` from ``state``: simulated, or generated where ``cm``
        constrains them (``ckeys``).  Returns (the stacked step traces, Σ generate weights)."""
        if stop <= start:
            return None, 0.0
        constrained = set(ckeys)
        steps = []
        weight: Any = None
        t = start
        try:
            for t in range(start, stop):
                tr, w = self._run_step(t, state, params, cm, t in constrained)
                if w is not None:
                    weight = w if weight is None else weight + w
                steps.append(tr)
                state = tr.retval
        except AddressError as err:
            raise err.prefixed((t,)) from None
        return stack_steps(steps, keys=range(start, stop)), 0.0 if weight is None else weight

    def _run_step(self, t: int, state: Any, params: tuple[Any, ...], cm: ChoiceMap,
                  constrained: bool) -> tuple[Trace, torch.Tensor | None]:
        """Step ``t`` from ``state``: generated against ``cm``'s constraints under key ``t``
        if ``constrained``, else simulated.  Returns (its kernel trace, the generate weight,
        None when simulated)."""
        if constrained:
            return self.kernel.generate((t, state) + params, cm.get_submap(t))
        return self.kernel.simulate((t, state) + params), None

    def _sweep(self, inner: Trace, keep: int, init: Any, params: tuple[Any, ...],
               init_diff: Diff, param_diffs: tuple[Diff, ...], touched: Sequence[int],
               step: Callable[[int, Trace, tuple[Any, ...], tuple[Diff, ...]], StepResult],
               offset: int = 0, before: Any = None,
               ) -> tuple[Trace, Any, Any, list[int]]:
        """Revisit steps offset..keep-1 of the stacked ``inner`` (holding steps offset..,
        ``before`` being the state after step offset - 1) where needed.

        A step is revisited if the parameters changed, if it is in ``touched`` (sorted:
        constrained / selected steps) or if its incoming state changed (step 0: ``init_diff``;
        step t: the retdiff of step t-1).  Between revisited steps the loop jumps straight to
        the next touched step, so untouched unchanged steps cost nothing.  ``step(t, old,
        args, argdiffs)`` revisits one step.  Returns (new inner, Σ weights, Σ score changes,
        steps whose state changed).
        """
        params_changed = not all_unchanged(param_diffs)
        if params_changed or not isinstance(init_diff, NoChange):
            t: int | None = 0
        else:
            t = touched[0] if touched else None
        if t is None or keep <= offset:
            return inner, 0.0, 0.0, []
        assert t >= offset
        old_states = inner.retval

        def state_before(t: int) -> Any:
            if t == 0:
                return init
            return before if t == offset else state_at(old_states, t - 1 - offset)

        state_diff = init_diff if t == 0 else _NO_CHANGE
        state = state_before(t)
        weight: Any = 0.0
        dscore: Any = 0.0
        visited: list[int] = []
        new_steps: list[Trace] = []
        changed: list[int] = []
        try:
            while t is not None:
                old = tree_index(inner, t - offset)
                new, w, rd = step(t, old, (t, state) + params,
                                  (_NO_CHANGE, state_diff) + param_diffs)
                weight = weight + w
                dscore = dscore + (new.score - old.score)
                visited.append(t)
                new_steps.append(new)
                if params_changed or not isinstance(rd, NoChange):
                    if not isinstance(rd, NoChange):
                        changed.append(t)
                    nxt: int | None = t + 1 if t + 1 < keep else None
                    state_diff, state = rd, new.retval
                else:
                    j = bisect.bisect_right(touched, t)
                    nxt = touched[j] if j < len(touched) and touched[j] < keep else None
                    state_diff = _NO_CHANGE
                    if nxt is not None:
                        state = new.retval if nxt == t + 1 else state_before(nxt)
                t = nxt
        except AddressError as err:
            raise err.prefixed((t,)) from None
        stacked = stack_steps(new_steps, keys=visited)
        if len(visited) == keep - offset:
            return stacked, weight, dscore, changed  # every step revisited, in order
        idx = index_tensor([v - offset for v in visited], inner.score)
        inner, stacked = harmonize([inner, stacked])
        return tree_scatter(inner, idx, stacked), weight, dscore, changed

    def _grow(self, inner: Trace | None, n_old: int, n_new: int, state: Any,
              params: tuple[Any, ...], cm: ChoiceMap, ckeys: Sequence[int],
              ) -> tuple[Trace | None, Any, Any]:
        """Append steps n_old..n_new-1 (generated against ``cm``, starting from ``state``,
        the state after step n_old - 1) to the stacked steps ``inner``.  Returns (new inner,
        Σ generate weights, Σ scores of the new steps)."""
        if n_new <= n_old:
            return inner, 0.0, 0.0
        grown, w = self._run_steps(n_old, n_new, state, params, cm,
                                   [k for k in ckeys if k >= n_old])
        assert grown is not None
        dscore = grown.score[0] if n_new - n_old == 1 else grown.score.sum(0)
        if inner is None:
            return grown, w, dscore
        return concat_steps([inner, grown], 0, starts=(0, n_old)), w, dscore

    def _extend(self, trace: UnfoldTrace, args: tuple[Any, ...], n_new: int,
                params: tuple[Any, ...], cm: ChoiceMap, ckeys: Sequence[int],
                ) -> tuple[UnfoldTrace, Any]:
        """The fast path of update/regenerate: old steps untouched, steps
        ``trace.length..n_new-1`` appended to ``recent`` (the shared history is kept as it
        is, so the work does not depend on how many steps there are).  Returns (new trace,
        Σ generate weights of the new steps)."""
        n_old = trace.length
        state = args[1] if n_old == 0 else trace.last_state()
        recent, w, dscore = self._grow(trace.recent, n_old, n_new, state, params, cm, ckeys)
        new = UnfoldTrace(self, args, trace.score + dscore, n_new, recent, trace.rows,
                          trace.history)
        return new, w

    @staticmethod
    def _first_touched(argdiffs: tuple[Diff, ...], touched: Sequence[int],
                       n_old: int, n_new: int) -> int:
        """The first stored step an update must look at (``n_old``: none, it only appends):
        0 if ``init_state`` or a parameter changed, else the first constrained/selected
        stored step or the new length when shrinking."""
        if not all_unchanged(argdiffs[1:]):
            return 0
        first = min(n_new, n_old)
        return min([t for t in touched if t < first] + [first])

    def _stored_state(self, window: Trace | None, h: int, upto: int, prefix: StepBlock | None,
                      rows: torch.Tensor | None, init: Any) -> Any:
        """The state after step ``upto - 1`` (``init`` if ``upto`` is 0), from the gathered
        steps h.. (``window``) or the shared prefix."""
        if upto == 0:
            return init
        if upto > h:
            assert window is not None
            return state_at(window.retval, upto - 1 - h)
        assert prefix is not None and rows is not None
        return prefix.last_state(rows)

    # ------------------------------------------------------------------ the GFI
    def simulate(self, args: tuple[Any, ...]) -> UnfoldTrace:
        """Run every step, sampling its choices from the prior.

        Math: t_t ~ p_kernel(·; t, s_{t-1}, θ) for t = 0..n-1 in order (s_{-1} = init_state,
        s_t = the step's return value); score = Σ_t score_t.
        """
        n, init, params = self.unpack(args)
        inner, _ = self._run_steps(0, n, init, params, _EMPTY, ())
        return self._trace(args, inner, n)

    def generate(self, args: tuple[Any, ...], constraints: ChoiceMap | None = None,
                 ) -> tuple[UnfoldTrace, torch.Tensor]:
        """Run every step with the constraints under key t given to step t.

        Math: weight = Σ_t generate weight of step t (0 for unconstrained steps), i.e. with
        prior proposals the log density of the constrained choices given the sampled ones.
        Full constraints: weight == score == assess weight.
        """
        n, init, params = self.unpack(args)
        cm = as_choicemap(constraints)
        ckeys = constrained_elements(cm, n, "generate")
        inner, w = self._run_steps(0, n, init, params, cm, ckeys)
        tr = self._trace(args, inner, n)
        return tr, weight_like(w, tr.score)

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
        """Score given choices for every step; every step's choices must be given.

        Math: weight = Σ_t log p_kernel(t_t; t, s_{t-1}, θ) = log p(t; n, s_init, θ).
        Differentiable in ``init_state``, the parameters and the choice values (the default
        gradient methods are built on it).
        """
        n, init, params = self.unpack(args)
        cm = as_choicemap(choices)
        constrained_elements(cm, n, "assess")
        # values absent at a step (masked out: a Switch branch that step did not take) are
        # dropped from that step's choices, so the kernel's assess reports a choice it visits
        # and misses; masks batched by an outer vmap are left to the kernel, per element
        strip = cm.is_stacked()
        kernel = self.kernel
        weight: Any = 0.0
        states = []
        state = init
        t = 0
        try:
            for t in range(n):
                sub = cm.get_submap(t)
                w, state = kernel.assess((t, state) + params, drop_absent(sub) if strip else sub)
                weight = weight + w
                states.append(state)
        except AddressError as err:
            raise err.prefixed((t,)) from None
        if n == 0:
            return zero_like(args[1:]), no_states(init)
        return weight, tree_stack(states)

    def update(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
               constraints: ChoiceMap | None = None,
               ) -> tuple[UnfoldTrace, torch.Tensor, Diff, ChoiceMap]:
        """Revisit the steps that changed, generate new steps, drop removed ones.

        Revisited: every step if a parameter's argdiff is not NoChange; step 0 if
        ``init_state`` changed; every constrained step; and step t+1 whenever step t's state
        (retdiff) changed.  Extending ``n`` with NoChange ``init_state``/parameters runs only
        the new steps.

        Math: weight = Σ_{revisited t} kernel update weight_t + Σ_{new t} generate weight_t
        − Σ_{removed t} score_t = log p(t'; x') − log p(t; x) − log q(fresh choices).
        discard = the revisited steps' discards (overwritten values) and the removed steps'
        choices.  retdiff = VectorDiff(n', n, steps whose state changed), or NoChange.
        """
        return self._edit(trace, args, argdiffs, Constrain(as_choicemap(constraints)))

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[UnfoldTrace, torch.Tensor, Diff]:
        """Resample the selected choices of each step and propagate state changes onward.

        Revisited: every step if a parameter changed; step 0 if ``init_state`` changed; every
        step with a non-empty sub-selection ``selection.get_subselection(t)``; and step t+1
        whenever step t's state changed.  New steps are simulated, removed steps dropped.

        Math: weight = Σ_{revisited t} kernel regenerate weight_t = Σ over retained,
        unselected choices of (log p' − log p); selected, new and removed choices contribute
        0 (the MH log acceptance ratio for the prior proposal).
        """
        check_selection(selection, self, "regenerate")
        new, w, rd, _ = self._edit(trace, args, argdiffs, Resample(selection))
        return new, w, rd

    def _edit(self, trace: Trace, args: tuple[Any, ...], argdiffs: Any, edit: Edit,
              ) -> tuple[UnfoldTrace, torch.Tensor, Diff, ChoiceMap]:
        """The edit engine of update and regenerate: drop the removed steps, sweep the
        stored steps from the first touched one on applying ``edit`` (:meth:`_sweep`), append
        the new steps (generated against the edit's constraints)."""
        trace = self._check_trace(trace)
        n_new, init, params = self.unpack(args)
        argdiffs = check_argdiffs(args, argdiffs, 'Unfold')
        touched = edit.keys(n_new, "update")
        grown = edit.generated(touched)
        n_old = trace.length
        first = self._first_touched(argdiffs, touched, n_old, n_new)
        if first >= n_old:
            new_trace, w = self._extend(trace, args, n_new, params, edit.constraints, grown)
            return (new_trace, weight_like(w, new_trace.score),
                    retdiff_of(n_new, n_old, []), _EMPTY)
        # steps < h stay in the shared history; steps h.. are gathered into ``window``
        prefix, rows, window, h = trace.split(first)
        keep = min(n_old, n_new)
        weight: Any = 0.0
        score: Any = trace.score  # kept up to date step by step: O(revisited + new steps)
        removed = _EMPTY
        if n_new < n_old:  # shrink: drop the tail, subtract its score
            assert window is not None
            tail = tree_index(window, slice(n_new - h, n_old - h))
            score = score - tail.score.sum(0)
            if edit.counts_discards:
                weight = weight - tail.score.sum(0)
                removed = ChoiceMap.from_stacked_block(tail.choices, n_old - n_new,
                                                       tuple(range(n_new, n_old)))
            window = tree_index(window, slice(0, n_new - h)) if n_new > h else None
        discards: dict[int, ChoiceMap] = {}
        step = self._step_editor(edit, False, discards)
        changed: list[int] = []
        if window is not None and keep > h:
            before = self._stored_state(None, h, h, prefix, rows, init)
            window, w, ds, changed = self._sweep(window, keep, init, params, argdiffs[1],
                                                 argdiffs[2:], [k for k in touched if k < keep],
                                                 step, h, before)
            weight, score = weight + w, score + ds
        last = self._stored_state(window, h, keep, prefix, rows, init)
        window, w, ds = self._grow(window, keep, n_new, last, params, edit.constraints, grown)
        weight, score = weight + w, score + ds
        new_trace = self._window_trace(args, n_new, score, window, rows, prefix)
        discard = ChoiceMap.node(discards).merge(removed) if discards else removed
        return (new_trace, weight_like(weight, new_trace.score),
                retdiff_of(n_new, n_old, changed), discard)

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Log density of the selected choices, step by step.

        Math: project(t, S) = Σ_t kernel project(t_t, S[t]); project(t, selectall) = score.
        """
        check_selection(selection, self, "project")
        trace = self._check_trace(trace)
        if selection.is_all_static():
            return trace.score
        total = torch.zeros_like(trace.score)
        inner = trace.inner if trace.length else None
        if inner is None:
            return total
        for t in Resample(selection).keys(trace.length, "project"):
            sub = selection.get_subselection(t)
            if sub.is_empty_static():
                continue
            step_trace = tree_index(inner, t)
            total = total + self.kernel.project(step_trace, sub)
        return total

    # ------------------------------------------------------------------ the batch protocol
    def batch_update(self, traces: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                     constraints: Any = None) -> tuple[Trace, torch.Tensor, Diff, ChoiceMap]:
        """``update`` of every row of a batch, done on the whole batch when the edit leaves
        ``init_state``, the parameters and the steps before the first constrained one alone
        (a particle-filter step, a move on the newest steps): only the steps from the first
        constrained one on are revisited -- each one batch call of the kernel -- and appended
        steps go into the shared history as they are.  O(steps revisited and added) at any
        length.  Any other edit runs per row (the default).

        Math: as :meth:`update`, row by row: weight_i = Σ_{revisited t} kernel update
        weight + Σ_{new t} kernel generate weight of row i.
        """
        done = self._batch_edit(traces, args, argdiffs, Constrain(constraints))
        if done is None:
            return super().batch_update(traces, args, argdiffs, constraints)
        return done

    def batch_regenerate(self, traces: Trace, args: tuple[Any, ...],
                         argdiffs: tuple[Diff, ...],
                         selection: Selection) -> tuple[Trace, torch.Tensor, Diff]:
        """``regenerate`` of every row of a batch; on the whole batch, revisiting only the
        steps from the first selected one on, under the same conditions as
        :meth:`batch_update` (an MH move on the newest steps costs the same at any length).

        Math: as :meth:`regenerate`, row by row (new steps contribute 0 to the weight).
        """
        check_selection(selection, self, "batch_regenerate")
        done = self._batch_edit(traces, args, argdiffs, Resample(selection))
        if done is None:
            return super().batch_regenerate(traces, args, argdiffs, selection)
        return done[:3]

    def _batch_edit(self, traces: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                    edit: Edit) -> tuple[Trace, torch.Tensor, Diff, ChoiceMap] | None:
        """The batch edit engine (:func:`~gfcomb.combinators.unfold.batch.batch_edit`) with
        ``edit`` applied at each revisited step; None when the edit must run per row."""
        plan = batch_plan(self, traces, args, argdiffs, lambda n: edit.keys(n, "update"))
        if plan is None:
            return None
        discards: dict[int, ChoiceMap] = {}
        step = self._step_editor(edit, True, discards)
        assert isinstance(traces, UnfoldTrace)
        new, w, rd = batch_edit(self, traces, args, plan, step, edit.constraints)
        return new, w, rd, ChoiceMap.node(discards) if discards else _EMPTY

    def _step_editor(self, edit: Edit, batch: bool, discards: dict[int, ChoiceMap],
                     ) -> Callable[[int, Trace, tuple[Any, ...], tuple[Diff, ...]], StepResult]:
        """``step(t, old, args, argdiffs)`` for the sweeps: ``edit``'s part at step ``t``
        applied to the kernel (to a batch of step traces if ``batch``), its discard kept in
        ``discards[t]``."""
        kernel = self.kernel

        def step(t: int, old: Trace, a: tuple[Any, ...], d: tuple[Diff, ...]) -> StepResult:
            new, w, rd, disc = edit.at(t).apply(kernel, old, a, d, batch)
            if not disc.is_empty():
                discards[t] = disc
            return new, w, rd

        return step

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The kernel's parameters."""
        return self.kernel.parameters()
