"""Unfold of a kernel that calls a Switch on a per-step random regime (a regime-switching
state-space model): steps on different branches have different trace structures, which
:func:`gfcomb.combinators.switch.harmonize` widens to one (the every-branch form) so the
steps can be stacked.  Every GFI method is checked against hand-computed float64 log
densities, outside vmap and under a vmap over particles (against a per-particle loop)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import vmap

import gfcomb as gf
from gfcomb.combinators.switch import Switch, SwitchTrace
from gfcomb.combinators.unfold import Unfold
from gfcomb.core.batched import compact_history, select_batch
from gfcomb.core.harmonize import harmonize
from gfcomb.core.pytree import tree_index, tree_stack

NC, UC = gf.NoChange(), gf.UnknownChange()
P0 = 0.3  # P(jumpy regime)
X0 = torch.tensor(0.5, dtype=torch.float64)


def lp_norm(v, mu, sd):
    v, mu = float(v), float(mu)
    return -0.5 * ((v - mu) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)


def lp_r(r):
    return math.log(P0) if int(r) == 1 else math.log(1 - P0)


# ---- model A: branches with different addresses ("x" vs "z")
@gf.gen
def calm(x):
    return gf.normal(0.9 * x, 0.1) @ "x"


@gf.gen
def jumpy(x):
    return gf.normal(0.0, 2.0) @ "z"


@gf.gen
def kernel_a(t, x):
    r = gf.bernoulli(P0) @ "r"
    return Switch(calm, jumpy)(r.long(), x) @ "s"


# ---- model B: both branches write "x"
@gf.gen
def jumpy_b(x):
    return gf.normal(x, 2.0) @ "x"


@gf.gen
def kernel_b(t, x):
    r = gf.bernoulli(P0) @ "r"
    return Switch(calm, jumpy_b)(r.long(), x) @ "s"


UA, UB = Unfold(kernel_a), Unfold(kernel_b)
RS = [0, 1, 0, 0, 1, 0]
VALS = [0.4, -1.3, -1.1, -0.95, 2.2, 1.9]


def addr(model, r):
    return "x" if (model == "b" or r == 0) else "z"


def lp_step(model, r, v, prev):
    if r == 0:
        return lp_r(0) + lp_norm(v, 0.9 * prev, 0.1)
    return lp_r(1) + (lp_norm(v, 0.0, 2.0) if model == "a" else lp_norm(v, prev, 2.0))


def lp_steps(model, rs, vals, x0=X0):
    """Per-step log densities of a regime path."""
    out, prev = [], float(x0)
    for r, v in zip(rs, vals):
        out.append(lp_step(model, r, v, prev))
        prev = v
    return out


def cmap(model, rs, vals, steps=None):
    d = {}
    for t, (r, v) in enumerate(zip(rs, vals)):
        if steps is None or t in steps:
            d[(t, "r")] = torch.tensor(float(r))
            d[(t, "s", addr(model, r))] = torch.tensor(v)
    return gf.ChoiceMap(d)


def U(model):
    return UA if model == "a" else UB


def path(tr, model):
    """(regimes, values) read from an Unfold trace's choices."""
    rs = [int(tr.choices[(t, "r")]) for t in range(tr.length)]
    vals = [float(tr.choices[(t, "s", addr(model, r))]) for t, r in enumerate(rs)]
    return rs, vals


def close(a, b, tol=1e-9):
    assert abs(float(a) - float(b)) < tol, (float(a), float(b))


def snapshot(tr):
    return {a: v.clone() for a, v in tr.choices.items()}, tr.score.clone()


def same_as(tr, snap):
    cm, score = snap
    assert dict(tr.choices.items()).keys() == cm.keys()
    for a, v in tr.choices.items():
        assert torch.equal(v, cm[a]), a
    assert torch.equal(tr.score, score)


MODELS = ["a", "b"]


