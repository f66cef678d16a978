"""A @gen body run once over a whole batch (gfcomb/dsl/whole.py) against the same batch
method run under the vmap over the rows (``GenerativeFunction``'s default, called on the
same function): the same weights, scores, choices, discards and record layout, the same
random draws when a run is abandoned, and the caller's errors raised as they were."""

from __future__ import annotations

import pytest
import torch

import gfcomb as gf
from gfcomb.core.errors import GFIError
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.dsl.whole import RowValues
from gfcomb.testing import assert_same_batch

torch.set_default_dtype(torch.float64)
NC, UC = gf.NoChange(), gf.UnknownChange()
N = 6
A = torch.tensor(0.8)


@gf.gen
def step(t, x, a):
    x = gf.normal(a * x, 0.5) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


STEPS = gf.Unfold(step)


def make_wrapped(seen: list[type]) -> gf.GenFunction:
    """Gen.jl's filter model: x0, then the Unfold; ``seen`` gets the type of x0 per run."""

    @gf.gen
    def wrapped(T, a):
        x0 = gf.normal(0.0, 1.0) @ "x0"
        seen.append(type(x0))
        return STEPS(T, x0, a) @ "steps"

    return wrapped




def filtered(model, T: int) -> gf.Trace:
    """A batch of the model extended to T steps, every choice constrained."""
    g = torch.Generator().manual_seed(3)
    cm = {"x0": torch.randn(N, generator=g)}
    for t in range(T):
        cm[("steps", t, "x")] = torch.randn(N, generator=g)
        cm[("steps", t, "y")] = torch.randn(N, generator=g)
    return GenerativeFunction.batch_generate(model, N, (T, A), gf.PerRow(gf.ChoiceMap(cm)))[0]


def test_an_update_run_over_the_whole_batch_equals_the_rows_run():
    seen: list[type] = []
    model = make_wrapped(seen)
    old = filtered(model, 4)
    cm = gf.PerRow(gf.ChoiceMap({("steps", 4, "x"): torch.linspace(-1, 1, N),
                                 ("steps", 4, "y"): torch.full((N,), 0.3),
                                 ("steps", 2, "x"): torch.linspace(0, 2, N)}))
    seen.clear()
    new, w, retdiff, discard = model.batch_update(old, (5, A), (UC, NC), cm)
    assert seen == [RowValues]  # (the body ran once, over the whole batch)
    ref, rw, rretdiff, rdiscard = GenerativeFunction.batch_update(model, old, (5, A),
                                                                  (UC, NC), cm)
    assert seen[1] is not RowValues  # (and once under the vmap over the rows)
    assert_same_batch(new, ref)
    torch.testing.assert_close(w, rw, rtol=0, atol=1e-12)
    assert type(retdiff) is type(rretdiff)
    assert_same_batch(discard, rdiscard)
    assert discard[("steps", 2, "x")].shape == (N,)
    # the old batch is what it was
    assert_same_batch(old, filtered(model, 4))


def test_a_regenerate_run_over_the_whole_batch_draws_what_the_rows_run_draws():
    seen: list[type] = []
    model = make_wrapped(seen)
    old = filtered(model, 5)
    sel = gf.select(("steps", 4, "x"), ("steps", 3, "x"))
    seen.clear()
    torch.manual_seed(11)
    new, w, _ = model.batch_regenerate(old, (5, A), (NC, NC), sel)
    torch.manual_seed(11)
    ref, rw, _ = GenerativeFunction.batch_regenerate(model, old, (5, A), (NC, NC), sel)
    assert seen == [RowValues, seen[1]] and seen[1] is not RowValues
    assert_same_batch(new, ref)
    torch.testing.assert_close(w, rw, rtol=0, atol=1e-12)
    assert not torch.equal(new["steps", 4, "x"], old["steps", 4, "x"])


