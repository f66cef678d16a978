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

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Combinator) and self.parts() == other.parts()

    def __hash__(self) -> int:
        return hash(self.parts())
