"""Testing your own generative function: an AR(1) process with a hand-written update.

    x_t ~ Normal(phi * x_{t-1}, sigma),  t = 0..T-1,  x_{-1} = 0,  choices at (t, "x")

``AR1`` subclasses ``gf.GenerativeFunction`` and implements the GFI by hand; its ``update``
is incremental: a new value at step t only changes the log-density terms of steps t and
t + 1.  ``check_gfi`` checks every GFI law on it; then ``ForgetfulAR1``, whose update forgets
the term of step t + 1 (the classic bug of hand-written incremental updates), is caught and
the message check_gfi gives is printed.

Run: ``python examples/custom_gf_testing.py [--size small|full]``

- ``--size small`` (the default, as in CI): 10 examples of every law, about 30 s;
- ``--size full``: 200 examples of every law, about 35 s.

Catching the bug takes the same time at both sizes (shrinking is bounded, see check_gfi's
``max_shrink_seconds``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from common import parse_args
from hypothesis import strategies as st

import gfcomb as gf
from gfcomb.testing import GFILawError, check_gfi
from gfcomb.testing.strategies import float_tensors

LOG_2PI = math.log(2 * math.pi)


@gf.trace_record
class AR1Trace(gf.RecordTrace):
    """The T values of one run of the process (an immutable record vmap can batch)."""

    gen_fn: Any
    args: tuple[Any, ...]
    xs: tuple[torch.Tensor, ...]
    score: torch.Tensor

    @property
    def retval(self) -> torch.Tensor:
        return torch.stack(self.xs)

    def choice_values(self) -> dict[Any, Any]:
        return {(t, "x"): x for t, x in enumerate(self.xs)}


def normal_lp(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * LOG_2PI


def flag_of(sel: gf.Selection, t: int) -> Any:
    """Is (t, "x") selected: a bool, or a bool tensor under vmap."""
    return sel.get_subselection(t).get_subselection("x").leaf_flag()


def where(flag: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if isinstance(flag, bool):
        return a if flag else b
    return torch.where(flag, a, b)


class AR1(gf.GenerativeFunction):
    """An AR(1) process of ``T`` steps; arguments ``(phi, sigma)``."""

    def __init__(self, T: int) -> None:
        self.T = T

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T})"

    def _terms(self, xs: tuple[torch.Tensor, ...], args: tuple[Any, ...]) -> list[torch.Tensor]:
        phi, sigma = args
        prev = torch.zeros_like(xs[0])
        out = []
        for x in xs:
            out.append(normal_lp(x, phi * prev, sigma))
            prev = x
        return out

    def _trace(self, args: tuple[Any, ...], xs: tuple[torch.Tensor, ...]) -> AR1Trace:
        return AR1Trace(self, args, xs, torch.stack(self._terms(xs, args)).sum())

    def _given(self, cm: gf.ChoiceMap, t: int) -> tuple[Any, Any]:
        """(value, presence) of a constraint at (t, "x"): presence is False, True or a mask."""
        sub = cm.get_submap((t, "x"))
        if not sub.is_value():
            return None, False
        return sub.get_value(), True if sub.mask is None else sub.mask

    def simulate(self, args: tuple[Any, ...]) -> AR1Trace:
        """Math: x_t ~ N(phi x_{t-1}, sigma); score = Σ_t log N(x_t; phi x_{t-1}, sigma)."""
        phi, sigma = args
        prev, xs = torch.zeros_like(phi), []
        for _ in range(self.T):
            prev = phi * prev + sigma * torch.randn_like(phi)
            xs.append(prev)
        return self._trace(args, tuple(xs))

    def generate(self, args: tuple[Any, ...], constraints: Any = None) -> tuple[AR1Trace, Any]:
        """Math: constrained x_t kept, others from the prior given x_{t-1};
        weight = Σ_{constrained t} log N(x_t; phi x_{t-1}, sigma)."""
        phi, sigma = args
        cm = gf.ChoiceMap(constraints) if constraints is not None else gf.ChoiceMap.empty()
        prev, xs, weight = torch.zeros_like(phi), [], torch.zeros_like(phi)
        for t in range(self.T):
            v, present = self._given(cm, t)
            fresh = phi * prev + sigma * torch.randn_like(phi)
            x = fresh if present is False else where(present, v.to(fresh.dtype), fresh)
            weight = weight + where(present, normal_lp(x, phi * prev, sigma),
                                    torch.zeros_like(weight))
            xs.append(x)
            prev = x
        return self._trace(args, tuple(xs)), weight

    def _changed_steps(self, cm: gf.ChoiceMap, args_changed: bool) -> set[int]:
        """The steps whose log-density term a constraint changes: t and t + 1."""
        if args_changed:
            return set(range(self.T))
        steps = {t for t in range(self.T) if self._given(cm, t)[1] is not False}
        return {s for t in steps for s in (t, t + 1) if s < self.T}

    def update(self, trace: AR1Trace, args: tuple[Any, ...], argdiffs: tuple[Any, ...],
               constraints: Any = None) -> tuple[AR1Trace, Any, Any, gf.ChoiceMap]:
        """Math: weight = log p(x'; args') − log p(x; args), computed from the terms of the
        steps that change only; discard = the old values at the constrained steps."""
        cm = gf.ChoiceMap(constraints) if constraints is not None else gf.ChoiceMap.empty()
        xs, discard = list(trace.xs), {}
        for t in range(self.T):
            v, present = self._given(cm, t)
            if present is not False:
                xs[t] = where(present, v.to(xs[t].dtype), xs[t])
                discard[t] = gf.ChoiceMap.node({"x": gf.ChoiceMap.value(
                    trace.xs[t], None if present is True else present)})
        args_changed = not all(isinstance(d, gf.NoChange) for d in argdiffs)
        new_terms = self._terms(tuple(xs), args)
        old_terms = self._terms(trace.xs, trace.args)
        weight = torch.zeros_like(trace.score)
        for t in self._changed_steps(cm, args_changed):
            weight = weight + new_terms[t] - old_terms[t]
        new = AR1Trace(self, args, tuple(xs), torch.stack(new_terms).sum())
        return new, weight, gf.UnknownChange(), gf.ChoiceMap.node(discard)

    def regenerate(self, trace: AR1Trace, args: tuple[Any, ...], argdiffs: tuple[Any, ...],
                   selection: gf.Selection) -> tuple[AR1Trace, Any, Any]:
        """Math: selected x_t resampled from the prior given the new x_{t-1};
        weight = Σ_{unselected t} (log p'(x_t) − log p(x_t))."""
        phi, sigma = args
        old_terms = self._terms(trace.xs, trace.args)
        prev, xs, weight = torch.zeros_like(phi), [], torch.zeros_like(trace.score)
        for t in range(self.T):
            flag = flag_of(selection, t)
            fresh = phi * prev + sigma * torch.randn_like(phi)
            x = where(flag, fresh, trace.xs[t])
            lp = normal_lp(x, phi * prev, sigma)
            weight = weight + where(flag, torch.zeros_like(lp), lp - old_terms[t])
            xs.append(x)
            prev = x
        return self._trace(args, tuple(xs)), weight, gf.UnknownChange()

    def project(self, trace: AR1Trace, selection: gf.Selection) -> torch.Tensor:
        """Math: Σ_{selected t} log N(x_t; phi x_{t-1}, sigma)."""
        terms = self._terms(trace.xs, trace.args)
        total = torch.zeros_like(trace.score)
        for t, lp in enumerate(terms):
            total = total + where(flag_of(selection, t), lp, torch.zeros_like(lp))
        return total


class ForgetfulAR1(AR1):
    """The same process, but update's weight forgets the term of step t + 1."""

    def _changed_steps(self, cm: gf.ChoiceMap, args_changed: bool) -> set[int]:
        if args_changed:
            return set(range(self.T))
        return {t for t in range(self.T) if self._given(cm, t)[1] is not False}


ARGS = st.tuples(float_tensors((), -0.9, 0.9), float_tensors((), 0.5, 2.0))


def main() -> None:
    opts = parse_args(__doc__, {"small": "10 examples per law", "full": "200 examples per law"})
    torch.set_default_dtype(torch.float64)
    examples = 200 if opts.size == "full" else 10
    report = check_gfi(AR1(T=3), ARGS, max_examples=examples, derandomize=True)
    print(report.summary())
    print("AR1 satisfies the GFI laws.\n")
    try:
        # all laws would catch it too (in update_weight); checking that one law is quicker
        check_gfi(ForgetfulAR1(T=3), ARGS, max_examples=100, laws=["update_weight"], shrink=False,
                  derandomize=True)
    except GFILawError as err:
        print("ForgetfulAR1 is caught; check_gfi says:\n")
        print(str(err).split("\nFailing test case")[0])
        print(f"\nlaw: {err.law}")
    else:
        raise SystemExit("check_gfi did not catch the forgetful update")


if __name__ == "__main__":
    main()
