"""Collection from real gymnasium environments, and the Episodes dataset."""

import gc
import importlib.util
import math
import warnings
import zipfile
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch

from pyro_worldmodel import ActionSpace
from pyro_worldmodel.data import (
    EPISODES_FORMAT,
    Episodes,
    Normalizer,
    collect,
    observation_scale_floor,
    play,
)


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


# ---------------------------------------------------------------- every malformed dataset is refused

PER_EPISODE = ("obs", "actions", "rewards", "mask", "terminated", "truncated", "final_obs")


@pytest.fixture(scope="module")
def cartpole():
    """3 episodes of 14, 24 and 26 steps (T = 26), discrete actions."""
    eps = collect("CartPole-v1", 3, seed=0, progress=False)
    assert eps.lengths.tolist() == [14, 24, 26]
    return eps


@pytest.fixture(scope="module")
def pendulum():
    """2 episodes of 10 steps, box actions, with a fitted normaliser."""
    return collect("Pendulum-v1", 2, seed=0, max_episode_steps=10, progress=False).fit_normalizer()


def rebuilt(eps, **changes):
    """``Episodes(...)`` from the fields of ``eps`` (cloned) with ``changes`` applied to them;
    a change is a value or a function of the field's clone."""
    kwargs = {name: getattr(eps, name).clone() for name in PER_EPISODE}
    kwargs.update(action_space=eps.action_space, env_id=eps.env_id, normalizer=eps.normalizer)
    for name, change in changes.items():
        kwargs[name] = change(kwargs[name]) if callable(change) else change
    return Episodes(**kwargs)


def at(value, *index):
    def put(x):
        x[index] = value
        return x

    return put


