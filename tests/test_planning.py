"""Reward and continue heads, planners in latent space, and the model-based loop."""

import json
from dataclasses import replace

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_worldmodel import ActionSpace, WorldModel, fit
from pyro_worldmodel.act import (
    ActorCriticPlanner,
    Agent,
    CEMPlanner,
    LatentState,
    PolicyPlanner,
    belief,
    imagined_returns,
    lambda_returns,
)
from pyro_worldmodel.cli import main
from pyro_worldmodel.config import Spec, build, spec_of
from pyro_worldmodel.data import collect, observation_scale_floor
from pyro_worldmodel.infer.elbos import TraceMeanField_ELBO
from pyro_worldmodel.loop import DEFAULT_LOOP_SPEC, model_based_loop
from pyro_worldmodel.model.components import (
    GaussianMLPEmission,
    LinearGaussianTransition,
    NormalPolicy,
    StandardNormalInit,
)

# ------------------------------------------------------------------ a hand-written linear-quadratic system

A_ = torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)  # a double integrator, dt = 0.1
B_ = torch.tensor([[0.005], [0.1]], dtype=torch.float64)
Q_ = torch.diag(torch.tensor([1.0, 0.1], dtype=torch.float64))
R_ = torch.tensor([[0.01]], dtype=torch.float64)


class QuadraticReward(nn.Module):
    """r(z, a) = −(zᵀ Q z + aᵀ R a), as a Normal head with a fixed unit scale."""

    def __init__(self, action_space):
        super().__init__()
        self.latent_dim, self.action_space = 2, action_space
        self.register_buffer("Q", Q_.clone())
        self.register_buffer("R", R_.clone())

    def forward(self, z, a):
        loc = -((z @ self.Q) * z).sum(-1) - ((a @ self.R) * a).sum(-1)
        return dist.Normal(loc, torch.ones_like(loc))


def linear_quadratic_model(space):
    transition = LinearGaussianTransition(2, 1)
    with torch.no_grad():
        transition.F.copy_(A_)
        transition.G.copy_(B_)
        transition.log_scale.fill_(-20.0)  # deterministic for planning purposes
    model = WorldModel(
        StandardNormalInit(2),
        transition,
        GaussianMLPEmission(2, 2, hidden=(4,)),
        NormalPolicy(2, space, hidden=(4,)),
        reward=QuadraticReward(space),
    ).double()
    return model


def lqr_first_action(z0, H):
    """Finite-horizon LQR: maximise Σ_{k<H} r(z_k, a_k) with z_{k+1} = A z_k + B a_k; the optimal a_0."""
    P = torch.zeros(2, 2, dtype=torch.float64)
    K = None
    for _ in range(H):
        K = torch.linalg.solve(R_ + B_.T @ P @ B_, B_.T @ P @ A_)
        P = Q_ + A_.T @ P @ A_ - A_.T @ P @ B_ @ K
    return -(K @ z0)


def test_cem_first_action_is_the_lqr_optimum():
    pyro.set_rng_seed(0)
    space = ActionSpace.box(1)
    model = linear_quadratic_model(space)
    H = 10
    z0 = torch.tensor([[1.0, -0.5], [-0.3, 0.8], [0.5, 0.5]], dtype=torch.float64)  # three states at once
    planner = CEMPlanner(
        horizon=H, candidates=2000, top_k=100, iterations=10, discount=1.0, init_std=5.0, min_std=1e-3
    )
    planned = planner.plan(model, LatentState(z0))  # (3, 1)
    optimal = torch.stack([lqr_first_action(z, H) for z in z0])  # (3, 1)
    assert planned.shape == optimal.shape
    # The optimal actions are of size 2–10; CEM lands within 0.1 of each.
    assert optimal.abs().min() > 1.0
    torch.testing.assert_close(planned, optimal, atol=0.1, rtol=0.0)


