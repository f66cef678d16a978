"""gfcomb/core/gfi.py helpers that every generative function's weights go through."""

from __future__ import annotations

import torch

from gfcomb.core.gfi import weight_like, zero_weight


def test_zero_weight_is_a_fresh_zero_of_the_scores_shape_and_dtype():
    for score in (torch.tensor(-1.5, dtype=torch.float32), torch.randn(4, dtype=torch.float64)):
        w = zero_weight(score)
        assert w.shape == score.shape and w.dtype == score.dtype
        assert torch.equal(w, torch.zeros_like(score))
        w.add_(1.0)  # (writable: its own memory, not a view of something shared)
        assert torch.equal(zero_weight(score), torch.zeros_like(score))


def test_weight_like_returns_each_kind_of_weight_shaped_like_the_score():
    score = torch.randn(5, dtype=torch.float64)
    same = torch.randn(5, dtype=torch.float64)
    assert weight_like(same, score) is same
    scalar = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    w = weight_like(scalar, score)
    assert w.shape == (5,) and torch.equal(w.detach(), torch.full((5,), 0.25, dtype=torch.float64))
    w.sum().backward()  # (an expanded view: the gradient reaches the 0-d weight, once per row)
    assert scalar.grad is not None and float(scalar.grad) == 5.0
    assert torch.equal(weight_like(0.0, score), torch.zeros(5, dtype=torch.float64))
    assert torch.equal(weight_like(1.5, score), torch.full((5,), 1.5, dtype=torch.float64))
    other = torch.tensor(2.0, dtype=torch.float32)  # (another dtype: promoted as by addition)
    assert weight_like(other, score).dtype == torch.float64
    assert weight_like(other, torch.tensor(0.0, dtype=torch.float64)).dtype == torch.float64
