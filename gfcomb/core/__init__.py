"""Core records and interfaces: choice maps, selections, diffs, traces, the GFI base class."""

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange, VectorDiff
from gfcomb.core.errors import (
    AddressError,
    AddressTypeError,
    ArgumentError,
    ArgumentTypeError,
    ChoiceMapMergeError,
    ChoiceValueError,
    CollectiveTimeoutError,
    DegenerateWeightsError,
    DistributedError,
    DistributionArgumentError,
    DistributionArgumentTypeError,
    DuplicateAddressError,
    GFIError,
    MissingChoiceError,
    NumericalError,
    OutsideGenBodyError,
    PersistenceError,
    RankFailedError,
    StepStructureError,
    UnvisitedConstraintError,
    VmapError,
)
from gfcomb.core.gfi import GenerativeFunction, Invocation
from gfcomb.core.selection import Selection, select, selectall
from gfcomb.core.trace import Trace

__all__ = [
    "AddressError", "AddressTypeError", "ArgumentError", "ArgumentTypeError",
    "ChoiceValueError", "DistributionArgumentTypeError", "NumericalError",
    "OutsideGenBodyError", "PersistenceError", "DistributedError", "RankFailedError",
    "StepStructureError",
    "CollectiveTimeoutError",
    "ChoiceMap", "ChoiceMapMergeError",
    "DegenerateWeightsError", "Diff", "DistributionArgumentError", "DuplicateAddressError",
    "GFIError", "GenerativeFunction", "Invocation", "MissingChoiceError", "NoChange",
    "Selection", "Trace", "UnknownChange", "UnvisitedConstraintError", "VectorDiff",
    "VmapError", "select", "selectall",
]