BAD_DISCRETE_EPISODES = [
    (
        "obs_complex",
        dict(obs=lambda x: x.to(torch.complex64)),
        r"^obs: expected a real floating dtype \(float16, float32 or float64\), got torch.complex64$",
    ),
    ("obs_int", dict(obs=lambda x: x.long()), r"^obs: expected a real floating dtype .*, got torch.int64$"),
    ("obs_bool", dict(obs=lambda x: x > 0), r"^obs: expected a real floating dtype .*, got torch.bool$"),
    (
        "rewards_int",
        dict(rewards=lambda x: x.int()),
        r"^rewards: expected a real floating dtype .*, got torch.int32$",
    ),
    (
        "final_obs_bfloat16",
        dict(final_obs=lambda x: x.bfloat16()),
        r"^final_obs: expected a real floating dtype .*, got torch.bfloat16$",
    ),
    (
        "actions_float",
        dict(actions=lambda x: x.float()),
        r"^actions: expected an integer dtype \(int8 to int64, or uint8\) for 2 discrete actions, got torch.float32$",
    ),
    (
        "terminated_int",
        dict(terminated=lambda x: x.long()),
        r"^terminated: expected dtype torch.bool, got torch.int64$",
    ),
    (
        "truncated_uint8",
        dict(truncated=lambda x: x.byte()),
        r"^truncated: expected dtype torch.bool, got torch.uint8$",
    ),
    ("mask_float", dict(mask=lambda x: x.float()), r"^mask: expected dtype torch.bool, got torch.float32$"),
    ("obs_numpy", dict(obs=lambda x: x.numpy()), r"^obs: expected a torch.Tensor, got ndarray$"),
    ("action_space", dict(action_space="discrete"), r"^action_space: expected an ActionSpace, got str$"),
    ("mask_1d", dict(mask=lambda x: x[0]), r"^mask: expected shape \(N, T\), got \(26,\)$"),
    (
        "no_episodes",
        {n: (lambda x: x[:0]) for n in PER_EPISODE},
        r"^mask: expected at least one episode, got shape \(0, 26\)$",
    ),
    (
        "obs_2d",
        dict(obs=lambda x: x[..., 0]),
        r"^obs: expected shape \(N, T, X\) with X >= 1, got \(3, 26\)$",
    ),
    (
        "obs_no_dims",
        dict(obs=lambda x: x[..., :0], final_obs=lambda x: x[:, :0]),
        r"^obs: expected shape \(N, T, X\) with X >= 1, got \(3, 26, 0\)$",
    ),
    (
        "rewards_short",
        dict(rewards=lambda x: x[:, :25]),
        r"^rewards: expected shape \(3, 26\), got \(3, 25\)$",
    ),
    (
        "actions_box_shaped",
        dict(actions=lambda x: x[..., None]),
        r"^actions: expected shape \(3, 26\), got \(3, 26, 1\)$",
    ),
    (
        "final_obs_shape",
        dict(final_obs=lambda x: x[:2]),
        r"^final_obs: expected shape \(3, 4\), got \(2, 4\)$",
    ),
    (
        "terminated_shape",
        dict(terminated=lambda x: x[:, None]),
        r"^terminated: expected shape \(3,\), got \(3, 1\)$",
    ),
    (
        "mask_hole",
        dict(mask=at(False, 1, 3)),
        r"^mask: expected each row to be a prefix of True values \(an episode, then padding\), got True after False in 1 episodes \(first at episode 1, step 4\)$",
    ),
    (
        "mask_left_padded",
        dict(mask=lambda m: torch.cat([torch.zeros(3, 1, dtype=torch.bool), m[:, :-1]], 1)),
        r"got True after False in 3 episodes \(first at episode 0, step 1\)$",
    ),
    (
        "empty_episode",
        dict(mask=at(False, 2)),
        r"^mask: expected at least one observed step per episode, got none in episodes \[2\]$",
    ),
    (
        "obs_nan",
        dict(obs=lambda x: at(math.inf, 2, 6, 0)(at(math.nan, 2, 5, 3)(at(math.nan, 0, 20)(x)))),
        r"^obs: expected finite values on observed steps, got 2 steps with NaN or inf \(first at episode 2, step 5\)$",
    ),
    (
        "rewards_inf",
        dict(rewards=at(-math.inf, 1, 23)),
        r"^rewards: expected finite values on observed steps, got 1 steps with NaN or inf \(first at episode 1, step 23\)$",
    ),
    (
        "final_obs_nan",
        dict(final_obs=lambda x: at(math.nan, 2, 1)(at(math.inf, 1, 0)(x))),
        r"^final_obs: expected finite values, got 2 episodes with NaN or inf \(first at episode 1\)$",
    ),
    (
        "action_out_of_range",
        dict(actions=lambda x: at(-1, 2, 0)(at(2, 1, 2)(x))),
        r"^actions: expected integers in \[0, 2\) on observed steps, got 2 steps outside it \(first 2 at episode 1, step 2\)$",
    ),
    (
        "env_id_absolute",
        dict(env_id="/somewhere/else"),
        r"^env_id: expected a gymnasium id such as 'Pendulum-v1' .* got '/somewhere/else'$",
    ),
    ("env_id_parent", dict(env_id="../x"), r"^env_id: expected a gymnasium id .* got '../x'$"),
    ("env_id_not_str", dict(env_id=3), r"^env_id: expected a string such as 'Pendulum-v1', got int$"),
]


@pytest.mark.parametrize(
    "name,changes,message", BAD_DISCRETE_EPISODES, ids=[b[0] for b in BAD_DISCRETE_EPISODES]
)
def test_malformed_discrete_episodes_are_refused_by_name(cartpole, name, changes, message):
    with pytest.raises(ValueError, match=message):
        rebuilt(cartpole, **changes)


def normalizer_with(**changes):
    def change(n):
        return replace(n, **{k: v(getattr(n, k)) if callable(v) else v for k, v in changes.items()})

    return change


