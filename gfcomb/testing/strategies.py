"""Hypothesis strategies for property-testing generative functions.

- :func:`args_tuples`: argument tuples built from per-argument strategies;
- :func:`float_tensors`: float64 tensors of a given shape with bounded values;
- :func:`distribution_args`: valid parameters for each built-in distribution;
- :func:`addresses_of`, :func:`choice_subsets`, :func:`selections_from`,
  :func:`constraints_from`: choice maps, selections and constraint sets drawn from a given
  trace (Map/Unfold addresses included: their stacked choices are expanded element by
  element, so a subset may touch element 3 of a Map and not element 4);
- :func:`random_models`: random generative functions, combinator trees (Map, Unfold, Switch,
  Recurse, Scan, Repeat, Mask, Dimap, nested up to depth 3, with varying lengths and branch
  counts) over a pool of small
  ``@gen`` kernels.  Leaves come first in every choice, so hypothesis shrinks a failing tree
  towards a minimal model.

The trace-dependent strategies are written once against a tiny :class:`Draw` protocol, so the
law checks of :mod:`gfcomb.testing.laws` can run them both under hypothesis
(:class:`HypothesisDraw`, shrinking) and from a plain seeded :class:`random.Random`
(:class:`RandomDraw`, for calling one law by hand).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hypothesis import strategies as st

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.selection import Selection, select
from gfcomb.core.trace import Trace

Address = tuple[Any, ...]


# ================================================================================ draws
class Draw:
    """Where the random decisions of a law check come from (see the module docstring)."""

    def boolean(self, label: str = "") -> bool:
        """A fair coin."""
        raise NotImplementedError

    def integer(self, lo: int, hi: int, label: str = "") -> int:
        """An integer in ``[lo, hi]`` (shrinks towards ``lo``)."""
        raise NotImplementedError

    def strategy(self, strat: st.SearchStrategy[Any], label: str = "") -> Any:
        """A value of a hypothesis strategy, or None where this draw cannot run one."""
        return None


class HypothesisDraw(Draw):
    """Draws from a hypothesis ``st.data()`` object (so failures shrink)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def boolean(self, label: str = "") -> bool:
        """A fair coin (shrinks to False)."""
        return bool(self.data.draw(st.booleans(), label=label or None))

    def integer(self, lo: int, hi: int, label: str = "") -> int:
        """An integer in ``[lo, hi]`` (shrinks towards ``lo``)."""
        return int(self.data.draw(st.integers(lo, hi), label=label or None))

    def strategy(self, strat: st.SearchStrategy[Any], label: str = "") -> Any:
        """A value of ``strat``."""
        return self.data.draw(strat, label=label or None)