def test_an_abandoned_run_leaves_the_random_state_as_it_found_it():
    """The body draws a whole Unfold, then computes with its rows: the run over the whole
    batch is abandoned there, and the rows run draws what it would have drawn alone."""
    runs: list[type] = []

    @gf.gen
    def late(T, a):
        xs = STEPS(T, torch.tensor(0.0), a) @ "steps"
        runs.append(type(xs))
        return gf.normal(xs.sum(), 1.0) @ "z"

    torch.manual_seed(5)
    tr, w = late.batch_generate(N, (3, A))
    torch.manual_seed(5)
    ref, rw = GenerativeFunction.batch_generate(late, N, (3, A))
    assert_same_batch(tr, ref)
    torch.testing.assert_close(w, rw)
    assert runs[0] is RowValues and RowValues not in runs[1:]
    # learned: the next call runs under the vmap over the rows at once
    runs.clear()
    late.batch_generate(N, (3, A))
    assert RowValues not in runs


def test_a_callers_error_is_raised_and_the_whole_run_still_tried():
    seen: list[type] = []
    model = make_wrapped(seen)
    old = filtered(model, 2)
    with pytest.raises(GFIError) as err:
        model.batch_update(old, (2, A), (NC, NC), gf.ChoiceMap({"nowhere": 1.0}))
    assert "nowhere" in str(err.value)
    seen.clear()
    model.batch_update(old, (3, A), (UC, NC), None)
    assert seen == [RowValues]


def test_a_filter_on_the_wrapped_model_equals_the_rows_run():
    """pf_update and pf_resample on the wrapped model, whole runs against rows runs, over
    steps: the same log marginal likelihood estimate and particles."""
    from gfcomb.inference import log_ml_estimate, pf_initialize, pf_resample, pf_update

    ys = torch.randn(8, generator=torch.Generator().manual_seed(1))
    seen: list[type] = []
    model = make_wrapped(seen)

    @gf.gen
    def rows_model(T, a):  # the same model, computing with x0's rows (never run whole)
        x0 = gf.normal(0.0, 1.0) @ "x0"
        return STEPS(T, x0 + 0.0, a) @ "steps"

    def run(m):
        torch.manual_seed(2)
        state = pf_initialize(m, (0, A), None, 50)
        for t in range(8):
            state = pf_update(state, (t + 1, A), (UC, NC), {("steps", t, "y"): ys[t]})
            state = pf_resample(state, "systematic")
        return state

    fast, slow = run(model), run(rows_model)
    assert RowValues in seen
    torch.testing.assert_close(log_ml_estimate(fast), log_ml_estimate(slow), rtol=0,
                               atol=1e-10)
    torch.testing.assert_close(fast.traces["steps", 7, "x"], slow.traces["steps", 7, "x"],
                               rtol=0, atol=1e-12)



def test_a_generate_of_a_body_calling_only_an_unfold_equals_the_rows_run():
    """A body handing its per-row argument to an Unfold and returning a container of the
    Unfold's value: generate with per-row constraints runs once over the batch, as the rows
    run would."""
    runs: list[type] = []

    @gf.gen
    def chain(x_init, a):
        xs = STEPS(3, x_init, a) @ "steps"
        runs.append(type(xs))
        return (xs, x_init)

    x_init = gf.PerRow(torch.linspace(-1, 1, N))
    cm = gf.PerRow(gf.ChoiceMap({("steps", 1, "x"): torch.linspace(1, 2, N),
                                 ("steps", 2, "y"): torch.linspace(0, 1, N)}))
    torch.manual_seed(8)
    tr, w = chain.batch_generate(N, (x_init, A), cm)
    torch.manual_seed(8)
    ref, rw = GenerativeFunction.batch_generate(chain, N, (x_init, A), cm)
    assert runs[0] is RowValues and runs[1] is not RowValues
    assert_same_batch(tr, ref)
    torch.testing.assert_close(w, rw, rtol=0, atol=1e-12)
    torch.testing.assert_close(tr["steps", 1, "x"], torch.linspace(1, 2, N))


def test_printing_a_per_row_value_runs_the_body_under_the_rows():
    shown: list[str] = []

    @gf.gen
    def noisy(T, a):
        x0 = gf.normal(0.0, 1.0) @ "x0"
        shown.append(str(x0))
        return STEPS(T, x0, a) @ "steps"

    old = filtered(noisy, 2)
    shown.clear()
    new, _, _, _ = noisy.batch_update(old, (3, A), (UC, NC), None)
    assert len(shown) == 1 and "RowValues" not in shown[0]
    assert new["steps", 2, "x"].shape == (N,)
