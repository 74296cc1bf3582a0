"""Inference: the ELBOs, the batched mean-field path, training by SVI and its warm start."""

from .batched import CompileFallbackWarning
from .elbos import (
    FreeNats_ELBO,
    JitTraceMeanField_ELBO,
    KLAnnealing_ELBO,
    KLBalancing_ELBO,
    LatentOvershooting_ELBO,
    MonteCarloKLWarning,
    TraceEnum_ELBO,
    TraceMeanField_ELBO,
    analytic_kl,
    why_not_enumerable,
)
from .terms import ELBOTerms, elbo_terms
from .training import (
    MAX_PLATE_NESTING,
    DataParallel,
    History,
    check_training_data,
    default_elbo,
    default_optim,
    fit,
    minibatch_indices,
)
from .warm_start import linear_warm_start, why_no_linear_warm_start

__all__ = [
    "CompileFallbackWarning",
    "DataParallel",
    "ELBOTerms",
    "FreeNats_ELBO",
    "History",
    "JitTraceMeanField_ELBO",
    "KLAnnealing_ELBO",
    "KLBalancing_ELBO",
    "LatentOvershooting_ELBO",
    "MAX_PLATE_NESTING",
    "MonteCarloKLWarning",
    "TraceEnum_ELBO",
    "TraceMeanField_ELBO",
    "analytic_kl",
    "check_training_data",
    "default_elbo",
    "default_optim",
    "elbo_terms",
    "fit",
    "linear_warm_start",
    "minibatch_indices",
    "why_not_enumerable",
    "why_no_linear_warm_start",
]
