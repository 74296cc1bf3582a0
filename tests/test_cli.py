"""The ``pyro-worldmodel`` command, run as a user runs it: real gymnasium
environments, real files under ``tmp_path``, real SVI steps.

Every run is tiny. One Pendulum run and one CartPole run are trained once per
module; a test that writes into a run directory works on a copy.
"""

import gc
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from pyro_worldmodel import ActionSpace, Spec, load_checkpoint
from pyro_worldmodel.cli import main
from pyro_worldmodel.data import EPISODES_FORMAT, Episodes
from pyro_worldmodel.workflow import Architecture, load_run

# Tiny settings: 10 SVI steps on windows of 10; 20 open-loop windows of 3 context + 5 predicted steps.
SAMPLES = "--num-samples 5 --iwae-particles 4 --max-windows 20".split()
EVAL = ["--context", "3", "--horizon", "5", *SAMPLES]
TRAIN = ["--steps", "10", "--window", "10", *EVAL]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVALUATE_FIGURES = ("kl_per_t.png", "open_loop.png", "imagination.png")


def cli(capsys, *argv) -> tuple[int, str, str]:
    """``main(argv)`` in this process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_ok(*argv) -> None:
    assert main([str(a) for a in argv]) == 0, argv


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` (hidden temporaries too), by relative path."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def heldout_split(run: Path) -> Episodes:
    """The validation episodes of a run, split as train and evaluate split them."""
    return Episodes.load(run / "episodes.npz").split(0.2, seed=0)[1]


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def pendulum_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pendulum_data")
    # 50 of Pendulum's 200 steps: evaluation's cost grows with the held-out episode.
    run_ok("collect", "--env", "Pendulum-v1", "--episodes", 6, "--max-episode-steps", 50, "--out", out)
    return out / "episodes.npz"


@pytest.fixture(scope="module")
def pendulum_run(tmp_path_factory, pendulum_data) -> Path:
    out = tmp_path_factory.mktemp("pendulum") / "run"
    run_ok("train", "--data", pendulum_data, *TRAIN, "--out", out)
    return out


@pytest.fixture(scope="module")
def cartpole_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cartpole_data")
    run_ok(
        *"collect --env CartPole-v1 --episodes 6 --max-episode-steps 30 --num-envs 2".split(), "--out", out
    )
    return out / "episodes.npz"


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory, cartpole_data) -> Path:
    out = tmp_path_factory.mktemp("cartpole") / "run"
    run_ok("train", "--data", cartpole_data, *TRAIN, "--out", out)
    return out


# ---------------------------------------------------------------- every subcommand, end to end


def test_collect_writes_the_requested_episodes(pendulum_data):
    episodes = Episodes.load(pendulum_data)
    assert len(episodes) == 6
    assert episodes.env_id == "Pendulum-v1"
    assert episodes.obs_dim == 3
    assert episodes.action_space.kind == "box" and episodes.action_space.dim == 1
    assert episodes.lengths.tolist() == [50] * 6  # --max-episode-steps; Pendulum never terminates
    assert bool(episodes.truncated.all()) and not bool(episodes.terminated.any())
    assert episodes.normalizer is None  # fitted by train, on its training split only


def test_train_writes_checkpoint_metrics_and_figures(pendulum_data, pendulum_run):
    arch = Architecture(
        **torch.load(pendulum_run / "model.ckpt", weights_only=True)["extra"]["run"]["architecture"]
    )
    assert (arch.env_id, arch.obs_dim) == ("Pendulum-v1", 3)
    built = arch.build()
    assert load_checkpoint(pendulum_run / "model.ckpt", built.model, built.guide)["step"] == 10

    data, saved = Episodes.load(pendulum_data), Episodes.load(pendulum_run / "episodes.npz")
    assert torch.equal(saved.obs, data.obs) and torch.equal(saved.actions, data.actions)
    assert saved.normalizer is not None

    metrics = read_metrics(pendulum_run)
    assert metrics["env_id"] == "Pendulum-v1"
    assert metrics["num_episodes"] == 1  # round(0.2 * 6) held out
    for bound in ("elbo", "iwae"):
        assert math.isfinite(metrics["heldout"][bound])
    ol = metrics["open_loop"]
    assert (ol["context"], ol["horizon"], ol["num_windows"]) == (3, 5, 20)
    for table in ("mse", "log_lik"):
        assert set(ol[table]) == {"model", "copy_last", "linear"}
        assert all(len(v) == 5 and all(math.isfinite(x) for x in v) for v in ol[table].values())
    # Pendulum steps are nearly linear over one dt, so least squares must beat copying x_t.
    assert ol["mse"]["linear"][0] < ol["mse"]["copy_last"][0]

    for name in ("training.png", *EVALUATE_FIGURES):
        assert (pendulum_run / "figures" / name).read_bytes()[:8] == PNG_MAGIC, name


def test_the_model_is_built_in_normalised_action_units(pendulum_run):
    """The model's box bounds are in the units it trains in; the architecture keeps real units."""
    run = load_run(pendulum_run)
    model, arch, normalizer = run.model, run.architecture, run.normalizer
    real = ActionSpace.box(1, -2.0, 2.0)  # Pendulum's torque
    assert ActionSpace(**arch.action_space) == real
    loc, scale = normalizer.action_loc.item(), normalizer.action_scale.item()
    assert scale != 1.0
    assert model.action_space.low == pytest.approx(((-2.0 - loc) / scale,))
    assert model.action_space.high == pytest.approx(((2.0 - loc) / scale,))
    assert arch.build().model.action_space == real


