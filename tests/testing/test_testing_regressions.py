"""Regression tests for the library bugs that check_gfi's random combinator trees found.

Each test is the minimal model hypothesis shrank to, checked against hand-computed log
densities.  The Unfold ones (marked) wait for the Unfold rewrite.
"""

from __future__ import annotations

import math

import pytest
import torch

import gfcomb as gf
from gfcomb.core.errors import GFIError
from gfcomb.core.pytree import tree_index, tree_stack


def norm_lp(x: float, mu: float, sigma: float) -> float:
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


@gf.gen
def k_normal(x):
    return gf.normal(x, 1.0) @ "z"


@gf.gen
def k_det(x):
    return 0.5 * x + 1.0


@gf.gen
def k_flip(x):
    b = gf.bernoulli(0.3) @ "b"
    return gf.normal(x + b, 0.7) @ "z"


def chooser(*branches):
    sw = gf.Switch(*branches)

    @gf.gen
    def node(x):
        i = gf.categorical(torch.tensor([0.5, 0.5])) @ "i"
        return sw(i, x) @ "sw"

    return node


def test_nested_map_generate_with_one_inner_element_constrained():
    """Bug 1: Map(Map(Map(k))) generate with a constraint on one innermost element raised
    VmapError: stack_constraints read a batched presence mask with bool() (vector.py)."""
    m3 = gf.Map(gf.Map(gf.Map(k_normal)))
    xs = torch.zeros(1, 2, 1)
    tr, w = m3.generate((xs,), gf.ChoiceMap({(0, 1, 0, "z"): 0.3}))
    assert abs(float(w) - norm_lp(0.3, 0.0, 1.0)) < 1e-9
    assert float(tr[0, 1, 0, "z"]) == 0.3
    expected = sum(norm_lp(float(tr[0, j, 0, "z"]), 0.0, 1.0) for j in range(2))
    assert abs(float(tr.score) - expected) < 1e-9
    # the unconstrained element is still sampled (and scored) and has no weight
    assert (0, 0, 0, "z") in tr.choices


def test_choice_gradients_of_map_of_switch_select_continuous_only():
    """Bug 2: choice_gradients on Map(Switch) selecting only the continuous 'z' raised
    TypeError 'the selection includes a discrete choice': the filtered map keeps the
    unselected int choice 'i' as a masked-out value (gradients.py)."""
    m = gf.Map(chooser(k_normal, k_normal))
    torch.manual_seed(0)
    xs = torch.tensor([0.5, -1.0])
    tr = m.simulate((xs,))
    _, _, grads = m.choice_gradients(tr, gf.select((0, "sw", "z"), (1, "sw", "z")))
    for j in range(2):
        z = float(tr[j, "sw", "z"])
        assert abs(float(grads[j, "sw", "z"]) - (float(xs[j]) - z)) < 1e-9
    # a discrete choice that IS selected is still refused
    with pytest.raises(TypeError, match="discrete"):
        m.choice_gradients(tr, gf.select((0, "i")))


def test_assess_of_a_row_of_a_vmapped_switch_trace():
    """Bug 3: a row of a vmapped trace of a Switch whose branches differ holds the other
    branch's choice as a masked-out value; assess of the row's choices raised
    UnvisitedConstraintError for that absent choice (dsl/handlers.py)."""
    node = chooser(k_normal, k_flip)
    torch.manual_seed(3)
    x = torch.tensor(0.2)
    btr = torch.func.vmap(lambda _: node.simulate((x,)), randomness="different")(
        torch.zeros(8))
    branches = set()
    for r in range(8):
        row = tree_index(btr, r)
        i = int(row.choices["i"])
        branches.add(i)
        z = float(row.choices["sw", "z"])
        if i == 0:
            expected = math.log(0.5) + norm_lp(z, 0.2, 1.0)
        else:
            b = float(row.choices["sw", "b"])
            expected = math.log(0.5) + math.log(0.3 if b == 1 else 0.7) + \
                norm_lp(z, 0.2 + b, 0.7)
        w, _ = node.assess((x,), row.choices)
        assert abs(float(w) - expected) < 1e-9
        assert abs(float(row.score) - expected) < 1e-9
    assert branches == {0, 1}
    # a constraint that IS present at an unvisited address is still an error
    with pytest.raises(gf.UnvisitedConstraintError):
        k_normal.assess((x,), gf.ChoiceMap({"z": 0.1, "nowhere": 1.0}))


