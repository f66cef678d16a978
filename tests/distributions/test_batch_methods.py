"""A univariate distribution's batch methods, computed on the whole batch at once
(Distribution.batch_*), against the per-row methods under the vmap over the rows
(GenerativeFunction.batch_*, the default, called on the same distribution): the same
record layout, weights, scores, discards and retdiffs; draws scored as the vmap scores them,
independent per row."""

from __future__ import annotations

import pytest
import torch

import gfcomb as gf
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.distributions.params import POSITIVE, REAL
from gfcomb.testing import assert_same_batch

torch.set_default_dtype(torch.float64)
N = 7
NC, UC = gf.NoChange(), gf.UnknownChange()


def _rows(lo: float, hi: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(N, generator=g)


# (distribution, arguments with one per-row parameter, the same with other per-row values)
CASES = {
    "normal": (gf.normal, lambda s: (gf.PerRow(_rows(-1, 1, s)), 0.7)),
    "normal (per-row scale)": (gf.normal, lambda s: (0.3, gf.PerRow(_rows(0.5, 2, s)))),
    "uniform": (gf.uniform, lambda s: (gf.PerRow(_rows(-2, -1, s)), 1.0)),
    "beta": (gf.beta, lambda s: (gf.PerRow(_rows(0.5, 2, s)), 2.0)),
    "gamma": (gf.gamma, lambda s: (gf.PerRow(_rows(0.5, 2, s)), 1.5)),
    "inv_gamma": (gf.inv_gamma, lambda s: (gf.PerRow(_rows(1.5, 3, s)), 1.5)),
    "exponential": (gf.exponential, lambda s: (gf.PerRow(_rows(0.5, 2, s)),)),
    "laplace": (gf.laplace, lambda s: (gf.PerRow(_rows(-1, 1, s)), 0.7)),
    "cauchy": (gf.cauchy, lambda s: (gf.PerRow(_rows(-1, 1, s)), 0.7)),
    "student_t": (gf.student_t, lambda s: (3.0, gf.PerRow(_rows(-1, 1, s)), 0.7)),
    "half_normal": (gf.half_normal, lambda s: (gf.PerRow(_rows(0.5, 2, s)),)),
    "half_cauchy": (gf.half_cauchy, lambda s: (gf.PerRow(_rows(0.5, 2, s)),)),
    "log_normal": (gf.log_normal, lambda s: (gf.PerRow(_rows(-1, 1, s)), 0.5)),
    "weibull": (gf.weibull, lambda s: (gf.PerRow(_rows(0.5, 2, s)), 1.5)),
    "bernoulli": (gf.bernoulli, lambda s: (gf.PerRow(_rows(0.1, 0.9, s)),)),
    "poisson": (gf.poisson, lambda s: (gf.PerRow(_rows(0.5, 3, s)),)),
    "geometric": (gf.geometric, lambda s: (gf.PerRow(_rows(0.1, 0.9, s)),)),
}
NATIVE = [k for k, (d, args) in CASES.items() if d.batch_runs_whole(args(0))]




def default_draws(dist, args):
    """Per-row draws of the vmap default (values in the support), as per-row constraints."""
    tr, _ = GenerativeFunction.batch_generate(dist, N, args)
    return tr.value


def test_the_univariate_built_ins_run_their_batches_whole():
    assert set(NATIVE) == set(CASES)
    assert not gf.mv_normal.batch_runs_whole((gf.PerRow(torch.zeros(N, 2)), torch.eye(2)))
    assert not gf.categorical.batch_runs_whole((torch.tensor([0.2, 0.8]),))
    assert not gf.normal.batch_runs_whole((gf.PerRow(torch.zeros(N, 2)), 1.0))  # a vector row
    assert not gf.normal.batch_runs_whole((torch.zeros(2), 1.0))  # a shared vector
    # (so a caller already running per row keeps calling the per-row methods)
    assert gf.normal.batch_matches_per_row()


@pytest.mark.parametrize("name", NATIVE)
def test_constrained_batch_generate_equals_the_vmap_default(name):
    dist, args = CASES[name]
    values = default_draws(dist, args(0))
    for constraints in (gf.PerRow(gf.ChoiceMap.value(values)), gf.ChoiceMap.value(values[2])):
        tr, w = dist.batch_generate(N, args(0), constraints)
        ref, ref_w = GenerativeFunction.batch_generate(dist, N, args(0), constraints)
        assert_same_batch(tr, ref)
        torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-12)
    assert tr.value.stride() == (0,)  # (a shared value as its expanded rows, as vmap leaves it)


@pytest.mark.parametrize("name", NATIVE)
def test_unconstrained_batch_generate_scores_its_draws_as_the_vmap_does(name):
    dist, args = CASES[name]
    tr, w = dist.batch_generate(N, args(0))
    ref, _ = GenerativeFunction.batch_generate(dist, N, args(0),
                                               gf.PerRow(gf.ChoiceMap.value(tr.value)))
    assert_same_batch(tr, ref)
    assert w.shape == (N,) and not w.any()


