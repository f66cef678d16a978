"""Tests of the Map combinator (gfcomb/combinators/map.py).

Every weight is checked against log densities written out by hand in this file (float64,
tolerance 1e-9).  Gen.jl's Map test invariants are ported with 0-based element keys: simulate,
partial and full generate, update that grows / shrinks / changes a shared argument / touches
one element, regenerate, project, update reversibility; Map inside @gen, Map of Map, torch
modules inside the kernel (parameters and gradients), vmap over particles of a model holding a
Map, the batched paths against per-element loops, the vectorize=False fallback and bad input.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from scipy import stats

import gfcomb as gf
import gfcomb.combinators.map as map_module
from gfcomb.combinators.map import Map
from gfcomb.core.diff import NoChange, UnknownChange, VectorDiff
from gfcomb.core.errors import (
    ArgumentError,
    MissingChoiceError,
    UnvisitedConstraintError,
    VmapError,
)

TOL = dict(rtol=0.0, atol=1e-9)
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ------------------------------------------------------------------ hand-written densities
def normal_lp(y: Any, mu: Any, sigma: Any) -> torch.Tensor:
    """Elementwise log N(y; mu, sigma), written out."""
    y, mu, sigma = (torch.as_tensor(v, dtype=torch.float64) for v in (y, mu, sigma))
    return -0.5 * ((y - mu) / sigma) ** 2 - torch.log(sigma) - HALF_LOG_2PI


def close(a: Any, b: Any, **kw: Any) -> None:
    """assert_close in float64 with the file's tight tolerance."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a, b, **{**TOL, **kw})


def snapshot(tr: gf.Trace) -> list[tuple[tuple[Any, ...], torch.Tensor]]:
    """A deep copy of a trace's choices and score (to check that it is never mutated)."""
    out = [(a, v.clone()) for a, v in tr.choices.items(stacked=True)]
    out.append((("<score>",), tr.score.clone()))
    return out


def assert_unchanged(tr: gf.Trace, snap: list[tuple[tuple[Any, ...], torch.Tensor]]) -> None:
    """The trace still holds exactly the snapshot's values."""
    assert snapshot(tr).__len__() == len(snap)
    for (a, v), (b, w) in zip(snapshot(tr), snap):
        assert a == b
        assert torch.equal(v, w), a


# ------------------------------------------------------------------ kernels and models
@gf.gen
def point(x, slope):
    """y ~ N(slope * x, 1)."""
    return gf.normal(slope * x, 1.0) @ "y"


@gf.gen
def pair(x):
    """a ~ N(x, 1); b ~ N(a, 2): two choices per element, b depends on a."""
    a = gf.normal(x, 1.0) @ "a"
    b = gf.normal(a, 2.0) @ "b"
    return a + b


@gf.gen
def line_model(xs):
    """DESIGN §2's example: a shared slope and a Map over points."""
    slope = gf.normal(0.0, 1.0) @ "slope"
    ys = Map(point, in_dims=(0, None))(xs, slope) @ "ys"
    return ys


def point_lp(ys: torch.Tensor, xs: torch.Tensor, slope: Any) -> torch.Tensor:
    """Per-element log p of the `point` kernel."""
    return normal_lp(ys, torch.as_tensor(slope) * xs, 1.0)


