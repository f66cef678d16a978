"""Particle filters and MCMC chains over the processes of a ``torch.distributed`` group
(DESIGN §11): group helpers, collective log-sum-exp / ESS, the global systematic draw, the
exchange of particle rows between ranks, and error propagation.

Transport is ``torch.distributed`` itself (gloo for CPU tensors, NCCL for CUDA tensors,
launched by ``torchrun``); gfcomb adds no transport of its own.  Every collective gfcomb
makes is an asynchronous ``torch.distributed`` call waited on with the group's timeout
(:class:`Group`), so a rank that died or hangs makes the others raise
:class:`~gfcomb.core.errors.CollectiveTimeoutError` instead of waiting for ever.

Error propagation: every collective ``pf_*`` call computes its local part first and then
all-gathers one small float64 packet per rank, ``[failed, stats...]``.  A rank whose local
part raised sends ``failed = 1`` (and NaN stats) instead of leaving, so every rank learns of
the failure in the same collective and raises :class:`~gfcomb.core.errors.RankFailedError`
naming the failed ranks and their errors (the failed rank's own error is the ``__cause__``).

Resampling (:func:`resample_rows`), N particles over R ranks, rank r holding n_r (the
share :func:`share`):

1. one all-gather of ``[failed, step, m_r, s_r, q_r, u_r]`` (local max log weight, Σ
   exp(lw − m_r), Σ exp(2(lw − m_r)), a uniform): every rank gets the global log-sum-exp,
   the ESS and the prefix sums of the weights of the ranks before it, and takes rank 0's
   uniform as the one shared offset u;
2. systematic resampling of the *global* weights with the points (u + k)/N: the number of
   offspring of each local particle follows from the local cumulative weights shifted by
   the prefix -- the same draw as a single process resampling the concatenated weights,
   without sending a single weight (other resamplers all-gather the N log weights instead,
   rank 0 draws and broadcasts the N ancestors);
3. every rank knows how many offspring each rank has (O_r); rank r keeps min(O_r, n_r) of
   its own and sends its surplus O_r − n_r to the ranks short of their share, matched in
   rank order (:func:`migration`), so only Σ_r max(0, O_r − n_r) rows move;
4. the rows that move are turned into tensors with :func:`gfcomb.persistence.to_payload`
   (what ``gf.save`` stores: every choice, score, argument and return value of the row, the
   shared step history of a batched Unfold trace gathered for those rows), packed into one
   buffer per dtype and sent with ``all_to_all_single`` (after an all-gather of
   ``[failed, structure checksum]`` that checks every rank has the same trace structure).
   A rank that receives rows rebuilds its batch from its kept rows' payload and the received
   rows (:func:`gfcomb.persistence.from_payload`); a rank that only sends or keeps re-indexes
   its batch with ``batch_select`` (shared histories untouched).
"""

from __future__ import annotations

import datetime
import math
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from gfcomb.core.batched import select_batch
from gfcomb.core.errors import (
    ArgumentError,
    CollectiveTimeoutError,
    DegenerateWeightsError,
    DistributedError,
    RankFailedError,
)
from gfcomb.persistence import from_payload, to_payload

__all__ = ["Group", "as_group", "gather_stats", "global_ess", "global_logsumexp",
           "global_sum", "guarded", "init_group", "migration", "resample_rows", "share"]

#: the timeout (seconds) of every collective when a plain ProcessGroup is given
DEFAULT_TIMEOUT = 300.0


@attrs.frozen
class Group:
    """A ``torch.distributed`` process group with the timeout gfcomb waits on each of its
    collectives with, and the device its small packets live on (CUDA for NCCL).

    ``pg`` is None for the default (world) group.
    """

    pg: Any
    rank: int
    size: int
    timeout: float = DEFAULT_TIMEOUT
    device: torch.device = torch.device("cpu")


def as_group(group: Any, who: str, timeout: float | None = None) -> Group | None:
    """``group`` as a :class:`Group` (None stays None): a :class:`Group`, a
    ``torch.distributed.ProcessGroup`` (``dist.group.WORLD`` included) or ``"world"``.
    ArgumentError unless ``torch.distributed`` is initialized."""
    if group is None or isinstance(group, Group):
        return group
    if not (dist.is_available() and dist.is_initialized()):
        raise ArgumentError(f"{who}: group={group!r} but torch.distributed is not initialized "
                            "(call gfcomb.inference.distributed.init_group() or "
                            "torch.distributed.init_process_group first)")
    pg = None if group == "world" else group
    if pg is not None and not isinstance(pg, dist.ProcessGroup):
        raise ArgumentError(f"{who}: group must be a torch.distributed ProcessGroup, a "
                            f"gfcomb Group or 'world', got {type(group).__name__}")
    backend = dist.get_backend(pg)
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    return Group(pg, dist.get_rank(pg), dist.get_world_size(pg),
                 DEFAULT_TIMEOUT if timeout is None else float(timeout), device)