def test_planners_respect_the_box_even_when_reward_pushes_outside():
    space = ActionSpace.box(1, -0.5, 0.25)

    class Greedy(nn.Module):  # reward grows without bound in a
        latent_dim, action_space = 2, space

        def forward(self, z, a):
            loc = 100 * a.sum(-1) + 0 * z.sum(-1)
            return dist.Normal(loc, torch.ones_like(loc))

    model = linear_quadratic_model(space)
    model.reward = Greedy().double()
    z0 = torch.randn(4, 2, dtype=torch.float64)
    actor_critic = ActorCriticPlanner(2, space, horizon=3, updates=20, batch_size=8, lr=1e-2).double()
    actor_critic.update(model, LatentState(torch.randn(64, 2, dtype=torch.float64)))
    with torch.no_grad():
        model.policy.linear.bias.fill_(100.0)  # the learned π's mean far outside the box
    planners = (
        CEMPlanner(horizon=5, candidates=100, top_k=10, init_std=10.0),
        CEMPlanner(horizon=5, candidates=100, top_k=1),
        PolicyPlanner(mode=False),
        PolicyPlanner(mode=True),
        actor_critic,
    )
    for planner in planners:
        a = planner.plan(model, LatentState(z0))
        assert a.shape == (4, 1)
        assert ((a >= -0.5) & (a <= 0.25)).all(), a
    # the CEM plan goes to the upper bound, where the reward is highest
    a = CEMPlanner(horizon=5, candidates=200, top_k=20).plan(model, LatentState(z0))
    torch.testing.assert_close(a, torch.full_like(a, 0.25), atol=0.01, rtol=0)


def test_discrete_cem_picks_the_rewarded_action_and_unbounded_boxes_plan():
    space = ActionSpace.discrete(3)

    class PrefersTwo(nn.Module):  # reward 1 for action 2, 0 otherwise
        latent_dim, action_space = 2, space

        def forward(self, z, a_feat):
            loc = a_feat[..., 2] + 0 * z.sum(-1)
            return dist.Normal(loc, torch.ones_like(loc))

    model = WorldModel(
        StandardNormalInit(2),
        LinearGaussianTransition(2, 3),
        GaussianMLPEmission(2, 2, hidden=(4,)),
        build(Spec(latent_dim=2), 2, space).model.policy,
        reward=PrefersTwo(),
    )
    a = CEMPlanner(horizon=4, candidates=50, top_k=5).plan(model, LatentState(torch.randn(6, 2)))
    assert a.dtype == torch.long and (a == 2).all()
    # A box without finite bounds (gymnasium's Box(-inf, inf)) plans finite actions.
    box = ActionSpace.box(1, float("-inf"), float("inf"))
    model = linear_quadratic_model(box)
    for planner in (CEMPlanner(horizon=3, candidates=20, top_k=4), ActorCriticPlanner(2, box).double()):
        assert torch.isfinite(planner.plan(model, LatentState(torch.randn(2, 2, dtype=torch.float64)))).all()


def test_imagined_returns_weigh_rewards_by_the_chance_of_getting_there():
    space = ActionSpace.box(1)
    model = linear_quadratic_model(space)

    class Constant(nn.Module):
        latent_dim, action_space = 2, space

        def forward(self, z, a):
            loc = torch.ones(torch.broadcast_shapes(z.shape[:-1], a.shape[:-1]), dtype=z.dtype)
            return dist.Normal(loc, torch.ones_like(loc))

    class HalfContinue(nn.Module):
        latent_dim = 2

        def forward(self, z):
            return dist.Bernoulli(probs=torch.full(z.shape[:-1], 0.5, dtype=z.dtype))

    model.reward, model.continuation = Constant(), HalfContinue()
    z0 = torch.zeros(1, 2, dtype=torch.float64)
    got = imagined_returns(
        model,
        LatentState(z0),
        torch.zeros(1, 4, 1, dtype=torch.float64),
        discount=0.9,
        reward_scale=2.0,
        reward_loc=-1.0,
    )
    # each real reward is −1 + 2·1 = 1; step k counts with weight (0.9 · 0.5)^k
    expected = sum(0.45**k for k in range(4))
    assert got.item() == pytest.approx(expected)


