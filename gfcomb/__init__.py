"""gfcomb: Gen's Generative Function Interface on PyTorch, built around vmapped combinators.

>>> import gfcomb as gf
>>> @gf.gen
... def model(x):
...     slope = gf.normal(0.0, 1.0) @ "slope"
...     return gf.normal(slope * x, 1.0) @ "y"
"""

from gfcomb import distributions
from gfcomb.combinators import (
    Dimap,
    Map,
    Mask,
    MaskTrace,
    Production,
    Recurse,
    RecurseTrace,
    Repeat,
    Scan,
    Switch,
    SwitchTrace,
    Unfold,
    UnfoldTrace,
    VectorTrace,
    WrappedTrace,
)
from gfcomb.core import (
    AddressError,
    AddressTypeError,
    ArgumentError,
    ArgumentTypeError,
    ChoiceMap,
    ChoiceMapMergeError,
    ChoiceValueError,
    CollectiveTimeoutError,
    DegenerateWeightsError,
    Diff,
    DistributedError,
    DistributionArgumentError,
    DistributionArgumentTypeError,
    DuplicateAddressError,
    GenerativeFunction,
    GFIError,
    Invocation,
    MissingChoiceError,
    NoChange,
    NumericalError,
    OutsideGenBodyError,
    PersistenceError,
    RankFailedError,
    Selection,
    Trace,
    UnknownChange,
    UnvisitedConstraintError,
    VectorDiff,
    VmapError,
    select,
    selectall,
)
from gfcomb.core.batched import compact_history, select_batch
from gfcomb.core.custom import RecordTrace, trace_record
from gfcomb.core.vmap import PerRow
from gfcomb.distributions import *  # noqa: F403
from gfcomb.dsl import GenFunction, GenTrace, gen, splice
from gfcomb.persistence import load, save
from gfcomb.torch_module import DeterministicTrace, TorchGenerativeFunction

__version__ = "0.1.0"

__all__ = [
    "AddressError", "AddressTypeError", "ArgumentError", "ArgumentTypeError",
    "ChoiceValueError", "DistributionArgumentTypeError", "NumericalError",
    "OutsideGenBodyError", "PersistenceError", "DistributedError", "RankFailedError",
    "CollectiveTimeoutError",
    "ChoiceMap", "ChoiceMapMergeError",
    "DegenerateWeightsError", "DeterministicTrace", "Diff", "DistributionArgumentError",
    "DuplicateAddressError", "GFIError", "GenFunction", "GenTrace", "GenerativeFunction",
    "Invocation", "MissingChoiceError", "NoChange", "Selection", "TorchGenerativeFunction",
    "Trace", "UnknownChange", "UnvisitedConstraintError", "VectorDiff", "VmapError", "gen",
    "select", "selectall", "select_batch", "compact_history", "PerRow", "splice", "Map", "Unfold",
    "Switch", "Recurse", "Production", "save", "load",
    "RecurseTrace", "SwitchTrace", "UnfoldTrace", "VectorTrace", "Scan", "Repeat", "Mask",
    "Dimap", "MaskTrace", "WrappedTrace", "RecordTrace", "trace_record", *distributions.__all__,
]