def pair_lp(a: torch.Tensor, b: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Per-element log p of the `pair` kernel."""
    return normal_lp(a, xs, 1.0) + normal_lp(b, a, 2.0)


XS = torch.tensor([0.5, -1.0, 2.0, 0.25, 3.0], dtype=torch.float64)  # module level: not
# under conftest's float64 default yet
SLOPE = torch.tensor(0.7, dtype=torch.float64)
LINE = Map(point, in_dims=(0, None))


def line_choices(ys: torch.Tensor) -> gf.ChoiceMap:
    """Per-element constraints {(i, "y"): ys[i]} as an ordinary (node) choice map."""
    return gf.ChoiceMap({(i, "y"): ys[i] for i in range(len(ys))})


# ================================================================== simulate
def test_simulate_score_retval_and_reads():
    tr = LINE.simulate((XS, SLOPE))
    ys = tr[:, "y"]
    assert ys.shape == (5,)
    close(tr.score, point_lp(ys, XS, SLOPE).sum())
    close(tr.retval, ys)
    for i in range(5):
        assert torch.equal(tr[i, "y"], ys[i])
        assert torch.equal(tr.choices[i, "y"], ys[i])
    assert tr.choices.addresses() == [(i, "y") for i in range(5)]
    close(tr.element_scores, point_lp(ys, XS, SLOPE))
    assert tr.gen_fn == LINE and tr.length == 5


def test_simulate_inside_gen_reads():
    tr = line_model.simulate((XS,))
    slope = tr["slope"]
    ys = tr["ys", :, "y"]
    assert torch.equal(tr.choices["ys", :, "y"], ys)
    for i in range(5):
        assert torch.equal(tr["ys", i, "y"], ys[i])
        assert torch.equal(tr.choices["ys", i, "y"], ys[i])
    close(tr.score, normal_lp(slope, 0.0, 1.0) + point_lp(ys, XS, slope).sum())
    close(tr.retval, ys)
    assert ("ys", 4, "y") in tr.choices and ("ys", 5, "y") not in tr.choices


def test_simulate_is_prior_sample():
    # a weak statistical check that elements are sampled independently from the prior
    xs = torch.linspace(-1.0, 1.0, 4000)
    tr = LINE.simulate((xs, torch.tensor(2.0)))
    resid = tr[:, "y"] - 2.0 * xs
    assert abs(float(resid.mean())) < 0.1
    assert abs(float(resid.std()) - 1.0) < 0.1
    assert abs(float(torch.corrcoef(torch.stack([resid[:-1], resid[1:]]))[0, 1])) < 0.1


def test_propose_matches_simulate_layout():
    choices, w, retval = LINE.propose((XS, SLOPE))
    ys = choices[:, "y"]
    close(w, point_lp(ys, XS, SLOPE).sum())
    close(retval, ys)


# ================================================================== generate / assess
def test_generate_partial_constraints():
    cm = gf.ChoiceMap({(1, "y"): 0.3, (3, "y"): -1.2})
    tr, w = LINE.generate((XS, SLOPE), cm)
    close(w, normal_lp(0.3, SLOPE * XS[1], 1.0) + normal_lp(-1.2, SLOPE * XS[3], 1.0))
    close(tr[1, "y"], 0.3)
    close(tr[3, "y"], -1.2)
    ys = tr[:, "y"]
    close(tr.score, point_lp(ys, XS, SLOPE).sum())
    free = ys[[0, 2, 4]]
    assert torch.isfinite(free).all()
    assert not torch.isin(free, torch.tensor([0.3, -1.2])).any()


def test_generate_partial_unconstrained_elements_follow_prior():
    n = 3000
    xs = torch.linspace(-2.0, 2.0, n)
    cm = gf.ChoiceMap({(i, "y"): 10.0 for i in range(0, n, 3)})
    tr, w = LINE.generate((xs, torch.tensor(1.0)), cm)
    ys = tr[:, "y"]
    close(w, normal_lp(10.0, xs[0::3], 1.0).sum())
    assert torch.equal(ys[0::3], torch.full((n // 3,), 10.0))
    free = torch.ones(n, dtype=torch.bool)
    free[0::3] = False
    resid = ys[free] - xs[free]
    assert abs(float(resid.mean())) < 0.1 and abs(float(resid.std()) - 1.0) < 0.1


def test_generate_full_constraints_weight_equals_score_equals_assess():
    ys = torch.tensor([0.1, -0.4, 1.7, 0.0, 2.2])
    hand = point_lp(ys, XS, SLOPE).sum()
    for cm in (line_choices(ys), gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys}), 5)):
        tr, w = LINE.generate((XS, SLOPE), cm)
        close(w, hand)
        close(tr.score, hand)
        assert torch.equal(tr[:, "y"], ys)
        aw, aret = LINE.assess((XS, SLOPE), cm)
        close(aw, hand)
        close(aret, ys)


def test_generate_sparse_stacked_constraints():
    # a stacked map holding elements 4 and 1 only (in that order)
    inner = gf.ChoiceMap({"y": torch.tensor([5.0, -5.0])})
    cm = gf.ChoiceMap.stacked(inner, 2, (4, 1))
    tr, w = LINE.generate((XS, SLOPE), cm)
    close(tr[4, "y"], 5.0)
    close(tr[1, "y"], -5.0)
    close(w, normal_lp(5.0, SLOPE * XS[4], 1.0) + normal_lp(-5.0, SLOPE * XS[1], 1.0))


def test_generate_two_choice_kernel_partial_addresses():
    m = Map(pair)
    xs = torch.tensor([0.0, 1.0, -1.0])
    cm = gf.ChoiceMap({(0, "a"): 0.5, (2, "b"): 1.5, (1, "a"): -0.3, (1, "b"): 0.2})
    tr, w = m.generate((xs,), cm)
    a, b = tr[:, "a"], tr[:, "b"]
    close(a[0], 0.5)
    close(b[2], 1.5)
    close(a[1], -0.3)
    close(b[1], 0.2)
    hand_w = (normal_lp(0.5, 0.0, 1.0) + normal_lp(b[2], a[2], 2.0) + normal_lp(-0.3, 1.0, 1.0)
              + normal_lp(0.2, -0.3, 2.0))
    # element 2: b is constrained but depends on the freshly sampled a
    close(w, hand_w)
    close(tr.score, pair_lp(a, b, xs).sum())


def test_generate_inside_gen_full_and_partial():
    ys = torch.tensor([0.1, -0.4, 1.7, 0.0, 2.2])
    cm = gf.ChoiceMap({"slope": 0.9, "ys": line_choices(ys)})
    tr, w = line_model.generate((XS,), cm)
    hand = normal_lp(0.9, 0.0, 1.0) + point_lp(ys, XS, 0.9).sum()
    close(w, hand)
    close(tr.score, hand)
    close(line_model.assess((XS,), cm)[0], hand)
    # partial: only ys[2]
    tr2, w2 = line_model.generate((XS,), gf.ChoiceMap({("ys", 2, "y"): 1.0}))
    close(w2, normal_lp(1.0, tr2["slope"] * XS[2], 1.0))
    close(tr2["ys", 2, "y"], 1.0)


# ================================================================== update
def test_update_grow_with_constraints():
    xs3 = XS[:3]
    tr = LINE.simulate((xs3, SLOPE))
    snap = snapshot(tr)
    old_ys = tr[:, "y"].clone()
    cm = gf.ChoiceMap({(4, "y"): 1.25})
    for diff in (VectorDiff(5, 3, ()), UnknownChange()):
        new, w, retdiff, discard = LINE.update(tr, (XS, SLOPE), (diff, NoChange()), cm)
        ys = new[:, "y"]
        assert ys.shape == (5,) and new.length == 5
        assert torch.equal(ys[:3], old_ys)
        close(ys[4], 1.25)
        close(w, normal_lp(1.25, SLOPE * XS[4], 1.0))
        close(new.score, point_lp(ys, XS, SLOPE).sum())
        close(new.score - tr.score - point_lp(ys[3], XS[3], SLOPE), w)
        assert discard.is_empty()
        if isinstance(diff, VectorDiff):
            assert retdiff == VectorDiff(5, 3, ())
    assert_unchanged(tr, snap)


def test_update_grow_from_empty_like_generate():
    tr = LINE.simulate((XS[:1], SLOPE))
    new, w, _, _ = LINE.update(tr, (XS, SLOPE), (VectorDiff(5, 1, ()), NoChange()),
                               gf.ChoiceMap({(2, "y"): 0.0, (3, "y"): 1.0}))
    close(w, normal_lp(0.0, SLOPE * XS[2], 1.0) + normal_lp(1.0, SLOPE * XS[3], 1.0))
    assert torch.equal(new[0, "y"], tr[0, "y"])


def test_update_shrink_discard_and_reverse():
    tr = LINE.simulate((XS, SLOPE))
    snap = snapshot(tr)
    ys = tr[:, "y"].clone()
    new, w, retdiff, discard = LINE.update(tr, (XS[:3], SLOPE), (VectorDiff(3, 5, ()), NoChange()))
    assert new.length == 3
    assert torch.equal(new[:, "y"], ys[:3])
    close(w, -point_lp(ys[3:], XS[3:], SLOPE).sum())
    close(new.score, point_lp(ys[:3], XS[:3], SLOPE).sum())
    assert sorted(discard.addresses()) == [(3, "y"), (4, "y")]
    close(discard[3, "y"], ys[3])
    close(discard[4, "y"], ys[4])
    assert retdiff == VectorDiff(3, 5, ())
    # grow back with the discard as constraints: the old trace again, weight negated
    back, w_back, _, d_back = LINE.update(new, (XS, SLOPE), (VectorDiff(5, 3, ()), NoChange()),
                                          discard)
    assert torch.equal(back[:, "y"], ys)
    close(back.score, tr.score)
    close(w_back, -w)
    assert d_back.is_empty()
    assert_unchanged(tr, snap)


def test_update_shared_argument_rescores_every_element():
    tr = LINE.simulate((XS, SLOPE))
    snap = snapshot(tr)
    ys = tr[:, "y"].clone()
    new_slope = torch.tensor(-0.4)
    new, w, retdiff, discard = LINE.update(tr, (XS, new_slope), (NoChange(), UnknownChange()))
    assert torch.equal(new[:, "y"], ys)
    close(new.score, point_lp(ys, XS, new_slope).sum())
    close(w, point_lp(ys, XS, new_slope).sum() - point_lp(ys, XS, SLOPE).sum())
    assert isinstance(retdiff, UnknownChange)
    assert discard.is_empty()
    assert_unchanged(tr, snap)


def test_update_noop_returns_same_trace():
    tr = LINE.simulate((XS, SLOPE))
    new, w, retdiff, discard = LINE.update(tr, (XS, SLOPE), (NoChange(), NoChange()))
    assert new is tr
    close(w, 0.0)
    assert isinstance(retdiff, NoChange) and discard.is_empty()


class _Recorder:
    """Records the number of elements of every kernel call: a vmap over elements (Map's
    ``batched_call``) or a batch call of a ``@gen`` kernel run over the whole batch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lengths: list[int] = []
        self.batch_calls: list[int] = []  # (the @gen kernel's own batch calls alone)
        real = map_module.batched_call

        def spy(fn: Any, in_dims: Any, *, vectorize: bool, length: int, who: str) -> Any:
            self.lengths.append(length)
            return real(fn, in_dims, vectorize=vectorize, length=length, who=who)

        monkeypatch.setattr(map_module, "batched_call", spy)
        cls = gf.GenFunction
        for name, rows in (("batch_generate", lambda n, *a, **k: n),
                           ("batch_update", lambda tr, *a, **k: int(tr.score.shape[0])),
                           ("batch_regenerate", lambda tr, *a, **k: int(tr.score.shape[0]))):
            method = getattr(cls, name)

            def wrapped(gen_fn: Any, *a: Any, _m: Any = method, _rows: Any = rows,
                        **k: Any) -> Any:
                self.lengths.append(_rows(*a, **k))
                self.batch_calls.append(_rows(*a, **k))
                return _m(gen_fn, *a, **k)

            monkeypatch.setattr(cls, name, wrapped)


def test_update_vectordiff_revisits_only_touched_element(monkeypatch):
    tr = LINE.simulate((XS, SLOPE))
    snap = snapshot(tr)
    ys = tr[:, "y"].clone()
    xs2 = XS.clone()
    xs2[2] = 10.0
    rec = _Recorder(monkeypatch)
    new, w, retdiff, discard = LINE.update(tr, (xs2, SLOPE), (VectorDiff(5, 5, {2}), NoChange()))
    assert rec.lengths == [1]  # one batched kernel call, over one element
    assert torch.equal(new[:, "y"], ys)
    close(w, point_lp(ys[2], 10.0, SLOPE) - point_lp(ys[2], XS[2], SLOPE))
    close(new.score, point_lp(ys, xs2, SLOPE).sum())
    assert retdiff == VectorDiff(5, 5, {2})
    assert discard.is_empty()
    assert_unchanged(tr, snap)


def test_update_one_constraint_revisits_one_element(monkeypatch):
    tr = LINE.simulate((XS, SLOPE))
    ys = tr[:, "y"].clone()
    rec = _Recorder(monkeypatch)
    new, w, retdiff, discard = LINE.update(tr, (XS, SLOPE), (NoChange(), NoChange()),
                                           gf.ChoiceMap({(3, "y"): 0.5}))
    assert rec.lengths == [1]
    close(w, normal_lp(0.5, SLOPE * XS[3], 1.0) - normal_lp(ys[3], SLOPE * XS[3], 1.0))
    assert torch.equal(new[:, "y"][[0, 1, 2, 4]], ys[[0, 1, 2, 4]])
    close(new[3, "y"], 0.5)
    assert discard.addresses() == [(3, "y")]
    close(discard[3, "y"], ys[3])
    assert retdiff == VectorDiff(5, 5, {3})


class CountingMLP(torch.nn.Module):
    """A small MLP that counts its forward calls (vectorize=False: once per element)."""

    def __init__(self, d_in: int = 1) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d_in, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 1))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x).squeeze(-1)


def test_update_vectordiff_counts_kernel_calls_unvectorized():
    counter = CountingMLP().double()

    @gf.gen
    def k(x):
        return gf.normal(counter(x.unsqueeze(-1)), 1.0) @ "y"

    m = Map(k, vectorize=False)
    tr = m.simulate((XS,))
    assert counter.calls == 5
    counter.calls = 0
    xs2 = XS.clone()
    xs2[1] = 4.0
    new, w, _, _ = m.update(tr, (xs2,), (VectorDiff(5, 5, {1}),))
    assert counter.calls == 1
    with torch.no_grad():
        mu_old = counter.net(XS.unsqueeze(-1)).squeeze(-1)
        mu_new = counter.net(xs2.unsqueeze(-1)).squeeze(-1)
    y1 = tr[1, "y"]
    close(w, normal_lp(y1, mu_new[1], 1.0) - normal_lp(y1, mu_old[1], 1.0))


def test_update_reverse_with_discard_restores_trace():
    tr = line_model.simulate((XS,))
    snap = snapshot(tr)
    cm = gf.ChoiceMap({"slope": 1.3, ("ys", 0, "y"): -2.0, ("ys", 4, "y"): 0.75})
    new, w, _, discard = line_model.update(tr, (XS,), (NoChange(),), cm)
    ys_new = new["ys", :, "y"]
    hand = (normal_lp(1.3, 0.0, 1.0) + point_lp(ys_new, XS, 1.3).sum()) - tr.score
    close(w, hand)
    assert sorted(map(str, discard.addresses())) == sorted(
        map(str, [("slope",), ("ys", 0, "y"), ("ys", 4, "y")]))
    back, w_back, _, d_back = line_model.update(new, (XS,), (NoChange(),), discard)
    close(w_back, -w)
    close(back.score, tr.score)
    assert torch.equal(back["ys", :, "y"], tr["ys", :, "y"])
    assert torch.equal(back["slope"], tr["slope"])
    assert sorted(map(str, d_back.addresses())) == sorted(map(str, discard.addresses()))
    assert_unchanged(tr, snap)


def test_update_in_gen_argument_change_of_slope_rescores_all():
    tr = line_model.simulate((XS,))
    ys = tr["ys", :, "y"].clone()
    new, w, _, discard = line_model.update(tr, (XS,), (NoChange(),), gf.ChoiceMap({"slope": -1.0}))
    assert torch.equal(new["ys", :, "y"], ys)
    s0 = tr["slope"]
    close(w, normal_lp(-1.0, 0.0, 1.0) - normal_lp(s0, 0.0, 1.0)
          + point_lp(ys, XS, -1.0).sum() - point_lp(ys, XS, s0).sum())
    close(discard["slope"], s0)


