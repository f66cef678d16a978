"""Compiled steps (issue 12): ``compile_step`` replays a captured step exactly as the eager
step runs it (same seed: the same draws, weights, log-ML, choices), refuses what it cannot
replay, and the particle filter's deferred degeneracy check (``check_every``) raises the same
errors without a host read per step.

Exactness: with ``backend="none"`` the replayed graph runs the eager step's aten ops, so
results are bitwise equal; inductor fuses arithmetic, so its values computed by arithmetic
(scores, log-ML, a MALA proposal) agree to 1e-12 (float64) while the draws and accept
decisions, which come from the same generator calls, are equal.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_particle_filter import LG, lg_step  # the linear-Gaussian SSM of the PF oracle tests
from torch.utils._python_dispatch import TorchDispatchMode

import gfcomb as gf
from gfcomb.core.errors import ArgumentError, DegenerateWeightsError
from gfcomb.inference.compiled import CaptureError, compile_step, kernel_filter_step
from gfcomb.inference.mcmc import mala, mh
from gfcomb.inference.particle_filter import (
    log_ml_estimate,
    pf_check,
    pf_initialize,
    pf_resample,
    pf_update,
)
from gfcomb.inference.resampling import RESAMPLERS, no_flag, raise_flagged, static_shapes

A, S, N = 0.9, 0.5, 64
DIFFS = (gf.UnknownChange(), gf.NoChange(), gf.NoChange(), gf.NoChange())


@gf.gen
def two_normals(n):
    mu = gf.normal(0.0, 1.0) @ "mu"
    gf.normal(mu, 0.5) @ "y"
    return mu


def lg_args(t):
    return (t, torch.tensor(0.0), torch.tensor(A), torch.tensor(S))


def ys(T=12):
    return torch.randn(T, generator=torch.Generator().manual_seed(0))


def run_pf(obs, n, check_every=1, ess_threshold=None):
    state = pf_initialize(LG, lg_args(0), None, n, check_every=check_every)
    for t in range(obs.shape[0]):
        state = pf_update(state, lg_args(t + 1), DIFFS, {(t, "y"): obs[t]})
        state = pf_resample(state, "systematic", ess_threshold)
    return state


def run_kernel_filter(step, obs, n):
    x, log_ml = torch.zeros(n), torch.zeros(())
    flag = no_flag(log_ml)
    a, s = torch.tensor(A), torch.tensor(S)
    for t in range(obs.shape[0]):
        x, log_ml, flag = step(torch.tensor(t), x, log_ml, flag,
                               gf.ChoiceMap({"y": obs[t]}), a, s)
    raise_flagged(flag, n, "kernel filter")
    return x, log_ml


# ------------------------------------------------------------------ particle-filter step
def test_kernel_filter_step_is_the_pf_of_the_unfold():
    """Same seed: the kernel-level step draws exactly what pf_update + pf_resample on
    Unfold(kernel) draw (states equal, log-ML to rounding)."""
    obs = ys()
    torch.manual_seed(5)
    state = run_pf(obs, N)
    torch.manual_seed(5)
    x, log_ml = run_kernel_filter(kernel_filter_step(lg_step, N), obs, N)
    assert torch.equal(x, state.traces.retval[:, -1])
    assert float(log_ml) == pytest.approx(float(log_ml_estimate(state)), abs=1e-12)


@pytest.mark.parametrize("backend", ["none", "inductor"])
def test_compiled_filter_step_equals_eager(backend):
    obs = ys()
    step = kernel_filter_step(lg_step, N)
    torch.manual_seed(7)
    x0, lml0 = run_kernel_filter(step, obs, N)
    compiled = compile_step(step, backend=backend)
    torch.manual_seed(7)
    x1, lml1 = run_kernel_filter(compiled, obs, N)
    assert len(compiled.graphs) == 1  # one capture serves every step
    assert torch.equal(x0, x1)
    if backend == "none":
        assert torch.equal(lml0, lml1)
    else:
        assert float(lml1) == pytest.approx(float(lml0), abs=1e-12)


def test_compiled_filter_step_keeps_the_degeneracy_check():
    obs = ys(6).clone()
    obs[3] = math.nan
    step = compile_step(kernel_filter_step(lg_step, N), backend="none")
    with pytest.raises(DegenerateWeightsError, match="kernel filter at step 3: .*NaN"):
        run_kernel_filter(step, obs, N)


@pytest.mark.parametrize("method", ["systematic", "stratified", "multinomial"])
def test_static_shapes_draws_the_same_ancestors(method):
    """The scatter_add form (static output shapes) gives the bincount form's ancestors."""
    w = torch.rand(1000, generator=torch.Generator().manual_seed(4)) ** 4
    torch.manual_seed(9)
    plain = RESAMPLERS[method](w, 700)
    torch.manual_seed(9)
    with static_shapes():
        static = RESAMPLERS[method](w, 700)
    assert torch.equal(plain, static)


