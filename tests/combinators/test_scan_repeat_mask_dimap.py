"""Scan, Repeat, Mask and Dimap: hand-computed weights, per-element loops, incremental
updates, vmap, and the GFI laws (check_gfi)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import strategies as st

import gfcomb as gf
from gfcomb.core.pytree import tree_index
from gfcomb.testing import check_gfi, float_tensors


def normal_lp(x, loc, scale):
    x, loc, scale = (torch.as_tensor(v, dtype=torch.float64) for v in (x, loc, scale))
    return torch.distributions.Normal(loc, scale).log_prob(x)


CALLS = {"n": 0}


@gf.gen
def step(c, x, s):
    CALLS["n"] += 1
    z = gf.normal(0.5 * c + x, s) @ "z"
    return (z, z + x)


SCAN = gf.Scan(step)


def scan_args(n=4):
    return (torch.tensor(0.3), torch.linspace(-1.0, 1.0, n), torch.tensor(0.7))


# ================================================================================== Scan
def test_scan_score_retval_and_choices_match_a_step_loop():
    args = scan_args()
    tr = SCAN.simulate(args)
    zs = tr.choices[:, "z"]
    c, total, ys = args[0], 0.0, []
    for t in range(4):
        total = total + normal_lp(zs[t], 0.5 * c + args[1][t], 0.7)
        c = zs[t]
        ys.append(zs[t] + args[1][t])
    assert torch.allclose(tr.score, total, atol=1e-12)
    carry, stacked = tr.retval
    assert torch.equal(carry, zs[-1])
    assert torch.allclose(stacked, torch.stack(ys), atol=1e-12)
    assert tr.get_retval(2) == (zs[2], zs[2] + args[1][2])
    w, r = SCAN.assess(args, tr.choices)
    assert torch.allclose(w, tr.score, atol=1e-12) and torch.equal(r[1], stacked)


def test_scan_generate_partial_weight_is_the_constrained_log_density():
    args = scan_args()
    cm = gf.ChoiceMap({(1, "z"): 0.4, (3, "z"): -0.2})
    tr, w = SCAN.generate(args, cm)
    assert tr[1, "z"] == 0.4 and tr[3, "z"] == -0.2
    expect = (normal_lp(0.4, 0.5 * tr[0, "z"] + args[1][1], 0.7)
              + normal_lp(-0.2, 0.5 * tr[2, "z"] + args[1][3], 0.7))
    assert torch.allclose(w, expect, atol=1e-12)
    full, wf = SCAN.generate(args, gf.ChoiceMap.stacked({"z": torch.zeros(4)}))
    assert torch.allclose(wf, full.score, atol=1e-12)


def test_scan_zero_steps_and_length_only():
    tr = SCAN.simulate((torch.tensor(0.3), torch.zeros(0), torch.tensor(0.7)))
    assert tr.retval == (tr.args[0], None) and tr.score == 0

    @gf.gen
    def walk(c, x):
        z = gf.normal(c, 1.0) @ "z"
        return (z, z)

    tr = gf.Scan(walk, length=3).simulate((torch.tensor(0.0), None))
    assert tr.retval[1].shape == (3,)


def test_scan_appending_steps_runs_only_the_new_ones():
    args = scan_args(5)
    tr = SCAN.simulate(args)
    longer = (args[0], torch.cat([args[1], torch.tensor([2.0, 3.0])]), args[2])
    CALLS["n"] = 0
    diffs = (gf.NoChange(), gf.VectorDiff(7, 5, []), gf.NoChange())
    new, w, _, discard = SCAN.update(tr, longer, diffs, gf.ChoiceMap({(6, "z"): 1.0}))
    assert CALLS["n"] == 2  # steps 5 and 6 only
    assert discard.is_empty()
    for t in range(5):
        assert new[t, "z"] == tr[t, "z"]
    assert torch.allclose(w, normal_lp(1.0, 0.5 * new[5, "z"] + 3.0, 0.7), atol=1e-12)
    assert torch.allclose(new.score - tr.score - gf.normal.assess(
        (0.5 * new[4, "z"] + 2.0, 0.7), gf.ChoiceMap.value(new[5, "z"]))[0], w, atol=1e-12)


def test_scan_update_constraint_revisits_from_its_step():
    args = scan_args(5)
    tr = SCAN.simulate(args)
    diffs = (gf.NoChange(),) * 3
    new, w, _, discard = SCAN.update(tr, args, diffs, gf.ChoiceMap({(2, "z"): 0.9}))
    assert discard[2, "z"] == tr[2, "z"]
    assert torch.allclose(w, new.score - tr.score, atol=1e-12)


def test_scan_under_vmap_matches_per_particle_calls():
    args = scan_args()
    inits = torch.tensor([0.1, -0.4, 0.8])
    trs = torch.func.vmap(lambda c: SCAN.simulate((c,) + args[1:]), randomness="different")(
        inits)
    for i in range(3):
        cm = gf.ChoiceMap.stacked({"z": trs.choices[:, "z"][i]})
        w, _ = SCAN.assess((inits[i],) + args[1:], cm)
        assert torch.allclose(w, trs.score[i], atol=1e-12)


def test_scan_in_a_gen_model_and_laws():
    @gf.gen
    def model(x):
        c0 = gf.normal(x, 1.0) @ "c0"
        return SCAN(c0, torch.linspace(-1.0, 1.0, 3), torch.tensor(0.7)) @ "scan"

    tr = model.simulate((torch.tensor(0.0),))
    assert tr.get_retval(("scan", 1)) == (tr["scan", 1, "z"], tr["scan", 1, "z"] + 0.0)
    check_gfi(model, st.tuples(float_tensors((), -1, 1)), max_examples=8, derandomize=True)


def test_scan_in_a_particle_filter_extends_and_moves_its_shared_history():
    """A @gen model wrapping a Scan, filtered step by step (xs one longer each step, its
    VectorDiff naming no updated input), resampled and moved on the newest step: the batch
    runs the kernel once per step and keeps the steps in the inner Unfold's shared history
    (a per-row update of the whole batch keeps none and copies every step); every row's
    score is the model's log density of its choices, and the batch's return value is every
    row's (final carry, ys)."""
    from gfcomb.inference import mh, pf_initialize, pf_rejuvenate, pf_resample, pf_update

    @gf.gen
    def model(xs):
        return SCAN(gf.normal(0.0, 1.0) @ "c0", xs, torch.tensor(0.7)) @ "scan"

    xs = torch.linspace(-1.0, 1.0, 8)
    torch.manual_seed(4)
    state = pf_initialize(model, (xs[:0],), None, 6)
    runs = []
    for t in range(8):
        before = CALLS["n"]
        state = pf_update(state, (xs[:t + 1],), (gf.VectorDiff(t + 1, t, []),),
                          {("scan", t, "z"): torch.tensor(0.1 * t)} if t % 2 else None)
        state = pf_resample(state)
        state = pf_rejuvenate(state, mh, gf.select(("scan", t, "z")))
        runs.append(CALLS["n"] - before)
    assert runs[1:] == [runs[1]] * 7, runs
    scan_trace = state.traces.subtrace("scan")
    assert scan_trace.inner.history is not None  # (the steps in the shared history)
    carry, ys = scan_trace.retval
    assert carry.shape == (6,) and ys.shape == (6, 8)
    for i in (0, 5):
        row = tree_index(state.traces, i)
        w, (c_i, ys_i) = model.assess((xs,), row.choices)
        torch.testing.assert_close(w, row.score, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(c_i, carry[i], rtol=0, atol=1e-12)
        torch.testing.assert_close(ys_i, ys[i], rtol=0, atol=1e-12)


def test_scan_bad_arguments_name_themselves():
    with pytest.raises(gf.ArgumentError, match="xs"):
        SCAN.simulate((torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0)))
    with pytest.raises(gf.ArgumentError, match="init_carry"):
        SCAN.simulate((torch.tensor(0.0),))

    @gf.gen
    def bad(c, x):
        return gf.normal(c, 1.0) @ "z"

    with pytest.raises(gf.ArgumentError, match="pair"):
        gf.Scan(bad).simulate((torch.tensor(0.0), torch.zeros(2)))


