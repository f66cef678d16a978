"""Combinators nested in combinators take the inner one's batch path (issue 12 item 2).

``Map(Unfold(step))`` calls Unfold's own batch edit (``batch_update``/``batch_regenerate``,
the elements as rows) instead of a vmap of ``Unfold.update`` per element; the general path is
the same Map over an Unfold whose batch methods are the vmapped per-row defaults
(:class:`PlainUnfold`).  Both must agree exactly (float64) in weights, scores, return values,
discards and gradients, for updates of stored steps, extensions (the new steps then sit in
Unfold's shared history) and further edits of those, and regenerates.  ``Unfold(Map(step))``
and the stacking of an Unfold's steps inside a vmap (``core.batching.stack_tensors``) are
checked against exact log densities and against ``torch.stack``.
"""

from __future__ import annotations

import math

import pytest
import torch

import gfcomb as gf
from gfcomb.core.batching import stack_tensors
from gfcomb.core.gfi import GenerativeFunction

A, S = 0.9, 0.5
N, T = 5, 4
NC, UC = gf.NoChange(), gf.UnknownChange()
TOL = dict(rtol=1e-12, atol=1e-12)


@gf.gen
def step(t, x, a):
    x = gf.normal(a * x, S) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


class PlainUnfold(gf.Unfold):
    """An Unfold whose batch methods are the defaults (a vmap of the per-row method)."""

    batch_update = GenerativeFunction.batch_update
    batch_regenerate = GenerativeFunction.batch_regenerate


class CountingUnfold(gf.Unfold):
    """An Unfold with its own ``batch_generate`` (the default's result), counting calls."""

    calls: list[int] = []

    def batch_generate(self, n, args, constraints=None):
        CountingUnfold.calls.append(n)
        return super().batch_generate(n, args, constraints)


FAST = gf.Map(gf.Unfold(step), in_dims=(None, 0, None))
SLOW = gf.Map(PlainUnfold(step), in_dims=(None, 0, None))


def lp(x, mean, sd):
    return -0.5 * ((x - mean) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)


def exact_score(x0, xs, ys, a=A):
    """log p of [N, T] draws by hand."""
    prev = torch.cat([x0.unsqueeze(1), xs[:, :-1]], 1)
    return (lp(xs, a * prev, S) + lp(ys, xs, 1.0)).sum()


def inputs(seed):
    """``(T, x0s, a)``: the arguments of both nested shapes, drawn with ``seed``."""
    torch.manual_seed(seed)
    return (T, torch.randn(N, dtype=torch.float64), torch.tensor(A, dtype=torch.float64))


@pytest.fixture
def pair():
    """The same traces on both paths (the general one generated from the fast one's choices)."""
    args = inputs(0)
    fast = FAST.simulate(args)
    slow, w = SLOW.generate(args, fast.choices)
    torch.testing.assert_close(w, fast.score, **TOL)
    return fast, slow, args


def same(a, b):
    """Two Map traces agree: score, return value, every choice."""
    torch.testing.assert_close(a.score, b.score, **TOL)
    torch.testing.assert_close(a.retval, b.retval, **TOL)
    for addr in ("x", "y"):
        torch.testing.assert_close(a[:, :, addr], b[:, :, addr], **TOL)


def same_discard(d1, d2):
    assert sorted(map(str, (k for k, _ in d1.items()))) == \
        sorted(map(str, (k for k, _ in d2.items())))
    for addr, v in d1.items():
        torch.testing.assert_close(v, d2[addr], **TOL)


def test_the_fast_path_is_taken():
    assert not FAST.kernel.batch_matches_per_row()
    assert SLOW.kernel.batch_matches_per_row()


CONSTRAINTS = [
    # a new x at step 1 changes every later state: steps 1.. revisited
    {(1, T - 1, "y"): 0.7, (3, 1, "x"): -0.2, (3, 2, "y"): 1.5},
    # a y at step 0, then an x at step 2: step 1 is skipped, step 2 reads the stored state
    {(0, 0, "y"): 0.3, (3, 2, "x"): -0.2},
    # one y in the middle: one step revisited, the stored steps around it kept
    {(2, 1, "y"): 1.1},
]


