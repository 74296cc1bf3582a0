"""Components: small modules, each returning the distribution of one factor."""

from .categorical import (
    CategoricalCombiner,
    CategoricalInit,
    CategoricalMLPTransition,
    CategoricalRSSMTransition,
    GroupedOneHot,
)
from .combiner import Combiner
from .emission import BernoulliEmission, GaussianMLPEmission, LinearGaussianEmission, StudentTEmission
from .encoder import IdentityEncoder
from .heads import BernoulliContinue, GaussianReward
from .images import ConvEncoder, ConvGaussianEmission, ConvLogisticEmission, DiscretizedLogistic
from .init import LearnedGaussianInit, StandardNormalInit
from .policy import CategoricalPolicy, LinearGaussianPolicy, NormalPolicy, TanhNormalPolicy, auto_policy
from .transition import (
    BayesianMLPTransition,
    EnsembleTransition,
    GatedTransition,
    GaussianMLPTransition,
    LinearGaussianTransition,
    RSSMTransition,
    StudentTMLPTransition,
)

__all__ = [
    "CategoricalCombiner",
    "CategoricalInit",
    "CategoricalMLPTransition",
    "CategoricalRSSMTransition",
    "GroupedOneHot",
    "IdentityEncoder",
    "ConvEncoder",
    "ConvGaussianEmission",
    "ConvLogisticEmission",
    "DiscretizedLogistic",
    "BernoulliContinue",
    "BernoulliEmission",
    "GaussianReward",
    "StudentTEmission",
    "CategoricalPolicy",
    "Combiner",
    "GaussianMLPEmission",
    "GatedTransition",
    "BayesianMLPTransition",
    "EnsembleTransition",
    "GaussianMLPTransition",
    "LearnedGaussianInit",
    "LinearGaussianEmission",
    "LinearGaussianPolicy",
    "LinearGaussianTransition",
    "NormalPolicy",
    "RSSMTransition",
    "StandardNormalInit",
    "TanhNormalPolicy",
    "StudentTMLPTransition",
    "auto_policy",
]
