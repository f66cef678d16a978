"""Stacked constraints (``ChoiceMap.stacked``) give the same weights as per-address ones for
Map and Unfold generate/update; ``trace.get_retval(addr)`` for sub-calls, Map elements and
Unfold steps."""

from __future__ import annotations

import pytest
import torch

import gfcomb as gf


@gf.gen
def point(x, slope):
    y = gf.normal(slope * x, 1.0) @ "y"
    z = gf.normal(y, 0.5) @ "z"
    return y + z


@gf.gen
def line(xs):
    slope = gf.normal(0.0, 1.0) @ "slope"
    return gf.Map(point, in_dims=(0, None))(xs, slope) @ "ys"


@gf.gen
def walk_step(t, s):
    return gf.normal(s, 1.0) @ "x"


WALK = gf.Unfold(walk_step)


@gf.gen
def walk(n):
    s0 = gf.normal(0.0, 1.0) @ "s0"
    return WALK(n, s0) @ "xs"


XS = torch.linspace(-1.0, 1.0, 5)
YS = torch.tensor([0.3, -0.2, 1.1, 0.0, 0.7])


def per_address(prefix, name, values):
    return gf.ChoiceMap({(prefix, i, name): v for i, v in enumerate(values)})


def test_public_stacked_builds_every_element():
    cm = gf.ChoiceMap.stacked({"y": YS, ("a", "b"): 2 * YS})
    assert cm.is_stacked() and cm.stacked_length == 5
    assert cm[3, "y"] == YS[3] and cm[4, "a", "b"] == 2 * YS[4]
    assert torch.equal(cm[:, "y"], YS)
    nested = gf.ChoiceMap({"ys": gf.ChoiceMap.stacked({"y": YS})})
    assert nested["ys", 2, "y"] == YS[2]
    assert gf.ChoiceMap.stacked({}).is_empty()


def test_public_stacked_rejects_bad_values_naming_the_address():
    with pytest.raises(gf.ArgumentError, match="'z'"):
        gf.ChoiceMap.stacked({"y": YS, "z": torch.zeros(3)})
    with pytest.raises(gf.ArgumentError, match="no leading element axis"):
        gf.ChoiceMap.stacked({"y": torch.tensor(1.0)})
    with pytest.raises(gf.ArgumentError, match="mask"):
        gf.ChoiceMap.stacked({"y": YS}, mask=torch.ones(3, dtype=torch.bool))


def test_internal_positional_form_still_works():
    inner = gf.ChoiceMap({"y": YS})
    a = gf.ChoiceMap.stacked(inner, 5)
    b = gf.ChoiceMap.from_stacked_block(inner, 5)
    assert a[1, "y"] == b[1, "y"] == YS[1]


@pytest.mark.parametrize("partial", [False, True])
def test_map_generate_stacked_equals_per_address(partial):
    ys = YS[:3] if partial else YS
    stacked = gf.ChoiceMap({"ys": gf.ChoiceMap.stacked({"y": ys}), "slope": 0.4})
    single = per_address("ys", "y", ys).merge(gf.ChoiceMap({"slope": 0.4}))
    torch.manual_seed(1)
    tr_a, w_a = line.generate((XS,), stacked)
    torch.manual_seed(1)
    tr_b, w_b = line.generate((XS,), single)
    assert torch.allclose(w_a, w_b, atol=1e-12)
    expect = torch.distributions.Normal(0.0, 1.0).log_prob(torch.tensor(0.4)) + \
        torch.distributions.Normal(0.4 * XS[: len(ys)], 1.0).log_prob(ys).sum()
    assert torch.allclose(w_a, expect, atol=1e-12)
    assert torch.equal(tr_a.choices["ys", :, "y"][: len(ys)], ys)


def test_map_update_stacked_equals_per_address():
    tr = line.simulate((XS,))
    a = line.update(tr, (XS,), (gf.NoChange(),),
                    gf.ChoiceMap({"ys": gf.ChoiceMap.stacked({"z": YS})}))
    b = line.update(tr, (XS,), (gf.NoChange(),), per_address("ys", "z", YS))
    assert torch.allclose(a[1], b[1], atol=1e-12)
    assert torch.allclose(a[0].score, b[0].score, atol=1e-12)
    assert torch.equal(a[3]["ys", :, "z"], tr.choices["ys", :, "z"])


def test_unfold_generate_and_update_stacked_equal_per_address():
    stacked = gf.ChoiceMap({"xs": gf.ChoiceMap.stacked({"x": YS}), "s0": 0.1})
    single = per_address("xs", "x", YS).merge(gf.ChoiceMap({"s0": 0.1}))
    tr_a, w_a = walk.generate((5,), stacked)
    tr_b, w_b = walk.generate((5,), single)
    assert torch.allclose(w_a, w_b, atol=1e-12)
    assert torch.allclose(w_a, tr_a.score, atol=1e-12)  # fully constrained
    tr = walk.simulate((5,))
    ua = walk.update(tr, (5,), (gf.NoChange(),), gf.ChoiceMap({"xs": gf.ChoiceMap.stacked(
        {"x": YS[:2]})}))
    ub = walk.update(tr, (5,), (gf.NoChange(),), per_address("xs", "x", YS[:2]))
    assert torch.allclose(ua[1], ub[1], atol=1e-12)


def test_get_retval_of_sub_calls_elements_and_steps():
    tr = line.simulate((XS,))
    assert tr.get_retval() is tr.retval
    assert torch.equal(tr.get_retval("slope"), tr["slope"])
    assert torch.equal(tr.get_retval("ys"), tr.retval)
    assert torch.allclose(tr.get_retval(("ys", 2)), tr["ys", 2, "y"] + tr["ys", 2, "z"])
    assert torch.equal(tr.get_retval(("ys", 2, "z")), tr["ys", 2, "z"])
    wt = walk.simulate((4,))
    assert torch.equal(wt.get_retval(("xs", 3)), wt["xs", 3, "x"])
    assert torch.equal(wt.get_retval(("xs", 1, "x")), wt["xs", 1, "x"])
    with pytest.raises(gf.AddressError, match="'ys', 7"):
        tr.get_retval(("ys", 7))
    with pytest.raises(gf.AddressError, match="nope"):
        tr.get_retval("nope")


def test_get_retval_of_a_batched_trace_and_switch():
    trs = torch.func.vmap(lambda x: line.simulate((XS + x,)), randomness="different")(
        torch.zeros(3))
    assert trs.get_retval(("ys", 1)).shape == (3,)
    assert torch.allclose(trs.get_retval(("ys", 1)), trs.retval[:, 1])
    sw = gf.Switch(point, point)
    st = sw.simulate((1, torch.tensor(0.5), torch.tensor(2.0)))
    assert torch.equal(st.get_retval("y"), st["y"])


def test_get_retval_of_recurse_nodes():
    @gf.gen
    def production(depth):
        v = gf.normal(0.0, 1.0) @ "v"
        return gf.Production(v, [depth + 1] * (2 if depth < 1 else 0))

    @gf.gen
    def aggregation(v, results):
        return v + sum(results)

    rec = gf.Recurse(production, aggregation, 2)
    tr = rec.simulate((0,))
    assert torch.equal(tr.get_retval(0), tr.retval)
    assert torch.equal(tr.get_retval((1, "production")).value, tr[1, "production", "v"])
    assert torch.equal(tr.get_retval((2, "aggregation")), tr.get_retval(2))
    with pytest.raises(gf.AddressError):
        tr.get_retval(9)
