"""A value built on first use: what a ``@gen`` body receives for a costly return value.

The return value of a batched ``Unfold`` is every particle's whole state sequence, gathered
along its ancestry through the shared step history: O(steps) to build.  A ``@gen`` body that
calls the Unfold usually only returns that value or ignores it, so the body receives a
:class:`Deferred` instead (see :meth:`gfcomb.core.trace.Trace.caller_retval`).  Any use --
a torch function, an operator, indexing, iteration, an attribute -- builds the value once and
forwards to it; a body that returns the Deferred as it is leaves the value unbuilt (its trace
reads it from the callee's trace when asked).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any


class Deferred:
    """A value computed by ``build()`` on first use, then kept."""

    __slots__ = ("_build", "_value", "_built")

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._value: Any = None
        self._built = False

    def value(self) -> Any:
        """The value (built now if it was not yet)."""
        if not self._built:
            self._value = self._build()
            self._built = True
            self._build = None  # type: ignore[assignment]
        return self._value

    @property
    def built(self) -> bool:
        """Whether the value has been built."""
        return self._built

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None,
                           ) -> Any:
        return func(*[resolve(a) for a in args],
                    **{k: resolve(v) for k, v in (kwargs or {}).items()})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.value(), name)

    def __getitem__(self, key: Any) -> Any:
        return self.value()[key]

    def __iter__(self) -> Any:
        return iter(self.value())

    def __len__(self) -> int:
        return len(self.value())

    def __bool__(self) -> bool:
        return bool(self.value())

    def __repr__(self) -> str:
        return repr(self.value()) if self._built else "<Deferred value (not built yet)>"


def resolve(x: Any) -> Any:
    """``x``'s value if it is a :class:`Deferred`, else ``x``; tuples, lists and dicts are
    resolved one level deep."""
    t = type(x)
    if t is Deferred:
        return x.value()
    if t is tuple or t is list:
        return t(resolve(v) for v in x)
    if t is dict:
        return {k: resolve(v) for k, v in x.items()}
    return x


def _forward(op: Callable[..., Any], reflected: bool = False) -> Callable[..., Any]:
    if reflected:
        return lambda self, other: op(resolve(other), self.value())
    return lambda self, *other: op(self.value(), *[resolve(o) for o in other])


_BINARY: list[tuple[str, Callable[..., Any]]] = [
    ("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
    ("truediv", operator.truediv), ("floordiv", operator.floordiv), ("mod", operator.mod),
    ("pow", operator.pow), ("matmul", operator.matmul), ("and", operator.and_),
    ("or", operator.or_), ("xor", operator.xor)]
_UNARY: list[tuple[str, Callable[..., Any]]] = [
    ("neg", operator.neg), ("pos", operator.pos), ("abs", operator.abs),
    ("invert", operator.invert), ("lt", operator.lt), ("le", operator.le), ("gt", operator.gt),
    ("ge", operator.ge), ("float", float), ("int", int), ("index", operator.index)]
for _name, _op in _BINARY:
    setattr(Deferred, f"__{_name}__", _forward(_op))
    setattr(Deferred, f"__r{_name}__", _forward(_op, reflected=True))
for _name, _op in _UNARY:
    setattr(Deferred, f"__{_name}__", _forward(_op))