class RandomDraw(Draw):
    """Draws from a seeded :class:`random.Random` (no shrinking)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def boolean(self, label: str = "") -> bool:
        """A fair coin."""
        return self.rng.random() < 0.5

    def integer(self, lo: int, hi: int, label: str = "") -> int:
        """An integer in ``[lo, hi]``."""
        return self.rng.randint(lo, hi)


# ================================================================ traces: addresses, subsets
def addresses_of(trace: Trace) -> list[Address]:
    """Every address holding a choice in ``trace`` (stacked Map/Unfold choices expanded)."""
    return [a for a, _ in trace.choices.items()]


def choice_dict(cm: ChoiceMap) -> dict[Address, Any]:
    """A flat ``{address: value}`` dict of a choice map (stacked maps expanded)."""
    return {a: v for a, v in cm.items()}


def draw_subset(draw: Draw, addrs: Sequence[Address], label: str = "subset") -> list[Address]:
    """A subset of ``addrs``: none, all, or (half the time) each address by a coin (shrinks
    to none)."""
    if not addrs:
        return []
    mode = draw.integer(0, 3, label=f"{label} mode")
    if mode == 0:
        return []
    if mode == 1:
        return list(addrs)
    return [a for a in addrs if draw.boolean(label=f"{label} {a!r}")]


def draw_selection(draw: Draw, trace: Trace,
                   label: str = "selection") -> tuple[Selection, Callable[[Address], bool]]:
    """A selection over ``trace``'s addresses and a predicate saying whether an address is in it.

    Forms: explicit addresses (element level), prefixes (``select("ys")`` selects a whole
    Map), the complement of either, ``selectall()`` and the empty selection.
    """
    addrs = addresses_of(trace)
    form = draw.integer(0, 4, label=f"{label} form")
    if form == 0 or not addrs:
        return Selection.none(), lambda a: False
    if form == 1:
        return Selection.all(), lambda a: True
    chosen = draw_subset(draw, addrs, label)
    if form in (3, 4):  # prefixes: cut every chosen address at a drawn depth
        chosen = [a[: draw.integer(1, len(a), label=f"{label} depth")] if a else a
                  for a in chosen]
    prefixes = set(chosen)

    def inside(a: Address) -> bool:
        return any(a[: len(p)] == p for p in prefixes)

    sel = select(*chosen) if chosen else Selection.none()
    if form == 4:
        return ~sel, lambda a: not inside(a)
    return sel, inside


def _same_kind(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype)


def draw_constraints(draw: Draw, trace: Trace, alternative: Trace | None = None,
                     label: str = "constraints") -> ChoiceMap:
    """A constraint set: a subset of ``trace``'s choices, in one of four forms: the trace's
    own values; the same built with ``trace.choices.filter`` (stacked Map/Unfold blocks arrive
    stacked, with a presence mask, rather than element by element); every value replaced
    (perturbed) by the value of an ``alternative`` trace of the same function (another prior
    draw, so the perturbed values stay in the support) where it has the same address and
    shape; or some values perturbed, each by a coin.
    """
    values = choice_dict(trace.choices)
    chosen = draw_subset(draw, list(values), label)
    if not chosen:
        return ChoiceMap.empty()
    alt = choice_dict(alternative.choices) if alternative is not None else {}
    form = draw.integer(0, 3, label=f"{label} form (own values / stacked / perturbed)")
    if form == 1:
        return trace.choices.filter(select(*chosen))
    if form == 0 or not alt:
        return ChoiceMap({a: values[a] for a in chosen})
    out = {}
    for a in chosen:
        v = values[a]
        if a in alt and _same_kind(v, alt[a]) and (
                form == 2 or draw.boolean(label=f"{label} perturb {a!r}")):
            v = alt[a]
        out[a] = v
    return ChoiceMap(out)


# ======================================================== hypothesis strategies from a trace
@st.composite
def choice_subsets(draw: Any, trace: Trace) -> ChoiceMap:
    """Choice maps holding a subset of ``trace``'s choices (their own values)."""
    return draw_constraints(HypothesisDraw(_DataLike(draw)), trace)


@st.composite
def constraints_from(draw: Any, trace: Trace, alternative: Trace | None = None) -> ChoiceMap:
    """Constraint sets drawn from ``trace``, values perturbed from ``alternative`` (see
    :func:`draw_constraints`)."""
    return draw_constraints(HypothesisDraw(_DataLike(draw)), trace, alternative)


@st.composite
def selections_from(draw: Any, trace: Trace) -> Selection:
    """Selections over ``trace``'s addresses (see :func:`draw_selection`)."""
    return draw_selection(HypothesisDraw(_DataLike(draw)), trace)[0]


class _DataLike:
    """Adapts a composite ``draw`` function to the ``data.draw(strategy, label)`` interface."""

    def __init__(self, draw: Any) -> None:
        self._draw = draw

    def draw(self, strat: st.SearchStrategy[Any], label: Any = None) -> Any:
        return self._draw(strat)


# ================================================================================ arguments
def float_tensors(shape: tuple[int, ...] = (), lo: float = -3.0,
                  hi: float = 3.0) -> st.SearchStrategy[torch.Tensor]:
    """float64 tensors of ``shape`` with values in ``[lo, hi]``."""
    n = 1
    for s in shape:
        n *= s
    elems = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    return st.lists(elems, min_size=n, max_size=n).map(
        lambda xs: torch.tensor(xs, dtype=torch.float64).reshape(shape))


def args_tuples(*strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    """Argument tuples: one value from each strategy."""
    return st.tuples(*strategies)


def _pos(lo: float = 0.5, hi: float = 3.0) -> st.SearchStrategy[torch.Tensor]:
    return float_tensors((), lo, hi)


def _probs(k: int) -> st.SearchStrategy[torch.Tensor]:
    return st.lists(st.floats(0.1, 1.0), min_size=k, max_size=k).map(
        lambda xs: torch.tensor(xs, dtype=torch.float64) / sum(xs))


def _cov(d: int) -> st.SearchStrategy[torch.Tensor]:
    def make(xs: list[float]) -> torch.Tensor:
        a = torch.tensor(xs, dtype=torch.float64).reshape(d, d)
        return a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)

    return st.lists(st.floats(-1.0, 1.0), min_size=d * d, max_size=d * d).map(make)


