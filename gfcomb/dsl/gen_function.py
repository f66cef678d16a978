"""``@gen`` functions: generative functions written as ordinary Python.

.. code-block:: python

    @gf.gen
    def model(xs):
        slope = gf.normal(0.0, 1.0) @ "slope"
        for i, x in enumerate(xs):
            gf.normal(slope * x, 1.0) @ ("y", i)
        return slope

Inside the body, ``callee(*args) @ addr`` traces a call of any generative function at
``addr`` (a key or a tuple of keys: a hierarchical address) and returns its value;
``gf.splice(sub(*args))`` runs a @gen callee with its choices in the caller's namespace.
Ordinary Python control flow is allowed (outside vmap), so the set of addresses may depend on
earlier choices.  Torch modules may be called anywhere; their parameters are found by
:meth:`GenFunction.parameters`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, cast, overload

import attrs
import torch

from gfcomb.core.address import normalize
from gfcomb.core.batched import batch_size
from gfcomb.core.batching import expanded_rows
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.deferred import Deferred, resolve
from gfcomb.core.diff import Diff, NoChange, all_unchanged
from gfcomb.core.errors import AddressError, ArgumentError
from gfcomb.core.gfi import (
    GenerativeFunction,
    as_choicemap,
    check_argdiffs,
    check_args_tuple,
    check_trace,
    weight_like,
    zero_weight,
)
from gfcomb.core.pytree import register_record, tree_tensors
from gfcomb.core.runtime import running
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.core.validation import check_selection
from gfcomb.core.vmap import RowView, batch_value, unwrap_rows
from gfcomb.dsl.argdiffs import Source
from gfcomb.dsl.handlers import (
    AssessHandler,
    GenerateHandler,
    Handler,
    RegenerateHandler,
    SimulateHandler,
    UpdateHandler,
)
from gfcomb.dsl.parameters import (
    collect_once,
    recording_modules,
    referenced_objects,
    unique_parameters,
)
from gfcomb.dsl.whole import NeedsRows, WholeCalls, body_args, rows_in, whole_or_rows

Address = tuple[Any, ...]


def _choices_of(subtraces: dict[Address, Trace]) -> ChoiceMap:
    tree: dict[Any, Any] = {}
    for addr, tr in subtraces.items():
        cm = tr.choices
        if cm.is_empty():
            continue
        node = tree
        for k in addr[:-1]:
            node = node.setdefault(k, {})
        node[addr[-1]] = cm
    return _choice_node(tree)


def _choice_node(node: dict[Any, Any]) -> ChoiceMap:
    # (module-level, not a closure: a recursive closure is a reference cycle, garbage that
    # only the cyclic collector frees -- per trace read, it set off collections mid-filter)
    return ChoiceMap.node({k: v if isinstance(v, ChoiceMap) else _choice_node(v)
                           for k, v in node.items()})


@attrs.frozen(repr=False)
class GenTrace(Trace):
    """The trace of a @gen function: one sub-trace per traced call, keyed by address."""

    gen_fn: GenFunction
    args: tuple[Any, ...]
    _retval: Any  # the body's return value, or a CalleeReturn naming the callee it is
    score: torch.Tensor
    subtraces: dict[Address, Trace]
    # None when unknown (a trace combined from traces with different bookkeeping)
    sources: dict[Address, tuple[Source | None, ...]] | None = attrs.field(eq=False, repr=False)
    ret_source: Source | None = attrs.field(eq=False, repr=False)
    _layout: Any = attrs.field(default=None, eq=False, repr=False)
    _choices: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def retval(self) -> Any:  # type: ignore[override]
        """The body's return value (read from the callee's trace when the body returned a
        callee's deferred value as it was)."""
        r = self._retval
        if type(r) is CalleeReturn:
            return self.subtraces[r.address].retval
        return r

    @property
    def choices(self) -> ChoiceMap:
        cached = self._choices
        if cached is None:
            cached = _choices_of(self.subtraces)
            object.__setattr__(self, "_choices", cached)
        return cached

    def _after_unflatten(self) -> None:
        object.__setattr__(self, "_choices", None)

    def subtrace(self, addr: Any) -> Trace:
        """The trace of the call at ``addr``."""
        path = normalize(addr)
        if path not in self.subtraces:
            raise AddressError("no traced call at address {addr}", path)
        return self.subtraces[path]

    def __getitem__(self, addr: Any) -> Any:
        path = normalize(addr)
        for i in range(len(path), 0, -1):
            prefix = path[:i]
            if any(isinstance(k, slice) for k in prefix):
                continue
            sub = self.subtraces.get(prefix)
            if sub is not None:
                try:
                    return sub[path[i:]]
                except AddressError as err:  # name the full address, not the callee's part
                    raise err.prefixed(prefix) from None
        return self.choices[path]


    def discrete_addresses(self) -> Iterator[tuple[Any, ...]]:
        """Every sub-trace's discrete addresses under its address."""
        for addr, sub in self.subtraces.items():
            for pattern in sub.discrete_addresses():
                yield addr + pattern

    def compacted(self) -> GenTrace:
        """Every sub-trace compacted (see :meth:`Trace.compacted`)."""
        return self._with_subtraces({a: t.compacted() for a, t in self.subtraces.items()})

    def with_layout_of(self, other: Trace) -> GenTrace:
        """Every sub-trace laid out like ``other``'s at the same address (see
        :meth:`Trace.with_layout_of`)."""
        if not isinstance(other, GenTrace) or other.subtraces.keys() != self.subtraces.keys():
            return self
        theirs = other.subtraces
        return self._with_subtraces({a: t.with_layout_of(theirs[a])
                                     for a, t in self.subtraces.items()})

    def entering_rows(self) -> GenTrace:
        """Sub-traces of callees with batch methods of their own held as RowViews (the body's
        handler hands such a callee the whole batch, so its sub-trace need not cross the vmap
        leaf by leaf); the others' own :meth:`Trace.entering_rows`."""
        return self._with_subtraces({
            a: t.entering_rows() if t.gen_fn.batch_matches_per_row()
            else cast(Trace, RowView(t))  # (read as the trace it views)
            for a, t in self.subtraces.items()})

    def leaving_rows(self) -> GenTrace:
        """RowViews of whole batches among the sub-traces replaced by those batches."""
        return self._with_subtraces({
            a: batch_value(t) if type(t) is RowView else t.leaving_rows()
            for a, t in self.subtraces.items()})

    def _with_subtraces(self, subtraces: dict[Address, Trace]) -> GenTrace:
        if all(subtraces[a] is t for a, t in self.subtraces.items()):
            return self
        return attrs.evolve(self, subtraces=subtraces, layout=None)