# ================================================================== regenerate
def test_regenerate_one_element_weight_zero(monkeypatch):
    tr = LINE.simulate((XS, SLOPE))
    snap = snapshot(tr)
    ys = tr[:, "y"].clone()
    rec = _Recorder(monkeypatch)
    new, w, retdiff = LINE.regenerate(tr, (XS, SLOPE), (NoChange(), NoChange()),
                                      gf.select((2, "y")))
    assert rec.lengths == [1]
    close(w, 0.0)
    ys2 = new[:, "y"]
    assert torch.equal(ys2[[0, 1, 3, 4]], ys[[0, 1, 3, 4]])
    assert not torch.equal(ys2[2], ys[2])
    close(new.score, point_lp(ys2, XS, SLOPE).sum())
    assert retdiff == VectorDiff(5, 5, {2})
    assert_unchanged(tr, snap)


def test_regenerate_one_element_in_gen():
    tr = line_model.simulate((XS,))
    ys = tr["ys", :, "y"].clone()
    for sel in (gf.select(("ys", 2)), gf.select(("ys", 2, "y"))):
        new, w, _ = line_model.regenerate(tr, (XS,), (NoChange(),), sel)
        close(w, 0.0)
        ys2 = new["ys", :, "y"]
        assert torch.equal(ys2[[0, 1, 3, 4]], ys[[0, 1, 3, 4]])
        assert not torch.equal(ys2[2], ys[2])
        assert torch.equal(new["slope"], tr["slope"])
        close(new.score, normal_lp(tr["slope"], 0.0, 1.0) + point_lp(ys2, XS, tr["slope"]).sum())


def test_regenerate_shared_slope_weight_is_mh_ratio():
    tr = line_model.simulate((XS,))
    snap = snapshot(tr)
    ys = tr["ys", :, "y"].clone()
    new, w, _ = line_model.regenerate(tr, (XS,), (NoChange(),), gf.select("slope"))
    s0, s1 = tr["slope"], new["slope"]
    assert not torch.equal(s0, s1)
    assert torch.equal(new["ys", :, "y"], ys)
    # prior proposal for slope: the MH log ratio is the likelihood ratio of the retained ys
    close(w, point_lp(ys, XS, s1).sum() - point_lp(ys, XS, s0).sum())
    close(new.score - tr.score - (normal_lp(s1, 0.0, 1.0) - normal_lp(s0, 0.0, 1.0)), w)
    assert_unchanged(tr, snap)


def test_regenerate_complement_selection_in_gen():
    tr = line_model.simulate((XS,))
    ys = tr["ys", :, "y"].clone()
    sel = gf.select("ys") & ~gf.select(("ys", 1, "y"))
    new, w, _ = line_model.regenerate(tr, (XS,), (NoChange(),), sel)
    close(w, 0.0)  # element 1 and the slope are retained and nothing they depend on changed
    ys2 = new["ys", :, "y"]
    assert torch.equal(ys2[1], ys[1])
    assert not torch.isin(ys2[[0, 2, 3, 4]], ys).any()
    # with the slope selected too, element 1's weight is its likelihood ratio
    new2, w2, _ = line_model.regenerate(tr, (XS,), (NoChange(),),
                                        gf.select("slope") | sel)
    ys3 = new2["ys", :, "y"]
    assert torch.equal(ys3[1], ys[1])
    close(w2, point_lp(ys[1], XS[1], new2["slope"]) - point_lp(ys[1], XS[1], tr["slope"]))


def test_regenerate_two_choice_kernel_dependent_choice():
    m = Map(pair)
    xs = torch.tensor([0.0, 1.0, -1.0, 2.0])
    tr = m.simulate((xs,))
    a, b = tr[:, "a"].clone(), tr[:, "b"].clone()
    # regenerate a of element 1: b_1 is retained and depends on a_1
    new, w, _ = m.regenerate(tr, (xs,), (NoChange(),), gf.select((1, "a")))
    a2, b2 = new[:, "a"], new[:, "b"]
    assert torch.equal(b2, b)
    assert torch.equal(a2[[0, 2, 3]], a[[0, 2, 3]]) and not torch.equal(a2[1], a[1])
    close(w, normal_lp(b[1], a2[1], 2.0) - normal_lp(b[1], a[1], 2.0))
    close(new.score, pair_lp(a2, b2, xs).sum())


def test_regenerate_with_shared_argument_change():
    tr = LINE.simulate((XS, SLOPE))
    ys = tr[:, "y"].clone()
    s1 = torch.tensor(1.9)
    new, w, _ = LINE.regenerate(tr, (XS, s1), (NoChange(), UnknownChange()), gf.select((0, "y")))
    ys2 = new[:, "y"]
    assert torch.equal(ys2[1:], ys[1:])
    close(w, point_lp(ys[1:], XS[1:], s1).sum() - point_lp(ys[1:], XS[1:], SLOPE).sum())
    close(new.score, point_lp(ys2, XS, s1).sum())


def test_regenerate_grow_and_shrink():
    tr = LINE.simulate((XS[:3], SLOPE))
    ys = tr[:, "y"].clone()
    new, w, _ = LINE.regenerate(tr, (XS, SLOPE), (VectorDiff(5, 3, ()), NoChange()),
                                gf.Selection.none())
    close(w, 0.0)
    assert torch.equal(new[:, "y"][:3], ys)
    close(new.score, point_lp(new[:, "y"], XS, SLOPE).sum())
    small, w2, _ = LINE.regenerate(new, (XS[:2], SLOPE), (VectorDiff(2, 5, ()), NoChange()),
                                   gf.Selection.none())
    close(w2, 0.0)
    assert torch.equal(small[:, "y"], ys[:2])


# ================================================================== project
def test_project_element_selections():
    tr = LINE.simulate((XS, SLOPE))
    lp = point_lp(tr[:, "y"], XS, SLOPE)
    close(LINE.project(tr, gf.selectall()), lp.sum())
    close(LINE.project(tr, gf.Selection.none()), 0.0)
    close(LINE.project(tr, gf.select((2, "y"))), lp[2])
    close(LINE.project(tr, gf.select(2)), lp[2])
    close(LINE.project(tr, gf.select(0, (3, "y"))), lp[0] + lp[3])
    close(LINE.project(tr, ~gf.select((1, "y"))), lp.sum() - lp[1])
    close(LINE.project(tr, gf.select((7, "y"))), 0.0)


def test_project_in_gen():
    tr = line_model.simulate((XS,))
    s = tr["slope"]
    lp = point_lp(tr["ys", :, "y"], XS, s)
    lps = normal_lp(s, 0.0, 1.0)
    close(line_model.project(tr, gf.select(("ys", 2))), lp[2])
    close(line_model.project(tr, gf.select("ys")), lp.sum())
    close(line_model.project(tr, gf.select("ys") & ~gf.select(("ys", 1, "y"))),
          lp.sum() - lp[1])
    close(line_model.project(tr, gf.select("slope", ("ys", 4, "y"))), lps + lp[4])
    close(line_model.project(tr, gf.selectall()), tr.score)


def test_project_two_choice_kernel():
    m = Map(pair)
    xs = torch.tensor([0.0, 1.0, -1.0])
    tr = m.simulate((xs,))
    a, b = tr[:, "a"], tr[:, "b"]
    la, lb = normal_lp(a, xs, 1.0), normal_lp(b, a, 2.0)
    close(m.project(tr, gf.select((1, "a"))), la[1])
    close(m.project(tr, gf.select((1, "a"), (2, "b"))), la[1] + lb[2])
    close(m.project(tr, ~gf.select((0, "b"))), la.sum() + lb[1:].sum())


# ================================================================== Map of Map
@gf.gen
def row(xrow, slope):
    """One row of a grid: a Map over its points at "inner"."""
    return Map(point, in_dims=(0, None))(xrow, slope) @ "inner"


@gf.gen
def grid_model(xgrid):
    slope = gf.normal(0.0, 1.0) @ "slope"
    return Map(row, in_dims=(0, None))(xgrid, slope) @ "outer"


XGRID = torch.arange(12.0, dtype=torch.float64).reshape(3, 4) / 6.0 - 1.0


def test_map_of_map_simulate_and_reads():
    tr = grid_model.simulate((XGRID,))
    s = tr["slope"]
    ygrid = tr["outer", :, "inner", :, "y"]
    assert ygrid.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert torch.equal(tr["outer", i, "inner", j, "y"], ygrid[i, j])
    close(tr.score, normal_lp(s, 0.0, 1.0) + point_lp(ygrid, XGRID, s).sum())
    close(tr.retval, ygrid)
    assert len(tr.choices.addresses()) == 13


def test_map_of_map_direct_addresses():
    mm = Map(Map(point, in_dims=(0, None)), in_dims=(0, None))
    tr = mm.simulate((XGRID, SLOPE))
    ygrid = tr[:, :, "y"]
    assert ygrid.shape == (3, 4)
    assert torch.equal(tr[2, 1, "y"], ygrid[2, 1])
    close(tr.score, point_lp(ygrid, XGRID, SLOPE).sum())