# ================================================================================ Repeat
def test_repeat_is_n_independent_calls():
    rep = gf.Repeat(gf.normal, 4)
    args = (torch.tensor(0.5), torch.tensor(2.0))
    tr = rep.simulate(args)
    assert tr.retval.shape == (4,)
    assert torch.allclose(tr.score, normal_lp(tr.retval, 0.5, 2.0).sum(), atol=1e-12)
    tr2, w = rep.generate(args, gf.ChoiceMap({1: 0.25}))
    assert tr2[1] == 0.25
    assert torch.allclose(w, normal_lp(0.25, 0.5, 2.0), atol=1e-12)
    new, w, _, d = rep.update(tr, (torch.tensor(1.0), torch.tensor(2.0)),
                              (gf.UnknownChange(), gf.NoChange()), gf.ChoiceMap.empty())
    assert torch.allclose(w, normal_lp(tr.retval, 1.0, 2.0).sum() - tr.score, atol=1e-12)
    assert torch.allclose(tr.get_retval(2), tr[2])


def test_repeat_of_a_gen_function_and_laws():
    @gf.gen
    def pt(mu):
        x = gf.normal(mu, 1.0) @ "x"
        return gf.normal(x, 0.5) @ "y"

    rep = gf.Repeat(pt, 3)
    tr = rep.simulate((torch.tensor(0.0),))
    total = sum(normal_lp(tr[i, "x"], 0.0, 1.0) + normal_lp(tr[i, "y"], tr[i, "x"], 0.5)
                for i in range(3))
    assert torch.allclose(tr.score, total, atol=1e-12)
    check_gfi(rep, st.tuples(float_tensors((), -1, 1)), max_examples=8, derandomize=True)


