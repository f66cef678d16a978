"""The batch protocol (DESIGN §7): every built-in generative function's batch methods equal
per-row loops of its GFI methods -- weights, scores, discards, choices -- and a @gen body run
over a batch hands a wrapped Unfold one batch call that touches only the new steps.

Edits whose result is deterministic (every fresh choice constrained) are compared row by row
to ``torch.equal``/float64 round-off; random ones through the GFI's own identities (the score
is the log density of the choices; regenerate's weight is the score change of the unselected
choices)."""

from __future__ import annotations

import pytest
import torch

import gfcomb as gf
from gfcomb.combinators.unfold.history import StepBlock
from gfcomb.core.pytree import tree_index

torch.set_default_dtype(torch.float64)
TOL = 1e-12
NC, UC = gf.NoChange(), gf.UnknownChange()
N = 5


def close(a, b, tol=TOL):
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=tol)


def row(tr, i):
    return tree_index(tr, i)


def same_choices(a: gf.ChoiceMap, b: gf.ChoiceMap, tol=TOL):
    da = {k: v for k, v in a.items()}
    db = {k: v for k, v in b.items()}
    assert da.keys() == db.keys()
    for k in da:
        close(da[k], db[k], tol)


# ------------------------------------------------------------------ the models
@gf.gen
def lg_step(t, x, a):
    x = gf.normal(a * x, 0.5) @ "x"
    gf.normal(x, 1.0) @ "y"
    return x


LG = gf.Unfold(lg_step)


@gf.gen
def wrapped(T, a):
    x0 = gf.normal(0.0, 1.0) @ "x0"
    return LG(T, x0, a) @ "steps"


@gf.gen
def point(x, slope):
    return gf.normal(slope * x, 0.3) @ "y"


@gf.gen
def calm(x):
    return gf.normal(0.9 * x, 0.5) @ "x"


@gf.gen
def wild(x):
    return gf.normal(0.5 * x, 1.0) @ "x"


SWITCH = gf.Switch(calm, wild)
MAP = gf.Map(point, in_dims=(0, None))
NET = torch.nn.Linear(2, 3).double()
TORCH_GF = gf.TorchGenerativeFunction(NET)
A = torch.tensor(0.9)
XS = torch.linspace(-1.0, 1.0, 4)


def full_unfold_choices(rows: int, T: int, seed: int) -> gf.ChoiceMap:
    g = torch.Generator().manual_seed(seed)
    d = {}
    for t in range(T):
        d[(t, "x")] = torch.randn(rows, generator=g)
        d[(t, "y")] = torch.randn(rows, generator=g)
    return gf.ChoiceMap(d)


# (gen_fn, args with PerRow entries, a full per-row constraint map, per-row args of row i)
def cases():
    torch.manual_seed(0)
    locs = torch.randn(N)
    idx = torch.tensor([0, 1, 1, 0, 1])
    xin = torch.randn(N)
    ys = torch.randn(N, 4)
    x0s, x1s, y0s, y1s = (torch.randn(N) for _ in range(4))
    return {
        "distribution": (gf.normal, (gf.PerRow(locs), 0.7),
                         gf.ChoiceMap.value(torch.randn(N)), lambda i: (locs[i], 0.7)),
        "map": (MAP, (XS, gf.PerRow(locs)),
                gf.ChoiceMap({(j, "y"): ys[:, j] for j in range(4)}),
                lambda i: (XS, locs[i])),
        "switch": (SWITCH, (gf.PerRow(idx), gf.PerRow(xin)),
                   gf.ChoiceMap({"x": torch.randn(N)}), lambda i: (idx[i], xin[i])),
        "unfold": (LG, (2, gf.PerRow(xin), A), full_unfold_choices(N, 2, 1),
                   lambda i: (2, xin[i], A)),
        "gen": (wrapped, (2, A),
                gf.ChoiceMap({"x0": x0s, ("steps", 0, "x"): x1s, ("steps", 0, "y"): y0s,
                              ("steps", 1, "x"): y1s, ("steps", 1, "y"): x0s}),
                lambda i: (2, A)),
    }


