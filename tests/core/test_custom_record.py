"""Custom generative functions in a few lines: ``gf.trace_record`` / ``gf.RecordTrace``, and
``check_gfi``'s bounded shrinking still naming the law."""

from __future__ import annotations

import time
from typing import Any

import attrs
import pytest
import torch
from hypothesis import strategies as st

import gfcomb as gf
from gfcomb.testing import GFILawError, check_gfi, float_tensors


@gf.trace_record
class PointTrace(gf.RecordTrace):
    gen_fn: Any
    args: tuple[Any, ...]
    x: torch.Tensor
    score: torch.Tensor

    @property
    def retval(self) -> torch.Tensor:
        return self.x

    def choice_values(self) -> dict[Any, Any]:
        return {"x": self.x}


class Point(gf.GenerativeFunction):
    """x ~ N(mu, 1), written by hand; ``bias`` breaks update's weight."""

    bias = 0.0

    def _trace(self, args, x):
        lp = torch.distributions.Normal(args[0], 1.0).log_prob(x)
        return PointTrace(self, args, x, lp)

    def simulate(self, args):
        return self._trace(args, args[0] + torch.randn_like(args[0]))

    def generate(self, args, constraints=None):
        cm = gf.ChoiceMap(constraints)
        if cm.has_value("x"):
            tr = self._trace(args, cm["x"])
            return tr, tr.score
        tr = self.simulate(args)
        return tr, torch.zeros_like(tr.score)

    def update(self, trace, args, argdiffs, constraints=None):
        cm = gf.ChoiceMap(constraints)
        given = cm.has_value("x")
        new = self._trace(args, cm["x"] if given else trace.x)
        w = new.score - trace.score + (self.bias if given else 0.0)
        return new, w, gf.UnknownChange(), trace.choices if given else gf.ChoiceMap.empty()

    def regenerate(self, trace, args, argdiffs, selection):
        if "x" in selection:
            return self.simulate(args), torch.zeros_like(trace.score), gf.UnknownChange()
        new = self._trace(args, trace.x)
        return new, new.score - trace.score, gf.UnknownChange()

    def project(self, trace, selection):
        return trace.score if "x" in selection else torch.zeros_like(trace.score)


class Broken(Point):
    bias = 0.1


ARGS = st.tuples(float_tensors((), -1, 1))


def test_record_is_immutable_batchable_and_has_its_choices():
    tr = Point().simulate((torch.tensor(0.5),))
    assert tr["x"] is tr.x and tr.choices.addresses() == [("x",)]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        tr.x = torch.tensor(0.0)
    trs = torch.func.vmap(lambda m: Point().simulate((m,)), randomness="different")(
        torch.zeros(4))
    assert isinstance(trs, PointTrace) and trs.x.shape == (4,)
    check_gfi(Point(), ARGS, max_examples=5, derandomize=True)


def test_trace_record_needs_the_base_class_and_known_static_fields():
    with pytest.raises(TypeError, match="RecordTrace"):
        @gf.trace_record
        class NotATrace:
            x: int

    with pytest.raises(TypeError, match="static"):
        @gf.trace_record(static=("gen_fn", "nope"))
        class T2(gf.RecordTrace):
            gen_fn: Any


def test_check_gfi_shrinks_within_its_bound_and_names_the_law():
    t0 = time.perf_counter()
    with pytest.raises(GFILawError) as info:
        check_gfi(Broken(), ARGS, max_examples=30, derandomize=True, max_shrink_seconds=2.0)
    assert time.perf_counter() - t0 < 30
    assert info.value.law in ("update_weight", "update_roundtrip")
    assert f"GFI law '{info.value.law}' violated" in str(info.value)
