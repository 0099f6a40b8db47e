"""Experiments over many runs: the GPT evolution lab and scaling-law fits."""

from .evolution import LADDER, evolution, generations, ladder
from .runs import LabError, match_width, shape
from .scaling import Fit, fit, load_fit, scaling

__all__ = ["LADDER", "LabError", "Fit", "evolution", "fit", "generations", "ladder", "load_fit", "match_width",
           "scaling", "shape"]
