"""The entry points: :func:`check_gfi` (hypothesis), :func:`check_gfi_example` (one example)
and :func:`check_law` (one law, one example); the law table :data:`LAWS`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gfcomb.core.gfi import GenerativeFunction
from gfcomb.testing.laws import batch, generate, regenerate, transforms, update
from gfcomb.testing.laws.context import LawContext
from gfcomb.testing.laws.report import GFIReport, LawSkipped
from gfcomb.testing.strategies import Draw, HypothesisDraw, RandomDraw

LAW_NAMES: tuple[str, ...] = (
    "simulate_assess", "generate_full", "generate_empty", "generate_partial", "update_noop",
    "update_roundtrip", "update_weight", "update_discard", "regenerate_empty",
    "regenerate_weight", "project", "gradients", "no_mutation", "vmap", "batch",
)


LAWS: dict[str, Callable[[LawContext], None]] = {
    "simulate_assess": generate.law_simulate_assess,
    "generate_full": generate.law_generate_full,
    "generate_empty": generate.law_generate_empty,
    "generate_partial": generate.law_generate_partial,
    "update_noop": update.law_update_noop,
    "update_roundtrip": update.law_update_roundtrip,
    "update_weight": update.law_update_weight,
    "update_discard": update.law_update_discard,
    "regenerate_empty": regenerate.law_regenerate_empty,
    "regenerate_weight": regenerate.law_regenerate_weight,
    "project": regenerate.law_project,
    "gradients": transforms.law_gradients,
    "vmap": transforms.law_vmap,
    "batch": batch.law_batch,
}


def resolve_laws(laws: Iterable[str] | None = None, skip: Iterable[str] = ()) -> tuple[str, ...]:
    """The law names to check: ``laws`` (default: all) minus ``skip``; unknown names raise."""
    chosen = LAW_NAMES if laws is None else tuple(laws)
    skip = tuple(skip)
    for name in chosen + skip:
        if name not in LAW_NAMES:
            raise ValueError(f"unknown GFI law {name!r}; the laws are {', '.join(LAW_NAMES)}")
    return tuple(name for name in chosen if name not in skip)


# ============================================================================ entry points
_DEFAULTS: dict[str, Any] = dict(rtol=1e-7, atol=1e-9, grad_rtol=1e-4, grad_atol=1e-6,
                                 fd_step=1e-6, require_vmap=False, batch_size=3)


def check_gfi_example(gen_fn: GenerativeFunction, args: tuple[Any, ...], draw: Draw, *,
                      laws: Iterable[str] | None = None, skip: Iterable[str] = (),
                      report: GFIReport | None = None, args_strategy: Any = None,
                      **options: Any) -> GFIReport:
    """Check the selected laws on one argument tuple (the body of :func:`check_gfi`).

    ``draw`` supplies the random decisions (a :class:`HypothesisDraw` inside a hypothesis
    test, e.g. ``@given(st.data())``, or a :class:`RandomDraw`).  With ``args_strategy`` and a
    hypothesis draw, other arguments are drawn for the argument-changing updates and the
    batched (vmap) law.  Options: ``rtol``, ``atol`` (weights, scores, values),
    ``grad_rtol``, ``grad_atol``, ``fd_step`` (gradients), ``require_vmap`` (a failure to run
    under vmap is a violation instead of a skip), ``batch_size``.
    """
    names = resolve_laws(laws, skip)
    opts = {**_DEFAULTS, **options}
    unknown = set(opts) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown check_gfi option(s): {sorted(unknown)}")
    report = report if report is not None else GFIReport(gen_fn, names)
    report.examples += 1
    alt_args = None
    batch_args: list[tuple[Any, ...]] = []
    if args_strategy is not None:
        if any(n in names for n in ("update_roundtrip", "update_weight", "update_discard",
                                    "regenerate_weight", "batch")):
            alt_args = draw.strategy(args_strategy, label="other args")
        if "vmap" in names:
            batch_args = [b for b in (draw.strategy(args_strategy, label="batch args")
                                      for _ in range(opts["batch_size"] - 1)) if b is not None]
    seed = draw.integer(0, 2**31 - 1, label="torch seed")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ctx = LawContext(gen_fn, args, draw, rtol=opts["rtol"], atol=opts["atol"],
                         grad_rtol=opts["grad_rtol"], grad_atol=opts["grad_atol"],
                         fd_step=opts["fd_step"], check_mutation="no_mutation" in names,
                         require_vmap=opts["require_vmap"], batch_size=opts["batch_size"],
                         alt_args=alt_args, batch_args=batch_args)
        ctx.law = "simulate_assess"
        _ = ctx.trace
        for name in names:
            if name == "no_mutation":
                continue
            ctx.law = name
            try:
                LAWS[name](ctx)
            except LawSkipped as why:
                report.skip(name, str(why))
                continue
            report.ran[name] += 1
        if "no_mutation" in names:
            report.ran["no_mutation"] += 1
    return report


def check_law(law: str, gen_fn: GenerativeFunction, args: tuple[Any, ...], *, seed: int = 0,
              **options: Any) -> GFIReport:
    """Check one law (by name, see :data:`LAW_NAMES`) on one argument tuple, with the random
    decisions drawn from ``random.Random(seed)``.  Raises :class:`GFILawError` on failure;
    the returned report says whether the law applied."""
    laws = (law,) if law == "no_mutation" else (law, "no_mutation")
    return check_gfi_example(gen_fn, args, RandomDraw(seed), laws=laws, **options)


def check_gfi(gen_fn: GenerativeFunction, args_strategy: Any, *,
              max_examples: int | None = None, rtol: float = 1e-7, atol: float = 1e-9,
              laws: Iterable[str] | None = None, skip: Iterable[str] = (),
              grad_rtol: float = 1e-4, grad_atol: float = 1e-6, fd_step: float = 1e-6,
              require_vmap: bool = False, batch_size: int = 3,
              shrink: bool = True, derandomize: bool = False,
              max_shrink_seconds: float = 30.0) -> GFIReport:
    """Check the GFI laws on ``gen_fn`` for arguments drawn from ``args_strategy``.

    Args:
        gen_fn: any generative function (a distribution, a ``@gen`` function, a combinator,
            a custom subclass of :class:`gfcomb.GenerativeFunction`).
        args_strategy: a hypothesis strategy of argument tuples (a plain tuple is taken as
            the only argument tuple).
        max_examples: examples to run (default: the active hypothesis profile's).
        rtol: relative tolerance of weight/score/value comparisons.
        atol: absolute tolerance of weight/score/value comparisons.
        laws: the law names to check (default: all of :data:`LAW_NAMES`).
        skip: law names not to check (e.g. ``("generate_empty",)`` for a function with
            untraced randomness, ``("vmap",)`` for one that cannot be batched).
        grad_rtol: relative tolerance of the gradient check.
        grad_atol: absolute tolerance of the gradient check.
        fd_step: the central finite-difference step.
        require_vmap: treat a failure to run under ``torch.func.vmap`` as a violation (by
            default the ``vmap`` law is skipped for such a function).
        batch_size: elements of the batched (vmap) calls.
        shrink: let hypothesis shrink a failing example (slower, smaller counterexample).
        derandomize: draw the examples from a fixed seed (the same examples every run).
        max_shrink_seconds: stop shrinking a failing example after this long (hypothesis'
            own bound is 5 minutes); the error still names the law and shows the smallest
            example found so far.

    Returns:
        A :class:`GFIReport` of the laws that ran and those skipped (with reasons).

    Raises:
        GFILawError: a law failed; the message names the law, the (shrunk) arguments and the
            choice map involved.
    """
    names = resolve_laws(laws, skip)
    strat = args_strategy if isinstance(args_strategy, st.SearchStrategy) \
        else st.just(args_strategy)
    report = GFIReport(gen_fn, names)
    opts: dict[str, Any] = dict(rtol=rtol, atol=atol, grad_rtol=grad_rtol, grad_atol=grad_atol,
                fd_step=fd_step, require_vmap=require_vmap, batch_size=batch_size)
    if set(names) == {"no_mutation"}:
        names = LAW_NAMES  # mutation is checked on the calls of the other laws
    overrides: dict[str, Any] = dict(
        deadline=None, report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much])
    if max_examples is not None:
        overrides["max_examples"] = max_examples
    if derandomize:
        overrides["derandomize"] = True
    if not shrink:
        overrides["phases"] = [Phase.explicit, Phase.reuse, Phase.generate]

    @settings(**overrides)
    @given(data=st.data())
    def run(data: Any) -> None:
        args = data.draw(strat, label="args")
        check_gfi_example(gen_fn, args, HypothesisDraw(data), laws=names, report=report,
                          args_strategy=strat, **opts)

    with _shrink_time_bound(max_shrink_seconds):
        run()
    return report


class _shrink_time_bound:  # noqa: N801 - used like a function: ``with _shrink_time_bound(s):``
    """Bound hypothesis' shrinking time while a check runs (its engine reads the module
    constant ``MAX_SHRINKING_SECONDS`` when shrinking starts; no public setting exists).
    A hypothesis without that constant keeps its own bound."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.old: Any = None
        self.reporting: Any = None

    def __enter__(self) -> None:
        from hypothesis.internal.conjecture import engine
        from hypothesis.reporting import current_reporter, with_reporter

        self.old = getattr(engine, "MAX_SHRINKING_SECONDS", None)
        if self.old is not None:
            engine.MAX_SHRINKING_SECONDS = min(self.old, self.seconds)  # type: ignore[assignment]
        outer = current_reporter()

        def reporter(msg: object) -> None:  # (its note says "five minutes", whatever the bound)
            if "spent more than five minutes working to shrink" not in str(msg):
                outer(msg)

        self.reporting = with_reporter(reporter)
        self.reporting.__enter__()

    def __exit__(self, *exc: object) -> None:
        from hypothesis.internal.conjecture import engine

        self.reporting.__exit__(*exc)
        if self.old is not None:
            engine.MAX_SHRINKING_SECONDS = self.old
