"""The generative world model, its factors and its guides, as Pyro programs.

:mod:`.components` holds one factor a module (init, transition, emission,
policy, heads, the guide's combiner); :class:`WorldModel` composes them into
the Pyro model, and :mod:`.guides` holds the guides over its ``z_t`` sites.
:mod:`.baselines` holds the simple predictors they are measured against.
"""

from .baselines import CopyLast, LinearLeastSquares, OpenLoopBaseline
from .guides import FilterGuide, IAFFilterGuide, MeanFieldGuide, SmoothingGuide
from .world_model import WorldModel

__all__ = [
    "CopyLast",
    "FilterGuide",
    "IAFFilterGuide",
    "LinearLeastSquares",
    "MeanFieldGuide",
    "OpenLoopBaseline",
    "SmoothingGuide",
    "WorldModel",
]
