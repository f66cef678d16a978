"""``gf.splice``: a @gen callee run with its choices in the caller's own namespace."""

from __future__ import annotations

from typing import Any

from gfcomb.core.gfi import Invocation
from gfcomb.core.runtime import current_handler
from gfcomb.dsl.gen_function import GenFunction


def splice(invocation: Any) -> Any:
    """Run a ``@gen`` callee with its choices placed in the caller's own namespace.

    ``gf.splice(sub(x))`` is Gen.jl's ``{*} ~ sub(x)``: the callee's addresses are not
    prefixed.  Only ``@gen`` functions can be spliced.
    """
    if not isinstance(invocation, Invocation) or not isinstance(invocation.gen_fn, GenFunction):
        raise TypeError("gf.splice takes a call of a @gen function, e.g. gf.splice(sub(x))")
    return current_handler().splice(invocation.gen_fn, invocation.args)
