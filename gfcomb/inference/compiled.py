"""Compiled inference steps: capture the tensor work of a step once, replay it compiled.

``torch.compile`` cannot follow gfcomb's Python machinery (handlers, choice maps, vmap
levels, attrs records) into one graph, and most of that machinery is the same at every step
of a filter or a chain: the addresses, the record structure and the control flow depend on
the model, not on the values.  :func:`compile_step` exploits that.  The first call with a
given input structure runs the step once under ``make_fx`` (``torch.fx``'s tracer, real
tensors): every aten op the step executes -- inside gfcomb's GFI calls, vmaps and gradients
included -- is recorded into one graph of the step's tensor inputs, and gfcomb's Python work
disappears from it.  The graph is compiled with ``torch.compile`` and every later call with
the same structure replays it: flatten the inputs (gfcomb traces are pytrees), run the
compiled graph, rebuild the outputs.

.. code-block:: python

    step = gf.inference.compile_step(lambda tr: gf.inference.mh(tr, gf.select("mu")))
    for _ in range(1000):
        traces, accepted = step(traces)

What the step must be (checked, or refused with :class:`CaptureError`, never replayed
wrongly):

* static control flow: nothing read on the host from a tensor that depends on the inputs
  (``float(t)``, ``bool(t)``, ``.item()``, ``.tolist()`` raise at capture; so a particle
  filter made with ``pf_initialize(check_every=k)``, whose checks stay on the device, is the
  form to compile, and ``check_every=1`` filters are refused);
* fixed structure: the outputs are built from the graph's outputs and static data only.  A
  step whose records keep tensors made during the step in their static part (the shared step
  history of a batched ``Unfold`` trace, which grows by one block at every ``pf_update``) is
  refused: its graph could not be replayed.  Compile a step over fixed-shape state instead
  (for a filter: the kernel's current state, as in docs/compiling.md);
* everything that changes between calls is an argument (tensor leaves are graph inputs;
  other leaves -- Python numbers, strings -- are static and a new value captures a new graph;
  tensors the step closes over are baked in as constants).

Randomness: the graph draws from torch's global generator in the order the eager step does
(inductor's ``fallback_random``), and the capture run does not consume draws (the generator
is rewound), so with the same seed a compiled step returns exactly what the eager step
returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError, GFIError
from gfcomb.core.flat import flatten, static_leaves, unflatten, without_bookkeeping
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.core.pytree import tree_index
from gfcomb.core.vmap import PerRow
from gfcomb.inference.importance import check_gen_fn, check_n
from gfcomb.inference.resampling import Flag, mark_flag, static_shapes, systematic_from_cdf

__all__ = ["CaptureError", "CompiledStep", "compile_step", "kernel_filter_step"]


class CaptureError(GFIError, RuntimeError):
    """A step cannot be captured into one replayable graph (data-dependent control flow, or
    tensors made by the step kept in the static part of its outputs)."""


def _tensors_in(obj: Any, found: dict[int, torch.Tensor], seen: set[int]) -> None:
    """Collect the tensors reachable from ``obj`` (static pytree data: tuples, dicts, records
    with ``__slots__`` or ``__dict__``), not looking inside generative functions, modules,
    classes or functions (the user's model objects, the same at every step)."""
    if id(obj) in seen or obj is None or isinstance(obj, (int, float, str, bytes, bool)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found[id(obj)] = obj
    elif isinstance(obj, (GenerativeFunction, torch.nn.Module, type)) or callable(obj):
        return
    elif isinstance(obj, (tuple, list, set, frozenset)):
        for x in obj:
            _tensors_in(x, found, seen)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors_in(k, found, seen)
            _tensors_in(v, found, seen)
    else:
        for x in getattr(obj, "__dict__", {}).values():
            _tensors_in(x, found, seen)
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                _tensors_in(getattr(obj, name, None), found, seen)


#: input leaves that are static values as they are (compared with ==, part of the key)
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _meta(t: torch.Tensor) -> tuple[Any, ...]:
    # (the strides too: a graph compiled for one layout is replayed on that layout only, so
    # inductor's per-call layout asserts are off)
    return (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def _spec_tensors(spec: Any) -> dict[int, torch.Tensor]:
    """The tensors held in the static part of a :func:`gfcomb.core.flat.flatten` spec (its
    non-tensor leaves, records' static fields, other nodes' contexts) that its values depend
    on: not those in bookkeeping (a @gen trace's argument sources may name a constant the
    step made, and stay right replayed; :func:`~gfcomb.core.flat.without_bookkeeping`)."""
    found: dict[int, torch.Tensor] = {}
    _tensors_in(without_bookkeeping(spec), found, set())
    return found


def _place(t: torch.Tensor) -> tuple[Any, ...]:
    """Where a tensor's values lie: two tensors with one place are the same values (an input
    and a view of it that covers it the same way, as a row expanded again)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype,
            t.device)


def _same_key(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    try:
        return bool(a == b)
    except RuntimeError:  # a static part holding tensors of several elements: not the same
        return False


class _Graph:
    """One captured structure: its key, the compiled graph and how to rebuild the output.

    ``outputs`` has one entry per output tensor leaf: the index of the input tensor it is
    (a value the step passed through unchanged: handed back as it is, not through the graph)
    or None (the graph's next output).  ``parts``: per element of the step's result (one
    element when the result is not a tuple), its flatten spec and number of tensor leaves.
    ``out_metas``: the output leaves' layouts, read at the first replay."""

    __slots__ = ("key", "run", "outputs", "parts", "is_tuple", "out_metas")

    def __init__(self, key: tuple[Any, ...], run: Callable[..., Any],
                 outputs: list[int | None], parts: list[tuple[Any, int]],
                 is_tuple: bool) -> None:
        self.key = key
        self.run = run
        self.outputs = outputs
        self.parts = parts
        self.is_tuple = is_tuple
        self.out_metas: list[tuple[Any, ...]] | None = None


class CompiledStep:
    """A step function captured per input structure and replayed compiled (made by
    :func:`compile_step`); call it as the step itself."""

    def __init__(self, step: Callable[..., Any], backend: str, max_graphs: int,
                 options: dict[str, Any]) -> None:
        self.step = step
        self.backend = backend
        self.max_graphs = max_graphs
        self.options = options
        self.graphs: list[_Graph] = []
        # the records the last call returned, by id: (record, spec, tensor leaves, layouts).
        # Records are immutable, so one passed back in (the usual chain or filter loop) is
        # not walked again.
        self._returned: dict[int, tuple[Any, Any, list[torch.Tensor], list[Any]]] = {}

    def __repr__(self) -> str:
        return (f"CompiledStep({getattr(self.step, '__name__', self.step)!r}, "
                f"backend={self.backend!r}, {len(self.graphs)} graph(s))")

    def __call__(self, *args: Any) -> Any:
        tensors: list[torch.Tensor] = []
        metas: list[Any] = []
        specs = []
        for a in args:
            known = self._returned.get(id(a))
            if known is not None and known[0] is a:
                specs.append(known[1])
                tensors.extend(known[2])
                metas.extend(known[3])
                continue
            start = len(tensors)
            specs.append(flatten(a, tensors))
            metas.extend([_meta(t) for t in tensors[start:]])
        key = (tuple(specs), tuple(metas))
        graph = next((g for g in self.graphs if _same_key(g.key, key)), None)
        if graph is None:
            graph = self._capture(key, specs, tensors)
        computed = iter(graph.run(*tensors))
        outs = [next(computed) if i is None else tensors[i] for i in graph.outputs]
        if graph.out_metas is None:
            graph.out_metas = [_meta(t) for t in outs]
        returned: dict[int, tuple[Any, Any, list[torch.Tensor], list[Any]]] = {}
        elements = []
        start = 0
        for spec, count in graph.parts:
            leaves = outs[start:start + count]
            element = unflatten(spec, iter(leaves))
            if count and not isinstance(element, torch.Tensor):
                returned[id(element)] = (element, spec, leaves,
                                         graph.out_metas[start:start + count])
            elements.append(element)
            start += count
        self._returned = returned
        return tuple(elements) if graph.is_tuple else elements[0]

    def _check_static(self, x: Any) -> None:
        """Refuse a non-tensor input leaf that holds tensors (a record not registered as a
        pytree): its tensors would be baked into the graph as constants."""
        found: dict[int, torch.Tensor] = {}
        _tensors_in(x, found, set())
        if found:
            raise CaptureError(
                f"compile_step({getattr(self.step, '__name__', 'the step')}): an input of type "
                f"{type(x).__name__} holds tensors but is not a pytree node, so they would be "
                "baked into the graph as constants. Pass its tensors (or gfcomb traces and "
                "choice maps, which are pytrees) instead.")

    def _capture(self, key: tuple[Any, ...], specs: list[Any], tensors: list[torch.Tensor],
                 ) -> _Graph:
        name = getattr(self.step, "__name__", "the step")
        for x in (x for spec in specs for x in static_leaves(spec)):
            if type(x) not in _PLAIN:
                self._check_static(x)
        if len(self.graphs) >= self.max_graphs:
            raise CaptureError(
                f"compile_step({name}): {self.max_graphs} input structures captured already; "
                "the step's inputs change structure from call to call (a growing Unfold "
                "history, a Python number among the arguments, new shapes), so every call "
                "would be captured and compiled anew. Pass changing numbers as tensors, or "
                "raise max_graphs.")
        layout: list[Any] = []

        def flat(*ts: torch.Tensor) -> list[torch.Tensor]:
            it = iter(ts)
            result = self.step(*[unflatten(spec, it) for spec in specs])
            is_tuple = type(result) is tuple
            out_tensors: list[torch.Tensor] = []
            parts = []
            for element in result if is_tuple else (result,):
                start = len(out_tensors)
                parts.append((flatten(element, out_tensors), len(out_tensors) - start))
            given = {_place(t): i for i, t in enumerate(ts)}
            outputs = [given.get(_place(t)) for t in out_tensors]
            layout[:] = [parts, is_tuple, outputs]
            return [t for t, i in zip(out_tensors, outputs) if i is None]

        devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):  # the capture run's draws are undone
            try:
                with static_shapes():
                    gm = make_fx(flat, tracing_mode="real")(*tensors)
            except RuntimeError as err:
                if "_local_scalar_dense" not in str(err) and "data-dependent" not in str(err):
                    raise
                raise CaptureError(
                    f"compile_step({name}): the step reads on the host the value of a tensor "
                    "computed from its inputs (float(), int(), bool(), .item(), .tolist(), a "
                    "Python `if` on a tensor), so its control flow depends on the data and "
                    "one graph cannot replay it. Keep such checks on the device (a particle "
                    "filter: pf_initialize(check_every=k) and pf_check at the end).") from err
        parts, is_tuple, outputs = layout
        made = (set().union(*(_spec_tensors(spec) for spec, _ in parts))
                - set().union(*(_spec_tensors(spec) for spec in specs)))
        if made:
            raise CaptureError(
                f"compile_step({name}): the step's outputs keep {len(made)} tensor(s) in "
                "their static part (or in a record that is not a pytree) that the step did not "
                "receive (e.g. the step history of a batched Unfold trace, which grows at "
                "every pf_update), so a replayed graph could not rebuild them. Compile a step "
                "over fixed-shape state: for a filter, the kernel's current state "
                "(docs/compiling.md).")
        run = self._compiled(gm, tensors)
        graph = _Graph(key, run, outputs, parts, is_tuple)
        self.graphs.append(graph)
        return graph

    def _compiled(self, gm: torch.fx.GraphModule, tensors: list[torch.Tensor]) -> Any:
        """The captured graph, compiled by the chosen backend."""
        if self.backend == "none":
            return gm
        if self.backend == "inductor":
            # the graph is aten already: hand it to inductor directly (its documented entry
            # for graphs captured without dynamo); torch.compile would add a dynamo frame and
            # its guards, ~100 us a call, more than the whole step at small N
            import torch._inductor

            example: list[Any] = list(tensors)
            try:
                with torch._inductor.config.patch(self.options):
                    return torch._inductor.compile(gm, example)
            except Exception as err:  # (inductor raises many kinds; say what to do instead)
                raise CaptureError(
                    f"compile_step({getattr(self.step, '__name__', 'the step')}): inductor "
                    f"could not compile the captured graph ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}); backend='none' replays "
                    "it uncompiled, backend='aot_eager' through torch.compile.") from err
        return torch.compile(gm, backend=self.backend, fullgraph=True, dynamic=False)


def compile_step(step: Callable[..., Any], *, backend: str = "inductor", max_graphs: int = 8,
                 same_random: bool = True) -> CompiledStep:
    """Capture ``step`` (a function of pytrees of tensors and gfcomb records -- traces,
    choice maps -- returning the same) once per input structure and replay it compiled.

    ``backend``: ``torch.compile``'s backend ("inductor", the default, needs a C++ compiler
    on CPU; "aot_eager"; "eager"), or "none" to replay the captured graph uncompiled (no
    compiler needed; most of the saving is gfcomb's Python work, which the graph drops).
    ``max_graphs``: how many input structures to capture before refusing (a step whose
    structure changes at every call would recompile at every call).  ``same_random``
    (inductor only): draw random numbers exactly as the eager step does (inductor's
    ``fallback_random``), so that a seeded compiled run equals the eager run.

    Raises :class:`CaptureError` at the first call when the step cannot be replayed from one
    graph (see the module docstring: data-dependent control flow, tensors made by the step
    kept in its outputs' static part).  See docs/compiling.md.
    """
    if not callable(step):
        raise ArgumentError(f"compile_step: step must be callable, got {step!r}")
    if backend not in ("inductor", "aot_eager", "eager", "none"):
        raise ArgumentError(f"compile_step: backend must be 'inductor', 'aot_eager', 'eager' or "
                            f"'none', got {backend!r}")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ArgumentError(f"compile_step: max_graphs must be a positive int, got "
                            f"{max_graphs!r}")
    options: dict[str, Any] = {"size_asserts": False, "alignment_asserts": False}
    if same_random:
        options["fallback_random"] = True
    return CompiledStep(step, backend, max_graphs, options)


def kernel_filter_step(kernel: GenerativeFunction, n_particles: int) -> Callable[..., Any]:
    """A particle-filter step over the current states of an ``Unfold`` kernel, in the
    fixed-shape form that :func:`compile_step` captures.

    ``step(t, states, log_ml, flag, observations, *params) -> (states, log_ml, flag)``:
    ``kernel(t, state_i, *params)`` is run for every particle i (one
    ``kernel.batch_generate`` with ``observations``, a ChoiceMap of the step's kernel-level
    addresses, as constraints), the weights are banked into ``log_ml`` and the new states
    are resampled systematically.  ``t`` should be a tensor (a Python int is static: a new
    graph per value); ``flag`` is the device-side degeneracy check
    (:func:`gfcomb.inference.resampling.no_flag` to start,
    :func:`~gfcomb.inference.resampling.raise_flagged` to read it).  Only the current states
    are kept, as in a hand-written filter; for the whole trajectories use ``pf_*``.

    Math: the bootstrap filter of ``pf_update`` + ``pf_resample`` on ``Unfold(kernel)``,
    resampling at every step: log w_i = log p(y_t | x_t,i) (the generate weight),
    log_ml += logsumexp(log w) − log N, x_t ← x_t,a_k with systematic ancestors a_k.  With
    the same seed it draws what those calls draw.
    """
    check_gen_fn(kernel, "kernel", "kernel_filter_step")
    n = check_n(n_particles, "n_particles", "kernel_filter_step")

    def step(t: Any, states: Any, log_ml: torch.Tensor, flag: Flag,
             observations: ChoiceMap, *params: Any) -> tuple[Any, torch.Tensor, Flag]:
        traces, log_w = kernel.batch_generate(n, (t, PerRow(states), *params), observations)
        m = torch.amax(log_w, 0)
        flag = mark_flag(flag, m, t)
        cdf = torch.cumsum(torch.where(torch.isfinite(m), log_w - m, 0.0).exp_(), 0)
        mean_w = cdf[-1] / n
        ancestors = systematic_from_cdf(cdf, n, mean=mean_w)
        return tree_index(traces.retval, ancestors), log_ml + m + torch.log(mean_w), flag

    step.__name__ = f"kernel_filter_step({getattr(kernel, '__name__', 'kernel')})"
    return step