# ------------------------------------------------------------------ outside vmap
@pytest.mark.parametrize("model", MODELS)
def test_simulate_score_choices_and_retval(model):
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        tr = U(model).simulate((6, X0))
        rs, vals = path(tr, model)
        seen |= set(rs)
        close(tr.score, sum(lp_steps(model, rs, vals)))
        assert torch.allclose(tr.retval, torch.tensor(vals), atol=0, rtol=0)
        # the choices hold exactly r and the chosen branch's address per step
        assert len(list(tr.choices.items())) == 12
        for t, r in enumerate(rs):
            other = "z" if addr(model, r) == "x" else "x"
            if model == "a":
                assert not tr.choices.has_value((t, "s", other))
    assert seen == {0, 1}


@pytest.mark.parametrize("model", MODELS)
def test_generate_full_and_partial(model):
    tr, w = U(model).generate((6, X0), cmap(model, RS, VALS))
    lps = lp_steps(model, RS, VALS)
    close(w, sum(lps))
    close(tr.score, sum(lps))
    assert path(tr, model) == (RS, VALS)
    # regime and value constrained on steps 1 and 4 only
    torch.manual_seed(3)
    tr, w = U(model).generate((6, X0), cmap(model, RS, VALS, steps={1, 4}))
    rs, vals = path(tr, model)
    assert rs[1] == 1 and rs[4] == 1 and vals[1] == VALS[1] and vals[4] == VALS[4]
    lps = lp_steps(model, rs, vals)
    close(tr.score, sum(lps))
    close(w, lps[1] + lps[4])


@pytest.mark.parametrize("model", MODELS)
def test_assess_of_plain_choices(model):
    tr, _ = U(model).generate((6, X0), cmap(model, RS, VALS))
    w, ret = U(model).assess((6, X0), gf.ChoiceMap(dict(tr.choices.items())))
    close(w, tr.score)
    assert torch.equal(ret, tr.retval)


def test_assess_of_trace_choices_shared_address():
    tr, _ = UB.generate((6, X0), cmap("b", RS, VALS))
    close(UB.assess((6, X0), tr.choices)[0], tr.score)


def test_assess_of_trace_choices_branch_specific_addresses():
    tr, _ = UA.generate((6, X0), cmap("a", RS, VALS))
    close(UA.assess((6, X0), tr.choices)[0], tr.score)


def test_missing_choice_still_raises():
    cm = {a: v for a, v in cmap("a", RS, VALS).items() if a != (4, "s", "z")}
    with pytest.raises(gf.MissingChoiceError, match=r"\(4, 's', 'z'\)"):
        UA.assess((6, X0), gf.ChoiceMap(cm))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("t,new_r", [(2, 1), (1, 0), (5, 1)])
def test_update_changes_a_regime(model, t, new_r):
    old, _ = U(model).generate((6, X0), cmap(model, RS, VALS))
    snap = snapshot(old)
    rs, vals = list(RS), list(VALS)
    rs[t], vals[t] = new_r, 0.77
    cons = gf.ChoiceMap({(t, "r"): torch.tensor(float(new_r)),
                         (t, "s", addr(model, new_r)): torch.tensor(0.77)})
    new, w, rd, disc = U(model).update(old, (6, X0), (NC, NC), cons)
    close(w, sum(lp_steps(model, rs, vals)) - sum(lp_steps(model, RS, VALS)))
    close(new.score, sum(lp_steps(model, rs, vals)))
    assert path(new, model) == (rs, vals)
    d = dict(disc.items())
    assert float(d[(t, "r")]) == RS[t]
    assert float(d[(t, "s", addr(model, RS[t]))]) == VALS[t]
    assert len(d) == 2
    same_as(old, snap)
    # the new trace keeps working: a second update back to the old regime
    back = gf.ChoiceMap({(t, "r"): torch.tensor(float(RS[t])),
                         (t, "s", addr(model, RS[t])): torch.tensor(VALS[t])})
    again, w2, _, _ = U(model).update(new, (6, X0), (NC, NC), back)
    close(w2, -w)
    assert path(again, model) == (RS, VALS)


