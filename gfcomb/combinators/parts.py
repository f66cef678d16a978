"""Combinators compare by their parts: ``Map(kernel)`` built twice -- often inside a ``@gen``
body, once per run -- is the same generative function (equal, same hash), so that traces,
argdiffs and persistence see one function."""

from __future__ import annotations

from typing import Any

from gfcomb.core.gfi import GenerativeFunction


class Combinator(GenerativeFunction):
    """A generative function built from other ones; equal to another when their
    :meth:`parts` are equal."""

    def parts(self) -> tuple[Any, ...]:
        """What makes two combinators the same function: the class first, then the parts
        (kernels, branches, static options)."""
        raise NotImplementedError(f"{type(self).__name__}.parts")

    def __repr__(self) -> str:
        """``Name(f, ...)``: the class name and the generative functions among the parts."""
        shown: list[Any] = []
        for part in self.parts()[1:]:
            if isinstance(part, tuple):
                shown.extend(g for g in part if isinstance(g, GenerativeFunction))
            elif isinstance(part, GenerativeFunction):
                shown.append(part)
        return f"{type(self).__name__.lstrip('_')}({', '.join(repr(g) for g in shown)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Combinator) and self.parts() == other.parts()

    def __hash__(self) -> int:
        return hash(self.parts())


def gen_fn_part(value: Any, who: str, name: str) -> GenerativeFunction:
    """``value``, the part ``name`` of the combinator ``who``, if it is a generative function;
    else TypeError naming both."""
    if not isinstance(value, GenerativeFunction):
        raise TypeError(f"{who}: {name!r} must be a generative function, got {value!r}")
    return value
