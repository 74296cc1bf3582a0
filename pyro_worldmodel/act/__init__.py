"""Acting from imagination: planners in latent space and an agent that uses them."""

from .agent import Agent, reward_units
from .planners import (
    PLANNERS,
    ActorCriticPlanner,
    CEMPlanner,
    LatentState,
    PolicyPlanner,
    belief,
    box_centre,
    clip_to_space,
    imagined_returns,
    lambda_returns,
    posterior_states,
)

__all__ = [
    "PLANNERS",
    "ActorCriticPlanner",
    "Agent",
    "CEMPlanner",
    "LatentState",
    "PolicyPlanner",
    "belief",
    "box_centre",
    "clip_to_space",
    "imagined_returns",
    "lambda_returns",
    "posterior_states",
    "reward_units",
]
