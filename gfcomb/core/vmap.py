"""The vmap engine: running a function over the rows of a batch, and stepping out of it.

Every batched computation in gfcomb goes through :func:`vmap_rows`: the default batch methods
of :class:`~gfcomb.core.gfi.GenerativeFunction`, Map's kernel calls, the inference code.  It
is ``torch.func.vmap(fn, in_dims, randomness="different")`` with the argument and output
pytrees flattened once here (:mod:`gfcomb.core.flat`) instead of by torch at every node, and
the vmap level entered with the primitives vmap itself is built from.

A *row level* is such a vmap level entered by :func:`vmap_rows`.  Inside one, code sees one
row; :func:`outside_rows` runs a function *outside* the level on the row-stacked values (one
leading row axis) and hands its results back as per-row views.  This is how a ``@gen`` body,
run once over a batch, hands a callee that has batch methods of its own (an ``Unfold`` with
its shared step history) the whole batch at once: the body keeps per-row semantics, the callee
sees every row.  :class:`PerRow` marks a batch-method argument or constraint map that holds one
value per row (leading row axis); anything unmarked is shared by all rows.

:func:`batched_call` adds the user-facing layer: a :class:`~gfcomb.core.errors.VmapError`
naming the cause when a function cannot be vmapped, and the per-element loop
(``vectorize=False``) that gives the same results.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from types import MethodType
from typing import Any

import attrs
import torch
from torch._C import _functorch
from torch.utils import _pytree as pytree

from gfcomb.core.batching import expanded_rows
from gfcomb.core.deferred import Deferred
from gfcomb.core.errors import ArgumentError, VmapError
from gfcomb.core.flat import flatten as fast_flatten
from gfcomb.core.flat import unflatten as fast_unflatten
from gfcomb.core.pytree import tree_index, tree_map_tensors, tree_stack

InDims = tuple[Any, ...]


@attrs.frozen
class PerRow:
    """A batch-method input holding one value per row: every tensor leaf of ``value`` has a
    leading row axis.  Unmarked arguments and constraints are shared by all rows.

    ``model.batch_generate(n, (gf.PerRow(x0s), 0.5), obs)``: row i runs with ``x0s[i]``.
    """

    value: Any


class RowView:
    """A batch (a batched trace, say) passed to a batch method so that row i sees row i of
    it, read lazily: what the function reads -- ``view[addr]``, an attribute, the result of
    a method -- is that row's value, and only that crosses into the vmap over the rows.

    :class:`PerRow` would carry the whole batch into the vmap (every leaf of a trace, its
    step history included); a proposal that reads one particle's previous state needs only
    that.  ``proposal.batch_generate(n, (gf.RowView(traces), t))``: inside, ``trace["x"]``
    is the particle's own ``x``.  Outside any row level a read gives the row-stacked value;
    inside a transform that is not a row level (a user's own vmap or grad) a read is refused,
    since which row is meant is unknown there.
    """

    __slots__ = ("_batch", "_row")

    def __init__(self, batch: Any, row: int | None = None) -> None:
        object.__setattr__(self, "_batch", batch)
        object.__setattr__(self, "_row", row)

    def __repr__(self) -> str:
        which = "every row" if self._row is None else f"row {self._row}"
        return f"RowView({type(self._batch).__name__}, {which})"

    def row(self, i: int) -> RowView:
        """The view of row ``i`` alone (reads give row ``i``'s values, inside a row level or
        not).  A per-row loop (``vectorized(False)``) does not need it: it hands every
        element the one view and points it at the element's row meanwhile."""
        return RowView(self._batch, i)

    def _read(self, value: Any) -> Any:
        if type(value) is Deferred and not value.built:  # (read when used, not now)
            return Deferred(lambda: self._read(value.value()))
        if self._row is not None:
            return tree_index(value, self._row)
        where = current_row_level()
        if where is None:
            if _functorch.peek_interpreter_stack() is not None:
                raise ArgumentError("RowView: read inside a transform that is not a row "
                                    "level of its batch method (which row is meant?)")
            return value
        level, n = where
        leaves: list[torch.Tensor] = []
        spec = fast_flatten(value, leaves)
        if not leaves:  # (nothing per row: a generative function, a number, ...)
            return value
        add_dim = _active_primitives()[0]
        for x in leaves:
            if x.dim() == 0 or x.shape[0] != n:
                raise ArgumentError(f"RowView: a value read from the batch has shape "
                                    f"{tuple(x.shape)}, not a leading row axis of {n}")
        return fast_unflatten(spec, iter([add_dim(x, 0, level) for x in leaves]))

    def __getitem__(self, addr: Any) -> Any:
        return self._read(self._batch[addr])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_batch", "_row"):  # (copy, pickle: not reads)
            raise AttributeError(name)
        value = getattr(self._batch, name)
        if type(value) is MethodType:  # (a method: its result is what is read)
            method = value

            def read_result(*args: Any, **kwargs: Any) -> Any:
                return self._read(method(*args, **kwargs))

            return read_result
        return self._read(value)


def row_value(x: Any) -> Any:
    """``x`` as the current row sees it: a :class:`RowView` read whole (every tensor leaf of
    its batch, as this row's value); anything else as it is."""
    if type(x) is RowView:
        return x._read(x._batch)
    return x


def batch_value(x: Any) -> Any:
    """The batch behind a :class:`RowView` of every row (its row-stacked value); anything else
    as it is."""
    if type(x) is RowView and x._row is None:
        return x._batch
    return x


def unwrap_rows(x: Any) -> tuple[Any, bool]:
    """``(value, per_row)``: the value inside a :class:`PerRow`, or ``x`` itself, shared."""
    if type(x) is PerRow:
        return x.value, True
    return x, False


def held_rows(a: Any, n: int) -> Any:
    """A batch-method argument as a batch of ``n`` traces holds it (what the vmap over the
    rows makes of it): a :class:`PerRow` value as it is, a shared tensor as its expanded
    rows, anything else unchanged."""
    v, per_row = unwrap_rows(a)
    if per_row:
        return v
    if isinstance(v, torch.Tensor):
        return expanded_rows(v, n)
    if v is None or type(v) in (bool, int, float, str):
        return v
    return tree_map_tensors(lambda x: expanded_rows(x, n), v)


def own_args(traces: Any) -> tuple[Any, ...]:
    """A batch's own arguments as batch-method arguments: every argument holding a tensor
    marked :class:`PerRow` (its leaves have the row axis), the others (Python numbers such as
    an Unfold's length) shared."""
    out = []
    for a in traces.args:
        holds_tensor = isinstance(a, torch.Tensor) or bool(
            [x for x in pytree.tree_leaves(a) if isinstance(x, torch.Tensor)])
        out.append(PerRow(a) if holds_tensor else a)
    return tuple(out)


# ------------------------------------------------------------------ the vmap primitives
def _primitives() -> tuple[Callable[..., Any], ...]:
    """add/remove a batch dimension, enter/leave a vmap level: the C functions behind
    torch.func.vmap (torch wraps them in Python only for torch.export, ~1 µs a call)."""
    from torch._C._functorch import (
        _add_batch_dim,
        _remove_batch_dim,
        _vmap_decrement_nesting,
        _vmap_increment_nesting,
    )

    return _add_batch_dim, _remove_batch_dim, _vmap_increment_nesting, _vmap_decrement_nesting


def _python_primitives() -> tuple[Callable[..., Any], ...]:
    """The same primitives through torch's Python wrappers (used under a torch function mode,
    where export or tracing must see them)."""
    from torch._functorch import vmap as fv

    return (fv._add_batch_dim, fv._remove_batch_dim, fv._vmap_increment_nesting,
            fv._vmap_decrement_nesting)


_DIRECT = _primitives()
_AS_IS = object()  # tags an argument that enters vmap unflattened (shared by every row)
_WRAPPED = _python_primitives()
_DECOMPOSITIONS: list[bool] = []  # torch's batching decompositions, loaded on first use


def _active_primitives() -> tuple[Callable[..., Any], ...]:
    if not _DECOMPOSITIONS:
        from torch._functorch.vmap import lazy_load_decompositions

        lazy_load_decompositions()
        _DECOMPOSITIONS.append(True)
    if torch._C._is_torch_function_mode_enabled():
        return _WRAPPED
    return _DIRECT


class _RowLevels(threading.local):
    """The row levels this thread is inside: (vmap level, number of rows), innermost last."""

    def __init__(self) -> None:
        self.stack: list[tuple[int, int]] = []


_LEVELS = _RowLevels()


def current_row_level() -> tuple[int, int] | None:
    """``(level, rows)`` of the innermost transform if it is a row level of
    :func:`vmap_rows`, else None (outside any transform, or inside a user's own vmap/grad)."""
    stack = _LEVELS.stack
    if not stack:
        return None
    top = _functorch.peek_interpreter_stack()
    if top is None or top.level() != stack[-1][0]:
        return None
    return stack[-1]


def vmap_rows(fn: Callable[..., Any], in_dims: InDims, args: Sequence[Any], length: int) -> Any:
    """``torch.func.vmap(fn, in_dims, randomness="different")(*args)`` over ``length`` rows.

    ``in_dims`` has one entry per argument (an int or None, applied to every tensor leaf of
    that argument).  Non-tensor leaves pass around vmap unbatched.  On the way out, a tensor
    held in several places leaves once, an output that is a mapped input leaves as that input,
    and an unbatched output as its cached expanded rows.
    """
    flat: list[torch.Tensor] = []
    dims: list[Any] = []
    arg_parts: list[Any] | None = None  # None: every argument is a tensor (no pytree work)
    for i, (a, d) in enumerate(zip(args, in_dims)):
        if isinstance(a, torch.Tensor):  # the common case
            flat.append(a)
            dims.append(d)
            if arg_parts is not None:
                arg_parts.append(None)
            continue
        if arg_parts is None:
            arg_parts = [None] * i
        if d is None:  # shared by every row: passed in as it is (nothing to batch)
            arg_parts.append((_AS_IS, a))
            continue
        start = len(flat)
        arg_parts.append(fast_flatten(a, flat))
        dims.extend([d] * (len(flat) - start))
    for i, (x, d) in enumerate(zip(flat, dims)):
        if d is None:
            continue
        if x.shape[d] != length:
            raise ValueError(f"vmap: a mapped input has {x.shape[d]} elements along "
                             f"dimension {d}, expected {length}")
        if d == 0 and x.stride(0) == 0 and length > 1:
            # one row expanded to all (a shared argument or observation stored in a batch):
            # every row sees the same value, so it enters unbatched (and leaves as rows)
            flat[i], dims[i] = x[0], None
    add_dim, remove_dim, enter, leave = _active_primitives()
    level = enter(length, "different")
    stack = _LEVELS.stack
    stack.append((level, length))
    try:
        added: dict[tuple[int, Any], torch.Tensor] = {}  # a tensor given twice: batched once
        ins = []
        for x, d in zip(flat, dims):
            if d is not None:
                key = (id(x), d)
                y = added.get(key)
                if y is None:
                    y = added[key] = add_dim(x, d, level)
                x = y
            ins.append(x)
        if arg_parts is None:
            out = fn(*ins)
        else:
            it = iter(ins)
            out = fn(*[next(it) if part is None else
                       part[1] if part[0] is _AS_IS else fast_unflatten(part, it)
                       for part in arg_parts])
        leaves: list[torch.Tensor] = []
        spec = fast_flatten(out, leaves)
        done = {id(y): x for x, d, y in zip(flat, dims, ins) if d == 0}
        outs = []
        for y in leaves:
            yid = id(y)
            o = done.get(yid)
            if o is None:
                o = done[yid] = (expanded_rows(y, length)
                                 if _functorch.maybe_get_level(y) == -1
                                 else remove_dim(y, level, length, 0))
            outs.append(o)
    finally:
        stack.pop()
        leave()
    return fast_unflatten(spec, iter(outs))


class _Vectorizing(threading.local):
    """Whether :func:`map_rows` vmaps (True) or loops over the rows, in this thread."""

    def __init__(self) -> None:
        self.enabled = True


_VECTORIZING = _Vectorizing()


def vectorizing() -> bool:
    """Whether batch methods vmap their rows in this thread now (False inside
    ``with vectorized(False):``); code that batches by itself follows the same switch."""
    return _VECTORIZING.enabled


class vectorized:  # noqa: N801 - used like a function: ``with vectorized(False):``
    """Within the block, batch methods vmap their rows (``True``, the default) or run them
    one row after the other (``False``: for a model that cannot run under vmap, e.g. Python
    control flow on a choice; same results, one row at a time)."""

    __slots__ = ("enabled", "_before")

    def __init__(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self._before = True

    def __enter__(self) -> None:
        self._before = _VECTORIZING.enabled
        _VECTORIZING.enabled = self.enabled

    def __exit__(self, *exc: object) -> None:
        _VECTORIZING.enabled = self._before


def map_rows(fn: Callable[..., Any], length: int, *items: Any, who: str = "batch method",
             ) -> Any:
    """``fn`` run per row over ``length`` rows: each item that is a :class:`PerRow` is
    mapped along its leading axis, every other item is passed to every row as it is.

    One vmap over the rows, or a loop over them inside ``with vectorized(False)``.  A
    function that cannot run under vmap gets a :class:`VmapError` naming the cause."""
    values = []
    dims = []
    for x in items:
        v, per_row = unwrap_rows(x)
        values.append(v)
        dims.append(0 if per_row or type(v) is RowView else None)
    return batched_call(fn, tuple(dims), vectorize=_VECTORIZING.enabled, length=length,
                        who=who)(*values)


# ------------------------------------------------------------------ stepping out of a level
def _row_stacked(x: torch.Tensor, level: int, n: int) -> tuple[torch.Tensor, bool]:
    """A tensor seen inside row level ``level`` as all its rows (leading axis ``n``), and
    whether it varied per row."""
    if _functorch.maybe_get_level(x) == level:
        value, bdim = _functorch._unwrap_batched(x, level)
        return (value if not bdim else value.movedim(bdim, 0)), True
    return expanded_rows(x, n), False


def _rows_of(tree: Any, level: int, n: int, always: bool) -> Any:
    """``tree`` (seen inside the level) with every tensor leaf row-stacked: a
    :class:`PerRow` if any leaf varies per row (or ``always``), else ``tree`` as it is.  A
    :class:`RowView` of every row steps out as its batch (no leaf crosses the level)."""
    if type(tree) is RowView and tree._row is None:
        return PerRow(tree._batch)
    if isinstance(tree, torch.Tensor):
        value, varies = _row_stacked(tree, level, n)
        return PerRow(value) if varies or always else tree
    leaves: list[torch.Tensor] = []
    spec = fast_flatten(tree, leaves)
    if not leaves:
        return PerRow(tree) if always else tree
    stacked = [_row_stacked(x, level, n) for x in leaves]
    if not always and not any(v for _, v in stacked):
        return tree
    return PerRow(fast_unflatten(spec, iter([s for s, _ in stacked])))


def varies_per_row(tree: Any) -> bool:
    """Whether some tensor of ``tree`` (a selection, a choice map, ...) differs between the
    rows of the current row level (is batched at it)."""
    where = current_row_level()
    if where is None:
        return False
    leaves: list[torch.Tensor] = []
    fast_flatten(tree, leaves)
    return any(_functorch.maybe_get_level(x) == where[0] for x in leaves)


def outside_rows(fn: Callable[..., Any], *items: Any, batched: Sequence[bool] = ()) -> Any:
    """Run ``fn`` outside the current row level on the row-stacked ``items``; return its
    result as per-row views inside the level again.

    Each item reaches ``fn`` as a :class:`PerRow` of its row-stacked value when any of its
    tensors varies per row (or when its entry of ``batched`` is True: a trace, which batch
    methods always take row-stacked), else as it is.  Every tensor leaf of ``fn``'s result
    must have the leading row axis; inside the level it is one row again.  Must be called
    directly inside a :func:`vmap_rows` level (see :func:`current_row_level`).
    """
    where = current_row_level()
    if where is None:
        raise RuntimeError("outside_rows: not directly inside a vmap_rows level")
    level, n = where
    flags = tuple(batched) + (False,) * (len(items) - len(batched))
    stacked = [_rows_of(x, level, n, f) for x, f in zip(items, flags)]
    add_dim, _remove, enter, leave = _active_primitives()
    stack = _LEVELS.stack
    stack.pop()
    leave()
    try:
        out = fn(*stacked)
    finally:
        again = enter(n, "different")
        stack.append((again, n))
    if again != level:  # pragma: no cover - torch numbers levels by depth
        raise RuntimeError(f"outside_rows: re-entered vmap level {again}, not {level}")
    leaves: list[torch.Tensor] = []
    spec = fast_flatten(out, leaves)
    return fast_unflatten(spec, iter([add_dim(x, 0, level) for x in leaves]))


# ------------------------------------------------------------------ the user-facing layer
_VMAP_CAUSES = (
    ("data-dependent control flow", "data-dependent Python control flow (an `if` on a tensor)"),
    ("item()", "a call of .item() (or float()/int() of a tensor)"),
    ("Boolean value of Tensor", "data-dependent Python control flow (an `if` on a tensor)"),
    ("in-place", "an in-place write into a tensor that is not batched"),
    ("does not have a batching rule", "a torch operation without a vmap batching rule"),
)


def vmap_error(who: str, err: BaseException) -> VmapError | None:
    """A :class:`VmapError` naming why ``err`` (raised under vmap) happened, or None when it
    is not one of the known vmap limitations."""
    msg = str(err)
    for needle, cause in _VMAP_CAUSES:
        if needle in msg:
            return VmapError(
                f"{who}: the kernel cannot run under torch.func.vmap because of {cause}. "
                f"Rewrite it with torch.where / masking, or pass vectorize=False to run it "
                f"element by element. (torch said: {msg.splitlines()[0]})")
    return None


def batched_call(fn: Callable[..., Any], in_dims: InDims, *, vectorize: bool, length: int,
                 who: str) -> Callable[..., Any]:
    """``fn`` run over ``length`` elements: one :func:`vmap_rows` call, or, with
    ``vectorize=False``, a Python loop whose results are stacked (same layout).

    A kernel that cannot be vmapped gets a :class:`VmapError` naming the cause.  Over zero
    elements the kernel runs on one all-zero element (so that the output has its structure)
    and every output leaf is then cut to zero elements.
    """
    if length == 0:
        one = batched_call(fn, in_dims, vectorize=vectorize, length=1, who=who)

        def none(*args: Any) -> Any:
            padded = tuple(a if d is None else pytree.tree_map(
                lambda x, d=d: x.new_zeros(x.shape[:d] + (1,) + x.shape[d + 1:])
                if isinstance(x, torch.Tensor) else x, a) for a, d in zip(args, in_dims))
            return tree_index(one(*padded), slice(0, 0))

        return none
    if vectorize:
        def run(*args: Any) -> Any:
            try:
                return vmap_rows(fn, in_dims, args, length)
            except VmapError:
                raise
            except (RuntimeError, ValueError) as err:
                named = vmap_error(who, err)
                if named is not None:
                    raise named from err
                raise

        return run

    def loop(*args: Any) -> Any:
        outs = []
        # a RowView is handed to every element as it is, reading the element's row meanwhile
        # (one object: the elements' traces that keep it as an argument stay alike)
        views = [a for a, d in zip(args, in_dims) if d is not None and type(a) is RowView]
        try:
            for i in range(length):
                for v in views:
                    object.__setattr__(v, "_row", i)
                el = tuple(_index_arg(a, d, i) for a, d in zip(args, in_dims))
                outs.append(fn(*el))
        finally:
            for v in views:
                object.__setattr__(v, "_row", None)
        spec0 = pytree.tree_structure(outs[0])
        for i, out in enumerate(outs[1:], 1):
            # tree_stack keeps element 0's static parts (addresses, Python numbers): elements
            # of another structure would be stacked into a wrong record
            if pytree.tree_structure(out) != spec0:
                raise ArgumentError(
                    f"{who} (vectorize=False): element {i} has a different structure from "
                    "element 0 (other addresses, a Switch on another branch, or different "
                    "non-tensor values such as Python-number arguments), so the elements "
                    "cannot be stored stacked; pass tensors where values differ per element")
        return tree_stack(outs)

    return loop


def _index_arg(a: Any, dim: Any, i: int) -> Any:
    if dim is None or type(a) is RowView:
        return a
    return pytree.tree_map(
        lambda x: x.select(dim, i) if isinstance(x, torch.Tensor) else x, a)
