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

Every method runs the nodes of one depth that take the same kind of kernel call as one batch
(one vmap over the nodes), falling back node by node where a kernel cannot be vmapped.
``update`` and ``regenerate`` revisit only the nodes whose input changed, that are
constrained/selected, or whose child's result changed (found at their depths: the ancestors of
an edited node make no call); aggregation results are propagated upward only while they change
(retdiffs: ``NoChange`` stops the propagation).  A tree grown afresh builds no per-node index
until one is asked for.  Trees are walked
iteratively (no Python recursion), so deep trees are fine.

* :mod:`~gfcomb.combinators.recurse.combinator` -- the :class:`Recurse` combinator and its GFI;
* :mod:`~gfcomb.combinators.recurse.trace` -- :class:`RecurseTrace`, :class:`Production` and
  the node tables (per-depth stacked kernel traces);
* :mod:`~gfcomb.combinators.recurse.edit` -- the edit engine (one pass over the tree);
* :mod:`~gfcomb.combinators.recurse.edits` -- the edits it applies (constraints or a
  selection);
* :mod:`~gfcomb.combinators.recurse.batch` -- one kernel call over the nodes of a depth.
"""

from gfcomb.combinators.recurse.combinator import Recurse
from gfcomb.combinators.recurse.trace import NodeTable, Production, RecurseTrace

__all__ = ["NodeTable", "Production", "Recurse", "RecurseTrace"]
