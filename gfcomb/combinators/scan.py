"""Scan: a carry threaded through steps, with per-step inputs and per-step outputs
(GenJAX's ``scan``).

``Scan(kernel)(init_carry, xs, *params)`` runs ``(carry_t, y_t) = kernel(carry_{t-1}, xs[t],
*params)`` for t = 0..n-1 (``carry_{-1} = init_carry``, ``n`` = the leading length of ``xs``;
``xs`` may be a tensor or a pytree of tensors sliced along their first axis).  The return
value is ``(final_carry, ys)``: the last carry (``init_carry`` when n = 0) and the stacked
per-step outputs (leading axis = step; ``None`` when n = 0, as no step gave their shape).
Step t's choices live under key ``t``; ``trace.get_retval(t)`` is step t's ``(carry, y)``.
``Scan(kernel, length=n)`` runs ``n`` steps with ``xs=None`` (the kernel gets ``x_t =
None``).

It is an :class:`~gfcomb.combinators.unfold.Unfold` underneath, whose state is ``(carry,
y)`` and whose kernel reads ``xs[t]``; the step traces are the kernel's own (they do not
store ``xs``), so the Unfold's incremental update carries over: appending steps (``xs``
longer, with ``NoChange`` or a ``VectorDiff`` without updated elements, and the carry and
params unchanged) runs only the new steps; a constraint at step t revisits from t on while
the carry changes; any other change of ``xs`` or a change of a parameter revisits every step.

The kernel must return a pair ``(carry, y)`` of tensors (or pytrees of tensors) whose shapes
are the same at every step.

Math: log p(t; c, xs, θ) = Σ_{t<n} log p_kernel(t_t; c_{t-1}, xs[t], θ).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from gfcomb.combinators.parts import Combinator, gen_fn_part
from gfcomb.combinators.unfold import Unfold
from gfcomb.combinators.wrapped import FROM_INNER, WrappedTrace, Wrapper
from gfcomb.core.batched import batch_size
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange, VectorDiff
from gfcomb.core.errors import ArgumentError
from gfcomb.core.gfi import GenerativeFunction, check_argdiffs, check_args_tuple
from gfcomb.core.pytree import tree_map_tensors, tree_tensors
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import PerRow, RowView, held_rows

_NO_CHANGE = NoChange()
_UNKNOWN = UnknownChange()


def _changed(d: Diff) -> Diff:
    return _NO_CHANGE if isinstance(d, NoChange) else _UNKNOWN


class _ScanStep(Combinator):
    """The Unfold kernel of a Scan: ``(t, (carry, y_prev), xs, *params)`` -> the user
    kernel's ``(carry, y)`` at ``(carry, xs[t], *params)``.  Its traces ARE the user kernel's
    traces (so a step stores ``x_t``, never the whole ``xs``)."""

    def __init__(self, kernel: GenerativeFunction) -> None:
        self.kernel = kernel

    def parts(self) -> tuple[Any, ...]:
        """The user kernel."""
        return (_ScanStep, self.kernel)

    @staticmethod
    def _args(args: tuple[Any, ...]) -> tuple[Any, ...]:
        t, state, xs = args[0], args[1], args[2]
        x_t = None if xs is None else tree_map_tensors(lambda x: x[t], xs)
        return (state[0], x_t) + tuple(args[3:])

    @staticmethod
    def _diffs(argdiffs: tuple[Diff, ...]) -> tuple[Diff, ...]:
        return (_changed(argdiffs[1]), _changed(argdiffs[2])) + tuple(argdiffs[3:])

    def _checked(self, tr: Trace) -> Trace:
        r = tr.retval
        if not (isinstance(r, tuple) and len(r) == 2):
            raise ArgumentError(f"Scan: the kernel {self.kernel!r} must return a pair "
                                f"(carry, y), got {type(r).__name__}")
        return tr

    def simulate(self, args: tuple[Any, ...]) -> Trace:
        """Math: the kernel's simulate at (carry, x_t, *params)."""
        return self._checked(self.kernel.simulate(self._args(args)))

    def generate(self, args: tuple[Any, ...], constraints: ChoiceMap | None = None,
                 ) -> tuple[Trace, torch.Tensor]:
        """Math: the kernel's generate weight at (carry, x_t, *params)."""
        tr, w = self.kernel.generate(self._args(args), constraints)
        return self._checked(tr), w

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
        """Math: log p_kernel(t; carry, x_t, params)."""
        return self.kernel.assess(self._args(args), choices)

    def update(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
               constraints: ChoiceMap | None = None,
               ) -> tuple[Trace, torch.Tensor, Diff, ChoiceMap]:
        """Math: the kernel's update weight (carry and x_t diffs from the state/xs diffs)."""
        return self.kernel.update(trace, self._args(args), self._diffs(argdiffs), constraints)

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[Trace, torch.Tensor, Diff]:
        """Math: the kernel's regenerate weight."""
        return self.kernel.regenerate(trace, self._args(args), self._diffs(argdiffs),
                                      selection)

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Math: the kernel's project."""
        return self.kernel.project(trace, selection)

    # (the batch methods: the kernel's own, at the step's (carry, x_t) of every row)
    @staticmethod
    def _batch_args(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        t, state, xs = args[0], args[1], args[2]
        if type(xs) is PerRow or type(state) is RowView:
            return None  # (inputs per row: the default, per row)
        carry = PerRow(state.value[0]) if type(state) is PerRow else state[0]
        x_t = None if xs is None else tree_map_tensors(lambda x: x[t], xs)
        return (carry, x_t) + tuple(args[3:])

    def batch_generate(self, n: int, args: tuple[Any, ...], constraints: Any = None,
                       ) -> tuple[Trace, torch.Tensor]:
        """Math: the kernel's batch generate at every row's (carry, x_t, *params)."""
        a = self._batch_args(args)
        if a is None:
            return super().batch_generate(n, args, constraints)
        tr, w = self.kernel.batch_generate(n, a, constraints)
        return self._checked(tr), w

    def batch_update(self, traces: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                     constraints: Any = None) -> tuple[Trace, torch.Tensor, Diff, ChoiceMap]:
        """Math: the kernel's batch update (carry and x_t diffs from the state/xs diffs)."""
        a = self._batch_args(args)
        if a is None:
            return super().batch_update(traces, args, argdiffs, constraints)
        return self.kernel.batch_update(traces, a, self._diffs(argdiffs), constraints)

    def batch_regenerate(self, traces: Trace, args: tuple[Any, ...],
                         argdiffs: tuple[Diff, ...],
                         selection: Selection) -> tuple[Trace, torch.Tensor, Diff]:
        """Math: the kernel's batch regenerate weight."""
        a = self._batch_args(args)
        if a is None:
            return super().batch_regenerate(traces, args, argdiffs, selection)
        return self.kernel.batch_regenerate(traces, a, self._diffs(argdiffs), selection)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The kernel's parameters."""
        return self.kernel.parameters()


class Scan(Wrapper):
    """Thread a carry through steps with per-step inputs ``xs`` and outputs ``ys`` (see the
    module docstring).  Arguments: ``(init_carry, xs, *params)``."""

    def __init__(self, kernel: GenerativeFunction, length: int | None = None) -> None:
        gen_fn_part(kernel, "Scan", "kernel")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                                   or length < 0):
            raise TypeError(f"Scan: 'length' must be a Python int >= 0 or None, got {length!r}")
        self.kernel = kernel
        self.length = length
        self.inner_fn = Unfold(_ScanStep(kernel))

    def parts(self) -> tuple[Any, ...]:
        """The kernel and the length."""
        return (Scan, self.kernel, self.length)

    def _steps(self, xs: Any) -> int:
        if xs is None:
            if self.length is None:
                raise ArgumentError("Scan: argument 'xs' is None and no length was given "
                                    "(write Scan(kernel, length=n))")
            return self.length
        leaves = tree_tensors(xs)
        if not leaves or any(x.dim() == 0 for x in leaves):
            raise ArgumentError("Scan: argument 'xs' must be a tensor (or a pytree of tensors) "
                                "with a leading step axis")
        n = int(leaves[0].shape[0])
        for x in leaves[1:]:
            if x.shape[0] != n:
                raise ArgumentError(f"Scan: the tensors of argument 'xs' have unequal step "
                                    f"counts ({n} and {x.shape[0]})")
        if self.length is not None and n != self.length:
            raise ArgumentError(f"Scan: argument 'xs' has {n} steps, the Scan was built with "
                                f"length={self.length}")
        return n

    def inner_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        args = check_args_tuple(args)
        if len(args) < 2:
            raise ArgumentError(f"Scan: args must be (init_carry, xs, *params), got "
                                f"{len(args)} argument(s)")
        init, xs = args[0], args[1]
        return (self._steps(xs), (init, ()), xs) + tuple(args[2:])

    def inner_argdiffs(self, args: tuple[Any, ...], inner_args: tuple[Any, ...],
                       argdiffs: tuple[Diff, ...]) -> tuple[Diff, ...]:
        xs_diff = argdiffs[1]
        if isinstance(xs_diff, VectorDiff) and not xs_diff.updated:
            xs_diff = _NO_CHANGE  # only appended / removed steps: the old x_t are the same
        return (_NO_CHANGE, argdiffs[0], _changed(xs_diff)) + tuple(argdiffs[2:])

    def outer_retval(self, args: tuple[Any, ...], inner_retval: Any) -> Any:
        carries, ys = inner_retval
        leaves = tree_tensors(carries)
        if not leaves or leaves[0].shape[0] == 0:
            return (args[0], None)
        return (tree_map_tensors(lambda x: x[-1], carries), ys)

    def outer_retdiff(self, argdiffs: tuple[Diff, ...], inner_retdiff: Diff) -> Diff:
        return inner_retdiff if isinstance(inner_retdiff, NoChange) else _UNKNOWN

    def _wrap(self, args: tuple[Any, ...], inner: Trace) -> WrappedTrace:
        # (the return value is built when read, as in the batch methods' traces: one layout)
        return WrappedTrace(self, args, FROM_INNER, inner.score, inner)

    # ------------------------------------------------------------------ the batch protocol
    def batch_update(self, traces: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                     constraints: Any = None) -> tuple[Trace, torch.Tensor, Diff, ChoiceMap]:
        """``update`` of every row of a batch, as one batch update of the inner Unfold (so
        appending steps costs the new steps only, at any length, as for an Unfold) when the
        inputs ``xs`` are shared by the rows; otherwise per row (the default).

        Math: as :meth:`update`, row by row: the inner Unfold's batch update weights.
        """
        done = self._batch_edit(traces, args, argdiffs, lambda fn, old, a, d: fn.batch_update(
            old, a, d, constraints))
        return super().batch_update(traces, args, argdiffs, constraints) if done is None \
            else done

    def batch_regenerate(self, traces: Trace, args: tuple[Any, ...],
                         argdiffs: tuple[Diff, ...],
                         selection: Selection) -> tuple[Trace, torch.Tensor, Diff]:
        """``regenerate`` of every row of a batch, as one batch regenerate of the inner
        Unfold under the same condition as :meth:`batch_update`.

        Math: as :meth:`regenerate`, row by row.
        """
        done = self._batch_edit(traces, args, argdiffs, lambda fn, old, a, d: (
            *fn.batch_regenerate(old, a, d, selection), ChoiceMap.empty()))
        return super().batch_regenerate(traces, args, argdiffs, selection) if done is None \
            else done[:3]

    def _batch_edit(self, traces: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                    edit: Callable[..., tuple[Any, ...]],
                    ) -> tuple[Trace, torch.Tensor, Diff, ChoiceMap] | None:
        """``edit(inner_fn, inner batch, inner args, inner argdiffs)`` on the inner batch,
        wrapped; None when the batch must run per row (a batch with several row axes, inputs
        ``xs`` or arguments given as views of other traces)."""
        args = check_args_tuple(args)
        if (not isinstance(traces, WrappedTrace) or traces.gen_fn is not self
                or traces.score.dim() != 1 or len(args) < 2
                or any(type(a) is RowView for a in args) or type(args[1]) is PerRow):
            return None
        argdiffs = check_argdiffs(args, argdiffs, repr(self))
        init = args[0]
        state = PerRow((init.value, ())) if type(init) is PerRow else (init, ())
        in_args = (self._steps(args[1]), state) + tuple(args[1:])
        in_diffs = self.inner_argdiffs(args, in_args, argdiffs)
        inner, w, rd, discard = edit(self.inner_fn, traces.inner, in_args, in_diffs)
        n = batch_size(traces)
        new = self._wrap(tuple(held_rows(a, n) for a in args), inner)
        return new, w, self.outer_retdiff(argdiffs, rd), discard

    def batch_retval(self, trace: WrappedTrace) -> Any:
        """A trace's return value, built when read: ``(final carry, ys)`` (of every row, for
        a batch) from the inner Unfold's stacked states (step axis after any row axes)."""
        lead = trace.score.dim()
        carries, ys = trace.inner.retval
        leaves = tree_tensors(carries)
        if not leaves or leaves[0].shape[lead] == 0:
            return (trace.args[0], None)
        return (tree_map_tensors(lambda x: x.select(lead, -1), carries), ys)