@pytest.mark.parametrize("model", MODELS)
def test_update_regime_keeps_state_when_value_reused(model):
    # only r constrained: model B reuses "x" (state unchanged), model A samples "z"
    old, _ = U(model).generate((6, X0), cmap(model, RS, VALS))
    torch.manual_seed(1)
    new, w, _, disc = U(model).update(old, (6, X0), (NC, NC),
                                      gf.ChoiceMap({(3, "r"): torch.tensor(1.0)}))
    rs, vals = path(new, model)
    assert rs == RS[:3] + [1] + RS[4:]
    if model == "b":
        assert vals == VALS
        close(w, lp_step("b", 1, VALS[3], VALS[2]) - lp_step("b", 0, VALS[3], VALS[2]))
    else:  # fresh z: weight = new − old − log p(z)
        lps_new = lp_steps("a", rs, vals)
        close(w, sum(lps_new) - sum(lp_steps("a", RS, VALS))
              - lp_norm(vals[3], 0.0, 2.0))
        assert float(dict(disc.items())[(3, "s", "x")]) == VALS[3]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("r_new", [0, 1])
def test_extension_by_one_step(model, r_new):
    old, _ = U(model).generate((6, X0), cmap(model, RS, VALS))
    snap = snapshot(old)
    cons = gf.ChoiceMap({(6, "r"): torch.tensor(float(r_new)),
                         (6, "s", addr(model, r_new)): torch.tensor(0.3)})
    new, w, rd, disc = U(model).update(old, (7, X0), (UC, NC), cons)
    close(w, lp_step(model, r_new, 0.3, VALS[-1]))
    close(new.score, sum(lp_steps(model, RS + [r_new], VALS + [0.3])))
    assert path(new, model) == (RS + [r_new], VALS + [0.3])
    assert disc.is_empty()
    same_as(old, snap)


@pytest.mark.parametrize("model", MODELS)
def test_regenerate_one_regime(model):
    old, _ = U(model).generate((6, X0), cmap(model, RS, VALS))
    snap = snapshot(old)
    flipped = stayed = 0
    for seed in range(12):
        torch.manual_seed(seed)
        new, w, _ = U(model).regenerate(old, (6, X0), (NC, NC), gf.select((2, "r")))
        rs, vals = path(new, model)
        close(new.score, sum(lp_steps(model, rs, vals)))
        assert rs[:2] + rs[3:] == RS[:2] + RS[3:]
        assert vals[3:] == VALS[3:] and vals[:2] == VALS[:2]
        if rs[2] == RS[2]:
            stayed += 1
            close(w, 0.0)
        else:
            flipped += 1
            if model == "b":  # x reused: its density changes; step 3's does not
                assert vals[2] == VALS[2]
                close(w, lp_norm(VALS[2], VALS[1], 2.0) - lp_norm(VALS[2], 0.9 * VALS[1], 0.1))
            else:  # z fresh (0); step 3 retained, its state changed
                close(w, lp_step("a", RS[3], VALS[3], vals[2])
                      - lp_step("a", RS[3], VALS[3], VALS[2]))
    assert flipped and stayed
    same_as(old, snap)


@pytest.mark.parametrize("model", MODELS)
def test_project(model):
    tr, _ = U(model).generate((6, X0), cmap(model, RS, VALS))
    lps = lp_steps(model, RS, VALS)
    close(U(model).project(tr, gf.selectall()), sum(lps))
    sel = gf.select((1, "s"), (2, "r"), (4, "s", addr(model, 1)))
    prev = [float(X0)] + VALS
    expected = (lp_norm(VALS[1], 0.0, 2.0) if model == "a" else lp_norm(VALS[1], prev[1], 2.0))
    expected += lp_r(RS[2])
    expected += (lp_norm(VALS[4], 0.0, 2.0) if model == "a" else lp_norm(VALS[4], prev[4], 2.0))
    close(U(model).project(tr, sel), expected)


