"""Writing the trace of a custom generative function in a few lines.

.. code-block:: python

    @gf.trace_record
    class AR1Trace(gf.RecordTrace):
        gen_fn: Any
        args: tuple[Any, ...]
        xs: tuple[torch.Tensor, ...]
        score: torch.Tensor

        @property
        def retval(self):
            return torch.stack(self.xs)

        def choice_values(self):
            return {(t, "x"): x for t, x in enumerate(self.xs)}

:func:`trace_record` makes the class an immutable ``attrs`` record and registers it as a
pytree, so ``torch.func.vmap`` can take and return it (a batched trace is the same record
with a batch dimension on every tensor leaf).  ``gen_fn`` (and any field named in
``static=``) is kept static; every other field is dynamic (its tensor leaves get batched;
Python numbers in it stay static).  :class:`RecordTrace` supplies the pytree bookkeeping and
builds :attr:`~gfcomb.core.trace.Trace.choices` from :meth:`RecordTrace.choice_values`, a plain
``{address: value}`` dict (a value may be a ``ChoiceMap.value(v, mask)`` for a value present
only on some elements of a batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import attrs

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.pytree import register_record
from gfcomb.core.trace import Trace

T = TypeVar("T", bound=type)


@attrs.frozen(repr=False)
class RecordTrace(Trace):
    """Base class of a custom trace record (see the module docstring).  Subclasses declare
    their fields as annotations (``gen_fn``, ``args``, ``score`` and what the function needs,
    e.g. ``retval`` or the sampled values) and are decorated with :func:`trace_record`."""

    _layout: Any = attrs.field(default=None, eq=False, repr=False, kw_only=True)

    def choice_values(self) -> dict[Any, Any]:
        """The choices as a flat ``{address: value}`` dict (override this, or ``choices``)."""
        raise NotImplementedError(f"{type(self).__name__}.choice_values")

    @property
    def choices(self) -> ChoiceMap:
        """The choices, built from :meth:`choice_values`."""
        return ChoiceMap(self.choice_values())


@overload
def trace_record(cls: T) -> T: ...


@overload
def trace_record(*, static: Sequence[str] = ("gen_fn",)) -> Callable[[T], T]: ...


def trace_record(cls: Any = None, *, static: Sequence[str] = ("gen_fn",)) -> Any:
    """Class decorator: an immutable, vmap-able trace record (see the module docstring).

    ``static`` names the fields kept out of the pytree leaves (the generative function, and
    e.g. a Python-int length); the others are dynamic.  The class must subclass
    :class:`RecordTrace`.
    """

    def make(c: type) -> type:
        if not issubclass(c, RecordTrace):
            raise TypeError(f"@trace_record: {c.__name__} must subclass gfcomb.RecordTrace")
        rec = attrs.frozen(repr=False)(c)
        names = [f.name for f in attrs.fields(rec) if f.name != "_layout"]
        missing = [s for s in static if s not in names]
        if missing:
            raise TypeError(f"@trace_record: {c.__name__} has no field(s) {missing} "
                            "named in static=")
        register_record(rec, dynamic=[n for n in names if n not in static], static=static)
        return rec

    return make if cls is None else make(cls)
