"""Moves made on a whole batch of chains at once: the per-row accept step.

A kernel on a batch (one leading row axis) proposes for every row with the model's batch
methods; :func:`accept_rows` then keeps, row by row, the proposal or the old trace, passing
leaves that both sides share (an argument or observation expanded to every row) through
unmerged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gfcomb.core.errors import GFIError
from gfcomb.core.pytree import tree_where_alike
from gfcomb.core.trace import Trace


def accept_rows(traces: Trace, make_move: Callable[[], tuple[Trace, torch.Tensor, Any]],
                log_u: torch.Tensor | None,
                per_chain: Callable[[], tuple[Trace, Any]]) -> tuple[Trace, torch.Tensor]:
    """A move made on the whole batch at once (``make_move()``: proposed batch, log α per
    row, anything), accepted or rejected per row: ``(traces', accepted)``.

    Math: row i keeps the proposal when log u_i < log α_i (u_i ~ U(0, 1), or ``exp(log_u)``);
    a NaN or −inf log α rejects.

    ``per_chain()`` (the same kernel run per chain under vmap) is used instead when the batch
    route raises a GFIError (a DistributionArgumentError from validated arguments: per chain
    those rows get a NaN log α, i.e. reject; a choice that appears with the new values) or
    when the proposal's record structure cannot be merged with the old batch's row by row."""
    try:
        proposed, log_alpha, _ = make_move()
    except GFIError:  # (validated arguments; choices that appear or vanish with the values)
        return per_chain()
    if log_u is None:
        log_u = torch.log(torch.rand_like(log_alpha))
    accepted = log_u < log_alpha  # (a NaN or -inf log α rejects)
    old = traces.with_layout_of(proposed)
    try:  # (a shared leaf -- an expanded [C, N, D] design matrix -- is passed through)
        return tree_where_alike(accepted, proposed, old), accepted
    except ValueError:
        return per_chain()