# ================================================================================== Mask
def test_mask_concrete_flag():
    m = gf.Mask(gf.normal)
    on = m.simulate((True, torch.tensor(0.0), torch.tensor(1.0)))
    assert torch.allclose(on.score, normal_lp(on.retval, 0.0, 1.0))
    off = m.simulate((False, torch.tensor(0.0), torch.tensor(1.0)))
    assert off.score == 0 and off.choices.is_empty() and off.retval is None
    with pytest.raises(gf.UnvisitedConstraintError):
        m.generate((False, 0.0, 1.0), gf.ChoiceMap.value(1.0))
    # turning off discards, turning on generates
    new, w, _, d = m.update(on, (False, 0.0, 1.0), (gf.UnknownChange(),) + (gf.NoChange(),) * 2)
    assert torch.allclose(w, -on.score) and d[()] == on.retval
    back, w2, _, _ = m.update(new, on.args, (gf.UnknownChange(),) + (gf.NoChange(),) * 2,
                              gf.ChoiceMap.value(on.retval))
    assert torch.allclose(w2, on.score)


def test_map_of_mask_with_batched_flags_masks_choices_and_weights():
    flags = torch.tensor([True, False, True, False])
    locs = torch.tensor([0.0, 1.0, 2.0, 3.0])
    mm = gf.Map(gf.Mask(gf.normal), in_dims=(0, 0, None))
    tr = mm.simulate((flags, locs, torch.tensor(1.0)))
    assert [a for a, _ in tr.choices.items()] == [(0,), (2,)]
    expect = normal_lp(tr[0], 0.0, 1.0) + normal_lp(tr[2], 2.0, 1.0)
    assert torch.allclose(tr.score, expect, atol=1e-12)
    # stacked observations for every element: a masked-out element's is an unvisited
    # constraint (named at its element over concrete tensors, DESIGN §8; a NaN weight inside
    # a user's own vmap); with the flags as presence mask they are left out
    ys = torch.tensor([0.5, 9.0, 1.5, 9.0])
    with pytest.raises(gf.UnvisitedConstraintError, match="address 1 is never visited"):
        mm.generate((flags, locs, torch.tensor(1.0)), gf.ChoiceMap.stacked({(): ys}))
    w = torch.func.vmap(lambda f: mm.generate((f, locs, torch.tensor(1.0)),
                                              gf.ChoiceMap.stacked({(): ys}))[1],
                        randomness="different")(torch.stack([flags, torch.ones(4, dtype=bool)]))
    assert torch.isnan(w[0]) and torch.isfinite(w[1])
    tr2, w = mm.generate((flags, locs, torch.tensor(1.0)),
                         gf.ChoiceMap.stacked({(): ys}, mask=flags))
    assert torch.allclose(w, normal_lp(0.5, 0.0, 1.0) + normal_lp(1.5, 2.0, 1.0), atol=1e-12)
    assert torch.allclose(tr2.score, w, atol=1e-12)
    # flip the flags: element 1 appears (fresh), element 0 disappears (discarded)
    flags2 = torch.tensor([False, True, True, False])
    new, w, _, d = mm.update(tr2, (flags2, locs, torch.tensor(1.0)),
                             (gf.UnknownChange(), gf.NoChange(), gf.NoChange()))
    assert [a for a, _ in new.choices.items()] == [(1,), (2,)]
    assert torch.allclose(w, new.score - tr2.score - normal_lp(new[1], 1.0, 1.0), atol=1e-12)
    assert [a for a, _ in d.items()] == [(0,)] and d[0] == 0.5