def init_group(backend: str | None = None, timeout: float = 120.0) -> Group:
    """Initialize ``torch.distributed`` from the environment ``torchrun`` sets (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and return the world :class:`Group`.

    ``backend``: "gloo" (CPU tensors) or "nccl" (CUDA tensors); default NCCL when CUDA is
    available, else gloo.  With NCCL the process's CUDA device is set to LOCAL_RANK.
    ``timeout`` (seconds) bounds every collective.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    out = as_group("world", "init_group", timeout)
    assert out is not None
    return out


def share(n: int, g: Group, rank: int | None = None) -> int:
    """The number of the ``n`` global rows that ``rank`` (default: this rank) holds: n // R,
    plus one for the first n mod R ranks."""
    r = g.rank if rank is None else rank
    return n // g.size + (1 if r < n % g.size else 0)


# ------------------------------------------------------------------ collectives
def _wait(work: Any, g: Group, who: str) -> None:
    try:
        work.wait(timeout=datetime.timedelta(seconds=g.timeout))
    except RuntimeError as err:  # gloo / NCCL timeouts and closed connections
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise CollectiveTimeoutError(
            f"{who}: rank {g.rank} of {g.size}: a collective failed or did not complete "
            f"within {g.timeout:g} s ({first}); another rank died, hangs, or did not make the "
            "same call") from None


def _all_gather(x: torch.Tensor, g: Group, who: str) -> torch.Tensor:
    """[R, *x.shape]: every rank's ``x`` (same shape on every rank), in rank order."""
    if g.size == 1:  # (a gloo all-gather costs ~1 ms even alone)
        return x[None]
    out = [torch.empty_like(x) for _ in range(g.size)]
    _wait(dist.all_gather(out, x.contiguous(), group=g.pg, async_op=True), g, who)
    return torch.stack(out)


def _broadcast(x: torch.Tensor, g: Group, who: str) -> torch.Tensor:
    if g.size == 1:
        return x
    src = dist.get_global_rank(g.pg, 0) if g.pg is not None else 0
    _wait(dist.broadcast(x, src, group=g.pg, async_op=True), g, who)
    return x


def _raise_failed(g: Group, who: str, failed: list[int], error: BaseException | None) -> None:
    msg = "" if error is None else f"{type(error).__name__}: {error}"
    messages: list[Any] = [None] * g.size
    try:  # the error texts (every rank is alive: they all just answered)
        dist.all_gather_object(messages, msg, group=g.pg)
    except RuntimeError:
        messages = [None] * g.size
    what = "; ".join(f"rank {r}: {messages[r] or 'failed'}" for r in failed)
    raise RankFailedError(f"{who}: {len(failed)} of the {g.size} ranks raised ({what})"
                          ) from error


def gather_stats(g: Group, who: str, local: Callable[[], tuple[Sequence[Any], Any]],
                 n_stats: int) -> tuple[torch.Tensor, Any]:
    """Run ``local()`` (which returns ``(stats, result)``, ``stats`` a sequence of numbers
    and 1-d tensors, ``n_stats`` numbers in all) on every rank and all-gather
    ``[failed, *stats]``: returns ``(stats of every rank [R, n_stats] float64, this rank's
    result)``.

    If ``local`` raised on any rank, every rank raises :class:`RankFailedError` (naming the
    ranks and their errors); a DistributedError raised by ``local`` itself (a collective
    inside it failed: the group is broken) propagates as it is.
    """
    error: BaseException | None = None
    result: Any = None
    try:
        stats, result = local()
        packet = torch.cat([torch.as_tensor(s, dtype=torch.float64).reshape(-1).cpu()
                            for s in (0.0, *stats)]).to(g.device)
    except DistributedError:
        raise
    except Exception as err:  # noqa: BLE001 - every error must reach the other ranks
        error = err
        packet = torch.full((1 + n_stats,), math.nan, dtype=torch.float64, device=g.device)
        packet[0] = 1.0
    if packet.shape[0] != 1 + n_stats:
        raise DistributedError(f"{who}: internal: {packet.shape[0] - 1} stats, not {n_stats}")
    every = _all_gather(packet, g, who).cpu()
    failed = [r for r in range(g.size) if every[r, 0] != 0]
    if failed:
        _raise_failed(g, who, failed, error)
    return every[:, 1:], result


