"""Image observations: rendered frames collected beside the state, stored as uint8,
compressed on disk, cut into windows without touching the rest; and the refusals."""

from __future__ import annotations

import zipfile
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pyro
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


# ---------------------------------------------------------------- training on frames

TINY = [
    "--set",
    "encoder.depth=2",
    "--set",
    "encoder.layers=2",
    "--set",
    "emission.depth=2",
    "--set",
    "emission.layers=2",
]
EVAL = "--context 3 --horizon 6 --num-samples 3 --max-windows 12 --iwae-particles 2".split()


@pytest.fixture(scope="module")
def frames_run(tmp_path_factory):
    """A model of 16×16 grayscale Pendulum-v1 frames, trained 20 steps by the command line."""
    root = tmp_path_factory.mktemp("frames")
    argv = (
        "collect --env Pendulum-v1 --episodes 6 --max-episode-steps 20 --pixels --frame-size 16 --grayscale"
    )
    assert main([*argv.split(), "--out", str(root / "data")]) == 0
    argv = ["train", "--data", str(root / "data" / "episodes.npz"), "--preset", "pixels", *TINY]
    assert main([*argv, "--steps", "20", "--window", "10", *EVAL, "--out", str(root / "run")]) == 0
    return root


def test_frames_are_the_observations_of_a_model_of_frames(frames_run):
    from pyro_worldmodel.workflow import load_run

    run = load_run(frames_run / "run")
    assert run.architecture.image_shape == [1, 16, 16] and run.architecture.obs_dim == 256
    assert run.model.emission.image_shape == (1, 16, 16) and run.guide.encoder.image_shape == (1, 16, 16)
    saved = Episodes.load(frames_run / "run" / "episodes.npz")
    data = Episodes.load(frames_run / "data" / "episodes.npz")
    assert saved.pixel_obs and saved.obs_image_shape == (1, 16, 16)
    assert torch.equal(saved.obs, data.frames.flatten(2))  # the frames themselves, as uint8 pixel values
    # pixel values are modelled as they are: no normalisation
    assert (saved.normalizer.obs_loc == 0).all() and (saved.normalizer.obs_scale == 1).all()


