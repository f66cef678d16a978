"""TorchGenerativeFunction: a torch module as a deterministic generative function.

The counterpart of GenPyTorch's ``TorchGenerativeFunction``: it makes no random choices, its
return value is ``module(*args)``, gradients flow to its inputs (``choice_gradients``'
argument gradients) and to its parameters (``accumulate_param_gradients``), and it runs in
the module's dtype and on its device (floating-point tensor arguments are converted to the
dtype of the module's parameters and moved to their device, so a float64 model can call a
float32 network).

``arg_grads`` says which arguments take gradients (GenPyTorch's
``TorchArg(supports_gradients)``): ``TorchGenerativeFunction(net, arg_grads=(True, False))``
differentiates through the first argument only; the second is detached, so no gradient
flows back through it into the caller (a @gen model's ``choice_gradients`` gets none through
that input) and this function's own argument gradient for it is ``None``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch

from gfcomb.core.batching import inside_functorch_transform
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange, all_unchanged
from gfcomb.core.errors import ArgumentError, UnvisitedConstraintError
from gfcomb.core.gfi import GenerativeFunction, as_choicemap, check_args_tuple
from gfcomb.core.pytree import register_record
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace


@attrs.frozen(repr=False)
class DeterministicTrace(Trace):
    """The trace of a deterministic function: arguments and return value, no choices."""

    gen_fn: GenerativeFunction
    args: tuple[Any, ...]
    retval: Any
    score: torch.Tensor
    _layout: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def choices(self) -> ChoiceMap:
        return ChoiceMap.empty()


register_record(DeterministicTrace, dynamic=("args", "retval", "score"), static=("gen_fn",))


class TorchGenerativeFunction(GenerativeFunction):
    """Wrap a ``torch.nn.Module`` as a generative function with no random choices."""

    def __init__(self, module: torch.nn.Module,
                 arg_grads: Sequence[bool] | None = None) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchGenerativeFunction wraps a torch.nn.Module, got {module!r}")
        if arg_grads is not None:
            arg_grads = tuple(arg_grads)
            if not all(isinstance(g, bool) for g in arg_grads):
                raise ArgumentError(f"TorchGenerativeFunction: 'arg_grads' must be bools, one "
                                    f"per argument, got {arg_grads!r}")
        self.module = module
        self.arg_grads: tuple[bool, ...] | None = arg_grads

    def __repr__(self) -> str:
        return f"TorchGenerativeFunction({self.module.__class__.__name__})"

    @property
    def device(self) -> torch.device:
        """The device of the module's parameters (CPU for a parameterless module)."""
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the module's floating-point parameters (None if it has none)."""
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        for b in self.module.buffers():
            if b.is_floating_point():
                return b.dtype
        return None

    def _check_arity(self, args: tuple[Any, ...]) -> None:
        if self.arg_grads is not None and len(self.arg_grads) != len(args):
            raise ArgumentError(f"{self!r}: 'arg_grads' has {len(self.arg_grads)} entries for "
                                f"{len(args)} arguments")

    def _call(self, args: tuple[Any, ...]) -> Any:
        self._check_arity(args)
        dtype = self.dtype
        dev = None if inside_functorch_transform() else self.device
        flags = self.arg_grads or (True,) * len(args)

        def convert(a: Any, grad: bool) -> Any:
            if not isinstance(a, torch.Tensor):
                return a
            if not grad:
                a = a.detach()
            if dtype is not None and a.is_floating_point() and a.dtype != dtype:
                a = a.to(dtype)
            if dev is not None and a.device != dev:
                a = a.to(dev)
            return a

        return self.module(*(convert(a, g) for a, g in zip(args, flags)))

    def choice_gradients(self, trace: Trace, selection: Selection | None = None,
                         retgrad: Any = None) -> tuple[tuple[Any, ...], ChoiceMap, ChoiceMap]:
        """Math: arg_grads[i] = ∂/∂x_i [retgrad·module(x)] for the arguments that take
        gradients (``arg_grads``), None for the others; no choices."""
        grads, values, cgrads = super().choice_gradients(trace, selection, retgrad)
        return self._mask_grads(grads), values, cgrads

    def accumulate_param_gradients(self, trace: Trace, retgrad: Any = None,
                                   scale: float = 1.0) -> tuple[Any, ...]:
        """Math: θ.grad += −scale · ∂/∂θ [retgrad·module(x)]; returns the argument gradients
        (None for arguments that take none)."""
        return self._mask_grads(super().accumulate_param_gradients(trace, retgrad, scale))

    def _mask_grads(self, grads: tuple[Any, ...]) -> tuple[Any, ...]:
        if self.arg_grads is None:
            return grads
        return tuple(g if keep else None for g, keep in zip(grads, self.arg_grads))

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.get_default_dtype(), device=self.device)

    def _check_no_constraints(self, constraints: Any, method: str) -> None:
        cm = as_choicemap(constraints)
        if not cm.is_empty():
            addr = next(iter(cm.items(stacked=True)))[0]
            raise UnvisitedConstraintError(
                f"{method}: constraint at address {{addr}} is never visited "
                "(a torch module makes no random choices)", addr)

    def simulate(self, args: tuple[Any, ...]) -> DeterministicTrace:
        """Math: no choices; score = 0; retval = module(*args)."""
        args = check_args_tuple(args)
        return DeterministicTrace(self, args, self._call(args), self._zero())

    def generate(self, args: tuple[Any, ...],
                 constraints: ChoiceMap | None = None) -> tuple[DeterministicTrace, torch.Tensor]:
        """Math: weight = 0 (there is nothing to constrain)."""
        self._check_no_constraints(constraints, "generate")
        tr = self.simulate(args)
        return tr, tr.score

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
        """Math: weight = log p(∅) = 0; retval = module(*args)."""
        self._check_no_constraints(choices, "assess")
        args = check_args_tuple(args)
        return self._zero(), self._call(args)

    def update(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
               constraints: ChoiceMap | None = None,
               ) -> tuple[DeterministicTrace, torch.Tensor, Diff, ChoiceMap]:
        """Math: weight = 0; the module is re-run unless every argdiff is NoChange."""
        self._check_no_constraints(constraints, "update")
        assert isinstance(trace, DeterministicTrace)
        args = check_args_tuple(args)
        if all_unchanged(argdiffs):
            return trace, trace.score, NoChange(), ChoiceMap.empty()
        return self.simulate(args), trace.score, UnknownChange(), ChoiceMap.empty()

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[DeterministicTrace, torch.Tensor, Diff]:
        """Math: weight = 0 (no choices)."""
        tr, w, retdiff, _ = self.update(trace, args, argdiffs, None)
        return tr, w, retdiff

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Math: project = 0 (no choices)."""
        return trace.score

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The module's parameters."""
        return self.module.parameters()

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The module's named parameters."""
        return self.module.named_parameters()