_DIST_ARGS: dict[str, Callable[[], st.SearchStrategy[tuple[Any, ...]]]] = {
    "normal": lambda: st.tuples(float_tensors(), _pos()),
    "uniform": lambda: st.tuples(float_tensors((), -3, 0), float_tensors((), 0.5, 3)),
    "beta": lambda: st.tuples(_pos(), _pos()),
    "gamma": lambda: st.tuples(_pos(), _pos()),
    "inv_gamma": lambda: st.tuples(_pos(1.0, 4.0), _pos()),
    "exponential": lambda: st.tuples(_pos()),
    "laplace": lambda: st.tuples(float_tensors(), _pos()),
    "cauchy": lambda: st.tuples(float_tensors(), _pos()),
    "student_t": lambda: st.tuples(_pos(1.0, 6.0), float_tensors(), _pos()),
    "half_normal": lambda: st.tuples(_pos()),
    "half_cauchy": lambda: st.tuples(_pos()),
    "log_normal": lambda: st.tuples(float_tensors((), -1, 1), _pos(0.3, 1.5)),
    "weibull": lambda: st.tuples(_pos(), _pos()),
    "bernoulli": lambda: st.tuples(float_tensors((), 0.05, 0.95)),
    "categorical": lambda: st.integers(2, 4).flatmap(lambda k: st.tuples(_probs(k))),
    "uniform_discrete": lambda: st.tuples(st.integers(-3, 0).map(float).map(torch.tensor),
                                          st.integers(0, 4).map(float).map(torch.tensor)),
    "poisson": lambda: st.tuples(_pos(0.5, 8.0)),
    "binomial": lambda: st.tuples(st.integers(1, 8).map(float).map(torch.tensor),
                                  float_tensors((), 0.05, 0.95)),
    "geometric": lambda: st.tuples(float_tensors((), 0.1, 0.9)),
    "mv_normal": lambda: st.integers(1, 3).flatmap(
        lambda d: st.tuples(float_tensors((d,)), _cov(d))),
    "dirichlet": lambda: st.integers(2, 4).flatmap(
        lambda k: st.tuples(float_tensors((k,), 0.5, 3.0))),
}


def distribution_args(dist: Any) -> st.SearchStrategy[tuple[Any, ...]]:
    """Valid float64 parameter tuples for a built-in distribution (by its ``name``).

    Raises KeyError for a distribution this module does not know.
    """
    return _DIST_ARGS[dist.name]()


# ================================================================== random generative functions
class ModelSpec:
    """A random generative function with a description and a strategy for its arguments."""

    def __init__(self, gen_fn: Any, description: str,
                 args: st.SearchStrategy[tuple[Any, ...]]) -> None:
        self.gen_fn = gen_fn
        self.description = description
        self.args = args

    def __repr__(self) -> str:
        return self.description


def _kernel_pool() -> list[tuple[str, Any]]:
    """Small ``@gen`` kernels ``(x: scalar tensor) -> scalar tensor``.  Each choice name has
    one kind everywhere (``z``: normal, ``g``: gamma, ``b``: bernoulli, ``u``: uniform), so
    the branches of a Switch may share addresses."""
    import gfcomb as gf

    @gf.gen
    def k_normal(x):
        return gf.normal(x, 1.0) @ "z"

    @gf.gen
    def k_det(x):
        return 0.5 * x + 1.0

    @gf.gen
    def k_two(x):
        z = gf.normal(0.5 * x, 1.0) @ "z"
        return gf.normal(z, 0.5) @ "w"

    @gf.gen
    def k_flip(x):
        b = gf.bernoulli(0.3) @ "b"
        return gf.normal(x + b, 0.7) @ "z"

    @gf.gen
    def k_gamma(x):
        g = gf.gamma(2.0, 1.0 + torch.sigmoid(x)) @ "g"
        return x - g

    @gf.gen
    def k_uniform(x):
        return x + gf.uniform(-1.0, 1.0) @ "u"

    return [("k_normal", k_normal), ("k_det", k_det), ("k_two", k_two),
            ("k_flip", k_flip), ("k_gamma", k_gamma), ("k_uniform", k_uniform)]


_POOL: list[tuple[str, Any]] | None = None

#: Whether random trees may put a Switch inside an Unfold step (steps on different branches,
#: or choices with presence masks under vmap).  Unfold supports it since it harmonizes the
#: step traces of different branches; set it to False to leave such trees out.
UNFOLD_MASKED_STEPS = True


