"""Benchmark: many-chain MCMC on a Bayesian logistic regression, gfcomb's kernels on a batch of
chains against the same moves hand-written in batched torch, in the same process, interleaved.

Model: w ~ N(0, I_D), y_j ~ Bernoulli(sigmoid(x_j · w)) for N data points (a shared design
matrix X, D = 20, N = 200), C = 1,000 chains, float64, torch threads 1.  Each move starts
from the same batch of chains:

* ``mh``: ``mh(traces, select("w"))``: the prior proposal (``batch_regenerate``);
* ``mala``: ``mala(traces, select("w"), tau)``;
* ``hmc``: ``hmc(traces, select("w"), 10, eps)``: 10 leapfrog steps;
* ``value_grad``: ``gfcomb.core.gradients.choice_value_gradients(traces, select("w"))``
  (every row's ∇_w log p: what the moves use) against autograd on the sum over chains;
* ``grad``: ``choice_gradients(traces, select("w"))``, which also returns every row's
  gradient with respect to the shared X, against ``vmap(grad(logp, argnums=(0, 1)))``.

The hand-written moves keep the chains as a [C, D] tensor, write log p (the same formula:
``y log p + (1 - y) log(1 - p)`` and the normal prior) and take its gradient with autograd
on the sum over chains; MH keeps the current log-likelihood.  Also timed: each kernel run per
chain under one ``torch.func.vmap`` (the general path the batch path is tested equal to).
Reported: median ms per move (thread CPU time, median of interleaved repeats) and the ratios.

    python benchmarks/bench_mcmc.py            # full run; rewrites its section of RESULTS.md
    python benchmarks/bench_mcmc.py --quick    # smoke run (seconds); RESULTS.md untouched
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _results
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for gfcomb

from _results import load_average, save_section, time_calls  # noqa: E402

import gfcomb as gf  # noqa: E402
from gfcomb.core.gradients import choice_value_gradients  # noqa: E402
from gfcomb.inference import hmc, mala, mh  # noqa: E402

SECTION = "Many-chain MCMC (issue 12)"
D, N = 20, 200
TAU, EPS, LEAPFROG = 0.002, 0.02, 10


def make_problem(chains: int, seed: int = 0) -> tuple[gf.GenerativeFunction, gf.Trace,
                                                       torch.Tensor, torch.Tensor]:
    """The model, a batch of ``chains`` traces with y observed, X and y."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g)
    w_true = torch.randn(D, generator=g)
    y = (torch.rand(N, generator=g) < torch.sigmoid(X @ w_true)).to(X.dtype)

    @gf.gen
    def logreg(X):
        w = gf.normal(torch.zeros(D), 1.0) @ "w"
        gf.bernoulli(torch.sigmoid(X @ w)) @ "y"

    traces, _ = logreg.batch_generate(chains, (X,), gf.ChoiceMap({"y": y}))
    return logreg, traces, X, y


