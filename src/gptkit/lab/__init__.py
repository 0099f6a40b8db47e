"""Experiments over many runs: the GPT evolution lab and scaling-law fits."""

from .evolution import LADDER, evolution, generations, ladder
from .runs import LabError, LabRun, match_width, shape
from .scaling import ScalingLaw, fit_scaling_law, load_scaling_law, scaling

__all__ = ["LADDER", "LabError", "LabRun", "ScalingLaw", "evolution", "fit_scaling_law", "generations", "ladder",
           "load_scaling_law", "match_width", "scaling", "shape"]
