"""gfcomb: Gen's Generative Function Interface on PyTorch, built around vmapped combinators.

>>> import gfcomb as gf
>>> @gf.gen
... def model(x):
...     slope = gf.normal(0.0, 1.0) @ "slope"
...     return gf.normal(slope * x, 1.0) @ "y"
"""

from gfcomb import combinators, core, distributions
from gfcomb.combinators import *  # noqa: F403  (combinators.__all__)
from gfcomb.core import *  # noqa: F403  (core.__all__)
from gfcomb.core.batched import compact_history, select_batch
from gfcomb.core.custom import RecordTrace, trace_record
from gfcomb.core.vmap import PerRow, RowView
from gfcomb.distributions import *  # noqa: F403
from gfcomb.dsl import GenFunction, GenTrace, gen, splice
from gfcomb.persistence import load, save
from gfcomb.torch_module import DeterministicTrace, TorchGenerativeFunction

__version__ = "0.1.0"

__all__ = [
    *core.__all__, *combinators.__all__, *distributions.__all__,
    "DeterministicTrace", "GenFunction", "GenTrace", "PerRow", "RecordTrace", "RowView",
    "TorchGenerativeFunction", "compact_history", "gen", "load", "save", "select_batch",
    "splice", "trace_record",
]
