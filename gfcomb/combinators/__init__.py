"""Combinators: Map, Unfold, Switch, Recurse (one module each; shared machinery in vector.py),
and Scan, Repeat, Mask, Dimap (built on them; shared wrapper machinery in wrapped.py)."""

from gfcomb.combinators.dimap import Dimap
from gfcomb.combinators.map import Map
from gfcomb.combinators.mask import Mask, MaskTrace
from gfcomb.combinators.recurse import Production, Recurse, RecurseTrace
from gfcomb.combinators.repeat import Repeat
from gfcomb.combinators.scan import Scan
from gfcomb.combinators.switch import Switch, SwitchTrace
from gfcomb.combinators.unfold import Unfold, UnfoldTrace
from gfcomb.combinators.vector import VectorTrace
from gfcomb.combinators.wrapped import WrappedTrace

__all__ = ["Dimap", "Map", "Mask", "MaskTrace", "Production", "Recurse", "RecurseTrace",
           "Repeat", "Scan", "Switch", "SwitchTrace", "Unfold", "UnfoldTrace", "VectorTrace",
           "WrappedTrace"]