@attrs.frozen
class CalleeReturn:
    """A @gen trace's return value that is the return value of its call at ``address``
    (kept unbuilt: the body returned that callee's deferred value as it was)."""

    address: tuple[Any, ...]


register_record(GenTrace, dynamic=("args", "_retval", "score", "subtraces"),
                static=("gen_fn", "sources", "ret_source"))


class GenFunction(GenerativeFunction):
    """A generative function defined by a Python function body (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)
        self._modules: dict[int, torch.nn.Module] = {}
        self._callees: dict[int, GenerativeFunction] = {}

    def __repr__(self) -> str:
        return f"<@gen {getattr(self.fn, '__qualname__', self.fn)!r}>"

    # ------------------------------------------------------------------ running the body
    def run_body(self, handler: Handler, args: tuple[Any, ...]) -> Any:
        """Run the body with ``handler`` receiving its traced calls (a spliced callee runs
        with its caller's handler)."""
        with running(handler), recording_modules(self):
            return self.fn(*args)

    def _trace(self, handler: Handler, args: tuple[Any, ...], retval: Any) -> GenTrace:
        source = handler.tracker.source_of(retval)
        score = handler.total(handler.score)
        whole = handler.whole
        if whole is not None:  # (the body ran once over the batch: its rows)
            args, retval = rows_in(args, whole.n), rows_in(retval, whole.n)
            if score.dim() == 0:
                score = expanded_rows(score, whole.n)
        # (a callee's deferred return value returned as it is, read or not, is named, not
        # stored: one record layout, so that traces of one batch made by different routes
        # merge leaf by leaf)
        if type(retval) is Deferred and source is not None and source[0] == "ret":
            retval = CalleeReturn(source[1])
        else:
            retval = resolve(retval)
        return GenTrace(self, args, retval, score, handler.subtraces, handler.sources, source)

    def _note_callee(self, gen_fn: GenerativeFunction) -> None:
        self._callees.setdefault(id(gen_fn), gen_fn)

    def _note_module(self, module: torch.nn.Module) -> None:
        self._modules.setdefault(id(module), module)

    # ------------------------------------------------------------------ the GFI
    def simulate(self, args: tuple[Any, ...]) -> GenTrace:
        """Run the body, sampling every traced call.

        Math: t ~ p(·; x); score = Σ over calls of the callee scores = log p(t; x).
        """
        args = check_args_tuple(args)
        h = SimulateHandler(self, args)
        retval = self.run_body(h, args)
        return self._trace(h, args, retval)

    def generate(self, args: tuple[Any, ...],
                 constraints: ChoiceMap | dict[Any, Any] | None = None,
                 ) -> tuple[GenTrace, torch.Tensor]:
        """Run the body with the constrained choices fixed.

        Math: weight = Σ over calls of the callee generate weights; with prior proposals this
        is Σ log p of the constrained choices.  Full constraints: weight == score.
        """
        return self._generate(check_args_tuple(args), as_choicemap(constraints), None)

    def _generate(self, args: tuple[Any, ...], cm: ChoiceMap, whole: WholeCalls | None,
                  ) -> tuple[GenTrace, torch.Tensor]:
        """generate, per row (``whole`` None) or once over a whole batch."""
        if cm.is_empty():
            h: Handler = SimulateHandler(self, args)
            h.whole = whole
            tr = self._trace(h, args, self.run_body(h, args))
            return tr, zero_weight(tr.score)
        h = GenerateHandler(self, args, cm)
        h.whole = whole
        retval = self.run_body(h, args)
        h._check_all_visited(cm, "generate")
        tr = self._trace(h, args, retval)
        if h.weights_are_scores():  # every call fully constrained: weight == score
            return tr, tr.score
        return tr, weight_like(h.weight, tr.score)

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap | dict[Any, Any],
               ) -> tuple[torch.Tensor, Any]:
        """Score the given choices.

        Math: weight = log p(t; x) = Σ over calls of the callee assess weights; every choice
        the body visits must be given (MissingChoiceError otherwise) and every given choice
        must be visited.
        """
        args = check_args_tuple(args)
        cm = as_choicemap(choices)
        h = AssessHandler(self, args, cm)
        retval = self.run_body(h, args)
        h.check_all_visited()
        return h.total(h.weight), retval

    def update(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
               constraints: ChoiceMap | dict[Any, Any] | None = None,
               ) -> tuple[GenTrace, torch.Tensor, Diff, ChoiceMap]:
        """Re-run the body against the old trace with new arguments and constraints.

        Math: weight = Σ callee update weights + Σ generate weights of new calls − Σ scores
        of removed calls = log p(t'; x') − log p(t; x) − log q(fresh choices).  Callee argdiffs
        are computed (argdiffs.py): unchanged callees do no work.  discard = overwritten
        values and the choices of removed calls.
        """
        trace = _check_own_trace(self, trace)
        args = check_args_tuple(args)
        argdiffs = check_argdiffs(args, argdiffs, repr(self))
        return self._update(trace, args, argdiffs, as_choicemap(constraints), None)

    def _update(self, trace: GenTrace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                cm: ChoiceMap, whole: WholeCalls | None,
                ) -> tuple[GenTrace, torch.Tensor, Diff, ChoiceMap]:
        """update, per row (``whole`` None) or once over a whole batch."""
        if cm.is_empty() and all_unchanged(argdiffs):
            return trace, zero_weight(trace.score), NoChange(), ChoiceMap.empty()
        h = UpdateHandler(self, trace, args, argdiffs, cm)
        h.whole = whole
        retval = self.run_body(h, args)
        h._check_all_visited(cm, "update")
        removed = h.removed()
        weight = h.total(h.weight)
        for _, old in removed:
            weight = weight - old.score
        new = self._trace(h, args, retval)
        retdiff = h.tracker.diff_of_value(retval, trace._retval, trace.ret_source)
        return new, weight_like(weight, new.score), retdiff, h.discard(removed)

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[GenTrace, torch.Tensor, Diff]:
        """Re-run the body resampling the selected choices from the prior.

        Math: weight = Σ callee regenerate weights = Σ over retained unselected choices of
        (log p' − log p); selected, new and removed choices contribute 0, so the weight is
        the MH log acceptance ratio for the prior proposal.
        """
        trace = _check_own_trace(self, trace)
        args = check_args_tuple(args)
        argdiffs = check_argdiffs(args, argdiffs, repr(self))
        check_selection(selection, self, "regenerate")
        return self._regenerate(trace, args, argdiffs, selection, None)

    def _regenerate(self, trace: GenTrace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                    selection: Selection, whole: WholeCalls | None,
                    ) -> tuple[GenTrace, torch.Tensor, Diff]:
        """regenerate, per row (``whole`` None) or once over a whole batch."""
        if selection.is_empty_static() and all_unchanged(argdiffs):
            return trace, zero_weight(trace.score), NoChange()
        h = RegenerateHandler(self, trace, args, argdiffs, selection)
        h.whole = whole
        retval = self.run_body(h, args)
        new = self._trace(h, args, retval)
        retdiff = h.tracker.diff_of_value(retval, trace._retval, trace.ret_source)
        return new, weight_like(h.weight, new.score), retdiff

    # ------------------------------------------------------------------ the batch protocol
    # Each first runs the body once over the whole batch (gfcomb/dsl/whole.py), and, when the
    # body needs its rows, the per-row method under the vmap over the rows (the default).
    def batch_matches_per_row(self) -> bool:
        """True: these batch methods give what the per-row methods give under the vmap over
        the rows, so a caller already running per row calls the per-row methods."""
        return True

    def batch_runs_whole(self, args: tuple[Any, ...]) -> bool:
        """Whether the batch methods run the body once over the whole batch: until a run of
        it has needed the rows (then they run it under the vmap over the rows, as a caller
        running its own body per row would)."""
        return not self._rows_only() and body_args(args) is not None

    def _rows_only(self) -> set[str]:
        """The batch methods whose whole-batch run of the body was abandoned: they run under
        the vmap over the rows straight away."""
        return self.__dict__.setdefault("_rows_only_methods", set())

    def batch_generate(self, n: int, args: tuple[Any, ...],
                       constraints: Any = None) -> tuple[Trace, torch.Tensor]:
        """See :meth:`GenerativeFunction.batch_generate` (same math)."""
        def whole() -> tuple[Trace, torch.Tensor]:
            bargs = body_args(check_args_tuple(args))
            if bargs is None:
                raise NeedsRows
            cm, per_row = unwrap_rows(constraints)
            return self._generate(bargs, as_choicemap(cm), WholeCalls(n, per_row))

        return whole_or_rows(self._rows_only(), "generate", whole,
                             lambda: super(GenFunction, self).batch_generate(n, args,
                                                                             constraints))

    def batch_update(self, traces: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                     constraints: Any = None) -> tuple[Trace, torch.Tensor, Diff, ChoiceMap]:
        """See :meth:`GenerativeFunction.batch_update` (same math)."""
        def whole() -> tuple[Trace, torch.Tensor, Diff, ChoiceMap]:
            trace = _check_own_trace(self, traces)
            bargs = body_args(check_args_tuple(args))
            if bargs is None:
                raise NeedsRows
            cm, per_row = unwrap_rows(constraints)
            return self._update(trace, bargs, check_argdiffs(args, argdiffs, repr(self)),
                                as_choicemap(cm), WholeCalls(batch_size(trace), per_row))

        return whole_or_rows(self._rows_only(), "update", whole,
                             lambda: super(GenFunction, self).batch_update(
                                 traces, args, argdiffs, constraints))

    def batch_regenerate(self, traces: Trace, args: tuple[Any, ...],
                         argdiffs: tuple[Diff, ...],
                         selection: Selection) -> tuple[Trace, torch.Tensor, Diff]:
        """See :meth:`GenerativeFunction.batch_regenerate` (same math)."""
        def whole() -> tuple[Trace, torch.Tensor, Diff]:
            trace = _check_own_trace(self, traces)
            bargs = body_args(check_args_tuple(args))
            if bargs is None or tree_tensors(selection):  # (per-row selection flags)
                raise NeedsRows
            check_selection(selection, self, "regenerate")
            return self._regenerate(trace, bargs, check_argdiffs(args, argdiffs, repr(self)),
                                    selection, WholeCalls(batch_size(trace), False))

        return whole_or_rows(self._rows_only(), "regenerate", whole,
                             lambda: super(GenFunction, self).batch_regenerate(
                                 traces, args, argdiffs, selection))

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Math: project(t, S) = Σ over calls at a of callee.project(t_a, S[a])."""
        trace = _check_own_trace(self, trace)
        check_selection(selection, self, "project")
        if selection.is_all_static():
            return trace.score
        total = torch.zeros_like(trace.score)
        if selection.is_empty_static():
            return total
        for addr, sub in trace.subtraces.items():
            subsel = selection.get_subselection_at(addr)
            if subsel.is_empty_static():
                continue
            total = total + sub.gen_fn.project(sub, subsel)
        return total

    # ------------------------------------------------------------------ parameters
    def modules(self) -> list[torch.nn.Module]:
        """Torch modules this function references or has called (each once, by identity)."""
        found: dict[int, torch.nn.Module] = {}
        for obj in referenced_objects(self.fn):
            if isinstance(obj, torch.nn.Module):
                found.setdefault(id(obj), obj)
        for m in list(self._modules.values()):  # (a snapshot: other threads may add)
            found.setdefault(id(m), m)
        return list(found.values())

    def callees(self) -> list[GenerativeFunction]:
        """Generative functions this function references or has called."""
        found: dict[int, GenerativeFunction] = {}
        for obj in referenced_objects(self.fn):
            if isinstance(obj, GenerativeFunction) and obj is not self:
                found.setdefault(id(obj), obj)
        for c in list(self._callees.values()):  # (a snapshot: other threads may add)
            if c is not self:
                found.setdefault(id(c), c)
        return list(found.values())

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Trainable parameters of the modules this function (or a callee) uses, each once."""
        # (collect_once: a context-local guard against recursion through callees)
        return iter(collect_once(
            self, lambda: list(unique_parameters(self.modules(), self.callees()))))

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` with the modules' own names: ``"encoder.0.weight"`` for the
        parameter ``0.weight`` of the module this body (or a callee's) holds in the variable
        ``encoder``; each parameter once.  The names are :meth:`module`'s ``state_dict``
        keys; parameters of callees that are not torch modules come last as ``paramN``."""
        named = list(self.module().named_parameters())
        seen = {id(p) for _, p in named}
        yield from named
        for i, p in enumerate(self.parameters()):
            if id(p) not in seen:
                seen.add(id(p))
                yield f"param{i}", p

    def module(self) -> torch.nn.ModuleDict:
        """One ``torch.nn.Module`` holding every module this function calls (its own and its
        callees', kernels' and branches'), keyed by the variable names that hold them:
        ``state_dict()``/``load_state_dict()`` save and restore all of them, ``.to(device)``
        moves all of them (the modules themselves, not copies)."""
        from gfcomb.dsl.parameters import module_view

        return module_view(self)



def _check_own_trace(gen_fn: GenFunction, trace: Any) -> GenTrace:
    return check_trace(gen_fn, trace, GenTrace)


@overload
def gen(fn: Callable[..., Any], *, name: str | None = None) -> GenFunction: ...


@overload
def gen(fn: None = None, *,
        name: str | None = None) -> Callable[[Callable[..., Any]], GenFunction]: ...


def gen(fn: Callable[..., Any] | None = None, *,
        name: str | None = None) -> GenFunction | Callable[[Callable[..., Any]], GenFunction]:
    """Decorator: turn a Python function into a generative function (see module docstring).

    ``@gf.gen(name="step")`` also gives it a name (its ``__name__``, by default the
    function's): the name ``gf.save`` stores it under and ``gf.load(gen_fns=...)`` binds.
    """
    if name is not None and (not isinstance(name, str) or not name):
        raise ArgumentError(f"gf.gen: name must be a non-empty str, got {name!r}")
    if fn is None:
        return lambda f: gen(f, name=name)
    g = GenFunction(fn)
    if name is not None:
        g.__name__ = name  # type: ignore[attr-defined]
    return g
