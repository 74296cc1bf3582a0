"""Collection from real gymnasium environments, and the Episodes dataset."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from pyro_worldmodel import ActionSpace
from pyro_worldmodel.data import Episodes, collect


def replay(env_id, episode_obs, episode_actions, seed):
    """Step a fresh env from the same seed with the recorded actions."""
    env = gym.make(env_id)
    obs, _ = env.reset(seed=seed)
    seen, rewards = [obs], []
    for a in episode_actions:
        obs, r, terminated, truncated, _ = env.step(a)
        seen.append(obs)
        rewards.append(r)
    return np.stack(seen), np.array(rewards), terminated, truncated


def test_cartpole_episodes_replay_exactly_in_a_fresh_env():
    eps = collect("CartPole-v1", 1, seed=7, progress=False)
    L = int(eps.lengths[0])
    actions = eps.actions[0, :L].numpy()
    seen, rewards, terminated, truncated = replay("CartPole-v1", None, actions, seed=7)
    np.testing.assert_array_equal(eps.obs[0, :L].numpy(), seen[:-1])
    np.testing.assert_array_equal(eps.final_obs[0].numpy(), seen[-1])
    np.testing.assert_array_equal(eps.rewards[0, :L].numpy(), rewards.astype(np.float32))
    assert bool(eps.terminated[0]) == terminated and bool(eps.truncated[0]) == truncated
    assert eps.action_space == ActionSpace.discrete(2)
    assert eps.actions.dtype == torch.int64


def test_vector_collection_keeps_each_transition_aligned():
    """CartPole's observation is its full state, so each recorded (x_t, a_t)
    stepped from that state must give x_{t+1} (or the final observation)."""
    eps = collect("CartPole-v1", 6, seed=1, num_envs=3, progress=False)
    assert len(eps) == 6
    env = gym.make("CartPole-v1").unwrapped
    env.reset(seed=0)
    for n in range(6):
        L = int(eps.lengths[n])
        nxt = torch.cat([eps.obs[n, 1:L], eps.final_obs[n : n + 1]])
        for t in range(L):
            env.state = eps.obs[n, t].double().numpy()
            env.steps_beyond_terminated = None
            obs, *_ = env.step(int(eps.actions[n, t]))
            np.testing.assert_allclose(obs, nxt[t].numpy(), rtol=1e-5, atol=1e-6)
        assert eps.terminated[n] or eps.truncated[n]
    assert torch.equal(eps.mask, torch.arange(eps.mask.shape[1]) < eps.lengths[:, None])


def test_collection_is_seeded():
    a = collect("Pendulum-v1", 2, seed=3, max_episode_steps=20, progress=False)
    b = collect("Pendulum-v1", 2, seed=3, max_episode_steps=20, progress=False)
    c = collect("Pendulum-v1", 2, seed=4, max_episode_steps=20, progress=False)
    assert torch.equal(a.obs, b.obs) and torch.equal(a.actions, b.actions)
    assert not torch.equal(a.obs, c.obs)
    assert a.obs.shape == (2, 20, 3) and a.actions.shape == (2, 20, 1)
    assert a.truncated.all() and not a.terminated.any()
    assert a.action_space == ActionSpace.box(1, -2.0, 2.0)


def test_a_given_policy_is_used():
    eps = collect(
        "Pendulum-v1",
        2,
        policy=lambda obs: np.full((len(obs), 1), 0.5, np.float32),
        max_episode_steps=10,
        progress=False,
    )
    assert torch.equal(eps.actions, torch.full((2, 10, 1), 0.5))


def test_save_and_load_round_trip(tmp_path):
    eps = collect("CartPole-v1", 4, seed=0, progress=False).fit_normalizer()
    path = eps.save(tmp_path / "cartpole.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["cartpole.npz"]
    back = Episodes.load(path)
    for name in ("obs", "actions", "rewards", "mask", "terminated", "truncated", "final_obs"):
        assert torch.equal(getattr(back, name), getattr(eps, name)), name
    assert back.action_space == eps.action_space and back.env_id == "CartPole-v1"
    assert torch.equal(back.normalizer.obs_loc, eps.normalizer.obs_loc)
    assert back.normalizer.action_loc is None


def test_loading_refuses_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match=r"path: expected a pyro_worldmodel.episodes/1 file"):
        Episodes.load(tmp_path / "other.npz")
    np.savez(tmp_path / "pickled.npz", format=np.array(["x", None], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        Episodes.load(tmp_path / "pickled.npz")


def test_split_is_by_whole_episodes():
    eps = collect("CartPole-v1", 10, seed=2, progress=False)
    train, val = eps.split(0.3, seed=0)
    assert len(train) == 7 and len(val) == 3
    rows = {tuple(e.obs[0, 0].tolist()) for e in (train, val) for e in [e[i] for i in range(len(e))]}
    assert len(rows) == 10  # every episode once, none split
    assert torch.equal(train.lengths.sum() + val.lengths.sum(), eps.lengths.sum())
    with pytest.raises(ValueError, match=r"val_fraction: expected a number in \(0, 1\), got 1.5"):
        eps.split(1.5)


def test_normalizer_maps_observed_steps_to_unit_scale_and_back():
    eps = collect("Pendulum-v1", 3, max_episode_steps=30, progress=False).fit_normalizer()
    obs, actions, mask = eps.normalized()
    torch.testing.assert_close(obs[mask].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(obs[mask].std(0), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(eps.normalizer.obs_inverse(obs), eps.obs, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps.normalizer.actions_inverse(actions), eps.actions, atol=1e-5, rtol=0)


def test_windows_are_slices_of_episodes_masked_past_their_end():
    eps = collect("CartPole-v1", 5, seed=4, progress=False)
    g = torch.Generator().manual_seed(0)
    obs, actions, mask = eps.windows(30, 50, generator=g)
    assert obs.shape == (50, 30, 4) and actions.shape == (50, 30) and mask.shape == (50, 30)
    assert mask[:, 0].all()
    for w in range(50):
        n = int(mask[w].sum())
        hits = [
            (e, s)
            for e in range(5)
            for s in range(int(eps.lengths[e]))
            if torch.equal(eps.obs[e, s], obs[w, 0])
        ]
        e, s = hits[0]
        assert n == min(30, int(eps.lengths[e]) - s)
        assert torch.equal(obs[w, :n], eps.obs[e, s : s + n])
        assert torch.equal(actions[w, :n], eps.actions[e, s : s + n])
        assert (obs[w, n:] == 0).all()


def test_bad_collection_arguments():
    with pytest.raises(ValueError, match=r"env_id: expected a registered gymnasium id, got 'NoSuchEnv-v0'"):
        collect("NoSuchEnv-v0", 1, progress=False)
    with pytest.raises(
        ValueError, match=r"env_id: expected a rank-1 Box observation space, got Discrete\(16\)"
    ):
        collect("FrozenLake-v1", 1, progress=False)
    with pytest.raises(ValueError, match=r"num_episodes: expected a positive int, got 0"):
        collect("CartPole-v1", 0, progress=False)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_collected_episodes_train_the_default_model(env_id):
    from pyro_worldmodel import FilterGuide, WorldModel, elbo_terms, fit

    eps = collect(env_id, 6, seed=0, max_episode_steps=40, progress=False).fit_normalizer()
    model = WorldModel.default(eps.obs_dim, eps.action_space, latent_dim=4, hidden=(16,))
    guide = FilterGuide.for_model(model, rnn_dim=16, hidden=(16,))
    before = elbo_terms(model, guide, *eps.normalized(), num_particles=8).elbo
    history = fit(
        model, guide, *eps.normalized(), num_steps=60, batch_size=6, lr=1e-2, seed=0, progress=False
    )
    after = elbo_terms(model, guide, *eps.normalized(), num_particles=8).elbo
    assert len(history.loss) == 60
    assert after > before + 0.5, (before, after)