def test_mask_laws_with_random_flags():
    @gf.gen
    def model(x):
        f = torch.stack([gf.bernoulli(0.5) @ ("f", i) for i in range(3)]) > 0.5
        return gf.Map(gf.Mask(gf.normal), in_dims=(0, None, None))(f, x, 1.0) @ "m"

    check_gfi(model, st.tuples(float_tensors((), -1, 1)), max_examples=10, derandomize=True,
              skip=("gradients",))
    check_gfi(gf.Mask(gf.normal), st.tuples(st.booleans(), float_tensors(), st.just(1.0)),
              max_examples=10, derandomize=True)



@gf.gen
def _leaf(x):
    return gf.normal(x, 1.0) @ "z"


def _gated(kernel):
    """``kernel`` under a Mask whose flag is a Bernoulli choice at "on"."""
    m = gf.Mask(kernel)

    @gf.gen
    def node(x):
        on = gf.bernoulli(0.5) @ "on"
        r = m(on > 0.5, x) @ "mask"
        return x + 0.0 if r is None else torch.where(on > 0.5, r, x)

    return node


def test_mask_edit_merges_a_fresh_run_that_took_another_concrete_path():
    # Repeat runs its elements under vmap, so the outer Mask's flag is batched; its inner
    # function's fresh run meets a concrete inner flag (off) where the edited inner trace
    # keeps the batched form: the two are widened to one structure before they are merged
    # (a random-tree law run found the update raising "trees have different structures")
    rep = gf.Repeat(_gated(_gated(_leaf)), 3)

    @gf.gen
    def model(x):
        return rep(x) @ "rep"

    x = torch.tensor(0.0)
    flags = {("rep", i, "on"): torch.tensor(float(i == 2)) for i in range(3)}
    flags[("rep", 2, "mask", "on")] = torch.tensor(0.0)  # (elements 0, 1 never visit theirs)
    old, w0 = model.generate((x,), gf.ChoiceMap(flags))
    assert torch.isfinite(w0)
    turn_on = gf.ChoiceMap({("rep", 2, "mask", "on"): torch.tensor(1.0)})
    new, w, _, d = model.update(old, (x,), (gf.NoChange(),), turn_on)
    z = new["rep", 2, "mask", "mask", "z"]  # (drawn afresh: its log q leaves the weight)
    assert torch.allclose(w, new.score - old.score - normal_lp(z, 0.0, 1.0), atol=1e-12)
    assert [a for a, _ in d.items()] == [("rep", 2, "mask", "on")]
    back, w2, _, _ = model.update(new, (x,), (gf.NoChange(),), d)
    assert list(back.choices.items()) == list(old.choices.items())
    assert torch.allclose(back.score, old.score, atol=1e-12)
    assert torch.allclose(w2, old.score - new.score, atol=1e-12)


