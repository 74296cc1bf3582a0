"""Evaluating a trained world model: held-out bounds, imagination, open-loop
prediction against baselines, exact references and the memory of a step."""

from ..infer.terms import ELBOTerms, elbo_terms
from ..model.baselines import CopyLast, LinearLeastSquares, OpenLoopBaseline
from .bounds import heldout_bounds, iwae_log_likelihood, log_weights
from .exact import CategoricalHMM, LinearGaussianSSM, maximum_likelihood
from .imagination import Imagination, imagine
from .open_loop import OpenLoop, open_loop
from .profiling import PeakMemory, peak_memory
from .scores import crps, interval_coverage, mixture_log_density, moment_matched
from .video import StateProbe, VideoPrediction, r_squared, video_open_loop

__all__ = [
    "CategoricalHMM",
    "CopyLast",
    "ELBOTerms",
    "Imagination",
    "LinearGaussianSSM",
    "maximum_likelihood",
    "LinearLeastSquares",
    "OpenLoop",
    "OpenLoopBaseline",
    "VideoPrediction",
    "PeakMemory",
    "StateProbe",
    "elbo_terms",
    "heldout_bounds",
    "imagine",
    "iwae_log_likelihood",
    "log_weights",
    "open_loop",
    "video_open_loop",
    "r_squared",
    "peak_memory",
    "crps",
    "interval_coverage",
    "mixture_log_density",
    "moment_matched",
]
