"""A @gen batch method hands a callee with batch methods of its own (an Unfold) its old
sub-trace whole and keeps the new one whole (Trace.entering_rows / leaving_rows): results
equal the per-row loop, no RowView is left in a result, old traces are not changed, and a
removed or replaced call still reads its rows (score, choices) correctly."""

from __future__ import annotations

import math

import torch

import gfcomb as gf
from gfcomb.core.pytree import tree_index
from gfcomb.inference import mh

TOL = 1e-10
N, T = 5, 4
UC, NC = gf.UnknownChange(), gf.NoChange()


@gf.gen
def step(t, x):
    x = gf.normal(0.9 * x, 0.5) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


CHAIN = gf.Unfold(step)


@gf.gen
def model(T, use_chain):
    x0 = gf.normal(0.0, 1.0) @ "x0"
    if use_chain:
        return CHAIN(T, x0) @ "steps"
    return gf.normal(x0, 2.0) @ "alt"


@gf.gen
def inner(T, x0):
    return CHAIN(T, x0) @ "chain"


@gf.gen
def outer(T):
    x0 = gf.normal(0.0, 1.0) @ "x0"
    return inner(T, x0) @ "inner"


def ys(t):
    return torch.tensor(0.3 * t - 0.5)


def close(a, b, tol=TOL):
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), atol=tol, rtol=0), (a, b)


def row(tr, i):
    return tree_index(tr, i)


def no_row_views(tr):
    subs = getattr(tr, "subtraces", None)
    if subs is None:
        return True
    return all(not isinstance(s, gf.RowView) and no_row_views(s) for s in subs.values())


def filtered(gen_fn, first_args, obs_addr, steps):
    """A batch extended step by step with batch_update (observations constrained)."""
    torch.manual_seed(0)
    traces, _ = gen_fn.batch_generate(N, first_args(0))
    for t in range(steps):
        traces, _, _, _ = gen_fn.batch_update(traces, first_args(t + 1), (UC,) + (NC,) * (
            len(first_args(0)) - 1), gf.ChoiceMap({obs_addr(t): ys(t)}))
    return traces


def test_batch_update_of_a_wrapped_unfold_equals_the_per_row_updates():
    traces = filtered(model, lambda t: (t, True), lambda t: ("steps", t, "y"), T - 1)
    assert isinstance(traces.subtraces[("steps",)], gf.Trace) and no_row_views(traces)
    cm = gf.ChoiceMap({("steps", T - 1, "x"): torch.tensor(0.4),
                       ("steps", T - 1, "y"): ys(T - 1)})
    before = traces.score.clone()
    new, w, _, _ = model.batch_update(traces, (T, True), (UC, NC), cm)
    assert no_row_views(new)
    close(traces.score, before)  # the old batch is unchanged
    for i in range(N):
        one, wi, _, _ = model.update(row(traces, i), (T, True), (UC, NC), cm)
        close(w[i], wi)
        close(new.score[i], one.score)
        close(row(new, i)["steps", T - 2, "x"], one["steps", T - 2, "x"])
        close(row(new, i)["x0"], one["x0"])


def test_batch_regenerate_of_the_newest_step_equals_its_per_row_weight():
    traces = filtered(model, lambda t: (t, True), lambda t: ("steps", t, "y"), T)
    sel = gf.select(("steps", T - 1, "x"))
    new, w, _ = model.batch_regenerate(traces, (T, True), (NC, NC), sel)
    assert no_row_views(new)
    for i in range(N):
        old_i, new_i = row(traces, i), row(new, i)
        # regenerate weight with the prior proposal: change of the unselected scores
        lp_old = torch.distributions.Normal(old_i["steps", T - 1, "x"], 1.0).log_prob(ys(T - 1))
        lp_new = torch.distributions.Normal(new_i["steps", T - 1, "x"], 1.0).log_prob(ys(T - 1))
        close(w[i], lp_new - lp_old)
        close(new_i.score, model.assess((T, True), new_i.choices)[0])
        close(new_i["steps", 0, "x"], old_i["steps", 0, "x"])