@pytest.mark.parametrize("values", CONSTRAINTS)
def test_update_of_stored_steps_equals_the_general_path(pair, values):
    fast, slow, args = pair
    cm = gf.ChoiceMap({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})
    f = FAST.update(fast, args, (NC, NC, NC), cm)
    s = SLOW.update(slow, args, (NC, NC, NC), cm)
    torch.testing.assert_close(f[1], s[1], **TOL)
    same(f[0], s[0])
    same_discard(f[3], s[3])
    for k, v in values.items():
        assert float(f[0][k]) == v
    torch.testing.assert_close(f[0].score, exact_score(args[1], f[0][:, :, "x"],
                                                       f[0][:, :, "y"]), **TOL)


def test_dense_update_of_every_element(pair):
    fast, slow, args = pair
    ys = torch.randn(N, dtype=torch.float64)
    cm = gf.ChoiceMap.stacked(gf.ChoiceMap({T - 1: gf.ChoiceMap({"y": ys})}))
    f = FAST.update(fast, args, (NC, NC, NC), cm)
    s = SLOW.update(slow, args, (NC, NC, NC), cm)
    torch.testing.assert_close(f[1], s[1], **TOL)
    torch.testing.assert_close(f[1], (lp(ys, fast[:, T - 1, "x"], 1.0)
                                      - lp(fast[:, T - 1, "y"], fast[:, T - 1, "x"], 1.0)).sum(),
                               **TOL)
    same(f[0], s[0])
    same_discard(f[3], s[3])


def test_extension_then_edits_of_the_extended_traces(pair):
    fast, slow, args = pair
    new = gf.ChoiceMap.stacked(gf.ChoiceMap({T: gf.ChoiceMap({
        "x": torch.randn(N, dtype=torch.float64), "y": torch.randn(N, dtype=torch.float64)})}))
    grown = (T + 1,) + args[1:]
    f = FAST.update(fast, grown, (UC, NC, NC), new)
    s = SLOW.update(slow, grown, (UC, NC, NC), new)
    torch.testing.assert_close(f[1], s[1], **TOL)
    same(f[0], s[0])
    # edits of the extended traces: the new step and an older one
    cm = gf.ChoiceMap({(2, T, "y"): torch.tensor(0.3), (0, 1, "x"): torch.tensor(0.1)})
    f2 = FAST.update(f[0], grown, (NC, NC, NC), cm)
    s2 = SLOW.update(s[0], grown, (NC, NC, NC), cm)
    torch.testing.assert_close(f2[1], s2[1], **TOL)
    same(f2[0], s2[0])
    same_discard(f2[3], s2[3])
    # and back: the discard restores the old trace with the opposite weight
    back = FAST.update(f2[0], grown, (NC, NC, NC), f2[3])
    torch.testing.assert_close(back[1], -f2[1], **TOL)
    same(back[0], f[0])


def test_shrinking_and_a_parameter_change(pair):
    fast, slow, args = pair
    a2 = torch.tensor(0.5, dtype=torch.float64)
    for new_args, diffs in (((T - 1,) + args[1:], (UC, NC, NC)),
                            (args[:2] + (a2,), (NC, NC, UC))):
        f = FAST.update(fast, new_args, diffs, None)
        s = SLOW.update(slow, new_args, diffs, None)
        torch.testing.assert_close(f[1], s[1], **TOL)
        same(f[0], s[0])
        same_discard(f[3], s[3])


@pytest.mark.parametrize("selection", [gf.select((2, T - 1, "x")),
                                       gf.select((0, 1, "x"), (4, 2, "x"))])
def test_regenerate_weight_is_the_general_paths(pair, selection):
    """The fast regenerate's weight equals the general path's update to the same values,
    less the selected choices' log densities (prior proposal)."""
    fast, slow, args = pair
    torch.manual_seed(3)
    f, w, _ = FAST.regenerate(fast, args, (NC, NC, NC), selection)
    new_values = f.choices.filter(selection)
    s, w_u, _, _ = SLOW.update(slow, args, (NC, NC, NC), new_values)
    same(f, s)
    expected = w_u - (SLOW.project(s, selection) - SLOW.project(slow, selection))
    torch.testing.assert_close(w, expected, **TOL)
    assert not torch.equal(f.choices.filter(selection)[next(iter(
        k for k, _ in new_values.items()))], fast.choices.filter(selection)[next(iter(
            k for k, _ in new_values.items()))])