def test_map_of_map_generate_update_regenerate():
    ygrid = torch.linspace(-1.0, 1.0, 12).reshape(3, 4)
    cm = gf.ChoiceMap({"slope": 0.5, **{("outer", i, "inner", j, "y"): ygrid[i, j]
                                        for i in range(3) for j in range(4)}})
    tr, w = grid_model.generate((XGRID,), cm)
    hand = normal_lp(0.5, 0.0, 1.0) + point_lp(ygrid, XGRID, 0.5).sum()
    close(w, hand)
    close(tr.score, hand)
    close(grid_model.assess((XGRID,), cm)[0], hand)
    # update one inner element
    new, wu, _, discard = grid_model.update(tr, (XGRID,), (NoChange(),),
                                            gf.ChoiceMap({("outer", 1, "inner", 2, "y"): 3.0}))
    mu = 0.5 * XGRID[1, 2]
    close(wu, normal_lp(3.0, mu, 1.0) - normal_lp(ygrid[1, 2], mu, 1.0))
    close(discard["outer", 1, "inner", 2, "y"], ygrid[1, 2])
    expect = ygrid.clone()
    expect[1, 2] = 3.0
    assert torch.equal(new["outer", :, "inner", :, "y"], expect)
    # regenerate one inner element: weight 0, only it changes
    reg, wr, _ = grid_model.regenerate(tr, (XGRID,), (NoChange(),),
                                       gf.select(("outer", 2, "inner", 0, "y")))
    close(wr, 0.0)
    got = reg["outer", :, "inner", :, "y"]
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 0] = False
    assert torch.equal(got[mask], ygrid[mask]) and not torch.equal(got[2, 0], ygrid[2, 0])
    # project over a nested selection
    lp = point_lp(ygrid, XGRID, 0.5)
    close(grid_model.project(tr, gf.select(("outer", 1))), lp[1].sum())
    close(grid_model.project(tr, gf.select(("outer", 0, "inner", 3))), lp[0, 3])


# ================================================================== torch modules in the kernel
def make_mlp(d_in: int = 2) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 1)).double()


def test_mlp_kernel_parameters_and_param_gradients():
    mlp = make_mlp()

    @gf.gen
    def k(x):
        return gf.normal(mlp(x).squeeze(-1), 1.0) @ "y"

    m = Map(k)

    @gf.gen
    def model(xs):
        return m(xs) @ "ys"

    ids = {id(p) for p in mlp.parameters()}
    assert {id(p) for p in m.parameters()} == ids
    assert {id(p) for p in model.parameters()} == ids

    xs = torch.randn(7, 2)
    ys = torch.randn(7)
    tr, _ = model.generate((xs,), gf.ChoiceMap({"ys": line_choices(ys)}))

    def hand_ll() -> torch.Tensor:
        return normal_lp(ys, mlp(xs).squeeze(-1), 1.0).sum()

    for gen_fn, trace in ((model, tr), (m, tr.subtrace("ys"))):
        mlp.zero_grad(set_to_none=True)
        expect = torch.autograd.grad(hand_ll(), list(mlp.parameters()))
        gen_fn.accumulate_param_gradients(trace, scale=2.0)
        for p, g in zip(mlp.parameters(), expect):
            close(p.grad, -2.0 * g)
    # accumulation adds
    mlp.zero_grad(set_to_none=True)
    m.accumulate_param_gradients(tr.subtrace("ys"))
    m.accumulate_param_gradients(tr.subtrace("ys"))
    expect = torch.autograd.grad(hand_ll(), list(mlp.parameters()))
    for p, g in zip(mlp.parameters(), expect):
        close(p.grad, -2.0 * g)


def test_mlp_kernel_optimizer_step_ascends_log_p():
    mlp = make_mlp(1)

    @gf.gen
    def k(x):
        return gf.normal(mlp(x.unsqueeze(-1)).squeeze(-1), 0.5) @ "y"

    m = Map(k)
    xs = torch.linspace(-1, 1, 32)
    cm = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": torch.sin(3 * xs)}), 32)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    before = m.assess((xs,), cm)[0]
    for _ in range(5):
        tr, _ = m.generate((xs,), cm)
        opt.zero_grad()
        m.accumulate_param_gradients(tr)
        opt.step()
    assert m.assess((xs,), cm)[0] > before


def test_choice_gradients_mapped_and_shared_arguments():
    tr = LINE.simulate((XS, SLOPE))
    ys = tr[:, "y"]
    arg_grads, values, grads = LINE.choice_gradients(tr, gf.selectall())
    # by hand: log p = Σ -(y_i - s x_i)^2 / 2
    r = ys - SLOPE * XS
    close(arg_grads[0], r * SLOPE)                 # mapped: one gradient per element
    close(arg_grads[1], (r * XS).sum())            # shared: summed over elements
    close(values[:, "y"], ys)
    close(grads[:, "y"], -r)
    # the same by autograd
    xs_ = XS.clone().requires_grad_(True)
    s_ = SLOPE.clone().requires_grad_(True)
    y_ = ys.clone().requires_grad_(True)
    gx, gs, gy = torch.autograd.grad(point_lp(y_, xs_, s_).sum(), (xs_, s_, y_))
    close(arg_grads[0], gx)
    close(arg_grads[1], gs)
    close(grads[:, "y"], gy)


def test_choice_gradients_one_element_and_retgrad():
    tr = LINE.simulate((XS, SLOPE))
    ys = tr[:, "y"]
    r = ys - SLOPE * XS
    _, values, grads = LINE.choice_gradients(tr, gf.select((2, "y")))
    close(values[2, "y"], ys[2])
    close(grads[2, "y"], -r[2])
    assert values.addresses() == [(2, "y")]
    retgrad = torch.tensor([1.0, 0.0, 2.0, 0.0, -1.0])
    arg_grads, _, grads = LINE.choice_gradients(tr, gf.selectall(), retgrad)
    close(grads[:, "y"], -r + retgrad)            # retval = ys
    close(arg_grads[0], r * SLOPE)


def test_choice_gradients_mlp_arguments_finite_differences():
    mlp = make_mlp()

    @gf.gen
    def k(x, scale):
        return gf.normal(mlp(x).squeeze(-1), scale) @ "y"

    m = Map(k, in_dims=(0, None))
    xs = torch.randn(4, 2)
    scale = torch.tensor(0.8)
    tr = m.simulate((xs, scale))
    ys = tr[:, "y"]
    arg_grads, _, _ = m.choice_gradients(tr, None)

    def f(xs_: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return normal_lp(ys, mlp(xs_).squeeze(-1), sc).sum()

    eps = 1e-6
    fd = torch.zeros_like(xs)
    for i in range(4):
        for j in range(2):
            d = torch.zeros_like(xs)
            d[i, j] = eps
            fd[i, j] = (f(xs + d, scale) - f(xs - d, scale)) / (2 * eps)
    close(arg_grads[0], fd, atol=1e-7)
    fds = (f(xs, scale + eps) - f(xs, scale - eps)) / (2 * eps)
    close(arg_grads[1], fds, atol=1e-7)


def test_choice_gradients_in_gen_slope():
    tr = line_model.simulate((XS,))
    s = tr["slope"]
    ys = tr["ys", :, "y"]
    _, values, grads = line_model.choice_gradients(tr, gf.select("slope", ("ys", 1, "y")))
    r = ys - s * XS
    close(grads["slope"], -s + (r * XS).sum())
    close(grads["ys", 1, "y"], -r[1])


# ================================================================== vmap over particles
def test_vmap_particles_of_model_with_map():
    P = 6
    tr = torch.func.vmap(lambda _: line_model.simulate((XS,)), randomness="different")(
        torch.zeros(P))
    slopes = tr["slope"]
    assert slopes.shape == (P,)
    ys = tr["ys", :, "y"]
    assert ys.shape == (P, 5)
    el2 = tr["ys", 2, "y"]
    assert el2.shape == (P,)
    assert torch.equal(el2, ys[:, 2])
    assert torch.equal(tr.choices["ys", 2, "y"], ys[:, 2])
    hand = normal_lp(slopes, 0.0, 1.0) + point_lp(ys, XS, slopes.unsqueeze(-1)).sum(-1)
    close(tr.score, hand)
    assert len(set(slopes.tolist())) == P  # different randomness per particle


def test_vmap_particles_generate_and_update():
    P = 4
    slopes = torch.tensor([0.1, -0.5, 1.0, 2.0])
    ys = torch.linspace(-1.0, 1.0, 5)

    def gen_one(s: torch.Tensor) -> Any:
        cm = gf.ChoiceMap({"slope": s, "ys": gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys}), 5)})
        return line_model.generate((XS,), cm)

    tr, w = torch.func.vmap(gen_one, randomness="different")(slopes)
    hand = normal_lp(slopes, 0.0, 1.0) + point_lp(ys, XS, slopes.unsqueeze(-1)).sum(-1)
    close(w, hand)
    close(tr.score, hand)
    assert tr["ys", 3, "y"].shape == (P,)

    def upd(t: Any) -> Any:
        return line_model.update(t, (XS,), (NoChange(),), gf.ChoiceMap({("ys", 3, "y"): 9.0}))

    new, wu, _, _ = torch.func.vmap(upd, randomness="different")(tr)
    close(wu, normal_lp(9.0, slopes * XS[3], 1.0) - normal_lp(ys[3], slopes * XS[3], 1.0))
    close(new["ys", 3, "y"], torch.full((P,), 9.0))


# ================================================================== batched vs per-element loop
def _loop_generate(kernel: gf.GenerativeFunction, xs: torch.Tensor, slope: Any,
                   ys: torch.Tensor) -> torch.Tensor:
    return sum(kernel.generate((xs[i], slope), gf.ChoiceMap({"y": ys[i]}))[1]
               for i in range(len(xs)))


