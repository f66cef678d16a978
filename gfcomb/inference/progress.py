"""Progress bars for the inference loops (MCMC chains, training, particle filters).

One helper, :func:`progress_bar`, wraps ``tqdm``: shown only when asked for and when standard
output is a terminal (so CI logs and piped output stay clean), and a plain iterator when
tqdm is not installed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any


def progress_enabled(progress: bool | None) -> bool:
    """Whether to show a bar: ``progress`` if it is a bool, else whether stdout is a terminal.

    ``progress=None`` (the default of every helper) means "when interactive";
    ``progress=False`` always turns the bar off; ``progress=True`` always turns it on.
    """
    if progress is not None:
        return bool(progress)
    try:
        return bool(sys.stdout.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stdout
        return False


class _NoBar:
    """The interface of a tqdm bar that does nothing (used when the bar is off)."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Ignored."""

    def update(self, n: int = 1) -> None:
        """Ignored."""

    def close(self) -> None:
        """Ignored."""


def progress_bar(iterable: Iterable[Any] | int, *, desc: str | None = None,
                 progress: bool | None = None, **tqdm_kwargs: Any) -> Any:
    """``tqdm(iterable)`` when the bar is enabled (see :func:`progress_enabled`), else an
    object with the same ``__iter__`` / ``set_postfix`` / ``update`` / ``close`` methods that
    draws nothing.  An int ``iterable`` means ``range(iterable)``.

    >>> for step in progress_bar(3, desc="mcmc", progress=False):
    ...     pass
    """
    if isinstance(iterable, int):
        iterable = range(iterable)
    if not progress_enabled(progress):
        return _NoBar(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but keep working without
        return _NoBar(iterable)
    return tqdm(iterable, desc=desc, dynamic_ncols=True, **tqdm_kwargs)