# ------------------------------------------------------------------ Unfold (for the lead)
@gf.gen
def masked_step(t, s):
    return (gf.Map(chooser(k_det, k_normal))(s + torch.zeros(1)) @ "m").sum()


def test_unfold_assess_accepts_switch_presence_masks():
    """Unfold bug A (fixed by the Unfold rewrite, d99436b): Unfold(step with
    Map(Switch(k_det, k_normal))): assess(simulate's choices) raised MissingChoiceError for
    the 'z' that the chosen branch k_det does not have."""
    u = gf.Unfold(masked_step)
    for seed in range(6):
        torch.manual_seed(seed)
        tr = u.simulate((1, torch.tensor(0.0)))
        w, _ = u.assess((1, torch.tensor(0.0)), tr.choices)
        assert abs(float(w) - float(tr.score)) < 1e-9


@gf.gen
def switching_step(t, s):
    i = gf.categorical(torch.tensor([0.5, 0.5])) @ "i"
    return gf.Switch(k_normal, k_det)(i, s) @ "sw"


def test_unfold_steps_with_different_addresses_give_a_clear_error():
    """Unfold bug B (fixed by the Unfold rewrite, d99436b): a kernel whose steps take
    different Switch branches raised a bare IndexError from tree_stack; now the steps are
    harmonized (or a gfcomb error names the step)."""
    u = gf.Unfold(switching_step)
    for seed in range(8):
        torch.manual_seed(seed)
        try:
            u.generate((2, torch.tensor(0.0)), None)
        except GFIError as err:
            assert "step" in str(err)
        except IndexError as err:
            raise AssertionError("bare IndexError") from err


def test_vmapped_assess_of_switch_over_map_of_switch_with_absent_choice():
    """Bug 4: Switch(Map(Switch(k_normal, k_det)), k_normal) under vmap: assess of a trace's
    own choices gave NaN when the inner element chose k_det, because the outer Switch took
    the masked-out (absent) inner 'z' for a missing choice (switch.py)."""
    m = gf.Map(chooser(k_normal, k_det))

    @gf.gen
    def mapped(x):
        return (m(x + torch.zeros(1)) @ "map").sum()

    outer = chooser(mapped, k_normal)
    x = torch.tensor(0.0)
    torch.manual_seed(9)
    traces = []
    while len(traces) < 2:
        tr = outer.simulate((x,))
        if int(tr["i"]) == 0 and int(tr["sw", "map", 0, "i"]) == 1:
            traces.append(tr)
    batch = tree_stack([t.choices for t in traces])
    w, _ = torch.func.vmap(lambda c: outer.assess((x,), c), randomness="different")(batch)
    expected = 2 * math.log(0.5)  # both categorical choices; k_det has none
    assert torch.allclose(w, torch.full((2,), expected), atol=1e-9, rtol=0)
    for t in traces:
        assert abs(float(outer.assess((x,), t.choices)[0]) - expected) < 1e-9


