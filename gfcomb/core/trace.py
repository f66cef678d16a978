"""The Trace base class: an immutable record of one execution of a generative function."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from gfcomb.core.address import normalize
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import NoChange
from gfcomb.core.errors import AddressError
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

    def get_retval(self, addr: Any = ()) -> Any:
        """The return value; with ``addr``, the return value of the call at ``addr``.

        ``addr`` names a traced sub-call of a ``@gen`` function (``tr.get_retval("ys")``), a
        Map element (``tr.get_retval(("ys", 3))``), an Unfold or Scan step
        (``tr.get_retval(("xs", 7))``), or a path through several of them.  The empty address
        is this trace's own return value.  Raises :class:`~gfcomb.core.errors.AddressError`
        naming the address when no call is traced there.
        """
        path = normalize(addr)
        if not path:
            return self.retval
        return self._retval_at(path)

    def _retval_at(self, path: tuple[Any, ...]) -> Any:
        """The return value of the call at the non-empty address ``path``.  Traces with
        sub-calls override it (or hold them in a ``subtraces`` dict of address -> trace, as
        a ``@gen`` trace does: then the longest traced prefix of ``path`` is followed)."""
        subtraces = getattr(self, "subtraces", None)
        if isinstance(subtraces, dict):
            for i in range(len(path), 0, -1):
                sub = subtraces.get(path[:i])
                if sub is not None:
                    try:
                        return sub.get_retval(path[i:])
                    except AddressError as err:
                        raise err.prefixed(path[:i]) from None
        raise AddressError("no traced call at address {addr}", path)

    def get_args(self) -> tuple[Any, ...]:
        """The arguments."""
        return self.args

    def __getitem__(self, addr: Any) -> Any:
        return self.choices[addr]

    # -- storage of batches (defaults for records that hold nothing shared)
    def discrete_addresses(self) -> Iterator[tuple[Any, ...]]:
        """Address patterns of the choices made by discrete distributions (``slice(None)``
        for every element of a Map or every step of an Unfold): Bernoulli values are floats,
        so a value's dtype alone does not tell.  Default: none (a custom trace type says so
        by overriding this)."""
        return iter(())

    def caller_retval(self) -> Any:
        """The return value as a ``@gen`` caller receives it: :attr:`retval`, or, where that
        is costly to build (a batched Unfold's states gathered through its shared history), a
        :class:`~gfcomb.core.deferred.Deferred` that builds it on first use."""
        return self.retval

    def entering_rows(self) -> Trace:
        """This batch as it crosses into a vmap over its rows (a default batch method): parts
        that a batch method takes whole -- the sub-trace of a callee with batch methods of
        its own -- held as :class:`~gfcomb.core.vmap.RowView` s, so they cross unwalked and
        each row reads its own row of them lazily.  Default: ``self``."""
        return self

    def leaving_rows(self) -> Trace:
        """The inverse of :meth:`entering_rows` on a result that left the vmap: each
        :class:`~gfcomb.core.vmap.RowView` of a whole batch replaced by that batch.
        Default: ``self``."""
        return self

    def compacted(self) -> Trace:
        """An equal trace whose storage is laid out for a batch: recently appended steps of a
        batched Unfold closed into its shared history (no data copied).  Default: ``self``."""
        return self

    def with_layout_of(self, other: Trace) -> Trace:
        """An equal trace (same values and scores) whose record structure matches ``other``, a
        trace of the same function, where storage differs only in layout (an Unfold history
        split at another step), so that the two can be merged leaf by leaf (``torch.where``
        per row, an MCMC accept step).  Default: ``self``."""
        return self

    def __repr__(self) -> str:
        from gfcomb.core.choicemap import short_repr

        lines = [f"{type(self).__name__} of {self.gen_fn!r}",
                 f"  args:   {_short_args(self.args)}",
                 f"  retval: {short_repr(self.retval)}",
                 f"  score:  {short_repr(self.score)}",
                 "  choices:"]
        for addr, val in self.choices.items(stacked=True):
            shown = ", ".join(":" if isinstance(k, slice) else repr(k) for k in addr) or "()"
            lines.append(f"    {shown}: {short_repr(val)}")
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
    from gfcomb.core.choicemap import short_repr

    return "(" + ", ".join(short_repr(a) for a in args) + ("," if len(args) == 1 else "") + ")"
