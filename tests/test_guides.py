"""What each guide conditions on, checked by perturbing its inputs."""

import pyro
import pytest
import torch

from pyro_worldmodel import ActionSpace, WorldModel
from pyro_worldmodel.model.guides import FilterGuide, MeanFieldGuide, SmoothingGuide, reverse_within


def test_reverse_within_mirrors_each_episode_and_leaves_padding():
    mask = torch.tensor([[True] * 4, [True, True, True, False], [True, False, False, False]])
    assert reverse_within(mask).tolist() == [[3, 2, 1, 0], [2, 1, 0, 3], [0, 1, 2, 3]]


def guide_means(guide, obs, actions, mask):
    """q(z_t | ·)'s mean at every t, with z_{t-1} fixed at zero so only the data matters: the
    steps of each guide's Pyro program (step_params on its context), for every t at once."""
    context = guide.context(obs, guide.action_space.features(actions, obs.dtype), mask)  # (B, T, C)
    z_prev = torch.zeros(*context.shape[:-1], guide.latent_dim)
    return guide.step_params(z_prev, context, guide.step_weights())[0]


@pytest.mark.parametrize(
    "cls, sees_past, sees_future",
    [(FilterGuide, True, False), (SmoothingGuide, False, True), (MeanFieldGuide, False, False)],
)
def test_each_guide_sees_what_it_claims(cls, sees_past, sees_future):
    """Beyond z_{t-1}: the filter reads x_{≤t}, the smoother x_{≥t}, mean field x_t alone."""
    torch.manual_seed(0)
    guide = cls(3, ActionSpace.box(1), latent_dim=2)
    obs, actions = torch.randn(1, 6, 3), torch.randn(1, 6, 1)
    mask = torch.tensor([[True] * 5 + [False]])
    base = guide_means(guide, obs, actions, mask)
    t = 2
    for where, expect in ((t - 1, sees_past), (t + 1, sees_future), (t, True)):
        moved = obs.clone()
        moved[0, where] += 1.0
        changed = not torch.allclose(guide_means(guide, moved, actions, mask)[0, t], base[0, t])
        assert changed == expect, (cls.__name__, where)
    # Padding after the episode never reaches an observed step.
    junk = obs.clone()
    junk[0, 5] = 1e6
    torch.testing.assert_close(guide_means(guide, junk, actions, mask)[0, :5], base[0, :5])


@pytest.mark.parametrize("cls", [SmoothingGuide, MeanFieldGuide])
def test_guides_sample_every_latent_site_with_the_models_shapes(cls):
    model = WorldModel.default(3, ActionSpace.discrete(2), latent_dim=2, hidden=(8,))
    guide = cls.for_model(model)
    obs, actions = torch.randn(4, 5, 3), torch.randint(2, (4, 5))
    trace = pyro.poutine.trace(guide).get_trace(obs, actions)
    sites = {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and n.startswith("z_")}
    assert list(sites) == [f"z_{t}" for t in range(5)]
    assert all(s["value"].shape == (4, 1, 2) for s in sites.values())
