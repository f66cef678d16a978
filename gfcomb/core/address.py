"""Addresses: a key (``str`` or ``int``) or a tuple of keys naming a path in a choice map."""

from __future__ import annotations

from typing import Any, Union

Key = Union[str, int]
Address = Union[Key, tuple[Any, ...]]


def normalize(addr: Any) -> tuple[Any, ...]:
    """Turn an address into a tuple of keys; ``()`` is the empty (root) address."""
    if isinstance(addr, tuple):
        return addr
    return (addr,)


def check_key(key: Any, where: str = "address") -> None:
    """Raise :class:`AddressTypeError` (a TypeError) unless ``key`` is a valid address
    component."""
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        from gfcomb.core.errors import AddressTypeError

        hint = " (write a tuple, not a list, for a hierarchical address)" \
            if isinstance(key, list) else ""
        raise AddressTypeError(f"{where} components must be str or int, got {key!r} "
                               f"({type(key).__name__}){hint}")


def format_address(addr: Any) -> str:
    """Human-readable form used in error messages: ``("ys", 0, "y")``."""
    t = normalize(addr)
    if len(t) == 1:
        return repr(t[0])
    return repr(t)