def test_lambda_returns_reduce_to_monte_carlo_and_to_td():
    g = torch.Generator().manual_seed(0)
    r, c, v = torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g), torch.randn(6, 3, generator=g)
    gamma = 0.9
    # λ = 1: Σ_k γ^k (Π_{j<k} c_j) r_k + γ^H Π c · v_H
    mc = torch.zeros(3)
    w = torch.ones(3)
    for k in range(5):
        mc = mc + w * r[k]
        w = w * gamma * c[k]
    mc = mc + w * v[-1]
    torch.testing.assert_close(lambda_returns(r, c, v, gamma, 1.0)[0], mc)
    # λ = 0: one-step targets
    torch.testing.assert_close(lambda_returns(r, c, v, gamma, 0.0), r + gamma * c * v[1:])
    with pytest.raises(ValueError, match="values: expected H \\+ 1 = 6"):
        lambda_returns(r, c, v[:-1], gamma, 0.5)


def test_actor_critic_improves_its_imagined_return_and_stays_in_the_box():
    pyro.set_rng_seed(0)
    space = ActionSpace.box(1, -10.0, 10.0)
    model = linear_quadratic_model(space).float()
    model.reward.Q, model.reward.R = Q_.float(), R_.float()
    planner = ActorCriticPlanner(2, space, horizon=10, updates=1, batch_size=64, lr=3e-3)
    starts = LatentState(torch.randn(512, 2))
    first = np.mean([planner.update(model, starts)["return"] for _ in range(5)])
    for _ in range(300):
        last = planner.update(model, starts)
    later = np.mean([planner.update(model, starts)["return"] for _ in range(5)])
    assert later > first + 1.0, (first, later)
    # The model is left as it was: trainable, and without gradients from the actor or critic.
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert np.isfinite(last["critic_loss"])


# ------------------------------------------------------------------ heads in the model and the ELBO


def _small_world():
    space = ActionSpace.box(1, -2.0, 2.0)
    spec = Spec(
        latent_dim=3,
        transition={"name": "gaussian_mlp", "hidden": [8]},
        emission={"name": "gaussian_mlp", "hidden": [8]},
        guide={"name": "filter", "rnn_dim": 8, "hidden": [8]},
        reward={"name": "gaussian", "hidden": [8]},
        continuation={"name": "bernoulli", "hidden": [8]},
        planner={"name": "cem", "horizon": 4, "candidates": 20, "top_k": 5},
    )
    return build(spec, 2, space)


def test_reward_and_continue_sites_are_scored_in_the_model_and_the_elbo():
    pyro.set_rng_seed(0)
    built = _small_world()
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
    model = _small_world().model
    with pytest.raises(ValueError, match=r"rewards: expected shape \(2, 3\) like the mask, got \(2, 4\)"):
        model.model(obs, torch.rand(2, 3, 1), rewards=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="continues: expected 0 or 1, got 0.5 at episode 1, step 2"):
        c = torch.ones(2, 3)
        c[1, 2] = 0.5
        model.model(obs, torch.rand(2, 3, 1), continues=c)


def test_planners_refuse_a_model_without_a_reward_head():
    built = build(Spec(latent_dim=2, planner={"name": "cem"}), 2, ActionSpace.box(1, -1.0, 1.0))
    state = LatentState(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="the 'cem' planner needs a reward head"):
        built.planner.plan(built.model, state)
    ac = ActorCriticPlanner(2, ActionSpace.box(1, -1.0, 1.0))
    with pytest.raises(ValueError, match="the 'actor_critic' planner needs a reward head"):
        ac.update(built.model, state)
    with pytest.raises(ValueError, match="spec: the loop plans with the model's reward head"):
        model_based_loop("Pendulum-v1", Spec(latent_dim=2), iterations=1, progress=False)


def test_spec_with_heads_and_planner_round_trips():
    built = _small_world()
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


# ------------------------------------------------------------------ on real environments


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
    built = build(DEFAULT_LOOP_SPEC, data.obs_dim, normalizer.action_space(data.action_space))
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