def guarded(g: Group, who: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank, then one all-gather of a failure flag: if any rank raised,
    every rank raises :class:`RankFailedError`."""
    return gather_stats(g, who, lambda: ((), fn()), 0)[1]


def _local_sums(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, Σ exp(lw − m), Σ exp(2(lw − m))) with m = max lw (0, 0 when every lw is -inf)."""
    m = torch.amax(log_w, 0)
    if bool(m == -math.inf):
        z = log_w.new_zeros(())
        return m, z, z
    w = torch.exp(log_w - m)
    return m, w.sum(), (w * w).sum()


def _combine(stats: torch.Tensor) -> tuple[float, float, float]:
    """From per-rank rows ``[m, s, q]``: (global max M, Σ w, Σ w²) with w = exp(lw − M).
    Computed from the gathered tensor, so bitwise the same on every rank."""
    m, s, q = stats[:, 0], stats[:, 1], stats[:, 2]
    big = float(torch.amax(m))
    if not math.isfinite(big):
        return big, math.nan, math.nan
    scale = torch.exp(m - big)
    return big, float((s * scale).sum()), float((q * scale * scale).sum())


def _check_global(stats: torch.Tensor, who: str, step: int | str | None) -> None:
    bad = [r for r in range(stats.shape[0]) if not math.isfinite(float(stats[r, 0]))
           and not float(stats[r, 0]) == -math.inf]
    if bad or float(torch.amax(stats[:, 0])) == -math.inf:
        where = "" if step is None else f" at step {step}"
        what = (f"rank(s) {bad} hold NaN or +inf log weights" if bad else
                f"all log weights on all {stats.shape[0]} ranks are -inf (no particle is "
                "consistent with the observations)")
        raise DegenerateWeightsError(f"{who}{where}: degenerate importance weights: {what}. "
                                     "Check the observations against the model's support, "
                                     "or use a proposal that reaches the data.")


def global_max(local: Callable[[], tuple[Any, ...]], g: Group, who: str,
               step: int | str | None) -> tuple[Any, ...]:
    """Run ``local()`` (which returns a tuple whose first item is this rank's log weights)
    under the failure flag and check the weights of all ranks: DegenerateWeightsError on
    every rank when the global max is NaN, +inf or -inf.  Returns what ``local`` returned."""
    def run() -> tuple[list[Any], Any]:
        out = local()
        return [torch.amax(out[0], 0)], out

    stats, result = gather_stats(g, who, run, 1)
    _check_global(stats, who, step)
    return result  # type: ignore[no-any-return]


def global_logsumexp(log_w: torch.Tensor, g: Group, who: str) -> torch.Tensor:
    """log Σ_i exp(lw_i) over the rows of every rank (the same value on every rank)."""
    stats, _ = gather_stats(g, who, lambda: (_local_sums(log_w), None), 3)
    big, s, _ = _combine(stats)
    return torch.tensor(big + math.log(s) if math.isfinite(big) else big,
                        dtype=log_w.dtype, device=log_w.device)


def global_sum(x: torch.Tensor, group: Any, who: str = "global_sum") -> torch.Tensor:
    """Σ over the ranks of ``x`` (any shape, the same on every rank), summed in rank order:
    the same value on every rank (e.g. a weighted mean over every particle,
    ``global_sum((state.normalized_weights[:, None] * x).sum(0), state.group)``).
    Collective."""
    g = as_group(group, who)
    if g is None:
        return x
    stats, _ = gather_stats(g, who, lambda: ([x.reshape(-1)], None), x.numel())
    return stats.sum(0).reshape(x.shape).to(dtype=x.dtype, device=x.device)


def global_ess(log_w: torch.Tensor, g: Group, who: str) -> torch.Tensor:
    """Kish's ESS (Σ w)² / Σ w² of the weights of every rank (the same on every rank)."""
    stats, _ = gather_stats(g, who, lambda: (_local_sums(log_w), None), 3)
    _, s, q = _combine(stats)
    return torch.tensor(s * s / q, dtype=log_w.dtype, device=log_w.device)


# ------------------------------------------------------------------ resampling
def migration(offspring: Sequence[int], shares: Sequence[int]) -> list[list[int]]:
    """``X[src][dst]``: how many rows rank ``src`` sends rank ``dst`` so that every rank
    ends with its share: ranks with more offspring than their share send the surplus, in
    rank order, to the ranks with fewer (the minimum number of moved rows,
    Σ_r max(0, O_r − n_r))."""
    size = len(shares)
    surplus = [max(0, o - n) for o, n in zip(offspring, shares)]
    deficit = [max(0, n - o) for o, n in zip(offspring, shares)]
    x = [[0] * size for _ in range(size)]
    dst = 0
    for src in range(size):
        while surplus[src]:
            while deficit[dst] == 0:
                dst += 1
            k = min(surplus[src], deficit[dst])
            x[src][dst] += k
            surplus[src] -= k
            deficit[dst] -= k
    return x


def _systematic_counts(log_w: torch.Tensor, stats: torch.Tensor, n: int, g: Group
                       ) -> tuple[torch.Tensor, list[int]]:
    """Offspring counts of the local particles under global systematic resampling (points
    (u + k)/N, u = rank 0's uniform), and the offspring total of every rank."""
    m_r, s_r = stats[:, 0], stats[:, 1]
    big = float(torch.amax(m_r))
    mass = s_r * torch.exp(m_r - big)  # each rank's Σ w, w = exp(lw − M)
    prefix = torch.cat([mass.new_zeros(1), torch.cumsum(mass, 0)])
    total = prefix[-1]
    u = stats[0, 3]
    bounds = torch.ceil(prefix * (n / total) - u).clamp_(0, n).to(torch.long)
    bounds[0], bounds[-1] = 0, n
    lo, hi = int(bounds[g.rank]), int(bounds[g.rank + 1])
    m = float(m_r[g.rank])
    if m == -math.inf:
        return torch.zeros(log_w.shape[0], dtype=torch.long, device=log_w.device), \
            (bounds[1:] - bounds[:-1]).tolist()
    cdf = torch.cumsum(torch.exp(log_w.double() - m), 0) * math.exp(m - big)
    below = torch.ceil((cdf + float(prefix[g.rank])) * (n / float(total)) - float(u))
    below = below.clamp_(lo, hi).to(torch.long)
    below[-1] = hi
    counts = torch.diff(below, prepend=below.new_full((1,), lo))
    return counts, (bounds[1:] - bounds[:-1]).tolist()


def _general_counts(log_w: torch.Tensor, resampler: Callable[..., torch.Tensor], n: int,
                    big: float, g: Group, who: str) -> tuple[torch.Tensor, list[int]]:
    """Offspring counts for any resampler: the N log weights all-gathered (padded to the
    largest share), rank 0 draws the ancestors, broadcast to every rank."""
    shares = [share(n, g, r) for r in range(g.size)]
    width = max(shares)
    pad = log_w.new_full((width,), -math.inf)
    pad[:log_w.shape[0]] = log_w
    every = _all_gather(pad.to(g.device), g, who).to(log_w.device)
    flat = torch.cat([every[r, :shares[r]] for r in range(g.size)])
    drawn = torch.zeros(n + 1, dtype=torch.long, device=g.device)  # [failed, ancestors]
    error: BaseException | None = None
    if g.rank == 0:
        try:
            drawn[1:] = resampler(torch.exp(flat - big), n)
        except Exception as err:  # noqa: BLE001 - the other ranks must hear of it
            error, drawn[0] = err, 1
    drawn = _broadcast(drawn, g, who)
    if int(drawn[0]):
        _raise_failed(g, who, [0], error)
    ancestors = drawn[1:].to(log_w.device)
    counts_all = torch.bincount(ancestors, minlength=n)
    start = sum(shares[:g.rank])
    per_rank = [int(c.sum()) for c in torch.split(counts_all, shares)]
    return counts_all[start:start + shares[g.rank]], per_rank


def resample_rows(traces: Any, log_w: torch.Tensor, n: int, g: Group, who: str, step: int,
                  resampler: Callable[..., torch.Tensor] | None,
                  ess_threshold: float | None) -> tuple[Any, float] | None:
    """Global resampling of the particles of every rank (see the module docstring).

    ``resampler`` None means systematic.  Returns ``(new local traces, global logsumexp of
    the weights)``, or None when ``ess_threshold`` is given and the global ESS is at least
    it (then nothing else is communicated).  Collective.
    """
    def local() -> tuple[list[Any], None]:
        m, s, q = _local_sums(log_w)
        u = torch.rand((), dtype=torch.float64)
        return [float(step), m, s, q, u], None

    stats, _ = gather_stats(g, who, local, 5)
    if bool((stats[:, 0] != step).any()):
        raise DistributedError(f"{who}: the ranks are at different steps "
                               f"({stats[:, 0].to(torch.long).tolist()}): every rank must make "
                               "the same pf_* calls")
    stats = stats[:, 1:]
    _check_global(stats, who, step)
    big, s, q = _combine(stats)
    if ess_threshold is not None and s * s / q >= ess_threshold:
        return None
    if resampler is None:
        counts, offspring = _systematic_counts(log_w, stats, n, g)
    else:
        counts, offspring = _general_counts(log_w, resampler, n, big, g, who)
    shares = [share(n, g, r) for r in range(g.size)]
    plan = migration(offspring, shares)
    ancestors = torch.repeat_interleave(
        torch.arange(log_w.shape[0], device=log_w.device), counts)
    mine = shares[g.rank]
    keep, send = ancestors[:mine], ancestors[mine:]
    if any(any(row) for row in plan):
        new = exchange_rows(traces, keep, send, plan, g, who)
    else:
        new = select_batch(traces, keep)
    return new, big + math.log(s)


def _tensor_leaves(payload: Any) -> tuple[list[Any], Any, list[int]]:
    leaves, spec = pytree.tree_flatten(payload)
    return leaves, spec, [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]


def _wire(dtype: torch.dtype) -> torch.dtype:
    return torch.uint8 if dtype == torch.bool else dtype


def _structure(leaves: list[Any], rows: int, who: str) -> int:
    """A checksum of the payload's structure (dtypes, row shapes, static parts); every
    tensor leaf must have ``rows`` rows."""
    parts = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            if x.dim() == 0 or x.shape[0] != rows:
                raise DistributedError(f"{who}: a trace leaf of shape {tuple(x.shape)} has no "
                                       f"row axis of {rows}: cannot send its rows")
            parts.append(f"T{x.dtype}{tuple(x.shape[1:])}")
        else:
            parts.append(repr(x))
    return zlib.crc32("|".join(parts).encode())


def exchange_rows(traces: Any, keep: torch.Tensor, send: torch.Tensor,
                  plan: list[list[int]], g: Group, who: str) -> Any:
    """This rank's new batch: rows ``keep`` of ``traces`` plus the rows the other ranks send
    it under ``plan`` (``X[src][dst]``); this rank sends rows ``send`` (in destination
    order).  Collective: one all-gather of a structure checksum, one ``all_to_all_single``
    per dtype of the trace's leaves."""
    r = g.rank
    n_in = sum(plan[q][r] for q in range(g.size))

    def local() -> tuple[list[Any], Any]:
        # what to send (possibly nothing), and a template of the structure when receiving
        out_rows = send if send.numel() else keep[:0]
        payload, _ = to_payload(select_batch(traces, out_rows))
        leaves, _, idx = _tensor_leaves(payload)
        check = _structure(leaves, out_rows.shape[0], who)
        return [float(check)], (leaves, idx)

    stats, (leaves, idx) = gather_stats(g, who, local, 1)
    if bool((stats[:, 0] != stats[0, 0]).any()):
        raise DistributedError(f"{who}: the ranks' traces differ in structure (checksums "
                               f"{stats[:, 0].to(torch.long).tolist()}): every rank must run "
                               "the same model with the same arguments")
    dtypes = sorted({_wire(leaves[i].dtype) for i in idx}, key=str)
    widths = {i: math.prod(leaves[i].shape[1:]) for i in idx}
    k_out = send.shape[0]
    received: dict[torch.dtype, torch.Tensor] = {}
    for dt in dtypes:
        cols = [i for i in idx if _wire(leaves[i].dtype) == dt]
        w = sum(widths[i] for i in cols)
        buf = torch.cat([leaves[i].reshape(k_out, widths[i]).to(dt) for i in cols], 1).reshape(-1)
        out = buf.new_empty(n_in * w)
        work = dist.all_to_all_single(out, buf.contiguous(),
                                      [plan[q][r] * w for q in range(g.size)],
                                      [plan[r][q] * w for q in range(g.size)],
                                      group=g.pg, async_op=True)
        _wait(work, g, who)
        received[dt] = out.reshape(n_in, w)
    if n_in == 0:
        return select_batch(traces, keep)
    payload, names = to_payload(select_batch(traces, keep))
    mine, spec, mine_idx = _tensor_leaves(payload)
    offsets = dict.fromkeys(dtypes, 0)
    for i in mine_idx:
        x = mine[i]
        dt = _wire(x.dtype)
        w = widths[i]
        got = received[dt][:, offsets[dt]:offsets[dt] + w].to(x.dtype)
        offsets[dt] += w
        mine[i] = torch.cat([x, got.reshape((n_in, *x.shape[1:])).to(x.device)], 0)
    return from_payload(pytree.tree_unflatten(mine, spec), names)