def test_batched_paths_equal_per_element_loop():
    ys = torch.tensor([0.3, -1.1, 0.8, 2.5, -0.2])
    cm = line_choices(ys)
    loop = _loop_generate(point, XS, SLOPE, ys)
    for m in (LINE, Map(point, in_dims=(0, None), vectorize=False)):
        tr, w = m.generate((XS, SLOPE), cm)
        close(w, loop)
        close(m.assess((XS, SLOPE), cm)[0], loop)
        # update with constraints on elements 1 and 3
        cm2 = gf.ChoiceMap({(1, "y"): 0.0, (3, "y"): 1.0})
        _, wu, _, _ = m.update(tr, (XS, SLOPE), (NoChange(), NoChange()), cm2)
        loop_u = torch.zeros(())
        for i in (1, 3):
            ktr, _ = point.generate((XS[i], SLOPE), gf.ChoiceMap({"y": ys[i]}))
            loop_u = loop_u + point.update(ktr, (XS[i], SLOPE), (NoChange(), NoChange()),
                                           gf.ChoiceMap({"y": cm2[i, "y"]}))[1]
        close(wu, loop_u)
        # update with a shared-argument change: every element's kernel update
        s1 = torch.tensor(-1.5)
        _, wa, _, _ = m.update(tr, (XS, s1), (NoChange(), UnknownChange()))
        loop_a = torch.zeros(())
        for i in range(5):
            ktr, _ = point.generate((XS[i], SLOPE), gf.ChoiceMap({"y": ys[i]}))
            loop_a = loop_a + point.update(ktr, (XS[i], s1), (NoChange(), UnknownChange()))[1]
        close(wa, loop_a)
        # project
        for sel in (gf.select((2, "y")), gf.select(0, 4), ~gf.select((1, "y"))):
            loop_p = torch.zeros(())
            for i in range(5):
                ktr, _ = point.generate((XS[i], SLOPE), gf.ChoiceMap({"y": ys[i]}))
                loop_p = loop_p + point.project(ktr, sel.get_subselection(i))
            close(m.project(tr, sel), loop_p)


def test_unvectorized_equals_vectorized_mlp_kernel():
    mlp = make_mlp()

    @gf.gen
    def k(x):
        return gf.normal(mlp(x).squeeze(-1), 1.0) @ "y"

    xs = torch.randn(6, 2)
    ys = torch.randn(6)
    cm = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys}), 6)
    a, b = Map(k), Map(k, vectorize=False)
    ta, wa = a.generate((xs,), cm)
    tb, wb = b.generate((xs,), cm)
    close(wa, wb)
    close(ta.element_scores, tb.element_scores)
    close(a.assess((xs,), cm)[0], b.assess((xs,), cm)[0])
    sel = gf.select((3, "y"), (5, "y"))
    close(a.project(ta, sel), b.project(tb, sel))
    xs2 = xs.clone()
    xs2[4] = 0.0
    ua = a.update(ta, (xs2,), (VectorDiff(6, 6, {4}),))
    ub = b.update(tb, (xs2,), (VectorDiff(6, 6, {4}),))
    close(ua[1], ub[1])
    close(ua[0].score, ub[0].score)


# ================================================================== kernels that cannot be vmapped
@gf.gen
def branching(x):
    """Data-dependent Python control flow: cannot run under vmap.  (The scales are tensors so
    that both branches leave traces of one structure, which vectorize=False can stack.)"""
    if x > 0:
        return gf.normal(x, torch.ones_like(x)) @ "y"
    return gf.normal(-x, 2.0 * torch.ones_like(x)) @ "y"


@gf.gen
def itemizing(x):
    """Calls .item(): cannot run under vmap."""
    return gf.normal(torch.as_tensor(x.item()), 1.0) @ "y"