def test_video_scores_are_the_baselines_exact_errors(frames_run):
    """The copy-last and mean-frame rows recomputed from the held-out frames, window by window."""
    import json

    metrics = json.loads((frames_run / "run" / "metrics.json").read_text())
    video = metrics["video"]
    episodes = Episodes.load(frames_run / "run" / "episodes.npz")
    train, val = episodes.split(0.2, seed=0)
    frames = val.obs.double() / 255  # (N, T, X) in [0, 1]
    mean_frame = train.obs[train.mask].double().mean(0) / 255
    C, H = video["context"], video["horizon"]
    for h in (1, H):
        errs = {"copy_last": [], "mean_frame": []}
        for e, s in video["windows"]:
            t = s + C + h - 1
            if t >= int(val.lengths[e]):
                continue
            truth = frames[e, t]
            errs["copy_last"].append(((frames[e, s + C - 1] - truth) ** 2).mean())
            errs["mean_frame"].append(((mean_frame - truth) ** 2).mean())
        assert len(errs["copy_last"]) == video["count"][h - 1]
        for name, values in errs.items():
            values = torch.stack(values)
            assert video["mse"][name][h - 1] == pytest.approx(float(values.mean()), rel=1e-5)
            psnr = (-10 * torch.log10(values.clamp(min=1e-10))).mean()
            assert video["psnr"][name][h - 1] == pytest.approx(float(psnr), rel=1e-5)
    bits = metrics["heldout_bits_per_dim"]
    assert bits["elbo"] == pytest.approx(-metrics["heldout"]["elbo"] / (256 * np.log(2)))
    figures = frames_run / "run" / "figures"
    assert (figures / "video.gif").read_bytes()[:6] == b"GIF89a"
    assert (figures / "video.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(figures / "video.gif") as gif:
        assert gif.n_frames == H  # one per predicted frame
        assert gif.size == (2 * (3 * 16 + 4), 2 * 16)  # true | imagined | difference, drawn 2×


def test_evaluate_again_gives_the_same_video_scores(frames_run, tmp_path, capsys):
    import json
    import shutil

    run = shutil.copytree(frames_run / "run", tmp_path / "run")
    before = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", "--run", str(run), *EVAL]) == 0
    out = capsys.readouterr().out
    assert "open-loop video after 3 context frames" in out and "bits per pixel value" in out
    after = json.loads((run / "metrics.json").read_text())
    assert after["video"] == before["video"] and after["heldout"] == before["heldout"]


def test_uint8_frames_train_as_their_float_values_would(frames_run):
    """fit keeps pixel observations uint8 and converts each batch: the same losses as float data."""
    from pyro_worldmodel import fit
    from pyro_worldmodel.workflow import load_run

    saved = Episodes.load(frames_run / "run" / "episodes.npz")
    obs, actions, mask = saved.normalized()
    assert obs.dtype == torch.uint8
    losses = []
    for data in (obs, obs.float()):
        run = load_run(frames_run / "run")
        pyro.clear_param_store()
        history = fit(
            run.model, run.guide, data, actions, mask, num_steps=3, batch_size=4, seed=0, progress=False
        )
        losses.append(history.loss)
    assert losses[0] == losses[1]


def test_a_model_of_frames_refuses_data_without_them_or_of_another_size(frames_run, tmp_path, capsys):
    state = tmp_path / "state"
    assert (
        main(
            [
                "collect",
                "--env",
                "Pendulum-v1",
                "--episodes",
                "4",
                "--max-episode-steps",
                "20",
                "--out",
                str(state),
            ]
        )
        == 0
    )
    capsys.readouterr()
    rc = main(
        [
            "train",
            "--data",
            str(state / "episodes.npz"),
            "--preset",
            "pixels",
            *TINY,
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2
        and "the spec's encoder conv, emission conv_gaussian read frames, but these Pendulum-v1 episodes have none"
        in err
    )
    assert not (tmp_path / "run").exists()
    rgb = tmp_path / "rgb"
    argv = "collect --env Pendulum-v1 --episodes 4 --max-episode-steps 20 --pixels --frame-size 16"
    assert main([*argv.split(), "--out", str(rgb)]) == 0
    capsys.readouterr()
    rc = main(["evaluate", "--run", str(frames_run / "run"), "--data", str(rgb / "episodes.npz"), *EVAL])
    err = capsys.readouterr().err
    assert rc == 2 and "they differ in frames 1×16×16 vs 3×16×16" in err
    rc = main(["imagine", "--run", str(frames_run / "run")])
    assert rc == 2 and "is a model of frames; imagine draws vector observations" in capsys.readouterr().err


def test_the_state_probe_recovers_a_linear_map_and_scores_r_squared():
    from pyro_worldmodel.evaluate import StateProbe, r_squared

    g = torch.Generator().manual_seed(0)
    features = torch.randn(500, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 3, generator=g, dtype=torch.float64)
    state = features @ weight + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    probe = StateProbe.fit(features, state, ridge=0.0)
    torch.testing.assert_close(probe.weight[:6], weight)
    torch.testing.assert_close(probe.weight[6], torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    assert r_squared(probe.predict(features), state) == pytest.approx(1.0)
    assert r_squared(state.mean(0).expand_as(state), state) == pytest.approx(0.0)  # the mean: R² 0
    noisy = state + torch.randn(state.shape, generator=g, dtype=torch.float64) * state.std(0)
    # noise of the signal's variance: R² about 1/2
    assert r_squared(StateProbe.fit(features, noisy).predict(features), noisy) == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match=r"features, state: expected \(n, F\) and \(n, S\)"):
        StateProbe.fit(features[:, 0], state)


def test_a_model_of_frames_keeps_the_state_and_reports_its_probe(frames_run):
    import json

    saved = Episodes.load(frames_run / "run" / "episodes.npz")
    data = Episodes.load(frames_run / "data" / "episodes.npz")
    assert torch.equal(saved.state, data.obs)  # cos θ, sin θ, θ̇ beside the frames
    probe = json.loads((frames_run / "run" / "metrics.json").read_text())["state_probe"]
    assert probe["filtered_r2"] <= 1.0 and len(probe["imagined_r2"]) == 6
    with pytest.raises(ValueError, match="state: expected None unless the observations are frames"):
        replace(data, state=data.obs)


# ---------------------------------------------------------------- acting from frames


class Recorder:
    """An agent that pushes the cart left, and keeps what it was shown."""

    def __init__(self):
        self.seen = []

    def reset(self, obs):
        self.seen = []

    def act(self, obs):
        self.seen.append(np.array(obs))
        return np.zeros(len(obs), dtype=np.int64)


def test_an_agent_playing_from_frames_sees_the_frames_that_are_recorded():
    agent = Recorder()
    eps = __import__("pyro_worldmodel.data", fromlist=["play"]).play(
        "CartPole-v1", agent, 1, seed=3, pixels=Pixels(16, grayscale=True), progress=False
    )
    L = int(eps.lengths[0])
    seen = np.stack([s[0] for s in agent.seen])  # (L, 256)
    assert seen.dtype == np.uint8 and seen.shape == (L, 256)
    np.testing.assert_array_equal(seen, eps.frames[0, :L].flatten(1).numpy())
    frames, states, _ = rendered_replay("CartPole-v1", [0] * L, 3, Pixels(16, grayscale=True))
    np.testing.assert_array_equal(eps.frames[0, :L].numpy(), frames[:-1])
    np.testing.assert_array_equal(eps.final_frames[0].numpy(), frames[-1])
    np.testing.assert_array_equal(eps.obs[0, :L].numpy(), states[:-1])


def test_the_loop_acts_from_frames_alone(tmp_path, capsys):
    import json

    from pyro_worldmodel.workflow import load_run

    out = tmp_path / "loop"
    argv = "loop --env CartPole-v1 --pixels --frame-size 16 --grayscale --smoke".split()
    assert main([*argv, *TINY, "--out", str(out)]) == 0
    result = json.loads((out / "loop.json").read_text())
    data = Episodes.load(out / "episodes.npz")
    assert data.pixel_obs and data.obs_image_shape == (1, 16, 16) and data.state.shape[-1] == 4
    assert result["iterations"][-1]["env_steps"] == int(data.lengths.sum())
    assert result["settings"]["pixels"] == {"size": [16, 16], "grayscale": True}
    run = load_run(out)
    assert run.architecture.image_shape == [1, 16, 16]
    assert type(run.model.emission).__name__ == "ConvGaussianEmission" and run.model.reward is not None
    # the frames the agent played from are the environment's: the first planned episode (after
    # the two random ones, reset with seed 0 + 1000) replays to the recorded pixel observations
    L = int(data.lengths[2])
    frames, states, _ = rendered_replay(
        "CartPole-v1", data.actions[2, :L].numpy(), 1000, Pixels(16, grayscale=True)
    )
    np.testing.assert_array_equal(data.obs[2, :L].numpy(), frames[:-1].reshape(L, -1))
    np.testing.assert_array_equal(data.state[2, :L].numpy(), states[:-1])


def test_the_loop_refuses_frames_for_a_spec_of_vectors_and_vectors_for_a_spec_of_frames():
    from pyro_worldmodel.config import Spec
    from pyro_worldmodel.loop import model_based_loop

    with pytest.raises(ValueError, match="pixels: the spec reads vector observations"):
        model_based_loop("CartPole-v1", Spec.preset("loop"), pixels=True)
    with pytest.raises(
        ValueError, match="pixels: expected frames for a spec whose encoder or emission reads them"
    ):
        model_based_loop("CartPole-v1", Spec.preset("loop", "pixels"), pixels=False)
