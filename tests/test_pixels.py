"""Image observations: rendered frames collected beside the state, stored as uint8,
compressed on disk, cut into windows without touching the rest; and the refusals."""

from __future__ import annotations

import zipfile
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch

from pyro_worldmodel.cli import main
from pyro_worldmodel.data import ActionRepeat, Episodes, Pixels, collect


def rendered_replay(env_id, actions, seed, pixels, repeat=1):
    """A fresh environment reset with ``seed`` and stepped by ``actions`` (each held
    ``repeat`` steps): the frames it renders before each action and after the last, the
    states, and the summed rewards."""
    env = gym.make(env_id, render_mode="rgb_array")
    obs, _ = env.reset(seed=seed)
    frames, states, rewards = [pixels(env.render())], [obs], []
    for a in actions:
        total = 0.0
        for _ in range(repeat):
            obs, r, terminated, truncated, _ = env.step(a)
            total += float(r)
            if terminated or truncated:
                break
        frames.append(pixels(env.render()))
        states.append(obs)
        rewards.append(total)
    env.close()
    return np.stack(frames), np.stack(states), np.array(rewards, np.float32)


@pytest.fixture(scope="module")
def pendulum():
    return collect("Pendulum-v1", 3, seed=5, num_envs=2, max_episode_steps=12, pixels=True, progress=False)


def test_frames_are_what_a_fresh_environment_renders(pendulum):
    """Each episode replayed in a fresh environment renders the recorded frames, byte for
    byte: before every action, and after the last one (``final_frames``)."""
    assert pendulum.frames.shape == (3, 12, 3, 64, 64) and pendulum.frames.dtype == torch.uint8
    assert pendulum.image_shape == (3, 64, 64)
    for n in range(3):
        L = int(pendulum.lengths[n])
        # sub-env i of the vector environment is reset with seed + i; episodes 0, 1 are its first
        seed = 5 + n if n < 2 else None
        if seed is None:
            continue  # a later episode starts where gymnasium's autoreset left its generator
        frames, states, rewards = rendered_replay(
            "Pendulum-v1", pendulum.actions[n, :L].numpy(), seed, Pixels()
        )
        np.testing.assert_array_equal(pendulum.frames[n, :L].numpy(), frames[:-1])
        np.testing.assert_array_equal(pendulum.final_frames[n].numpy(), frames[-1])
        np.testing.assert_array_equal(pendulum.obs[n, :L].numpy(), states[:-1])
        np.testing.assert_array_equal(pendulum.rewards[n, :L].numpy(), rewards)
    assert (pendulum.frames.float().std((2, 3, 4)) > 0).all()  # a scene, not a blank


def test_resizing_averages_areas_and_grayscale_weights_channels():
    """4×4 blocks of one colour shrink to one pixel each, of that colour; grayscale is
    BT.601 luma, rounded."""
    colours = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], np.uint8)  # (2, 2, 3)
    rendered = colours.repeat(4, 0).repeat(4, 1)  # (8, 8, 3)
    rgb = Pixels(2)(rendered)
    np.testing.assert_array_equal(rgb, colours.transpose(2, 0, 1))
    gray = Pixels(2, grayscale=True)(rendered[None])  # a leading batch dimension is kept
    luma = np.rint(colours.astype(float) @ np.array([0.299, 0.587, 0.114]))
    np.testing.assert_array_equal(gray, luma[None, None].astype(np.uint8))
    # a two-pixel stripe averages exactly: (0 + 255) / 2 rounds to 128
    stripes = np.zeros((2, 2, 3), np.uint8)
    stripes[:, 1] = 255
    np.testing.assert_array_equal(Pixels((2, 1))(stripes), np.full((3, 2, 1), 128, np.uint8))
    rect = Pixels((48, 32))(np.zeros((400, 600, 3), np.uint8))
    assert rect.shape == (3, 48, 32)


def test_action_repeat_holds_each_action_and_sums_its_rewards():
    eps = collect(
        "CartPole-v1", 2, seed=3, action_repeat=3, pixels=Pixels(16, grayscale=True), progress=False
    )
    assert eps.frames.shape[2:] == (1, 16, 16)
    L = int(eps.lengths[0])
    frames, states, rewards = rendered_replay(
        "CartPole-v1", eps.actions[0, :L].numpy(), 3, Pixels(16, grayscale=True), repeat=3
    )
    np.testing.assert_array_equal(eps.obs[0, :L].numpy(), states[:-1])
    np.testing.assert_array_equal(eps.final_obs[0].numpy(), states[-1])
    np.testing.assert_array_equal(eps.frames[0, :L].numpy(), frames[:-1])
    np.testing.assert_array_equal(eps.rewards[0, :L].numpy(), rewards)
    assert (rewards[:-1] == 3.0).all()  # three +1 steps per action, until the pole falls
    with pytest.raises(ValueError, match="action_repeat: expected a positive int, got 0"):
        collect("CartPole-v1", 1, action_repeat=0)
    wrapped = ActionRepeat(gym.make("CartPole-v1"), 2)
    wrapped.reset(seed=0)
    assert wrapped.step(0)[1] == 2.0


