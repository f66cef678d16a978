"""The Generative Function Interface (GFI): the base class every generative function extends.

Writing your own generative function
------------------------------------
Subclass :class:`GenerativeFunction`, define a trace record (an ``attrs.frozen`` class
extending :class:`gfcomb.core.trace.Trace`, registered with
:func:`gfcomb.core.pytree.register_record` so that vmap can batch it), and implement
``simulate``, ``generate``, ``update``, ``regenerate`` and ``project``.  ``propose`` and
``assess`` have defaults built on ``simulate``/``generate``; ``choice_gradients`` and
``accumulate_param_gradients`` have defaults built on ``assess`` (so ``assess`` must be
differentiable in the arguments and the choice values).  Methods are pure: never mutate a
trace, the arguments or a choice map; return new records.

Conventions (Gen.jl's): ``score = log p(choices; args)``; addresses are 0-based; weights are
defined in each method's Math paragraph.  Every method must work under
``torch.func.vmap(randomness="different")`` if the function is to be used inside a combinator
kernel: no ``.item()``, no Python branching on tensor values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import torch

from gfcomb.core.batched import batch_size, select_leaves
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, UnknownChange
from gfcomb.core.errors import ArgumentError, MissingChoiceError
from gfcomb.core.runtime import trace_call
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import PerRow, map_rows, unwrap_rows, vectorizing

T = TypeVar("T", bound=Trace)


def as_choicemap(constraints: Any) -> ChoiceMap:
    """Accept None, a dict of address -> value, or a ChoiceMap."""
    if constraints is None:
        return ChoiceMap.empty()
    if isinstance(constraints, ChoiceMap):
        return constraints
    return ChoiceMap._from_mapping(constraints)


def check_argdiffs(args: tuple[Any, ...], argdiffs: Any, who: str) -> tuple[Diff, ...]:
    """``argdiffs`` as a tuple with one diff per argument (None: every argument
    ``UnknownChange``); ArgumentError naming ``who`` when the lengths differ."""
    if argdiffs is None:
        return (_UNKNOWN,) * len(args)
    argdiffs = tuple(argdiffs)
    if len(argdiffs) != len(args):
        raise ArgumentError(f"{who}: argdiffs has {len(argdiffs)} entries for {len(args)} "
                            "arguments")
    return argdiffs


def check_trace(gen_fn: Any, trace: Any, trace_type: type[T]) -> T:
    """``trace`` if it is a ``trace_type`` record made by ``gen_fn`` (or an equal function);
    else ArgumentError naming both."""
    if not isinstance(trace, trace_type) or not (trace.gen_fn is gen_fn
                                                 or trace.gen_fn == gen_fn):
        raise ArgumentError(f"{gen_fn!r} was given a trace of another generative function: "
                            f"{getattr(trace, 'gen_fn', trace)!r}")
    return trace


def rows_submap(constraints: Any, key: Any) -> Any:
    """The constraints under ``key`` of batch-method constraints (a :class:`PerRow` choice
    map stays per row; an empty one is shared)."""
    cm, per_row = unwrap_rows(constraints)
    sub = as_choicemap(cm).get_submap(key)
    return PerRow(sub) if per_row and not sub.is_empty() else sub


def zero_weight(score: torch.Tensor) -> torch.Tensor:
    """A zero weight for a trace (or a batch of traces) of score ``score``:
    ``zeros_like(score)``, or, for a 0-d score (one trace, or one row under vmap), a fresh
    0-d zero -- under vmap one unbatched tensor for every row, not a tensor of zeros made
    per row."""
    if score.dim() == 0:
        return torch.zeros((), dtype=score.dtype, device=score.device)
    return torch.zeros_like(score)


def weight_like(w: Any, score: torch.Tensor) -> torch.Tensor:
    """A weight (a tensor or a Python number) as a tensor shaped and typed like ``score``:
    ``w`` itself when it already is one (no op), a 0-d one of that dtype and device expanded
    to it (a view), a Python zero as :func:`zero_weight`, else ``w + zeros_like(score)``."""
    if isinstance(w, torch.Tensor):
        if w.dtype == score.dtype and w.device == score.device:
            if w.shape == score.shape:
                return w
            if w.dim() == 0:
                return w.expand(score.shape)
    elif w == 0:
        return zero_weight(score)
    return w + torch.zeros_like(score)


def check_args_tuple(args: Any, name: str = "args") -> tuple[Any, ...]:
    """GFI arguments are always a tuple."""
    if not isinstance(args, tuple):
        raise ArgumentError(f"{name} must be a tuple of arguments, got {type(args).__name__}; "
                            f"write ({args!r},) for a single argument")
    return args


def _check_all_given(made: ChoiceMap, given: ChoiceMap) -> None:
    """Raise MissingChoiceError unless ``given`` holds a value at every address of ``made``.

    Stacked blocks are checked in one step when ``given`` is stacked the same way (``:`` reads
    through both); otherwise element by element, so the error names the missing element.
    """
    for addr, _ in made.items(stacked=True):
        if given.get_submap(addr).is_value():
            continue
        if not any(isinstance(k, slice) for k in addr):
            raise MissingChoiceError("assess: no choice given at address {addr}", addr)
        for elem, _ in made.items():
            if not given.get_submap(elem).is_value():
                raise MissingChoiceError("assess: no choice given at address {addr}", elem)
        return  # every element is present


_UNKNOWN = UnknownChange()
_DEFAULT_BATCH: dict[type, bool] = {}  # per class: are its batch methods the defaults?


class Invocation:
    """``gen_fn(*args)``: a call waiting for an address, used inside ``@gen`` bodies as
    ``gen_fn(*args) @ "addr"``."""

    __slots__ = ("gen_fn", "args")

    def __init__(self, gen_fn: GenerativeFunction, args: tuple[Any, ...]) -> None:
        self.gen_fn = gen_fn
        self.args = args

    def __matmul__(self, addr: Any) -> Any:
        return trace_call(self.gen_fn, self.args, addr)

    def __repr__(self) -> str:
        return f"Invocation({self.gen_fn!r}, {self.args!r})"


class GenerativeFunction:
    """A generative function: a probabilistic program with the Generative Function Interface.

    See the module docstring for how to write one.  ``gen_fn(*args) @ "addr"`` traces a call
    inside a ``@gen`` body.
    """

    def __call__(self, *args: Any) -> Invocation:
        return Invocation(self, args)

    # ------------------------------------------------------------------ the GFI
    def simulate(self, args: tuple[Any, ...]) -> Trace:
        """Run the function, sampling every choice from its prior.

        Math: t ~ p(·; x); the trace's score is log p(t; x).
        """
        raise NotImplementedError(f"{type(self).__name__}.simulate")

    def propose(self, args: tuple[Any, ...]) -> tuple[ChoiceMap, torch.Tensor, Any]:
        """Sample choices and return ``(choices, weight, retval)``.

        Math: t ~ p(·; x), weight = log p(t; x) (for functions without untraced randomness).
        """
        tr = self.simulate(args)
        return tr.choices, tr.score, tr.retval

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
        """Score given choices: ``(weight, retval)``; error if a choice is missing.

        Math: weight = log p(t; x) where t are the given choices (all must be present).
        """
        given = as_choicemap(choices)
        tr, weight = self.generate(args, given)
        _check_all_given(tr.choices, given)
        return weight, tr.retval

    def generate(self, args: tuple[Any, ...],
                 constraints: ChoiceMap | None = None) -> tuple[Trace, torch.Tensor]:
        """Run the function with some choices fixed: ``(trace, weight)``.

        Math: unconstrained choices u ~ q(·; x, c) (the prior for built-in functions);
        weight = log p(t; x) − log q(u; x, c), which with prior proposals is the log density of
        the constrained choices.  Full constraints: weight == score == assess weight.
        """
        raise NotImplementedError(f"{type(self).__name__}.generate")

    def update(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
               constraints: ChoiceMap | None = None) -> tuple[Trace, torch.Tensor, Diff, ChoiceMap]:
        """Move a trace to new arguments and constraints: ``(trace', weight, retdiff, discard)``.

        Math: weight = log p(t'; x') − log p(t; x) − log q(fresh choices); choices that
        appear and are unconstrained are sampled from the prior (q).  ``discard`` holds the
        removed choices and the old values overwritten by constraints, so
        ``update(trace', x, discard)`` returns to ``trace`` with weight −weight.
        """
        raise NotImplementedError(f"{type(self).__name__}.update")

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[Trace, torch.Tensor, Diff]:
        """Resample the selected choices from the prior: ``(trace', weight, retdiff)``.

        Math: weight = Σ over retained, unselected choices of (log p' − log p); selected, new
        and removed choices contribute 0, so with prior proposals the weight is the MH log
        acceptance ratio.
        """
        raise NotImplementedError(f"{type(self).__name__}.regenerate")

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Log density of the selected choices.

        Math: project(t, S) = Σ_{a ∈ S} log p(t[a] | ...); project(t, selectall) = score.
        """
        raise NotImplementedError(f"{type(self).__name__}.project")

    def choice_gradients(self, trace: Trace, selection: Selection | None = None,
                         retgrad: Any = None) -> tuple[tuple[Any, ...], ChoiceMap, ChoiceMap]:
        """Gradients of log p(t; x) + retgrad·retval: ``(arg_grads, choice_values, choice_grads)``.

        Math: arg_grads[i] = ∂/∂x_i [log p(t; x) + retgrad·r]; choice_grads[a] = ∂/∂t[a] of the
        same, for the selected (continuous) choices a.  Non-differentiable arguments get None.
        Works under vmap (per-element gradients) because it is built on torch.func.grad.
        """
        from gfcomb.core.gradients import choice_gradients

        return choice_gradients(self, trace, selection, retgrad)

    def accumulate_param_gradients(self, trace: Trace, retgrad: Any = None,
                                   scale: float = 1.0) -> tuple[Any, ...]:
        """Add −scale·∇θ[log p(t; x) + retgrad·r] to each parameter's ``.grad``; return arg grads.

        Math: for every trainable parameter θ, θ.grad += −scale · ∂/∂θ [log p(t; x) + retgrad·r],
        so a torch.optim step (which descends) ascends log p.  Returns the argument gradients
        ∂/∂x [log p(t; x) + retgrad·r] (not scaled, not negated).
        """
        from gfcomb.core.gradients import accumulate_param_gradients

        return accumulate_param_gradients(self, trace, retgrad, scale)

    # ------------------------------------------------------------------ the batch protocol
    # A batch is ONE trace record with a leading row axis on every tensor leaf.  Arguments and
    # constraints are shared by all rows unless wrapped in ``PerRow``.  The defaults run the
    # per-row method under one vmap over the rows; a generative function whose batch can be
    # handled better as a whole (Unfold's shared step history) overrides them, and a @gen
    # body run over a batch hands such a callee the whole batch (gfcomb.core.vmap).
    def batch_generate(self, n: int, args: tuple[Any, ...],
                       constraints: Any = None) -> tuple[Trace, torch.Tensor]:
        """``generate`` for ``n`` rows at once: ``(traces, weights)``, weights of shape [n].

        Math: row i is an independent ``generate(args_i, constraints_i)``: same weights and
        scores, draws distributed the same.
        """
        args = check_args_tuple(args)
        return map_rows(lambda c, *a: self.generate(a, c), n, constraints, *args,
                        who=f"{self!r}.batch_generate")

    def batch_update(self, traces: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                     constraints: Any = None) -> tuple[Trace, torch.Tensor, Diff, ChoiceMap]:
        """``update`` of every row of the batch ``traces``: ``(traces', weights, retdiff,
        discards)``; the retdiff holds for every row.

        Math: row i is ``update(traces[i], args_i, argdiffs, constraints_i)``: weight_i =
        log p(t_i'; x') − log p(t_i; x) − log q(fresh choices of row i).
        """
        args = check_args_tuple(args)
        retdiffs: list[Diff] = []

        def one(tr: Trace, c: Any, *a: Any) -> tuple[Trace, torch.Tensor, ChoiceMap]:
            new, w, rd, discard = self.update(tr, a, argdiffs, c)
            retdiffs.append(rd)
            return new, w, discard

        n = batch_size(traces)
        crossing = traces.entering_rows() if vectorizing() else traces
        new, w, discard = map_rows(one, n, PerRow(crossing), constraints, *args,
                                   who=f"{self!r}.batch_update")
        return new.leaving_rows(), w, retdiffs[-1], discard

    def batch_regenerate(self, traces: Trace, args: tuple[Any, ...],
                         argdiffs: tuple[Diff, ...],
                         selection: Selection) -> tuple[Trace, torch.Tensor, Diff]:
        """``regenerate`` of every row of the batch ``traces``: ``(traces', weights, retdiff)``.

        Math: row i is ``regenerate(traces[i], args_i, argdiffs, selection)``; with prior
        proposals weight_i is row i's MH log acceptance ratio.
        """
        args = check_args_tuple(args)
        retdiffs: list[Diff] = []

        def one(tr: Trace, *a: Any) -> tuple[Trace, torch.Tensor]:
            new, w, rd = self.regenerate(tr, a, argdiffs, selection)
            retdiffs.append(rd)
            return new, w

        n = batch_size(traces)
        crossing = traces.entering_rows() if vectorizing() else traces
        new, w = map_rows(one, n, PerRow(crossing), *args, who=f"{self!r}.batch_regenerate")
        return new.leaving_rows(), w, retdiffs[-1]

    def batch_select(self, traces: Trace, rows: torch.Tensor) -> Trace:
        """Rows ``rows`` (a 1-d long tensor) of the batch ``traces``: resampling.

        Math: row k of the result is row ``rows[k]`` of ``traces``.  The default indexes every
        tensor leaf; shared leaves (expanded rows) and static parts (shared histories) are
        kept as they are.
        """
        return select_leaves(traces, rows)

    def batch_runs_whole(self, args: tuple[Any, ...]) -> bool:
        """Whether this function's batch methods, called with ``args`` (``PerRow`` where
        they hold one value per row), run once over the whole batch rather than per row
        under a vmap of this function alone.  A ``@gen`` body run once over the whole batch
        (:mod:`gfcomb.dsl.whole`) hands a callee its batch call only when they do (else the
        body runs per row itself: one vmap for the body beats one per call).  The default:
        whether the batch methods are overridden."""
        return not self.batch_matches_per_row()

    def batch_matches_per_row(self) -> bool:
        """Whether the per-row methods, run under the vmap over the rows, give what this
        function's batch methods give (the same values and record layout).  Then a caller
        already running per row calls the per-row methods; otherwise it steps out of the row
        level to make one batch call (an Unfold's batch keeps its steps in a history shared
        by the rows, which no per-row call makes).  The default: True when the batch methods
        are the defaults above, the per-row methods under that vmap; a function whose batch
        methods are the same computation made without the vmap says True as well."""
        cls = type(self)
        known = _DEFAULT_BATCH.get(cls)
        if known is None:
            known = _DEFAULT_BATCH[cls] = all(
                getattr(cls, m) is getattr(GenerativeFunction, m)
                for m in ("batch_generate", "batch_update", "batch_regenerate"))
        return known

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Trainable parameters (of torch modules this function calls), each once."""
        return iter(())

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` pairs; names are ``module_index.parameter_name``."""
        for i, p in enumerate(self.parameters()):
            yield f"param{i}", p
