"""Property-based testing of generative functions with hypothesis.

``check_gfi(gen_fn, args_strategy)`` checks the laws of the Generative Function Interface on
any generative function (custom subclasses of :class:`gfcomb.GenerativeFunction` included)
and fails with a :class:`GFILawError` naming the law, the arguments and the choice map.
:mod:`gfcomb.testing.strategies` has the hypothesis strategies (arguments, choice maps,
selections and constraints drawn from a trace, random combinator trees);
:mod:`gfcomb.testing.goodness_of_fit` tests ``simulate`` against ``assess`` statistically.
"""

from gfcomb.testing.batches import assert_same_batch
from gfcomb.testing.goodness_of_fit import GOFResult, goodness_of_fit
from gfcomb.testing.laws import (
    LAW_NAMES,
    LAWS,
    GFILawError,
    GFIReport,
    LawContext,
    LawSkipped,
    check_gfi,
    check_gfi_example,
    check_law,
)
from gfcomb.testing.strategies import (
    HypothesisDraw,
    ModelSpec,
    RandomDraw,
    args_tuples,
    choice_subsets,
    constraints_from,
    distribution_args,
    float_tensors,
    random_models,
    selections_from,
)

__all__ = [
    "assert_same_batch",
    "GFILawError", "GFIReport", "GOFResult", "HypothesisDraw", "LAWS", "LAW_NAMES",
    "LawContext", "LawSkipped", "ModelSpec", "RandomDraw", "args_tuples", "check_gfi",
    "check_gfi_example", "check_law", "choice_subsets", "constraints_from",
    "distribution_args", "float_tensors", "goodness_of_fit", "random_models",
    "selections_from",
]
