"""Small facts about torch.func transforms that the rest of gfcomb asks about, and the
cached tensors batched results are made of (expanded rows of an unbatched value, ``arange``,
zeros)."""

from __future__ import annotations

from typing import Any

import torch
from torch._C import _functorch


def inside_functorch_transform() -> bool:
    """True while a torch.func transform (vmap, grad, jvp, ...) is running."""
    return _functorch.peek_interpreter_stack() is not None


def is_batched(x: Any) -> bool:
    """True if ``x`` is a tensor carrying a vmap batch dimension (a BatchedTensor)."""
    if not isinstance(x, torch.Tensor) or not _functorch.is_functorch_wrapped_tensor(x):
        return False  # (a plain tensor: one C call; batched tensors are functorch-wrapped)
    return bool(_functorch.is_batchedtensor(x)) or bool(
        _functorch.is_batchedtensor(_functorch.get_unwrapped(x)))


_EXPANDED: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def expanded_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` as ``n`` identical rows: the expanded view vmap returns for an unbatched output,
    cached per tensor (a particle filter passes the same parameters every step; cached only
    for tensors that do not require grad, whose view belongs to one autograd graph)."""
    if x.requires_grad:
        return x.expand(n, *x.shape)
    key = (id(x), n)
    hit = _EXPANDED.get(key)
    if hit is not None and hit[0] is x:
        return hit[1]
    if len(_EXPANDED) > 256:
        _EXPANDED.clear()
    out = x.expand(n, *x.shape)
    _EXPANDED[key] = (x, out)
    return out


_ARANGES: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def cached_arange(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.arange(n)`` as ``dtype`` on ``device``, cached (identity row pointers, the
    resampler's grid): read, never written in place."""
    if torch.is_inference_mode_enabled():  # (an inference tensor is not kept for later)
        return torch.arange(n, dtype=dtype, device=device)
    key = (n, dtype, device)
    r = _ARANGES.get(key)
    if r is None:
        if len(_ARANGES) > 64:
            _ARANGES.clear()
        r = _ARANGES[key] = torch.arange(n, dtype=dtype, device=device)
    return r


_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def zero_rows(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``n`` zeros as an expanded view of one cached zero (so an in-place write raises
    instead of changing every holder): e.g. the log weights right after resampling."""
    if torch.is_inference_mode_enabled():  # (an inference tensor is not kept for later)
        return torch.zeros((), dtype=dtype, device=device).expand(n)
    key = (dtype, device)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), dtype=dtype, device=device)
    return expanded_rows(zero, n)


def stack_tensors(xs: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.stack(xs, dim)``, cheaper inside a vmap when every tensor is batched at the
    innermost level: the values under the batch dimension are stacked as plain tensors and
    batched again (torch's batching rule for ``stack`` costs ~5 µs a tensor; an Unfold
    stacks each leaf of its steps' traces, 100 steps at a time).  The same result and
    gradients either way."""
    top = _functorch.peek_interpreter_stack()
    if (top is None or len(xs) < 2 or top.key() != _VMAP_KEY
            or torch._C._is_torch_function_mode_enabled()):
        return torch.stack(xs, dim)
    level = top.level()
    values = []
    for x in xs:
        if _functorch.maybe_get_level(x) != level:
            return torch.stack(xs, dim)  # (an unbatched or outer-level tensor among them)
        v, bdim = _functorch._unwrap_batched(x, level)
        if bdim is None:
            return torch.stack(xs, dim)
        values.append(v if bdim == 0 else v.movedim(bdim, 0))
    # stacked along a new leading axis (contiguous writes, several times faster than
    # writing every row's entries strided), that axis then moved behind the batch axis
    inner = dim + 1 if dim >= 0 else dim
    return _functorch._add_batch_dim(torch.stack(values).movedim(0, inner), 0, level)


_VMAP_KEY = _functorch.TransformType.Vmap