@pytest.mark.parametrize("name", NATIVE)
def test_batch_update_equals_the_vmap_default(name):
    dist, args = CASES[name]
    old, _ = GenerativeFunction.batch_generate(dist, N, args(0))
    new_values = default_draws(dist, args(1))
    for new_args, diffs, constraints in (
            (args(1), (UC,) * len(args(1)), None),
            (args(1), (UC,) * len(args(1)), gf.PerRow(gf.ChoiceMap.value(new_values))),
            (args(0), (NC,) * len(args(0)), gf.ChoiceMap.value(new_values[0])),
            (args(0), (NC,) * len(args(0)), None)):
        tr, w, rd, discard = dist.batch_update(old, new_args, diffs, constraints)
        ref, ref_w, ref_rd, ref_discard = GenerativeFunction.batch_update(
            dist, old, new_args, diffs, constraints)
        assert_same_batch(tr, ref)
        torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-12)
        assert rd == ref_rd
        assert discard.is_empty() == ref_discard.is_empty()
        if not discard.is_empty():
            torch.testing.assert_close(discard.get_value(), ref_discard.get_value())
    assert old.value.shape == (N,)  # (the old batch is left as it was)


@pytest.mark.parametrize("name", NATIVE)
def test_batch_regenerate_equals_the_vmap_default(name):
    dist, args = CASES[name]
    old, _ = GenerativeFunction.batch_generate(dist, N, args(0))
    diffs = (UC,) * len(args(1))
    tr, w, rd = dist.batch_regenerate(old, args(1), diffs, gf.select())
    ref, ref_w, ref_rd = GenerativeFunction.batch_regenerate(dist, old, args(1), diffs,
                                                             gf.select())
    assert_same_batch(tr, ref)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-12)
    tr, w, rd = dist.batch_regenerate(old, args(1), diffs, gf.selectall())
    ref, _ = GenerativeFunction.batch_generate(dist, N, args(1),
                                               gf.PerRow(gf.ChoiceMap.value(tr.value)))
    assert_same_batch(tr, ref)
    assert not w.any() and rd == UC


def test_every_row_draws_its_own_noise():
    scales = _rows(0.5, 2.0)
    tr, _ = gf.normal.batch_generate(N, (0.0, gf.PerRow(scales)))
    assert len(set((tr.value / scales).tolist())) == N  # (not one noise scaled per row)
    tr, _ = gf.normal.batch_generate(N, (0.0, 1.0))
    assert tr.value.shape == (N,) and len(set(tr.value.tolist())) == N


@pytest.mark.parametrize("dist, args", [(gf.normal, (gf.PerRow(_rows(-1, 1)), 0.7)),
                                        (gf.bernoulli, (gf.PerRow(_rows(0.1, 0.9)),)),
                                        (gf.bernoulli, (0.3,)),  # one probability for all
                                        (gf.bernoulli, (torch.tensor(0.3),))])
def test_the_draws_are_the_vmap_defaults_under_one_seed(dist, args):
    torch.manual_seed(3)
    tr, _ = dist.batch_generate(N, args)
    torch.manual_seed(3)
    ref, _ = GenerativeFunction.batch_generate(dist, N, args)
    assert_same_batch(tr, ref)


def test_a_masked_or_vector_batch_takes_the_vmap_default():
    values = torch.zeros(N)
    mask = torch.arange(N) % 2 == 0
    args = (gf.PerRow(_rows(-1, 1)), 0.7)
    torch.manual_seed(5)
    tr, w = gf.normal.batch_generate(N, args, gf.PerRow(gf.ChoiceMap.value(values, mask)))
    torch.manual_seed(5)
    ref, ref_w = GenerativeFunction.batch_generate(
        gf.normal, N, args, gf.PerRow(gf.ChoiceMap.value(values, mask)))
    assert_same_batch(tr, ref)
    torch.testing.assert_close(w, ref_w)
    assert (tr.value[mask] == 0).all() and (w[~mask] == 0).all()


@pytest.mark.parametrize("name", [k for k in NATIVE if not CASES[k][0].discrete])
def test_every_built_in_draws_every_row_its_own_noise_with_shared_parameters(name):
    dist, args = CASES[name]
    shared = tuple(float(a.value[0]) if isinstance(a, gf.PerRow) else a for a in args(0))
    assert dist.batch_runs_whole(shared)
    tr, _ = dist.batch_generate(N, shared)
    assert tr.value.shape == (N,) and len(set(tr.value.tolist())) == N


class SharedNoiseNormal(gf.Distribution, name="shared_noise_normal",
                        params={"loc": REAL, "scale": POSITIVE}):
    """A sampler that draws one noise and broadcasts it (vmap makes it per row): it does
    not say ``samples_per_element``, so its batches run per row under vmap."""

    def sample(self, loc, scale):
        return loc + scale * torch.randn((), dtype=loc.dtype)

    def logpdf(self, value, loc, scale):
        return gf.normal.logpdf(value, loc, scale)


def test_a_sampler_that_does_not_draw_per_element_batches_per_row():
    dist = SharedNoiseNormal()
    args = (gf.PerRow(torch.zeros(N)), 1.0)
    assert not dist.batch_runs_whole(args)
    tr, _ = dist.batch_generate(N, args)
    assert len(set(tr.value.tolist())) == N  # (per row under vmap: every row its own noise)
