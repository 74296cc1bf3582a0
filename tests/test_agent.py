"""The agent (act/agent.py): acting in a real environment through play()."""

import numpy as np
import pyro
import pytest
import torch
from worlds_with_heads import small_world

from pyro_worldmodel import ActionSpace, Spec
from pyro_worldmodel.act import ActorCriticPlanner, Agent, PolicyPlanner, belief
from pyro_worldmodel.config import build
from pyro_worldmodel.data import collect


def test_agent_actions_stay_in_the_environment_box():
    pyro.set_rng_seed(0)
    data = collect("Pendulum-v1", 2, seed=0, max_episode_steps=30, progress=False).fit_normalizer()
    space = data.normalizer.action_space(data.action_space)
    spec = Spec.preset("loop").with_overrides(
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


def test_the_agent_keeps_its_own_copy_of_each_observation():
    built = small_world()
    agent = Agent(built.model, built.guide, PolicyPlanner(), None, ActionSpace.box(1, -2.0, 2.0))
    obs = np.zeros((1, 2), np.float32)
    agent.reset(obs)
    taken = []
    for value in (1.0, 2.0, 3.0):
        obs[:] = value  # a caller that reuses its array, as play() does
        pyro.set_rng_seed(5)  # the guide's draw of the present latent
        taken.append(torch.as_tensor(agent.act(obs)))
    # The last action is the policy's at the filter's belief over what the agent was shown,
    # x = 1, 2, 3, with the two actions it took before (the next one is the box's centre, 0).
    actions = torch.stack([*taken[:2], torch.zeros(1, 1)], 1)  # (1, 3, 1)

    def planned(values):
        pyro.set_rng_seed(5)
        shown = torch.tensor(values).repeat_interleave(2).reshape(1, 3, 2)
        return PolicyPlanner().plan(built.model, belief(built.model, built.guide, shown, actions))

    torch.testing.assert_close(taken[-1], planned([1.0, 2.0, 3.0]))
    # An agent that kept the caller's array would have seen x = 3 three times, and acted otherwise.
    assert not torch.allclose(planned([3.0, 3.0, 3.0]), planned([1.0, 2.0, 3.0]), atol=1e-3)


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
