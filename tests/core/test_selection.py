"""Selections: select / selectall / none, the algebra (~, |, &), hierarchical prefixes."""

from __future__ import annotations

import pytest
import torch

import gfcomb as gf
from gfcomb import ChoiceMap, Selection


def test_select_single_addresses():
    s = gf.select("x", ("ys", 0, "y"))
    assert "x" in s
    assert ("ys", 0, "y") in s
    assert ("ys", 1, "y") not in s
    assert "y" not in s
    assert ("ys", 0) not in s  # a prefix of a selected address is not itself selected


def test_select_is_hierarchical():
    s = gf.select("ys")
    assert ("ys", 3, "y") in s
    assert ("ys", 0) in s
    assert "ys" in s
    assert ("zs", 3, "y") not in s
    assert ("s", "z") in gf.select("s") and ("s", "z", 1, "w") in gf.select("s")


def test_select_with_tuple_prefix():
    s = gf.select(("ys", 3))
    assert ("ys", 3, "y") in s
    assert ("ys", 3, "z", 0) in s
    assert ("ys", 2, "y") not in s


def test_select_prefix_absorbs_longer_addresses_in_any_order():
    for s in (gf.select("a", ("a", "b")), gf.select(("a", "b"), "a")):
        assert ("a", "c") in s and ("a", "b") in s and "a" in s


def test_select_nothing_and_selectall_and_none():
    assert "x" not in gf.select()
    assert gf.select().is_empty_static()
    everything = gf.selectall()
    assert "x" in everything and ("a", 1, "b") in everything
    assert everything.is_all_static()
    assert Selection.all().is_all_static()
    none = Selection.none()
    assert "x" not in none and ("a", 1) not in none
    assert none.is_empty_static()


def test_select_empty_address_selects_everything():
    s = gf.select(())
    assert "anything" in s and ("a", 2) in s


def test_select_bad_key_raises():
    with pytest.raises(TypeError, match="selection address"):
        gf.select(("a", 1.5))


def test_complement():
    s = ~gf.select("x", ("ys", 1))
    assert "x" not in s
    assert "y" in s
    assert ("ys", 1, "y") not in s
    assert ("ys", 0, "y") in s
    assert ("zz", 5) in s
    assert "q" in ~Selection.none()
    assert "q" not in ~gf.selectall()
    assert (~gf.selectall()).is_empty_static()
    assert (~Selection.none()).is_all_static()


def test_double_complement_is_the_original():
    s = gf.select("x")
    assert ~~s is s


def test_union():
    s = gf.select("x") | gf.select(("ys", 2))
    assert "x" in s and ("ys", 2, "y") in s
    assert ("ys", 1, "y") not in s and "z" not in s
    assert ("a", "b") in (gf.select(("a", "b")) | gf.select(("a", "c")))
    assert ("a", "c") in (gf.select(("a", "b")) | gf.select(("a", "c")))
    assert ("a", "d") not in (gf.select(("a", "b")) | gf.select(("a", "c")))
    assert (gf.select("x") | gf.selectall()).is_all_static()


def test_intersection():
    s = gf.select("ys") & ~gf.select(("ys", 3))
    assert ("ys", 2, "y") in s
    assert ("ys", 3, "y") not in s
    assert "x" not in s
    s2 = gf.select("a", "b") & gf.select("b", "c")
    assert "b" in s2 and "a" not in s2 and "c" not in s2
    assert (gf.select("x") & Selection.none()).is_empty_static()
    assert ("x", 1) in (gf.select("x") & gf.selectall())


def test_de_morgan_on_a_grid_of_addresses():
    a, b = gf.select("x", ("ys", 1)), gf.select(("ys", 1, "y"), "z")
    addrs = ["x", "y", "z", ("ys", 0, "y"), ("ys", 1, "y"), ("ys", 1, "w"), ("x", 2)]
    for addr in addrs:
        assert (addr in ~(a | b)) == (addr in (~a & ~b))
        assert (addr in ~(a & b)) == (addr in (~a | ~b))
        assert (addr in (a | b)) == ((addr in a) or (addr in b))
        assert (addr in (a & b)) == ((addr in a) and (addr in b))


def test_get_subselection_at():
    s = gf.select(("ys", 3, "y"), "x")
    sub = s.get_subselection_at(("ys", 3))
    assert "y" in sub and "z" not in sub
    assert s.get_subselection("x").is_all_static()
    assert s.get_subselection("nope").is_empty_static()


def test_selection_filters_a_choicemap_consistently_with_contains():
    cm = ChoiceMap({"x": 1.0, ("ys", 0, "y"): 2.0, ("ys", 1, "y"): 3.0, ("s", "z"): 4.0})
    sels = [gf.select("ys"), ~gf.select("ys"), gf.select(("ys", 1)) | gf.select("x"),
            gf.select("ys") & ~gf.select(("ys", 0)), gf.selectall(), Selection.none()]
    for sel in sels:
        kept = set(cm.filter(sel).addresses())
        assert kept == {a for a in cm.addresses() if a in sel}


def test_mask_selection_flags():
    from gfcomb.core.selection import MaskSelection

    s = MaskSelection(ChoiceMap({"x": torch.tensor([True, True]),
                                 "y": torch.tensor([True, False])}))
    assert "x" in s
    assert "y" not in s  # not selected for every element
    assert "z" not in s
