"""A small world model and its filter, shared by the ELBO tests."""

from pyro_worldmodel import ActionSpace, FilterGuide, WorldModel
from pyro_worldmodel.model.components import (
    GaussianMLPEmission,
    GaussianMLPTransition,
    NormalPolicy,
    StandardNormalInit,
)

BOX = ActionSpace.box(2)
Z, X = 2, 3


def world(transition_cls=GaussianMLPTransition):
    """Latent 2, observations 3, box actions 2, hidden 8: a model and its FilterGuide."""
    model = WorldModel(
        StandardNormalInit(Z),
        transition_cls(Z, 2, hidden=(8,)),
        GaussianMLPEmission(Z, X, hidden=(8,)),
        NormalPolicy(Z, BOX, hidden=(8,)),
    )
    return model, FilterGuide.for_model(model, rnn_dim=8, hidden=(8,))