BAD_BOX_EPISODES = [
    (
        "actions_int",
        dict(actions=lambda x: x.long()),
        r"^actions: expected a real floating dtype \(float16, float32 or float64\) for a box action space, got torch.int64$",
    ),
    (
        "actions_nan",
        dict(actions=at(math.nan, 1, 4, 0)),
        r"^actions: expected finite values on observed steps, got 1 steps with NaN or inf \(first at episode 1, step 4\)$",
    ),
    (
        "actions_wide",
        dict(actions=lambda x: torch.cat([x, x], -1)),
        r"^actions: expected shape \(2, 10, 1\), got \(2, 10, 2\)$",
    ),
    ("not_a_normalizer", dict(normalizer={"obs_loc": 0}), r"^normalizer: expected a Normalizer, got dict$"),
    (
        "obs_loc_shape",
        dict(normalizer=normalizer_with(obs_loc=torch.zeros(2))),
        r"^normalizer.obs_loc: expected shape \(3,\), got \(2,\)$",
    ),
    (
        "obs_scale_2d",
        dict(normalizer=normalizer_with(obs_scale=torch.ones(1, 3))),
        r"^normalizer.obs_scale: expected shape \(3,\), got \(1, 3\)$",
    ),
    (
        "action_loc_shape",
        dict(normalizer=normalizer_with(action_loc=torch.zeros(2))),
        r"^normalizer.action_loc: expected shape \(1,\), got \(2,\)$",
    ),
    (
        "reward_loc_shape",
        dict(normalizer=normalizer_with(reward_loc=torch.zeros(1))),
        r"^normalizer.reward_loc: expected shape \(\), got \(1,\)$",
    ),
    (
        "obs_scale_zero",
        dict(normalizer=normalizer_with(obs_scale=torch.tensor([1.0, 0.0, -2.0]))),
        r"^normalizer.obs_scale: expected finite values > 0, got 2 that are not \(first 0.0 at index 1\)$",
    ),
    (
        "obs_loc_inf",
        dict(normalizer=normalizer_with(obs_loc=torch.tensor([0.0, 0.0, math.inf]))),
        r"^normalizer.obs_loc: expected finite values, got 1 that are not \(first inf at index 2\)$",
    ),
    (
        "reward_scale_nan",
        dict(normalizer=normalizer_with(reward_scale=torch.tensor(math.nan))),
        r"^normalizer.reward_scale: expected finite values > 0, got nan$",
    ),
    (
        "reward_scale_missing",
        dict(normalizer=normalizer_with(reward_scale=None)),
        r"^normalizer.reward_scale: expected a tensor of shape \(\) as reward_loc is set, got NoneType$",
    ),
    (
        "obs_loc_missing",
        dict(normalizer=normalizer_with(obs_loc=None)),
        r"^normalizer.obs_loc: expected a tensor of shape \(3,\) as obs_scale is set, got NoneType$",
    ),
    (
        "normalizer_int",
        dict(normalizer=normalizer_with(obs_scale=torch.ones(3, dtype=torch.int64))),
        r"^normalizer.obs_scale: expected a real floating dtype .*, got torch.int64$",
    ),
]


@pytest.mark.parametrize("name,changes,message", BAD_BOX_EPISODES, ids=[b[0] for b in BAD_BOX_EPISODES])
def test_malformed_box_episodes_are_refused_by_name(pendulum, name, changes, message):
    with pytest.raises(ValueError, match=message):
        rebuilt(pendulum, **changes)


def test_discrete_episodes_take_no_action_statistics(cartpole, pendulum):
    normalizer = replace(pendulum.normalizer, obs_loc=torch.zeros(4), obs_scale=torch.ones(4))
    with pytest.raises(
        ValueError,
        match=r"^normalizer.action_loc: expected None for 2 discrete actions, got a tensor of shape \(1,\)$",
    ):
        rebuilt(cartpole, normalizer=normalizer)
    ok = rebuilt(cartpole, normalizer=replace(normalizer, action_loc=None, action_scale=None))
    assert ok.normalizer.action_loc is None


def test_every_construction_path_is_checked(cartpole):
    with pytest.raises(ValueError, match=r"^env_id: expected a gymnasium id"):
        replace(cartpole, env_id="../x")
    with pytest.raises(ValueError, match=r"^index: expected at least one of the 3 episodes, got none$"):
        cartpole[[]]
    with pytest.raises(ValueError, match=r"^terminated: expected dtype torch.bool, got torch.int64$"):
        cartpole + replace(cartpole, terminated=cartpole.terminated.long())
    # a slice reports positions in its own indexing: episode 2 of the set is episode 0 here
    sliced = cartpole[[2, 0]]
    with pytest.raises(ValueError, match=r"got 1 steps with NaN or inf \(first at episode 0, step 3\)$"):
        replace(sliced, rewards=at(math.nan, 0, 3)(sliced.rewards.clone()))


def test_discrete_actions_of_any_integer_dtype_become_int64(cartpole):
    for dtype in (torch.uint8, torch.int8, torch.int32):
        eps = rebuilt(cartpole, actions=lambda a, dtype=dtype: a.to(dtype))
        assert eps.actions.dtype == torch.int64 and torch.equal(eps.actions, cartpole.actions)
    with pytest.raises(ValueError, match=r"^actions: expected an integer dtype .* got torch.uint16$"):
        rebuilt(cartpole, actions=lambda a: a.to(torch.uint16))


