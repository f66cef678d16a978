"""The per-row values a ``@gen`` body sees when it runs once over a whole batch.

A :class:`RowValues` holds the rows' values of one per-row quantity (leading row axis).  The
body may compute with it elementwise -- Python arithmetic and comparisons, and the torch
functions and tensor methods that are pointwise (those whose ATen operator carries
``torch.Tag.pointwise``), dtype conversions, ``shape``/``dtype``/``device`` -- since an
elementwise operation on the stacked rows is the same operation on each row, once the rows'
trailing dimensions are aligned:

- every per-row operand is laid out as ``[n, 1, ..., 1, *row shape]`` to the largest row
  rank among them, and every shared tensor operand may have at most that rank (it then
  broadcasts against each row's trailing dimensions, as per row);
- tensor operands of different dtypes are allowed only when the scalars per row among them
  meet no shared tensor and no per-row vector (torch promotes a 0-d tensor and a
  dimensioned one differently, and a per-row scalar is 0-d in its row but dimensioned in
  the batch).

Anything else -- a reduction, indexing, a Python test (``if x > 0``), an in-place operation,
``str()`` -- raises :class:`NeedsRows`, and the body runs under the vmap over the rows
instead (:mod:`gfcomb.dsl.whole`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from types import MethodType
from typing import Any, NoReturn

import torch

from gfcomb.core.batching import expanded_rows
from gfcomb.core.deferred import resolve
from gfcomb.core.gfi import GenerativeFunction


class NeedsRows(Exception):
    """The body needs its rows (it computed with a per-row value in a way that is not
    elementwise, or a callee without batch methods of its own has work to do): run it under
    the vmap over the rows instead."""


def _refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise NeedsRows


_POINTWISE: dict[str, bool] = {}
_CONVERSIONS = frozenset({"long", "int", "float", "double", "half", "bool", "to", "type_as"})


def _is_pointwise(name: str) -> bool:
    """Whether the torch function or tensor method ``name`` is elementwise: its ATen
    operator carries the pointwise tag (not an in-place one)."""
    hit = _POINTWISE.get(name)
    if hit is None:
        op = name[2:-2] if name.startswith("__") and name.endswith("__") else name
        hit = False
        if op and not op.endswith("_"):
            try:
                packet = getattr(torch.ops.aten, op)
                hit = any(torch.Tag.pointwise in getattr(packet, o).tags
                          for o in packet.overloads())
            except (AttributeError, RuntimeError):
                hit = False
        _POINTWISE[name] = hit
    return hit


def _apply(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
           first_promoted: int = 0) -> RowValues:
    """``fn`` applied elementwise with per-row operands: on the aligned batches (operands
    before ``first_promoted`` take no part in type promotion: ``where``'s condition)."""
    rank = -1
    n = None
    dtypes = set()
    scalar_rows = False
    others = False  # (a shared tensor, or a per-row value that is not a scalar per row)
    for i, a in enumerate((*args, *kwargs.values())):
        t = type(a)
        if t is RowValues:
            b = a.batch
            if not isinstance(b, torch.Tensor) or b.dim() == 0 or (n is not None
                                                                  and b.shape[0] != n):
                raise NeedsRows
            n = b.shape[0]
            rank = max(rank, b.dim() - 1)
            if i >= first_promoted:
                dtypes.add(b.dtype)
                if b.dim() == 1:
                    scalar_rows = True
                else:
                    others = True
        elif isinstance(a, torch.Tensor):
            if i >= first_promoted:
                dtypes.add(a.dtype)
                others = True
        elif t is tuple or t is list or t is dict:
            raise NeedsRows  # (a container: not an elementwise operand)
    if n is not None and n > 1 and all(
            a.batch.stride(0) == 0 for a in (*args, *kwargs.values()) if type(a) is RowValues):
        # every per-row operand is one row expanded to all (a shared constraint, say): so is
        # the result, computed once on that row -- as the vmap over the rows computes it
        out = fn(*[_row0(a) for a in args], **{k: _row0(v) for k, v in kwargs.items()})
        if not isinstance(out, torch.Tensor):
            raise NeedsRows
        return RowValues(expanded_rows(out, n))
    if len(dtypes) > 1 and scalar_rows and others:
        raise NeedsRows

    def aligned(a: Any) -> Any:
        if type(a) is RowValues:
            b = a.batch
            k = b.dim() - 1
            return b if k == rank else b.reshape(b.shape[:1] + (1,) * (rank - k) + b.shape[1:])
        if isinstance(a, torch.Tensor) and a.dim() > rank:
            raise NeedsRows  # (it would broadcast against the row axis)
        return a

    out = fn(*[aligned(a) for a in args], **{k: aligned(v) for k, v in kwargs.items()})
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
        raise NeedsRows
    return RowValues(out)


def _row0(a: Any) -> Any:
    return a.batch[0] if type(a) is RowValues else a


class RowValues:
    """A per-row value as a body run over the whole batch sees it: the rows' values
    (``batch``, leading row axis).  It can be passed to a traced call, returned, and
    computed with elementwise (see the module docstring); any other use raises
    :class:`NeedsRows`."""

    __slots__ = ("batch",)

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def __repr__(self) -> str:
        return f"RowValues({type(self.batch).__name__})"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> RowValues:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if "out" in kwargs or not (_is_pointwise(name) or name in _CONVERSIONS):
            raise NeedsRows
        return _apply(func, tuple(args), kwargs, 1 if name == "where" else 0)

    # A per-row tuple, list or dict has one structure for every row: its items are per row.
    def __iter__(self) -> Any:
        batch = self.batch
        if type(batch) is tuple or type(batch) is list:
            return iter([read_rows(v) for v in batch])
        raise NeedsRows

    def __len__(self) -> int:
        batch = self.batch
        if type(batch) is tuple or type(batch) is list or type(batch) is dict:
            return len(batch)
        raise NeedsRows

    def __getitem__(self, key: Any) -> Any:
        batch = self.batch
        if ((type(batch) is tuple or type(batch) is list) and type(key) is int) \
                or type(batch) is dict:
            return read_rows(batch[key])
        raise NeedsRows  # (indexing a per-row tensor indexes each row)

    def __getattr__(self, name: str) -> Any:
        batch = object.__getattribute__(self, "batch")
        if not isinstance(batch, torch.Tensor) or batch.dim() == 0:
            raise NeedsRows
        if name == "shape":
            return batch.shape[1:]
        if name == "ndim":
            return batch.dim() - 1
        if name in ("dtype", "device", "is_floating_point", "requires_grad"):
            return getattr(batch, name)
        if name == "dim":
            return lambda: batch.dim() - 1
        method = getattr(torch.Tensor, name, None)
        if method is None or not (name in _CONVERSIONS or _is_pointwise(name)):
            raise NeedsRows
        return lambda *args, **kwargs: _apply(method, (self, *args), kwargs)


def read_rows(value: Any) -> Any:
    """A value read from the whole batch as the body sees it: the rows' values, as a
    :class:`RowValues`, unless it is the same for every row (a Python number, a generative
    function)."""
    value = resolve(value)
    if value is None or isinstance(value, (bool, int, float, str, GenerativeFunction)):
        return value
    return RowValues(value)


class BatchReads:
    """A :class:`~gfcomb.core.vmap.RowView` of every row as a body run over the whole batch
    sees it: what the body reads -- ``view[addr]``, an attribute, a method's result -- is every
    row's value at once (:func:`read_rows`), where under the vmap it would be one row's."""

    __slots__ = ("batch",)

    def __init__(self, batch: Any) -> None:
        object.__setattr__(self, "batch", batch)

    def __repr__(self) -> str:
        return f"BatchReads({type(self.batch).__name__})"

    def __getitem__(self, addr: Any) -> Any:
        return read_rows(self.batch[addr])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # (copy, pickle: not reads)
            raise AttributeError(name)
        value = getattr(object.__getattribute__(self, "batch"), name)
        if type(value) is MethodType:
            return lambda *args, **kwargs: read_rows(value(*args, **kwargs))
        return read_rows(value)


_NUMBERS = (int, float, bool)


def _alike(b: Any, other: Any) -> bool:
    """Whether ``other`` combines with the rows ``b`` (a tensor) as is, with no alignment or
    dtype question: a Python number, or the rows of a value of the same shape and dtype."""
    if type(other) in _NUMBERS:
        return True
    if type(other) is RowValues:
        o = other.batch
        return type(o) is torch.Tensor and o.shape == b.shape and o.dtype == b.dtype
    return False


def _binary(op: Callable[[Any, Any], Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def forward(self: RowValues, other: Any) -> RowValues:
        b = self.batch
        if type(b) is torch.Tensor and b.dim() and b.stride(0) and _alike(b, other):
            return RowValues(op(b, other.batch if type(other) is RowValues else other))
        return _apply(op, (self, other), {})

    def reflected(self: RowValues, other: Any) -> RowValues:
        b = self.batch
        if type(b) is torch.Tensor and b.dim() and b.stride(0) and type(other) in _NUMBERS:
            return RowValues(op(other, b))
        return _apply(op, (other, self), {})

    return forward, reflected


for _name, _op in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("pow", operator.pow),
                   ("and", operator.and_), ("or", operator.or_), ("xor", operator.xor)):
    _fwd, _refl = _binary(_op)
    setattr(RowValues, f"__{_name}__", _fwd)
    setattr(RowValues, f"__r{_name}__", _refl)
for _name, _op in (("lt", operator.lt), ("le", operator.le), ("gt", operator.gt),
                   ("ge", operator.ge), ("eq", operator.eq), ("ne", operator.ne)):
    setattr(RowValues, f"__{_name}__", _binary(_op)[0])
for _name, _unary in (("neg", operator.neg), ("pos", operator.pos), ("abs", operator.abs),
                      ("invert", operator.invert)):
    setattr(RowValues, f"__{_name}__",
            (lambda u: lambda self: _apply(u, (self,), {}))(_unary))
# (not elementwise, or not the same per row: floor division and modulo round per dtype as
# torch does, but Python's ints inside them differ; in-place operators alias the rows)
for _name in ("matmul", "floordiv", "mod", "lshift", "rshift", "divmod"):
    setattr(RowValues, f"__{_name}__", _refuse)
    setattr(RowValues, f"__r{_name}__", _refuse)
for _name in ("iadd", "isub", "imul", "itruediv", "ipow", "iand", "ior", "ixor", "imatmul",
              "ifloordiv", "imod", "ilshift", "irshift", "bool", "int", "float", "complex",
              "index", "setitem", "contains", "hash", "round",
              "trunc", "floor", "ceil", "array", "call", "format", "reversed", "str"):
    # (str: a print in the body shows the rows, under vmap)
    setattr(RowValues, f"__{_name}__", _refuse)


__all__ = ["BatchReads", "NeedsRows", "RowValues", "read_rows"]
