"""Resamplers: unbiased offspring counts, exact agreement with the textbook (searchsorted)
formulas under the same uniforms, ESS, and the degenerate-weights error."""

from __future__ import annotations

import math

import pytest
import torch

from gfcomb.core.errors import ArgumentError, DegenerateWeightsError
from gfcomb.inference.resampling import (
    RESAMPLERS,
    effective_sample_size,
    exp_normalized,
    get_resampler,
    log_normalize,
    multinomial_resample,
    resample,
    residual_resample,
    stratified_resample,
    systematic_resample,
    systematic_resample_searchsorted,
)

METHODS = sorted(RESAMPLERS)
W = torch.tensor([0.31, 0.0, 0.02, 0.17, 0.005, 0.0, 0.25, 0.095, 0.11, 0.04])


def counts(anc: torch.Tensor, size: int) -> torch.Tensor:
    return torch.bincount(anc, minlength=size)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [10, 7, 25])
def test_offspring_counts_are_unbiased(method, n):
    """E[count_i] = n w_i: the mean over D draws is within 5 standard errors, using the
    multinomial variance n w (1 - w) (an upper bound for the other schemes, floored at 1/4,
    the largest variance of a count restricted to two neighbouring integers)."""
    resampler = RESAMPLERS[method]
    draws = 3000
    total = torch.zeros(W.shape[0])
    for _ in range(draws):
        anc = resampler(W, n)
        assert anc.shape == (n,) and anc.dtype == torch.long
        assert int(anc.min()) >= 0 and int(anc.max()) < W.shape[0]
        total += counts(anc, W.shape[0])
    mean = total / draws
    expected = n * W / W.sum()
    sd = torch.sqrt(torch.clamp(n * W * (1 - W), min=0.25) / draws)
    assert torch.all((mean - expected).abs() <= 5 * sd + 1e-12), (mean, expected)
    # particles with zero weight never get offspring
    assert total[W == 0].sum() == 0


@pytest.mark.parametrize("method", METHODS)
def test_unnormalized_weights_give_the_same_draw(method):
    resampler = RESAMPLERS[method]
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    a = resampler(W, 40, generator=g1)
    b = resampler(W * 7.5, 40, generator=g2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("size", [50, 3000])  # the small-N (binary search) and O(N) paths
def test_systematic_equals_searchsorted_formula_under_the_same_uniform(size):
    for seed in range(20):
        w = torch.rand(size) ** 3
        w[seed % size] = 0.0
        w = w / w.sum()
        for n in (size, 13, 4 * size):
            g1 = torch.Generator().manual_seed(seed)
            g2 = torch.Generator().manual_seed(seed)
            assert torch.equal(systematic_resample(w, n, g1),
                               systematic_resample_searchsorted(w, n, g2))


def test_systematic_counts_are_floor_or_ceil():
    w = torch.softmax(torch.randn(1000) * 3, 0)
    for _ in range(20):
        c = counts(systematic_resample(w), 1000).double()
        assert torch.all(c >= torch.floor(1000 * w) - 1e-9)
        assert torch.all(c <= torch.ceil(1000 * w) + 1e-9)


def test_stratified_equals_textbook_formula_under_the_same_uniforms():
    for seed in range(20):
        w = torch.rand(30) ** 2
        w = w / w.sum()
        for n in (30, 11, 90):
            g = torch.Generator().manual_seed(seed)
            anc = stratified_resample(w, n, g)
            u = torch.rand(n + 1, generator=torch.Generator().manual_seed(seed))
            points = (torch.arange(n, dtype=w.dtype) + u[:n]) / n
            ref = torch.searchsorted(torch.cumsum(w, 0), points, right=True).clamp(max=29)
            assert torch.equal(anc, ref)


def test_multinomial_matches_multinomial_distribution():
    """Chi-square goodness of fit of the pooled counts (n = 4 per draw, 5000 draws)."""
    w = torch.tensor([0.5, 0.3, 0.15, 0.05])
    total = torch.zeros(4)
    for _ in range(5000):
        total += counts(multinomial_resample(w, 4), 4)
    expected = 20000 * w
    chi2 = float(((total - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # the 0.999 quantile of chi-square with 3 degrees of freedom


def test_residual_keeps_the_deterministic_copies():
    w = torch.softmax(torch.randn(200), 0)
    for _ in range(20):
        c = counts(residual_resample(w), 200).double()
        assert torch.all(c >= torch.floor(200 * w) - 1e-9)
        assert int(c.sum()) == 200


def test_one_particle_and_single_mass():
    for method in METHODS:
        assert torch.equal(RESAMPLERS[method](torch.tensor([1.0]), 5), torch.zeros(5).long())
        w = torch.zeros(6)
        w[3] = 1.0
        assert torch.equal(RESAMPLERS[method](w), torch.full((6,), 3))


def test_effective_sample_size():
    assert float(effective_sample_size(torch.zeros(8))) == pytest.approx(8.0, abs=1e-9)
    lw = torch.tensor([0.0, -math.inf, -math.inf])
    assert float(effective_sample_size(lw)) == pytest.approx(1.0, abs=1e-9)
    lw = torch.randn(20)
    w = lw.exp()
    assert float(effective_sample_size(lw)) == pytest.approx(
        float(w.sum() ** 2 / (w ** 2).sum()), rel=1e-12)


def test_log_normalize_and_exp_normalized():
    lw = torch.tensor([-1.0, 2.0, -math.inf, 0.5])
    ln, lse = log_normalize(lw)
    ref = math.log(math.exp(-1) + math.exp(2) + math.exp(0.5))
    assert float(lse) == pytest.approx(ref, abs=1e-12)
    assert float(ln.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    w, lse2 = exp_normalized(lw)
    assert float(lse2) == pytest.approx(ref, abs=1e-12)
    assert torch.allclose(w / w.sum(), ln.exp(), atol=1e-15)


@pytest.mark.parametrize("bad, what", [
    (torch.full((5,), -math.inf), "all 5 log weights are -inf"),
    (torch.tensor([0.0, float("nan"), 1.0]), "1 of the 3 log weights are NaN"),
    (torch.tensor([0.0, math.inf]), "+inf"),
])
def test_degenerate_weights_raise_naming_the_step(bad, what):
    with pytest.raises(DegenerateWeightsError, match="my_filter at step 7") as info:
        log_normalize(bad, "my_filter", 7)
    assert what in str(info.value)
    with pytest.raises(DegenerateWeightsError, match="step 3"):
        resample(bad, "systematic", who="pf_resample", step=3)
    with pytest.raises(DegenerateWeightsError):
        exp_normalized(bad)


def test_bad_input():
    with pytest.raises(ArgumentError, match="unknown resampling method 'sorted'"):
        get_resampler("sorted")
    with pytest.raises(ArgumentError, match="1-d"):
        systematic_resample(torch.ones(2, 2))
    with pytest.raises(ArgumentError, match="positive int"):
        systematic_resample(torch.ones(3), 0)
    with pytest.raises(ArgumentError, match="log_weights"):
        log_normalize(torch.zeros(0))
    assert get_resampler(systematic_resample) is systematic_resample