def test_values_on_padding_are_not_data(cartpole):
    """Episode 0 has 14 steps of 26: junk after them changes nothing that is computed."""
    junk = rebuilt(
        cartpole,
        obs=at(math.nan, 0, 20),
        rewards=at(math.inf, 0, 14),
        actions=at(7, 0, 25),
    )
    assert torch.equal(junk.returns, cartpole.returns)
    assert torch.equal(junk.fit_normalizer().normalizer.obs_loc, cartpole.fit_normalizer().normalizer.obs_loc)
    obs, actions, mask = junk.fit_normalizer().normalized()
    assert torch.isfinite(obs).all() and torch.equal(mask, cartpole.mask)


def test_half_and_double_precision_are_kept_and_round_trip(cartpole, tmp_path):
    eps = rebuilt(
        cartpole, obs=lambda x: x.half(), final_obs=lambda x: x.double(), rewards=lambda x: x.double()
    )
    back = Episodes.load(eps.save(tmp_path / "mixed.npz"))
    for name in PER_EPISODE:
        assert getattr(back, name).dtype == getattr(eps, name).dtype, name
        assert torch.equal(getattr(back, name), getattr(eps, name)), name


def test_normalizer_computes_in_floating_point_for_integer_inputs():
    """Statistics cast to an integer input's dtype truncate: loc 0.5 and scale 0.25
    become 0 and 0, and every observation maps to inf or an all-zero context."""
    norm = Normalizer(
        torch.tensor([0.5, -0.25]),
        torch.tensor([0.5, 0.25]),
        torch.tensor([1.5]),
        torch.tensor([0.5]),
        torch.tensor(0.5),
        torch.tensor(0.25),
    )
    ints = torch.tensor([[1, 1]])
    assert torch.equal(norm.obs(ints), torch.tensor([[1.0, 5.0]]))
    assert torch.equal(norm.obs_inverse(ints), torch.tensor([[1.0, 0.0]]))
    assert torch.equal(norm.actions(torch.tensor([[2]])), torch.tensor([[1.0]]))
    assert torch.equal(norm.actions_inverse(torch.tensor([[2]])), torch.tensor([[2.5]]))
    assert torch.equal(norm.rewards(torch.tensor([1])), torch.tensor([2.0]))
    assert torch.equal(norm.rewards_inverse(torch.tensor([2])), torch.tensor([1.0]))
    # a floating input keeps its own dtype
    assert norm.obs(torch.tensor([[1.0, 1.0]], dtype=torch.float64)).dtype == torch.float64


# ---------------------------------------------------------------- files


def test_collected_datasets_round_trip_through_files(pendulum, cartpole, tmp_path):
    for name, eps in (("pendulum", pendulum), ("cartpole", cartpole.fit_normalizer())):
        back = Episodes.load(eps.save(tmp_path / f"{name}.npz"))
        for field in PER_EPISODE:
            assert torch.equal(getattr(back, field), getattr(eps, field)), (name, field)
            assert getattr(back, field).dtype == getattr(eps, field).dtype, (name, field)
        assert back.action_space == eps.action_space and back.env_id == eps.env_id
        for f in ("obs_loc", "obs_scale", "action_loc", "action_scale", "reward_loc", "reward_scale"):
            a, b = getattr(back.normalizer, f), getattr(eps.normalizer, f)
            assert (a is None and b is None) or torch.equal(a, b), (name, f)
    assert Episodes.load(tmp_path / "pendulum.npz").action_space == ActionSpace.box(1, -2.0, 2.0)


@pytest.fixture
def saved(pendulum, tmp_path):
    """The arrays of a valid file, and a function that writes them with changes
    (a value, or None to drop the key) and loads the result."""
    path = pendulum.save(tmp_path / "valid.npz")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}

    def load(**changes):
        written = dict(arrays)
        for key, value in changes.items():
            if value is None:
                written.pop(key)
            else:
                written[key] = value
        out = tmp_path / "changed.npz"
        np.savez(out, **written)
        return Episodes.load(out)

    return arrays, load