def test_compiled_filter_step_at_many_particles():
    """N above the resamplers' small-N form: the O(N) resampling is captured too."""
    obs, n = ys(4), 1000
    step = kernel_filter_step(lg_step, n)
    torch.manual_seed(8)
    x0, lml0 = run_kernel_filter(step, obs, n)
    torch.manual_seed(8)
    x1, lml1 = run_kernel_filter(compile_step(step), obs, n)
    assert torch.equal(x0, x1)
    assert float(lml1) == pytest.approx(float(lml0), abs=1e-12)


# ------------------------------------------------------------------ MCMC steps
@pytest.mark.parametrize("backend", ["none", "inductor"])
@pytest.mark.parametrize("kernel", ["mh", "mala"])
def test_compiled_mcmc_step_equals_eager(kernel, backend):
    traces, _ = two_normals.batch_generate(N, (1,), gf.ChoiceMap({"y": 0.3}))
    sel = gf.select("mu")

    def step(tr):
        return mh(tr, sel) if kernel == "mh" else mala(tr, sel, 0.2)

    compiled = compile_step(step, backend=backend)
    runs = []
    for f in (step, compiled):
        torch.manual_seed(11)
        tr, accepted = traces, []
        for _ in range(6):
            tr, acc = f(tr)
            accepted.append(acc)
        runs.append((tr, torch.stack(accepted)))
    (t0, a0), (t1, a1) = runs
    assert type(t1) is type(t0) and t1.gen_fn is two_normals
    assert torch.equal(a0, a1) and 0 < a0.float().mean() < 1
    assert torch.equal(t0["y"], t1["y"])
    if backend == "none":
        assert torch.equal(t0["mu"], t1["mu"]) and torch.equal(t0.score, t1.score)
    else:  # (MALA's gradient step is fused: values to rounding)
        torch.testing.assert_close(t1["mu"], t0["mu"], rtol=0, atol=1e-12)
        torch.testing.assert_close(t1.score, t0.score, rtol=0, atol=1e-12)
    assert len(compiled.graphs) == 1


def test_passed_through_values_come_back_as_they_are():
    """An output that is an input tensor (a choice the move did not touch) is handed back as
    that tensor, not copied through the graph, as the eager step returns it; another view of
    an input stays a view of it."""
    step = compile_step(lambda x, y: (x, y * 2, {"x": x, "view": x.view(3), "row": x[:2]}),
                        backend="none")
    x, y = torch.ones(3), torch.arange(3.0)
    a, b, d = step(x, y)
    # (a view covering the input the same way is that input's values: handed back as it)
    assert a is x and d["x"] is x and d["view"] is x and torch.equal(b, 2 * y)
    assert torch.equal(d["row"], x[:2]) and d["row"].data_ptr() == x.data_ptr()
    a, b, d = step(b, x)  # the same structure, other tensors
    assert torch.equal(a, 2 * y) and torch.equal(b, 2 * x) and len(step.graphs) == 1


def test_another_layout_is_captured_anew():
    """Graphs are compiled for the strides they saw: a transposed input gets its own graph
    (and the right values), not a replay that assumes the first layout."""
    step = compile_step(lambda m: m.cumsum(1), backend="none")
    m = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(step(m), m.cumsum(1))
    t = torch.arange(6.0).reshape(3, 2).t()
    assert torch.equal(step(t), t.cumsum(1)) and len(step.graphs) == 2