def branching_lp(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    return torch.where(xs > 0, normal_lp(ys, xs, 1.0), normal_lp(ys, -xs, 2.0))


def test_unvmappable_kernel_raises_vmap_error():
    with pytest.raises(VmapError, match="control flow") as info:
        Map(branching).simulate((XS,))
    assert "vectorize=False" in str(info.value)
    with pytest.raises(VmapError, match=r"item\(\)"):
        Map(itemizing).simulate((XS,))
    with pytest.raises(VmapError, match="control flow"):
        Map(branching).generate((XS,), line_choices(XS))


def test_unvmappable_kernel_inside_gen_raises_vmap_error():
    @gf.gen
    def model(xs):
        return Map(branching)(xs) @ "ys"

    with pytest.raises(VmapError, match="control flow"):
        model.simulate((XS,))


def test_vectorize_false_fallback():
    m = Map(branching, vectorize=False)
    tr = m.simulate((XS,))
    ys = tr[:, "y"]
    close(tr.score, branching_lp(ys, XS).sum())
    yc = torch.tensor([0.3, -1.1, 0.8, 2.5, -0.2])
    cm = line_choices(yc)
    tr2, w = m.generate((XS,), cm)
    close(w, branching_lp(yc, XS).sum())
    close(tr2.score, w)
    close(m.assess((XS,), cm)[0], w)
    close(m.project(tr2, gf.select((1, "y"))), branching_lp(yc, XS)[1])
    xs2 = XS.clone()
    xs2[1] = 1.0  # element 1 changes branch
    new, wu, _, _ = m.update(tr2, (xs2,), (VectorDiff(5, 5, {1}),))
    close(wu, branching_lp(yc[1], xs2[1]) - branching_lp(yc[1], XS[1]))
    m2 = Map(itemizing, vectorize=False)
    tr3, w3 = m2.generate((XS,), cm)
    close(w3, normal_lp(yc, XS, 1.0).sum())
    reg, wr, _ = m.regenerate(tr2, (XS,), (NoChange(),), gf.select((0, "y")))
    close(wr, 0.0)
    assert torch.equal(reg[:, "y"][1:], yc[1:])


def test_vectorize_false_elements_of_different_structure_are_refused():
    @gf.gen
    def k(x):
        if x > 0:
            return gf.normal(x, 1.0) @ "y"  # the Python float scales differ per branch:
        return gf.normal(x, 2.0) @ "y"      # a stacked trace cannot hold both

    with pytest.raises(ArgumentError, match="element 1"):
        Map(k, vectorize=False).simulate((torch.tensor([1.0, -1.0]),))


# ================================================================== bad input
def test_unequal_mapped_lengths_names_both_arguments():
    m = Map(gf.gen(lambda x, z: gf.normal(x + z, 1.0) @ "y"))
    with pytest.raises(ArgumentError, match="argument 0.*3.*argument 1.*4"):
        m.simulate((torch.zeros(3), torch.zeros(4)))
    with pytest.raises(ArgumentError, match="argument 0.*argument 1"):
        m.generate((torch.zeros(3), torch.zeros(4)), gf.ChoiceMap({(0, "y"): 1.0}))


def test_constraint_beyond_length_is_unvisited():
    with pytest.raises(UnvisitedConstraintError) as info:
        LINE.generate((XS, SLOPE), gf.ChoiceMap({(5, "y"): 1.0}))
    assert info.value.address == (5, "y")
    assert "(5, 'y')" in str(info.value)
    with pytest.raises(UnvisitedConstraintError) as info:
        line_model.generate((XS,), gf.ChoiceMap({("ys", 7, "y"): 1.0}))
    assert info.value.address == ("ys", 7, "y")
    tr = LINE.simulate((XS, SLOPE))
    snap = snapshot(tr)
    with pytest.raises(UnvisitedConstraintError) as info:
        LINE.update(tr, (XS[:3], SLOPE), (VectorDiff(3, 5, ()), NoChange()),
                    gf.ChoiceMap({(4, "y"): 1.0}))
    assert info.value.address == (4, "y")
    with pytest.raises(UnvisitedConstraintError):
        LINE.generate((XS, SLOPE), gf.ChoiceMap({"y": 1.0}))
    assert_unchanged(tr, snap)


def test_constraint_at_unknown_inner_address_names_the_element():
    with pytest.raises(UnvisitedConstraintError) as info:
        LINE.generate((XS, SLOPE), gf.ChoiceMap({(1, "z"): 1.0}))
    assert info.value.address == (1, "z")
    tr = LINE.simulate((XS, SLOPE))
    with pytest.raises(UnvisitedConstraintError) as info:
        LINE.update(tr, (XS, SLOPE), (NoChange(), NoChange()),
                    gf.ChoiceMap({(3, "y"): 0.0, (3, "z"): 1.0}))
    assert info.value.address == (3, "z")
    with pytest.raises(UnvisitedConstraintError) as info:  # on a new element while growing
        LINE.update(LINE.simulate((XS[:2], SLOPE)), (XS, SLOPE),
                    (VectorDiff(5, 2, ()), NoChange()), gf.ChoiceMap({(4, "z"): 1.0}))
    assert info.value.address == (4, "z")
    with pytest.raises(UnvisitedConstraintError) as info:
        line_model.generate((XS,), gf.ChoiceMap({("ys", 2, "z"): 1.0}))
    assert info.value.address == ("ys", 2, "z")


def test_map_over_a_distribution():
    m = Map(gf.normal, in_dims=(0, None))
    mus = torch.tensor([0.0, 1.0, 2.0])
    tr = m.simulate((mus, 1.0))
    ys = tr[:]
    assert tr.choices.addresses() == [(0,), (1,), (2,)]
    assert torch.equal(tr[1], ys[1])
    close(tr.score, normal_lp(ys, mus, 1.0).sum())
    _, w = m.generate((mus, 1.0), gf.ChoiceMap({0: 1.0, 2: 3.0}))
    close(w, normal_lp(1.0, 0.0, 1.0) + normal_lp(3.0, 2.0, 1.0))
    full = gf.ChoiceMap({0: 1.0, 1: 0.0, 2: 3.0})
    close(m.assess((mus, 1.0), full)[0], normal_lp(torch.tensor([1.0, 0.0, 3.0]), mus, 1.0).sum())
    with pytest.raises(MissingChoiceError) as info:
        m.assess((mus, 1.0), gf.ChoiceMap({0: 1.0, 2: 3.0}))
    assert info.value.address == (1,)
    with pytest.raises(UnvisitedConstraintError) as info:
        m.generate((mus, 1.0), gf.ChoiceMap({(0, "x"): 1.0}))
    assert info.value.address == (0, "x")
    new, wu, _, discard = m.update(tr, (mus, 1.0), (NoChange(), NoChange()), gf.ChoiceMap({1: 5.0}))
    close(wu, normal_lp(5.0, 1.0, 1.0) - normal_lp(ys[1], 1.0, 1.0))
    close(discard[1], ys[1])
    close(m.project(tr, gf.select(1)), normal_lp(ys[1], 1.0, 1.0))


def test_pytree_return_values_and_python_number_arguments():
    @gf.gen
    def k(x, n, s):
        a = gf.normal(x * n, s) @ "a"
        return {"a": a, "pair": (2 * a, x)}

    xs = torch.tensor([0.0, 1.0, 2.0])
    for vectorize in (True, False):
        m = Map(k, in_dims=(0, None, None), vectorize=vectorize)
        a = torch.tensor([0.1, 0.2, 0.3])
        tr, w = m.generate((xs, 3, 0.5), gf.ChoiceMap({(i, "a"): a[i] for i in range(3)}))
        close(w, normal_lp(a, 3 * xs, 0.5).sum())
        close(tr.retval["a"], a)
        close(tr.retval["pair"][0], 2 * a)
        close(tr.retval["pair"][1], xs)


def test_discrete_kernel_project_and_gradients():
    @gf.gen
    def kc(p):
        return gf.categorical(p) @ "c"

    m = Map(kc)
    ps = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
    tr = m.simulate((ps,))
    c = tr[:, "c"]
    lp = torch.log(ps[torch.arange(3), c])
    close(tr.score, lp.sum())
    close(m.project(tr, gf.select((2, "c"))), lp[2])
    with pytest.raises(TypeError, match="discrete"):
        m.choice_gradients(tr, gf.select((0, "c")))
    (g,) = m.choice_gradients(tr, None)[0]
    # categorical normalises its probabilities: d/dp_j log(p_c / Σp) = [j = c] / p_c − 1 / Σp
    expect = -torch.ones_like(ps) / ps.sum(-1, keepdim=True)
    expect[torch.arange(3), c] += 1.0 / ps[torch.arange(3), c]
    close(g, expect)


def test_assess_missing_element_names_address():
    ys = torch.tensor([0.1, -0.4, 1.7, 0.0, 2.2])
    cm = gf.ChoiceMap({(i, "y"): ys[i] for i in (0, 1, 3, 4)})
    with pytest.raises(MissingChoiceError) as info:
        LINE.assess((XS, SLOPE), cm)
    assert info.value.address == (2, "y")
    assert "(2, 'y')" in str(info.value)
    with pytest.raises(MissingChoiceError) as info:
        line_model.assess((XS,), gf.ChoiceMap({"slope": 0.1, "ys": cm}))
    assert info.value.address == ("ys", 2, "y")
    # one address missing in one element of a two-choice kernel
    m = Map(pair)
    cm2 = gf.ChoiceMap({(0, "a"): 0.0, (0, "b"): 0.0, (1, "a"): 0.0})
    with pytest.raises(MissingChoiceError) as info:
        m.assess((torch.zeros(2),), cm2)
    assert info.value.address == (1, "b")
    with pytest.raises(MissingChoiceError):
        LINE.assess((XS, SLOPE), gf.ChoiceMap.empty())


def test_old_traces_never_mutated_across_methods():
    tr = line_model.simulate((XS,))
    snap = snapshot(tr)
    xs2 = XS.clone()
    xs2[0] = 5.0
    line_model.update(tr, (xs2,), (UnknownChange(),), gf.ChoiceMap({("ys", 1, "y"): 0.0}))
    line_model.update(tr, (XS[:2],), (UnknownChange(),))
    line_model.update(tr, (torch.cat([XS, XS]),), (UnknownChange(),))
    line_model.regenerate(tr, (XS,), (NoChange(),), gf.select("slope", ("ys", 3)))
    line_model.project(tr, gf.select(("ys", 2)))
    line_model.choice_gradients(tr, gf.selectall())
    assert_unchanged(tr, snap)
    mt = LINE.simulate((XS, SLOPE))
    msnap = snapshot(mt)
    LINE.update(mt, (XS, SLOPE), (NoChange(), NoChange()), gf.ChoiceMap({(0, "y"): 1.0}))
    LINE.regenerate(mt, (XS, SLOPE), (NoChange(), NoChange()), gf.select((0, "y")))
    LINE.update(mt, (XS[:2], SLOPE), (VectorDiff(2, 5, ()), NoChange()))
    assert_unchanged(mt, msnap)


def test_map_structural_equality_and_bad_kernel():
    assert Map(point, in_dims=(0, None)) == LINE
    assert hash(Map(point, in_dims=(0, None))) == hash(LINE)
    assert Map(point) != LINE
    assert Map(point, in_dims=(0, None), vectorize=False) != LINE
    with pytest.raises(TypeError):
        Map(lambda x: x)  # type: ignore[arg-type]


def test_scipy_cross_check_of_hand_density():
    # the hand-written density used throughout agrees with scipy
    y, mu, s = 0.37, -1.2, 0.6
    assert abs(float(normal_lp(y, mu, s)) - stats.norm.logpdf(y, mu, s)) < 1e-12


# ================================================================== more shapes and mixed updates
def test_zero_elements():
    xs0 = torch.zeros(0)
    tr = LINE.simulate((xs0, SLOPE))
    close(tr.score, 0.0)
    assert tr.retval.shape == (0,) and tr.choices.is_empty() and tr.length == 0
    tr2, w = LINE.generate((xs0, SLOPE), gf.ChoiceMap.empty())
    close(w, 0.0)
    aw, aret = LINE.assess((xs0, SLOPE), gf.ChoiceMap.empty())
    close(aw, 0.0)
    assert aret.shape == (0,)
    with pytest.raises(UnvisitedConstraintError):
        LINE.generate((xs0, SLOPE), gf.ChoiceMap({(0, "y"): 1.0}))
    # grow from nothing, shrink to nothing
    grown, wg, _, _ = LINE.update(tr, (XS, SLOPE), (VectorDiff(5, 0, ()), NoChange()),
                                  gf.ChoiceMap({(1, "y"): 2.0}))
    close(wg, normal_lp(2.0, SLOPE * XS[1], 1.0))
    close(grown.score, point_lp(grown[:, "y"], XS, SLOPE).sum())
    empty, ws, _, discard = LINE.update(grown, (xs0, SLOPE), (VectorDiff(0, 5, ()), NoChange()))
    close(ws, -grown.score)
    assert empty.length == 0 and empty.choices.is_empty()
    assert sorted(discard.addresses()) == [(i, "y") for i in range(5)]
    assert Map(point, in_dims=(0, None), vectorize=False).simulate((xs0, SLOPE)).length == 0


def test_in_dims_one_and_pytree_arguments():
    @gf.gen
    def k(x):
        return gf.normal(x[0] * x[1], 1.0) @ "y"

    xs = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])  # elements along dim 1
    m = Map(k, in_dims=1)
    ys = torch.tensor([0.1, 0.2, 0.3])
    tr, w = m.generate((xs,), line_choices(ys))
    close(w, normal_lp(ys, xs[0] * xs[1], 1.0).sum())
    xs2 = xs.clone()
    xs2[:, 2] = torch.tensor([1.0, 1.0])
    _, wu, _, _ = m.update(tr, (xs2,), (VectorDiff(3, 3, {2}),))
    close(wu, normal_lp(0.3, 1.0, 1.0) - normal_lp(0.3, 6.0, 1.0))

    @gf.gen
    def kd(p, shift):
        return gf.normal(p["a"] + p["b"] + shift, 1.0) @ "y"

    md = Map(kd, in_dims=(0, None))
    p = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 20.0])}
    trd, wd = md.generate((p, torch.tensor(0.5)), line_choices(torch.tensor([11.0, 22.0])))
    close(wd, normal_lp(torch.tensor([11.0, 22.0]), torch.tensor([11.5, 22.5]), 1.0).sum())
    with pytest.raises(ArgumentError, match="unequal lengths"):
        md.simulate(({"a": torch.zeros(2), "b": torch.zeros(3)}, torch.tensor(0.0)))


def test_update_mixed_grow_changed_and_constrained():
    xs4 = XS[:4]
    tr = LINE.simulate((xs4, SLOPE))
    snap = snapshot(tr)
    ys = tr[:, "y"].clone()
    xs6 = torch.cat([xs4, torch.tensor([1.5, -2.0])])
    xs6[1] = 4.0
    cm = gf.ChoiceMap({(2, "y"): 0.25, (5, "y"): -0.5})
    new, w, retdiff, discard = LINE.update(tr, (xs6, SLOPE), (VectorDiff(6, 4, {1}), NoChange()),
                                           cm)
    y6 = new[:, "y"]
    assert torch.equal(y6[[0, 1, 3]], ys[[0, 1, 3]])
    close(y6[2], 0.25)
    close(y6[5], -0.5)
    hand = (point_lp(ys[1], 4.0, SLOPE) - point_lp(ys[1], XS[1], SLOPE)
            + point_lp(0.25, XS[2], SLOPE) - point_lp(ys[2], XS[2], SLOPE)
            + point_lp(-0.5, -2.0, SLOPE))
    close(w, hand)
    close(new.score, point_lp(y6, xs6, SLOPE).sum())
    assert discard.addresses() == [(2, "y")]
    close(discard[2, "y"], ys[2])
    assert retdiff == VectorDiff(6, 4, {1, 2})
    assert_unchanged(tr, snap)


def test_update_shrink_with_constraint_merges_discards():
    tr = LINE.simulate((XS, SLOPE))
    ys = tr[:, "y"].clone()
    new, w, _, discard = LINE.update(tr, (XS[:3], SLOPE), (VectorDiff(3, 5, ()), NoChange()),
                                     gf.ChoiceMap({(0, "y"): 1.0}))
    close(w, point_lp(1.0, XS[0], SLOPE) - point_lp(ys[0], XS[0], SLOPE)
          - point_lp(ys[3:], XS[3:], SLOPE).sum())
    assert sorted(discard.addresses()) == [(0, "y"), (3, "y"), (4, "y")]
    for i in (0, 3, 4):
        close(discard[i, "y"], ys[i])
    back, wb, _, _ = LINE.update(new, (XS, SLOPE), (VectorDiff(5, 3, ()), NoChange()), discard)
    close(wb, -w)
    assert torch.equal(back[:, "y"], ys)