def test_a_bad_value_is_reported_at_its_position_in_the_file(saved, tmp_path):
    arrays, load = saved
    obs = arrays["obs"].copy()
    obs[1, 7, 2] = np.nan
    obs[1, 9, 0] = np.inf
    with pytest.raises(
        ValueError,
        match=rf"^path: {tmp_path / 'changed.npz'}: obs: expected finite values on observed steps, got 2 steps"
        r" with NaN or inf \(first at episode 1, step 7\)$",
    ):
        load(obs=obs)


FILE_CHANGES = [
    (
        "missing_key",
        dict(rewards=None),
        r": expected the keys of a pyro_worldmodel.episodes/1 file, but it lacks \['rewards'\]$",
    ),
    (
        "scalar_obs",
        dict(obs=np.array(1.0, np.float32)),
        r": obs: expected shape \(N, T, X\) with X >= 1, got \(\)$",
    ),
    (
        "obs_rank",
        dict(obs=np.zeros((2, 10), np.float32)),
        r": obs: expected shape \(N, T, X\) with X >= 1, got \(2, 10\)$",
    ),
    (
        "obs_str",
        dict(obs=np.full((2, 10, 3), "a")),
        r": obs: expected an array of numbers, got a \(2, 10, 3\) array of <U1$",
    ),
    (
        "rewards_bytes",
        dict(rewards=np.full((2, 10), b"x")),
        r": rewards: expected an array of numbers, got a \(2, 10\) array of \|S1$",
    ),
    (
        "obs_complex",
        dict(obs=np.zeros((2, 10, 3), np.complex64)),
        r": obs: expected a real floating dtype \(float16, float32 or float64\), got torch.complex64$",
    ),
    (
        "terminated_int",
        dict(terminated=np.zeros(2, np.int64)),
        r": terminated: expected dtype torch.bool, got torch.int64$",
    ),
    (
        "action_kind",
        dict(action_kind=np.array("continuous")),
        r": action_kind: expected 'box' or 'discrete', got 'continuous'$",
    ),
    (
        "action_kind_bytes",
        dict(action_kind=np.array(b"box")),
        r": action_kind: expected 'box' or 'discrete', got \|S3 b'box'$",
    ),
    (
        "action_dim_zero",
        dict(action_dim=np.array(0)),
        r": action_dim: expected a positive int of at most 1048576, got int64 0$",
    ),
    (
        "action_dim_huge",
        dict(action_dim=np.array(2**20 + 1)),
        r": action_dim: expected a positive int of at most 1048576, got int64 1048577$",
    ),
    (
        "action_dim_float",
        dict(action_dim=np.array(1.0)),
        r": action_dim: expected a positive int .* got float64 1.0$",
    ),
    (
        "action_dim_bool",
        dict(action_dim=np.array(True)),
        r": action_dim: expected a positive int .* got bool True$",
    ),
    (
        "action_dim_vector",
        dict(action_dim=np.array([1])),
        r": action_dim: expected a positive int .* got a \(1,\) array of int64$",
    ),
    ("bounds_length", dict(action_low=np.array([-2.0, -2.0])), r": action_low: expected 1 values, got 2$"),
    (
        "low_above_high",
        dict(action_low=np.array([3.0])),
        r": action_low: expected action_low <= action_high in every dimension, got action_low 3.0 > action_high 2.0 in dimension 0$",
    ),
    (
        "nan_bound",
        dict(action_high=np.array([np.nan])),
        r": action_high: expected numbers or ±inf, got NaN in dimension 0$",
    ),
    (
        "bound_rank",
        dict(action_low=np.array(-2.0)),
        r": action_low: expected a vector of 1 real numbers, got float64 -2.0$",
    ),
    (
        "bound_complex",
        dict(action_low=np.array([-2j])),
        r": action_low: expected a vector of 1 real numbers, got a \(1,\) array of complex128$",
    ),
    ("env_id_int", dict(env_id=np.array(3)), r": env_id: expected a string, got int64 3$"),
    (
        "env_id_absolute",
        dict(env_id=np.array("/somewhere/else")),
        r": env_id: expected a gymnasium id .* got '/somewhere/else'$",
    ),
    ("env_id_parent", dict(env_id=np.array("../x")), r": env_id: expected a gymnasium id .* got '../x'$"),
    (
        "normalizer_shape",
        dict(normalizer_obs_loc=np.zeros(2, np.float32)),
        r": normalizer.obs_loc: expected shape \(3,\), got \(2,\)$",
    ),
    (
        "normalizer_half",
        dict(normalizer_obs_scale=None),
        r": normalizer.obs_scale: expected a tensor of shape \(3,\) as obs_loc is set, got NoneType$",
    ),
    (
        "normalizer_zero_scale",
        dict(normalizer_reward_scale=np.array(0.0, np.float32)),
        r": normalizer.reward_scale: expected finite values > 0, got 0.0$",
    ),
]


