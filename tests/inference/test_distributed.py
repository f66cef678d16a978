"""Particle filters and MCMC chains over several processes (torch.distributed, gloo, CPU).

Every multi-process test spawns its ranks with ``torch.multiprocessing`` (spawn), on a free
port of 127.0.0.1 only, with a process-group timeout of 30 s and a join deadline of 120 s
(the ranks are killed and the test fails past it); each rank writes what it measured to a
file the test then checks.  The 1-D linear-Gaussian filter (T = 50, 20,000 global particles)
is checked against the Kalman log-likelihood: the bootstrap filter's log-ML standard
deviation at 20,000 particles is 0.035-0.05 (tests/test_particle_filter.py), so the 0.1
bound asked for is a ~2-3 sigma test with a fixed seed per rank; equality across ranks is
exact (the same gathered numbers on every rank).
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# the linear-Gaussian model, its data and the Kalman oracle of the one-process tests
from test_particle_filter import LG, A, S, T, lg_data  # noqa: E402
from test_particle_filter import kalman as kalman_filter  # noqa: E402

import gfcomb as gf
from gfcomb.inference import distributed as gdist
from gfcomb.inference.convergence import rhat_ess
from gfcomb.inference.particle_filter import (
    effective_sample_size,
    log_ml_estimate,
    pf_initialize,
    pf_rejuvenate,
    pf_resample,
    pf_update,
)

N = 20_000
NC = gf.NoChange()
JOIN_TIMEOUT = 120.0
GROUP_TIMEOUT = 30.0


# ------------------------------------------------------------------ the model and oracle
@gf.gen
def lg_model(n, x_init, a, s):
    """The Unfold under a @gen function: a batched Unfold history inside a @gen trace."""
    return LG(n, x_init, a, s) @ "steps"


def kalman(ys):
    """The exact log p(y_0:T)."""
    return kalman_filter(ys)[0]


X0 = torch.tensor(0.0)


def lg_args(n):
    return (n, X0, torch.tensor(A), torch.tensor(S))


def lg_step_args(state, t, ys):
    return pf_update(state, lg_args(t + 1), (gf.UnknownChange(), NC, NC, NC),
                     {("steps", t, "y"): ys[t]})


def history(traces, steps):
    """[rows, steps]: every particle's path x_0..x_{steps-1}."""
    return torch.stack([traces[("steps", t, "x")] for t in range(steps)], 1)


