"""Latent world models as probabilistic programs in Pyro."""

from .anchors import LinearGaussianSSM
from .compare import EstimatorComparison, compare_estimators
from .config import Spec, build, register, spec_of
from .elbos import (
    FreeNats_ELBO,
    JitTraceMeanField_ELBO,
    KLAnnealing_ELBO,
    KLBalancing_ELBO,
    MonteCarloKLWarning,
    TraceMeanField_ELBO,
)
from .evaluate import ELBOTerms, OpenLoop, elbo_terms, heldout_bounds, iwae_log_likelihood, open_loop
from .guides import FilterGuide
from .imagine import Imagination, imagine
from .inference import History, default_elbo, fit, load_checkpoint, save_checkpoint
from .model import WorldModel
from .spaces import ActionSpace

__all__ = [
    "ActionSpace",
    "ELBOTerms",
    "EstimatorComparison",
    "FilterGuide",
    "FreeNats_ELBO",
    "JitTraceMeanField_ELBO",
    "KLAnnealing_ELBO",
    "KLBalancing_ELBO",
    "MonteCarloKLWarning",
    "TraceMeanField_ELBO",
    "History",
    "Imagination",
    "LinearGaussianSSM",
    "OpenLoop",
    "Spec",
    "WorldModel",
    "build",
    "compare_estimators",
    "default_elbo",
    "elbo_terms",
    "fit",
    "heldout_bounds",
    "imagine",
    "iwae_log_likelihood",
    "load_checkpoint",
    "open_loop",
    "register",
    "spec_of",
    "save_checkpoint",
]
__version__ = "0.1.0"
