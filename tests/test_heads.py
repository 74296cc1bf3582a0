"""Reward and continue heads (model/components/heads.py): their sites in the model and the
ELBO, their targets, their specs, and what they learn from real episodes."""

from dataclasses import replace

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from worlds_with_heads import small_world

from pyro_worldmodel import ActionSpace, fit
from pyro_worldmodel.cli import main
from pyro_worldmodel.config import Spec, build, spec_of
from pyro_worldmodel.data import collect
from pyro_worldmodel.infer.elbos import TraceMeanField_ELBO


def test_reward_and_continue_sites_are_scored_in_the_model_and_the_elbo():
    pyro.set_rng_seed(0)
    built = small_world()
    model, guide = built.model, built.guide
    obs, actions = torch.randn(3, 6, 2), torch.rand(3, 6, 1) * 4 - 2
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    rewards, continues = torch.randn(3, 6), torch.ones(3, 6)
    continues[0, -1] = 0.0
    kwargs = dict(rewards=rewards, continues=continues)
    guide_tr = poutine.trace(guide).get_trace(obs, actions, mask)
    model_tr = poutine.trace(poutine.replay(model.model, guide_tr)).get_trace(obs, actions, mask, **kwargs)
    model_tr.compute_log_prob()
    z = torch.cat([guide_tr.nodes[f"z_{t}"]["value"] for t in range(6)], -2)  # (3, 6, 3)
    a_feat = actions
    expected_r = (
        dist.Normal(
            model.reward.net(torch.cat([z, a_feat], -1)).squeeze(-1), model.reward(z, a_feat).scale
        ).log_prob(rewards)
        * mask
    ).sum()
    expected_c = (
        dist.Bernoulli(logits=model.continuation.net(z).squeeze(-1)).log_prob(continues) * mask
    ).sum()
    torch.testing.assert_close(model_tr.nodes["r"]["log_prob"].sum(), expected_r)
    torch.testing.assert_close(model_tr.nodes["c"]["log_prob"].sum(), expected_c)
    # The batched path and Pyro's traces give one loss and one gradient, heads included.
    losses, grads = [], []
    for fast in (True, False):
        elbo = TraceMeanField_ELBO(max_plate_nesting=2, batched=fast)
        pyro.set_rng_seed(1)
        loss = elbo.differentiable_loss(model.model, guide, obs, actions, mask, **kwargs)
        params = list(model.reward.parameters()) + list(model.continuation.parameters())
        grads.append(torch.autograd.grad(loss, params))
        losses.append(loss)
        assert elbo.path == ("batched" if fast else "pyro traces: batched=False")
    torch.testing.assert_close(losses[0], losses[1])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2)
    # and the heads' terms are part of it: the loss moves with the rewards
    elbo = TraceMeanField_ELBO(max_plate_nesting=2)
    pyro.set_rng_seed(1)
    other = elbo.differentiable_loss(
        model.model, guide, obs, actions, mask, rewards=rewards + 5, continues=continues
    )
    assert other > losses[0] + 10


def test_targets_without_a_head_and_bad_targets_are_refused():
    built = build(Spec(latent_dim=2), 2, ActionSpace.box(1))
    obs, actions = torch.randn(2, 3, 2), torch.randn(2, 3, 1)
    with pytest.raises(ValueError, match="rewards: this model has no reward head"):
        built.model.model(obs, actions, rewards=torch.zeros(2, 3))
    model = small_world().model
    with pytest.raises(ValueError, match=r"rewards: expected shape \(2, 3\) like the mask, got \(2, 4\)"):
        model.model(obs, torch.rand(2, 3, 1), rewards=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="continues: expected 0 or 1, got 0.5 at episode 1, step 2"):
        c = torch.ones(2, 3)
        c[1, 2] = 0.5
        model.model(obs, torch.rand(2, 3, 1), continues=c)


def test_spec_with_heads_and_planner_round_trips():
    built = small_world()
    spec = spec_of(built.model, built.guide, planner=built.planner)
    assert spec.reward == {"name": "gaussian", "hidden": [8]}
    assert spec.continuation == {"name": "bernoulli", "hidden": [8]}
    assert spec.planner == {"name": "cem", "horizon": 4, "candidates": 20, "top_k": 5}
    again = Spec.from_yaml(spec.to_yaml())
    assert again == spec
    rebuilt = build(again, 2, ActionSpace.box(1, -2.0, 2.0))
    assert rebuilt.model.reward.net[0].weight.shape == built.model.reward.net[0].weight.shape
    # A spec without the optional parts writes none of them.
    assert "reward" not in Spec().to_yaml()
    with pytest.raises(ValueError, match="planner.name: unknown 'cme' \\(did you mean 'cem'\\?\\)"):
        Spec(planner={"name": "cme"}).check()


def test_continues_follow_termination_not_truncation():
    cart = collect("CartPole-v1", 3, seed=0, progress=False)  # random actions: the pole falls
    assert cart.terminated.all()
    c = cart.continues
    for n, L in enumerate(cart.lengths.tolist()):
        assert c[n, L - 1] == 0 and (c[n, : L - 1] == 1).all()
    pend = collect("Pendulum-v1", 2, seed=0, max_episode_steps=20, progress=False)  # time limit only
    assert pend.truncated.all() and (pend.continues == 1).all()


def test_the_reward_head_beats_a_constant_on_held_out_episodes():
    pyro.set_rng_seed(0)
    data = collect("Pendulum-v1", 12, seed=0, max_episode_steps=100, progress=False)
    train, val = data.split(0.25, seed=0)
    normalizer = train.fit_normalizer().normalizer
    built = build(Spec.preset("loop"), data.obs_dim, normalizer.action_space(data.action_space))
    tr = replace(train, normalizer=normalizer).in_model_units()
    va = replace(val, normalizer=normalizer).in_model_units()
    fit(
        built.model,
        built.guide,
        tr.obs,
        tr.actions,
        tr.mask,
        rewards=tr.rewards,
        continues=tr.continues,
        num_steps=300,
        elbo=built.elbo,
        optim=built.optim,
        seed=0,
        progress=False,
    )
    with torch.no_grad():
        z = built.guide(va.obs, va.actions, va.mask)  # the filter's latents on held-out episodes
        predicted = built.model.reward(z, va.actions).mean
    mse = ((predicted - va.rewards)[va.mask] ** 2).mean()
    constant = (
        (tr.rewards[tr.mask].mean() - va.rewards)[va.mask] ** 2
    ).mean()  # the best constant from training
    assert mse < 0.1 * constant, (float(mse), float(constant))


def test_train_fits_the_heads_a_spec_names(tmp_path):
    out = tmp_path / "run"
    argv = [
        "train",
        "--env",
        "CartPole-v1",
        "--episodes",
        "8",
        "--steps",
        "15",
        "--no-evaluate",
        "--out",
        str(out),
    ]
    argv += ["--set", "reward.name=gaussian", "--set", "continuation.name=bernoulli"]
    assert main(argv) == 0
    state = torch.load(out / "model.ckpt", weights_only=True)["model"]
    # The reward's scale starts at exactly 0 and the continue logit's bias at exactly 5;
    # only the rewards and continue flags that train passes can move them.
    assert state["reward.raw_scale"].item() != 0.0
    assert state["continuation.net.4.bias"].item() != 5.0
