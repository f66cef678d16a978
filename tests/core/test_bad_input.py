"""Bad input gets a named error (a GFIError subclass) that names the argument or address,
raised before anything changes (DESIGN §6, §8), and no silent NaN / +inf over concrete
tensors.  Each case checks the error class, its message and that the inputs are unchanged.
"""

from __future__ import annotations

import pytest
import torch

import gfcomb as gf
from gfcomb.core.pytree import tree_tensors


@gf.gen
def model(mu):
    x = gf.normal(mu, 1.0) @ "x"
    return gf.normal(x, 0.5) @ "y"


@gf.gen
def scaled(s):
    return gf.normal(0.0, s) @ "y"


@gf.gen
def _a(x):
    return gf.normal(x, 1.0) @ "v"


@gf.gen
def _b(x):
    return gf.normal(x, 2.0) @ "v"


def _snapshot(*objs):
    return [(t, t.clone()) for o in objs for t in tree_tensors(o)]


def _unchanged(snap) -> bool:
    return all(torch.equal(t, c) for t, c in snap)


@pytest.mark.parametrize("bad, name", [("a", "str"), (None, "NoneType")])
def test_str_or_none_distribution_argument(bad, name):
    with pytest.raises(gf.DistributionArgumentTypeError,
                       match=f"normal: argument 'loc' must be a number or a tensor, got {name}"):
        gf.normal.simulate((bad, 1.0))

    @gf.gen
    def body():
        return gf.normal(bad, 1.0) @ ("q", 0)

    with pytest.raises(gf.DistributionArgumentError, match=r"address \('q', 0\)"):
        body.simulate(())
    with pytest.raises(TypeError):  # (also a TypeError, as before)
        gf.normal.simulate((bad, 1.0))


@pytest.mark.parametrize("bad", ["x", {"x": True}, ["x"]])
def test_regenerate_given_something_else_than_a_selection(bad):
    mu = torch.tensor(0.3)
    tr = model.simulate((mu,))
    snap = _snapshot(tr, mu)
    for call in (lambda: model.regenerate(tr, (mu,), (gf.NoChange(),), bad),
                 lambda: tr.regenerate(bad), lambda: model.project(tr, bad),
                 lambda: gf.normal.regenerate(tr.subtrace("x"), (mu, 1.0),
                                              (gf.NoChange(),) * 2, bad)):
        with pytest.raises(gf.ArgumentTypeError, match="selection must be a gf.Selection, got"):
            call()
    assert _unchanged(snap)
    with pytest.raises(gf.ArgumentTypeError, match=r"write gf.select\('x'\)"):
        tr.regenerate("x")


@pytest.mark.parametrize("bad", ["abc", None, object()])
def test_str_value_in_a_choicemap(bad):
    with pytest.raises(gf.ChoiceValueError,
                       match=r"choice value must be .* \(at address \('a', 1\)\)"):
        gf.ChoiceMap({("a", 1): bad})
    mu = torch.tensor(0.3)
    tr = model.simulate((mu,))
    snap = _snapshot(tr, mu)
    with pytest.raises(gf.ChoiceValueError, match="at address 'x'"):
        tr.update({"x": bad})
    with pytest.raises(gf.ChoiceValueError, match="at address 'y'"):
        model.generate((mu,), {"y": bad})
    assert _unchanged(snap)


def test_list_inside_a_choicemap_key():
    cm = gf.ChoiceMap({"x": 1.0, "ys": {0: 2.0}})
    snap = _snapshot(cm)
    for call in (lambda: cm[["ys", 0]], lambda: cm.get_submap(("ys", [0])),
                 lambda: cm.set(["ys", 1], 3.0), lambda: gf.ChoiceMap({("ys", (0,)): 1.0})):
        with pytest.raises(gf.AddressTypeError, match="components must be str or int"):
            call()
    with pytest.raises(gf.AddressTypeError, match="write a tuple, not a list"):
        cm[["ys", 0]]
    with pytest.raises(TypeError):  # (also a TypeError, as before)
        cm[["ys", 0]]
    assert _unchanged(snap) and cm.to_dict().keys() == {"x", "ys"}