def test_evaluate_rewrites_the_metrics_train_wrote(pendulum_run, tmp_path, capsys):
    run = copy_run(pendulum_run, tmp_path)
    (run / "metrics.json").unlink()
    for name in EVALUATE_FIGURES:
        (run / "figures" / name).unlink()
    rc, out, err = cli(capsys, "evaluate", "--run", run, *EVAL)
    assert rc == 0, err
    assert "held-out" in out and str(run / "metrics.json") in out
    # Same checkpoint, same seed: the very numbers train reported.
    assert read_metrics(run) == read_metrics(pendulum_run)
    for name in EVALUATE_FIGURES:
        assert (run / "figures" / name).read_bytes()[:8] == PNG_MAGIC, name


def test_imagine_writes_samples_that_start_from_the_recorded_context(pendulum_run, tmp_path, capsys):
    run = copy_run(pendulum_run, tmp_path)
    (run / "figures" / "imagination.png").unlink()
    rc, out, err = cli(capsys, "imagine", "--run", run, "--context", 3, "--horizon", 4, "--num-samples", 3)
    assert rc == 0, err
    assert str(run / "imagination.npz") in out
    with np.load(run / "imagination.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    assert arrays["obs"].shape == arrays["obs_mean"].shape == (3, 1, 4, 3)  # (S, B, H, X)
    assert arrays["latents"].shape == (3, 1, 4, 8)
    val = heldout_split(run)
    np.testing.assert_allclose(arrays["context_obs"], val.obs[:1, :3].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(arrays["future_obs"], val.obs[:1, 3:7].numpy())
    # --policy data: every sample acts as the episode did.
    np.testing.assert_allclose(
        arrays["actions"], np.broadcast_to(val.actions[:1, 3:7].numpy(), (3, 1, 4, 1)), atol=1e-5
    )
    assert (run / "figures" / "imagination.png").read_bytes()[:8] == PNG_MAGIC


def test_imagine_past_the_episode_end_needs_the_policy(pendulum_run, tmp_path, capsys):
    run = copy_run(pendulum_run, tmp_path)
    # 50-step episodes: 7 recorded actions follow a context at 40..42, and 10 are asked for.
    past_the_end = ["--start", 40, "--context", 3, "--horizon", 10, "--num-samples", 3]
    rc, _, err = cli(capsys, "imagine", "--run", run, *past_the_end, "--policy", "data")
    assert rc == 2
    assert "pyro-worldmodel imagine: error: horizon:" in err and "--policy model" in err
    assert not (run / "imagination.npz").exists()

    rc, _, err = cli(capsys, "imagine", "--run", run, *past_the_end, "--policy", "model")
    assert rc == 0, err
    with np.load(run / "imagination.npz", allow_pickle=False) as f:
        assert f["obs"].shape == (3, 1, 10, 3)
        assert f["actions"].shape == (3, 1, 10, 1)
        assert "future_obs" not in f.files  # reality ends after 7 steps


# ---------------------------------------------------------------- discrete actions


def test_cartpole_collect_train_imagine(cartpole_data, cartpole_run, tmp_path, capsys):
    episodes = Episodes.load(cartpole_data)
    assert len(episodes) == 6 and episodes.env_id == "CartPole-v1"
    assert episodes.action_space.kind == "discrete" and episodes.actions.dtype == torch.int64
    assert int(episodes.lengths.max()) <= 30
    assert bool((episodes.terminated | episodes.truncated).all())

    metrics = read_metrics(cartpole_run)
    assert metrics["env_id"] == "CartPole-v1"
    assert all(len(v) == 5 for v in metrics["open_loop"]["mse"].values())

    run = copy_run(cartpole_run, tmp_path)
    for policy in ("data", "model"):
        args = ["--context", 3, "--horizon", 4, "--num-samples", 3, "--policy", policy]
        rc, _, err = cli(capsys, "imagine", "--run", run, *args)
        assert rc == 0, err
        with np.load(run / "imagination.npz", allow_pickle=False) as f:
            assert f["obs"].shape == f["obs_mean"].shape == (3, 1, 4, 4)
            assert f["actions"].shape == (3, 1, 4)
            assert np.issubdtype(f["actions"].dtype, np.integer) and set(np.unique(f["actions"])) <= {0, 1}
            if policy == "data":
                recorded = heldout_split(run).actions[0, 3:7].numpy()
                np.testing.assert_array_equal(f["actions"], np.broadcast_to(recorded, (3, 1, 4)))


# ---------------------------------------------------------------- determinism


def test_train_is_a_function_of_its_seed(pendulum_data, pendulum_run, tmp_path):
    """A second run with the module run's seed (0) into another directory
    repeats it exactly; seed 1 splits, initialises and samples differently."""
    same, other = tmp_path / "same", tmp_path / "other"
    run_ok("train", "--data", pendulum_data, *TRAIN, "--seed", 0, "--out", same)
    run_ok("train", "--data", pendulum_data, *TRAIN, "--seed", 1, "--out", other)
    a, b = read_metrics(same), read_metrics(other)
    assert a == read_metrics(pendulum_run)
    assert a["heldout"]["elbo"] != b["heldout"]["elbo"]
    assert a["open_loop"]["mse"]["model"] != b["open_loop"]["mse"]["model"]


# ---------------------------------------------------------------- the command itself


@pytest.mark.parametrize(
    "argv, mentions",
    [
        ([], "collect train evaluate imagine compare"),
        (["collect"], "--env --episodes --num-envs --max-episode-steps --seed --device --out"),
        (["train"], "--env --data --steps --window --horizon --iwae-particles --resume --seed --out"),
        (["evaluate"], "--run --data --context --horizon --iwae-particles --max-windows --seed"),
        (["imagine"], "--run --data --episode --start --context --horizon --num-samples --policy"),
        (["compare"], "--env --data --config --set --estimators --repeats --steps --smoke --out --seed"),
        (
            ["loop"],
            "--env --config --planner --set --iterations --train-steps --explore --max-env-steps --smoke --out",
        ),
    ],
)
def test_help_exits_0_and_lists_the_options(argv, mentions, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['pyro-worldmodel', *argv])}")
    for word in mentions.split():
        assert word in out, word


def test_the_installed_entry_points_run(tmp_path):
    help_ = subprocess.run(
        [sys.executable, "-m", "pyro_worldmodel.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert help_.returncode == 0, help_.stderr
    assert "{collect,train,evaluate,imagine,compare,loop,presets}" in help_.stdout

    script = shutil.which("pyro-worldmodel") or shutil.which(
        "pyro-worldmodel", path=str(Path(sys.executable).parent)
    )
    # setup.cfg's entry point, installed by `pip install -e .` as the README says.
    assert script is not None, "the pyro-worldmodel console script is not installed"
    # The script's exit code is main's: 2 on a bad argument, with the message on stderr.
    bad = subprocess.run(
        [script, "collect", "--env", "NoSuchEnv-v0", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2, bad.stderr
    assert "pyro-worldmodel collect: error: env_id:" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- bad input


def test_collect_rejects_an_unknown_env_id(tmp_path, capsys):
    rc, _, err = cli(capsys, "collect", "--env", "NoSuchEnv-v0", "--episodes", 2, "--out", tmp_path / "x")
    assert rc == 2
    assert err.startswith("pyro-worldmodel collect: error: env_id:")
    assert "registered gymnasium id" in err and "NoSuchEnv-v0" in err
    assert "Supported: any id whose observation space is a rank-1 Box" in err and "Pendulum-v1" in err
    assert not (tmp_path / "x").exists()


class _DictObsEnv(gym.Env):
    """A real environment whose observations are a Dict, which the library does not support."""

    observation_space = gym.spaces.Dict({"position": gym.spaces.Box(-1.0, 1.0, (2,))})
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


gym.register("DictObsForTests-v0", entry_point=_DictObsEnv, max_episode_steps=5)


@pytest.mark.parametrize(
    "env_id, space",
    [("Blackjack-v1", "Tuple("), ("FrozenLake-v1", "Discrete(16)"), ("DictObsForTests-v0", "Dict(")],
)
def test_collect_rejects_observations_that_are_not_a_vector(env_id, space, tmp_path, capsys):
    rc, _, err = cli(capsys, "collect", "--env", env_id, "--episodes", 2, "--out", tmp_path / "x")
    assert rc == 2
    assert err.startswith("pyro-worldmodel collect: error:")
    assert "rank-1 Box observation space" in err and space in err and env_id in err
    assert "whose action space is a rank-1 Box or a Discrete, e.g. Pendulum-v1" in err  # what is supported
    assert not (tmp_path / "x").exists()


def _truncated(good: Path, bad: Path) -> None:
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])


def _not_an_npz(good: Path, bad: Path) -> None:
    bad.write_text("obs,actions\n0.1,0.2\n")


def _empty(good: Path, bad: Path) -> None:
    bad.write_bytes(b"")


def _another_npz(good: Path, bad: Path) -> None:
    np.savez(bad, x=np.arange(3))


def _tag_without_arrays(good: Path, bad: Path) -> None:
    np.savez(bad, format=np.array(EPISODES_FORMAT), env_id=np.array("Pendulum-v1"))


def _missing(good: Path, bad: Path) -> None:
    """No file at all: --data names a path that does not exist."""


@pytest.mark.parametrize(
    "corrupt",
    [
        _truncated,
        _not_an_npz,
        _empty,
        _another_npz,
        _tag_without_arrays,
        _missing,
    ],
)
def test_train_rejects_a_bad_data_file_and_leaves_the_run_alone(corrupt, pendulum_run, tmp_path, capsys):
    run = copy_run(pendulum_run, tmp_path)
    before = snapshot(run)
    bad = tmp_path / "bad_episodes.npz"
    corrupt(run / "episodes.npz", bad)
    rc, _, err = cli(capsys, "train", "--data", bad, *TRAIN, "--out", run)
    assert rc == 2
    assert err.startswith("pyro-worldmodel train: error:")
    assert str(bad) in err  # names the file
    assert snapshot(run) == before  # no file rewritten, no partial file left


def test_a_truncated_data_file_is_closed(pendulum_data, tmp_path, capsys):
    bad = tmp_path / "half.npz"
    _truncated(pendulum_data, bad)
    rc, _, err = cli(capsys, "train", "--data", bad, "--out", tmp_path / "run")
    gc.collect()  # a leaked handle warns when it is collected
    assert rc == 2 and str(bad) in err


@pytest.mark.parametrize("command", ["evaluate", "imagine"])
def test_a_run_without_a_checkpoint_is_rejected(command, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = cli(capsys, command, "--run", empty)
    assert rc == 2
    assert err.startswith(f"pyro-worldmodel {command}: error: run:")
    assert f"checkpoint at {empty / 'model.ckpt'}" in err and "pyro-worldmodel train" in err
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("command", ["evaluate", "imagine"])
def test_data_from_another_env_names_what_differs(command, pendulum_run, cartpole_data, capsys):
    before = snapshot(pendulum_run)
    rc, _, err = cli(capsys, command, "--run", pendulum_run, "--data", cartpole_data, "--context", 3)
    assert rc == 2
    assert err.startswith(f"pyro-worldmodel {command}: error: data:")
    assert "the checkpoint was made for Pendulum-v1" in err and "CartPole-v1" in err
    for differs in ("environment Pendulum-v1 vs CartPole-v1", "obs_dim 3 vs 4", "actions "):
        assert differs in err.split("they differ in")[1], differs
    assert snapshot(pendulum_run) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(
            ["collect", "--device", "cuda"],
            "argument --device: expected a device this machine has, got 'cuda'",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        (["collect", "--device", "tpu9"], "argument --device: expected a torch device"),
        (["collect", "--episodes", "0"], "argument --episodes: expected a positive int, got 0"),
        (["train", "--val-fraction", "1.5"], "argument --val-fraction: expected a number in (0, 1), got 1.5"),
        (["imagine", "--policy", "random"], "argument --policy: invalid choice: 'random'"),
        (["train", "--lr-decay", "-1"], "argument --lr-decay: expected a number in (0, 1], got -1"),
        (["train", "--lr", "0"], "argument --lr: expected a positive number, got 0"),
        (["train", "--window", "-3"], "argument --window: expected an int >= 0, got -3"),
    ],
)
def test_bad_arguments_exit_2_from_argparse(argv, message, tmp_path, capsys):
    out = tmp_path / "x"
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out" if argv[0] != "imagine" else "--run", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"pyro-worldmodel {argv[0]}: error: {message}" in err
    assert not out.exists()


# ---------------------------------------------------------------- edge cases


def test_imagine_policy_data_stops_at_a_short_episodes_end(cartpole_data, cartpole_run, tmp_path, capsys):
    episodes = Episodes.load(cartpole_data)
    T = episodes.mask.shape[1]
    short = int((episodes.lengths < T).nonzero()[0])
    context, horizon = 3, T - 3  # fits the padding, not the episode
    assert int(episodes.lengths[short]) - context < horizon
    run = copy_run(cartpole_run, tmp_path)
    rc, _, err = cli(
        capsys, "imagine", "--run", run, "--data", cartpole_data, "--episode", short,
        "--context", context, "--horizon", horizon, "--num-samples", 2,
    )  # fmt: skip
    assert rc == 2
    assert "horizon" in err and "--policy model" in err


def test_evaluate_with_a_horizon_past_the_held_out_episodes(cartpole_run, tmp_path, capsys):
    """Horizons no held-out window reaches are null in strict JSON, not NaN, and not zero."""
    run = copy_run(cartpole_run, tmp_path)
    train, val = Episodes.load(run / "episodes.npz").split(0.2, seed=0)
    horizon = int(val.lengths.max()) - 3 + 1  # one step past every held-out episode
    assert int(train.lengths.max()) > horizon  # the baselines can still be fitted
    rc, _, err = cli(capsys, "evaluate", "--run", run, "--context", 3, "--horizon", horizon, *SAMPLES)
    assert rc == 0, err

    def no_nan(token):
        raise AssertionError(f"metrics.json holds {token}")

    metrics = json.loads((run / "metrics.json").read_text(), parse_constant=no_nan)
    ol = metrics["open_loop"]
    assert ol["horizon"] == horizon and ol["count"][-1] == 0 and ol["count"][0] > 0
    for name in ("model", "copy_last", "linear"):
        assert ol["mse"][name][-1] is None and ol["log_lik"][name][-1] is None
        assert ol["mse"][name][0] > 0
    # one held-out episode: nothing to cross-fit the spread on, so no calibrated predictor
    assert len(val) == 1 and "calibrated" not in ol["mse"] and ol["calibration"] is None


def test_train_checks_before_writing_anything(pendulum_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--data", pendulum_data, *TRAIN[:4], "--horizon", 60, "--out", out)
    assert rc == 2 and "horizon: expected a training episode longer than horizon=60" in err
    assert not out.exists()


def test_resume_refuses_another_runs_checkpoint(pendulum_run, tmp_path, capsys):
    run = copy_run(pendulum_run, tmp_path)
    before = snapshot(run)
    data = tmp_path / "data.npz"
    shutil.copy(run / "episodes.npz", data)
    rc, _, err = cli(capsys, "train", "--data", data, *TRAIN, "--seed", 1, "--resume", "--out", run)
    assert rc == 2 and "resume: the checkpoint" in err and "seed 0 vs 1" in err
    assert snapshot(run) == before


def test_a_run_whose_data_was_swapped_is_rejected(pendulum_run, cartpole_data, tmp_path, capsys):
    run = copy_run(pendulum_run, tmp_path)
    shutil.copy(cartpole_data, run / "episodes.npz")
    before = snapshot(run)
    rc, _, err = cli(capsys, "evaluate", "--run", run, *EVAL)
    assert rc == 2 and "episodes.npz: does not match the run's manifest" in err
    assert snapshot(run) == before
    # A directory written before manifests: the contents still have to agree.
    (run / "run.json").unlink()
    before = snapshot(run)
    rc, _, err = cli(capsys, "evaluate", "--run", run, *EVAL)
    assert rc == 2 and "the checkpoint was made for Pendulum-v1" in err and "obs_dim 3 vs 4" in err
    assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }


def test_train_on_data_names_the_run_after_its_environment(cartpole_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capsys, "train", "--data", cartpole_data, "--no-evaluate", *TRAIN)
    assert rc == 0, err
    assert (tmp_path / "runs" / "CartPole-v1" / "model.ckpt").exists()
    assert not (tmp_path / "runs" / "Pendulum-v1").exists()


@pytest.mark.parametrize("command", ["evaluate", "imagine"])
def test_a_damaged_checkpoint_is_rejected(command, pendulum_run, tmp_path, capsys):
    run = copy_run(pendulum_run, tmp_path)
    ckpt = run / "model.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    rc, _, err = cli(capsys, command, "--run", run, "--context", 3)
    assert rc == 2
    assert err.startswith(f"pyro-worldmodel {command}: error:") and str(ckpt) in err


def test_train_takes_a_yaml_config_and_dotted_overrides(pendulum_data, tmp_path, capsys):
    config = tmp_path / "linear.yaml"
    config.write_text(Spec(transition={"name": "linear_gaussian"}).to_yaml())
    out = tmp_path / "run"
    rc, stdout, err = cli(
        capsys, "train", "--data", pendulum_data, "--config", config,
        "--set", "emission.hidden=[16, 16]", "--set", "latent_dim=4", *TRAIN, "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    assert "starting at random: no linear warm start" in stdout  # linear_gaussian has no init_linear
    spec = torch.load(out / "model.ckpt", weights_only=True)["extra"]["run"]["architecture"]["spec"]
    assert spec["transition"] == {"name": "linear_gaussian"} and spec["emission"]["hidden"] == [16, 16]
    assert spec["latent_dim"] == 4 and spec["train"]["num_steps"] == 10  # --steps over the file's 1500


def test_a_bad_config_is_refused_before_anything_is_written(pendulum_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(
        capsys, "train", "--data", pendulum_data, "--set", "transition.hiden=[8]", *TRAIN, "--out", out
    )
    assert rc == 2 and "transition.hiden: GaussianMLPTransition takes no keyword 'hiden'" in err
    rc, _, err = cli(
        capsys, "train", "--data", pendulum_data, "--set", "transition.name=lstm", *TRAIN, "--out", out
    )
    assert (
        rc == 2
        and "registered: ['bayesian', 'categorical_mlp', 'categorical_rssm', 'ensemble', 'gated', 'gaussian_mlp', 'linear_gaussian', 'rssm', 'student_t']"
        in err
    )
    assert not out.exists()


def test_an_rssm_with_a_tanh_policy_trains_and_dreams_actions_inside_the_box(pendulum_data, tmp_path, capsys):
    """The tanh policy's bounds follow the normalised actions, so what it dreams,
    back in real units, stays in Pendulum's [-2, 2]."""
    out = tmp_path / "run"
    rc, _, err = cli(
        capsys, "train", "--data", pendulum_data, "--set", "transition={name: rssm, deter_dim: 8, hidden: [16]}",
        "--set", "policy.name=tanh_normal", *TRAIN, "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    rc, _, err = cli(capsys, "imagine", "--run", out, "--policy", "model", "--context", 3, "--horizon", 20)
    assert rc == 0, err
    with np.load(out / "imagination.npz") as f:
        actions = f["actions"]
    assert actions.shape[-2:] == (20, 1) and np.abs(actions).max() <= 2.0 + 1e-5
    assert np.abs(actions).max() > 0.1  # sampled, not stuck at the centre


def test_presets_lists_every_preset_and_prints_a_composition(capsys):
    rc, out, _ = cli(capsys, "presets")
    assert rc == 0
    for name, description in Spec.presets().items():
        assert f"{name}" in out and description in out
    rc, out, _ = cli(capsys, "presets", "planet", "smoke")
    assert rc == 0 and Spec.from_yaml(out) == Spec.preset("planet", "smoke")
    rc, _, err = cli(capsys, "presets", "plannet")
    assert rc == 2 and "unknown preset 'plannet' (did you mean 'planet'?)" in err


def test_train_takes_presets_over_a_config(pendulum_data, tmp_path, capsys):
    config = tmp_path / "smoothing.yaml"
    config.write_text(Spec(guide={"name": "smoothing"}).to_yaml())
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--data", pendulum_data, "--config", config, "--preset", "binary", "smoke",
                     "--set", "emission.name=gaussian_mlp", *TRAIN, "--no-evaluate", "--out", out)  # fmt: skip
    assert rc == 0, err
    spec = Spec.from_dict(load_run(out).architecture.spec)
    assert spec.guide["name"] == "smoothing"  # the config's, kept under the presets
    assert spec.guide["rnn_dim"] == Spec.preset("smoke").guide["rnn_dim"]  # and smoke's size laid over it
    assert spec.latent_dim == Spec.preset("smoke").latent_dim  # smoke's size
    assert spec.emission["name"] == "gaussian_mlp"  # --set wins over binary's bernoulli
    assert spec.train["num_steps"] == 10  # --steps wins over smoke's


def test_imagine_calibrated_moves_the_same_futures_by_the_factors_evaluate_fitted(
    pendulum_run, pendulum_data, tmp_path, capsys
):
    """The run's own held-out split is one episode: no factors, a named refusal. Evaluated on
    all six episodes (both folds), the run keeps factors; `imagine --calibrated` then draws the
    futures plain `imagine` draws with the same seed, moved about their mean by them."""
    run = copy_run(pendulum_run, tmp_path)
    dream = [
        "imagine",
        "--run",
        run,
        "--data",
        pendulum_data,
        "--episode",
        1,
        "--context",
        3,
        "--num-samples",
        20,
    ]
    rc, _, err = cli(capsys, *dream, "--horizon", 5, "--calibrated")
    assert rc == 2 and "calibrated: the run has no spread factors" in err
    assert cli(capsys, "evaluate", "--run", run, "--data", pendulum_data, *EVAL)[0] == 0
    factor = np.array(read_metrics(run)["open_loop"]["calibration"]["factor"])  # (5, 3)
    assert factor.shape == (5, 3) and not np.all(factor == 1.0)
    assert cli(capsys, *dream, "--horizon", 4)[0] == 0
    plain = dict(np.load(run / "imagination.npz"))
    assert cli(capsys, *dream, "--horizon", 4, "--calibrated")[0] == 0
    moved = dict(np.load(run / "imagination.npz"))
    np.testing.assert_array_equal(moved["spread_factor"], factor[:4])
    np.testing.assert_array_equal(moved["obs_mean"], plain["obs_mean"])  # the same draws
    mean = plain["obs_mean"].mean(0)
    np.testing.assert_allclose(moved["obs"], mean + factor[:4] * (plain["obs"] - mean), rtol=1e-5, atol=1e-6)
    # the factors hold for the context they were fitted after, up to its horizon
    rc, _, err = cli(capsys, *dream[:-4], "--context", 4, "--num-samples", 20, "--horizon", 4, "--calibrated")
    assert rc == 2 and "context: the spread factors were fitted after 3 context steps, got context=4" in err
    rc, _, err = cli(capsys, *dream, "--horizon", 6, "--calibrated")
    assert rc == 2 and "horizon: the spread factors reach horizon 5, got horizon=6" in err


def test_one_held_out_episode_prints_no_standard_error(tmp_path, capsys):
    """With one held-out episode the standard error over episodes does not exist: "n/a", not "nan"."""
    argv = "train --env Pendulum-v1 --episodes 5 --steps 5 --window 10".split()
    rc, out, _ = cli(capsys, *argv, *EVAL, "--out", tmp_path / "run")
    assert rc == 0
    assert " ± n/a " in out and "nan" not in out
