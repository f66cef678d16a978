"""Unfold: iterate a kernel generative function over time steps, threading a state.

* :mod:`~gfcomb.combinators.unfold.combinator` -- the :class:`Unfold` combinator and its GFI;
* :mod:`~gfcomb.combinators.unfold.trace` -- :class:`UnfoldTrace`;
* :mod:`~gfcomb.combinators.unfold.history` -- the shared step history of particle batches;
* :mod:`~gfcomb.combinators.unfold.batch` -- the batch edit engine (batch_update/regenerate).
"""

from gfcomb.combinators.unfold.combinator import Unfold
from gfcomb.combinators.unfold.history import StepBlock
from gfcomb.combinators.unfold.trace import UnfoldTrace

__all__ = ["StepBlock", "Unfold", "UnfoldTrace"]
