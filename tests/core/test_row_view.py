"""``RowView``: a batch passed to a batch method so that each row reads its own row, lazily
(only what is read crosses into the vmap over the rows).  A proposal reading its particle's
previous state through a RowView gives what it gives through ``PerRow`` (the whole batch
carried in), vmapped and in a per-row loop, and a read inside a foreign transform is refused.
"""

from __future__ import annotations

import pytest
import torch

import gfcomb as gf
from gfcomb.core.vmap import RowView, vectorized


@gf.gen
def step(t, x):
    x = gf.normal(0.9 * x, 0.5) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


@gf.gen
def model(T):
    x0 = gf.normal(0.0, 1.0) @ "x0"
    return gf.Unfold(step)(T, x0) @ "steps"


@gf.gen
def proposal(trace, t):
    prev = trace["x0"] if t == 0 else trace["steps", t - 1, "x"]
    gf.normal(prev + 0.1, 0.7) @ ("steps", t, "x")


def _batch(n=6, T=3):
    torch.manual_seed(1)
    traces, _ = model.batch_generate(n, (T,), None)
    return traces


@pytest.mark.parametrize("vectorize", [True, False])
def test_proposal_reading_through_a_row_view_equals_per_row(vectorize):
    traces = _batch()
    with vectorized(vectorize):
        a, _ = proposal.batch_generate(6, (RowView(traces), 3))
        constraints = gf.PerRow(a.choices)
        b, w_per_row = proposal.batch_generate(6, (gf.PerRow(traces), 3), constraints)
        c, w_view = proposal.batch_generate(6, (RowView(traces), 3), constraints)
    prev = traces["steps", 2, "x"]
    x = a["steps", 3, "x"]
    expected = -0.5 * ((x - prev - 0.1) / 0.7) ** 2 - torch.log(torch.tensor(0.7)) \
        - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    torch.testing.assert_close(a.score, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(w_view, w_per_row, rtol=0, atol=1e-12)
    torch.testing.assert_close(c.score, b.score, rtol=0, atol=1e-12)


def test_reads_outside_rows_give_the_batch_and_a_foreign_transform_is_refused():
    traces = _batch()
    view = RowView(traces)
    torch.testing.assert_close(view["x0"], traces["x0"])
    torch.testing.assert_close(view.row(2)["x0"], traces["x0"][2])
    torch.testing.assert_close(view.get_retval(), traces.get_retval())
    with pytest.raises(gf.ArgumentError, match="RowView"):
        torch.func.vmap(lambda _: view["x0"])(torch.zeros(6))