def test_a_nested_gen_callee_hands_its_unfold_the_batch_too():
    traces = filtered(outer, lambda t: (t,), lambda t: ("inner", "chain", t, "y"), T - 1)
    assert no_row_views(traces)
    cm = gf.ChoiceMap({("inner", "chain", T - 1, "x"): torch.tensor(-0.2),
                       ("inner", "chain", T - 1, "y"): ys(T - 1)})
    new, w, _, _ = outer.batch_update(traces, (T,), (UC,), cm)
    assert no_row_views(new)
    for i in range(N):
        one, wi, _, _ = outer.update(row(traces, i), (T,), (UC,), cm)
        close(w[i], wi)
        close(new.score[i], one.score)


def test_a_removed_unfold_call_reads_its_rows_score_and_choices():
    traces = filtered(model, lambda t: (t, True), lambda t: ("steps", t, "y"), T)
    alt = gf.ChoiceMap({"alt": torch.tensor(0.25)})
    new, w, _, discard = model.batch_update(traces, (T, False), (NC, UC), alt)
    assert no_row_views(new) and ("steps",) not in new.subtraces
    for i in range(N):
        old_i = row(traces, i)
        x0 = old_i["x0"]
        lp_alt = -0.5 * ((0.25 - x0) / 2.0) ** 2 - math.log(2.0) - 0.5 * math.log(2 * math.pi)
        steps_score = old_i.score - torch.distributions.Normal(0.0, 1.0).log_prob(x0)
        close(w[i], lp_alt - steps_score)
        for t in range(T):
            close(discard["steps", t, "x"][i], old_i["steps", t, "x"])


def test_mh_on_the_newest_step_of_a_wrapped_unfold_equals_per_row_moves():
    traces = filtered(model, lambda t: (t, True), lambda t: ("steps", t, "y"), T)
    log_u = torch.log(torch.rand(N))
    torch.manual_seed(3)
    new, acc = mh(traces, gf.select(("steps", T - 1, "x")), log_u=log_u)
    assert no_row_views(new)
    assert 0 < int(acc.sum()) < N  # (this seed: some moves accepted, some rejected)
    for i in range(N):
        new_i, old_i = row(new, i), row(traces, i)
        moved = not torch.equal(new_i["steps", T - 1, "x"], old_i["steps", T - 1, "x"])
        assert moved == bool(acc[i])
        close(new_i["steps", 0, "x"], old_i["steps", 0, "x"])
        close(new_i.score, model.assess((T, True), new_i.choices)[0])


def test_a_move_on_an_older_step_rebuilds_only_the_particles_rows():
    """Regenerating step 1 of a resampled filter gathers that step's stored block at the
    particles' rows (a rebuild of those rows only); weights and scores equal the per-row
    regenerate of each particle's own trace."""
    from gfcomb.combinators.unfold.history import StepBlock
    from gfcomb.inference import pf_initialize, pf_resample, pf_update

    torch.manual_seed(5)
    state = pf_initialize(model, (0, True), None, N)
    for t in range(T):
        state = pf_update(state, (t + 1, True), (UC, NC), {("steps", t, "y"): ys(t)})
        state = pf_resample(state, "multinomial")
    traces = state.traces
    rebuilt_rows = []
    orig = StepBlock.read_steps_at

    def spy(self, rows):
        rebuilt_rows.append(rows.shape[0])
        return orig(self, rows)

    StepBlock.read_steps_at = spy
    try:
        sel = gf.select(("steps", 1, "x"))
        new, w, _ = model.batch_regenerate(traces, (T, True), (NC, NC), sel)
    finally:
        StepBlock.read_steps_at = orig
    assert rebuilt_rows and all(r == N for r in rebuilt_rows)
    for i in range(N):
        old_i, new_i = row(traces, i), row(new, i)
        x_old, x_new = old_i["steps", 1, "x"], new_i["steps", 1, "x"]
        x_prev = old_i["steps", 0, "x"]
        lp = torch.distributions.Normal
        # unselected choices whose scores change: y_1 (given x_1) and x_2 (given x_1)
        want = (lp(x_new, 1.0).log_prob(ys(1)) - lp(x_old, 1.0).log_prob(ys(1))
                + lp(0.9 * x_new, 0.5).log_prob(old_i["steps", 2, "x"])
                - lp(0.9 * x_old, 0.5).log_prob(old_i["steps", 2, "x"]))
        close(w[i], want)
        close(new_i["steps", 0, "x"], x_prev)
        close(new_i.score, model.assess((T, True), new_i.choices)[0])
