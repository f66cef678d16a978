"""Repeat: ``n`` independent calls of a generative function with the same arguments.

``Repeat(gen_fn, n)(*args)`` calls ``gen_fn(*args)`` ``n`` times; call ``i``'s choices live
under key ``i`` (0-based) and the return value is the stacked return values (leading axis of
length ``n``), as for a :class:`~gfcomb.combinators.map.Map`.  It *is* a Map: over the
element index ``arange(n)``, with every argument shared (``in_dims=None``), of a kernel that
drops the index, so it runs as one ``torch.func.vmap`` call and has the Map's incremental
update (constraints revisit only their elements; a changed argument revisits all).

Math: log p(t; x) = Σ_{i<n} log p_gen_fn(t_i; x).
"""

from __future__ import annotations

from typing import Any

import torch

from gfcomb.combinators.map import Map
from gfcomb.combinators.parts import gen_fn_part
from gfcomb.combinators.wrapped import Wrapper
from gfcomb.core.batching import cached_arange
from gfcomb.core.diff import Diff, NoChange
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.core.pytree import tree_tensors

_NO_CHANGE = NoChange()


class _DropIndex(Wrapper):
    """``gen_fn`` called as ``(i, *args)``: the element index is ignored (the Repeat kernel)."""

    def __init__(self, gen_fn: GenerativeFunction) -> None:
        self.inner_fn = gen_fn

    def inner_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return args[1:]

    def inner_argdiffs(self, args: tuple[Any, ...], inner_args: tuple[Any, ...],
                       argdiffs: tuple[Diff, ...]) -> tuple[Diff, ...]:
        return argdiffs[1:]


class Repeat(Wrapper):
    """``n`` independent calls of ``gen_fn`` with the same arguments (see the module
    docstring)."""

    def __init__(self, gen_fn: GenerativeFunction, n: int) -> None:
        gen_fn_part(gen_fn, "Repeat", "gen_fn")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TypeError(f"Repeat: 'n' must be a Python int >= 0, got {n!r}")
        self.gen_fn = gen_fn
        self.n = n
        self._maps: dict[int, Map] = {}
        self.inner_fn = self._map_for(0)  # (the Map for each argument count: inner_gen_fn)

    def __repr__(self) -> str:
        return f"Repeat({self.gen_fn!r}, {self.n})"

    def parts(self) -> tuple[Any, ...]:
        """The repeated function and the count."""
        return (Repeat, self.gen_fn, self.n)

    def _map_for(self, nargs: int) -> Map:
        """The Map over ``(index, *args)`` with ``nargs`` shared arguments."""
        m = self._maps.get(nargs)
        if m is None:
            m = self._maps[nargs] = Map(_DropIndex(self.gen_fn), in_dims=(0,) + (None,) * nargs)
        return m

    def inner_gen_fn(self, args: tuple[Any, ...]) -> GenerativeFunction:
        return self._map_for(len(args))

    def inner_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        leaves = tree_tensors(args)
        device = leaves[0].device if leaves else torch.device("cpu")
        return (cached_arange(self.n, torch.long, device),) + args

    def inner_argdiffs(self, args: tuple[Any, ...], inner_args: tuple[Any, ...],
                       argdiffs: tuple[Diff, ...]) -> tuple[Diff, ...]:
        return (_NO_CHANGE,) + tuple(argdiffs)
