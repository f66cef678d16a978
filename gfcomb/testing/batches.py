"""Comparing two batches (of traces, choice maps, weights): what a generative function's own
batch methods are checked against -- the per-row methods under vmap, its
``GenerativeFunction.batch_*`` defaults."""

from __future__ import annotations

from typing import Any

import torch

from gfcomb.core import flat


def assert_same_batch(a: Any, b: Any, atol: float = 1e-12) -> None:
    """Assert that ``a`` and ``b`` have one record layout (every class, static field and
    container alike) and equal tensor leaves: the same shapes and dtypes, values within
    ``atol`` (``atol=0``: identical)."""
    assert flat.flatten(a, []) == flat.flatten(b, []), "the batches' layouts differ"
    la: list[torch.Tensor] = []
    lb: list[torch.Tensor] = []
    flat.flatten(a, la)
    flat.flatten(b, lb)
    assert len(la) == len(lb), "the batches hold different numbers of tensors"
    for x, y in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype, \
            f"a leaf of shape {tuple(x.shape)} {x.dtype} against {tuple(y.shape)} {y.dtype}"
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


__all__ = ["assert_same_batch"]