def test_unbatched_index_argument_and_clear_stack_error():
    @gf.gen
    def k2(t, x, idx):
        return Switch(calm, jumpy)(idx[t], x) @ "s"

    u = Unfold(k2)
    idx = torch.tensor([0, 1, 0, 1])
    tr, w = u.generate((4, X0, idx), gf.ChoiceMap(
        {(t, "s", "x" if i == 0 else "z"): torch.tensor(VALS[t]) for t, i in
         enumerate(idx.tolist())}))
    lps, prev = [], float(X0)
    for i, v in zip(idx.tolist(), VALS[:4]):
        lps.append(lp_norm(v, 0.9 * prev, 0.1) if i == 0 else lp_norm(v, 0.0, 2.0))
        prev = v
    close(tr.score, sum(lps))
    close(w, sum(lps))
    close(u.assess((4, X0, idx), gf.ChoiceMap(dict(tr.choices.items())))[0], sum(lps))
    # the raw step traces cannot be stacked: a clear error, not a wrong record
    steps = [kernel_a.generate((0, X0), cmap("a", [r], [0.1]).get_submap(0))[0]
             for r in (0, 1)]
    with pytest.raises(ValueError, match="different structure"):
        tree_stack(steps)
    h = harmonize(steps)
    stacked = tree_stack(h)
    for i in range(2):
        row = tree_index(stacked, i)
        assert dict(row.choices.items()).keys() == dict(steps[i].choices.items()).keys()
        close(row.score, steps[i].score)
        assert isinstance(row.subtraces[("s",)], SwitchTrace)
        assert not row.subtraces[("s",)].narrowed().batched
        close(kernel_a.project(row, gf.select("s")), steps[i].subtraces[("s",)].score)
        w, _ = kernel_a.assess((0, X0), row.choices)
        close(w, steps[i].score)