def test_agent_actions_stay_in_the_environment_box():
    pyro.set_rng_seed(0)
    data = collect("Pendulum-v1", 2, seed=0, max_episode_steps=30, progress=False).fit_normalizer()
    space = data.normalizer.action_space(data.action_space)
    spec = DEFAULT_LOOP_SPEC.with_overrides(
        {"planner.init_std": 50.0, "planner.candidates": 30, "planner.top_k": 3}
    )
    built = build(spec, data.obs_dim, space)
    from pyro_worldmodel.data import play

    for planner in (
        built.planner,
        PolicyPlanner(mode=False),
        ActorCriticPlanner(built.model.latent_dim, space),
    ):
        agent = Agent(built.model, built.guide, planner, data.normalizer, data.action_space, explore=5.0)
        eps = play("Pendulum-v1", agent, 2, num_envs=2, max_episode_steps=15, progress=False)
        a = eps.actions[eps.mask]
        assert ((a >= -2.0) & (a <= 2.0)).all()
        assert a.abs().max() == pytest.approx(2.0)  # the noise is large enough to reach the bounds


@pytest.mark.parametrize(
    "env,planner", [("Pendulum-v1", "cem"), ("CartPole-v1", "actor_critic"), ("CartPole-v1", "policy")]
)
def test_the_loop_runs_end_to_end_at_tiny_sizes(tmp_path, env, planner, capsys):
    out = tmp_path / "loop"
    code = main(["loop", "--env", env, "--planner", planner, "--smoke", "--out", str(out), "--seed", "3"])
    assert code == 0
    result = json.loads((out / "loop.json").read_text())
    assert result["planner"] == planner and result["env_id"] == env
    rows = result["iterations"]
    assert len(rows) == 2
    assert rows[0]["env_steps"] < rows[1]["env_steps"]
    assert all(r["eval_return"] is not None for r in rows)
    assert (out / "loop.png").stat().st_size > 0 and (out / "model.ckpt").exists()
    from pyro_worldmodel.data import Episodes

    episodes = Episodes.load(out / "episodes.npz")
    assert int(episodes.lengths.sum()) == rows[-1]["env_steps"]
    assert "best evaluation return" in capsys.readouterr().out


def test_loop_command_errors_name_the_problem(tmp_path, capsys):
    code = main(["loop", "--planner", "mpc", "--smoke", "--out", str(tmp_path)])
    assert code == 2
    assert "planner.name: unknown 'mpc'" in capsys.readouterr().err
    code = main(["loop", "--set", "reward=null", "--smoke", "--out", str(tmp_path)])
    assert code == 2
    assert "the loop plans with the model's reward head" in capsys.readouterr().err


def test_recurrent_models_plan_from_the_filtered_deterministic_state():
    pyro.set_rng_seed(0)
    spec = Spec(
        latent_dim=3,
        transition={"name": "rssm", "deter_dim": 5, "hidden": [8]},
        emission={"name": "gaussian_mlp", "hidden": [8]},
        guide={"name": "filter", "rnn_dim": 8, "hidden": [8]},
        reward={"name": "gaussian", "hidden": [8]},
        continuation={"name": "bernoulli", "hidden": [8]},
    )
    space = ActionSpace.box(1, -1.0, 1.0)
    model, guide = (lambda b: (b.model, b.guide))(build(spec, 2, space))
    obs, actions = torch.randn(2, 4, 2), torch.rand(2, 4, 1) * 2 - 1
    pyro.set_rng_seed(1)
    state = belief(model, guide, obs, actions)
    # h_4 is the model's recurrence over the guide's z_1 … z_3 and a_1 … a_3: replay the model on the same draws.
    pyro.set_rng_seed(1)
    guide_tr = poutine.trace(guide).get_trace(obs, actions)
    h = model.transition.initial_deter((2,), obs)
    for t in range(3):
        _, h = model.transition(guide_tr.nodes[f"z_{t}"]["value"].squeeze(-2), actions[:, t], h)
    torch.testing.assert_close(state.h, h)
    torch.testing.assert_close(state.z, guide_tr.nodes["z_3"]["value"].squeeze(-2))
    a = CEMPlanner(horizon=3, candidates=20, top_k=4).plan(model, state)
    assert a.shape == (2, 1) and ((a >= -1) & (a <= 1)).all()
    ac = ActorCriticPlanner(model.latent_dim + model.deter_dim, space, horizon=3, updates=2, batch_size=4)
    ac.update(model, state)
    assert ac.plan(model, state).shape == (2, 1)