def test_gradients_through_the_fast_path(pair):
    fast, slow, args = pair
    results = []
    for model, trace in ((FAST, fast), (SLOW, slow)):
        y = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
        a = args[2].clone().requires_grad_(True)
        new, w, _, _ = model.update(trace, args[:2] + (a,), (NC, NC, UC),
                                    gf.ChoiceMap({(1, 2, "y"): y}))
        grads = torch.autograd.grad(w + new.score, (y, a))
        arg_grads, _, choice_grads = model.choice_gradients(new, gf.select((1, 2, "y")))
        results.append((grads, arg_grads[1], choice_grads[1, 2, "y"]))
    (g_f, ag_f, cg_f), (g_s, ag_s, cg_s) = results
    for u, v in zip(g_f, g_s):
        torch.testing.assert_close(u, v, **TOL)
    torch.testing.assert_close(ag_f, ag_s, **TOL)
    torch.testing.assert_close(cg_f, cg_s, **TOL)


def test_a_kernel_batch_generate_is_called_once_for_all_elements():
    model = gf.Map(CountingUnfold(step), in_dims=(None, 0, None))
    x0 = torch.randn(N, dtype=torch.float64)
    a = torch.tensor(A, dtype=torch.float64)
    ref = SLOW.simulate((T, x0, a))
    CountingUnfold.calls.clear()
    tr, w = model.generate((T, x0, a), ref.choices)
    assert CountingUnfold.calls == [N]
    torch.testing.assert_close(w, ref.score, **TOL)
    same(tr, ref)
    tr = model.simulate((T, x0, a))
    assert CountingUnfold.calls == [N, N]
    torch.testing.assert_close(tr.score, exact_score(x0, tr[:, :, "x"], tr[:, :, "y"]), **TOL)
    bad = gf.ChoiceMap({(1, T + 3, "y"): torch.tensor(0.0)})
    with pytest.raises(gf.GFIError):
        model.generate((T, x0, a), bad)


# ------------------------------------------------------------------ Unfold of Map
UNFOLD_OF_MAP = gf.Unfold(gf.Map(step, in_dims=(None, 0, None)))


def test_unfold_of_map_scores_updates_and_regenerates():
    args = inputs(1)
    x0 = args[1]
    tr = UNFOLD_OF_MAP.simulate(args)
    xs, ys = tr[:, :, "x"].T, tr[:, :, "y"].T
    torch.testing.assert_close(tr.score, exact_score(x0, xs, ys), **TOL)
    obs = gf.ChoiceMap.stacked(gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys.T}), N, batch_ndim=1))
    g, w = UNFOLD_OF_MAP.generate(args, obs)
    torch.testing.assert_close(w, (lp(ys, g[:, :, "x"].T, 1.0)).sum(), **TOL)
    cm = gf.ChoiceMap({(1, 3, "x"): torch.tensor(0.25)})
    new, w, _, discard = UNFOLD_OF_MAP.update(tr, args, (NC, NC, NC), cm)
    torch.testing.assert_close(w, new.score - tr.score, **TOL)
    torch.testing.assert_close(discard[1, 3, "x"], tr[1, 3, "x"], **TOL)
    sel = gf.select((2, 0, "x"))
    new, w, _ = UNFOLD_OF_MAP.regenerate(tr, args, (NC, NC, NC), sel)
    expected = (new.score - tr.score) - (UNFOLD_OF_MAP.project(new, sel)
                                         - UNFOLD_OF_MAP.project(tr, sel))
    torch.testing.assert_close(w, expected, **TOL)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_stack_tensors_inside_vmap_is_torch_stack(dim):
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)

    def parts(v):
        return [v * 1.5, v.sin(), v + 2.0]

    for wrap in (lambda f: torch.func.vmap(f), lambda f: torch.func.vmap(f, in_dims=1),
                 lambda f: torch.func.vmap(torch.func.vmap(f))):
        fast = wrap(lambda v: stack_tensors(parts(v), dim))(x)
        ref = wrap(lambda v: torch.stack(parts(v), dim))(x)
        assert torch.equal(fast, ref)
        g1, = torch.autograd.grad((fast * ref.detach()).sum(), x)
        g2, = torch.autograd.grad((ref * ref.detach()).sum(), x)
        torch.testing.assert_close(g1, g2, **TOL)
    per_row = torch.func.vmap(torch.func.grad(lambda v: stack_tensors(parts(v), dim).sum()))(x)
    ref = torch.func.vmap(torch.func.grad(lambda v: torch.stack(parts(v), dim).sum()))(x)
    torch.testing.assert_close(per_row, ref, **TOL)
    mixed = torch.func.vmap(lambda v: stack_tensors([v, torch.ones(3, 2, dtype=v.dtype)], dim))(x)
    assert torch.equal(mixed, torch.func.vmap(
        lambda v: torch.stack([v, torch.ones(3, 2, dtype=v.dtype)], dim))(x))