# ------------------------------------------------------------------ under vmap
P = 5
VRS = torch.tensor([[0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1]])
VVALS = torch.randn(P, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def vcmap(model, rs, vals):
    """Per-particle constraints, stacked over particles (branch-specific addresses masked)."""
    rsf = rs.to(torch.float64)
    x_mask = torch.ones_like(rs, dtype=torch.bool) if model == "b" else rs == 0
    node = {"r": gf.ChoiceMap.value(rsf),
            "s": gf.ChoiceMap.node({"x": gf.ChoiceMap.value(vals, x_mask)}
                                   if model == "b" else
                                   {"x": gf.ChoiceMap.value(vals, rs == 0),
                                    "z": gf.ChoiceMap.value(vals, rs == 1)})}
    return gf.ChoiceMap.stacked(gf.ChoiceMap.node(node), rs.shape[1], batch_ndim=1)


@pytest.mark.parametrize("model", MODELS)
def test_vmap_generate_update_regenerate_match_loop(model):
    u = U(model)
    n = VRS.shape[1]
    trs, ws = vmap(lambda c: u.generate((n, X0), c), randomness="different")(
        vcmap(model, VRS, VVALS))
    for p in range(P):
        lps = lp_steps(model, VRS[p].tolist(), VVALS[p].tolist())
        close(trs.score[p], sum(lps))
        close(ws[p], sum(lps))
        tr_p, w_p = u.generate((n, X0), cmap(model, VRS[p].tolist(), VVALS[p].tolist()))
        close(tr_p.score, trs.score[p])
    # update: every particle's step 1 moves to the other regime with a given value
    new_r = 1 - VRS[:, 1]
    cons = gf.ChoiceMap({(1, "r"): new_r.to(torch.float64)})
    sub = ({"x": gf.ChoiceMap.value(torch.full((P,), 0.25))} if model == "b" else
           {"x": gf.ChoiceMap.value(torch.full((P,), 0.25), new_r == 0),
            "z": gf.ChoiceMap.value(torch.full((P,), 0.25), new_r == 1)})
    cons = cons.merge(gf.ChoiceMap.node({1: gf.ChoiceMap.node({"s": gf.ChoiceMap.node(sub)})}))
    new, w, _, _ = vmap(u.update, in_dims=(0, None, None, 0), randomness="different")(
        trs, (n, X0), (NC, NC), cons)
    for p in range(P):
        rs, vals = VRS[p].tolist(), VVALS[p].tolist()
        rs2, vals2 = list(rs), list(vals)
        rs2[1], vals2[1] = int(new_r[p]), 0.25
        close(w[p], sum(lp_steps(model, rs2, vals2)) - sum(lp_steps(model, rs, vals)))
        close(new.score[p], sum(lp_steps(model, rs2, vals2)))
        old_p, _ = u.generate((n, X0), cmap(model, rs, vals))
        c_p = gf.ChoiceMap({(1, "r"): torch.tensor(float(rs2[1])),
                            (1, "s", addr(model, rs2[1])): torch.tensor(0.25)})
        new_p, w_p, _, _ = u.update(old_p, (n, X0), (NC, NC), c_p)
        close(w_p, w[p])
    # project and regenerate (of regime 2, same seed per particle is not possible: check math)
    sel = gf.select((2, "r"), (3, "s"))
    pr = vmap(u.project, in_dims=(0, None))(trs, sel)
    for p in range(P):
        tr_p, _ = u.generate((n, X0), cmap(model, VRS[p].tolist(), VVALS[p].tolist()))
        close(pr[p], u.project(tr_p, sel))
    # regenerate regime 2: each particle's weight from its own new path
    torch.manual_seed(0)
    rg, wr, _ = vmap(u.regenerate, in_dims=(0, None, None, None), randomness="different")(
        trs, (n, X0), (NC, NC), gf.select((2, "r")))
    new_rs = rg.inner.subtraces[("r",)].value
    flips = 0
    for p in range(P):
        rs, vals = VRS[p].tolist(), VVALS[p].tolist()
        rs2, vals2 = new_rs[p].tolist(), rg.retval[p].tolist()
        assert rs2[:2] + rs2[3:] == rs[:2] + rs[3:]
        close(rg.score[p], sum(lp_steps(model, rs2, vals2)))
        if rs2[2] == rs[2]:
            close(wr[p], 0.0)
            assert vals2 == vals
        elif model == "b":  # x reused
            flips += 1
            close(wr[p], lp_step("b", rs2[2], vals[2], vals[1]) - lp_r(rs2[2])
                  - lp_step("b", rs[2], vals[2], vals[1]) + lp_r(rs[2]))
        else:  # z or x fresh; step 3 retained with a new state
            flips += 1
            close(wr[p], lp_step("a", rs[3], vals[3], vals2[2])
                  - lp_step("a", rs[3], vals[3], vals[2]))


def vstep(model, t, rs, vals):
    """Per-particle constraints of step ``t`` (each particle a regime and its value)."""
    sub = ({"x": gf.ChoiceMap.value(vals)} if model == "b" else
           {"x": gf.ChoiceMap.value(vals, rs == 0), "z": gf.ChoiceMap.value(vals, rs == 1)})
    return gf.ChoiceMap.node({t: gf.ChoiceMap.node({
        "r": gf.ChoiceMap.value(rs.to(torch.float64)), "s": gf.ChoiceMap.node(sub)})})


@pytest.mark.parametrize("model", MODELS)
def test_vmap_pf_extension_and_resampling(model):
    u = U(model)
    vgen = vmap(lambda c: u.generate((2, X0), c), randomness="different")
    vupd = vmap(u.update, in_dims=(0, None, None, 0), randomness="different")
    trs, _ = vgen(vcmap(model, VRS[:, :2], VVALS[:, :2]))
    anc = torch.tensor([4, 4, 0, 2, 1])
    for step in range(2, 4):
        cons = vstep(model, step, VRS[:, step], VVALS[:, step])
        trs, w, _, _ = vupd(trs, (step + 1, X0), (UC, NC), cons)
        rows = list(range(P)) if step == 2 else anc.tolist()
        for p in range(P):
            q = rows[p]
            rs = VRS[q, :step].tolist() + [int(VRS[p, step])]
            vals = VVALS[q, :step].tolist() + [float(VVALS[p, step])]
            close(w[p], lp_step(model, rs[-1], vals[-1], vals[-2]))
            close(trs.score[p], sum(lp_steps(model, rs, vals)))
            if step == 3:
                assert trs.inner.subtraces[("r",)].value[p].tolist() == rs
                assert trs.retval[p].tolist() == vals
        if step == 2:
            trs = select_batch(compact_history(trs), anc)
            for p in range(P):
                q = int(anc[p])
                close(trs.score[p], sum(lp_steps(model, VRS[q, :3].tolist(),
                                                 VVALS[q, :3].tolist())))


@gf.gen
def k_idx(t, x, idx):
    return Switch(calm, jumpy)(idx[t], x) @ "s"


def test_vmap_unbatched_index_steps_on_different_branches():
    _unbatched_index_run(revisit=False)


def test_vmap_unbatched_index_revisit_after_compaction():
    _unbatched_index_run(revisit=True)


def _unbatched_index_run(revisit):
    # the index is the same for every particle: one branch runs per step, under vmap too
    u = Unfold(k_idx)
    idx = torch.tensor([0, 1, 1, 0])
    def step_cm(t):  # per-particle values at the step's (shared) branch address
        a = "x" if idx[t] == 0 else "z"
        return gf.ChoiceMap.node({t: gf.ChoiceMap.node(
            {"s": gf.ChoiceMap.node({a: gf.ChoiceMap.value(VVALS[:, t])})})})

    cm0 = step_cm(0).merge(step_cm(1)).merge(step_cm(2))
    trs, w = vmap(lambda c: u.generate((3, X0, idx), c), randomness="different")(cm0)

    def lp(p, n, vals=None):
        vals = VVALS[p].tolist() if vals is None else vals
        tot, prev = 0.0, float(X0)
        for t in range(n):
            tot += lp_norm(vals[t], 0.9 * prev, 0.1) if idx[t] == 0 else lp_norm(vals[t], 0, 2)
            prev = vals[t]
        return tot

    for p in range(P):
        close(w[p], lp(p, 3))
    trs = select_batch(compact_history(trs), torch.tensor([1, 1, 0, 3, 4]))
    new, w, _, _ = vmap(u.update, in_dims=(0, None, None, 0), randomness="different")(
        trs, (4, X0, idx), (UC, NC, NC), step_cm(3))
    for p, q in enumerate([1, 1, 0, 3, 4]):
        vals = VVALS[q, :3].tolist() + [float(VVALS[p, 3])]
        close(w[p], lp_norm(vals[3], 0.9 * vals[2], 0.1))
        close(new.score[p], lp(q, 4, vals))
    if not revisit:
        return
    # revisit step 1 (a constraint) after resampling: the stored steps are harmonized
    c1 = gf.ChoiceMap({(1, "s", "z"): torch.full((P,), 0.6)})
    new2, w2, _, _ = vmap(u.update, in_dims=(0, None, None, 0), randomness="different")(
        new, (4, X0, idx), (NC, NC, NC), c1)
    for p, q in enumerate([1, 1, 0, 3, 4]):
        vals = VVALS[q, :3].tolist() + [float(VVALS[p, 3])]
        vals2 = vals[:1] + [0.6] + vals[2:]
        close(w2[p], lp(q, 4, vals2) - lp(q, 4, vals))
        close(new2.score[p], lp(q, 4, vals2))


@pytest.mark.parametrize("model", MODELS)
def test_batched_extension_equals_the_vmapped_update(model):
    """pf_update's path (Unfold.batch_update: one batch call of the kernel) gives what the
    vmapped Unfold.update gives, draws included, for a kernel whose steps switch branches
    per particle."""
    from gfcomb.core.pytree import tree_tensors

    u = U(model)
    torch.manual_seed(5)
    trs = compact_history(vmap(lambda _: u.simulate((2, X0)), randomness="different")(
        torch.zeros(P)))
    obs = gf.ChoiceMap({(2, "r"): torch.tensor(1.0)})
    torch.manual_seed(6)
    a, wa, _, _ = u.batch_update(trs, (3, X0), (UC, NC), obs)
    torch.manual_seed(6)
    b, wb, _, _ = vmap(u.update, in_dims=(0, None, None, None), randomness="different")(
        trs, (3, X0), (UC, NC), obs)
    assert torch.equal(wa, wb) and torch.equal(a.score, b.score)
    la, lb = tree_tensors(a.inner), tree_tensors(b.inner)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert torch.equal(x, y)
    for p in range(P):  # and the weights are the densities of the constrained regime
        close(wa[p], lp_r(1))
