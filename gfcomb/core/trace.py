"""The Trace base class: an immutable record of one execution of a generative function."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import NoChange
from gfcomb.core.selection import Selection

if TYPE_CHECKING:
    from gfcomb.core.gfi import GenerativeFunction


class Trace:
    """An immutable record of an execution: ``gen_fn``, ``args``, ``retval``, ``choices``,
    ``score`` (= log p(choices; args)).

    Concrete trace classes are attrs frozen records registered as pytrees, so a *batched*
    trace (what ``torch.func.vmap`` returns) is the same record with a leading batch dimension
    on every tensor leaf.  ``trace[addr]`` reads a choice; ``trace.update(constraints)`` and
    ``trace.regenerate(selection)`` are shorthands that keep the arguments.
    """

    __slots__ = ()

    gen_fn: GenerativeFunction
    args: tuple[Any, ...]
    retval: Any
    score: torch.Tensor

    @property
    def choices(self) -> ChoiceMap:
        """The random choices made, as a ChoiceMap."""
        raise NotImplementedError

    def get_choices(self) -> ChoiceMap:
        """Same as :attr:`choices` (Gen.jl's name)."""
        return self.choices

    def get_score(self) -> torch.Tensor:
        """log p(choices; args)."""
        return self.score

    def get_retval(self) -> Any:
        """The return value."""
        return self.retval

    def get_args(self) -> tuple[Any, ...]:
        """The arguments."""
        return self.args

    def __getitem__(self, addr: Any) -> Any:
        return self.choices[addr]

    def __repr__(self) -> str:
        from gfcomb.core.choicemap import _short

        lines = [f"{type(self).__name__} of {self.gen_fn!r}",
                 f"  args:   {_short_args(self.args)}",
                 f"  retval: {_short(self.retval)}",
                 f"  score:  {_short(self.score)}",
                 "  choices:"]
        for addr, val in self.choices.items(stacked=True):
            shown = ", ".join(":" if isinstance(k, slice) else repr(k) for k in addr) or "()"
            lines.append(f"    {shown}: {_short(val)}")
        return "\n".join(lines)

    def update(self, constraints: ChoiceMap | dict[Any, Any] | None = None) -> tuple[Any, ...]:
        """``gen_fn.update(self, self.args, NoChange..., constraints)``."""
        from gfcomb.core.gfi import as_choicemap

        diffs = (NoChange(),) * len(self.args)
        return self.gen_fn.update(self, self.args, diffs, as_choicemap(constraints))

    def regenerate(self, selection: Selection) -> tuple[Any, ...]:
        """``gen_fn.regenerate(self, self.args, NoChange..., selection)``."""
        from gfcomb.core.validation import check_selection

        check_selection(selection, "trace", "regenerate")
        diffs = (NoChange(),) * len(self.args)
        return self.gen_fn.regenerate(self, self.args, diffs, selection)

    def project(self, selection: Selection) -> torch.Tensor:
        """``gen_fn.project(self, selection)``."""
        from gfcomb.core.validation import check_selection

        check_selection(selection, "trace", "project")
        return self.gen_fn.project(self, selection)


def _short_args(args: tuple[Any, ...]) -> str:
    from gfcomb.core.choicemap import _short

    return "(" + ", ".join(_short(a) for a in args) + ("," if len(args) == 1 else "") + ")"
