"""Exceptions raised by gfcomb.  Each names the address or argument at fault."""

from __future__ import annotations

from typing import Any


class GFIError(Exception):
    """Base class of every error gfcomb raises for bad input."""


class AddressError(GFIError, KeyError):
    """An address is missing, duplicated, or never visited by the model.

    ``what`` is a message in which ``{addr}`` stands for the address; ``address`` is the
    address as a tuple.  A generative function that calls another one re-raises its callee's
    error with its own address in front (:meth:`prefixed`), so the message names the full
    address from the top.
    """

    def __init__(self, what: str, address: tuple[Any, ...] = ()) -> None:
        super().__init__(what, address)
        self.what = what
        self.address = address

    def prefixed(self, prefix: tuple[Any, ...]) -> AddressError:
        """The same error at ``prefix + self.address``."""
        err = type(self)(self.what, tuple(prefix) + tuple(self.address))
        return err

    def __str__(self) -> str:
        from gfcomb.core.address import format_address

        if "{addr}" in self.what:
            return self.what.replace("{addr}", format_address(self.address))
        return self.what


class DuplicateAddressError(AddressError):
    """The same address was traced twice in one execution."""


class UnvisitedConstraintError(AddressError):
    """A constraint was given at an address that the model never visits."""


class MissingChoiceError(AddressError):
    """assess (or update) needed a choice that the choice map does not hold."""


class ChoiceMapMergeError(AddressError):
    """Two choice maps given to merge both hold a value at the same address."""


class StepStructureError(AddressError, ValueError):
    """The steps of an Unfold (or Scan) made traces of different structure (other addresses,
    other static values), which cannot be stored stacked, one tensor per address across the
    steps.  ``address`` is the first step that differs from the others; branching on the
    step number with ``gf.Mask`` or ``gf.Switch`` (rather than a Python ``if``) keeps one
    structure."""


class DistributionArgumentError(GFIError, ValueError):
    """A distribution got a non-finite, out-of-support or wrong-shaped parameter.

    The message names the argument; a @gen function that traced the call adds its address
    (:meth:`prefixed`), shown as "... (in the call at address ('s', 'x'))".
    """

    def __init__(self, message: str, address: tuple[Any, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.address = tuple(address)

    def prefixed(self, prefix: tuple[Any, ...]) -> DistributionArgumentError:
        """The same error, raised by the call at ``prefix + self.address``."""
        return type(self)(self.message, tuple(prefix) + self.address)

    def __str__(self) -> str:
        if not self.address:
            return self.message
        from gfcomb.core.address import format_address

        return f"{self.message} (in the call at address {format_address(self.address)})"


class DistributionArgumentTypeError(DistributionArgumentError, TypeError):
    """A distribution argument of a type that cannot be a parameter (a str, None)."""


class ArgumentError(GFIError, ValueError):
    """A generative function got arguments it cannot use (wrong count, unequal lengths, ...)."""


class VmapError(GFIError, RuntimeError):
    """A kernel could not be run under torch.func.vmap (see the message for the cause)."""


class DegenerateWeightsError(GFIError, FloatingPointError):
    """All importance weights are -inf or NaN."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type (a str or dict where a Selection is expected, say);
    the message names the argument."""


class AddressTypeError(AddressError, TypeError):
    """An address component that is neither a str nor an int (a list inside a key, say)."""


class ChoiceValueError(GFIError, TypeError):
    """A choice map was given a value that is not a number, a bool or a tensor (a str, say).

    ``address`` is the address the value was given at."""

    def __init__(self, message: str, address: tuple[Any, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.address = tuple(address)

    def __str__(self) -> str:
        from gfcomb.core.address import format_address

        return f"{self.message} (at address {format_address(self.address)})"


class OutsideGenBodyError(GFIError, RuntimeError):
    """``gen_fn(args) @ addr`` (or ``gf.splice``) was used outside the body of a running
    @gen function."""


class NumericalError(GFIError, FloatingPointError):
    """A computation produced NaN or +inf where that can only come from bad input (a
    batched Switch index out of range, a non-positive scale given to the elements of a Map);
    the message names the element and, where it can be found, the argument."""


class PersistenceError(GFIError, ValueError):
    """``gf.save`` was given an object it cannot store, or ``gf.load`` could not rebuild one
    (a generative function it has no binding for, a file from another format)."""


class DistributedError(GFIError, RuntimeError):
    """A collective call over a ``torch.distributed`` process group could not complete: the
    ranks disagree (not at the same step, different models), or see the subclasses."""


class RankFailedError(DistributedError):
    """Another rank (or this one) raised inside a collective gfcomb call; every rank of the
    group raises this, naming the ranks that failed and their errors."""


class CollectiveTimeoutError(DistributedError, TimeoutError):
    """A collective call did not complete within the group's timeout: a rank died, hangs,
    or did not make the same call."""
