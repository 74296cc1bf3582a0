"""The linear warm start puts the default model at the least-squares system."""

import pyro
import pytest
import torch

from pyro_worldmodel import ActionSpace, FilterGuide, LinearGaussianSSM, WorldModel, imagine
from pyro_worldmodel.infer import linear_warm_start
from pyro_worldmodel.model.components import Combiner, GaussianMLPEmission, GaussianMLPTransition


def test_init_linear_sets_each_component_to_the_given_gaussian():
    torch.manual_seed(0)
    Z, A, X = 3, 2, 4
    W, b, s = torch.randn(Z, Z + A), torch.randn(Z), torch.tensor([2e-3, 0.1, 2.0])
    z, a = torch.randn(5, Z), torch.randn(5, A)
    trans = GaussianMLPTransition(Z, A, (8,))
    trans.init_linear(W, b, s)
    p = trans(z, a)
    torch.testing.assert_close(p.mean, torch.cat([z, a], -1) @ W.T + b)
    torch.testing.assert_close(p.base_dist.scale, s.expand(5, Z))
    em = GaussianMLPEmission(Z, X, (8,))
    H, c, r = torch.randn(X, Z), torch.randn(X), torch.full((X,), 0.03)
    em.init_linear(H, c, r)
    torch.testing.assert_close(em(z).mean, z @ H.T + c)
    torch.testing.assert_close(em(z).base_dist.scale, r.expand(5, X))
    comb = Combiner(Z, 6, (8,))
    Wc, h = torch.randn(Z, Z + 6), torch.randn(5, 6)
    comb.init_linear(Wc, b, s)
    torch.testing.assert_close(comb(z, h).mean, torch.cat([z, h], -1) @ Wc.T + b)
    torch.testing.assert_close(comb(z, h).base_dist.scale, s.expand(5, Z))


def linear_data(N=40, T=25, seed=0):
    """x_{t+1} = F x_t + G a_t + c exactly, with random actions."""
    g = torch.Generator().manual_seed(seed)
    F = torch.tensor([[0.9, 0.2, 0.0], [-0.2, 0.9, 0.1], [0.0, 0.0, 0.8]])
    G = torch.tensor([[0.5], [0.0], [1.0]])
    c = torch.tensor([0.1, -0.2, 0.05])
    x = torch.randn(N, 3, generator=g)
    obs, actions = [], []
    for _ in range(T):
        a = torch.randn(N, 1, generator=g)
        obs.append(x)
        actions.append(a)
        x = x @ F.T + a @ G.T + c
    return torch.stack(obs, 1), torch.stack(actions, 1), (F, G, c)


def test_warm_started_model_imagines_the_least_squares_rollout():
    obs, actions, (F, G, c) = linear_data()
    model = WorldModel.default(3, ActionSpace.box(1), latent_dim=5, hidden=(16,))
    guide = FilterGuide.for_model(model, rnn_dim=8)
    ls = linear_warm_start(model, guide, obs, actions)
    torch.testing.assert_close(ls.W[:, :3].float(), F, atol=1e-4, rtol=0)
    # The filter reads z_t = x_t, the emission reads x_t back: the imagined mean
    # is the linear rollout of the true system, up to the 1e-3 noise floors
    # averaged over 200 samples (the data are of order 1).
    C, H = 5, 10
    pyro.set_rng_seed(0)
    im = imagine(
        model, guide, obs[:, :C], actions[:, :C], H, future_actions=actions[:, C : C + H], num_samples=200
    )
    torch.testing.assert_close(im.obs_mean.mean(0), obs[:, C : C + H], atol=5e-3, rtol=0)
    torch.testing.assert_close(im.latents[..., :3].mean(0), obs[:, C : C + H], atol=5e-3, rtol=0)


def test_warm_start_refuses_what_it_cannot_set():
    model = WorldModel.default(3, ActionSpace.box(1), latent_dim=2, hidden=(8,))
    guide = FilterGuide.for_model(model, rnn_dim=8)
    obs, actions, _ = linear_data(N=4, T=5)
    with pytest.raises(ValueError, match=r"model: expected latent_dim >= obs_dim = 3.*got 2"):
        linear_warm_start(model, guide, obs, actions)
    lg = LinearGaussianSSM.random(latent_dim=3, obs_dim=3, action_dim=1).world_model().float()
    with pytest.raises(ValueError, match="model.transition: expected a component with init_linear"):
        linear_warm_start(lg, FilterGuide.for_model(lg, rnn_dim=8), obs, actions)


def test_a_fixed_emission_scale_is_left_as_it_is_by_the_warm_start():
    from pyro_worldmodel import ActionSpace, FilterGuide, WorldModel
    from pyro_worldmodel.infer import linear_warm_start
    from pyro_worldmodel.model.components import (
        GaussianMLPEmission,
        GaussianMLPTransition,
        NormalPolicy,
        StandardNormalInit,
    )

    model = WorldModel(
        StandardNormalInit(3),
        GaussianMLPTransition(3, 1, hidden=(4,)),
        GaussianMLPEmission(3, 2, hidden=(4,), scale=0.1),
        NormalPolicy(3, ActionSpace.box(1), hidden=(4,)),
    )
    guide = FilterGuide.for_model(model, rnn_dim=4)
    obs = torch.cumsum(torch.randn(8, 10, 2), 1)
    linear_warm_start(model, guide, obs, torch.randn(8, 10, 1))
    torch.testing.assert_close(model.emission.log_scale.exp(), torch.full((2,), 0.1))
    torch.testing.assert_close(model.emission.linear.weight, torch.eye(2, 3))  # the read-out was set
