"""Episodes from gymnasium environments: collection, storage, splits and batches.

An episode of length T keeps T observations x_t, the T actions a_t taken after
seeing them, T rewards, the final observation, and gymnasium's ``terminated`` /
``truncated`` flags. Only :mod:`.envs` imports gymnasium.
"""

from .envs import ActionRepeat, Pixels, collect, observation_scale_floor, play
from .episodes import EPISODES_FORMAT, Episodes, Normalizer

__all__ = [
    "EPISODES_FORMAT",
    "ActionRepeat",
    "Episodes",
    "Normalizer",
    "Pixels",
    "collect",
    "observation_scale_floor",
    "play",
]