def test_tree_stack_follows_the_first_trees_structure():
    """tree_stack walks the first tree and follows its spec through the others: numbers
    kept static may differ (the first one's kept), anything else that differs is refused,
    and a tensor held in several places is stacked once."""
    from gfcomb.core.pytree import tree_stack

    a, b = torch.randn(3), torch.randn(3)
    out = tree_stack([(a, {"k": a, "n": 0}), (b, {"k": b, "n": 1})])
    assert out[0] is out[1]["k"] and out[1]["n"] == 0
    assert torch.equal(out[0], torch.stack([a, b]))
    traces = [step.simulate((t, torch.tensor(0.1 * t), torch.tensor(A))) for t in range(3)]
    stacked = tree_stack(traces)
    torch.testing.assert_close(stacked.score, torch.stack([tr.score for tr in traces]), **TOL)
    torch.testing.assert_close(stacked["y"], torch.stack([tr["y"] for tr in traces]), **TOL)
    for bad in ([(a, "u"), (b, "v")], [(a,), (b, b)], [{"k": a}, {"j": b}], [(a, 1), (b, b)]):
        with pytest.raises(ValueError, match="different structure"):
            tree_stack(bad)
    other = gf.Unfold(step).simulate((2, torch.tensor(0.0), torch.tensor(A)))
    with pytest.raises(ValueError, match="different structure"):
        tree_stack([traces[0], other])


@gf.gen
def pass_on(x, keep):
    """``"y"`` gets the argument ``x`` itself when ``keep``, else a new tensor."""
    return gf.normal(x if bool(keep) else x * 1.0, 1.0) @ "y"


def test_tree_stack_marks_the_bookkeeping_the_trees_disagree_on():
    """An uncompared field (a @gen trace's argument sources) that differs between the trees
    is unknown (None) in the stacked record, wherever it sits among tensor leaves; equal
    ones are kept."""
    from gfcomb.core.pytree import tree_stack

    yes, no = torch.tensor(True), torch.tensor(False)
    t0, _ = pass_on.generate((torch.tensor(1.0), yes), {"y": 0.5})
    t1, _ = pass_on.generate((torch.tensor(2.0), yes), {"y": 0.7})
    t2, _ = pass_on.generate((torch.tensor(3.0), no), {"y": 0.1})
    assert t0.sources != t2.sources
    a, b = torch.ones(2), torch.zeros(2)
    kept = tree_stack([(a, t0, b), (b, t1, a)])
    assert kept[1].sources == t0.sources
    mixed = tree_stack([(a, t0, b), (b, t2, a)])
    assert mixed[1].sources is None
    assert torch.equal(mixed[0], torch.stack([a, b])) and torch.equal(mixed[2], torch.stack([b, a]))
    assert torch.equal(mixed[1]["y"], torch.tensor([0.5, 0.1]))


