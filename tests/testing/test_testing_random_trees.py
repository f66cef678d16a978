"""Random combinator trees (Map, Unfold, Switch, Recurse nested to depth 3 over small @gen
kernels) through every GFI law.

The default run checks as many trees as the hypothesis profile's ``max_examples`` (20 in CI);
``test_ten_thousand_random_trees`` (``-m slow``) checks 10,000.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gfcomb.testing.laws import check_gfi_example
from gfcomb.testing.strategies import HypothesisDraw, ModelSpec, random_models


def _check(spec: ModelSpec, data) -> None:
    args = data.draw(spec.args, label="args")
    check_gfi_example(spec.gen_fn, args, HypothesisDraw(data), args_strategy=spec.args)


@settings(deadline=None, report_multiple_bugs=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(random_models(), st.data())
def test_random_combinator_trees_satisfy_the_gfi_laws(spec, data):
    _check(spec, data)


@given(random_models(max_depth=1))
@settings(max_examples=30, deadline=None)
def test_random_models_build_and_simulate(spec):
    x = torch.tensor(0.3)
    tr = spec.gen_fn.simulate((x,))
    assert torch.isfinite(tr.score)
    assert repr(spec) == spec.description


def test_random_models_shrink_to_a_leaf_kernel():
    from hypothesis import find

    spec = find(random_models(), lambda s: True)
    assert spec.description.startswith("k_")


N_SLOW = int(os.environ.get("GFCOMB_RANDOM_TREES", "10000"))
_counter = {"trees": 0}


@settings(max_examples=N_SLOW, deadline=None, report_multiple_bugs=False, database=None,
          suppress_health_check=list(HealthCheck))
@given(random_models(), st.data())
def _many_trees(spec, data):
    _counter["trees"] += 1
    _check(spec, data)


@pytest.mark.slow
def test_ten_thousand_random_trees():
    _counter["trees"] = 0
    t0 = time.perf_counter()
    _many_trees()
    elapsed = time.perf_counter() - t0
    print(f"\nrandom combinator trees checked: {_counter['trees']} in {elapsed:.0f} s "
          f"(load average {os.getloadavg()})")
    assert _counter["trees"] >= min(N_SLOW, 10_000)
