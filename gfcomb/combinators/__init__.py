"""Combinators: Map, Unfold, Switch, Recurse (one module each; shared machinery in vector.py)."""

from gfcomb.combinators.map import Map
from gfcomb.combinators.recurse import Production, Recurse, RecurseTrace
from gfcomb.combinators.switch import Switch, SwitchTrace
from gfcomb.combinators.unfold import Unfold, UnfoldTrace
from gfcomb.combinators.vector import VectorTrace

__all__ = ["Map", "Production", "Recurse", "RecurseTrace", "Switch", "SwitchTrace", "Unfold",
           "UnfoldTrace", "VectorTrace"]