def per_row_constraints(cm: gf.ChoiceMap, i: int) -> gf.ChoiceMap:
    return gf.ChoiceMap({k: v[i] for k, v in cm.items()})


@pytest.mark.parametrize("name", ["distribution", "map", "switch", "unfold", "gen"])
def test_batch_generate_with_full_constraints_equals_per_row_generate(name):
    gen_fn, args, cm, row_args = cases()[name]
    traces, w = gen_fn.batch_generate(N, args, gf.PerRow(cm))
    assert w.shape == (N,) and traces.score.shape == (N,)
    for i in range(N):
        tr_i, w_i = gen_fn.generate(row_args(i), per_row_constraints(cm, i))
        close(w[i], w_i)
        close(traces.score[i], tr_i.score)
        same_choices(row(traces, i).choices, tr_i.choices)


@pytest.mark.parametrize("name", ["distribution", "map", "switch", "unfold", "gen"])
def test_batch_generate_unconstrained_scores_its_own_draws(name):
    gen_fn, args, _cm, row_args = cases()[name]
    torch.manual_seed(3)
    traces, w = gen_fn.batch_generate(N, args, None)
    close(w, torch.zeros(N))
    for i in range(N):
        tr_i = row(traces, i)
        close(traces.score[i], gen_fn.assess(row_args(i), tr_i.choices)[0])


def test_torch_generative_function_batches_its_module():
    xs = torch.randn(N, 2)
    traces, w = TORCH_GF.batch_generate(N, (gf.PerRow(xs),), None)
    close(traces.retval, NET(xs))
    close(w, torch.zeros(N))
    tr, w2, rd, _ = TORCH_GF.batch_update(traces, (gf.PerRow(xs + 1),), (UC,), None)
    close(tr.retval, NET(xs + 1))
    close(w2, torch.zeros(N))


@gf.gen
def production(inp):
    x, depth = inp
    v = gf.normal(x, 1.0) @ "v"
    return gf.Production(v, [(v, depth + 1)] * (2 if depth < 1 else 0))


@gf.gen
def aggregation(v, results):
    return gf.normal(v + sum(results), 0.1) @ "r"


RECURSE = gf.Recurse(production, aggregation, 2)


def test_recurse_batch_generate_equals_per_row_generate():
    roots = torch.randn(N)
    values = {(i, part, a): torch.randn(N) for i in range(3)
              for part, a in (("production", "v"), ("aggregation", "r"))}
    cm = gf.ChoiceMap(values)
    traces, w = RECURSE.batch_generate(N, (gf.PerRow((roots, 0)),), gf.PerRow(cm))
    for i in range(N):
        tr_i, w_i = RECURSE.generate(((roots[i], 0),), per_row_constraints(cm, i))
        close(w[i], w_i)
        close(traces.score[i], tr_i.score)
    picked = RECURSE.batch_select(traces, torch.tensor([2, 2, 0, 1, 4]))
    close(picked.score, traces.score[torch.tensor([2, 2, 0, 1, 4])])


@pytest.mark.parametrize("name", ["map", "unfold", "gen"])
def test_batch_update_equals_per_row_update(name):
    """A deterministic edit: one choice re-constrained, arguments unchanged (Map: a new
    slope, which rescores every element)."""
    gen_fn, args, cm, row_args = cases()[name]
    traces, _ = gen_fn.batch_generate(N, args, gf.PerRow(cm))
    key, value = next(iter(cm.items()))
    new_vals = value + 0.25
    edit = gf.PerRow(gf.ChoiceMap({key: new_vals}))
    diffs = tuple(NC for _ in args)
    new, w, rd, discard = gen_fn.batch_update(traces, args, diffs, edit)
    for i in range(N):
        old_i = row(traces, i)
        new_i, w_i, rd_i, disc_i = gen_fn.update(old_i, row_args(i), diffs,
                                                 gf.ChoiceMap({key: new_vals[i]}))
        close(w[i], w_i)
        close(new.score[i], new_i.score)
        same_choices(row(new, i).choices, new_i.choices)
        same_choices(gf.ChoiceMap({k: v[i] for k, v in discard.items()}), disc_i)
        assert type(rd) is type(rd_i)


