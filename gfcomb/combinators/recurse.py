"""Recurse: a tree-structured generative function built from a production and an aggregation.

``Recurse(production, aggregation, max_branch)(root_input)`` grows a tree top-down and folds it
bottom-up (Gen.jl's ``Recurse``, with 0-based node indices):

- the *production* kernel ``(input) -> Production(value, children)`` runs at every node; its
  ``children`` (a list of at most ``max_branch`` child inputs) become the inputs of the node's
  children;
- the *aggregation* kernel ``(value, child_results) -> result`` runs at every node once its
  children are done; ``child_results`` is the tuple of the children's results, in order (empty
  at a leaf);
- the return value is the root's aggregation result.

Node indices: the root is ``0``; child ``k`` (0-based) of node ``p`` is ``p * max_branch + k
+ 1``.  So increasing index order is breadth-first order and children always have larger
indices than their parent.  Node ``i``'s production choices live under ``(i, "production")``,
its aggregation choices under ``(i, "aggregation")``.

Math: log p(t; x) = Σ_nodes [log p_prod(t_i^prod; input_i) + log p_agg(t_i^agg; value_i,
results of i's children)].

The tree's shape is data-dependent Python (how many children each node has), so the kernels
run node by node, outside vmap.  ``update`` and ``regenerate`` revisit only the nodes whose
input changed, that are constrained/selected, or that lie above one that is; aggregation
results are propagated upward only while they change (retdiffs: ``NoChange`` stops the
propagation).  With ``batch_depths=True``, ``simulate`` runs the productions of all nodes of one
depth as one ``torch.func.vmap`` call where the production allows it (see :class:`Recurse`).
Trees are walked iteratively (no Python recursion), so deep trees are fine.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
from torch.utils import _pytree as pytree

from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange
from gfcomb.core.errors import (
    AddressError,
    ArgumentError,
    UnvisitedConstraintError,
    VmapError,
)
from gfcomb.core.gfi import GenerativeFunction, as_choicemap, check_argdiffs, check_args_tuple
from gfcomb.core.pytree import register_record, tree_index, tree_stack
from gfcomb.core.selection import MaskSelection, Selection, element_selections
from gfcomb.core.trace import Trace
from gfcomb.core.validation import check_selection
from gfcomb.core.vmap import batched_call

_PARTS = ("production", "aggregation")
_EMPTY = ChoiceMap.empty()
_PLAIN = (int, float, str, bool, type(None))

NodeConstraints = dict[int, tuple[ChoiceMap, ChoiceMap]]


def _children_tuple(children: Any) -> tuple[Any, ...]:
    if isinstance(children, (list, tuple)):
        return tuple(children)
    raise ArgumentError("Production: children must be a list or tuple of child inputs, got "
                        f"{type(children).__name__}")


@attrs.frozen(repr=False, eq=False)
class Production:
    """What a Recurse production kernel returns: the node's ``value`` (passed to the node's
    aggregation) and ``children``, the list of child inputs (one child per entry, at most
    ``max_branch``).  Stored as a tuple; a pytree, so vmap can batch it."""

    value: Any
    children: tuple[Any, ...] = attrs.field(converter=_children_tuple, factory=tuple)
    _layout: Any = attrs.field(default=None, eq=False, repr=False)

    def __repr__(self) -> str:
        from gfcomb.core.choicemap import short_repr

        return f"Production(value={short_repr(self.value)}, children=<{len(self.children)}>)"


register_record(Production, dynamic=("value", "children"), static=())


@attrs.frozen(repr=False)
class RecurseTrace(Trace):
    """The trace of a :class:`Recurse`: one production and one aggregation trace per node.

    ``productions`` and ``aggregations`` map node index -> kernel trace (keys in increasing
    index order, which is breadth-first order); ``num_children`` maps node index -> the number
    of children.  The node indices and the children counts are the static structure of the
    pytree; the kernel traces are its dynamic part.
    """

    gen_fn: Any
    args: tuple[Any, ...]
    retval: Any
    score: torch.Tensor
    productions: dict[int, Trace]
    aggregations: dict[int, Trace]
    num_children: dict[int, int]
    _layout: Any = attrs.field(default=None, eq=False, repr=False)
    _choices: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def choices(self) -> ChoiceMap:
        cached = self._choices
        if cached is None:
            cached = ChoiceMap.node({i: _node_choices(self.productions[i], self.aggregations[i])
                                     for i in self.productions})
            object.__setattr__(self, "_choices", cached)
        return cached

    def discrete_addresses(self) -> Iterator[tuple[Any, ...]]:
        """Every node's production and aggregation discrete addresses under the node."""
        for part, subs in (("production", self.productions),
                           ("aggregation", self.aggregations)):
            for idx, sub in subs.items():
                for pattern in sub.discrete_addresses():
                    yield (idx, part) + pattern

    def _after_unflatten(self) -> None:
        object.__setattr__(self, "_choices", None)

    @property
    def nodes(self) -> tuple[int, ...]:
        """The node indices, in increasing (breadth-first) order."""
        return tuple(self.productions)

    def production_trace(self, idx: int) -> Trace:
        """The production kernel's trace at node ``idx``."""
        return self._node(self.productions, idx)

    def aggregation_trace(self, idx: int) -> Trace:
        """The aggregation kernel's trace at node ``idx``."""
        return self._node(self.aggregations, idx)

    def children_of(self, idx: int) -> tuple[int, ...]:
        """The indices of node ``idx``'s children."""
        self._node(self.productions, idx)
        b = self.gen_fn.max_branch
        return tuple(idx * b + k + 1 for k in range(self.num_children[idx]))

    def result_of(self, idx: int) -> Any:
        """Node ``idx``'s aggregation result."""
        return self._node(self.aggregations, idx).retval

    @staticmethod
    def _node(table: dict[int, Trace], idx: int) -> Trace:
        if idx not in table:
            raise AddressError("Recurse trace has no node {addr}", (idx,))
        return table[idx]

    def _retval_at(self, path: tuple[Any, ...]) -> Any:
        """``get_retval(idx)``: node ``idx``'s aggregation result; ``(idx, "production")`` /
        ``(idx, "aggregation")`` (and deeper): the kernel call there."""
        idx, rest = path[0], path[1:]
        if not rest:
            return self.result_of(idx)
        table = {"production": self.productions, "aggregation": self.aggregations}.get(rest[0])
        if table is None:
            raise AddressError("no traced call at address {addr} (a Recurse node has "
                               "'production' and 'aggregation')", path)
        node = self._node(table, idx)
        try:
            return node.get_retval(rest[1:])
        except AddressError as err:
            raise err.prefixed((idx, rest[0])) from None


