"""Latent world models as probabilistic programs in Pyro."""

from .compare import EstimatorComparison, compare_estimators
from .config import Spec, build, register, spec_of
from .evaluate import (
    ELBOTerms,
    Imagination,
    LinearGaussianSSM,
    OpenLoop,
    elbo_terms,
    heldout_bounds,
    imagine,
    iwae_log_likelihood,
    open_loop,
)
from .infer import (
    CompileFallbackWarning,
    FreeNats_ELBO,
    History,
    JitTraceMeanField_ELBO,
    KLAnnealing_ELBO,
    KLBalancing_ELBO,
    MonteCarloKLWarning,
    TraceMeanField_ELBO,
    default_elbo,
    fit,
)
from .io import load_checkpoint, save_checkpoint
from .model import FilterGuide, WorldModel
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
    "CompileFallbackWarning",
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
