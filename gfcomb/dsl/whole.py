"""Running a ``@gen`` body once over a whole batch, when the body needs no rows.

The model Gen users write around an Unfold draws ``x0`` and hands it to the Unfold.  In an
update or regenerate that leaves ``x0`` alone, the body's calls are ``x0`` (kept as it was)
and the Unfold (one batch call of its own): nothing in the body is computed per row, so the
vmap over the rows that the default batch methods run it under is pure overhead (flattening
the traces in and out, the vmap levels; about half of such a filter step's Python work).

So the batch methods of a ``@gen`` function first run the body once for the whole batch:
every per-row value the body receives (an argument marked ``PerRow``, a callee's return
value) is a :class:`~gfcomb.dsl.row_values.RowValues`, which elementwise arithmetic keeps
per row (a kernel's ``normal(a * x, s)``), and each call goes to the callee's own batch
method (a distribution's is one elementwise computation when its arguments are scalars per
row).  Whatever needs the rows -- a non-elementwise operation or a Python test on a per-row
value, a call with work to do of a callee whose batch method would be a vmap of it alone --
abandons the run (:class:`NeedsRows`); the body then runs under the vmap over the rows, as it
would have, with the random-number state the abandoned run started with.  A function whose
body abandoned once (per method) is not tried again.  Both ways give the same batch (the
same record layout, weights and discards): what the vmap over the rows would have made, as
the tests check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

from gfcomb.core.batching import expanded_rows, inside_functorch_transform
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.core.pytree import RECORD_FIELDS
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import PerRow, RowView, batch_value
from gfcomb.dsl.handlers import Calls
from gfcomb.dsl.row_values import BatchReads, NeedsRows, RowValues


def rows_in(x: Any, n: int) -> Any:
    """``x`` (something a body run over the whole batch holds) as the batch holds it: the rows
    of a :class:`RowValues`, a shared tensor as its ``n`` expanded rows (what leaving the
    vmap over the rows makes of it), containers walked, other values as they are."""
    t = type(x)
    if t is RowValues:
        return x.batch
    if isinstance(x, torch.Tensor):
        return expanded_rows(x, n)
    if t is tuple or t is list:
        return t(rows_in(v, n) for v in x)
    if t is dict:
        return {k: rows_in(v, n) for k, v in x.items()}
    fields = RECORD_FIELDS.get(t)
    if fields is not None and _holds_rows(x):  # (a record returned: a Recurse production)
        return attrs.evolve(x, **{a.alias: rows_in(getattr(x, a.name), n)
                                  for a in attrs.fields(t) if a.name in fields[0]})
    return x


def _holds_rows(x: Any) -> bool:
    t = type(x)
    if t is RowValues:
        return True
    if t is tuple or t is list:
        return any(_holds_rows(v) for v in x)
    if t is dict:
        return any(_holds_rows(v) for v in x.values())
    fields = RECORD_FIELDS.get(t)
    return fields is not None and any(_holds_rows(getattr(x, f)) for f in fields[0])


def _as_rows(value: Any) -> Any:
    """A callee's batch result value as the body sees it: opaque when it holds tensors."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return RowValues(value)


class WholeCalls(Calls):
    """The callees' own batch methods, called for all ``n`` rows by a body run once over
    the whole batch (``per_row``: the constraints hold one value per row)."""

    def __init__(self, n: int, per_row: bool) -> None:
        self.n = n
        self.per_row = per_row

    def _args(self, gen_fn: GenerativeFunction, args: tuple[Any, ...]) -> tuple[Any, ...]:
        out = tuple(RowView(a.batch) if type(a) is BatchReads
                    else PerRow(rows_in(a, self.n)) if _holds_rows(a) else a for a in args)
        if not gen_fn.batch_runs_whole(out):
            raise NeedsRows  # (its batch method is a vmap of it: the body's own vmap is better)
        return out

    def _constraints(self, cm: ChoiceMap) -> Any:
        return PerRow(cm) if self.per_row and not cm.is_empty() else cm

    def value(self, retval: Any) -> Any:
        """A call's return value as the body receives it."""
        return _as_rows(retval)

    def simulate(self, gen_fn: GenerativeFunction, args: tuple[Any, ...]) -> Trace:  # type: ignore[override]
        return gen_fn.batch_generate(self.n, self._args(gen_fn, args))[0]

    def generate(self, gen_fn: GenerativeFunction, args: tuple[Any, ...],  # type: ignore[override]
                 cm: ChoiceMap) -> tuple[Trace, Any]:
        return gen_fn.batch_generate(self.n, self._args(gen_fn, args), self._constraints(cm))

    def update(self, gen_fn: GenerativeFunction, old: Trace, args: tuple[Any, ...],  # type: ignore[override]
               argdiffs: tuple[Diff, ...], cm: ChoiceMap) -> tuple[Trace, Any, Diff, ChoiceMap]:
        return gen_fn.batch_update(old, self._args(gen_fn, args), argdiffs,
                                   self._constraints(cm))

    def regenerate(self, gen_fn: GenerativeFunction, old: Trace,  # type: ignore[override]
                   args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   sel: Selection) -> tuple[Trace, Any, Diff]:
        return gen_fn.batch_regenerate(old, self._args(gen_fn, args), argdiffs, sel)


def body_args(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The arguments a body run over the whole batch receives: PerRow values as RowValues, a
    RowView of every row (a proposal's particle traces) as BatchReads; None when one is a
    view of one row."""
    out: list[Any] = []
    for a in args:
        t = type(a)
        if t is RowView:
            batch = batch_value(a)
            if batch is a:
                return None
            out.append(BatchReads(batch))
        else:
            out.append(RowValues(a.value) if t is PerRow else a)
    return tuple(out)


class _RandomState:
    """The random-number state before a whole-batch run, put back if it is abandoned (so the
    run under the vmap draws what it would have drawn)."""

    __slots__ = ("cpu", "cuda")

    def __init__(self) -> None:
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def whole_or_rows(rows_only: set[str], method: str, whole: Callable[[], Any],
                  rows: Callable[[], Any]) -> Any:
    """``whole()`` (a run of a body once over the whole batch) unless ``method`` is in
    ``rows_only`` or it fails, else ``rows()`` (the run under the vmap over the rows), with
    the random-number state the abandoned run started with.  A method whose whole run was
    abandoned for a batch that the rows run then makes joins ``rows_only``; one whose rows
    run raises too (the caller's error, e.g. a constraint at no address) does not: the error
    is what it shows."""
    if inside_functorch_transform() or method in rows_only:
        return rows()
    state = _RandomState()
    try:
        return whole()
    except Exception:  # noqa: BLE001 - any failure: the rows run decides (and raises)
        state.restore()
    out = rows()
    rows_only.add(method)
    return out


__all__ = ["NeedsRows", "RowValues", "WholeCalls", "body_args", "rows_in",
           "whole_or_rows"]