def test_acting_needs_a_guide_that_does_not_read_the_future():
    built = build(
        Spec(latent_dim=2, guide={"name": "smoothing"}, reward={"name": "gaussian"}), 2, ActionSpace.box(1)
    )
    with pytest.raises(ValueError, match="guide: SmoothingGuide reads a_t and the future"):
        belief(built.model, built.guide, torch.zeros(1, 3, 2), torch.zeros(1, 3, 1))


def test_the_agent_keeps_its_own_copy_of_each_observation():
    built = _small_world()
    agent = Agent(built.model, built.guide, PolicyPlanner(), None, ActionSpace.box(1, -2.0, 2.0))
    obs = np.zeros((1, 2), np.float32)
    agent.reset(obs)
    for value in (1.0, 2.0, 3.0):
        obs[:] = value  # a caller that reuses its array, as play() does
        agent.act(obs)
    assert [float(o[0, 0]) for o in agent._obs] == [1.0, 2.0, 3.0]


def test_targets_reach_the_jit_elbo_as_graph_inputs():
    from pyro_worldmodel.infer.elbos import JitTraceMeanField_ELBO

    built = _small_world()
    obs, actions, mask = torch.randn(4, 5, 2), torch.rand(4, 5, 1) * 4 - 2, torch.ones(4, 5, dtype=torch.bool)
    rewards, continues = torch.randn(4, 5), torch.ones(4, 5)
    jit, eager = JitTraceMeanField_ELBO(max_plate_nesting=2), TraceMeanField_ELBO(max_plate_nesting=2)
    args = (built.model.model, built.guide, obs, actions, mask)
    jit.loss(*args, rewards=rewards, continues=continues)  # compiles
    for r in (rewards, rewards + 3.0):  # a new value is an input, not a constant kept from the first call
        pyro.set_rng_seed(2)
        got = jit.loss(*args, rewards=r, continues=continues)
        pyro.set_rng_seed(2)
        assert got == pytest.approx(eager.loss(*args, rewards=r, continues=continues), rel=1e-5)
    assert jit.compilations == 1
    fit(
        built.model,
        built.guide,
        obs,
        actions,
        mask,
        rewards=rewards,
        continues=continues,
        num_steps=2,
        elbo=jit,
        progress=False,
    )


def test_the_loop_normaliser_spans_the_observation_space_where_it_is_bounded():
    floor = observation_scale_floor("CartPole-v1")  # x in ±4.8, θ in ±0.419 rad; velocities unbounded
    torch.testing.assert_close(floor, torch.tensor([1.2, 0.0, 0.125 * 2 * 0.41887903, 0.0]))
    data = collect("CartPole-v1", 4, seed=0, progress=False)
    plain, floored = data.fit_normalizer().normalizer, data.fit_normalizer(floor).normalizer
    assert plain.obs_scale[0] < 0.5 and floored.obs_scale[0] == pytest.approx(
        1.2
    )  # random actions barely move the cart
    torch.testing.assert_close(floored.obs_scale[[1, 3]], plain.obs_scale[[1, 3]])
    with pytest.raises(ValueError, match=r"min_obs_scale: expected shape \(4,\), got \(3,\)"):
        data.fit_normalizer(torch.ones(3))