def wrapped(nested):
    """A @gen model calling ``nested`` (a Map over Unfolds) at "series"."""
    @gf.gen
    def model(n, x0s, a):
        return nested(n, x0s, a) @ "series"

    return model


def test_inside_a_batch_of_models():
    """A @gen model holding Map(Unfold), run as a batch (a particle filter's rows): inside
    the rows' vmap the Map vmaps Unfold's per-element methods (Unfold's batch edit keeps
    tensors in its shared history, static storage that must not hold a vmap's tensors);
    results equal the general path's, row by row."""
    rows = 3
    n, x0, a = inputs(2)
    full = gf.ChoiceMap({"series": gf.ChoiceMap.stacked(gf.ChoiceMap.stacked(gf.ChoiceMap({
        "x": torch.randn(N, T + 1, dtype=torch.float64),
        "y": torch.randn(N, T + 1, dtype=torch.float64)}), T + 1, batch_ndim=1))})
    first = full.get_submap("series")
    prefix = gf.ChoiceMap({"series": gf.ChoiceMap({i: first.get_submap(i).filter(
        gf.select(*range(T))) for i in range(N)})})
    grow = gf.ChoiceMap({("series", i, T, addr): first[i, T, addr]
                         for i in range(N) for addr in ("x", "y")})
    out = []
    for nested in (FAST, SLOW):
        model = wrapped(nested)
        traces, w0 = model.batch_generate(rows, (n, x0, a), prefix)
        new, w, _, _ = model.batch_update(traces, (n + 1, x0, a), (UC, NC, NC), grow)
        out.append((w0, w, new.score, new["series", :, :, "x"]))
    for u, v in zip(*out):
        torch.testing.assert_close(u, v, **TOL)
    assert out[0][1].shape == (rows,)


@gf.gen
def calm(x, a):
    return gf.normal(a * x, S) @ "x"


@gf.gen
def wild(x, a):
    return gf.normal(0.5 * x, 1.0) @ "x"


@gf.gen
def regime_step(t, x, a):
    z = gf.bernoulli(0.3) @ "z"
    x = gf.Switch(calm, wild)(z.long(), x, a) @ "dyn"
    gf.normal(x, 1.0) @ "y"
    return x


def test_a_switch_in_the_unfold_kernel():
    """Steps on different Switch branches (harmonized when stacked): the fast path's edits
    (a branch change among them) equal the general path's."""
    fast_model = gf.Map(gf.Unfold(regime_step), in_dims=(None, 0, None))
    slow_model = gf.Map(PlainUnfold(regime_step), in_dims=(None, 0, None))
    args = inputs(4)
    fast = fast_model.simulate(args)
    slow, w = slow_model.generate(args, fast.choices)
    torch.testing.assert_close(w, fast.score, **TOL)
    flip = 1.0 - fast[1, 2, "z"]
    cm = gf.ChoiceMap({(1, 2, "z"): flip, (1, 2, "dyn", "x"): torch.tensor(0.2),
                       (3, T - 1, "y"): torch.tensor(-0.4)})
    f = fast_model.update(fast, args, (NC, NC, NC), cm)
    s = slow_model.update(slow, args, (NC, NC, NC), cm)
    torch.testing.assert_close(f[1], s[1], **TOL)
    torch.testing.assert_close(f[0].score, s[0].score, **TOL)
    torch.testing.assert_close(f[0].retval, s[0].retval, **TOL)
    assert float(f[0][1, 2, "z"]) == float(flip)
    new = gf.ChoiceMap.stacked(gf.ChoiceMap({T: gf.ChoiceMap({
        "z": torch.ones(N, dtype=torch.float64), "dyn": gf.ChoiceMap({"x": torch.zeros(N)}),
        "y": torch.zeros(N)})}))
    grown = (T + 1,) + args[1:]
    f = fast_model.update(f[0], grown, (UC, NC, NC), new)
    s = slow_model.update(s[0], grown, (UC, NC, NC), new)
    torch.testing.assert_close(f[1], s[1], **TOL)
    torch.testing.assert_close(f[0].score, s[0].score, **TOL)