# ------------------------------------------------------------------ hand-written
def hand_moves(X: torch.Tensor, y: torch.Tensor):
    """The three moves and the gradient on chains stored as a [C, D] tensor."""

    def loglik(w: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(w @ X.T)
        return (y * torch.log(p) + (1 - y) * torch.log1p(-p)).sum(-1)

    def logp(w: torch.Tensor) -> torch.Tensor:
        return loglik(w) - 0.5 * (w * w).sum(-1) - 0.5 * D * math.log(2 * math.pi)

    def grad(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.detach().requires_grad_(True)
        with torch.enable_grad():
            lp = logp(w)
            (g,) = torch.autograd.grad(lp.sum(), w)
        return lp.detach(), g

    def accept(w: torch.Tensor, new: torch.Tensor, log_alpha: torch.Tensor):
        acc = torch.log(torch.rand_like(log_alpha)) < log_alpha
        return torch.where(acc[:, None], new, w), acc

    def mh_move(w: torch.Tensor, ll: torch.Tensor):
        new = torch.randn_like(w)
        ll_new = loglik(new)
        w2, acc = accept(w, new, ll_new - ll)
        return w2, torch.where(acc, ll_new, ll)

    def mala_move(w: torch.Tensor):
        std = math.sqrt(2 * TAU)
        lp, g = grad(w)
        mu = w + TAU * g
        new = mu + std * torch.randn_like(w)
        lp_new, g_new = grad(new)
        mu_back = new + TAU * g_new
        fwd = -0.5 * (((new - mu) / std) ** 2).sum(-1)
        bwd = -0.5 * (((w - mu_back) / std) ** 2).sum(-1)
        return accept(w, new, lp_new - lp + bwd - fwd)

    def hmc_move(w: torch.Tensor):
        lp, g = grad(w)
        p0 = torch.randn_like(w)
        p, x = p0, w
        for _ in range(LEAPFROG):
            p = p + (EPS / 2) * g
            x = x + EPS * p
            lp_new, g = grad(x)
            p = p + (EPS / 2) * g
        log_alpha = lp_new - lp - 0.5 * (p * p).sum(-1) + 0.5 * (p0 * p0).sum(-1)
        return accept(w, x, log_alpha)

    def logp_one(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(x @ v)
        return ((y * torch.log(p) + (1 - y) * torch.log1p(-p)).sum() - 0.5 * (v * v).sum()
                - 0.5 * D * math.log(2 * math.pi))

    def vmap_grad(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ∂/∂w and ∂/∂X (what choice_gradients returns), the vmap way."""
        return torch.func.vmap(torch.func.grad(logp_one, argnums=(0, 1)), (0, None))(w, X)

    return mh_move, mala_move, hmc_move, grad, vmap_grad, loglik


def measure(chains: int, repeats: int, inner: int) -> dict[str, dict[str, float]]:
    """ms per move of every variant."""
    model, traces, X, y = make_problem(chains)
    sel = gf.select("w")
    w0 = traces["w"].clone()
    h_mh, h_mala, h_hmc, h_grad, h_vgrad, loglik = hand_moves(X, y)
    ll0 = loglik(w0)

    def per_chain(kernel):
        return lambda: torch.func.vmap(kernel, randomness="different")(traces)

    cases = {
        "mh": (lambda: mh(traces, sel), per_chain(lambda t: mh(t, sel)),
               lambda: h_mh(w0, ll0)),
        "mala": (lambda: mala(traces, sel, TAU), per_chain(lambda t: mala(t, sel, TAU)),
                 lambda: h_mala(w0)),
        "hmc": (lambda: hmc(traces, sel, LEAPFROG, EPS),
                per_chain(lambda t: hmc(t, sel, LEAPFROG, EPS)), lambda: h_hmc(w0)),
        "value_grad": (lambda: choice_value_gradients(traces, sel),
                       per_chain(lambda t: choice_value_gradients(t, sel)),
                       lambda: h_grad(w0)),
        "grad": (lambda: model.choice_gradients(traces, sel),
                 per_chain(lambda t: model.choice_gradients(t, sel)), lambda: h_vgrad(w0)),
    }
    out = {}
    p0 = torch.sigmoid(w0 @ X.T).detach()

    def bern_grad(logpdf):
        def run():
            p = p0.clone().requires_grad_(True)
            with torch.enable_grad():
                return torch.autograd.grad(logpdf(p).sum(), p)
        return run

    t_gf, t_formula = time_calls(
        bern_grad(lambda p: gf.bernoulli.logpdf(y, p)),
        bern_grad(lambda p: y * torch.log(p) + (1 - y) * torch.log1p(-p)),
        inner=inner, repeats=repeats, warmup=2, clock=time.thread_time)
    out["bernoulli"] = {"gfcomb": t_gf * 1e3, "formula": t_formula * 1e3}
    print(f"bernoulli log-density, forward + backward on [C, N]: gfcomb {t_gf * 1e3:.2f} ms, "
          f"the formula {t_formula * 1e3:.2f} ms", flush=True)
    for name, (batch, vmapped, hand) in cases.items():
        times = time_calls(batch, vmapped, hand, inner=inner, repeats=repeats, warmup=2,
                           clock=time.thread_time)
        r = out[name] = {"batch": times[0] * 1e3, "vmap": times[1] * 1e3,
                         "hand": times[2] * 1e3}
        print(f"{name:>10}: gfcomb batch {r['batch']:.2f} ms, per-chain vmap {r['vmap']:.2f}, "
              f"hand-written {r['hand']:.2f}: batch/hand {r['batch'] / r['hand']:.2f}x, "
              f"vmap/hand {r['vmap'] / r['hand']:.2f}x", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; RESULTS.md untouched")
    parser.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--chains", type=int, default=1_000)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    chains = 100 if opts.quick else opts.chains
    repeats, inner = (2, 1) if opts.quick else (9, 3)
    print(f"load average at start: {load_average():.2f}; C = {chains:,} chains, D = {D}, "
          f"N = {N}")
    res = measure(chains, repeats, inner)
    load = load_average()
    print(f"load average at end: {load:.2f}")
    names = {"mh": "`mh` (prior proposal)", "mala": f"`mala` (τ = {TAU})",
             "hmc": f"`hmc` ({LEAPFROG} leapfrog steps, ε = {EPS})",
             "value_grad": "`choice_value_gradients` (∇_w log p per row)",
             "grad": "`choice_gradients` (∇_w and the per-row ∂/∂X; hand: `vmap(grad)`)"}
    table = ["| move | gfcomb, batch ms | hand-written ms | **batch / hand** | "
             "gfcomb per-chain vmap ms | vmap / hand |", "|---|---:|---:|---:|---:|---:|"]
    bern = res.pop("bernoulli")
    for k, r in res.items():
        table.append(f"| {names[k]} | {r['batch']:.2f} | {r['hand']:.2f} | "
                     f"**{r['batch'] / r['hand']:.2f}x** | {r['vmap']:.2f} | "
                     f"{r['vmap'] / r['hand']:.2f}x |")
    body = f"""Written by `benchmarks/bench_mcmc.py`. torch {torch.__version__}, Python
{platform.python_version()}, {platform.machine()} CPU ({os.cpu_count()} cores, torch threads 1),
float64, load average {load:.1f} at the end (thread CPU time, so other load matters less).

Bayesian logistic regression (D = {D}, N = {N}, shared X), C = {chains:,} chains in one
batched trace; each move from the same batch; median over {repeats} interleaved repeats of
{inner} calls.  Hand-written: the chains as a [C, D] tensor, the same log p, autograd on the
sum over chains.  "per-chain vmap": the kernel run per chain under one `torch.func.vmap`
(the general path, what a batched trace ran before issue 12).

{chr(10).join(table)}

What remains: every gradient evaluation runs `gf.bernoulli`'s log-density on [C, N] (two
`torch.where`s, so that p ∈ {{0, 1}} gives no NaN gradient and values outside {{0, 1}} get
−inf); forward + backward it takes {bern['gfcomb']:.2f} ms against
{bern['formula']:.2f} ms for `y log p + (1 − y) log(1 − p)` (what the hand-written moves use),
once per gradient (11 times per HMC move).  `mala` and `hmc` also keep every chain's trace:
a `batch_update` at the proposal (whose own graph gives the gradient there: no second
forward pass) and the row-wise accept of the Bernoulli's [C, N] parameter.
"""
    save_section(SECTION, body, not (opts.quick or opts.no_write))


if __name__ == "__main__":
    main()