@pytest.mark.parametrize("name,changes,message", FILE_CHANGES, ids=[c[0] for c in FILE_CHANGES])
def test_malformed_files_are_refused_naming_file_and_key(saved, tmp_path, name, changes, message):
    _, load = saved
    with pytest.raises(ValueError, match="^path: " + str(tmp_path / "changed.npz") + message):
        load(**changes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changed.npz", "valid.npz"]  # nothing written


def test_the_format_key_must_name_this_format(saved, tmp_path):
    _, load = saved
    path = tmp_path / "changed.npz"
    for fmt, got in [
        (None, "no format key"),
        (np.array(1), "format int64 1"),
        (np.array("pyro_worldmodel.episodes/2"), "format 'pyro_worldmodel.episodes/2'"),
        (np.array([EPISODES_FORMAT]), r"format a \(1,\) array of <U26"),
    ]:
        with pytest.raises(
            ValueError, match=rf"^path: expected a pyro_worldmodel.episodes/1 file, got {path} \({got}\)$"
        ):
            load(format=fmt)


def test_unknown_keys_are_ignored_unread(saved, pendulum):
    _, load = saved
    junk = np.array([{"x": 1}, None], dtype=object)  # would need unpickling if it were read
    eps = load(notes=np.array("collected on Tuesday"), junk=junk)
    assert torch.equal(eps.obs, pendulum.obs)


def test_big_endian_and_compressed_files_load(saved, pendulum, tmp_path):
    arrays, load = saved
    eps = load(obs=arrays["obs"].astype(">f4"), mask=np.asfortranarray(arrays["mask"]))
    assert eps.obs.dtype == torch.float32 and torch.equal(eps.obs, pendulum.obs)
    assert torch.equal(eps.mask, pendulum.mask)
    np.savez_compressed(tmp_path / "compressed.npz", **arrays)
    assert torch.equal(Episodes.load(tmp_path / "compressed.npz").actions, pendulum.actions)


def test_unreadable_files_are_value_errors(pendulum, tmp_path):
    valid = pendulum.save(tmp_path / "valid.npz").read_bytes()
    flipped = bytearray(valid)
    flipped[len(valid) // 3] ^= 0xFF
    cases = {
        "text.npz": (b"not a zip file", r"truncated or corrupted \(BadZipFile: File is not a zip file\)"),
        "empty.npz": (b"", r"truncated or corrupted \(BadZipFile"),
        "half.npz": (valid[: len(valid) // 2], r"truncated or corrupted \(BadZipFile"),
        "flipped.npz": (bytes(flipped), r"truncated or corrupted \(\w+: "),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(
            ValueError,
            match=rf"^path: expected a readable pyro_worldmodel.episodes/1 .npz file, but {tmp_path / name} is {message}",
        ):
            Episodes.load(tmp_path / name)


def test_a_forged_header_is_refused_before_anything_is_allocated(saved, tmp_path):
    """The header claims 4 PB of observations; np.load would try to allocate them."""
    arrays, _ = saved
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w") as z:
        for key, value in arrays.items():
            with z.open(f"{key}.npy", "w") as member:
                if key == "obs":
                    header = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6, 10**3)}
                    np.lib.format.write_array_header_1_0(member, header)
                    member.write(b"\0" * 16)
                else:
                    np.lib.format.write_array(member, value)
    with pytest.raises(
        ValueError,
        match=r"truncated or corrupted \(obs: ValueError: the header declares \(1000000, 1000000, 1000\) float32 \(4000000000000000 bytes\), the file holds 16\)$",
    ):
        Episodes.load(path)


def test_load_refuses_paths_that_are_no_episodes_file(tmp_path):
    with pytest.raises(
        ValueError, match=rf"^path: expected an episodes .npz file, got a directory {tmp_path}$"
    ):
        Episodes.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        Episodes.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"^path: expected an episodes .npz file path, got NoneType$"):
        Episodes.load(None)


# ---------------------------------------------------------------- environments this module cannot step


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class NoAgent:
    def reset(self, obs):
        raise AssertionError("the environment should have been refused before the agent was reset")

    act = reset


MISSING_DEPENDENCIES = [
    pytest.param(
        "LunarLander-v3",
        r"which needs Box2D .*`pip install \"gymnasium\[box2d\]\"`",
        marks=pytest.mark.skipif(installed("Box2D"), reason="Box2D is installed"),
    ),
    pytest.param(
        "HalfCheetah-v5",
        r"which needs mujoco .*`pip install \"gymnasium\[mujoco\]\"`",
        marks=pytest.mark.skipif(installed("mujoco"), reason="MuJoCo is installed"),
    ),
]


@pytest.mark.parametrize("env_id,message", MISSING_DEPENDENCIES)
def test_a_missing_optional_dependency_is_named_with_how_to_install_it(env_id, message):
    expected = (
        rf"^env_id: expected an environment whose dependencies are installed, got '{env_id}', {message}"
    )
    with pytest.raises(ValueError, match=expected):
        collect(env_id, 1, progress=False)
    with pytest.raises(ValueError, match=expected):
        play(env_id, NoAgent(), 1, progress=False)
    with pytest.raises(ValueError, match=expected):
        observation_scale_floor(env_id)


def test_jax_functional_environments_are_refused_by_name():
    """phys2d/CartPole-v1 steps jax arrays (and needs jax); it is refused whether or not jax is installed."""
    expected = (
        r"^env_id: expected an environment that steps with numpy arrays, got 'phys2d/CartPole-v1', a jax"
        r" functional environment \(gymnasium.envs.phys2d.cartpole:CartPoleJaxEnv\) whose observations"
        r" are jax arrays; use CartPole-v1 instead$"
    )
    with pytest.raises(ValueError, match=expected):
        collect("phys2d/CartPole-v1", 1, progress=False)
    with pytest.raises(ValueError, match=expected):
        play("phys2d/CartPole-v1", NoAgent(), 1, progress=False)
    with pytest.raises(ValueError, match=expected):
        observation_scale_floor("phys2d/CartPole-v1")


def test_bad_environment_arguments_elsewhere():
    with pytest.raises(ValueError, match=r"^env_id: expected a registered gymnasium id, got 'NoSuchEnv-v0'"):
        play("NoSuchEnv-v0", NoAgent(), 1, progress=False)
    with pytest.raises(ValueError, match=r"^env_id: expected a registered gymnasium id, got int"):
        observation_scale_floor(3)
    with pytest.raises(
        ValueError, match=r"^env_id: expected a rank-1 Box observation space, got Discrete\(16\)"
    ):
        observation_scale_floor("FrozenLake-v1")
    with pytest.raises(
        ValueError, match=r"^env_id: expected a rank-1 Box observation space, got Discrete\(16\)"
    ):
        play("FrozenLake-v1", NoAgent(), 1, progress=False)
    with pytest.raises(ValueError, match=r"^fraction: expected a finite number > 0, got 0$"):
        observation_scale_floor("CartPole-v1", 0)


def test_refused_files_are_closed(pendulum, tmp_path):
    valid = pendulum.save(tmp_path / "valid.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(valid[: len(valid) // 2])
    (tmp_path / "flipped.npz").write_bytes(valid[:100] + bytes([valid[100] ^ 0xFF]) + valid[101:])
    np.savez(tmp_path / "other.npz", format=np.array("other/1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("half.npz", "flipped.npz", "other.npz"):
            with pytest.raises(ValueError, match=str(tmp_path / name)):
                Episodes.load(tmp_path / name)
        gc.collect()  # an unclosed file warns when it is collected
    assert [w.message for w in caught if issubclass(w.category, ResourceWarning)] == []


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="long double is float64 here")
def test_a_dtype_torch_cannot_hold_is_refused_by_key(saved, tmp_path):
    arrays, load = saved
    with pytest.raises(
        ValueError, match=r": obs: expected an array of numbers, got a \(2, 10, 3\) array of float128$"
    ):
        load(obs=arrays["obs"].astype(np.longdouble))
