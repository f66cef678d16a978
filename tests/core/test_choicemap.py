"""ChoiceMap: construction, reading, stacked maps, masks, merge/filter, immutability, pytrees."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import gfcomb as gf
from gfcomb import ChoiceMap


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def assert_same(a, b):
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), (a, b)


# ----------------------------------------------------------------------------- construction
def test_flat_dict_with_tuple_addresses():
    cm = ChoiceMap({"x": 1.0, ("ys", 0, "y"): 2.0, ("ys", 1, "y"): 3.0})
    assert_same(cm["x"], t(1.0))
    assert_same(cm["ys", 0, "y"], t(2.0))
    assert_same(cm[("ys", 1, "y")], t(3.0))
    assert cm["x"].dtype == torch.float64


def test_nested_dicts_equal_tuple_addresses():
    nested = ChoiceMap({"a": {0: {"y": 1.5}, 1: {"y": 2.5}}, "b": 4.0})
    flat = ChoiceMap({("a", 0, "y"): 1.5, ("a", 1, "y"): 2.5, "b": 4.0})
    assert sorted(nested.addresses(), key=repr) == sorted(flat.addresses(), key=repr)
    for addr, v in flat.items():
        assert_same(nested[addr], v)


def test_choicemap_as_value_of_a_mapping():
    sub = ChoiceMap({"z": 7.0})
    cm = ChoiceMap({"s": sub, ("q", "r"): sub})
    assert_same(cm["s", "z"], t(7.0))
    assert_same(cm["q", "r", "z"], t(7.0))


def test_mixed_tuple_and_nested_dict_under_the_same_prefix_merge():
    cm = ChoiceMap({("a", 0): 1.0, "a": {1: 2.0}})
    assert set(cm.addresses()) == {("a", 0), ("a", 1)}


def test_overlapping_construction_raises_merge_error():
    with pytest.raises(gf.ChoiceMapMergeError, match=r"\('a', 0\)"):
        ChoiceMap({("a", 0): 1.0, "a": {0: 2.0}})


def test_empty_map_and_none():
    e = ChoiceMap.empty()
    assert e.is_empty() and ChoiceMap(None).is_empty() and ChoiceMap({}).is_empty()
    assert len(e) == 0 and list(e.items()) == []
    assert "x" not in e


def test_tensor_values_are_kept_as_is():
    v = torch.randn(3)
    cm = ChoiceMap({"v": v})
    assert cm["v"] is v


def test_bad_address_component_type_raises():
    with pytest.raises(TypeError, match="str or int"):
        ChoiceMap({("a", 1.5): 1.0})


def test_non_mapping_raises():
    with pytest.raises(TypeError):
        ChoiceMap([1.0, 2.0])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- reading
def test_get_submap_and_has_value():
    cm = ChoiceMap({"x": 1.0, ("s", "z"): 2.0, ("s", "w", 0): 3.0})
    sub = cm.get_submap("s")
    assert_same(sub["z"], t(2.0))
    assert_same(sub["w", 0], t(3.0))
    assert cm.get_submap(("s", "w"))[0] == 3.0
    assert cm.get_submap("nope").is_empty()
    assert cm.has_value("x") and cm.has_value(("s", "z"))
    assert not cm.has_value("s")  # a sub-map is not a value
    assert not cm.has_value(("s", "nope"))
    assert cm.get_submap("x").is_value()


def test_contains_is_has_value():
    cm = ChoiceMap({"x": 1.0, ("s", "z"): 2.0})
    assert "x" in cm
    assert ("s", "z") in cm
    assert "s" not in cm
    assert ("x", "deeper") not in cm
    assert "y" not in cm


def test_getitem_missing_raises_keyerror_naming_the_address():
    cm = ChoiceMap({("s", "z"): 2.0})
    with pytest.raises(KeyError) as info:
        cm["s", "q"]
    assert isinstance(info.value, gf.AddressError)
    assert "('s', 'q')" in str(info.value)
    with pytest.raises(gf.AddressError, match="'s'"):
        cm["s"]  # a sub-map, not a value


def test_get_value_on_non_value_names_no_placeholder():
    with pytest.raises(gf.AddressError) as info:
        ChoiceMap({"a": 1.0}).get_value()
    assert "{addr}" not in str(info.value)


def test_items_yields_full_address_tuples():
    cm = ChoiceMap({"x": 1.0, ("s", "z"): 2.0, ("y", 3): 4.0})
    got = dict(cm.items())
    assert set(got) == {("x",), ("s", "z"), ("y", 3)}
    assert_same(got[("y", 3)], t(4.0))
    assert len(cm) == 3
    assert dict(iter(cm)).keys() == got.keys()


def test_keys_of_a_node():
    cm = ChoiceMap({"x": 1.0, ("s", "z"): 2.0})
    assert set(cm.keys()) == {"x", "s"}


def test_to_dict_round_trip():
    cm = ChoiceMap({"x": 1.0, ("s", "z"): 2.0})
    d = cm.to_dict()
    assert set(d) == {"x", "s"} and set(d["s"]) == {"z"}
    assert_same(ChoiceMap(d)["s", "z"], t(2.0))


# ----------------------------------------------------------------------------- merge
def test_merge_disjoint():
    a = ChoiceMap({"x": 1.0, ("s", "z"): 2.0})
    b = ChoiceMap({"y": 3.0, ("s", "w"): 4.0})
    m = a.merge(b)
    assert set(m.addresses()) == {("x",), ("y",), ("s", "z"), ("s", "w")}
    assert_same(m["s", "w"], t(4.0))
    assert set((a | b).addresses()) == set(m.addresses())


def test_merge_with_empty_is_identity():
    a = ChoiceMap({"x": 1.0})
    assert a.merge(ChoiceMap.empty()) is a
    assert ChoiceMap.empty().merge(a) is a


def test_merge_overlap_error_names_the_address():
    a = ChoiceMap({("s", "z"): 1.0, "x": 0.0})
    b = ChoiceMap({("s", "z"): 2.0})
    with pytest.raises(gf.ChoiceMapMergeError) as info:
        a.merge(b)
    assert "('s', 'z')" in str(info.value)
    assert info.value.address == ("s", "z")


def test_merge_value_against_submap_is_an_overlap():
    a = ChoiceMap({"s": 1.0})
    b = ChoiceMap({("s", "z"): 2.0})
    with pytest.raises(gf.ChoiceMapMergeError, match="'s'"):
        a.merge(b)


# ----------------------------------------------------------------------------- filter
def test_filter_by_selection():
    cm = ChoiceMap({"x": 1.0, ("s", "z"): 2.0, ("s", "w"): 3.0, ("y", 0): 4.0})
    f = cm.filter(gf.select("x", ("s", "w")))
    assert set(f.addresses()) == {("x",), ("s", "w")}
    assert set(cm.filter(gf.select("s")).addresses()) == {("s", "z"), ("s", "w")}
    assert cm.filter(gf.selectall()) is cm
    assert cm.filter(gf.Selection.none()).is_empty()
    comp = cm.filter(~gf.select("s"))
    assert set(comp.addresses()) == {("x",), ("y", 0)}


# ----------------------------------------------------------------------------- stacked maps
def _stacked_ys(n=5):
    inner = ChoiceMap({"y": torch.arange(float(n)), "z": torch.arange(2.0 * n).reshape(n, 2)})
    return ChoiceMap.node({"ys": ChoiceMap.stacked(inner, n)})


def test_stacked_element_access():
    cm = _stacked_ys()
    assert_same(cm["ys", 3, "y"], t(3.0))
    assert_same(cm["ys", 3, "z"], t([6.0, 7.0]))
    assert ("ys", 4, "y") in cm
    assert ("ys", 5, "y") not in cm
    assert ("ys", -1, "y") not in cm
    assert cm.get_submap(("ys", 2)).is_empty() is False
    assert_same(cm.get_submap(("ys", 2))["y"], t(2.0))


def test_stacked_element_of_nested_stacked_and_masked_maps():
    """An element of a stacked map is every leaf (values and presence masks, through nested
    stacked maps) indexed at the element: what mapping ``x[j]`` over its tensors gives."""
    from gfcomb.core.pytree import tree_map_tensors

    ys = torch.arange(12.0).reshape(3, 4)
    present = torch.tensor([[True, False, True, True]] * 3)
    inner = ChoiceMap.stacked(ChoiceMap({"y": ys, "w": ys * 2}), 4, batch_ndim=1)
    outer = ChoiceMap.stacked(ChoiceMap.node({"s": inner, "m": ChoiceMap.value(ys, present)}),
                              3, (2, 5, 9))
    for key, j in ((2, 0), (5, 1), (9, 2)):
        got = outer.get_submap(key)
        ref = tree_map_tensors(lambda x, j=j: x[j], outer._inner)
        assert [a for a, _ in got.items()] == [a for a, _ in ref.items()]
        for (_, u), (_, v) in zip(got.items(), ref.items()):
            assert_same(u, v)
        assert_same(got["s", 3, "y"], ys[j, 3])
        assert got.get_submap("m").mask is not None
        assert torch.equal(got.get_submap("m").mask, present[j])
    assert outer.get_submap(3).is_empty()


def test_stacked_slice_access_returns_the_stacked_tensor():
    cm = _stacked_ys()
    assert_same(cm["ys", :, "y"], torch.arange(5.0))
    assert cm["ys", :, "z"].shape == (5, 2)


def test_stacked_items_expand_elements():
    cm = _stacked_ys(3)
    addrs = [a for a, _ in cm.items()]
    assert addrs == [("ys", 0, "y"), ("ys", 0, "z"), ("ys", 1, "y"), ("ys", 1, "z"),
                     ("ys", 2, "y"), ("ys", 2, "z")]
    stacked = list(cm.items(stacked=True))
    assert [a for a, _ in stacked] == [("ys", slice(None), "y"), ("ys", slice(None), "z")]
    assert_same(stacked[0][1], torch.arange(3.0))
    assert len(cm) == 6


def test_stacked_with_sparse_indices():
    inner = ChoiceMap({"y": t([10.0, 20.0, 30.0])})
    cm = ChoiceMap.node({"ys": ChoiceMap.stacked(inner, 3, (4, 7, 9))})
    assert_same(cm["ys", 7, "y"], t(20.0))
    assert ("ys", 1, "y") not in cm
    assert list(cm.get_submap("ys").keys()) == [4, 7, 9]
    assert [a for a, _ in cm.items()] == [("ys", 4, "y"), ("ys", 7, "y"), ("ys", 9, "y")]


def test_stacked_indices_length_mismatch_raises():
    with pytest.raises(ValueError):
        ChoiceMap.stacked(ChoiceMap({"y": torch.zeros(3)}), 3, (0, 1))


def test_stacked_merge_with_stacked_and_with_node():
    a = ChoiceMap.stacked(ChoiceMap({"y": t([1.0, 2.0])}), 2)
    b = ChoiceMap.stacked(ChoiceMap({"z": t([3.0, 4.0])}), 2)
    m = a.merge(b)
    assert m.is_stacked()
    assert_same(m[1, "y"], t(2.0))
    assert_same(m[1, "z"], t(4.0))
    c = ChoiceMap({(5, "y"): 9.0})
    m2 = a.merge(c)
    assert_same(m2[0, "y"], t(1.0))
    assert_same(m2[5, "y"], t(9.0))
    with pytest.raises(gf.ChoiceMapMergeError, match=r"\(1, 'y'\)"):
        a.merge(ChoiceMap({(1, "y"): 0.0}))


def test_stacked_filter_selects_single_elements():
    cm = _stacked_ys()
    f = cm.filter(gf.select(("ys", 2), ("ys", 4, "z")))
    assert set(f.addresses()) == {("ys", 2, "y"), ("ys", 2, "z"), ("ys", 4, "z")}
    assert_same(f["ys", 2, "y"], t(2.0))
    assert ("ys", 3, "y") not in f
    assert set(cm.filter(gf.select("ys")).addresses()) == set(cm.addresses())


def test_stacked_set_returns_new_map():
    cm = _stacked_ys(3)
    new = cm.set(("ys", 1, "y"), 100.0)
    assert_same(new["ys", 1, "y"], t(100.0))
    assert_same(new["ys", 2, "y"], t(2.0))
    assert_same(cm["ys", 1, "y"], t(1.0))


# -------------------------------------------------------------- stacked inside an outer batch
def _batched_stacked(scales):
    def build(s):
        inner = ChoiceMap({"y": s * torch.arange(4.0), "z": s * torch.ones(4, 2)})
        return ChoiceMap.node({"ys": ChoiceMap.stacked(inner, 4)})

    return torch.func.vmap(build)(scales)


def test_stacked_in_outer_vmap_batch_element_access():
    scales = t([1.0, 2.0, 3.0])
    cm = _batched_stacked(scales)
    assert cm["ys", :, "y"].shape == (3, 4)
    # element 2 of the stack, for every batch member: the element axis is 1, not 0
    assert_same(cm["ys", 2, "y"], scales * 2.0)
    assert cm["ys", 2, "z"].shape == (3, 2)
    assert ("ys", 3, "y") in cm and ("ys", 4, "y") not in cm


def test_stacked_in_outer_vmap_batch_merge_keeps_element_axis():
    scales = t([1.0, 2.0, 3.0])
    a = _batched_stacked(scales)
    b = torch.func.vmap(lambda s: ChoiceMap.node(
        {"ys": ChoiceMap.stacked(ChoiceMap({"w": -s * torch.arange(4.0)}), 4)}))(scales)
    m = a.merge(b)
    assert_same(m["ys", 2, "y"], scales * 2.0)
    assert_same(m["ys", 3, "w"], -scales * 3.0)


def test_stacked_in_outer_vmap_batch_filter_keeps_element_axis():
    scales = t([1.0, 2.0, 3.0])
    cm = _batched_stacked(scales)
    f = cm.filter(gf.select(("ys", 1)))
    assert_same(f["ys", 1, "y"], scales)
    assert ("ys", 2, "y") not in f
    assert {a for a, _ in f.items()} == {("ys", 1, "y"), ("ys", 1, "z")}
    whole = cm.filter(gf.select("ys"))
    assert_same(whole["ys", 3, "y"], scales * 3.0)


def test_stacked_element_access_inside_vmap():
    rows = torch.arange(15.0).reshape(3, 5)
    cm = torch.func.vmap(lambda r: ChoiceMap.node({"ys": ChoiceMap.stacked(
        ChoiceMap({"y": r}), 5)}))(rows)
    out = torch.func.vmap(lambda c: c["ys", 2, "y"])(cm)
    assert_same(out, t([2.0, 7.0, 12.0]))


# ----------------------------------------------------------------------------- masks
def test_masked_value_presence():
    full = ChoiceMap.value(t([1.0, 2.0]), torch.tensor([True, True]))
    part = ChoiceMap.value(t([1.0, 2.0]), torch.tensor([True, False]))
    assert full.has_value() and () in full
    assert not part.has_value()
    assert part.mask is not None and part.mask.tolist() == [True, False]
    with pytest.raises(gf.AddressError, match="masked out"):
        ChoiceMap.node({"x": part})["x"]
    assert list(ChoiceMap.node({"x": part}).items()) == []


def test_masked_stacked_elements():
    inner = ChoiceMap.value(torch.arange(5.0), torch.tensor([True, False, True, False, True]))
    cm = ChoiceMap.node({"ys": ChoiceMap.stacked(ChoiceMap.node({"y": inner}), 5)})
    assert [a for a, _ in cm.items()] == [("ys", 0, "y"), ("ys", 2, "y"), ("ys", 4, "y")]
    assert ("ys", 2, "y") in cm and ("ys", 1, "y") not in cm
    with pytest.raises(gf.AddressError):
        cm["ys", 1, "y"]
    assert_same(cm["ys", :, "y"], torch.arange(5.0))  # the stacked read ignores the mask
    assert len(cm) == 3


def test_masked_to_dict_skips_absent_elements():
    inner = ChoiceMap.value(torch.arange(3.0), torch.tensor([True, False, True]))
    cm = ChoiceMap.stacked(ChoiceMap.node({"y": inner}), 3)
    d = cm.to_dict()
    assert set(d) == {0, 2}


def test_masked_merge_disjoint_and_overlap():
    a = ChoiceMap.value(t([1.0, 2.0]), torch.tensor([True, False]))
    b = ChoiceMap.value(t([3.0, 4.0]), torch.tensor([False, True]))
    m = a.merge(b)
    assert_same(m.get_value(), t([1.0, 4.0]))
    assert m.mask.tolist() == [True, True]
    with pytest.raises(gf.ChoiceMapMergeError):
        a.merge(a)


def test_filter_masked_value_with_mask_selection():
    from gfcomb.core.selection import MaskSelection

    cm = ChoiceMap.value(t([1.0, 2.0, 3.0]))
    f = cm.filter(MaskSelection(ChoiceMap.value(torch.tensor([True, False, True]))))
    assert f.mask.tolist() == [True, False, True]


# ----------------------------------------------------------------------------- immutability
def test_setattr_and_delattr_raise():
    cm = ChoiceMap({"x": 1.0})
    with pytest.raises(AttributeError):
        cm.foo = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        cm._kind = 0
    with pytest.raises(AttributeError):
        del cm._value


def test_merge_filter_set_leave_the_original_unchanged():
    x = t(1.0)
    cm = ChoiceMap({"x": x, ("s", "z"): 2.0})
    before = {a: v.clone() for a, v in cm.items()}
    m = cm.merge(ChoiceMap({"y": 3.0}))
    f = cm.filter(gf.select("x"))
    s = cm.set(("s", "z"), 5.0)
    s2 = cm.set("new", 6.0)
    assert m is not cm and f is not cm and s is not cm and s2 is not cm
    assert {a: v for a, v in cm.items()}.keys() == before.keys()
    for a, v in cm.items():
        assert_same(v, before[a])
    assert_same(s["s", "z"], t(5.0))
    assert "new" in s2 and "new" not in cm and "y" not in cm
    assert cm["x"] is x


def test_set_root_and_prefixed():
    cm = ChoiceMap.empty().set((), 3.0)
    assert cm.is_value() and cm.get_value() == 3.0
    p = ChoiceMap({"z": 1.0}).prefixed(("a", 0))
    assert_same(p["a", 0, "z"], t(1.0))


# ----------------------------------------------------------------------------- pytrees
def test_pytree_round_trip():
    cm = ChoiceMap({"x": 1.0, ("s", "z"): t([1.0, 2.0])}).merge(_stacked_ys(3))
    leaves, spec = pytree.tree_flatten(cm)
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    back = pytree.tree_unflatten([leaf * 2 for leaf in leaves], spec)
    assert isinstance(back, ChoiceMap)
    assert_same(back["s", "z"], t([2.0, 4.0]))
    assert_same(back["ys", 2, "y"], t(4.0))
    assert set(back.addresses()) == set(cm.addresses())


def test_pytree_round_trip_with_mask():
    cm = ChoiceMap.node({"x": ChoiceMap.value(t([1.0, 2.0]), torch.tensor([True, False]))})
    leaves, spec = pytree.tree_flatten(cm)
    assert len(leaves) == 2
    back = pytree.tree_unflatten(leaves, spec)
    assert back.get_submap("x").mask.tolist() == [True, False]


def test_vmap_takes_and_returns_choicemaps():
    cm = ChoiceMap({"a": t([1.0, 2.0, 3.0]), ("s", "b"): t([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])})

    def f(c):
        return ChoiceMap({"sum": c["a"] + c["s", "b"].sum(), "a": c["a"]})

    out = torch.func.vmap(f)(cm)
    assert isinstance(out, ChoiceMap)
    assert_same(out["sum"], t([3.0, 6.0, 9.0]))
    assert_same(out["a"], t([1.0, 2.0, 3.0]))


def test_vmap_over_a_stacked_map_per_batch_member():
    cm = _batched_stacked(t([1.0, 2.0]))
    out = torch.func.vmap(lambda c: c["ys", 3, "y"] + c["ys", :, "y"].sum())(cm)
    # member s: 3s + s(0+1+2+3)
    assert_same(out, t([9.0, 18.0]))


def test_slice_on_a_non_stacked_node_is_absent_not_a_type_error():
    cm = _stacked_ys(3).set(("ys", 1, "y"), 100.0)  # set() unstacks "ys" into a node
    assert ("ys", slice(None), "y") not in cm
    with pytest.raises(gf.AddressError):
        cm["ys", :, "y"]


# ----------------------------------------------------------------------------- properties
_keys = st.one_of(st.sampled_from(["a", "b", "c"]), st.integers(0, 3))
_addrs = st.lists(_keys, min_size=1, max_size=3).map(tuple)


def _prefix_free(addrs):
    """Drop addresses that are prefixes of (or extend) an earlier one."""
    out = []
    for a in addrs:
        if all(a[: len(b)] != b and b[: len(a)] != a for b in out):
            out.append(a)
    return out


@given(st.lists(_addrs, min_size=1, max_size=8), st.lists(_addrs, max_size=3))
def test_filter_by_selection_and_complement_partition_the_map(addrs, selected):
    addrs = _prefix_free(addrs)
    cm = ChoiceMap({a: float(i) for i, a in enumerate(addrs)})
    assert set(cm.addresses()) == set(addrs)
    sel = gf.select(*selected)
    inside, outside = cm.filter(sel), cm.filter(~sel)
    assert set(inside.addresses()) == {a for a in addrs if a in sel}
    assert set(inside.addresses()) | set(outside.addresses()) == set(addrs)
    assert not set(inside.addresses()) & set(outside.addresses())
    merged = inside.merge(outside)
    for i, a in enumerate(addrs):
        assert merged[a] == float(i)


@given(st.lists(_addrs, min_size=2, max_size=8), st.integers(1, 7))
def test_merge_of_a_split_map_restores_it(addrs, cut):
    addrs = _prefix_free(addrs)
    left = ChoiceMap({a: float(i) for i, a in enumerate(addrs[:cut])})
    right = ChoiceMap({a: float(i + cut) for i, a in enumerate(addrs[cut:])})
    m = left.merge(right)
    assert set(m.addresses()) == set(addrs)
    for i, a in enumerate(addrs):
        assert m[a] == float(i)
    if addrs[:cut] and addrs[cut:]:
        with pytest.raises(gf.ChoiceMapMergeError):
            m.merge(ChoiceMap({addrs[0]: 0.0}))


def test_stacked_filter_with_complements_and_intersections():
    cm = _stacked_ys(4)
    f = cm.filter(~gf.select(("ys", 2, "y")))
    assert set(f.addresses()) == set(cm.addresses()) - {("ys", 2, "y")}
    g = cm.filter(gf.select("ys") & ~gf.select(("ys", 1), ("ys", 3, "z")))
    assert set(g.addresses()) == {("ys", 0, "y"), ("ys", 0, "z"), ("ys", 2, "y"),
                                  ("ys", 2, "z"), ("ys", 3, "y")}
    for sel in (~gf.select(("ys", 2, "y")), gf.select(("ys", 0)) | gf.select(("ys", 3, "z"))):
        assert set(cm.filter(sel).addresses()) == {a for a in cm.addresses() if a in sel}