def test_assess_of_a_row_whose_absent_choice_sits_inside_a_map():
    """Bug 5: like bug 3, but the other branch's absent choice sits inside a Map
    (Switch(Map(k_normal), Map(k_two))): the Map passed the masked-out 'w' into its vmapped
    kernel, where the mask cannot be read, and assess raised UnvisitedConstraintError
    (vector.py stack_constraints now drops all-absent values outside vmap)."""
    @gf.gen
    def k_two(x):
        z = gf.normal(0.5 * x, 1.0) @ "z"
        return gf.normal(z, 0.5) @ "w"

    def mapped(kernel):
        m = gf.Map(kernel)

        @gf.gen
        def node(x):
            return (m(x + torch.zeros(1)) @ "map").sum()

        return node

    node = chooser(mapped(k_normal), mapped(k_two))
    x = torch.tensor(0.4)
    torch.manual_seed(0)
    btr = torch.func.vmap(lambda _: node.simulate((x,)), randomness="different")(
        torch.zeros(8))
    seen = set()
    for r in range(8):
        row = tree_index(btr, r)
        i = int(row.choices["i"])
        seen.add(i)
        z = float(row.choices["sw", "map", 0, "z"])
        if i == 0:
            expected = math.log(0.5) + norm_lp(z, 0.4, 1.0)
        else:
            w = float(row.choices["sw", "map", 0, "w"])
            expected = math.log(0.5) + norm_lp(z, 0.2, 1.0) + norm_lp(w, z, 0.5)
        got, _ = node.assess((x,), row.choices)
        assert abs(float(got) - expected) < 1e-9
    assert seen == {0, 1}


def test_choice_gradients_of_unfold_of_switch_with_absent_choice():
    """Bug 6: Unfold[2](Switch(k_normal, k_det)): choice_gradients raised
    UnvisitedConstraintError for the masked-out 'z' of a step on the k_det branch: under
    torch.func.grad the mask could not be read (the check asked "inside a transform?" instead
    of "is the mask vmap-batched?", dsl/handlers.py and vector.py)."""
    sw = gf.Switch(k_normal, k_det)

    @gf.gen
    def step(t, s):
        i = gf.categorical(torch.tensor([0.5, 0.5])) @ "i"
        return sw(i, s) @ "sw"

    u = gf.Unfold(step)
    for seed in range(20):
        torch.manual_seed(seed)
        tr = u.simulate((2, torch.tensor(0.3)))
        if int(tr[0, "i"]) == 1 and int(tr[1, "i"]) == 0:
            break
    else:
        raise AssertionError("no trace with steps on branches (1, 0)")
    _, _, grads = u.choice_gradients(tr, gf.select((1, "sw", "z")))
    # step 0 is k_det: state 0.5 * 0.3 + 1 = 1.15; step 1: z ~ N(1.15, 1)
    z = float(tr[1, "sw", "z"])
    assert abs(float(grads[1, "sw", "z"]) - (1.15 - z)) < 1e-9


def _bug7_switch():
    """Bug 7's model: Switch(k_normal, inner_node), where inner_node picks one of
    Switch(k_normal, k_normal, k_det) with a categorical at "i3" (the Switch at "switch3")."""
    inner = gf.Switch(k_normal, k_normal, k_det)

    @gf.gen
    def inner_node(x):
        i = gf.categorical(torch.full((3,), 1.0 / 3)) @ "i3"
        return inner(i, x) @ "switch3"

    return gf.Switch(k_normal, inner_node)


def test_vmapped_assess_of_nested_switch_with_absent_choices():
    """Bug 7: Switch(k_normal, Switch(k_normal, k_normal, k_det)) under vmap: assess of the
    batch's own choices gave NaN for an element on the inner k_det branch: the outer Switch's
    fallback path (its branch rejects the other branch's masked 'z') took the inner masked-out
    'z' for a missing choice (switch.py).  Found through Unfold[3] of this Switch."""
    outer = _bug7_switch()

    @gf.gen
    def step(x):
        i = gf.categorical(torch.tensor([0.5, 0.5])) @ "i2"
        return 0.5 * (outer(i, x) @ "switch2")

    xs = torch.tensor([0.0, 0.5, -0.5])
    det = 0
    for seed in range(40):
        torch.manual_seed(seed)
        b = torch.func.vmap(lambda x: step.simulate((x,)), randomness="different")(xs)
        w, _ = torch.func.vmap(lambda x, c: step.assess((x,), c), randomness="different")(
            xs, b.choices)
        for j in range(3):
            c = tree_index(b.choices, j)
            i2 = int(c["i2"])
            i3 = int(c["switch2", "i3"]) if i2 == 1 else -1
            if i2 == 0:
                expected = math.log(0.5) + norm_lp(float(c["switch2", "z"]), float(xs[j]), 1.0)
            elif i3 == 2:
                expected = math.log(0.5) + math.log(1 / 3)
                det += 1
            else:
                expected = math.log(0.5) + math.log(1 / 3) + norm_lp(
                    float(c["switch2", "switch3", "z"]), float(xs[j]), 1.0)
            assert abs(float(w[j]) - expected) < 1e-9, (seed, j, w)
    assert det > 0


