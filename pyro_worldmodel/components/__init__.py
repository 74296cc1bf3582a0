"""Components: small modules, each returning the distribution of one factor."""

from .emission import BernoulliEmission, GaussianMLPEmission, LinearGaussianEmission, StudentTEmission
from .encoders import Combiner
from .init import LearnedGaussianInit, StandardNormalInit
from .policy import CategoricalPolicy, LinearGaussianPolicy, NormalPolicy, auto_policy
from .transition import GaussianMLPTransition, LinearGaussianTransition

__all__ = [
    "BernoulliEmission",
    "StudentTEmission",
    "CategoricalPolicy",
    "Combiner",
    "GaussianMLPEmission",
    "GaussianMLPTransition",
    "LearnedGaussianInit",
    "LinearGaussianEmission",
    "LinearGaussianPolicy",
    "LinearGaussianTransition",
    "NormalPolicy",
    "StandardNormalInit",
    "auto_policy",
]