def test_returned_trace_fed_back_then_another_trace():
    """The chain loop feeds each returned trace back in (its walk is reused); a trace of
    another batch size afterwards is captured anew and gives what the eager step gives."""
    sel = gf.select("mu")

    def step(tr):
        return mh(tr, sel)

    compiled = compile_step(step, backend="none")
    for n in (N, 2 * N):
        traces, _ = two_normals.batch_generate(n, (1,), gf.ChoiceMap({"y": 0.3}))
        runs = []
        for f in (step, compiled):
            torch.manual_seed(5)
            tr = traces
            for _ in range(3):
                tr, _acc = f(tr)
            runs.append(tr)
        assert torch.equal(runs[0]["mu"], runs[1]["mu"])
        assert torch.equal(runs[0].score, runs[1].score)
    assert len(compiled.graphs) == 2


# ------------------------------------------------------------------ what is refused
def test_host_read_is_refused():
    def step(x):
        return x + 1 if float(x.sum()) > 0 else x - 1

    with pytest.raises(CaptureError, match="reads on the host"):
        compile_step(step, backend="none")(torch.ones(3))


def test_host_read_after_a_gfi_call_is_refused():
    """The per-step check of pf_update's check_every=1 (float of the weights' max) inside a
    step of batch GFI calls: refused, not baked into the graph."""
    state = pf_initialize(two_normals, (1,), {"y": 0.3}, N)

    def step(traces):
        new, w, _, _ = two_normals.batch_update(traces, (1,), (gf.NoChange(),),
                                                gf.ChoiceMap({"y": 0.5}))
        if not math.isfinite(float(w.max())):
            raise AssertionError
        return new

    with pytest.raises(CaptureError, match="reads on the host"):
        compile_step(step, backend="none")(state.traces)


def test_growing_unfold_history_is_refused():
    """A pf step over a batched Unfold trace keeps the new step's tensors in the trace's
    shared history (static data): refused at capture."""
    obs = ys(3)
    state = run_pf(obs[:2], N)
    rows = torch.arange(N)

    def step(traces, y):
        new, _w, _, _ = LG.batch_update(traces, lg_args(3), DIFFS, gf.ChoiceMap({(2, "y"): y}))
        return LG.batch_select(new, rows)

    with pytest.raises(CaptureError, match="static part"):
        compile_step(step, backend="none")(state.traces, obs[2])


def test_changing_structure_is_refused_after_max_graphs():
    step = compile_step(lambda x, k: x * k, backend="none", max_graphs=2)
    x = torch.ones(2)
    assert torch.equal(step(x, 2), 2 * x) and torch.equal(step(x, 3), 3 * x)
    assert torch.equal(step(x, 2), 2 * x)  # a captured structure is reused
    with pytest.raises(CaptureError, match="change structure"):
        step(x, 4)


def test_unregistered_record_with_tensors_is_refused():
    """(A ParticleFilterState is such a record: pf_* steps cannot be passed one.)"""
    state = pf_initialize(two_normals, (1,), {"y": 0.3}, N)
    with pytest.raises(CaptureError, match="ParticleFilterState holds tensors"):
        compile_step(lambda st: st.log_weights + 1, backend="none")(state)

    class Box:
        def __init__(self, t):
            self.t = t

    with pytest.raises(CaptureError, match="Box holds tensors"):
        compile_step(lambda b: b.t + 1, backend="none")(Box(torch.ones(2)))


def test_bad_arguments():
    with pytest.raises(ArgumentError, match="step must be callable"):
        compile_step(3)
    with pytest.raises(ArgumentError, match="backend"):
        compile_step(lambda x: x, backend="xla")
    with pytest.raises(ArgumentError, match="max_graphs"):
        compile_step(lambda x: x, max_graphs=0)
    with pytest.raises(ArgumentError, match="check_every"):
        pf_initialize(LG, lg_args(0), None, 10, check_every=0)
    with pytest.raises(ArgumentError, match="n_particles"):
        kernel_filter_step(lg_step, 0)