register_record(RecurseTrace, dynamic=("args", "retval", "score", "productions", "aggregations"),
                static=("gen_fn", "num_children"))


def _node_choices(prod: Trace, agg: Trace) -> ChoiceMap:
    return ChoiceMap.node({"production": prod.choices, "aggregation": agg.choices})


def _first_address(cm: ChoiceMap) -> tuple[Any, ...]:
    if cm.is_empty() or cm.is_value():
        return ()
    first = next(iter(cm.items(stacked=True)), ((), None))[0]
    return tuple(":" if isinstance(k, slice) else k for k in first)


def _same_value(new: Any, old: Any) -> bool:
    """Conservatively: is ``new`` the same value as ``old``?  Identity for tensors and other
    objects, equality for plain Python values, elementwise for tuples/lists/dicts."""
    if new is old:
        return True
    if isinstance(new, _PLAIN) and isinstance(old, _PLAIN):
        return type(new) is type(old) and new == old
    if isinstance(new, (tuple, list)) and type(new) is type(old):
        return len(new) == len(old) and all(_same_value(a, b) for a, b in zip(new, old))
    if isinstance(new, dict) and isinstance(old, dict):
        return new.keys() == old.keys() and all(_same_value(new[k], old[k]) for k in new)
    return False


def _add(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if total is None else total + x


def _sorted(table: dict[int, Any]) -> dict[int, Any]:
    return {i: table[i] for i in sorted(table)}


class Recurse(GenerativeFunction):
    """A generative function over trees (see the module docstring).

    ``production``: a generative function ``(input) -> Production(value, children)``;
    ``aggregation``: a generative function ``(value, child_results) -> result``;
    ``max_branch``: the largest number of children a node may have (it fixes the node
    numbering: child ``k`` of node ``p`` is ``p * max_branch + k + 1``).  Arguments:
    ``(root_input,)``.

    ``batch_depths=True`` makes ``simulate`` (and so ``propose``; also the unconstrained depths
    of the subtrees that ``generate``/``update``/``regenerate`` grow afresh) run the productions
    of all the nodes of one depth as ONE ``torch.func.vmap`` call, when their inputs have the
    same pytree structure with equal non-tensor leaves and the production can run under vmap
    (its number of children must not depend on tensor values, e.g. a depth counter kept as a
    Python int in the input).  Otherwise that depth falls back to the per-node loop (after one
    failed vmap attempt the rest of the call loops), with the same distribution.
    Aggregations and all other work always run node by node.
    """

    def __init__(self, production: GenerativeFunction, aggregation: GenerativeFunction,
                 max_branch: int, *, batch_depths: bool = False) -> None:
        for name, fn in (("production", production), ("aggregation", aggregation)):
            if not isinstance(fn, GenerativeFunction):
                raise TypeError(f"Recurse needs a generative function as {name}, got {fn!r}")
        if isinstance(max_branch, bool) or not isinstance(max_branch, int) or max_branch < 1:
            raise ArgumentError(f"Recurse: max_branch must be a positive int, got {max_branch!r}")
        self.production = production
        self.aggregation = aggregation
        self.max_branch = max_branch
        self.batch_depths = batch_depths

    def __repr__(self) -> str:
        return (f"Recurse({self.production!r}, {self.aggregation!r}, "
                f"max_branch={self.max_branch})")

    def _key(self) -> tuple[Any, ...]:
        return (Recurse, self.production, self.aggregation, self.max_branch, self.batch_depths)

    def __eq__(self, other: object) -> bool:
        # Recurse(...) may be built inside a @gen body each run: equal parts, same function
        return isinstance(other, Recurse) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # ------------------------------------------------------------------ helpers
    def child_index(self, parent: int, k: int) -> int:
        """The index of child ``k`` (0-based) of node ``parent``."""
        return parent * self.max_branch + k + 1

    def parent_index(self, idx: int) -> int:
        """The index of node ``idx``'s parent (``idx`` > 0)."""
        return (idx - 1) // self.max_branch

    def _children(self, idx: int, n: int) -> range:
        first = idx * self.max_branch + 1
        return range(first, first + n)

    def _check_args(self, args: Any) -> tuple[Any, ...]:
        args = check_args_tuple(args)
        if len(args) != 1:
            raise ArgumentError(f"{self!r} takes one argument (root_input,), got {len(args)}")
        return args

    @staticmethod
    def _check_argdiffs(argdiffs: Any, args: tuple[Any, ...],
                        trace: RecurseTrace) -> tuple[Diff, ...]:
        """One diff; a root input that is the same value as before (the same tensors, equal
        Python values: e.g. a fresh ``(x, 0)`` tuple built by a @gen body) is NoChange."""
        argdiffs = check_argdiffs(args, argdiffs, "Recurse")
        if not isinstance(argdiffs[0], NoChange) and _same_value(args[0], trace.args[0]):
            return (NoChange(),)
        return argdiffs

    def _check_trace(self, trace: Any) -> RecurseTrace:
        if not isinstance(trace, RecurseTrace) or not (trace.gen_fn is self
                                                       or trace.gen_fn == self):
            raise ArgumentError(f"{self!r} was given a trace of another generative function: "
                                f"{getattr(trace, 'gen_fn', trace)!r}")
        return trace

    def _production_of(self, idx: int, retval: Any) -> Production:
        """The production's return value, checked (ArgumentError naming the node)."""
        if not isinstance(retval, Production):
            raise ArgumentError(
                f"Recurse: the production at node {idx} (address ({idx}, 'production')) must "
                f"return gfcomb Production(value, children), got {type(retval).__name__}")
        if len(retval.children) > self.max_branch:
            raise ArgumentError(
                f"Recurse: the production at node {idx} (address ({idx}, 'production')) "
                f"returned {len(retval.children)} children, more than "
                f"max_branch={self.max_branch}")
        return retval

    @staticmethod
    def _call(idx: int, part: str, method: Callable[..., Any], *args: Any) -> Any:
        """``method(*args)`` for a kernel of node ``idx``; address errors get the node's
        address ``(idx, part)`` in front."""
        try:
            return method(*args)
        except AddressError as err:
            raise err.prefixed((idx, part)) from None

    def _node_constraints(self, cm: ChoiceMap, method: str) -> NodeConstraints:
        """Split a choice map by node: idx -> (production sub-map, aggregation sub-map)."""
        if cm.is_empty():
            return {}
        what = (f"{method}: constraint at address {{addr}} is never visited (Recurse has "
                "choices only under (node index, 'production' or 'aggregation', ...))")
        if cm.is_value():
            raise UnvisitedConstraintError(what, ())
        out: NodeConstraints = {}
        for k in cm.keys():
            sub = cm.get_submap(k)
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise UnvisitedConstraintError(what, (k,) + _first_address(sub))
            if sub.is_value():
                raise UnvisitedConstraintError(what, (k,))
            for part in sub.keys():
                if part not in _PARTS:
                    raise UnvisitedConstraintError(
                        what, (k, part) + _first_address(sub.get_submap(part)))
            out[k] = (sub.get_submap("production"), sub.get_submap("aggregation"))
        return out

    @staticmethod
    def _check_visited(cons: NodeConstraints, nodes: dict[int, Any], method: str) -> None:
        for idx in sorted(cons):
            if idx in nodes:
                continue
            for part, cm in zip(_PARTS, cons[idx]):
                if not cm.is_empty():
                    raise UnvisitedConstraintError(
                        f"{method}: constraint at address {{addr}} is never visited (node {idx} "
                        "is not in the tree)", (idx, part) + _first_address(cm))

    def _with_ancestors(self, keys: Any) -> set[int]:
        out: set[int] = set()
        for k in keys:
            while k not in out:
                out.add(k)
                if k == 0:
                    break
                k = self.parent_index(k)
        return out

    def _subtree(self, num_children: dict[int, int], root: int) -> list[int]:
        out, stack = [], [root]
        while stack:
            i = stack.pop()
            out.append(i)
            stack.extend(self._children(i, num_children[i]))
        return out

    def _kernel_run(self, gen_fn: GenerativeFunction, idx: int, part: str, args: tuple[Any, ...],
                    cm: ChoiceMap) -> tuple[Trace, torch.Tensor | None]:
        """simulate (weight None) or generate one kernel call of node ``idx``."""
        if cm.is_empty():
            return self._call(idx, part, gen_fn.simulate, args), None
        return self._call(idx, part, gen_fn.generate, args, cm)

    # ------------------------------------------------------------------ growing subtrees
    def _grow(self, root: int, root_input: Any, cons: NodeConstraints,
              prods: dict[int, Trace], aggs: dict[int, Trace], nch: dict[int, int],
              ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Generate the subtree rooted at node ``root`` into the tables.

        Returns (Σ generate weights, or None if nothing was constrained; Σ node scores).
        Productions run top-down, depth by depth; aggregations bottom-up.
        """
        weight: torch.Tensor | None = None
        score: torch.Tensor | None = None
        order: list[int] = []
        level: list[tuple[int, Any]] = [(root, root_input)]
        try_batch = self.batch_depths
        while level:
            batched = None
            if try_batch and len(level) > 1 and not any(i in cons for i, _ in level):
                batched, vmappable = self._simulate_level(level)
                try_batch = vmappable  # a production that failed under vmap is not retried
            nxt: list[tuple[int, Any]] = []
            for j, (idx, x) in enumerate(level):
                if batched is not None:
                    tr, w = batched[j], None
                else:
                    pc = cons[idx][0] if idx in cons else _EMPTY
                    tr, w = self._kernel_run(self.production, idx, "production", (x,), pc)
                prod = self._production_of(idx, tr.retval)
                prods[idx] = tr
                nch[idx] = len(prod.children)
                if w is not None:
                    weight = _add(weight, w)
                score = _add(score, tr.score)
                order.append(idx)
                nxt.extend((self.child_index(idx, k), c) for k, c in enumerate(prod.children))
            level = nxt
        for idx in reversed(order):
            value = prods[idx].retval.value
            results = tuple(aggs[c].retval for c in self._children(idx, nch[idx]))
            ac = cons[idx][1] if idx in cons else _EMPTY
            tr, w = self._kernel_run(self.aggregation, idx, "aggregation", (value, results), ac)
            aggs[idx] = tr
            if w is not None:
                weight = _add(weight, w)
            score = _add(score, tr.score)
        assert score is not None
        return weight, score

    def _simulate_level(self, level: list[tuple[int, Any]]) -> tuple[list[Trace] | None, bool]:
        """The production traces of one depth's nodes from one vmap call.

        Returns (traces, True); (None, True) when the inputs do not stack (different pytree
        structures, shapes or non-tensor leaves); (None, False) when the production cannot run
        under vmap.  In both failure cases the caller runs this depth node by node.
        """
        inputs = [x for _, x in level]
        leaves0, spec = pytree.tree_flatten(inputs[0])
        is_tensor = [isinstance(v, torch.Tensor) for v in leaves0]
        if not any(is_tensor):
            return None, True
        for x in inputs[1:]:
            leaves, s = pytree.tree_flatten(x)
            if s != spec:
                return None, True
            for a, b, t in zip(leaves0, leaves, is_tensor):
                if t:
                    if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
                        return None, True
                elif isinstance(b, torch.Tensor) or not _same_value(b, a):
                    return None, True
        # batched_call passes the (equal) non-tensor leaves around vmap, unbatched
        run = batched_call(lambda x: self.production.simulate((x,)), (0,), vectorize=True,
                           length=len(level), who=f"{self!r} production")
        try:
            batched = run(tree_stack(inputs))
        except (VmapError, RuntimeError, ValueError, TypeError):
            # data-dependent control flow (the number of children depends on a value), .item()
            # or a missing batching rule; a genuine error in the production is raised again
            # by the per-node loop
            return None, False
        return [tree_index(batched, j) for j in range(len(level))], True

    # ------------------------------------------------------------------ the GFI
    def simulate(self, args: tuple[Any, ...]) -> RecurseTrace:
        """Grow the tree from the root, sampling every choice.

        Math: t ~ p(·; x): productions top-down, aggregations bottom-up; score = Σ over nodes
        of the production and aggregation scores = log p(t; x).
        """
        args = self._check_args(args)
        prods: dict[int, Trace] = {}
        aggs: dict[int, Trace] = {}
        nch: dict[int, int] = {}
        _, score = self._grow(0, args[0], {}, prods, aggs, nch)
        return RecurseTrace(self, args, aggs[0].retval, score, _sorted(prods), _sorted(aggs),
                            _sorted(nch))

    def generate(self, args: tuple[Any, ...], constraints: ChoiceMap | None = None,
                 ) -> tuple[RecurseTrace, torch.Tensor]:
        """Grow the tree with the constrained choices fixed (anywhere in the tree).

        Math: weight = Σ over nodes of the production and aggregation generate weights; with
        prior proposals this is Σ log p of the constrained choices.  Full constraints:
        weight == score == assess weight.  A constraint at a node that the tree does not
        reach raises UnvisitedConstraintError.
        """
        args = self._check_args(args)
        cons = self._node_constraints(as_choicemap(constraints), "generate")
        prods: dict[int, Trace] = {}
        aggs: dict[int, Trace] = {}
        nch: dict[int, int] = {}
        weight, score = self._grow(0, args[0], cons, prods, aggs, nch)
        self._check_visited(cons, prods, "generate")
        tr = RecurseTrace(self, args, aggs[0].retval, score, _sorted(prods), _sorted(aggs),
                          _sorted(nch))
        return tr, weight if weight is not None else torch.zeros_like(score)

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
        """Score given choices of a whole tree.

        Math: weight = log p(t; x) = Σ over nodes of the production and aggregation assess
        weights.  Every choice of every node reached must be given (MissingChoiceError naming
        the full address) and every given node must be reached.  Differentiable in the
        argument and the choice values (the gradient methods are built on it).
        """
        args = self._check_args(args)
        cons = self._node_constraints(as_choicemap(choices), "assess")
        weight: torch.Tensor | None = None
        values: dict[int, Any] = {}
        nch: dict[int, int] = {}
        queue: deque[tuple[int, Any]] = deque([(0, args[0])])
        while queue:
            idx, x = queue.popleft()
            pc = cons[idx][0] if idx in cons else _EMPTY
            w, ret = self._call(idx, "production", self.production.assess, (x,), pc)
            prod = self._production_of(idx, ret)
            weight = _add(weight, w)
            values[idx] = prod.value
            nch[idx] = len(prod.children)
            queue.extend((self.child_index(idx, k), c) for k, c in enumerate(prod.children))
        self._check_visited(cons, values, "assess")
        results: dict[int, Any] = {}
        for idx in sorted(values, reverse=True):
            ac = cons[idx][1] if idx in cons else _EMPTY
            rs = tuple(results[c] for c in self._children(idx, nch[idx]))
            w, results[idx] = self._call(idx, "aggregation", self.aggregation.assess,
                                         (values[idx], rs), ac)
            weight = _add(weight, w)
        assert weight is not None
        return weight, results[0]

    def update(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
               constraints: ChoiceMap | None = None,
               ) -> tuple[RecurseTrace, torch.Tensor, Diff, ChoiceMap]:
        """Move the tree to a new root input and/or constraints, revisiting only what changed.

        A node's production is updated if its input changed or it is constrained; its
        children follow the new production: retained children are revisited if their input
        changed or a node below them is constrained, removed children's subtrees are
        discarded, new children's subtrees generated.  Aggregations are re-run bottom-up where
        the node's value, a child result or a constraint changed (retdiff NoChange stops the
        propagation toward the root).

        Math: weight = Σ node update weights + Σ generate weights of new nodes − Σ scores of
        removed nodes = log p(t'; x') − log p(t; x) − log q(fresh choices), fresh choices
        sampled from the prior.  discard = the kernels' discards (old values overwritten by
        constraints, choices a kernel dropped) and every choice of the removed nodes;
        ``update(t', x, discard)`` returns to t with weight −weight.  retdiff = the root
        aggregation's retdiff (NoChange if it was not re-run).
        """
        trace = self._check_trace(trace)
        args = self._check_args(args)
        argdiffs = self._check_argdiffs(argdiffs, args, trace)
        cons = self._node_constraints(as_choicemap(constraints), "update")
        if not cons and isinstance(argdiffs[0], NoChange):
            return trace, torch.zeros_like(trace.score), NoChange(), ChoiceMap.empty()
        new, weight, retdiff, discard = _Incremental(self, trace, cons, None).run(args, argdiffs)
        self._check_visited(cons, new.productions, "update")
        return new, weight, retdiff, discard

    def regenerate(self, trace: Trace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
                   selection: Selection) -> tuple[RecurseTrace, torch.Tensor, Diff]:
        """Resample the selected choices (anywhere in the tree) from the prior.

        Nodes are revisited as in :meth:`update`, with "selected" in place of "constrained";
        a production that changes its children count removes subtrees or simulates new ones.

        Math: weight = Σ node regenerate weights = Σ over retained, unselected choices of
        (log p' − log p); selected choices, the choices of new nodes and those of removed
        nodes contribute 0.  With prior proposals the weight is the MH log acceptance ratio.
        """
        check_selection(selection, self, "regenerate")
        trace = self._check_trace(trace)
        args = self._check_args(args)
        argdiffs = self._check_argdiffs(argdiffs, args, trace)
        if selection.is_empty_static() and isinstance(argdiffs[0], NoChange):
            return trace, torch.zeros_like(trace.score), NoChange()
        new, weight, retdiff, _ = _Incremental(self, trace, {}, selection).run(args, argdiffs)
        return new, weight, retdiff

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Log density of the selected choices.

        Math: project(t, S) = Σ over nodes i of production.project(t_i^prod, S[i, "production"])
        + aggregation.project(t_i^agg, S[i, "aggregation"]); project(t, selectall) = score.
        """
        check_selection(selection, self, "project")
        trace = self._check_trace(trace)
        if selection.is_all_static():
            return trace.score
        total = torch.zeros_like(trace.score)
        if selection.is_empty_static():
            return total
        nodes = list(trace.productions)
        default, special = element_selections(selection, nodes)
        if not default.is_empty_static() or isinstance(selection, MaskSelection):
            visit: Sequence[int] = nodes
        else:
            visit = sorted(special)
        for idx in visit:
            sel = selection.get_subselection(idx)
            if sel.is_empty_static():
                continue
            for part, tr in zip(_PARTS, (trace.productions[idx], trace.aggregations[idx])):
                sub = sel.get_subselection(part)
                if not sub.is_empty_static():
                    total = total + tr.gen_fn.project(tr, sub)
        return total

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters of the production and the aggregation, each once."""
        seen: set[int] = set()
        out = []
        for fn in (self.production, self.aggregation):
            for p in fn.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return iter(out)


class _Incremental:
    """One update (``selection is None``) or regenerate pass over a Recurse trace.

    Works on copies of the trace's node tables: productions top-down (breadth-first) over the
    nodes that must be revisited, then aggregations bottom-up over the same nodes.
    """

    def __init__(self, gf: Recurse, trace: RecurseTrace, cons: NodeConstraints,
                 selection: Selection | None) -> None:
        self.gf = gf
        self.old = trace
        self.cons = cons
        self.selection = selection
        self.is_update = selection is None
        self.prods = dict(trace.productions)
        self.aggs = dict(trace.aggregations)
        self.nch = dict(trace.num_children)
        zero = torch.zeros_like(trace.score)
        self.weight = zero
        self.dscore = zero
        self.discard: dict[int, dict[str, ChoiceMap]] = {}
        self.must = self._must_visit()

    def _must_visit(self) -> set[int]:
        """Nodes constrained/selected, and their ancestors."""
        gf = self.gf
        if self.selection is None:
            return gf._with_ancestors(self.cons)
        nodes = list(self.old.productions)
        default, special = element_selections(self.selection, nodes)
        if not default.is_empty_static() or isinstance(self.selection, MaskSelection):
            return set(nodes)
        return gf._with_ancestors(k for k, s in special.items() if not s.is_empty_static())

    def _note_discard(self, idx: int, part: str, cm: ChoiceMap) -> None:
        if not cm.is_empty():
            self.discard.setdefault(idx, {})[part] = cm

    def _kernel_step(self, idx: int, part: str, gen_fn: GenerativeFunction, old: Trace,
                     args: tuple[Any, ...], diffs: tuple[Diff, ...]) -> tuple[Trace, Diff]:
        """Update/regenerate one kernel call of node ``idx`` (or keep it when nothing changed)."""
        j = _PARTS.index(part)
        unchanged = all(isinstance(d, NoChange) for d in diffs)
        if self.is_update:
            cm = self.cons[idx][j] if idx in self.cons else _EMPTY
            if unchanged and cm.is_empty():
                return old, NoChange()
            tr, w, retdiff, d = self.gf._call(idx, part, gen_fn.update, old, args, diffs, cm)
            self._note_discard(idx, part, d)
        else:
            assert self.selection is not None
            sel = self.selection.get_subselection(idx).get_subselection(part)
            if unchanged and sel.is_empty_static():
                return old, NoChange()
            tr, w, retdiff = self.gf._call(idx, part, gen_fn.regenerate, old, args, diffs, sel)
        self.weight = self.weight + w
        self.dscore = self.dscore + (tr.score - old.score)
        return tr, retdiff

    def _remove(self, root: int) -> None:
        old = self.old
        for j in self.gf._subtree(old.num_children, root):
            p, a = old.productions[j], old.aggregations[j]
            s = p.score + a.score
            self.dscore = self.dscore - s
            if self.is_update:
                self.weight = self.weight - s
                self._note_discard(j, "production", p.choices)
                self._note_discard(j, "aggregation", a.choices)
            del self.prods[j], self.aggs[j], self.nch[j]

    def _add_subtree(self, root: int, x: Any) -> None:
        w, s = self.gf._grow(root, x, self.cons, self.prods, self.aggs, self.nch)
        if w is not None:
            self.weight = self.weight + w
        self.dscore = self.dscore + s

    def run(self, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
            ) -> tuple[RecurseTrace, torch.Tensor, Diff, ChoiceMap]:
        gf, old = self.gf, self.old
        pdiffs: dict[int, Diff] = {}
        queue: deque[tuple[int, Any, Diff]] = deque([(0, args[0], argdiffs[0])])
        # productions, top-down
        while queue:
            idx, x, diff = queue.popleft()
            old_tr = old.productions[idx]
            tr, pdiff = self._kernel_step(idx, "production", gf.production, old_tr, (x,), (diff,))
            self.prods[idx] = tr
            pdiffs[idx] = pdiff
            prod = gf._production_of(idx, tr.retval)
            old_prod: Production = old_tr.retval
            n, n_old = len(prod.children), len(old_prod.children)
            self.nch[idx] = n
            for k in range(min(n, n_old)):
                c, c_old = prod.children[k], old_prod.children[k]
                child: tuple[int, Any, Diff]
                if isinstance(pdiff, NoChange) or _same_value(c, c_old):
                    child = (gf.child_index(idx, k), c_old, NoChange())
                else:
                    child = (gf.child_index(idx, k), c, UnknownChange())
                if not isinstance(child[2], NoChange) or child[0] in self.must:
                    queue.append(child)
            for k in range(n, n_old):
                self._remove(gf.child_index(idx, k))
            for k in range(n_old, n):
                self._add_subtree(gf.child_index(idx, k), prod.children[k])
        # aggregations, bottom-up (children have larger indices than their parent)
        retdiffs: dict[int, Diff] = {}
        for idx in sorted(pdiffs, reverse=True):
            old_agg = old.aggregations[idx]
            prod, old_prod = self.prods[idx].retval, old.productions[idx].retval
            n, n_old = self.nch[idx], old.num_children[idx]
            kids = gf._children(idx, n)
            same_results = n == n_old and all(isinstance(retdiffs.get(c, NoChange()), NoChange)
                                              for c in kids)
            same_value = isinstance(pdiffs[idx], NoChange) or _same_value(prod.value,
                                                                          old_prod.value)
            value = old_agg.args[0] if same_value else prod.value
            results = (old_agg.args[1] if same_results
                       else tuple(self.aggs[c].retval for c in kids))
            diffs = (NoChange() if same_value else UnknownChange(),
                     NoChange() if same_results else UnknownChange())
            tr, retdiff = self._kernel_step(idx, "aggregation", gf.aggregation, old_agg,
                                            (value, results), diffs)
            self.aggs[idx] = tr
            retdiffs[idx] = retdiff
        new = RecurseTrace(gf, args, self.aggs[0].retval, old.score + self.dscore,
                           _sorted(self.prods), _sorted(self.aggs), _sorted(self.nch))
        discard = ChoiceMap.node({i: ChoiceMap.node(self.discard[i])
                                  for i in sorted(self.discard)})
        return new, self.weight, retdiffs[0], discard