@pytest.mark.parametrize("name", ["distribution", "map", "switch", "unfold", "gen"])
def test_batch_regenerate_weight_is_the_unselected_score_change(name):
    gen_fn, args, cm, row_args = cases()[name]
    traces, _ = gen_fn.batch_generate(N, args, gf.PerRow(cm))
    key = next(iter(cm.items()))[0]
    sel = gf.select(key) if key else gf.selectall()
    torch.manual_seed(4)
    new, w, _ = gen_fn.batch_regenerate(traces, args, tuple(NC for _ in args), sel)
    for i in range(N):
        old_i, new_i = row(traces, i), row(new, i)
        expect = (new_i.score - gen_fn.project(new_i, sel)) - (old_i.score
                                                              - gen_fn.project(old_i, sel))
        close(w[i], expect, 1e-10)
        close(new.score[i], gen_fn.assess(row_args(i), new_i.choices)[0], 1e-10)


@pytest.mark.parametrize("name", ["distribution", "map", "switch", "unfold", "gen"])
def test_batch_select_picks_rows(name):
    gen_fn, args, cm, _ = cases()[name]
    traces, _ = gen_fn.batch_generate(N, args, gf.PerRow(cm))
    rows = torch.tensor([4, 0, 0, 2, 3])
    picked = gen_fn.batch_select(traces, rows)
    for k, r in enumerate(rows.tolist()):
        close(picked.score[k], traces.score[r])
        same_choices(row(picked, k).choices, row(traces, r).choices)


# ------------------------------------------------ a filter's history against per-row traces
def test_wrapped_unfold_filter_steps_equal_per_row_updates():
    """Extensions (every new choice constrained) and resampling of a batch of wrapped
    models, against the same edits applied to a list of single traces."""
    x0s = torch.randn(N)
    batch, _ = wrapped.batch_generate(N, (0, A), gf.PerRow(gf.ChoiceMap({"x0": x0s})))
    singles = [wrapped.generate((0, A), {"x0": x0s[i]})[0] for i in range(N)]
    g = torch.Generator().manual_seed(7)
    for t in range(6):
        xs, y = torch.randn(N, generator=g), torch.randn((), generator=g)
        cm = gf.PerRow(gf.ChoiceMap({("steps", t, "x"): xs,
                                     ("steps", t, "y"): y.expand(N)}))
        batch, w, _, _ = wrapped.batch_update(batch, (t + 1, A), (UC, NC), cm)
        outs = [wrapped.update(tr, (t + 1, A), (UC, NC),
                               {("steps", t, "x"): xs[i], ("steps", t, "y"): y})
                for i, tr in enumerate(singles)]
        for i, (tr_i, w_i, _, _) in enumerate(outs):
            close(w[i], w_i)
            close(batch.score[i], tr_i.score)
        singles = [o[0] for o in outs]
        anc = torch.randint(0, N, (N,), generator=g)
        batch = gf.select_batch(batch, anc)
        singles = [singles[a] for a in anc.tolist()]
        # each step is one shared history block: the new step only
        steps = batch.subtraces[("steps",)]
        assert steps.recent is None and steps.history.single and steps.history.start == t
    for i in range(N):
        same_choices(row(batch, i).choices, singles[i].choices)
        close(batch["steps", 5, "x"][i], singles[i]["steps", 5, "x"])
    close(batch.retval, torch.stack([s.retval for s in singles]))


