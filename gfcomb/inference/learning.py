"""Parameter learning for generative functions with torch modules, over ``torch.optim``.

Two jobs, one loop (:func:`train`):

* **maximum likelihood** of a model's parameters given data: each datum is ``(args,
  observed choices)``; a batch of data runs as ONE ``Map(model)`` call (``generate`` with the
  observations as constraints), and ``accumulate_param_gradients`` with scale 1/B adds the
  gradient of the negative mean log-likelihood to the parameters' ``.grad``, so
  ``optimizer.step()`` ascends it;
* **amortized inference** ("inference compilation", the sleep phase of wake–sleep): a proposal
  ``q(latents; observations)`` is trained on traces simulated from the model to maximise
  E_{p(latents, obs)}[log q(latents; obs)] (:func:`train_proposal`, with the data made by
  :func:`simulated_data`).  The optimum is the exact posterior when q's family contains it.

Data come as a list of batches (cycled), an iterator, or a function called once per step.
A batch is ``(args, constraints)``: ``args`` a tuple of per-datum arguments stacked along
``in_dims`` (dimension 0 by default; ``None`` for an argument shared by every datum) and
``constraints`` a ChoiceMap (or dict) whose leaves carry the datum axis first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Union

import torch

from gfcomb.combinators.map import Map
from gfcomb.combinators.vector import mapped_length, normalize_in_dims
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.errors import ArgumentError
from gfcomb.core.gfi import GenerativeFunction, as_choicemap, check_args_tuple
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace
from gfcomb.core.vmap import batched_call
from gfcomb.inference.progress import progress_bar

__all__ = ["batch_log_likelihood", "simulated_data", "train", "train_proposal"]

Batch = tuple[tuple[Any, ...], Any]
Data = Union[Sequence[Batch], Iterator[Batch], Callable[[], Batch]]


def _batch_source(data: Data) -> Callable[[], Batch]:
    """A function returning the next batch: lists are cycled, iterators advanced,
    callables called."""
    if callable(data) and not isinstance(data, (Sequence, Iterator)):
        return data  # type: ignore[return-value]
    if isinstance(data, Iterator):
        def nxt() -> Batch:
            try:
                return next(data)  # type: ignore[arg-type]
            except StopIteration:
                raise ArgumentError("train: the data iterator ran out before n_steps steps; "
                                    "pass a list of batches (cycled) or a longer "
                                    "iterator") from None
        return nxt
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        batches = list(data)
        if not batches:
            raise ArgumentError("train: data is an empty list of batches")
        state = {"i": 0}

        def cycle() -> Batch:
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            return b
        return cycle
    if isinstance(data, Iterable):
        return _batch_source(iter(data))
    raise ArgumentError(f"train: data must be a list of batches, an iterator or a function "
                        f"returning a batch, got {type(data).__name__}")


def _unpack(batch: Any) -> tuple[tuple[Any, ...], ChoiceMap]:
    if not (isinstance(batch, tuple) and len(batch) == 2):
        raise ArgumentError("train: a batch must be a pair (args, constraints), got "
                            f"{type(batch).__name__}")
    args, constraints = batch
    return check_args_tuple(args, "a batch's args"), as_choicemap(constraints)


def batch_log_likelihood(gen_fn: GenerativeFunction, args: tuple[Any, ...],
                         constraints: Any, in_dims: Any = 0) -> tuple[Trace, torch.Tensor, int]:
    """Generate a batch of data as one ``Map(gen_fn)`` call: ``(trace, weight, B)``.

    ``args`` are per-datum arguments stacked along ``in_dims``; ``constraints`` hold the
    datum axis first on every leaf.

    Math: weight = Σ_b generate weight of datum b = Σ_b log p(obs_b; args_b) when every choice
    is observed (with latents sampled from the prior: Σ_b log p(obs_b | latents_b)).
    """
    args = check_args_tuple(args)
    mapped = Map(gen_fn, in_dims)
    dims = normalize_in_dims(in_dims, len(args), "train")
    n = mapped_length(args, dims, "train")
    cm = as_choicemap(constraints)
    stacked = ChoiceMap.from_stacked_block(cm, n) if not cm.is_empty() else cm
    trace, weight = mapped.generate(args, stacked)
    return trace, weight, n


def train(gen_fn: GenerativeFunction, data: Data, optimizer: torch.optim.Optimizer,
          n_steps: int, *, in_dims: Any = 0, progress: bool | None = None,
          desc: str = "train",
          callback: Callable[[int, float], None] | None = None) -> list[float]:
    """Maximise the mean log-likelihood of data batches by ``n_steps`` optimizer steps.

    Each step takes a batch ``(args, constraints)`` (see the module docstring), runs
    ``Map(gen_fn, in_dims).generate(args, constraints)`` (all B data in one vmapped call),
    zeroes the gradients, calls ``accumulate_param_gradients`` with scale 1/B and
    ``optimizer.step()``.  ``optimizer`` must hold (some of) ``gen_fn.parameters()``.
    Returns the loss history: −weight/B per step (the negative mean log-likelihood per datum
    when every choice is observed).  ``callback(step, loss)`` is called after each step; a
    tqdm bar shows the loss when stdout is a terminal (``progress=False`` turns it off).

    Math: θ.grad = −(1/B) Σ_b ∇θ log p(t_b; x_b), where t_b are datum b's choices (the
    constrained ones, plus any unconstrained choice sampled by ``generate``, as in Gen.jl's
    ``train!``); with every choice observed this is the exact gradient of the negative mean
    log-likelihood.
    """
    if not isinstance(gen_fn, GenerativeFunction):
        raise ArgumentError(f"train: gen_fn must be a generative function, got {gen_fn!r}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentError(f"train: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ArgumentError(f"train: n_steps must be a non-negative int, got {n_steps!r}")
    trained = {id(p) for p in gen_fn.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(id(p) in trained for p in held):
        raise ArgumentError("train: the optimizer holds none of the generative function's "
                            "parameters (build it from gen_fn.parameters())")
    next_batch = _batch_source(data)
    mapped = Map(gen_fn, in_dims)
    losses: list[float] = []
    bar = progress_bar(n_steps, desc=desc, progress=progress)
    for step in bar:
        args, constraints = _unpack(next_batch())
        trace, weight, n = batch_log_likelihood(gen_fn, args, constraints, in_dims)
        if n == 0:
            raise ArgumentError(f"train: batch {step} holds no data")
        optimizer.zero_grad(set_to_none=True)
        mapped.accumulate_param_gradients(trace, None, 1.0 / n)
        optimizer.step()
        loss = float(-weight.detach() / n)
        losses.append(loss)
        if callback is not None:
            callback(step, loss)
        if (step + 1) % 10 == 0 or step + 1 == n_steps:
            bar.set_postfix(loss=f"{loss:.4g}")
    bar.close()
    return losses


def simulated_data(model: GenerativeFunction, model_args: tuple[Any, ...],
                   proposal_args: Callable[[Trace], tuple[Any, ...]], latents: Selection,
                   batch_size: int) -> Callable[[], Batch]:
    """A data function for :func:`train` that trains a proposal on simulated model traces.

    Each call simulates ``batch_size`` traces of ``model(*model_args)`` in one vmapped call and
    returns ``(proposal args, latent choices)``: ``proposal_args(trace)`` (run per trace, e.g.
    ``lambda tr: (tr["y"],)`` to give the proposal the observations) and the trace's choices
    selected by ``latents`` (the addresses the proposal makes), each with the datum axis first.

    Math: (latents_b, obs_b) ~ p(·; model_args) i.i.d.; training on these batches maximises
    E_p[log q(latents; proposal_args(obs))], whose maximiser is the posterior p(latents | obs)
    when the proposal family contains it.
    """
    model_args = check_args_tuple(model_args, "model_args")
    if not isinstance(latents, Selection):
        raise ArgumentError("simulated_data: latents must be a Selection of the latent "
                            f"addresses, got {type(latents).__name__}")
    if not callable(proposal_args):
        raise ArgumentError("simulated_data: proposal_args must be a function trace -> tuple "
                            "of proposal arguments")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError(f"simulated_data: batch_size must be a positive int, got "
                            f"{batch_size!r}")

    def one(_: torch.Tensor) -> tuple[tuple[Any, ...], ChoiceMap]:
        tr = model.simulate(model_args)
        args = proposal_args(tr)
        if not isinstance(args, tuple):
            raise ArgumentError("simulated_data: proposal_args(trace) must return a tuple, "
                                f"got {type(args).__name__}")
        return args, tr.choices.filter(latents)

    sim = batched_call(one, (0,), vectorize=True, length=batch_size, who="simulated_data")

    def make() -> Batch:
        with torch.no_grad():
            return sim(torch.zeros(batch_size))

    return make


def train_proposal(proposal: GenerativeFunction, model: GenerativeFunction,
                   model_args: tuple[Any, ...],
                   proposal_args: Callable[[Trace], tuple[Any, ...]], latents: Selection,
                   optimizer: torch.optim.Optimizer, n_steps: int, *, batch_size: int = 64,
                   progress: bool | None = None,
                   callback: Callable[[int, float], None] | None = None) -> list[float]:
    """Train an amortized proposal on model simulations (inference compilation).

    ``proposal(*proposal_args(trace))`` must make choices at the ``latents`` addresses of the
    model.  Each step simulates ``batch_size`` model traces (:func:`simulated_data`) and takes
    one optimizer step of :func:`train` on the proposal with the latents as observations.
    Returns the loss history, −(1/B) Σ_b log q(latents_b; obs_b) per step (an estimate of
    the expected conditional cross-entropy, minimised by the posterior).

    Math: θ.grad = −(1/B) Σ_b ∇θ log q_θ(latents_b; proposal_args(t_b)), t_b ~ p(·; args).
    """
    data = simulated_data(model, model_args, proposal_args, latents, batch_size)
    return train(proposal, data, optimizer, n_steps, progress=progress, desc="train_proposal",
                 callback=callback)