# ------------------------------------------------------------------ spawning ranks
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, task, args):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1000 + rank)
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
        group = gdist.Group(None, rank, world, float(args.get("timeout", GROUP_TIMEOUT)))
        result = TASKS[task](rank, world, group, **args)
    except BaseException:  # noqa: BLE001 - reported to the test through the file
        result = {"crashed": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if result.get("no_destroy"):  # a group broken on purpose: leave without tearing it down
        os._exit(0)  # (gloo may abort in the teardown of a group with a timed-out call)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(world, task, tmp_path, **args):
    """Run ``TASKS[task]`` on ``world`` spawned ranks; every rank's result dict, in rank
    order.  Bounded: the ranks are killed after JOIN_TIMEOUT seconds."""
    ctx = mp.start_processes(_entry, (world, _free_port(), str(tmp_path), task, args),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{task} on {world} ranks did not finish in {JOIN_TIMEOUT} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(out):
        assert "crashed" not in res, f"rank {r}:\n{res['crashed']}"
    return out


# ------------------------------------------------------------------ rank tasks
def task_filter(rank, world, group, method="systematic", n=N, steps=T, check_step=10,
                timeout=GROUP_TIMEOUT):
    ys = lg_data(steps)
    state = pf_initialize(lg_model, lg_args(0), None, n, group=group)
    out = {"share0": int(state.log_weights.shape[0]), "n": state.n_particles}
    for t in range(steps):
        state = lg_step_args(state, t, ys)
        if t == check_step:  # the ancestry of one resampling step, checked by the test
            out["old_paths"] = history(state.traces, t + 1)
            out["old_lw"] = state.log_weights.clone()
            out["ess_before"] = float(effective_sample_size(state))
        state = pf_resample(state, method)
        if t == check_step:
            out["new_paths"] = history(state.traces, t + 1)
    out.update(log_ml=float(log_ml_estimate(state)), ess=float(effective_sample_size(state)),
               exact=kalman(ys), weights=state.log_weights.clone(),
               share=int(state.traces.score.shape[0]), step=state.step)
    # the threshold form: ESS is full after resampling, so nothing happens (no exchange)
    out["same_state"] = pf_resample(state, method, ess_threshold=n / 2) is state
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gf_dist_{os.getpid()}.pt"
    gf.save(state, path)  # a rank's state saves and loads as a one-process state of its share
    back = gf.load(path)
    path.unlink()
    out["loaded"] = (back.n_particles, back.group is None,
                     float(back.traces.score.sum() - state.traces.score.sum()))
    return out


@gf.gen
def normal_mean(ys):
    mu = gf.normal(0.0, 2.0) @ "mu"
    for i in range(ys.shape[0]):
        gf.normal(mu, 1.0) @ ("y", i)
    return mu


YS_CHAIN = torch.tensor([0.8, 1.9, 1.1, 0.4, 1.5])


def task_chains(rank, world, group, chains=8, steps=400, timeout=GROUP_TIMEOUT):
    obs = gf.ChoiceMap({("y", i): YS_CHAIN[i] for i in range(YS_CHAIN.shape[0])})
    traces, _ = normal_mean.batch_generate(chains, (YS_CHAIN,), obs)
    res = gf.inference.run_chain(traces, lambda t: gf.inference.mh(t, gf.select("mu")),
                                 steps, addresses=["mu"], burn_in=50, group=group,
                                 progress=False)
    return {"rhat": res.rhat["mu"], "ess": res.ess["mu"], "rate": res.acceptance_rate,
            "local_rates": res.acceptance_rates, "samples": res.samples["mu"]}


def task_failure(rank, world, group, timeout=GROUP_TIMEOUT):
    ys = lg_data(3)
    state = pf_initialize(lg_model, lg_args(0), None, 100, group=group)
    state = lg_step_args(state, 0, ys)
    out = {}
    bad = {("steps", 0, "y"): ys[1]} if rank != 1 else {("nowhere",): ys[1]}
    t0 = time.monotonic()
    try:  # rank 1 constrains an address the model never visits
        pf_update(state, lg_args(2), (gf.UnknownChange(), NC, NC, NC), bad)
    except gf.RankFailedError as err:
        out["update"] = (str(err), type(err.__cause__).__name__, time.monotonic() - t0)
    try:  # a kernel that raises on rank 0 only
        pf_rejuvenate(state, lambda tr: (_ for _ in ()).throw(ValueError("boom"))
                      if rank == 0 else tr)
    except gf.RankFailedError as err:
        out["rejuvenate"] = str(err)
    # the group still works after a propagated failure
    out["log_ml"] = float(log_ml_estimate(state))
    if rank == 1:  # rank 1 hangs past the timeout: rank 0's next call must time out
        time.sleep(timeout + 2)
        return out | {"no_destroy": True}
    t0 = time.monotonic()
    try:
        effective_sample_size(state)
    except gf.CollectiveTimeoutError as err:
        out["timeout"] = (str(err), time.monotonic() - t0)
    return out | {"no_destroy": True}


def task_both(rank, world, group, filter_args, chain_args, timeout=GROUP_TIMEOUT):
    """The filter, then chains, in the same ranks (one spawn: start-up is most of the cost)."""
    return {"filter": task_filter(rank, world, group, **filter_args),
            "chains": task_chains(rank, world, group, **chain_args)}


TASKS = {"filter": task_filter, "chains": task_chains, "failure": task_failure,
         "both": task_both}


# ------------------------------------------------------------------ the tests
def _check_filter(out, world, n=N, tol=0.1, systematic=True, steps=T):
    shares = [n // world + (r < n % world) for r in range(world)]
    assert [o["share"] for o in out] == shares and [o["share0"] for o in out] == shares
    assert all(o["n"] == n and o["step"] == steps for o in out)
    # log-ML and ESS: global, bitwise equal on every rank; log-ML near the Kalman value
    assert len({o["log_ml"] for o in out}) == 1 and len({o["ess"] for o in out}) == 1
    assert abs(out[0]["log_ml"] - out[0]["exact"]) < tol
    assert out[0]["ess"] == pytest.approx(n, rel=1e-9)  # uniform weights after resampling
    assert all(torch.equal(o["weights"], torch.zeros(s)) for o, s in zip(out, shares))
    assert all(o["same_state"] for o in out)
    assert [o["loaded"][:2] for o in out] == [(s, True) for s in shares]
    assert all(abs(o["loaded"][2]) < 1e-9 for o in out)
    # the resampling step: every new particle's whole path (the Unfold history, rows sent
    # between ranks included) is an old particle's path, each old particle having
    # floor(N w_i) or ceil(N w_i) copies (systematic resampling of the global weights)
    old = torch.cat([o["old_paths"] for o in out])
    new = torch.cat([o["new_paths"] for o in out])
    lw = torch.cat([o["old_lw"] for o in out])
    expected = n * torch.softmax(lw, 0)
    # (the newest step's x is drawn afresh per particle: it tells the old paths apart)
    order = torch.argsort(old[:, -1])
    pos = torch.searchsorted(old[order, -1].contiguous(), new[:, -1].contiguous())
    parent = order[pos.clamp(max=n - 1)]
    assert torch.equal(new, old[parent])  # every new path is an old one, all steps
    copies = torch.bincount(parent, minlength=n).to(torch.float64)
    if systematic:
        assert bool(((copies >= torch.floor(expected) - 1e-6)
                     & (copies <= torch.ceil(expected) + 1e-6)).all())
    assert float(copies.sum()) == n
    assert len({o["ess_before"] for o in out}) == 1
    assert out[0]["ess_before"] == pytest.approx(float(torch.exp(
        2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0))), rel=1e-9)


def test_filter_and_chains_on_2_ranks(tmp_path):
    """20,000 global particles (10,000 per rank) against the Kalman filter; 2 x 8 chains."""
    out = run_ranks(2, "both", tmp_path, filter_args={}, chain_args={})
    _check_filter([o["filter"] for o in out], 2)
    _check_chains([o["chains"] for o in out], 2)


@pytest.mark.slow  # 16-45 s on the shared 2-core machine (4 processes on 2 cores, load 3-6)
def test_filter_and_chains_on_4_ranks(tmp_path):
    """20,000 global particles (5,000 per rank) against the Kalman filter; 4 x 4 chains."""
    out = run_ranks(4, "both", tmp_path, filter_args={},
                    chain_args={"chains": 4, "steps": 300})
    _check_filter([o["filter"] for o in out], 4)
    _check_chains([o["chains"] for o in out], 4, chains=4)


def test_filter_and_chains_on_4_ranks_small(tmp_path):
    """What the slow test checks, at CI size: 4,000 particles, T = 20, 4 x 2 chains.  4,000
    particles: the log-ML sd is ~0.1 at T = 50, less at T = 20; 0.4 is a >4-sigma bound."""
    out = run_ranks(4, "both", tmp_path, filter_args={"n": 4_002, "steps": 20},
                    chain_args={"chains": 2, "steps": 200})
    _check_filter([o["filter"] for o in out], 4, n=4_002, tol=0.4, steps=20)
    _check_chains([o["chains"] for o in out], 4, chains=2)


def test_filter_with_another_resampler_on_2_ranks(tmp_path):
    """Residual resampling: the N weights all-gathered, rank 0 draws, ancestors broadcast."""
    out = run_ranks(2, "filter", tmp_path, method="residual", n=4_001, steps=20)
    # 4,001 particles: the log-ML sd is ~0.1 at T = 50, less at T = 20, so 0.4 is a
    # >4-sigma bound; an odd N gives the ranks unequal shares (2,001 and 2,000)
    _check_filter(out, 2, 4_001, tol=0.4, systematic=False, steps=20)


def _check_chains(out, world, chains=8):
    assert len({float(o["rate"]) for o in out}) == 1
    assert all(torch.equal(o["rhat"], out[0]["rhat"]) for o in out)
    assert all(torch.equal(o["ess"], out[0]["ess"]) for o in out)
    # the same as one process computing them over all the chains
    samples = torch.cat([o["samples"] for o in out], 1)
    assert samples.shape[1] == chains * world
    rhat, ess = rhat_ess({"mu": samples}, 1)
    assert float(out[0]["rhat"]) == pytest.approx(float(rhat["mu"]), rel=1e-9)
    assert float(out[0]["ess"]) == pytest.approx(float(ess["mu"]), rel=1e-9)
    rate = float(torch.cat([o["local_rates"] for o in out], 1).mean())
    assert float(out[0]["rate"]) == pytest.approx(rate, rel=1e-12)
    assert 0.99 < float(out[0]["rhat"]) < 1.05  # converged chains of a conjugate model
    assert 100 < float(out[0]["ess"]) < samples.numel()


def test_a_failing_rank_makes_every_rank_raise_and_a_dead_one_times_out(tmp_path):
    out = run_ranks(2, "failure", tmp_path, timeout=2.0)
    for o in out:
        msg, cause, took = o["update"]
        assert "1 of the 2 ranks raised" in msg and "rank 1: UnvisitedConstraintError" in msg
        assert took < 10
        assert "rank 0: ValueError: boom" in o["rejuvenate"]
    assert out[1]["update"][1] == "UnvisitedConstraintError"  # the cause, on its rank
    assert out[0]["update"][1] == "NoneType"
    assert out[0]["log_ml"] == out[1]["log_ml"]
    msg, took = out[0]["timeout"]
    assert "did not complete within 2 s" in msg and "timed out" in msg and 1.5 < took < 20


# ------------------------------------------------------------------ one process
def test_migration_moves_only_the_surplus():
    assert gdist.migration([5, 5], [5, 5]) == [[0, 0], [0, 0]]
    assert gdist.migration([8, 2], [5, 5]) == [[0, 3], [0, 0]]
    plan = gdist.migration([0, 9, 1, 10], [5, 5, 5, 5])
    assert plan == [[0, 0, 0, 0], [4, 0, 0, 0], [0, 0, 0, 0], [1, 0, 4, 0]]
    moved = sum(map(sum, plan))
    assert moved == sum(max(0, o - 5) for o in [0, 9, 1, 10])


def test_rhat_ess_match_arviz():
    az = pytest.importorskip("arviz")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g).cumsum(0) * 0.1 + torch.randn(200, 6, generator=g)
    x[:, 0] += 0.5  # one chain off: R-hat above 1
    rhat, ess = rhat_ess({"a": x}, 1)  # [draws, chains]; ArviZ takes [chains, draws]
    ref_r = float(az.rhat(x.T.numpy(), method="split"))
    ref_e = float(az.ess(x.T.numpy(), method="mean"))
    assert ref_r > 1.05
    assert float(rhat["a"]) == pytest.approx(ref_r, rel=1e-10)
    assert float(ess["a"]) == pytest.approx(ref_e, rel=1e-10)


def test_group_without_torch_distributed_is_refused():
    assert not dist.is_initialized()
    with pytest.raises(gf.ArgumentError, match="torch.distributed is not initialized"):
        pf_initialize(lg_model, lg_args(0), None, 10, group="world")


# ------------------------------------------------------------------ the example
def _example(*launcher):
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run([*launcher, str(root / "examples" / "distributed_tracking.py")],
                          capture_output=True, text=True, env=env, timeout=JOIN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    pf = float(re.search(r"\(particle filter\): (-?[\d.]+)", out).group(1))
    exact = float(re.search(r"\(Kalman, exact\)\s*: (-?[\d.]+)", out).group(1))
    # 4,000 particles, T = 30: the log-ML sd is ~0.2 (half tracking_2d's 2,000-particle
    # ~0.3 spread, measured there), so 1.0 is a ~5-sigma bound (and the seeds are fixed)
    assert abs(pf - exact) < 1.0
    assert float(re.search(r"last position: ([\d.]+)", out).group(1)) < 0.5
    return out


def test_example_runs_in_one_process_and_under_torchrun():
    assert "1 rank(s), 4,000 particles" in _example(sys.executable)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    out = _example(*torchrun)
    assert "2 rank(s), 4,000 particles in all (2,000 per rank)" in out and "gloo" in out


def test_bad_input_with_a_group_is_refused_before_any_collective():
    four = gdist.Group(None, 0, 4)  # (never used for a collective: the checks come first)
    with pytest.raises(gf.ArgumentError, match=r"n_particles \(3\) must be at least"):
        pf_initialize(lg_model, lg_args(0), None, 3, group=four)
    with pytest.raises(gf.ArgumentError, match="need at least 4 kept draws"):
        rhat_ess({"mu": torch.zeros(3, 2)})
    assert [gdist.share(10, four, r) for r in range(4)] == [3, 3, 2, 2]
