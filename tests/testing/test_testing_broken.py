"""check_gfi catches deliberately broken generative functions, one per law.

Each broken function is the normal distribution with one GFI method corrupted.  Every test
asserts that check_gfi fails with a GFILawError (an AssertionError) whose message names the
law, both with all laws selected and with only the law the corruption breaks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

import gfcomb as gf
from gfcomb.core.batching import inside_functorch_transform
from gfcomb.distributions.continuous import Normal
from gfcomb.testing.laws import GFILawError, check_gfi
from gfcomb.testing.strategies import float_tensors

ARGS = st.tuples(float_tensors((), -2.0, 2.0), float_tensors((), 0.5, 2.0))


class WrongUpdateWeight(Normal):
    """update's weight is off by 0.5 whenever a constraint is given."""

    def update(self, trace, args, argdiffs, constraints=None):
        tr, w, rd, d = super().update(trace, args, argdiffs, constraints)
        if constraints is not None and not gf.ChoiceMap(constraints).is_empty():
            w = w + 0.5
        return tr, w, rd, d


class WrongRegenerateWeight(Normal):
    """regenerate's weight is the new score minus the old (not 0) for a selected value."""

    def regenerate(self, trace, args, argdiffs, selection):
        tr, w, rd = super().regenerate(trace, args, argdiffs, selection)
        if selection.leaf_flag() is True:
            w = tr.score - trace.score
        return tr, w, rd


class WrongGenerateWeight(Normal):
    """generate with a constraint returns weight 0 instead of the log density."""

    def generate(self, args, constraints=None):
        tr, w = super().generate(args, constraints)
        return tr, torch.zeros_like(w)


class WrongProject(Normal):
    """project always returns the score."""

    def project(self, trace, selection):
        return trace.score


class MissingDiscard(Normal):
    """update forgets the overwritten value in its discard."""

    def update(self, trace, args, argdiffs, constraints=None):
        tr, w, rd, _ = super().update(trace, args, argdiffs, constraints)
        return tr, w, rd, gf.ChoiceMap.empty()


class MutatesInput(Normal):
    """update writes into the old trace's value (in place)."""

    def update(self, trace, args, argdiffs, constraints=None):
        out = super().update(trace, args, argdiffs, constraints)
        trace.value.add_(1.0)
        return out


class WrongGradient(Normal):
    """choice_gradients returns 1.1 times the true gradient."""

    def choice_gradients(self, trace, selection=None, retgrad=None):
        arg_grads, values, grads = super().choice_gradients(trace, selection, retgrad)
        scaled = torch.utils._pytree.tree_map(
            lambda g: 1.1 * g if isinstance(g, torch.Tensor) and g.is_floating_point() else g,
            grads)
        return arg_grads, values, scaled


class BatchedDiffers(Normal):
    """Under vmap, generate's weight is off by 0.25 (per-element calls are right)."""

    def generate(self, args, constraints=None):
        tr, w = super().generate(args, constraints)
        if inside_functorch_transform():
            w = w + 0.25
        return tr, w


class WrongBatchWeight(Normal):
    """batch_generate's weights are off by 0.25 (the per-row methods are right)."""

    def batch_generate(self, n, args, constraints=None):
        tr, w = super().batch_generate(n, args, constraints)
        return tr, w + 0.25


CASES = [
    # (the batch law compares batch_update with the broken per-row update: it may see it first)
    (WrongUpdateWeight, ("update_weight", "update_roundtrip", "batch")),
    (WrongRegenerateWeight, ("regenerate_weight",)),
    (WrongGenerateWeight, ("generate_full", "generate_partial")),
    (WrongProject, ("project",)),
    (MissingDiscard, ("update_discard", "update_roundtrip")),
    (MutatesInput, ("no_mutation",)),
    (WrongGradient, ("gradients",)),
    (BatchedDiffers, ("vmap",)),
    (WrongBatchWeight, ("batch",)),
]


def _failure(gen_fn, **kw) -> GFILawError:
    with pytest.raises(GFILawError) as info:
        check_gfi(gen_fn, ARGS, max_examples=15, shrink=False, **kw)
    return info.value


@pytest.mark.parametrize("cls,laws", CASES, ids=[c[0].__name__ for c in CASES])
def test_broken_gf_fails_with_all_laws(cls, laws):
    err = _failure(cls())
    assert isinstance(err, AssertionError)
    assert err.law in laws, str(err)
    msg = str(err)
    assert f"GFI law '{err.law}' violated" in msg
    assert "args: (" in msg


@pytest.mark.parametrize("cls,laws", CASES, ids=[c[0].__name__ for c in CASES])
def test_broken_gf_fails_on_its_own_law(cls, laws):
    law = laws[0]
    selected = [law] if law == "no_mutation" else [law, "no_mutation"]
    err = _failure(cls(), laws=selected)
    assert err.law == law
    assert f"'{law}'" in str(err)


def test_correct_normal_passes_the_same_checks():
    report = check_gfi(Normal(), ARGS, max_examples=15, derandomize=True)
    assert report.laws_never_run == ()


def test_message_shows_the_weights_and_choice_map():
    err = _failure(WrongGenerateWeight(), laws=["generate_full"])
    msg = str(err)
    assert "weight 0 != score" in msg
    assert "choice map: ChoiceMap(" in msg