def test_unfold_stacks_steps_whose_concrete_mask_flags_differ():
    mask = gf.Mask(_leaf)

    @gf.gen
    def kernel(t, x):
        r = mask(t % 2 == 0, x) @ "m"
        return x + 0.1 if r is None else r

    unfold = gf.Unfold(kernel)
    x0 = torch.tensor(0.0)
    tr = unfold.simulate((4, x0))  # (steps 1 and 3 make no choice)
    assert [a for a, _ in tr.choices.items()] == [(0, "m", "z"), (2, "m", "z")]
    with pytest.raises(gf.AddressError):
        tr[1, "m", "z"]
    z0, z2 = tr[0, "m", "z"], tr[2, "m", "z"]
    expect = normal_lp(z0, 0.0, 1.0) + normal_lp(z2, z0 + 0.1, 1.0)
    assert torch.allclose(tr.score, expect, atol=1e-12)
    assert torch.allclose(unfold.assess((4, x0), tr.choices)[0], tr.score, atol=1e-12)
    assert torch.allclose(tr.retval, torch.stack([z0, z0 + 0.1, z2, z2 + 0.1]))
    new, w, _, d = unfold.update(tr, (4, x0), (gf.NoChange(),) * 2,
                                 gf.ChoiceMap({(2, "m", "z"): torch.tensor(0.5)}))
    assert torch.allclose(w, normal_lp(0.5, z0 + 0.1, 1.0) - normal_lp(z2, z0 + 0.1, 1.0),
                          atol=1e-12)
    assert d[2, "m", "z"] == z2 and new[2, "m", "z"] == 0.5
    with pytest.raises(gf.UnvisitedConstraintError):  # (a step read back is concrete again)
        unfold.update(tr, (4, x0), (gf.NoChange(),) * 2,
                      gf.ChoiceMap({(1, "m", "z"): torch.tensor(0.5)}))
    grown, w, _, _ = unfold.update(tr, (6, x0), (gf.UnknownChange(), gf.NoChange()))
    assert [a for a, _ in grown.choices.items()] == [(0, "m", "z"), (2, "m", "z"),
                                                     (4, "m", "z")]
    assert torch.allclose(w, torch.zeros(()), atol=1e-12)
    # a batch extended one step at a time (a particle filter's history) takes them too
    from gfcomb.inference import pf_initialize, pf_update

    state = pf_initialize(unfold, (0, x0), None, 3)
    for t in range(4):
        state = pf_update(state, (t + 1, x0), (gf.UnknownChange(), gf.NoChange()), None)
    for i in range(3):
        row = tree_index(state.traces, i)
        assert [a for a, _ in row.choices.items()] == [(0, "m", "z"), (2, "m", "z")]
        assert torch.allclose(unfold.assess((4, x0), row.choices)[0], row.score, atol=1e-12)


