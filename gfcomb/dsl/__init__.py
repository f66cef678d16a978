"""The @gen modelling language."""

from gfcomb.dsl.gen_function import GenFunction, GenTrace, gen
from gfcomb.dsl.splice import splice

__all__ = ["GenFunction", "GenTrace", "gen", "splice"]
