"""TorchGenerativeFunction: a torch module as a deterministic generative function.

The counterpart of GenPyTorch's ``TorchGenerativeFunction``: it makes no random choices, its
return value is ``module(*args)``, gradients flow to its inputs (``choice_gradients``'
argument gradients) and to its parameters (``accumulate_param_gradients``), and it runs on the
module's device (tensor arguments are moved there).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import torch

from gfcomb.core.batching import inside_functorch_transform
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange
from gfcomb.core.errors import UnvisitedConstraintError
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

    def __init__(self, module: torch.nn.Module) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchGenerativeFunction wraps a torch.nn.Module, got {module!r}")
        self.module = module

    def __repr__(self) -> str:
        return f"TorchGenerativeFunction({self.module.__class__.__name__})"

    @property
    def device(self) -> torch.device:
        """The device of the module's parameters (CPU for a parameterless module)."""
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def _call(self, args: tuple[Any, ...]) -> Any:
        if not inside_functorch_transform():
            dev = self.device
            args = tuple(a.to(dev) if isinstance(a, torch.Tensor) and a.device != dev else a
                         for a in args)
        return self.module(*args)

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
        if all(isinstance(d, NoChange) for d in argdiffs):
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
