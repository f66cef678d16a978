"""Tree maps keep aliasing: a tensor held in several places of a tree maps to one result
(computed once), so the result shares it the same way; distinct tensors stay distinct."""

from __future__ import annotations

import pytest
import torch

from gfcomb.core.pytree import tree_index, tree_map2_tensors, tree_map_tensors, tree_where


def test_a_shared_leaf_maps_once_and_stays_shared():
    x, y = torch.arange(4.0), torch.arange(4.0)
    calls = []

    def double(t):
        calls.append(t)
        return t * 2

    out = tree_map_tensors(double, {"a": x, "b": [x, (y, 1)], "c": "s"})
    assert len(calls) == 2
    assert out["a"] is out["b"][0] and out["a"] is not out["b"][1][0]
    assert out["c"] == "s" and out["b"][1][1] == 1
    assert torch.equal(out["b"][1][0], y * 2)


def test_pairs_map_once_per_distinct_pair():
    x, y, z = torch.zeros(3), torch.ones(3), torch.full((3,), 2.0)
    calls = []

    def add(a, b):
        calls.append((a, b))
        return a + b

    out = tree_map2_tensors(add, [x, x, x], [y, y, z])
    assert len(calls) == 2
    assert out[0] is out[1] and torch.equal(out[2], x + z)


def test_where_and_index_keep_sharing():
    x = torch.arange(6.0)
    tree = {"value": x, "retval": x, "other": x + 1}
    picked = tree_index(tree, torch.tensor([0, 2]))
    assert picked["value"] is picked["retval"]
    mask = torch.tensor([True, False, True, False, True, False])
    nx = -x
    merged = tree_where(mask, tree, {"value": nx, "retval": nx, "other": x})
    assert merged["value"] is merged["retval"]
    assert torch.equal(merged["value"], torch.where(mask, x, nx))
    assert torch.equal(merged["other"], torch.where(mask, x + 1, x))


def test_where_alike_passes_shared_leaves_and_refuses_other_structures():
    import gfcomb as gf
    from gfcomb.core.pytree import tree_where_alike

    @gf.gen
    def two():
        a = gf.normal(0.0, 1.0) @ "a"
        return gf.normal(a, 1.0) @ "b"

    @gf.gen
    def other():
        return gf.normal(0.0, 1.0) @ "a"

    torch.manual_seed(0)
    x, _ = two.batch_generate(6, ())
    y, _ = two.batch_generate(6, ())
    mask = torch.tensor([True, False] * 3)
    merged = tree_where_alike(mask, x, y)
    assert torch.equal(merged["a"], torch.where(mask, x["a"], y["a"]))
    assert torch.equal(merged.score, torch.where(mask, x.score, y.score))
    shared = torch.zeros(6)
    tree_a = {"s": shared.expand(2, 6)[0], "v": x["a"]}
    tree_b = {"s": shared.expand(2, 6)[1], "v": y["a"]}
    out = tree_where_alike(mask, tree_a, tree_b)
    assert out["s"] is tree_a["s"]  # (views of the same memory alike: not merged)
    z, _ = other.batch_generate(6, ())
    with pytest.raises(ValueError):
        tree_where_alike(mask, x, z)
    with pytest.raises(ValueError):
        tree_where_alike(mask, {"k": 1, "v": x["a"]}, {"k": 2, "v": y["a"]})


def test_where_alike_merges_inside_namedtuples():
    from collections import namedtuple

    from gfcomb.core.pytree import tree_where_alike

    Pair = namedtuple("Pair", "value tag")
    mask = torch.tensor([True, False, True])
    a, b = Pair(torch.ones(3), "t"), Pair(torch.zeros(3), "t")
    out = tree_where_alike(mask, a, b)
    assert type(out) is Pair and out.tag == "t"
    assert torch.equal(out.value, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError):
        tree_where_alike(mask, a, Pair(torch.zeros(3), "u"))


def test_where_alike_keeps_what_both_sides_share():
    from gfcomb.core.pytree import tree_where_alike

    mask = torch.tensor([True, False, True])
    shared_sub = {"k": (torch.ones(3), torch.zeros(3))}
    same = (torch.arange(3.0), "tag")
    x, y = torch.ones(3), torch.zeros(3)
    a = {"sub": shared_sub, "same": same, "v": [x, x, 1]}
    b = {"sub": shared_sub, "same": same, "v": [y, y, 1]}
    out = tree_where_alike(mask, a, b)
    assert out["sub"] is shared_sub and out["same"] is same  # (one object on both sides)
    assert out["v"][0] is out["v"][1] and out["v"][2] == 1  # (one pair: merged once)
    assert torch.equal(out["v"][0], torch.where(mask, x, y))
    unchanged = tree_where_alike(mask, a, dict(a))
    assert unchanged is a  # (nothing differs: the tree itself)
