"""A small world model with reward and continue heads, shared by the tests of the heads,
the agent and the Jit ELBO."""

from pyro_worldmodel import ActionSpace
from pyro_worldmodel.config import Spec, build

BOX = ActionSpace.box(1, -2.0, 2.0)


def small_world():
    """Latent 3, observations 2, box actions in [-2, 2], hidden 8: a model with both heads,
    its filter and a CEM planner, as ``build`` gives them."""
    spec = Spec(
        latent_dim=3,
        transition={"name": "gaussian_mlp", "hidden": [8]},
        emission={"name": "gaussian_mlp", "hidden": [8]},
        guide={"name": "filter", "rnn_dim": 8, "hidden": [8]},
        reward={"name": "gaussian", "hidden": [8]},
        continuation={"name": "bernoulli", "hidden": [8]},
        planner={"name": "cem", "horizon": 4, "candidates": 20, "top_k": 5},
    )
    return build(spec, 2, BOX)
