"""Tree maps keep aliasing: a tensor held in several places of a tree maps to one result
(computed once), so the result shares it the same way; distinct tensors stay distinct."""

from __future__ import annotations

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
