"""Switch's batch_generate on the whole batch (every branch's batch merged by the per-row
index; a shared index runs its branch alone) against the per-row method under the vmap over
the rows (GenerativeFunction.batch_generate on the same Switch): the same record layout,
draws, scores and weights."""

from __future__ import annotations

import pytest
import torch

import gfcomb as gf
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.testing import assert_same_batch

torch.set_default_dtype(torch.float64)
N = 6


@gf.gen
def calm(x):
    return gf.normal(0.9 * x, 0.1) @ "x"


@gf.gen
def wild(x):
    gf.normal(0.0, 2.0) @ "z"
    return gf.normal(0.5 * x, 1.0) @ "x"


SWITCH = gf.Switch(calm, wild)
X = gf.PerRow(torch.linspace(-1, 1, N))


def same(a, b) -> None:
    assert_same_batch(a, b, atol=0)


@pytest.mark.parametrize("index", [
    gf.PerRow(torch.tensor([0, 1, 1, 0, 1, 0])),  # per row: every branch runs, merged
    gf.PerRow(torch.tensor(1).expand(N)),  # one index expanded to all: that branch alone
    0,  # shared
])
def test_batch_generate_equals_the_vmap_default(index):
    assert SWITCH.batch_runs_whole((index, X))
    torch.manual_seed(0)
    tr, w = SWITCH.batch_generate(N, (index, X))
    torch.manual_seed(0)
    ref, ref_w = GenerativeFunction.batch_generate(SWITCH, N, (index, X))
    same(tr, ref)
    assert torch.equal(w, ref_w) and not w.any()
    per_row_index = isinstance(index, gf.PerRow) and index.value.stride(0) != 0
    assert tr.all_branches == per_row_index


def test_the_index_picks_each_rows_branch():
    idx = torch.tensor([0, 1, 1, 0, 1, 0])
    tr, _ = SWITCH.batch_generate(N, (gf.PerRow(idx), X))
    for i in range(N):
        x_prev, x = X.value[i], tr.choices["x"][i]
        if idx[i] == 0:
            lp, _ = calm.assess((x_prev,), {"x": x})
        else:
            lp, _ = wild.assess((x_prev,), {"x": x, "z": tr.traces[1]["z"][i]})
        torch.testing.assert_close(tr.score[i], lp, rtol=0, atol=1e-12)
        torch.testing.assert_close(tr.retval[i], x)


def test_constrained_or_out_of_range_batches_take_the_vmap_default():
    assert not SWITCH.batch_runs_whole((5, X))  # (out of range: the default raises)
    assert not SWITCH.batch_runs_whole((gf.PerRow(torch.zeros(N)), X))  # (a float index)
    obs = gf.ChoiceMap({"x": torch.tensor(0.3)})
    idx = gf.PerRow(torch.tensor([0, 1, 1, 0, 1, 0]))
    torch.manual_seed(1)
    tr, w = SWITCH.batch_generate(N, (idx, X), obs)
    torch.manual_seed(1)
    ref, ref_w = GenerativeFunction.batch_generate(SWITCH, N, (idx, X), obs)
    same(tr, ref)
    assert torch.equal(w, ref_w)