def kernel_pool() -> list[tuple[str, Any]]:
    """The leaf kernels of :func:`random_models`, ``(name, gen_fn)`` pairs (built once): small
    ``@gen`` functions of one scalar tensor returning one."""
    global _POOL
    if _POOL is None:
        _POOL = _kernel_pool()
    return _POOL


def map_node(child: tuple[str, Any], n: int) -> tuple[str, Any]:
    """The node ``Map[n](child)``: a ``@gen`` function of ``x`` mapping the child kernel over
    ``n`` shifted copies of ``x`` at address ``f"map{n}"`` (its mean is the return value).
    ``child`` and the result are ``(description, gen_fn)`` pairs, as :func:`random_models`
    builds them, so a tree it reports can be rebuilt by hand."""
    import gfcomb as gf

    name, kernel = child
    m = gf.Map(kernel)
    addr = f"map{n}"

    @gf.gen
    def node(x):
        ys = m(x + 0.25 * torch.arange(n, dtype=x.dtype)) @ addr
        return ys.sum() / max(n, 1)

    return f"Map[{n}]({name})", node


def unfold_node(child: tuple[str, Any], steps: int) -> tuple[str, Any]:
    """The node ``Unfold[steps](child)``: the child kernel as the step of an Unfold at address
    ``f"unfold{steps}"`` (see :func:`map_node` for the pairs)."""
    import gfcomb as gf

    name, kernel = child

    @gf.gen
    def step(t, state):
        return 0.5 * (kernel(state) @ "k")

    u = gf.Unfold(step)
    addr = f"unfold{steps}"

    @gf.gen
    def node(x):
        states = u(steps, x) @ addr
        return states[-1] if steps > 0 else x

    return f"Unfold[{steps}]({name})", node


def switch_node(children: Sequence[tuple[str, Any]]) -> tuple[str, Any]:
    """The node ``Switch(children...)``: a uniform categorical index at ``f"i{k}"`` picks one of
    the ``k`` children at address ``f"switch{k}"`` (see :func:`map_node` for the pairs)."""
    import gfcomb as gf

    k = len(children)
    sw = gf.Switch(*[c[1] for c in children])
    probs = torch.full((k,), 1.0 / k, dtype=torch.float64)
    addr, iaddr = f"switch{k}", f"i{k}"

    @gf.gen
    def node(x):
        i = gf.categorical(probs.to(x.dtype)) @ iaddr
        return sw(i, x) @ addr

    return f"Switch({', '.join(c[0] for c in children)})", node


def recurse_node(child: tuple[str, Any], max_branch: int) -> tuple[str, Any]:
    """The node ``Recurse[max_branch](child)``: a tree of depth <= 2 whose productions call the
    child kernel, at address ``f"rec{max_branch}"`` (see :func:`map_node` for the pairs)."""
    import gfcomb as gf
    from gfcomb.combinators.recurse import Production

    name, kernel = child
    probs = torch.full((max_branch + 1,), 1.0 / (max_branch + 1), dtype=torch.float64)

    @gf.gen
    def production(inp):
        x, depth = inp
        v = kernel(x) @ "v"
        k = 0
        if depth < 2:
            k = int(gf.categorical(probs.to(v.dtype)) @ "n")
        return Production(v, [(0.5 * v, depth + 1)] * k)

    @gf.gen
    def aggregation(v, results):
        return v + sum(results)

    rec = gf.Recurse(production, aggregation, max_branch)
    addr = f"rec{max_branch}"

    @gf.gen
    def node(x):
        return rec((x, 0)) @ addr

    return f"Recurse[{max_branch}]({name})", node


def scan_node(child: tuple[str, Any], steps: int) -> tuple[str, Any]:
    """The node ``Scan[steps](child)``: the child kernel as a Scan step over ``steps`` inputs at
    address ``f"scan{steps}"`` (see :func:`map_node` for the pairs)."""
    import gfcomb as gf

    name, kernel = child

    @gf.gen
    def step(c, x_t):
        v = kernel(c + x_t) @ "k"
        return (0.5 * v, v)

    sc = gf.Scan(step)
    addr = f"scan{steps}"

    @gf.gen
    def node(x):
        carry, _ys = sc(x, 0.25 * torch.arange(steps, dtype=x.dtype)) @ addr
        return carry

    return f"Scan[{steps}]({name})", node