def test_actor_log_density_is_the_change_of_variables_into_the_box():
    pyro.set_rng_seed(0)
    space = ActionSpace.box(2, [-2.0, 0.0], [2.0, 1.0])
    ac = ActorCriticPlanner(3, space)
    f = torch.randn(5, 3)
    a, log_p, _ = ac._sample(f)
    pi = ac.policy(f)
    squashed = dist.TransformedDistribution(
        pi,
        [
            dist.transforms.TanhTransform(),
            dist.transforms.AffineTransform(torch.tensor([0.0, 0.5]), torch.tensor([2.0, 0.5])),
        ],
    )
    torch.testing.assert_close(log_p, squashed.log_prob(a).sum(-1), atol=1e-4, rtol=1e-4)
    assert ((a >= torch.tensor([-2.0, 0.0])) & (a <= torch.tensor([2.0, 1.0]))).all()


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


def test_played_episodes_record_what_the_environment_showed():
    import gymnasium as gym

    from pyro_worldmodel.data import play

    class Recorder:  # a fixed action; remembers every observation it is shown
        def reset(self, obs):
            self.seen = []

        def act(self, obs):
            self.seen.append(np.array(obs))
            return np.full((len(obs), 1), 0.5, np.float32)

    agent = Recorder()
    eps = play("Pendulum-v1", agent, 2, seed=7, num_envs=2, max_episode_steps=5, progress=False)
    shown = np.stack(agent.seen, 1)  # (2, 5, 3)
    np.testing.assert_array_equal(eps.obs.numpy(), shown)
    for i in range(2):  # the first observation is the reset's, and the steps replay in a fresh env
        env = gym.make("Pendulum-v1", max_episode_steps=5)
        first, _ = env.reset(seed=7 + i)
        np.testing.assert_array_equal(eps.obs[i, 0].numpy(), first)
        for t in range(5):
            obs, r, *_ = env.step(np.array([0.5], np.float32))
            assert eps.rewards[i, t].item() == pytest.approx(r)
        np.testing.assert_array_equal(eps.final_obs[i].numpy(), obs)


def test_cem_terminal_value_looks_past_the_horizon():
    space = ActionSpace.box(1, -1.0, 1.0)
    model = linear_quadratic_model(space)

    class NoReward(nn.Module):
        latent_dim, action_space = 2, space

        def forward(self, z, a):
            loc = 0 * z.sum(-1) + 0 * a.sum(-1)
            return dist.Normal(loc, torch.ones_like(loc))

    model.reward = NoReward()
    z0 = torch.zeros(2, 2, dtype=torch.float64)
    # Rewards are all 0 within the horizon: only a value of the final state can tell plans apart.
    planner = CEMPlanner(
        horizon=2, candidates=200, top_k=20, terminal_value=True, latent_dim=2, action_space=space
    )
    planner.critic.value = lambda f: 100.0 * f[..., 1]  # worth: the final velocity, which a pushes up
    a = planner.plan(model, LatentState(z0))
    torch.testing.assert_close(a, torch.ones_like(a), atol=0.02, rtol=0)
    blind = CEMPlanner(horizon=2, candidates=200, top_k=20).plan(model, LatentState(z0))
    assert blind.abs().max() < 0.9  # without it every plan is worth 0: no pull to the bound
    # It trains in imagination through update(), and needs the sizes build() supplies.
    stats = CEMPlanner(terminal_value=True, latent_dim=2, action_space=space, value_updates=2).update(
        linear_quadratic_model(space).float(), LatentState(torch.randn(16, 2))
    )
    assert np.isfinite(stats["critic_loss"])
    with pytest.raises(ValueError, match="terminal_value: expected latent_dim and action_space"):
        CEMPlanner(terminal_value=True)


def test_the_loop_runs_with_a_reward_head_only(tmp_path):
    spec = DEFAULT_LOOP_SPEC.with_overrides(
        {"continuation": None, "planner.candidates": 20, "planner.top_k": 4, "planner.horizon": 3}
    )
    assert spec.continuation is None
    result = model_based_loop(
        "Pendulum-v1",
        spec,
        iterations=1,
        seed_episodes=2,
        train_steps=3,
        eval_episodes=1,
        window=10,
        progress=False,
        log=None,
    )
    assert result.iterations[0]["env_steps"] == 600 and result.iterations[0]["eval_return"] is not None