def test_vmapped_assess_of_unfold_of_nested_switch():
    """Bug 7 as found: Unfold[3] of that Switch, vmap of assess over a batch of arguments
    with each element's own simulated choices gave NaN."""
    outer = _bug7_switch()

    @gf.gen
    def step(t, s):
        i = gf.categorical(torch.tensor([0.5, 0.5])) @ "i2"
        return 0.5 * (outer(i, s) @ "switch2")

    u = gf.Unfold(step)
    xs = torch.tensor([0.0, 0.5, -0.5])
    found = 0
    for seed in range(40):
        torch.manual_seed(seed)
        traces = [u.simulate((3, x)) for x in xs]
        specs = {str(torch.utils._pytree.tree_structure(t.choices)) for t in traces}
        if len(specs) != 1:
            continue
        batch = tree_stack([t.choices for t in traces])
        w, _ = torch.func.vmap(lambda x, c: u.assess((3, x), c), randomness="different")(
            xs, batch)
        for j, t in enumerate(traces):
            assert abs(float(w[j]) - float(t.score)) < 1e-9, (seed, w, t.choices)
        found += 1
    assert found > 0


def test_update_roundtrip_of_map_of_nested_switch_changing_the_inner_branch():
    """Found by the 10,000-tree run: Map[2](Switch(Switch(k_det, k_normal), k_two, k_det)).
    Constraining the outer index (to its own value: a "change" under vmap) and moving the
    inner Switch of element 1 from k_normal back to k_det reused element 1's old 'z' as a
    constraint of a branch that no longer visits it: NaN weight.  Old choices are now reused
    only where each element's new trace visits them."""
    from gfcomb.testing.laws import check_law
    from gfcomb.testing.strategies import kernel_pool, map_node, switch_node

    pool = dict(kernel_pool())
    inner = switch_node([("k_det", pool["k_det"]), ("k_normal", pool["k_normal"])])
    outer = switch_node([inner, ("k_two", pool["k_two"]), ("k_det", pool["k_det"])])
    _, model = map_node(outer, 2)
    x = (torch.tensor(0.0),)
    start = gf.ChoiceMap({("map2", 0, "i3"): torch.tensor(1), ("map2", 1, "i3"): torch.tensor(0),
                          ("map2", 1, "switch3", "i2"): torch.tensor(1),
                          ("map2", 1, "switch3", "switch2", "z"): torch.tensor(0.3)})
    tr, _ = model.generate(x, start)
    back_to_det = gf.ChoiceMap({("map2", 0, "i3"): torch.tensor(1),
                                ("map2", 1, "i3"): torch.tensor(0),
                                ("map2", 1, "switch3", "i2"): torch.tensor(0)})
    new, w, _, discard = tr.update(back_to_det)
    # element 1 drops z ~ N(0, 1) (k_normal of x = 0.25) and keeps the uniform index:
    lp_z = torch.distributions.Normal(0.25, 1.0).log_prob(torch.tensor(0.3))
    assert abs(float(w) - float(-lp_z)) < 1e-9
    assert abs(float(new.score - tr.score) - float(w)) < 1e-9
    again, w2, _, _ = new.update(discard)  # the reverse update restores the old trace
    assert math.isfinite(float(w2))
    assert abs(float(w + w2)) < 1e-9 and abs(float(again.score - tr.score)) < 1e-9
    assert float(again["map2", 1, "switch3", "switch2", "z"]) == pytest.approx(0.3)
    # and the law checker agrees on this model
    check_law("update_roundtrip", model, x, seed=127773128)
