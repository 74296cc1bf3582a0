"""Latent world models as probabilistic programs in Pyro."""

from .anchors import LinearGaussianSSM
from .evaluate import ELBOTerms, elbo_terms, iwae_log_likelihood
from .guides import FilterGuide
from .inference import History, default_elbo, fit, load_checkpoint, save_checkpoint
from .model import WorldModel
from .spaces import ActionSpace

__all__ = [
    "ActionSpace",
    "ELBOTerms",
    "FilterGuide",
    "History",
    "LinearGaussianSSM",
    "WorldModel",
    "default_elbo",
    "elbo_terms",
    "fit",
    "iwae_log_likelihood",
    "load_checkpoint",
    "save_checkpoint",
]
__version__ = "0.1.0"
