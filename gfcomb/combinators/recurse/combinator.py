"""The :class:`Recurse` combinator and its GFI (the work is done by
:mod:`gfcomb.combinators.recurse.edit`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from gfcomb.combinators.parts import Combinator, gen_fn_part
from gfcomb.combinators.recurse.edit import EditPass
from gfcomb.combinators.recurse.edits import Constrain, NodeConstraints, Resample
from gfcomb.combinators.recurse.trace import (
    PARTS,
    Production,
    RecurseTrace,
    first_address,
    same_value,
)
from gfcomb.core.choicemap import ChoiceMap
from gfcomb.core.diff import Diff, NoChange, UnknownChange
from gfcomb.core.errors import AddressError, ArgumentError, UnvisitedConstraintError
from gfcomb.core.gfi import (
    GenerativeFunction,
    as_choicemap,
    check_argdiffs,
    check_args_tuple,
    check_trace,
    zero_weight,
)
from gfcomb.core.selection import MaskSelection, Selection, element_selections
from gfcomb.core.trace import Trace
from gfcomb.core.validation import check_selection


class Recurse(Combinator):
    """A generative function over trees (see :mod:`gfcomb.combinators.recurse`).

    ``production``: a generative function ``(input) -> Production(value, children)``;
    ``aggregation``: a generative function ``(value, child_results) -> result``;
    ``max_branch``: the largest number of children a node may have (it fixes the node
    numbering: child ``k`` of node ``p`` is ``p * max_branch + k + 1``).  Arguments:
    ``(root_input,)``.

    Batched by depth (``batch_depths=True``, the default): in every method, the nodes of one
    depth that take the same kind of kernel call (simulate, generate, update, regenerate)
    with inputs of one structure (same pytree, equal Python leaves, same tensor shapes) run
    as ONE batched call of the kernel (its batch methods: one vmap over the nodes), the
    productions top-down and the aggregations bottom-up.  A kernel whose number of children
    depends on a tensor value (``int(k)``), or that cannot run under vmap for another reason,
    falls back to one call per node for the rest of the call (after one failed attempt), with
    the same results; so does everything inside ``with gfcomb.core.vmap.vectorized(False)``.
    ``batch_depths=False`` always calls the kernels node by node.
    """

    def __init__(self, production: GenerativeFunction, aggregation: GenerativeFunction,
                 max_branch: int, *, batch_depths: bool = True) -> None:
        production = gen_fn_part(production, "Recurse", "production")
        aggregation = gen_fn_part(aggregation, "Recurse", "aggregation")
        if isinstance(max_branch, bool) or not isinstance(max_branch, int) or max_branch < 1:
            raise ArgumentError(f"Recurse: max_branch must be a positive int, got {max_branch!r}")
        self.production = production
        self.aggregation = aggregation
        self.max_branch = max_branch
        self.batch_depths = bool(batch_depths)

    def __repr__(self) -> str:
        return (f"Recurse({self.production!r}, {self.aggregation!r}, "
                f"max_branch={self.max_branch})")

    def parts(self) -> tuple[Any, ...]:
        """The production, the aggregation and the static options (Recurse(...) built
        inside a @gen body each run is the same function)."""
        return (Recurse, self.production, self.aggregation, self.max_branch, self.batch_depths)

    def kernel_name(self, part: str) -> str:
        """``"<this Recurse> production"`` / ``"... aggregation"`` (names a kernel in errors;
        formatted once)."""
        names = self.__dict__.get("_names")
        if names is None:
            names = self.__dict__["_names"] = {p: f"{self!r} {p}" for p in PARTS}
        return names[part]

    # ------------------------------------------------------------------ tree arithmetic
    def child_index(self, parent: int, k: int) -> int:
        """The index of child ``k`` (0-based) of node ``parent``."""
        return parent * self.max_branch + k + 1

    def parent_index(self, idx: int) -> int:
        """The index of node ``idx``'s parent (``idx`` > 0)."""
        return (idx - 1) // self.max_branch

    def children_range(self, idx: int, n: int) -> range:
        """The indices of the first ``n`` children of node ``idx``."""
        first = idx * self.max_branch + 1
        return range(first, first + n)

    def with_ancestors(self, keys: Iterable[int]) -> set[int]:
        """The nodes ``keys`` and all their ancestors."""
        out: set[int] = set()
        for k in keys:
            while k not in out:
                out.add(k)
                if k == 0:
                    break
                k = self.parent_index(k)
        return out

    def subtree(self, num_children: dict[int, int], root: int) -> list[int]:
        """The nodes of the subtree rooted at ``root`` (children counts ``num_children``)."""
        out, stack = [], [root]
        while stack:
            i = stack.pop()
            out.append(i)
            stack.extend(self.children_range(i, num_children[i]))
        return out

    # ------------------------------------------------------------------ checks
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
        if not isinstance(argdiffs[0], NoChange) and same_value(args[0], trace.args[0]):
            return (NoChange(),)
        return argdiffs

    def _check_trace(self, trace: Any) -> RecurseTrace:
        return check_trace(self, trace, RecurseTrace)

    def production_of(self, idx: int, retval: Any) -> Production:
        """The production's return value at node ``idx``, checked (ArgumentError naming the
        node)."""
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
    def node_call(idx: int, part: str, method: Callable[..., Any], *args: Any) -> Any:
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
                raise UnvisitedConstraintError(what, (k,) + first_address(sub))
            if sub.is_value():
                raise UnvisitedConstraintError(what, (k,))
            for part in sub.keys():
                if part not in PARTS:
                    raise UnvisitedConstraintError(
                        what, (k, part) + first_address(sub.get_submap(part)))
            out[k] = (sub.get_submap("production"), sub.get_submap("aggregation"))
        return out

    @staticmethod
    def _check_visited(cons: NodeConstraints, nodes: Any, method: str) -> None:
        for idx in sorted(cons):
            if idx in nodes:
                continue
            for part, cm in zip(PARTS, cons[idx]):
                if not cm.is_empty():
                    raise UnvisitedConstraintError(
                        f"{method}: constraint at address {{addr}} is never visited (node {idx} "
                        "is not in the tree)", (idx, part) + first_address(cm))

    def _grow(self, args: tuple[Any, ...], cons: NodeConstraints, method: str,
              strict: bool = False) -> tuple[RecurseTrace, torch.Tensor | None]:
        edit = EditPass(self, Constrain(cons, strict), None)
        weight, _ = edit.run(args[0], UnknownChange())
        self._check_visited(cons, edit.prods, method)
        prods, aggs, nch = edit.tables()
        score = edit.dscore()
        assert score is not None
        return RecurseTrace(self, args, edit.root_result(), score, prods, aggs, nch), weight

    def _edit(self, trace: RecurseTrace, args: tuple[Any, ...], argdiffs: tuple[Diff, ...],
              edit: Constrain | Resample) -> tuple[RecurseTrace, torch.Tensor, Diff, ChoiceMap]:
        run = EditPass(self, edit, trace)
        weight, retdiff = run.run(args[0], argdiffs[0])
        if isinstance(edit, Constrain):
            self._check_visited(edit.cons, run.prods, "update")
        prods, aggs, nch = run.tables()
        dscore = run.dscore()
        score = trace.score if dscore is None else trace.score + dscore
        new = RecurseTrace(self, args, run.root_result(), score, prods, aggs, nch)
        return (new, torch.zeros_like(score) if weight is None else weight, retdiff,
                run.discards())

    # ------------------------------------------------------------------ the GFI
    def simulate(self, args: tuple[Any, ...]) -> RecurseTrace:
        """Grow the tree from the root, sampling every choice.

        Math: t ~ p(·; x): productions top-down, aggregations bottom-up; score = Σ over nodes
        of the production and aggregation scores = log p(t; x).
        """
        return self._grow(self._check_args(args), {}, "simulate")[0]

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
        tr, weight = self._grow(args, cons, "generate")
        return tr, weight if weight is not None else zero_weight(tr.score)

    def assess(self, args: tuple[Any, ...], choices: ChoiceMap) -> tuple[torch.Tensor, Any]:
        """Score given choices of a whole tree.

        Math: weight = log p(t; x) = Σ over nodes of the production and aggregation weights
        of the given choices.  Every choice of every node reached must be given
        (MissingChoiceError naming the full address) and every given node must be reached.
        Differentiable in the argument and the choice values (the gradient methods are built
        on it).
        """
        args = self._check_args(args)
        cons = self._node_constraints(as_choicemap(choices), "assess")
        tr, weight = self._grow(args, cons, "assess", strict=True)
        assert weight is not None
        return weight, tr.retval

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
            return trace, zero_weight(trace.score), NoChange(), ChoiceMap.empty()
        return self._edit(trace, args, argdiffs, Constrain(cons))

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
            return trace, zero_weight(trace.score), NoChange()
        new, weight, retdiff, _ = self._edit(trace, args, argdiffs, Resample(selection))
        return new, weight, retdiff

    def project(self, trace: Trace, selection: Selection) -> torch.Tensor:
        """Log density of the selected choices.

        Math: project(t, S) = Σ over nodes i of production.project(t_i^prod, S[i, "production"])
        + aggregation.project(t_i^agg, S[i, "aggregation"]); project(t, selectall) = score.
        Nodes that are rows of one stacked block and share one sub-selection (everything,
        nothing) are projected in one call of the kernel's ``project`` on the block.
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
        for part, table in zip(PARTS, (trace.productions, trace.aggregations)):
            total = total + project_nodes(table, visit, selection, part)
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


def project_nodes(table: Any, visit: Sequence[int], selection: Selection, part: str,
                  ) -> torch.Tensor | float:
    """Σ over ``visit`` of the kernel ``project`` of each node's ``part`` trace; nodes that
    are whole-selected rows of one stacked block count their block rows' scores at once."""
    total: torch.Tensor | float = 0.0
    rows_all: dict[int, list[int]] = {}
    for idx in visit:
        sub = selection.get_subselection(idx).get_subselection(part)
        if sub.is_empty_static():
            continue
        b, r = table.where[idx]
        if r >= 0 and sub.is_all_static():
            rows_all.setdefault(b, []).append(r)
            continue
        tr = table[idx]
        total = total + tr.gen_fn.project(tr, sub)
    for b, rows in rows_all.items():
        total = total + table.blocks[b].score[torch.tensor(rows)].sum()
    return total