# ================================================================================= Dimap
def test_dimap_maps_args_and_return_value():
    d = gf.Dimap(gf.normal, pre=lambda mu: (2 * mu, 1.0), post=lambda args, r: r - args[0])
    tr, w = d.generate((torch.tensor(1.5),), gf.ChoiceMap.value(3.5))
    assert torch.allclose(w, normal_lp(3.5, 3.0, 1.0))
    assert torch.allclose(tr.retval, torch.tensor(2.0))
    new, w2, rd, disc = d.update(tr, (torch.tensor(0.0),), (gf.UnknownChange(),))
    assert torch.allclose(w2, normal_lp(3.5, 0.0, 1.0) - normal_lp(3.5, 3.0, 1.0))
    assert torch.allclose(new.retval, torch.tensor(3.5))
    assert isinstance(rd, gf.UnknownChange)
    args_grads, _, _ = d.choice_gradients(tr, gf.selectall())
    assert torch.allclose(args_grads[0], 2 * (3.5 - 3.0) * torch.tensor(1.0))


def test_dimap_without_pre_passes_argdiffs_through():
    m = gf.Map(gf.normal, in_dims=(0, None))
    d = gf.Dimap(m, post=lambda args, r: r.sum())
    tr = d.simulate((torch.zeros(3), torch.tensor(1.0)))
    assert torch.allclose(tr.retval, tr.inner.retval.sum())
    new, w, rd, _ = d.update(tr, tr.args, (gf.NoChange(), gf.NoChange()),
                             gf.ChoiceMap({1: 0.5}))
    assert torch.allclose(w, normal_lp(0.5, 0.0, 1.0) - normal_lp(tr[1], 0.0, 1.0))
    check_gfi(gf.Dimap(gf.normal, pre=lambda a, b: (a + b, 1.0), post=lambda a, r: 2 * r),
              st.tuples(float_tensors(), float_tensors()), max_examples=8, derandomize=True)


def test_new_combinators_compose_under_vmap():
    rep = gf.Repeat(gf.Dimap(gf.normal, pre=lambda mu: (mu, 1.0)), 2)
    trs = torch.func.vmap(lambda mu: rep.simulate((mu,)), randomness="different")(
        torch.tensor([0.0, 10.0]))
    assert trs.retval.shape == (2, 2)
    expect = normal_lp(trs.retval, torch.tensor([[0.0], [10.0]]), 1.0).sum(-1)
    assert torch.allclose(trs.score, expect, atol=1e-12)
    assert math.isfinite(float(trs.score.sum()))


def test_particle_filter_over_a_scan_matches_the_kalman_filter():
    from gfcomb.inference.particle_filter import (
        log_ml_estimate,
        pf_initialize,
        pf_resample,
        pf_update,
    )

    @gf.gen
    def lg(c, u, s):
        x = gf.normal(0.9 * c + u, 1.0) @ "x"
        gf.normal(x, s) @ "y"
        return (x, x)

    sc, T, s = gf.Scan(lg), 6, torch.tensor(0.5)
    us, ys = torch.zeros(T), torch.randn(T)
    st = pf_initialize(sc, (torch.tensor(0.0), us[:1], s), {(0, "y"): ys[0]}, 5000)
    for t in range(1, T):  # xs grows by one: VectorDiff without updated steps, O(1) per step
        st = pf_update(st, (torch.tensor(0.0), us[: t + 1], s),
                       (gf.NoChange(), gf.VectorDiff(t + 1, t, []), gf.NoChange()),
                       {(t, "y"): ys[t]})
        st = pf_resample(st, "systematic")
    m, p, ll = 0.0, 0.0, 0.0
    for y in ys.tolist():
        m, p = 0.9 * m, 0.81 * p + 1.0
        var = p + 0.25
        ll += -0.5 * math.log(2 * math.pi * var) - 0.5 * (y - m) ** 2 / var
        gain = p / var
        m, p = m + gain * (y - m), (1 - gain) * p
    # (5,000 particles, 6 steps: the estimate's sd is about 0.1 over seeds; fixed seed)
    assert abs(float(log_ml_estimate(st)) - ll) < 0.4
