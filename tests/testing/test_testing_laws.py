"""The gfcomb.testing machinery: law selection and skipping, reports, messages, the
strategies drawn from traces, single-law checks and the goodness-of-fit helper."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gfcomb as gf
from gfcomb.distributions.continuous import Normal
from gfcomb.distributions.discrete import Bernoulli
from gfcomb.testing import (
    LAW_NAMES,
    GFILawError,
    check_gfi,
    check_law,
    choice_subsets,
    constraints_from,
    goodness_of_fit,
    selections_from,
)
from gfcomb.testing.laws import resolve_laws
from gfcomb.testing.strategies import addresses_of, float_tensors

X = float_tensors((), -2.0, 2.0)


@gf.gen
def point(x):
    return gf.normal(x, 0.5) @ "y"


@gf.gen
def model(xs):
    slope = gf.normal(0.0, 1.0) @ "slope"
    ys = gf.Map(point)(slope * xs) @ "ys"
    return ys.sum()


MODEL_ARGS = st.tuples(st.integers(1, 4).flatmap(lambda n: float_tensors((n,))))


def test_every_law_has_a_name_and_unknown_names_are_refused():
    assert len(LAW_NAMES) == 15 and len(set(LAW_NAMES)) == 15
    assert resolve_laws(None, skip=("vmap",)) == tuple(n for n in LAW_NAMES if n != "vmap")
    with pytest.raises(ValueError, match="unknown GFI law 'updates'"):
        resolve_laws(["updates"])


def test_check_gfi_runs_every_law_and_reports_it():
    report = check_gfi(model, MODEL_ARGS, max_examples=10, derandomize=True)
    assert report.examples >= 10
    assert report.laws_never_run == (), report.summary()
    text = report.summary()
    for law in LAW_NAMES:
        assert law in text


def test_selected_laws_only():
    report = check_gfi(model, MODEL_ARGS, max_examples=5, laws=["project", "update_noop"])
    assert report.laws == ("project", "update_noop")
    assert set(report.ran) == {"project", "update_noop"}


class UntracedNoise(Normal):
    """A normal whose retval gets untraced noise: generate({}) weight is not 0, so it is a
    function with untraced randomness (its weight includes a correction term)."""

    def generate(self, args, constraints=None):
        tr, w = super().generate(args, constraints)
        if constraints is None or gf.ChoiceMap(constraints).is_empty():
            w = w + 0.1 * torch.randn(())
        return tr, w


def test_a_law_that_does_not_apply_can_be_skipped():
    args = st.tuples(X, float_tensors((), 0.5, 2.0))
    with pytest.raises(GFILawError) as info:
        check_gfi(UntracedNoise(), args, max_examples=10, shrink=False)
    assert info.value.law == "generate_empty"
    report = check_gfi(UntracedNoise(), args, max_examples=10, skip=["generate_empty"])
    assert "generate_empty" not in report.laws


def test_a_python_int_argument_skips_vmap_over_args_cleanly():
    # Unfold's n is a Python int: the batch goes over constrained values instead; a @gen
    # with Python control flow on a choice cannot run under vmap at all: skipped, reported
    @gf.gen
    def branchy(n):
        b = gf.bernoulli(0.5) @ "b"
        if b:
            gf.normal(0.0, 1.0) @ "x"
        return b

    report = check_gfi(branchy, st.tuples(st.integers(0, 3)), max_examples=10)
    assert "vmap" in report.laws_never_run
    assert any("cannot run under vmap" in r for r in report.skipped["vmap"])
    assert "gradients" in report.laws_run or "gradients" in report.skipped
    with pytest.raises(GFILawError, match="'vmap'"):
        check_gfi(branchy, st.tuples(st.integers(0, 3)), max_examples=5, laws=["vmap"],
                  require_vmap=True, shrink=False)


def test_message_names_law_args_and_choice_map():
    class Off(Normal):
        def project(self, trace, selection):
            return super().project(trace, selection) + 1.0

    with pytest.raises(AssertionError) as info:
        check_gfi(Off(), (torch.tensor(0.5), torch.tensor(2.0)), max_examples=3,
                  laws=["project"])
    msg = str(info.value)
    assert "GFI law 'project' violated" in msg
    assert "args: (tensor(0.5000), tensor(2.))" in msg
    assert "choice map: ChoiceMap(" in msg


def test_check_law_runs_one_law_by_hand():
    args = (torch.tensor([0.1, 0.2, 0.3]),)
    for law in LAW_NAMES:
        report = check_law(law, model, args, seed=3)
        assert report.examples == 1
    report = check_law("gradients", model, args)
    assert report.ran["gradients"] == 1


def test_check_gfi_accepts_a_fixed_argument_tuple():
    report = check_gfi(gf.normal, (torch.tensor(0.0), torch.tensor(1.0)), max_examples=3)
    assert report.ran["simulate_assess"] >= 1


# ------------------------------------------------------------------ strategies
@settings(max_examples=25, deadline=None)
@given(st.data())
def test_constraints_and_selections_drawn_from_a_trace(data):
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    xs = torch.tensor([0.0, 1.0, 2.0])
    tr = model.simulate((xs,))
    alt = model.simulate((xs,))
    addrs = set(addresses_of(tr))
    assert ("ys", 2, "y") in addrs  # stacked Map addresses, element by element
    sub = data.draw(choice_subsets(tr))
    for a, v in sub.items():
        assert a in addrs and torch.equal(v, tr[a])
    c = data.draw(constraints_from(tr, alt))
    for a, v in c.items():
        assert a in addrs and (torch.equal(v, tr[a]) or torch.equal(v, alt[a]))
    sel = data.draw(selections_from(tr))
    inside = [a for a in addrs if a in sel]
    p = model.project(tr, sel)
    expected = sum(float(model.project(tr, gf.select(a))) for a in inside)
    assert abs(float(p) - expected) < 1e-9


# ------------------------------------------------------------------ goodness of fit
class WideNormal(Normal):
    """Samples with a 20% too large scale (assess is right)."""

    def sample(self, loc, scale):
        return super().sample(loc, 1.2 * torch.as_tensor(scale))


class BiasedBernoulli(Bernoulli):
    """Samples with probs + 0.05."""

    def sample(self, probs):
        return super().sample(torch.as_tensor(probs) + 0.05)


class Unnormalized(Normal):
    """The right sampler, a log density off by log 2 (it integrates to 2)."""

    def logpdf(self, value, loc, scale):
        return super().logpdf(value, loc, scale) + math.log(2.0)


def test_goodness_of_fit_rejects_wrong_samplers_and_densities():
    args = (torch.tensor(0.0), torch.tensor(1.0))
    assert goodness_of_fit(gf.normal, args, seed=0).passed
    assert not goodness_of_fit(WideNormal(), args, n=4000, seed=0).passed
    bad = goodness_of_fit(Unnormalized(), args, seed=0)
    assert not bad.passed and "integrate" in bad.detail
    p = (torch.tensor(0.3),)
    assert goodness_of_fit(gf.bernoulli, p, n=4000, seed=0).passed
    assert not goodness_of_fit(BiasedBernoulli(), p, n=4000, seed=0).passed


def test_goodness_of_fit_of_a_gen_function_with_one_choice():
    @gf.gen
    def shifted(mu):
        return gf.gamma(2.0, 1.0) @ "g"

    r = goodness_of_fit(shifted, (torch.tensor(0.0),), n=2000, seed=2)
    assert r.passed, str(r)
    assert r.test.startswith("KS")