def test_frames_round_trip_compressed_and_windows_gather_only_theirs(pendulum, tmp_path):
    path = pendulum.save(tmp_path / "frames.npz")
    back = Episodes.load(path)
    assert torch.equal(back.frames, pendulum.frames) and torch.equal(back.final_frames, pendulum.final_frames)
    assert torch.equal(back.obs, pendulum.obs)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("frames.npy")
        assert info.compress_type == zipfile.ZIP_DEFLATED
        assert info.compress_size < info.file_size / 10  # rendered scenes are mostly background
    g = torch.Generator().manual_seed(0)
    frames, actions, mask = pendulum.windows(8, 20, generator=g, frames=True)
    g = torch.Generator().manual_seed(0)
    obs, actions2, mask2 = pendulum.windows(8, 20, generator=g)
    assert frames.shape == (20, 8, 3, 64, 64) and frames.dtype == torch.uint8
    assert torch.equal(actions, actions2) and torch.equal(mask, mask2)
    for w in range(20):
        e, s = next((e, s) for e in range(3) for s in range(12) if torch.equal(pendulum.obs[e, s], obs[w, 0]))
        n = int(mask[w].sum())
        assert torch.equal(frames[w, :n], pendulum.frames[e, s : s + n])
        assert (frames[w, n:] == 0).all()
    # subsets and joins keep the frames with their episodes
    joined = pendulum[[2]] + pendulum[[0, 1]]
    assert torch.equal(joined.frames[0, :12], pendulum.frames[2])
    assert torch.equal(joined.final_frames[1:], pendulum.final_frames[:2])
    train, val = pendulum.split(0.34, seed=0)
    assert len(train.frames) + len(val.frames) == 3


def test_state_episodes_keep_their_uncompressed_format(tmp_path):
    eps = collect("CartPole-v1", 2, seed=0, progress=False)
    assert eps.frames is None and eps.image_shape is None
    with zipfile.ZipFile(eps.save(tmp_path / "state.npz")) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
        assert "frames.npy" not in z.namelist()
    with pytest.raises(ValueError, match="frames: expected episodes with frames"):
        eps.windows(5, 2, frames=True)


@pytest.mark.parametrize(
    "changes, message",
    [
        (lambda e: {"frames": e.frames.float()}, r"frames: expected dtype torch.uint8 .* got torch.float32"),
        (lambda e: {"final_frames": e.final_frames.int()}, r"final_frames: expected dtype torch.uint8"),
        (
            lambda e: {"frames": e.frames[:, :, :2]},
            r"frames: expected shape \(N, T, C, H, W\) = \(3, 12, 1 or 3",
        ),
        (lambda e: {"frames": e.frames[:, :5]}, r"frames: expected shape .* got \(3, 5, 3, 64, 64\)"),
        (lambda e: {"frames": e.frames[..., 0]}, r"frames: expected shape"),
        (
            lambda e: {"final_frames": e.final_frames[:, :, :32]},
            r"final_frames: expected shape \(3, 3, 64, 64\)",
        ),
        (lambda e: {"final_frames": None}, r"final_frames: expected a tensor as frames is set, got None"),
        (lambda e: {"frames": None}, r"frames: expected a tensor as final_frames is set, got None"),
        (lambda e: {"frames": e.frames.numpy()}, r"frames: expected a torch.Tensor of uint8, got ndarray"),
    ],
)
def test_malformed_frames_are_refused_by_name(pendulum, changes, message):
    with pytest.raises(ValueError, match=message):
        replace(pendulum, **changes(pendulum))


def test_a_file_with_malformed_frames_is_refused_naming_it(pendulum, tmp_path):
    arrays = dict(np.load(pendulum.save(tmp_path / "ok.npz")))
    arrays["frames"] = arrays["frames"].astype(np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=r"path: .*bad.npz: frames: expected dtype torch.uint8"):
        Episodes.load(tmp_path / "bad.npz")


def test_joining_frames_of_other_shapes_is_refused(pendulum):
    small = collect("Pendulum-v1", 1, seed=0, max_episode_steps=5, pixels=Pixels(32), progress=False)
    with pytest.raises(
        ValueError, match=r"other: expected episodes with frames of shape \(3, 64, 64\), got \(3, 32, 32\)"
    ):
        pendulum + small
    state = collect("Pendulum-v1", 1, seed=0, max_episode_steps=5, progress=False)
    with pytest.raises(ValueError, match=r"got None"):
        pendulum + state


class Unrendered(gym.Env):
    """A real environment that draws nothing: no render modes."""

    metadata = {"render_modes": []}
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, True, False, {}


@pytest.fixture(scope="module")
def unrendered():
    gym.register("Unrendered-v0", entry_point=Unrendered)
    yield "Unrendered-v0"
    gym.registry.pop("Unrendered-v0")


def test_an_environment_that_cannot_render_is_refused_by_name(unrendered, tmp_path, capsys):
    assert len(collect(unrendered, 2, progress=False)) == 2  # without pixels it collects
    with pytest.raises(
        ValueError,
        match=r"env_id: expected an environment that renders rgb_array frames .*'Unrendered-v0', whose render modes are none",
    ):
        collect(unrendered, 1, pixels=True)
    rc = main(["collect", "--env", unrendered, "--episodes", "1", "--pixels", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "render modes are none" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", [["--grayscale"], ["--frame-size", "32"]])
def test_frame_options_without_pixels_are_refused(flag, tmp_path, capsys):
    rc = main(["collect", "--episodes", "1", *flag, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{flag[0]}: expected together with --pixels" in err
    assert not (tmp_path / "run").exists()


def test_collect_pixels_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "frames"
    argv = "collect --env CartPole-v1 --episodes 3 --num-envs 2 --pixels --frame-size 24 --grayscale"
    rc = main([*argv.split(), "--action-repeat", "2", "--seed", "4", "--out", str(out)])
    assert rc == 0
    assert "frames 1×24×24" in capsys.readouterr().out
    eps = Episodes.load(out / "episodes.npz")
    again = collect(
        "CartPole-v1", 3, seed=4, num_envs=2, pixels=Pixels(24, True), action_repeat=2, progress=False
    )
    assert torch.equal(eps.frames, again.frames) and torch.equal(eps.obs, again.obs)