def repeat_node(child: tuple[str, Any], n: int) -> tuple[str, Any]:
    """The node ``Repeat[n](child)`` at address ``f"rep{n}"`` (see :func:`map_node` for the
    pairs)."""
    import gfcomb as gf

    name, kernel = child
    rep = gf.Repeat(kernel, n)
    addr = f"rep{n}"

    @gf.gen
    def node(x):
        ys = rep(x) @ addr
        return ys.sum() / max(n, 1)

    return f"Repeat[{n}]({name})", node


def mask_node(child: tuple[str, Any]) -> tuple[str, Any]:
    """The node ``Mask(child)``: the child kernel under a Bernoulli flag at ``"on"``, at address
    ``"mask"`` (see :func:`map_node` for the pairs)."""
    import gfcomb as gf

    name, kernel = child
    m = gf.Mask(kernel)

    @gf.gen
    def node(x):
        on = gf.bernoulli(0.5) @ "on"
        r = m(on > 0.5, x) @ "mask"
        if r is None:  # a concrete False flag
            return x + 0.0
        return torch.where(on > 0.5, r, x)  # (a batched flag: r is zero where it is false)

    return f"Mask({name})", node


def dimap_node(child: tuple[str, Any]) -> tuple[str, Any]:
    """The node ``Dimap(child)`` (an affine ``pre`` and ``post``) at address ``"dimap"`` (see
    :func:`map_node` for the pairs)."""
    import gfcomb as gf

    name, kernel = child
    d = gf.Dimap(kernel, pre=lambda x: (0.5 * x - 0.25,), post=lambda args, r: r + args[0])

    @gf.gen
    def node(x):
        return d(x) @ "dimap"

    return f"Dimap({name})", node


@st.composite
def _tree(draw: Any, depth: int, vmapped: bool, fixed: bool = False) -> tuple[str, Any]:
    """A combinator tree ``(description, gen_fn)`` of at most ``depth`` combinator levels.

    ``vmapped``: the tree runs inside a Map's vmap (no Recurse there: its tree shape is
    data-dependent Python).  ``fixed``: the tree is an Unfold step, which must keep the same
    address structure at every step (no Recurse; a Switch only with UNFOLD_MASKED_STEPS).
    """
    pool = kernel_pool()
    kinds = ["leaf"]
    if depth > 0:
        kinds += ["map", "unfold"]
        if not fixed or UNFOLD_MASKED_STEPS:
            kinds.append("switch")
        if not vmapped and not fixed:
            kinds.append("recurse")
        kinds += ["scan", "repeat", "dimap"]
        if not fixed:  # (a concrete flag changes the addresses from step to step)
            kinds.append("mask")
    kind = draw(st.sampled_from(kinds))
    if kind == "leaf":
        return draw(st.sampled_from(pool))
    if kind == "switch":
        k = draw(st.integers(2, 3))
        return switch_node([draw(_tree(depth - 1, vmapped, fixed)) for _ in range(k)])
    if kind == "recurse":
        return recurse_node(draw(_tree(depth - 1, False, fixed)), draw(st.integers(1, 2)))
    build, in_map, is_step, sized = _NODES[kind]
    size = [draw(st.integers(0, 3))] if sized else []
    child = draw(_tree(depth - 1, vmapped or in_map, fixed or is_step))
    return build(child, *size)


#: The one-child node kinds of :func:`_tree`: (builder, the child runs inside a Map's vmap,
#: the child is an Unfold step, the node draws a size 0..3 before its child).
_NODES: dict[str, tuple[Callable[..., tuple[str, Any]], bool, bool, bool]] = {
    "map": (map_node, True, False, True),
    "unfold": (unfold_node, False, True, True),
    "scan": (scan_node, False, True, True),
    "repeat": (repeat_node, True, False, True),
    "dimap": (dimap_node, False, False, False),
    "mask": (mask_node, False, False, False),
}


def random_models(max_depth: int = 3) -> st.SearchStrategy[ModelSpec]:
    """Random generative functions: combinator trees of depth ``<= max_depth`` over a pool of
    small ``@gen`` kernels, each taking one scalar float64 tensor and returning one.

    The arguments strategy of a model draws ``(x,)`` with ``x`` in ``[-2, 2]``.  Shrinks
    towards a single leaf kernel, then towards shallower trees, fewer branches and shorter
    Maps/Unfolds.
    """
    args = st.tuples(float_tensors((), -2.0, 2.0))
    return _tree(max_depth, False).map(lambda t: ModelSpec(t[1], t[0], args))
