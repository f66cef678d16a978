"""What a GFI law check reports: :class:`GFILawError` (a law failed),
:class:`LawSkipped` (a law does not apply to an example) and :class:`GFIReport` (what ran)."""

from __future__ import annotations

import collections
from typing import Any

import attrs

from gfcomb.core.choicemap import short_repr


class GFILawError(AssertionError):
    """A generative function broke a GFI law.  ``law`` names it; the message shows the
    arguments and the choice map involved."""

    def __init__(self, law: str, gen_fn: Any, detail: str, args: Any = None,
                 choices: Any = None, extra: dict[str, Any] | None = None) -> None:
        self.law = law
        self.gen_fn = gen_fn
        self.detail = detail
        self.args = args
        self.choices = choices
        lines = [f"GFI law '{law}' violated by {gen_fn!r}: {detail}"]
        if args is not None:
            lines.append(f"  args: {show_args(args)}")
        if choices is not None:
            lines.append("  choice map: " + _indent(repr(choices)))
        for k, v in (extra or {}).items():
            lines.append(f"  {k}: " + _indent(v if isinstance(v, str) else repr(v)))
        super().__init__("\n".join(lines))


class LawSkipped(Exception):
    """Raised by a law check that does not apply to this example (the reason is the message)."""


@attrs.define
class GFIReport:
    """What :func:`check_gfi` ran: examples, and per law how often it ran or was skipped."""

    gen_fn: Any
    laws: tuple[str, ...]
    examples: int = 0
    ran: collections.Counter[str] = attrs.field(factory=collections.Counter)
    skipped: dict[str, collections.Counter[str]] = attrs.field(factory=dict)

    def skip(self, law: str, reason: str) -> None:
        """Record that ``law`` did not apply to one example."""
        self.skipped.setdefault(law, collections.Counter())[reason] += 1

    @property
    def laws_run(self) -> tuple[str, ...]:
        """The laws that ran on at least one example."""
        return tuple(law for law in self.laws if self.ran[law] > 0)

    @property
    def laws_never_run(self) -> tuple[str, ...]:
        """The selected laws that applied to no example."""
        return tuple(law for law in self.laws if self.ran[law] == 0)

    def summary(self) -> str:
        """A readable table: law, examples run, skip reasons."""
        lines = [f"check_gfi({self.gen_fn!r}): {self.examples} examples"]
        for law in self.laws:
            reasons: dict[str, int] = self.skipped.get(law, {})
            why = "; ".join(f"{r} (x{n})" for r, n in reasons.items())
            lines.append(f"  {law:18s} ran {self.ran[law]:4d}" + (f"  skipped: {why}" if why
                                                                  else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _indent(text: str) -> str:
    return text.replace("\n", "\n    ")


def show_args(args: Any) -> str:
    """An argument tuple, short (tensors summarised), for failure messages."""
    if isinstance(args, tuple):
        return "(" + ", ".join(short_repr(a) for a in args) + ("," if len(args) == 1 else "") + ")"
    return short_repr(args)