def test_a_batch_step_of_a_wrapped_unfold_does_not_read_old_steps(monkeypatch):
    """pf_update, a proposal reading x_(t-1), resampling and an mh move on the newest step
    of a wrapped Unfold read no stored step but the newest ones: the history is not
    gathered."""
    from gfcomb.inference import mh, pf_initialize, pf_rejuvenate, pf_resample, pf_update

    @gf.gen
    def proposal(trace, t, y):
        prev = trace["x0"] if t == 0 else trace["steps", t - 1, "x"]
        gf.normal(0.5 * (prev + y), 0.7) @ ("steps", t, "x")

    state = pf_initialize(wrapped, (0, A), None, 50)
    reads: list[int] = []
    real = StepBlock.gather

    def spy(self, rows, after=0):
        reads.append(self.stop - after)
        return real(self, rows, after)

    monkeypatch.setattr(StepBlock, "gather", spy)
    for t in range(30):
        obs = {("steps", t, "y"): torch.tensor(0.1 * t)}
        state = pf_update(state, (t + 1, A), (UC, NC), obs, proposal, (t, obs[("steps", t, "y")]))
        state = pf_resample(state)
        state = pf_rejuvenate(state, mh, gf.select(("steps", t, "x")))
    assert state.traces.subtraces[("steps",)].length == 30
    assert reads and max(reads) <= 1  # only the newest step was ever gathered


def test_deferred_retval_is_built_on_use():
    """A body that uses a wrapped Unfold's return value gets it (built on first use)."""

    @gf.gen
    def uses_states(T):
        x0 = gf.normal(0.0, 1.0) @ "x0"
        xs = LG(T, x0, A) @ "steps"
        return xs.sum(-1) + x0

    tr, _ = uses_states.batch_generate(N, (0,), None)
    for t in range(3):
        tr, _, _, _ = uses_states.batch_update(tr, (t + 1,), (UC,), None)
        tr = gf.select_batch(tr, torch.tensor([1, 0, 2, 2, 4]))
    states = tr.subtraces[("steps",)].retval
    assert states.shape == (N, 3)
    close(tr.retval, states.sum(-1) + tr["x0"])


def test_reading_states_or_one_address_of_a_history_gathers_only_that():
    """``retval`` and ``tr[:, addr]`` of a resampled batch read one value per step; they
    equal what the full gather (every step's kernel trace) gives."""
    tr, _ = LG.batch_generate(N, (0, torch.tensor(0.0), A))
    g = torch.Generator().manual_seed(2)
    for t in range(8):
        tr, _, _, _ = LG.batch_update(tr, (t + 1, torch.tensor(0.0), A), (UC, NC, NC),
                                      {(t, "y"): torch.randn((), generator=g)})
        tr = gf.select_batch(tr, torch.randint(0, N, (N,), generator=g))
    states, xs, ys = tr.retval, tr[:, "x"], tr[:, "y"]
    full = tr.inner  # the gather of whole kernel traces
    assert states.shape == (N, 8)
    close(states, full.retval)
    close(xs, tr.choices[:, "x"])
    close(ys, tr.choices[:, "y"])


def history_bytes(block) -> int:
    """Bytes of tensor storage a history block chain holds (each storage once; a shared
    observation expanded to every row not counted)."""
    from gfcomb.core.pytree import tree_tensors

    seen, held = set(), 0
    while block is not None:
        for x in tree_tensors([block._choices, block._state, block._steps, block.parent_rows,
                               block._gathered]):
            if x.dim() and x.stride(0) == 0:
                continue  # the shared observation, expanded
            if x.untyped_storage().data_ptr() not in seen:
                seen.add(x.untyped_storage().data_ptr())
                held += x.untyped_storage().nbytes()
        block = block.parent
    return held


def test_a_filter_history_stores_choices_states_and_row_pointers_only():
    """The history of a particle filter on the 1-D SSM holds x (8 B) and a row pointer (8 B)
    per particle-step -- at most 2x the 16 B it must keep -- and the kernel traces rebuilt
    from it give back every score: each particle's total is the sum of its rebuilt steps'."""
    from gfcomb.inference import pf_initialize, pf_resample, pf_update

    n, T = 200, 40
    state = pf_initialize(LG, (0, torch.tensor(0.0), A), None, n)
    for t in range(T):
        state = pf_update(state, (t + 1, torch.tensor(0.0), A), (UC, NC, NC),
                          {(t, "y"): torch.tensor(0.1 * t)})
        state = pf_resample(state)
    assert history_bytes(state.traces.history) <= 2 * 16 * n * T
    tr = state.traces
    inner = tr.inner  # every step's kernel trace, rebuilt along each particle's ancestry
    close(inner.score.sum(-1), tr.score, 1e-9)
    close(inner.retval, tr[:, "x"])
    block, kept = tr.history.parent, 0
    while block is not None:  # reading everything kept nothing (the newest step keeps its
        kept += block._steps is not None  # kernel trace from the filter step itself)
        block = block.parent
    assert kept == 0