def test_map_of_map_direct_selections():
    mm = Map(Map(point, in_dims=(0, None)), in_dims=(0, None))
    tr = mm.simulate((XGRID, SLOPE))
    yg = tr[:, :, "y"].clone()
    lp = point_lp(yg, XGRID, SLOPE)
    close(mm.project(tr, gf.select((2, 1, "y"))), lp[2, 1])
    close(mm.project(tr, gf.select((0, 3), 1)), lp[0, 3] + lp[1].sum())
    close(mm.project(tr, ~gf.select((1, 2, "y"))), lp.sum() - lp[1, 2])
    new, w, _ = mm.regenerate(tr, (XGRID, SLOPE), (NoChange(), NoChange()),
                              gf.select((2, 1, "y"), (0, 0)))
    close(w, 0.0)
    got = new[:, :, "y"]
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[2, 1] = keep[0, 0] = False
    assert torch.equal(got[keep], yg[keep])
    assert not torch.isin(got[~keep], yg).any()
    # a shared-slope change with one inner element regenerated
    s1 = torch.tensor(-0.3)
    new2, w2, _ = mm.regenerate(tr, (XGRID, s1), (NoChange(), UnknownChange()),
                                gf.select((1, 1, "y")))
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[1, 1] = False
    close(w2, (point_lp(yg, XGRID, s1) - point_lp(yg, XGRID, SLOPE))[keep].sum())


def test_vmap_particles_project_and_regenerate_elements():
    P = 5

    def run(_: torch.Tensor) -> Any:
        tr = line_model.simulate((XS,))
        proj = line_model.project(tr, gf.select(("ys", 2), "slope"))
        new, w, _ = line_model.regenerate(tr, (XS,), (NoChange(),), gf.select(("ys", 3)))
        return tr, proj, new, w

    tr, proj, new, w = torch.func.vmap(run, randomness="different")(torch.zeros(P))
    s = tr["slope"]
    close(proj, normal_lp(s, 0.0, 1.0) + point_lp(tr["ys", 2, "y"], XS[2], s))
    close(w, torch.zeros(P))
    ys, ys2 = tr["ys", :, "y"], new["ys", :, "y"]
    keep = [0, 1, 2, 4]
    assert torch.equal(ys2[:, keep], ys[:, keep])
    assert not torch.isin(ys2[:, 3], ys).any()


def test_batched_trace_choices_filter_outside_vmap():
    P = 3
    tr = torch.func.vmap(lambda _: line_model.simulate((XS,)), randomness="different")(
        torch.zeros(P))
    sub = tr.choices.filter(gf.select(("ys", 1, "y"), ("ys", 4)))
    assert sorted(map(str, sub.addresses())) == sorted(map(str, [("ys", 1, "y"), ("ys", 4, "y")]))
    assert torch.equal(sub["ys", 4, "y"], tr["ys", 4, "y"])


def _stacked_ys(ys: torch.Tensor) -> gf.ChoiceMap:
    return gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys}), len(ys))


def test_update_with_dense_stacked_constraints_on_every_element():
    tr = LINE.simulate((XS, SLOPE))
    snap = snapshot(tr)
    old = tr[:, "y"].clone()
    ys = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    new, w, retdiff, discard = LINE.update(tr, (XS, SLOPE), (NoChange(), NoChange()),
                                           _stacked_ys(ys))
    assert torch.equal(new[:, "y"], ys)
    close(w, point_lp(ys, XS, SLOPE).sum() - point_lp(old, XS, SLOPE).sum())
    assert sorted(discard.addresses()) == [(i, "y") for i in range(5)]
    assert torch.equal(discard[:, "y"], old)
    assert isinstance(retdiff, UnknownChange)  # every element may have changed
    back, wb, _, _ = LINE.update(new, (XS, SLOPE), (NoChange(), NoChange()), discard)
    close(wb, -w)
    assert torch.equal(back[:, "y"], old)
    assert_unchanged(tr, snap)


def test_update_grow_and_shrink_with_dense_stacked_constraints():
    ys = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    tr3 = LINE.simulate((XS[:3], SLOPE))
    old3 = tr3[:, "y"].clone()
    new, w, _, discard = LINE.update(tr3, (XS, SLOPE), (VectorDiff(5, 3, ()), NoChange()),
                                     _stacked_ys(ys))
    assert torch.equal(new[:, "y"], ys)
    close(w, point_lp(ys, XS, SLOPE).sum() - point_lp(old3, XS[:3], SLOPE).sum())
    assert torch.equal(discard[:, "y"], old3)
    tr5 = LINE.simulate((XS, SLOPE))
    old5 = tr5[:, "y"].clone()
    small, w2, _, discard2 = LINE.update(tr5, (XS[:3], SLOPE),
                                         (VectorDiff(3, 5, ()), NoChange()), _stacked_ys(ys[:3]))
    assert torch.equal(small[:, "y"], ys[:3])
    close(w2, point_lp(ys[:3], XS[:3], SLOPE).sum() - point_lp(old5, XS, SLOPE).sum())
    assert sorted(discard2.addresses()) == [(i, "y") for i in range(5)]
    for i in range(5):
        close(discard2[i, "y"], old5[i])


def test_regenerate_selectall_with_shrink_and_shared_change():
    tr = LINE.simulate((XS, SLOPE))
    new, w, retdiff = LINE.regenerate(tr, (XS[:4], torch.tensor(2.0)),
                                      (VectorDiff(4, 5, ()), UnknownChange()), gf.selectall())
    close(w, 0.0)  # every retained choice is selected
    assert new.length == 4
    assert not torch.isin(new[:, "y"], tr[:, "y"]).any()
    close(new.score, point_lp(new[:, "y"], XS[:4], 2.0).sum())
    assert isinstance(retdiff, UnknownChange)


def test_grow_inside_gen_with_vectordiff_argdiff(monkeypatch):
    tr = line_model.simulate((XS,))
    ys = tr["ys", :, "y"].clone()
    xs7 = torch.cat([XS, torch.tensor([1.0, -1.0])])
    rec = _Recorder(monkeypatch)
    new, w, _, discard = line_model.update(tr, (xs7,), (VectorDiff(7, 5, ()),),
                                           gf.ChoiceMap({("ys", 6, "y"): 0.5}))
    assert rec.lengths == [2]  # the @gen passed the VectorDiff on: only the new elements ran
    assert torch.equal(new["ys", :, "y"][:5], ys)
    s = tr["slope"]
    close(w, normal_lp(0.5, -s, 1.0))
    close(new.score, tr.score + point_lp(new["ys", 5, "y"], 1.0, s) + normal_lp(0.5, -s, 1.0))
    assert discard.is_empty()


def test_unvectorized_simulate_equals_per_element_loop_under_one_seed():
    @gf.gen
    def k(x):
        a = gf.normal(x, 1.0) @ "a"
        return gf.normal(a, 0.5) @ "b"

    m = Map(k, vectorize=False)
    torch.manual_seed(7)
    tr = m.simulate((XS,))
    torch.manual_seed(7)
    loop = [k.simulate((XS[i],)) for i in range(5)]
    assert torch.equal(tr[:, "a"], torch.stack([t["a"] for t in loop]))
    assert torch.equal(tr[:, "b"], torch.stack([t["b"] for t in loop]))
    close(tr.score, sum(t.score for t in loop))
    # regenerate a of elements 1 and 3: per element, the kernel's own regenerate weight
    new, w, _ = m.regenerate(tr, (XS,), (NoChange(),), gf.select((1, "a"), (3, "a")))
    a0, a1, b = tr[:, "a"], new[:, "a"], tr[:, "b"]
    assert torch.equal(new[:, "b"], b)
    assert torch.equal(a1[[0, 2, 4]], a0[[0, 2, 4]])
    loop_w = 0.0
    for i in (1, 3):  # the same move made per element by the kernel, from the loop's traces
        t2, wi, _, _ = k.update(loop[i], (XS[i],), (NoChange(),), gf.ChoiceMap({"a": a1[i]}))
        loop_w = loop_w + (wi - (normal_lp(a1[i], XS[i], 1.0) - normal_lp(a0[i], XS[i], 1.0)))
    close(w, loop_w)
    close(w, (normal_lp(b, a1, 0.5) - normal_lp(b, a0, 0.5))[[1, 3]].sum())


def test_constant_and_non_tensor_return_values():
    @gf.gen
    def k(x):
        gf.normal(x, 1.0) @ "y"
        return torch.tensor(3.0), 2.5, None

    for vectorize in (True, False):
        tr = Map(k, vectorize=vectorize).simulate((XS,))
        const, num, nothing = tr.retval
        assert torch.equal(const, torch.full((5,), 3.0))  # an unbatched tensor is broadcast
        assert num == 2.5 and nothing is None             # non-tensors pass through as they are


# ------------------------------------------------------- regressions: masked choice-map algebra
def test_merge_of_masked_values_is_elementwise_and_vmap_safe():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([10.0, 20.0, 30.0, 40.0])
    ma = torch.tensor([True, False, True, False])
    mb = torch.tensor([False, True, False, False])
    merged = gf.ChoiceMap.value(a, ma).merge(gf.ChoiceMap.value(b, mb))
    close(merged.get_value()[:3], torch.tensor([1.0, 20.0, 3.0]))
    assert merged.mask.tolist() == [True, True, True, False]

    def f(x, y, fx, fy):
        cm = gf.ChoiceMap({"x": gf.ChoiceMap.value(x, fx)}).merge(
            gf.ChoiceMap({"x": gf.ChoiceMap.value(y, fy)}))
        sub = cm.get_submap("x")
        return sub.get_value(), sub.mask

    v, m = torch.func.vmap(f)(a, b, ma, mb)
    close(v[:3], torch.tensor([1.0, 20.0, 3.0]))
    assert m.tolist() == [True, True, True, False]
    # an overlap visible only in the values: no crash under vmap (a's value wins) ...
    both = torch.tensor([True, True, False, False])
    v, m = torch.func.vmap(f)(a, b, both, both)
    close(v[:2], a[:2])
    # ... and still an error outside vmap
    with pytest.raises(gf.ChoiceMapMergeError):
        gf.ChoiceMap.value(a, both).merge(gf.ChoiceMap.value(b, both))
    with pytest.raises(gf.ChoiceMapMergeError):
        gf.ChoiceMap.value(a).merge(gf.ChoiceMap.value(b, mb))
    # a masked value whose mask is all False overlaps nothing
    merged = gf.ChoiceMap.value(a).merge(gf.ChoiceMap.value(b, torch.zeros(4, dtype=torch.bool)))
    close(merged.get_value(), a)
    assert merged.mask is None


