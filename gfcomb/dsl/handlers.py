"""One small interpreter per GFI method for @gen bodies.

A handler receives every ``gen_fn(*args) @ addr`` of the body being run (see runtime.py),
calls the matching GFI method of the callee, and keeps the books: sub-traces, score, weight,
discards, and the sources of callee arguments (argdiffs.py).  The shared bookkeeping lives in
:class:`Handler`; each subclass only says what one traced call does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, all_unchanged
from gfcomb.core.errors import (
    AddressError,
    DistributionArgumentError,
    DuplicateAddressError,
    UnvisitedConstraintError,
)
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.core.masked import all_absent
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import (
    PerRow,
    RowView,
    current_row_level,
    outside_rows,
    row_value,
    varies_per_row,
)
from gfcomb.dsl.argdiffs import Source, SourceTracker

if TYPE_CHECKING:
    from gfcomb.dsl.gen_function import GenFunction, GenTrace
    from gfcomb.dsl.whole import WholeCalls

Address = tuple[Any, ...]


class Handler:
    """Shared bookkeeping: address claims, sub-traces, score, weight, argument sources.

    ``whole``: set when the body runs once over a whole batch (gfcomb/dsl/whole.py): how
    every call is made, and what its return value is to the body."""

    whole: WholeCalls | None = None

    def __init__(self, owner: GenFunction, args: tuple[Any, ...],
                 argdiffs: tuple[Diff, ...] | None = None) -> None:
        self.owner = owner
        self.tracker = SourceTracker(args, argdiffs)
        self.subtraces: dict[Address, Trace] = {}
        self.sources: dict[Address, tuple[Source | None, ...]] = {}
        self._scores: list[Any] = []  # summed once, at the end (see _sum)
        self._weights: list[Any] = []
        self._prefixes: set[Address] = set()

    @property
    def score(self) -> Any:
        """The sum of the recorded sub-trace scores (0.0 if none)."""
        return _sum(self._scores)

    def weights_are_scores(self) -> bool:
        """True when every weight collected is the score of the call it came from (each
        call was generated with all its choices constrained): the total weight is the
        total score, and need not be summed again."""
        ws, ss = self._weights, self._scores
        return len(ws) == len(ss) and all(w is s for w, s in zip(ws, ss))

    @property
    def weight(self) -> Any:
        """The sum of the weights collected so far (0.0 if none)."""
        return _sum(self._weights)

    # -- the entry points called by runtime.py
    def visit(self, addr: Address, gen_fn: GenerativeFunction, args: tuple[Any, ...]) -> Any:
        """Trace one call of ``gen_fn(*args)`` at ``addr``; return its return value."""
        if not isinstance(gen_fn, GenerativeFunction):
            raise TypeError(f"only generative functions can be traced at an address; "
                            f"got {gen_fn!r} at {addr!r}")
        if len(addr) != 1 or type(addr[0]) is not str:  # a plain "name" needs no check
            _check_address(addr)
        self._claim(addr)
        self.owner._note_callee(gen_fn)
        gfi: Calls = self.whole if self.whole is not None else (
            PER_ROW if current_row_level() is None or gen_fn.batch_matches_per_row()
            else BATCH)
        try:
            return self.call(addr, gen_fn, args, gfi)
        except (AddressError, DistributionArgumentError) as err:
            raise err.prefixed(addr) from None

    def splice(self, gen_fn: GenFunction, args: tuple[Any, ...]) -> Any:
        """Run a @gen callee's body with this handler: its addresses become the caller's."""
        self.owner._note_callee(gen_fn)
        return gen_fn.run_body(self, args)

    # -- what one call does (subclasses)
    def call(self, addr: Address, gen_fn: GenerativeFunction, args: tuple[Any, ...],
             gfi: Calls) -> Any:
        raise NotImplementedError

    # -- shared helpers
    def _claim(self, addr: Address) -> None:
        if addr in self.subtraces or addr in self._prefixes:
            raise DuplicateAddressError("address {addr} is traced twice in one execution", addr)
        if len(addr) > 1:
            for i in range(1, len(addr)):
                prefix = addr[:i]
                if prefix in self.subtraces:
                    raise DuplicateAddressError(
                        f"address {{addr}} lies under {prefix!r}, which is already a choice "
                        "or call", addr)
                self._prefixes.add(prefix)

    def _record(self, addr: Address, args: tuple[Any, ...], tr: Trace,
                retdiff: Diff | None) -> Any:
        retval = tr.caller_retval()
        if self.whole is not None:
            retval = self.whole.value(retval)
        self.sources[addr] = self.tracker.record(addr, args, retval, retdiff)
        self.subtraces[addr] = tr
        self._scores.append(tr.score)
        return retval

    def _check_all_visited(self, constraints: ChoiceMap, method: str) -> None:
        """Raise if a constraint sits at an address the body never visited."""
        visited = self.subtraces
        if (not constraints.is_value() and not constraints.is_stacked()
                and all((k,) in visited for k in constraints.keys())):
            return  # (the common case: every constrained key is a call of the body)
        _check_visited(constraints, (), visited, self._prefixes, method)

    def total(self, x: Any) -> torch.Tensor:
        """A score/weight accumulator as a tensor."""
        if isinstance(x, torch.Tensor):
            return x
        return torch.tensor(float(x), dtype=torch.get_default_dtype())


def _sum(xs: list[Any]) -> Any:
    """The sum of scores/weights: additions for a few terms, one ``stack`` + ``sum`` for
    many, Python numbers added in; 0.0 for an empty list."""
    if len(xs) <= 8:  # (the common case: one pass, no intermediate lists)
        acc: Any = None
        numbers: Any = 0.0
        for x in xs:
            if isinstance(x, torch.Tensor):
                acc = x if acc is None else acc + x
            else:
                numbers = numbers + x
        if acc is None:
            return numbers
        return acc + numbers if numbers != 0 else acc
    ts = []
    rest: Any = 0
    for x in xs:  # (one pass: this runs once per GFI call of a body with many calls)
        if isinstance(x, torch.Tensor):
            ts.append(x)
        else:
            rest = rest + x
    if not ts:
        return rest
    total = ts[0]
    if len(ts) > 8:
        # (under vmap the stacked axis sits behind the batch axis, and a reduction over a
        # short inner axis is slow: ~190 µs at 10,000 particles for 2 terms, against 4 µs
        # for one addition; so only long lists are stacked)
        try:
            return torch.stack(ts).sum(0) + rest if rest != 0 else torch.stack(ts).sum(0)
        except RuntimeError:  # shapes differ (batched and unbatched records): broadcast
            pass
    for t in ts[1:]:
        total = total + t
    return total + rest if rest != 0 else total


def _check_visited(cm: ChoiceMap, path: Address, visited: dict[Address, Any],
                   prefixes: set[Address], method: str) -> None:
    if cm.is_empty() or path in visited:
        return
    if path in prefixes or path == ():
        if cm.is_value() and not all_absent(cm):
            raise UnvisitedConstraintError(
                f"{method}: constraint at address {{addr}} is never visited by the model", path)
        for k in cm.keys():
            _check_visited(cm.get_submap(k), path + (k,), visited, prefixes, method)
        return
    if all_absent(cm):
        return  # masked-out values (e.g. a row of a batched Switch trace) are absent
    first = next(iter(cm.items(stacked=True)))[0]
    full = path + tuple(":" if isinstance(k, slice) else k for k in first)
    raise UnvisitedConstraintError(
        f"{method}: constraint at address {{addr}} is never visited by the model", full)


_NO_CHANGE = NoChange()  # (diffs are frozen: one instance serves every call)


def _same_function(a: GenerativeFunction, b: GenerativeFunction) -> bool:
    """Same generative function?  Combinators built afresh in each run of a body compare
    equal when built from the same parts (they define ``__eq__``)."""
    return a is b or a == b


def _check_address(addr: Address) -> None:
    """A traced call needs a non-empty address of str/int keys (checked when it is made,
    so the error names the call rather than surfacing later when choices are read)."""
    if not addr:
        raise AddressError("a traced call needs a non-empty address, got {addr}", ())
    for k in addr:
        if isinstance(k, bool) or not isinstance(k, (str, int)):
            raise TypeError(f"address {addr!r}: components must be str or int, got {k!r} "
                            f"({type(k).__name__})")


class SimulateHandler(Handler):
    """simulate: every call is simulated."""

    def call(self, addr: Address, gen_fn: GenerativeFunction, args: tuple[Any, ...],
             gfi: Calls) -> Any:
        # (per row, Calls.simulate is the callee's own simulate: called here without it)
        tr = gen_fn.simulate(args) if gfi is PER_ROW else gfi.simulate(gen_fn, args)
        return self._record(addr, args, tr, None)


class GenerateHandler(Handler):
    """generate: calls get the constraints under their address."""

    def __init__(self, owner: GenFunction, args: tuple[Any, ...], constraints: ChoiceMap) -> None:
        super().__init__(owner, args)
        self.constraints = constraints

    def call(self, addr: Address, gen_fn: GenerativeFunction, args: tuple[Any, ...],
             gfi: Calls) -> Any:
        sub = self.constraints.get_submap(addr)
        if sub.is_empty():
            return self._record(addr, args, gfi.simulate(gen_fn, args), None)
        tr, w = gfi.generate(gen_fn, args, sub)
        self._weights.append(w)
        return self._record(addr, args, tr, None)


class AssessHandler(Handler):
    """assess: calls are scored against the given choices; no traces are kept."""

    def __init__(self, owner: GenFunction, args: tuple[Any, ...], choices: ChoiceMap) -> None:
        super().__init__(owner, args)
        self.choices = choices
        self.visited: dict[Address, Any] = {}

    def call(self, addr: Address, gen_fn: GenerativeFunction, args: tuple[Any, ...],
             gfi: Calls) -> Any:
        w, retval = gen_fn.assess(args, self.choices.get_submap(addr))
        self.visited[addr] = True
        self._weights.append(w)
        return retval

    def _claim(self, addr: Address) -> None:
        if addr in self.visited:
            raise DuplicateAddressError("address {addr} is traced twice in one execution", addr)
        for i in range(1, len(addr)):
            self._prefixes.add(addr[:i])

    def check_all_visited(self) -> None:
        _check_visited(self.choices, (), self.visited, self._prefixes, "assess")


class _IncrementalHandler(Handler):
    """Shared by update and regenerate: old sub-traces, callee argdiffs, removed calls."""

    def __init__(self, owner: GenFunction, trace: GenTrace, args: tuple[Any, ...],
                 argdiffs: tuple[Diff, ...]) -> None:
        super().__init__(owner, args, argdiffs)
        self.old = trace

    def _callee_argdiffs(self, addr: Address, old: Trace,
                         args: tuple[Any, ...]) -> tuple[Diff, ...]:
        sources = self.old.sources  # None: unknown (a trace combined from several)
        return self.tracker.callee_argdiffs(args, old.args,
                                            sources.get(addr) if sources is not None else None)

    def removed(self) -> list[tuple[Address, Trace]]:
        """Old calls that the new execution did not make."""
        return [(a, t) for a, t in self.old.subtraces.items() if a not in self.subtraces]


class UpdateHandler(_IncrementalHandler):
    """update: old calls are updated with their constraints, new calls generated."""

    def __init__(self, owner: GenFunction, trace: GenTrace, args: tuple[Any, ...],
                 argdiffs: tuple[Diff, ...], constraints: ChoiceMap) -> None:
        super().__init__(owner, trace, args, argdiffs)
        self.constraints = constraints
        self.discards: dict[Address, ChoiceMap] = {}

    def call(self, addr: Address, gen_fn: GenerativeFunction, args: tuple[Any, ...],
             gfi: Calls) -> Any:
        sub = self.constraints.get_submap(addr)
        old = self.old.subtraces.get(addr)
        if old is None or not _same_function(old.gen_fn, gen_fn):
            if old is not None:  # a different function at the same address: a new call
                self.discards[addr] = old.choices
                self._weights.append(-old.score)
            w: Any
            if sub.is_empty():
                tr, w = gfi.simulate(gen_fn, args), 0.0
            else:
                tr, w = gfi.generate(gen_fn, args, sub)
            self._weights.append(w)
            return self._record(addr, args, tr, None)
        argdiffs = self._callee_argdiffs(addr, old, args)
        if sub.is_empty() and all_unchanged(argdiffs):
            return self._record(addr, args, old, _NO_CHANGE)  # (nothing to do: weight 0)
        tr, w, retdiff, discard = gfi.update(gen_fn, old, args, argdiffs, sub)
        self._weights.append(w)
        if not discard.is_empty():
            self.discards[addr] = discard
        return self._record(addr, args, tr, retdiff)

    def discard(self, removed: list[tuple[Address, Trace]]) -> ChoiceMap:
        """Overwritten choices and those of ``removed`` calls, as one choice map."""
        result = ChoiceMap.empty()
        for addr, d in self.discards.items():
            result = result.merge(d.prefixed(addr))
        for addr, old in removed:
            result = result.merge(old.choices.prefixed(addr))
        return result


class RegenerateHandler(_IncrementalHandler):
    """regenerate: old calls are regenerated with their sub-selection, new calls simulated."""

    def __init__(self, owner: GenFunction, trace: GenTrace, args: tuple[Any, ...],
                 argdiffs: tuple[Diff, ...], selection: Selection) -> None:
        super().__init__(owner, trace, args, argdiffs)
        self.selection = selection

    def call(self, addr: Address, gen_fn: GenerativeFunction, args: tuple[Any, ...],
             gfi: Calls) -> Any:
        old = self.old.subtraces.get(addr)
        if old is None or not _same_function(old.gen_fn, gen_fn):
            return self._record(addr, args, gfi.simulate(gen_fn, args), None)
        sub = self.selection.get_subselection_at(addr)
        argdiffs = self._callee_argdiffs(addr, old, args)
        if sub.is_empty_static() and all_unchanged(argdiffs):
            return self._record(addr, args, old, _NO_CHANGE)
        tr, w, retdiff = gfi.regenerate(gen_fn, old, args, argdiffs, sub)
        self._weights.append(w)
        return self._record(addr, args, tr, retdiff)


class Calls:
    """How a handler calls a callee's GFI: per row (the callee's own methods, also what runs
    inside a vmap over rows), or, for a callee with batch methods of its own called from a
    body running over a batch, as one batch call outside the row level
    (:func:`gfcomb.core.vmap.outside_rows`)."""

    @staticmethod
    def simulate(gen_fn: GenerativeFunction, args: tuple[Any, ...]) -> Trace:
        return gen_fn.simulate(args)

    @staticmethod
    def generate(gen_fn: GenerativeFunction, args: tuple[Any, ...],
                 cm: ChoiceMap) -> tuple[Trace, Any]:
        return gen_fn.generate(args, cm)

    @staticmethod
    def update(gen_fn: GenerativeFunction, old: Trace, args: tuple[Any, ...],
               argdiffs: tuple[Diff, ...], cm: ChoiceMap) -> tuple[Trace, Any, Diff, ChoiceMap]:
        return gen_fn.update(row_value(old), args, argdiffs, cm)

    @staticmethod
    def regenerate(gen_fn: GenerativeFunction, old: Trace, args: tuple[Any, ...],
                   argdiffs: tuple[Diff, ...], sel: Selection) -> tuple[Trace, Any, Diff]:
        return gen_fn.regenerate(row_value(old), args, argdiffs, sel)


class BatchCalls(Calls):
    """The callee's batch methods, called once for all rows of the current row level."""

    @staticmethod
    def simulate(gen_fn: GenerativeFunction, args: tuple[Any, ...]) -> Trace:
        return BatchCalls.generate(gen_fn, args, ChoiceMap.empty())[0]

    @staticmethod
    def generate(gen_fn: GenerativeFunction, args: tuple[Any, ...],
                 cm: ChoiceMap) -> tuple[Trace, Any]:
        n = _rows()
        return outside_rows(lambda c, *a: gen_fn.batch_generate(n, a, c), cm, *args)

    # An old sub-trace that crossed into the row level whole (a RowView: see
    # Trace.entering_rows) steps out as it is, and the new one stays whole in the same way.
    @staticmethod
    def update(gen_fn: GenerativeFunction, old: Trace, args: tuple[Any, ...],
               argdiffs: tuple[Diff, ...], cm: ChoiceMap) -> tuple[Trace, Any, Diff, ChoiceMap]:
        whole = type(old) is RowView

        def batch(tr: PerRow, c: Any, *a: Any) -> tuple[Any, ...]:
            new, w, retdiff, discard = gen_fn.batch_update(tr.value, a, argdiffs, c)
            return (RowView(new) if whole else new), w, retdiff, discard

        return outside_rows(batch, old, cm, *args, batched=(True,))

    @staticmethod
    def regenerate(gen_fn: GenerativeFunction, old: Trace, args: tuple[Any, ...],
                   argdiffs: tuple[Diff, ...], sel: Selection) -> tuple[Trace, Any, Diff]:
        if varies_per_row(sel):  # (per-row selection flags: a batch call takes one selection)
            return gen_fn.regenerate(row_value(old), args, argdiffs, sel)
        whole = type(old) is RowView

        def batch(tr: PerRow, *a: Any) -> tuple[Any, ...]:
            new, w, retdiff = gen_fn.batch_regenerate(tr.value, a, argdiffs, sel)
            return (RowView(new) if whole else new), w, retdiff

        return outside_rows(batch, old, *args, batched=(True,))


def _rows() -> int:
    where = current_row_level()
    assert where is not None
    return where[1]


PER_ROW = Calls()
BATCH = BatchCalls()
