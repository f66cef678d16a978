"""Bernoulli with a constant probability draws and scores through one comparison and one
where (log p and log(1 - p) in Python): the same log masses as the general formula, -inf
outside {0, 1}, the general path for p in {0, 1} and for tensor probabilities."""

from __future__ import annotations

import math

import pytest
import torch

import gfcomb as gf


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_simulate_scores_its_draw_with_the_log_mass(p):
    torch.manual_seed(0)
    for _ in range(20):
        tr = gf.bernoulli.simulate((p,))
        v = float(tr.get_retval())
        assert v in (0.0, 1.0)
        expect = math.log(p) if v == 1.0 else math.log1p(-p)
        assert abs(float(tr.score) - expect) < 1e-12


def test_a_batch_of_draws_has_the_right_frequency_and_scores():
    torch.manual_seed(1)
    traces, _ = gf.bernoulli.batch_generate(20_000, (0.3,))
    v = traces.get_retval()
    assert v.dtype == torch.get_default_dtype()
    assert abs(float(v.mean()) - 0.3) < 0.015  # 4.6 standard errors of 0.0032
    expect = torch.where(v == 1, math.log(0.3), math.log(0.7))
    assert torch.allclose(traces.score, expect, atol=1e-12, rtol=0)


@pytest.mark.parametrize("value, expect", [(1.0, math.log(0.3)), (0.0, math.log(0.7)),
                                           (2.0, -math.inf), (-1.0, -math.inf),
                                           (0.5, -math.inf)])
def test_given_values_score_as_the_general_formula(value, expect):
    tr, w = gf.bernoulli.generate((0.3,), gf.ChoiceMap.value(torch.tensor(value)))
    assert float(w) == pytest.approx(expect, abs=1e-12) if math.isfinite(expect) \
        else float(w) == -math.inf
    general = gf.bernoulli.logpdf(torch.tensor(value), torch.tensor(0.3))
    assert float(w) == pytest.approx(float(general), abs=1e-12) if math.isfinite(expect) \
        else float(general) == -math.inf


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_a_certain_outcome_takes_the_general_path(p):
    tr = gf.bernoulli.simulate((p,))
    assert float(tr.get_retval()) == p
    assert float(tr.score) == 0.0


def test_float32_probability_keeps_its_dtype():
    tr = gf.bernoulli.simulate((torch.tensor(0.4, dtype=torch.float32),))
    assert tr.get_retval().dtype == torch.float32 and tr.score.dtype == torch.float32
    w, _ = gf.bernoulli.assess((0.4,), gf.ChoiceMap.value(torch.tensor(1.0)))
    assert abs(float(w) - math.log(0.4)) < 1e-12


def test_a_differentiable_probability_gets_the_score_gradient():
    p = torch.tensor(0.3, requires_grad=True)
    w, _ = gf.bernoulli.assess((p,), gf.ChoiceMap.value(torch.tensor(1.0)))
    (g,) = torch.autograd.grad(w, p)
    assert abs(float(g) - 1 / 0.3) < 1e-10
