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
from typing import Any

import torch

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff
from gfcomb.core.errors import ArgumentError, MissingChoiceError
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace


def as_choicemap(constraints: Any) -> ChoiceMap:
    """Accept None, a dict of address -> value, or a ChoiceMap."""
    if constraints is None:
        return ChoiceMap.empty()
    if isinstance(constraints, ChoiceMap):
        return constraints
    return ChoiceMap._from_mapping(constraints)


def weight_like(w: Any, score: torch.Tensor) -> torch.Tensor:
    """A weight (a tensor or a Python number) as a tensor shaped and typed like ``score``:
    ``w`` itself when it already is one (no op), else ``w + zeros_like(score)``."""
    if (isinstance(w, torch.Tensor) and w.shape == score.shape and w.dtype == score.dtype
            and w.device == score.device):
        return w
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


_RUNTIME: dict[str, Any] = {}  # gfcomb.dsl.runtime's entry point, imported on first use


class Invocation:
    """``gen_fn(*args)``: a call waiting for an address, used inside ``@gen`` bodies as
    ``gen_fn(*args) @ "addr"``."""

    __slots__ = ("gen_fn", "args")

    def __init__(self, gen_fn: GenerativeFunction, args: tuple[Any, ...]) -> None:
        self.gen_fn = gen_fn
        self.args = args

    def __matmul__(self, addr: Any) -> Any:
        trace_call = _RUNTIME.get("trace_call")
        if trace_call is None:  # imported once (a function-level import costs ~1 µs a call)
            from gfcomb.dsl.runtime import trace_call as imported

            trace_call = _RUNTIME["trace_call"] = imported
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

    # ------------------------------------------------------------------ batched fast paths
    def _update_rows(self, traces: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                     constraints: ChoiceMap) -> tuple[Trace, torch.Tensor] | None:
        """Optional batched fast path for inference code: ``update`` of every row of the
        batched ``traces`` (one leading axis) to the same ``args``/``constraints``, done
        outside vmap, returning ``(new traces, weights)`` exactly as ``vmap(update)`` would
        (its trace and weight; same random draws), or None when there is no such path for
        this call (the default), and the caller vmaps ``update``.  Unfold has one for updates
        that only append steps (a particle-filter step)."""
        return None

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Trainable parameters (of torch modules this function calls), each once."""
        return iter(())

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` pairs; names are ``module_index.parameter_name``."""
        for i, p in enumerate(self.parameters()):
            yield f"param{i}", p
