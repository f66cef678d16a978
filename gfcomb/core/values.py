"""Choice values: what a value at an address may be (converted to a tensor, bad input named by
its address) and how values are shown in messages."""

from __future__ import annotations

from typing import Any

import torch

from gfcomb.core.errors import ChoiceValueError


def to_tensor(value: Any, addr: tuple[Any, ...] = ()) -> torch.Tensor:
    """A choice value as a tensor; :class:`ChoiceValueError` naming ``addr`` for a value
    that is not a number, a bool, a tensor or a (nested) list of numbers."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool):
        return torch.tensor(float(value))
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.get_default_dtype())
    if isinstance(value, (str, bytes)) or value is None:
        raise ChoiceValueError(f"a choice value must be a number, a bool or a tensor, got "
                               f"{type(value).__name__} {value!r}", addr)
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ChoiceValueError(f"a choice value must be a number, a bool or a tensor, got "
                               f"{type(value).__name__} {value!r} ({err})", addr) from None
    return t


def short_repr(val: Any) -> str:
    """A value for messages: a small tensor in full (one line), a large one by shape and dtype."""
    if isinstance(val, torch.Tensor):
        if val.numel() <= 6:
            return repr(val.detach().cpu()).replace("\n", " ")
        return f"tensor(shape={tuple(val.shape)}, dtype={val.dtype})"
    return repr(val)
