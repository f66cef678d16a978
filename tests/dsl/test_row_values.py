"""Per-row values in a body run over the whole batch (gfcomb/dsl/row_values.py): elementwise
work on the stacked rows equals the same work per row; anything that is not elementwise,
or whose result per row the batch cannot reproduce, needs the rows."""

from __future__ import annotations

import math

import pytest
import torch

import gfcomb as gf
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.dsl.row_values import NeedsRows, RowValues

torch.set_default_dtype(torch.float64)
N = 5
X = torch.linspace(-1.0, 1.0, N)  # one scalar per row
V = torch.arange(N * 3, dtype=torch.float64).reshape(N, 3) / 7  # one 3-vector per row
W = torch.tensor([0.5, -1.0, 2.0])  # shared


def per_row(fn, *rows):
    return torch.stack([fn(*[r[i] for r in rows]) for i in range(N)])


@pytest.mark.parametrize("fn", [
    lambda x: 0.8 * x + 1.0,
    lambda x: 1.0 - x / 2,
    lambda x: x ** 2 - 2 ** x,
    lambda x: -abs(x),
    lambda x: torch.exp(x) * torch.tanh(x),
    lambda x: torch.nn.functional.softplus(x),
    lambda x: torch.where(x > 0, x, torch.tensor(0.0)),
    lambda x: (x > 0.2).long() + (x <= -0.5),
    lambda x: x.sigmoid().clamp(min=0.3),
    lambda x: x * torch.tensor(3.0),
    lambda x: sum([x, x, 1.0]),
])
def test_elementwise_work_on_scalar_rows_equals_the_work_per_row(fn):
    out = fn(RowValues(X))
    assert type(out) is RowValues
    torch.testing.assert_close(out.batch, per_row(fn, X), rtol=0, atol=1e-15)


def test_rows_of_different_rank_and_shared_tensors_are_aligned_as_per_row():
    out = RowValues(V) * W + RowValues(X)  # per row: [3] * [3] + scalar
    torch.testing.assert_close(out.batch, per_row(lambda v, x: v * W + x, V, X))
    assert RowValues(V).shape == (3,) and RowValues(V).ndim == 1 and RowValues(X).dim() == 0
    assert RowValues(V).dtype == torch.float64


@pytest.mark.parametrize("fn", [
    lambda x: x.sum(),               # a reduction
    lambda x: x[0],                  # indexing
    lambda x: x @ x,                 # not elementwise
    lambda x: x * W,                 # a shared vector would broadcast against the rows
    lambda x: bool(x > 0),           # a Python test
    lambda x: float(x),
    lambda x: x.exp_(),              # in place
    lambda x: x.__iadd__(1.0),
    lambda x: x.float() + torch.tensor(1.0),  # dtypes that promote differently per row
    lambda x: torch.stack([x, x]),
    lambda x: str(x),
    lambda x: x // 2,
])
def test_work_that_is_not_elementwise_per_row_needs_the_rows(fn):
    with pytest.raises(NeedsRows):
        fn(RowValues(X))


def test_in_place_operators_do_not_rebind_silently():
    x = RowValues(X)
    with pytest.raises(NeedsRows):
        x += 1.0


@gf.gen
def kernel(t, x, a):
    z = gf.normal(a * x + math.sin(t), 0.5) @ "z"
    gf.bernoulli(torch.sigmoid(z - x)) @ "b"
    return torch.tanh(z) * 2.0


def test_a_kernel_computing_with_its_state_runs_over_the_whole_batch():
    """Its batch equals the vmap default's, draws included, and it never falls back."""
    x = gf.PerRow(torch.randn(N))
    obs = gf.PerRow(gf.ChoiceMap({"b": (torch.arange(N) % 2).double()}))
    torch.manual_seed(4)
    tr, w = kernel.batch_generate(N, (3, x, 0.9), obs)
    torch.manual_seed(4)
    ref, ref_w = GenerativeFunction.batch_generate(kernel, N, (3, x, 0.9), obs)
    assert not kernel._rows_only_methods
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(tr.score, ref.score, rtol=0, atol=1e-12)
    torch.testing.assert_close(tr.retval, ref.retval, rtol=0, atol=1e-12)
    torch.testing.assert_close(tr["z"], ref["z"], rtol=0, atol=0)
    new, w2, _, discard = kernel.batch_update(tr, (3, x, 0.7), (NC, NC, UC), None)
    ref2, ref_w2, _, _ = GenerativeFunction.batch_update(kernel, tr, (3, x, 0.7),
                                                         (NC, NC, UC), None)
    torch.testing.assert_close(w2, ref_w2, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.score, ref2.score, rtol=0, atol=1e-12)
    assert discard.is_empty() and not kernel._rows_only_methods


NC, UC = gf.NoChange(), gf.UnknownChange()


@gf.gen
def proposal(trace, y):
    """Reads each particle's x through a RowView: over the whole batch, every row's at once."""
    gf.normal(0.5 * (trace["x"] + y), 0.7) @ "x_next"


@gf.gen
def point():
    gf.normal(0.0, 1.0) @ "x"


def test_a_proposal_reading_a_row_view_runs_over_the_whole_batch():
    traces, _ = point.batch_generate(N, ())
    args = (gf.RowView(traces), torch.tensor(0.4))
    torch.manual_seed(8)
    tr, w = proposal.batch_generate(N, args)
    torch.manual_seed(8)
    ref, ref_w = GenerativeFunction.batch_generate(proposal, N, args)
    assert not proposal._rows_only_methods
    torch.testing.assert_close(tr["x_next"], ref["x_next"], rtol=0, atol=0)
    torch.testing.assert_close(tr.score, ref.score, rtol=0, atol=1e-12)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(tr.score, -0.5 * ((tr["x_next"] - 0.5 * (traces["x"] + 0.4))
                                                 / 0.7) ** 2 - math.log(0.7)
                               - 0.5 * math.log(2 * math.pi))


def test_rows_that_are_one_row_expanded_stay_one_row():
    """A shared constraint enters the batch as one row expanded: what is computed from it
    alone is computed once and expanded again (as the vmap over the rows sees it: unbatched),
    in any dtype."""
    shared = RowValues(torch.tensor(1.0).expand(N))
    out = shared.long() * 2 + torch.tensor(3)
    assert out.batch.stride() == (0,) and out.batch.dtype == torch.long
    assert out.batch.tolist() == [5] * N
    assert (RowValues(X) + shared).batch.stride() == (1,)
