"""The laws of the Generative Function Interface, checked on any generative function.

:func:`check_gfi` runs every law on many arguments drawn by hypothesis and raises
:class:`GFILawError` (an ``AssertionError``) naming the law, the arguments and the choice
map involved when one fails; hypothesis first shrinks the arguments and the random decisions
(constraint subsets, selections) to a small counterexample.

The laws (names as accepted by ``laws=``), for a trace ``t ~ simulate(x)``:

``simulate_assess``
    ``assess(x, t.choices)`` gives ``t.score`` and ``t.retval``.
``generate_full``
    ``generate(x, t.choices)``: weight == score == ``t.score``, same choices and retval.
``generate_empty``
    ``generate(x, {})``: weight == 0 (not for functions with untraced randomness).
``generate_partial``
    ``generate(x, c)`` with ``c`` a subset of the choices (some values perturbed): the
    constrained values are kept and weight == ``project(trace, select(c))``.
``update_noop``
    ``update(t, x, NoChange, {})``: weight 0, same choices and score, empty discard.
``update_roundtrip``
    ``(t', w, _, d) = update(t, x', Δ, c)`` then ``update(t', x, Δ, d)`` restores ``t``
    (choices and score) with weight ``-w - project(t', fresh)`` (``-w`` when no choice
    appeared).
``update_weight``
    weight == ``t'.score - t.score - project(t', fresh)``, where ``fresh`` are the choices of
    ``t'`` that were neither in ``t`` nor constrained (so weight == new score − old score
    when no choice appears); assumes prior proposals for fresh choices.
``update_discard``
    the discard holds exactly the old values of the constrained and the removed choices.
``regenerate_empty``
    ``regenerate(t, x, NoChange, none)``: weight 0, same choices.
``regenerate_weight``
    ``regenerate(t, x', Δ, S)``: unselected retained choices keep their values and weight ==
    ``project(t', R) - project(t, R)`` for R the retained unselected choices (with an
    unchanged structure, R is everything unselected).
``project``
    ``project(selectall) == score``, ``project(none) == 0``, additive over disjoint
    selections, ``project(S) + project(~S) == score``.
``gradients``
    ``choice_gradients`` (continuous choices, float arguments) match central finite
    differences of ``assess`` in float64.  Discrete choices are skipped: integer/bool dtypes
    and values that are all exact integers.
``no_mutation``
    no GFI call changes a tensor of its inputs (traces, arguments, choice maps): every call
    of the other laws is checked (clone before, ``torch.equal`` after).
``vmap``
    ``torch.func.vmap`` of ``simulate``/``generate``/``assess`` over a batch of arguments (or,
    when the arguments cannot be stacked, over constrained choice values) equals per-element
    calls under fully constrained values.
``batch``
    the batch protocol: ``batch_generate`` with every choice constrained, ``batch_update`` to
    other arguments with every choice constrained to its row's value, ``batch_regenerate``
    with nothing selected and ``batch_select`` equal the per-row methods row by row
    (weights, scores, choices, return values), on rows of one choice structure; each row of
    ``batch_regenerate`` with a drawn selection satisfies ``regenerate_weight``'s identity.

A law that does not apply to an example (no continuous choice for ``gradients``, a function
that cannot run under vmap, a partial constraint the function never visits) is skipped for
that example; :class:`GFIReport` says which laws ran how often and why others were skipped.

The checks live in one module per law family (:mod:`.generate`, :mod:`.update`,
:mod:`.regenerate`, :mod:`.transforms`, :mod:`.batch`); :mod:`.context` has what they share and
:mod:`.check` the entry points.
"""

from gfcomb.testing.laws.batch import law_batch
from gfcomb.testing.laws.check import (
    LAW_NAMES,
    LAWS,
    check_gfi,
    check_gfi_example,
    check_law,
    resolve_laws,
)
from gfcomb.testing.laws.context import LawContext
from gfcomb.testing.laws.generate import (
    law_generate_empty,
    law_generate_full,
    law_generate_partial,
    law_simulate_assess,
)
from gfcomb.testing.laws.regenerate import law_project, law_regenerate_empty, law_regenerate_weight
from gfcomb.testing.laws.report import GFILawError, GFIReport, LawSkipped
from gfcomb.testing.laws.transforms import law_gradients, law_vmap
from gfcomb.testing.laws.update import (
    law_update_discard,
    law_update_noop,
    law_update_roundtrip,
    law_update_weight,
)

__all__ = [
    "GFILawError", "GFIReport", "LAWS", "LAW_NAMES", "LawContext", "LawSkipped", "check_gfi",
    "check_gfi_example", "check_law", "law_batch", "law_generate_empty", "law_generate_full",
    "law_generate_partial", "law_gradients", "law_project", "law_regenerate_empty",
    "law_regenerate_weight", "law_simulate_assess", "law_update_discard", "law_update_noop",
    "law_update_roundtrip", "law_update_weight", "law_vmap", "resolve_laws",
]
