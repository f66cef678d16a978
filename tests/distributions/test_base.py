"""Distribution.update of a kept value under new arguments (gfcomb/distributions/base.py):
arguments that are new tensors holding the same numbers keep the computed score (weight 0,
NoChange); any other change is rescored exactly."""

from __future__ import annotations

import math

import torch

import gfcomb as gf
from gfcomb.core.diff import NoChange, UnknownChange
from gfcomb.distributions.params import same_scalar_params

UC = (UnknownChange(), UnknownChange())


def normal_lp(x: float, mu: float, sd: float) -> float:
    return -0.5 * ((x - mu) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)


def test_recomputed_equal_arguments_keep_the_score():
    mu = torch.tensor(0.3, dtype=torch.float64)
    tr = gf.normal.simulate((mu, 1.0))
    again = mu * 1.0  # a new tensor, the same number
    new, w, rd, discard = gf.normal.update(tr, (again, 1.0), UC)
    assert new.args[0] is again and new.score is tr.score and new.value is tr.value
    assert float(w) == 0.0 and isinstance(rd, NoChange) and discard.is_empty()
    assert tr.args[0] is mu  # the old trace is not touched


def test_changed_numbers_dtypes_and_grads_are_rescored():
    mu = torch.tensor(0.3, dtype=torch.float64)
    tr = gf.normal.simulate((mu, 1.0))
    x = float(tr.value)
    for args in ((mu + 0.5, 1.0), (mu, 2.0), (mu.float(), 1.0), (0.3, 1.0)):
        new, w, _, _ = gf.normal.update(tr, args, UC)
        expected = normal_lp(x, float(args[0]), args[1])
        assert math.isclose(float(new.score), expected, rel_tol=1e-6)
        assert math.isclose(float(w), expected - float(tr.score), rel_tol=1e-6, abs_tol=1e-6)
    p = mu.clone().requires_grad_(True)
    new, _, _, _ = gf.normal.update(tr, (p * 1.0, 1.0), UC)
    (g,) = torch.autograd.grad(new.score, p)  # the new score depends on the new argument
    torch.testing.assert_close(g, tr.value - mu)


def test_same_scalar_params_compares_numbers_exactly():
    a = torch.tensor(1.5, dtype=torch.float64)
    assert same_scalar_params((a * 1.0, 2.0), (a, 2.0))
    assert not same_scalar_params((a + 1e-15, 2.0), (a, 2.0))
    assert not same_scalar_params((torch.tensor(-0.0),), (torch.tensor(0.0),))
    assert not same_scalar_params((-0.0,), (0.0,))
    assert not same_scalar_params((torch.tensor(math.nan),), (torch.tensor(math.nan),))
    assert not same_scalar_params((torch.ones(2),), (torch.ones(2),))  # not scalars
    assert not same_scalar_params((a,), (a, 1.0))
    assert not same_scalar_params((1,), (1.0,))