def test_filter_by_complement_of_mask_selection_honours_element_flags():
    from gfcomb.core.selection import MaskSelection

    ys = torch.tensor([0.5, 1.5, 2.5])
    zs = torch.tensor([-1.0, -2.0, -3.0])
    cm = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys, "z": zs}), 3)
    flags = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": torch.tensor([True, False, True])}), 3)
    sel = MaskSelection(flags)
    assert set(cm.filter(sel).addresses()) == {(0, "y"), (2, "y")}
    comp = set(cm.filter(~sel).addresses())
    assert comp == {(1, "y"), (0, "z"), (1, "z"), (2, "z")}
    assert set(cm.filter(~~sel).addresses()) == {(0, "y"), (2, "y")}
    both = sel | gf.select((1, "z"))
    assert set(cm.filter(both).addresses()) == {(0, "y"), (2, "y"), (1, "z")}
    assert set(cm.filter(~sel & gf.select(1)).addresses()) == {(1, "y"), (1, "z")}
    # Map.project / regenerate with the complement of a per-element mask selection
    m = Map(normal_kernel_for_masks)
    tr, _ = m.generate((torch.zeros(3),), cm)
    close(m.project(tr, ~sel), normal_lp(ys[1], 0.0, 1.0) + normal_lp(zs, 0.0, 2.0).sum())
    new, w, _ = m.regenerate(tr, (torch.zeros(3),), (NoChange(),), ~sel)
    close(new[0, "y"], ys[0])
    close(new[2, "y"], ys[2])
    assert not torch.equal(new[:, "z"], zs)
    close(w, 0.0)


@gf.gen
def normal_kernel_for_masks(x):
    gf.normal(x, 1.0) @ "y"
    return gf.normal(x, 2.0) @ "z"


# ------------------------------------------ what crosses the vmap boundary (core.vmap)
def test_batched_call_round_trips_records_statics_and_shared_tensors():
    import collections

    from gfcomb.core.vmap import batched_call

    Pair = collections.namedtuple("Pair", "a b")
    kern = normal_kernel_for_masks

    def fn(x, tr):
        y = 2.0 * x
        # y held twice (it leaves vmap once), Python statics, a namedtuple, a record
        return {"t": tr, "n": (1, None, "s", [y, Pair(y, 2.5)]), "y": y, "c": tr.choices}

    xs = torch.arange(3.0)
    inner = Map(kern).simulate((xs,)).inner
    out = batched_call(fn, (0, 0), vectorize=True, length=3, who="test")(xs, inner)
    close(out["y"], 2.0 * xs)
    assert out["n"][:3] == (1, None, "s") and isinstance(out["n"][3][1], Pair)
    assert out["n"][3][1].b == 2.5
    close(out["n"][3][0], 2.0 * xs)
    close(out["n"][3][1].a, 2.0 * xs)
    assert type(out["t"]) is type(inner)
    close(out["t"].score, inner.score)
    close(out["t"].choices["y"], inner.choices["y"])
    close(out["c"]["z"], inner.choices["z"])
    # same output through the element-by-element fallback
    loop = batched_call(fn, (0, 0), vectorize=False, length=3, who="test")(xs, inner)
    close(loop["y"], out["y"])
    close(loop["t"].score, out["t"].score)


def test_vmap_rows_outputs_inputs_and_unbatched_tensors():
    """Outputs that are mapped inputs come back as those inputs; plain (unbatched) tensors as
    expanded rows, like torch.func.vmap gives; nested levels and grad still work."""
    from gfcomb.core.vmap import vmap_rows

    xs = torch.arange(4.0, dtype=torch.float64)
    c = torch.tensor(3.0, dtype=torch.float64)
    out = vmap_rows(lambda x: (x, c, x * c), (0,), (xs,), 4)
    assert out[0] is xs
    assert out[1].shape == (4,) and out[1].stride(0) == 0
    close(out[1], c.expand(4))
    close(out[2], xs * 3.0)
    # nested: the inner call's unbatched output is batched at the outer level
    grid = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    nested = torch.func.vmap(lambda row: vmap_rows(lambda x: (row.sum(), x + 1.0), (0,),
                                                    (row,), 3))(grid)
    close(nested[0], grid.sum(1, keepdim=True).expand(2, 3))
    close(nested[1], grid + 1.0)
    # under grad: outputs that require grad are not cached views
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    y = vmap_rows(lambda x: (w, x * w), (0,), (xs,), 4)
    torch.autograd.grad((y[0] * y[1]).sum(), w)



def test_an_element_switching_branch_keeps_the_stacked_switch_layout():
    """Repeat of a Switch node: editing one element's index runs that element's Switch on
    one branch, the stacked others on every branch (they ran under vmap); the two are
    harmonized before the element is put back (this raised 'trees have different
    structures')."""
    from gfcomb.testing import strategies

    pool = dict(strategies._kernel_pool())
    switch = strategies.switch_node([("k_normal", pool["k_normal"]), ("k_det", pool["k_det"])])
    _, model = strategies.repeat_node(strategies.dimap_node(switch), 3)
    torch.manual_seed(0)
    tr = model.simulate((torch.tensor(0.0),))
    addr = ("rep3", 2, "dimap", "i2")
    for _ in range(2):  # both ways: onto the branch without choices and back
        new, w, _, discard = tr.update({addr: 1 - tr[addr]})
        assert int(new[addr]) == 1 - int(tr[addr])
        fresh = 0.0 if int(new[addr]) == 1 else float(
            normal_lp(new["rep3", 2, "dimap", "switch2", "z"], 0.5 * 0.0 - 0.25, 1.0))
        close(w, new.score - tr.score - fresh)
        close(new.score, model.assess((torch.tensor(0.0),), new.choices)[0])
        tr = new


def test_an_absent_branch_value_in_a_discard_constrains_nothing():
    """The discard of a Repeat-of-Switch element holds the branch it did not take as a value
    masked out; updating with that discard (the round trip) must not call it a constraint
    that no branch visits."""
    from gfcomb.testing import strategies

    pool = dict(strategies._kernel_pool())
    switch = strategies.switch_node([("k_normal", pool["k_normal"]), ("k_det", pool["k_det"])])
    _, model = strategies.repeat_node(strategies.dimap_node(switch), 3)
    addr = ("rep3", 2, "dimap", "i2")
    for seed in range(6):
        torch.manual_seed(seed)
        tr = model.simulate((torch.tensor(0.0),))
        new, w, _, discard = tr.update({addr: tr[addr]})
        back, w_back, _, _ = new.update(discard)
        close(w, 0.0)
        close(w_back, 0.0)
        close(back.score, tr.score)


# ------------------------------------------------------------------ a @gen kernel's batch calls
@gf.gen
def chained(x, slope):
    """a ~ N(slope x, 0.5), b ~ N(a, 1): a kernel whose body runs over the whole batch."""
    a = gf.normal(slope * x, 0.5) @ "a"
    return gf.normal(a, 1.0) @ "b"


def test_whole_batch_kernel_calls_equal_the_element_by_element_path(monkeypatch):
    """Map hands a @gen kernel one batch call over every element (the body run once over the
    batch); element by element (``vectorize=False``, the general path) gives the same
    weights, scores, return values, discards and gradients."""
    fast = Map(chained, in_dims=(0, None))
    slow = Map(chained, in_dims=(0, None), vectorize=False)
    args = (XS, SLOPE)
    rec = _Recorder(monkeypatch)
    tr = fast.simulate(args)
    assert rec.batch_calls == [5]  # one batch call of the kernel, over the five elements
    ref, w = slow.generate(args, tr.choices)
    close(w, tr.score)
    close(tr.score, (normal_lp(tr[:, "a"], SLOPE * XS, 0.5)
                     + normal_lp(tr[:, "b"], tr[:, "a"], 1.0)).sum())
    snap = snapshot(tr)
    cm = gf.ChoiceMap({(1, "a"): torch.tensor(0.3), (3, "b"): torch.tensor(-1.0)})
    slope2 = torch.tensor(0.2, dtype=torch.float64)
    for new_args, diffs in ((args, (NoChange(), NoChange())),
                            ((XS, slope2), (NoChange(), UnknownChange()))):
        f = fast.update(tr, new_args, diffs, cm)
        s = slow.update(ref, new_args, diffs, cm)
        close(f[1], s[1])
        close(f[0].score, s[0].score)
        close(f[0].retval, s[0].retval)
        for (a1, v1), (a2, v2) in zip(sorted(f[3].items(), key=str),
                                      sorted(s[3].items(), key=str)):
            assert a1 == a2
            close(v1, v2)
    sel = gf.select((2, "a"), (4, "a"))
    torch.manual_seed(5)
    new, w, _ = fast.regenerate(tr, args, (NoChange(), NoChange()), sel)
    same, w_u, _, _ = slow.update(ref, args, (NoChange(), NoChange()), new.choices.filter(sel))
    close(new.score, same.score)
    close(w, w_u - (slow.project(same, sel) - slow.project(ref, sel)))
    assert_unchanged(tr, snap)
    g_fast = fast.choice_gradients(tr, gf.select((0, "a")))
    g_slow = slow.choice_gradients(ref, gf.select((0, "a")))
    close(g_fast[2][0, "a"], g_slow[2][0, "a"])
    close(g_fast[0][1], g_slow[0][1])