def test_at_outside_a_gen_body():
    with pytest.raises(gf.OutsideGenBodyError, match="only be used inside the body of a @gen"):
        gf.normal(0.0, 1.0) @ "x"
    assert issubclass(gf.OutsideGenBodyError, gf.GFIError)
    assert issubclass(gf.OutsideGenBodyError, RuntimeError)


def test_sample_checks_its_arguments():
    with pytest.raises(gf.DistributionArgumentError, match="normal: argument 'scale' must be > 0"):
        gf.normal.sample(0.0, -1.0)
    with pytest.raises(gf.DistributionArgumentError, match="bernoulli: argument 'probs'"):
        gf.bernoulli.sample(1.5)
    with pytest.raises(gf.DistributionArgumentTypeError, match="'loc'"):
        gf.normal.sample("a", 1.0)
    assert gf.normal.sample(0.0, 2.0).shape == ()
    # inside vmap there is nothing to check (and nothing is): the sampler still runs
    out = torch.func.vmap(lambda s: gf.normal.sample(0.0, s), randomness="different")(
        torch.tensor([1.0, 2.0]))
    assert out.shape == (2,)


def test_every_gfcomb_error_derives_from_gfierror():
    import gfcomb.core.errors as errors

    classes = [v for v in vars(errors).values()
               if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 15 and all(issubclass(c, gf.GFIError) for c in classes)


# ------------------------------------------------------------------ no silent NaN / +inf
def test_batched_switch_index_out_of_range_under_map():
    idx, xs = torch.tensor([0, 1, 2]), torch.zeros(3)
    snap = _snapshot(idx, xs)
    with pytest.raises(gf.NumericalError,
                       match=r"element 2 has a score of nan because: Switch: index 2 is out"):
        gf.Map(gf.Switch(_a, _b)).simulate((idx, xs))
    assert _unchanged(snap)


@pytest.mark.parametrize("scale, addr", [(0.0, r"\(1, 'y'\)"), (-1.0, r"\(1, 'y'\)")])
def test_non_positive_scale_inside_map(scale, addr):
    s = torch.tensor([1.0, scale, 2.0])
    snap = _snapshot(s)
    m = gf.Map(scaled)
    with pytest.raises(gf.DistributionArgumentError,
                       match=f"normal: argument 'scale' must be > 0, got {scale}.*{addr}"):
        m.simulate((s,))
    with pytest.raises(gf.DistributionArgumentError, match=addr):
        m.generate((s,), {(1, "y"): 0.0})
    good = m.simulate((torch.ones(3),))
    with pytest.raises(gf.DistributionArgumentError, match=addr):
        good.gen_fn.update(good, (s,), (gf.UnknownChange(),), None)
    assert _unchanged(snap)

    @gf.gen
    def outer(s):
        return gf.Map(scaled)(s) @ "ys"

    with pytest.raises(gf.DistributionArgumentError, match=r"\('ys', 1, 'y'\)"):
        outer.simulate((s,))


def test_nan_observation_inside_map_is_named():
    with pytest.raises(gf.NumericalError, match="element 1 has a score of nan"):
        gf.Map(scaled).generate((torch.ones(3),), {(1, "y"): float("nan")})


def test_inside_a_users_vmap_scores_stay_as_computed():
    """Inside vmap the values cannot be read: no error, the score is +inf / NaN."""
    s = torch.tensor([[1.0, 0.0], [1.0, -1.0]])
    scores = torch.func.vmap(lambda r: gf.Map(scaled).simulate((r,)).score,
                             randomness="different")(s)
    assert scores[0] == float("inf") and torch.isnan(scores[1])