# ------------------------------------------------------------------ deferred degeneracy check
class ScalarReads(TorchDispatchMode):
    """Counts the host reads of tensor values (item, float, bool of a tensor)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ess_threshold", [None, N / 2])
def test_deferred_check_reads_nothing_between_checks(ess_threshold):
    obs = ys(8)
    state = run_pf(obs[:2], N, check_every=5)
    reads = ScalarReads()
    with reads:
        for t in range(2, 4):  # steps 3 and 4: no check due
            state = pf_update(state, lg_args(t + 1), DIFFS, {(t, "y"): obs[t]})
            state = pf_resample(state, "systematic", ess_threshold)
    assert reads.count == 0
    with reads:
        state = pf_update(state, lg_args(5), DIFFS, {(4, "y"): obs[4]})  # step 5: the check
    assert reads.count == 1
    # the per-step check reads twice per step (pf_update's max, pf_resample's ESS)
    eager = run_pf(obs[:2], N)
    with reads:
        pf_resample(pf_update(eager, lg_args(3), DIFFS, {(2, "y"): obs[2]}), "systematic",
                    ess_threshold)
    assert reads.count == 2 + (ess_threshold is not None)


def test_deferred_check_gives_the_same_filter():
    obs = ys()
    torch.manual_seed(3)
    a = run_pf(obs, N)
    torch.manual_seed(3)
    b = run_pf(obs, N, check_every=4)
    assert torch.equal(a.traces.retval, b.traces.retval)
    assert float(log_ml_estimate(b)) == pytest.approx(float(log_ml_estimate(a)), abs=1e-12)


def test_deferred_ess_threshold_on_the_device():
    """ESS above the threshold: rows and weights kept (as pf_resample returning the state);
    below: the same resampling as the per-step check makes with the same seed."""
    obs = ys(2)

    def one_step(check_every):
        torch.manual_seed(1)
        state = run_pf(obs[:1], N, check_every=check_every)
        return pf_update(state, lg_args(2), DIFFS, {(1, "y"): obs[1]})

    s1, s3 = one_step(1), one_step(3)
    kept = pf_resample(s3, "systematic", ess_threshold=0.5)
    assert torch.equal(kept.log_weights, s3.log_weights)
    assert torch.equal(kept.traces.retval, s3.traces.retval)
    assert torch.equal(log_ml_estimate(kept), log_ml_estimate(s3))
    for method in ("systematic", "stratified"):
        torch.manual_seed(2)
        r1 = pf_resample(s1, method, ess_threshold=N + 1)
        torch.manual_seed(2)
        r3 = pf_resample(s3, method, ess_threshold=N + 1)
        assert torch.equal(r1.traces.retval, r3.traces.retval)
        assert float(log_ml_estimate(r3)) == pytest.approx(float(log_ml_estimate(r1)),
                                                          abs=1e-12)


def _impossible_at(state, step):
    """pf_update to ``step`` with an observation the model gives density 0 (NaN y)."""
    return pf_update(state, lg_args(step), DIFFS, {(step - 1, "y"): torch.tensor(math.nan)})


def test_deferred_check_raises_at_the_kth_step_naming_the_first_bad_one():
    obs = ys()
    state = run_pf(obs[:3], N, check_every=3)  # steps 1-3, checked at 3
    state = pf_resample(_impossible_at(state, 4), "systematic")  # bad at step 4: no read yet
    state = pf_update(state, lg_args(5), DIFFS, {(4, "y"): obs[4]})
    with pytest.raises(DegenerateWeightsError, match=r"pf_update at step 4: .*NaN"):
        pf_update(pf_resample(state), lg_args(6), DIFFS, {(5, "y"): obs[5]})  # step 6
    with pytest.raises(DegenerateWeightsError, match=r"pf_check at step 4: .*NaN"):
        pf_check(state)
    assert pf_check(run_pf(obs[:2], N, check_every=3)) is not None


def test_deferred_check_all_minus_inf():
    state = run_pf(ys(1), N, check_every=10)
    bad = pf_update(state, lg_args(2), DIFFS, None)
    bad = type(bad)(bad.traces, torch.full((N,), -math.inf), bad.log_ml_base, bad.step,
                    bad.model, bad.args, check_every=10, flag=no_flag(bad.log_ml_base))
    out = pf_resample(bad, "multinomial")  # no read; flagged
    with pytest.raises(DegenerateWeightsError,
                       match=rf"pf_check at step 2: .*all {N} log weights are -inf"):
        pf_check(out)


def test_group_needs_per_step_check():
    with pytest.raises(ArgumentError, match="check_every must be 1 with a group"):
        pf_initialize(LG, lg_args(0), None, 10, group="world", check_every=2)