def test_a_rejuvenated_filter_history_stays_as_small():
    """With an MH move on the newest x after every resample, the wrapped model's history
    still holds x and a row pointer per particle-step (each moved step is closed into a
    stored block like an appended one), and every particle's score is the sum of its
    rebuilt steps' and x0's."""
    from gfcomb.inference import mh, pf_initialize, pf_rejuvenate, pf_resample, pf_update

    n, T = 200, 30
    state = pf_initialize(wrapped, (0, A), None, n)
    for t in range(T):
        state = pf_update(state, (t + 1, A), (UC, NC), {("steps", t, "y"): torch.tensor(0.1 * t)})
        state = pf_resample(state)
        state = pf_rejuvenate(state, mh, gf.select(("steps", t, "x")))
    state = pf_update(state, (T + 1, A), (UC, NC), {("steps", T, "y"): torch.tensor(0.0)})
    unfold = state.traces.subtraces[("steps",)]
    block = unfold.history.parent  # (the newest block also keeps its kernel trace)
    while block is not None:
        assert block._steps is None or block.start == 0  # (step 0: before any block)
        block = block.parent
    assert history_bytes(unfold.history) <= 2 * 16 * n * T
    inner = unfold.inner
    x0_score = state.traces.subtraces[("x0",)].score
    close(inner.score.sum(-1) + x0_score, state.traces.score, 1e-9)


@pytest.mark.parametrize("name", ["map", "switch", "unfold"])
def test_combinators_name_a_selection_that_is_not_one(name):
    gen_fn, args, cm, row_args = cases()[name]
    tr, _ = gen_fn.generate(row_args(0), per_row_constraints(cm, 0))
    for bad in ("x", {"x": 1}):
        with pytest.raises(gf.GFIError, match="gf.Selection"):
            gen_fn.regenerate(tr, row_args(0), tuple(NC for _ in args), bad)
        with pytest.raises(gf.GFIError, match="gf.Selection"):
            gen_fn.project(tr, bad)


def test_a_per_row_selection_is_not_taken_out_of_its_row_level():
    """Regression (found by the 10,000-tree law run): an Unfold inside a Repeat (a Map)
    inside a Recurse is regenerated with per-element selection flags; the @gen body then
    calls the Unfold per row instead of handing it a batch call with a batched selection."""
    from gfcomb.testing import strategies as S

    pool = dict(S.kernel_pool())
    _, model = S.recurse_node(S.repeat_node(S.unfold_node(
        ("k_normal", pool["k_normal"]), 1), 3), 1)
    torch.manual_seed(1)
    tr = model.simulate((torch.tensor(0.0),))
    for addr, _ in tr.choices.items():
        new, w, _ = tr.regenerate(gf.select(addr))  # (raised "tensor escaped from vmap")
        assert bool(torch.isfinite(w))
        close(new.score, model.assess(new.args, new.choices)[0], 1e-10)


@pytest.mark.parametrize("gen_fn, args", [(gf.normal, (0.0, 1.0)), (point, (0.5, 2.0)),
                                          (wrapped, (3, A))])
def test_unconstrained_generate_weighs_zero_per_row_and_alone(gen_fn, args):
    one, w1 = gen_fn.generate(args)
    assert w1.shape == one.score.shape == () and float(w1) == 0.0
    w1.add_(1.0)  # (a fresh tensor: writing into it changes no later weight)
    _, w2 = gen_fn.generate(args)
    assert float(w2) == 0.0
    traces, w = gen_fn.batch_generate(7, args)
    assert w.shape == (7,) and torch.equal(w, torch.zeros(7))
