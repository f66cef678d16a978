"""Combinators: Map, Unfold, Switch, Recurse."""

from gfcomb.combinators.map import Map
from gfcomb.combinators.vector import VectorTrace

__all__ = ["Map", "VectorTrace"]
