"""Every bad input of the trustworthy-runs issue, through the real command line.

Each case runs ``pyro-worldmodel`` on a real run directory (a real file on
disk, real SVI steps where training is reached) and asserts: exit status 2,
one plain line naming the problem (no traceback, no Pyro shape table), and
not one byte written anywhere under the test's directory.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_worldmodel.cli import main
from pyro_worldmodel.data import Episodes

SAMPLES = "--num-samples 5 --iwae-particles 4 --max-windows 20".split()
EVAL = ["--context", "3", "--horizon", "5", *SAMPLES]
TRAIN = ["--steps", "10", "--window", "10", *EVAL]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def refused(capsys, root: Path, *argv, match: str) -> str:
    """Run the command; assert exit 2, one line matching ``match``, and nothing written under ``root``."""
    before = snapshot(root)
    dirs_before = sorted(p for p in root.rglob("*") if p.is_dir())
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in err and "Trace Shapes" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pyro-worldmodel {argv[0]}: error: "), err
    assert re.search(match, lines[0]), (match, lines[0])
    assert snapshot(root) == before, "a file was written or changed"
    assert sorted(p for p in root.rglob("*") if p.is_dir()) == dirs_before, "a directory was made"
    return lines[0]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("good")
    assert (
        main(
            [
                "collect",
                "--env",
                "Pendulum-v1",
                "--episodes",
                "6",
                "--max-episode-steps",
                "30",
                "--out",
                str(root / "data"),
            ]
        )
        == 0
    )
    assert (
        main(["train", "--data", str(root / "data" / "episodes.npz"), *TRAIN, "--out", str(root / "run")])
        == 0
    )
    return {"data": root / "data" / "episodes.npz", "run": root / "run"}


@pytest.fixture
def root(tmp_path, good) -> Path:
    """A directory with a finished run in it, to be left exactly as it is."""
    shutil.copytree(good["run"], tmp_path / "run")
    return tmp_path


def arrays(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def bad_data(root: Path, good: dict, name: str, **changes) -> Path:
    """The good dataset with some arrays replaced, saved without any check (as a foreign tool would)."""
    data = arrays(good["data"])
    for key, value in changes.items():
        if callable(value):
            value = value(data[key].copy())
        data[key] = value
    path = root / "inputs" / f"{name}.npz"
    path.parent.mkdir(exist_ok=True)
    np.savez(path, **data)
    return path


def put(a, index, value):
    a[index] = value
    return a


# ---------------------------------------------------------------- 1, 6, 8, 10: bad data, before any write


@pytest.mark.parametrize(
    "name, changes, match",
    [
        (
            "nan",
            {"obs": lambda a: put(a, (4, 7, 1), np.nan)},
            r"obs: expected finite values .* \(first at episode 4, step 7\)",
        ),
        (
            "inf",
            {"obs": lambda a: put(a, (2, 3, 0), np.inf)},
            r"obs: expected finite values .* episode 2, step 3",
        ),
        (
            "complex",
            {"obs": lambda a: a.astype(np.complex64)},
            r"obs: expected a real floating dtype .* got torch.complex64",
        ),
        (
            "int obs",
            {"obs": lambda a: a.astype(np.int64)},
            r"obs: expected a real floating dtype .* got torch.int64",
        ),
        ("str obs", {"obs": np.array([["a", "b"]])}, r"obs: "),
        (
            "int terminated",
            {"terminated": lambda a: a.astype(np.int64)},
            r"terminated: expected dtype torch.bool, got torch.int64",
        ),
        ("hole", {"mask": lambda a: put(a, (1, 4), False)}, r"mask: expected each row .* episode 1, step 5"),
        (
            "empty episode",
            {"mask": lambda a: put(a, 3, False)},
            r"mask: expected at least one observed step per episode, got none in episodes \[3\]",
        ),
        (
            "absolute env_id",
            {"env_id": np.array("/somewhere/else")},
            r"env_id: expected a gymnasium id .* got '/somewhere/else'",
        ),
        ("dotdot env_id", {"env_id": np.array("../../x")}, r"env_id: expected a gymnasium id"),
    ],
)
def test_bad_data_is_refused_before_a_file_is_written(capsys, root, good, name, changes, match):
    data = bad_data(root, good, name.replace(" ", "_"), **changes)
    refused(capsys, root, "train", "--data", data, *TRAIN, "--out", root / "run", "--overwrite", match=match)
    refused(capsys, root, "train", "--data", data, *TRAIN, match=match)  # no --out: named from the file
    refused(capsys, root, "evaluate", "--run", root / "run", "--data", data, *EVAL, match=match)
    refused(capsys, root, "imagine", "--run", root / "run", "--data", data, match=match)


def test_nan_positions_are_the_files_own(capsys, root, good):
    data = bad_data(root, good, "late_nan", obs=lambda a: put(a, (5, 29, 2), np.nan))
    line = refused(
        capsys, root, "train", "--data", data, *TRAIN, "--out", root / "new", match=r"episode 5, step 29"
    )
    assert "1 steps" in line  # counted before any split, window or normaliser


def test_a_bernoulli_emission_on_real_valued_data_is_refused_before_writing(capsys, root, good):
    refused(
        capsys, root, "train", "--data", good["data"], *TRAIN, "--out", root / "new",
        "--set", "emission.name=bernoulli",
        match=r"obs: expected 0 or 1 on observed steps for a BernoulliEmission",
    )  # fmt: skip


def test_an_environment_whose_dependency_is_missing_is_refused(capsys, root):
    refused(
        capsys,
        root,
        "collect",
        "--env",
        "LunarLander-v3",
        "--out",
        root / "ll",
        match=r"env_id: .*LunarLander-v3.*Box2D",
    )
    refused(
        capsys,
        root,
        "train",
        "--env",
        "HalfCheetah-v5",
        "--out",
        root / "hc",
        match=r"env_id: .*HalfCheetah-v5.*(mujoco|MuJoCo)",
    )
    refused(
        capsys, root, "collect", "--env", "phys2d/CartPole-v1", "--out", root / "jx", match=r"env_id: .*jax"
    )


# ---------------------------------------------------------------- 3, 5, 9: values in specs


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lr=.nan", r"optim.lr: expected a (finite )?number.*, got nan"),
        ("optim.lr=-1", r"optim.lr: expected a finite number > 0, got -1"),
        ("optim.lr=0", r"optim.lr: expected a finite number > 0, got 0"),
        ("optim.clip_norm=-1", r"optim.clip_norm: expected a finite number > 0"),
        ("optim.lrd=-0.5", r"optim.lrd: expected a number in \(0, 1\]"),
        ("optim.momentum=0.9", r"optim.momentum: ClippedAdam takes no keyword 'momentum'"),
        ("train.num_steps=0", r"train.num_steps: expected an int (>= 1|in \[1,)"),
        ("train.num_steps=0.9", r"train.num_steps: expected an int"),
        ("train.batch_size=0", r"train.batch_size: expected an int (>= 1|in \[1,)"),
        ("latent_dim=1000000000", r"latent_dim: expected an int in \[1, 65536\], got 1000000000"),
        ("transition.hidden=[60000, 60000]", r"spec: .*parameters.*memory"),
    ],
)
def test_a_spec_value_that_makes_no_sense_is_refused_before_writing(capsys, root, good, override, match):
    refused(
        capsys,
        root,
        "train",
        "--data",
        good["data"],
        *TRAIN[2:],
        "--out",
        root / "run",
        "--overwrite",
        "--set",
        override,
        match=match,
    )  # fmt: skip (TRAIN[2:]: no --steps, which would win over train.num_steps)


def test_1e_minus_4_is_a_learning_rate(tmp_path, good, capsys):
    """YAML 1.1 reads 1e-4 as a string; the spec reader follows YAML 1.2 and types it."""
    for i, value in enumerate(("1e-4", "1.0e-4")):
        out = tmp_path / f"run{i}"
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(good["data"]),
                    *TRAIN,
                    "--no-evaluate",
                    "--out",
                    str(out),
                    "--set",
                    f"optim.lr={value}",
                ]
            )
            == 0
        )
        spec = torch.load(out / "model.ckpt", weights_only=True)["extra"]["run"]["architecture"]["spec"]
        assert spec["optim"]["lr"] == 1e-4 and isinstance(spec["optim"]["lr"], float)
    capsys.readouterr()


@pytest.mark.parametrize(
    "text, match",
    [
        ("latent_dim: [1, 2\n", r"--config: .*bad.yaml: expected valid YAML"),
        ("!!python/object/apply:os.system ['touch pwned']\n", r"--config: .*bad.yaml: .*python/object/apply"),
        ("- a\n- b\n", r"bad.yaml: expected a mapping"),
        ("latent_dim: 4\nbogus: 1\n", r"spec: unknown key 'bogus'"),
    ],
)
def test_a_bad_config_file_is_refused_before_writing(capsys, root, good, text, match):
    path = root / "inputs" / "bad.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    refused(
        capsys,
        root,
        "train",
        "--data",
        good["data"],
        *TRAIN,
        "--out",
        root / "new",
        "--config",
        path,
        match=match,
    )
    assert not (root / "pwned").exists() and not Path("pwned").exists()


def test_a_config_that_is_a_directory_is_refused(capsys, root, good):
    refused(capsys, root, "train", "--data", good["data"], *TRAIN, "--out", root / "new", "--config", root / "run",
            match=r"--config: .*run: expected a YAML spec file, got a directory")  # fmt: skip


# ---------------------------------------------------------------- 8, 11: checkpoints that load safely but are wrong


def _tamper(root: Path, change) -> None:
    ckpt = root / "run" / "model.ckpt"
    state = torch.load(ckpt, weights_only=True)
    change(state["extra"]["run"])
    torch.save(state, ckpt)
    (root / "run" / "run.json").unlink()  # as if written before manifests: the contents are the only check


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda info: info["architecture"].update(extra_key=1),
            r"expected architecture keys .* got .*extra_key",
        ),
        (
            lambda info: info["normalizer"].update(obs_loc=torch.zeros(5)),
            r"normalizer.obs_loc: expected a float tensor of shape \(3,\), got \(5,\)",
        ),
        (
            lambda info: info["architecture"]["spec"].update(latent_dim=10**9),
            r"latent_dim: expected an int in \[1, 65536\], got 1000000000",
        ),
        (lambda info: info["architecture"].update(env_id="/etc"), r"env_id: expected a gymnasium id"),
        (
            lambda info: info["architecture"].update(obs_dim=-3),
            r"obs_dim: expected an int in \[1, 65536\], got -3",
        ),
        (lambda info: info.pop("seed"), r"missing or malformed 'seed'"),
    ],
)
@pytest.mark.parametrize("command", ["evaluate", "imagine"])
def test_a_checkpoint_with_wrong_contents_is_refused(capsys, root, change, match, command):
    _tamper(root, change)
    refused(
        capsys, root, command, "--run", root / "run", *(EVAL if command == "evaluate" else []), match=match
    )


def test_a_pickled_checkpoint_is_refused_without_torchs_unsafe_advice(capsys, root):
    ckpt = root / "run" / "model.ckpt"
    torch.save({"format": "pyro_worldmodel.checkpoint/1", "x": Episodes}, ckpt)  # a class: needs unpickling
    (root / "run" / "run.json").unlink()
    line = refused(
        capsys, root, "evaluate", "--run", root / "run", *EVAL, match=r"holds objects other than tensors"
    )
    assert "weights_only" not in line


# ---------------------------------------------------------------- 12: replacing a finished run, devices, sizes


def test_training_into_a_finished_run_needs_overwrite(capsys, root, good):
    refused(capsys, root, "train", "--data", good["data"], *TRAIN, "--out", root / "run",
            match=r"out: .*run already holds a trained run \(.*model.ckpt.*\); pass --overwrite")  # fmt: skip
    refused(
        capsys, root, "collect", "--episodes", 2, "--out", root / "run", match=r"already holds a trained run"
    )


def test_a_device_this_machine_lacks_exits_2(capsys, root, good):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:  # argparse: exit 2 before anything runs
        main(["train", "--data", str(good["data"]), "--device", "cuda", "--out", str(root / "new")])
    assert e.value.code == 2
    assert "device: expected a device this machine has, got 'cuda'" in capsys.readouterr().err
    assert not (root / "new").exists()


def test_sizes_that_cannot_be_allocated_exit_2(capsys, root):
    refused(capsys, root, "evaluate", "--run", root / "run", *EVAL[:4], "--num-samples", 10**12,
            match=r"num_samples: 1000000000000 draws for each of \d+ windows at once, of 8 steps, need about \d+ GiB")  # fmt: skip


def test_a_divergence_before_the_first_checkpoint_exits_2_and_keeps_the_run(capsys, root, good):
    """--lr 1e6: the parameters reach about 1e6 after one update and the next loss is not
    finite, before any checkpoint. The finished run in the directory stays, nothing is
    committed, and the message says no checkpoint was written (tests/test_faults.py has a
    divergence after checkpoints)."""
    before = snapshot(root / "run")
    argv = ["train", "--data", good["data"], *TRAIN, "--lr", "1e6", "--out", root / "run", "--overwrite"]
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"training diverged at step 1: the loss is (nan|inf|not finite)", err), err
    assert "no checkpoint was written before it" in err
    after = snapshot(root / "run")
    assert {k: v for k, v in after.items() if not k.startswith((".staging", ".lock"))} == {
        k: v for k, v in before.items() if not k.startswith(".lock")
    }
    assert not (root / "run" / ".staging" / "train" / "model.ckpt").exists()


def test_a_stale_temporary_is_removed_by_the_next_writer(root, capsys):
    leftover = root / "run" / ".metrics.json.somehost.999999.x.tmp"
    import socket

    leftover = root / "run" / f".metrics.json.{socket.gethostname()}.999999999.abc.tmp"
    leftover.write_bytes(b"")
    assert main(["evaluate", "--run", str(root / "run"), *EVAL]) == 0
    capsys.readouterr()
    assert not leftover.exists()


@pytest.mark.parametrize(
    "estimators, match",
    [
        ("[{name: RenyiELBO, alpha: 1}]", r"alpha"),
        ("[{name: Trace_ELBO, num_particles: 0}]", r"num_particles: expected an int"),
        ("[{name: Trace_ELBO, num_particles: 2.5}]", r"num_particles: expected an int"),
    ],
)
def test_compare_refuses_estimator_values_that_make_no_sense(capsys, root, good, estimators, match):
    refused(capsys, root, "compare", "--data", good["data"], "--smoke", "--out", root / "cmp",
            "--estimators", estimators, match=match)  # fmt: skip


LOOP = [
    *"--env CartPole-v1 --iterations 2 --seed-episodes 1 --train-steps 4 --batch-size 8 --window 10".split(),
    *"--eval-episodes 1 --context 4 --set planner.candidates=16 --set planner.top_k=4".split(),
    *"--set planner.horizon=3 --set planner.iterations=1".split(),
]


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loop") / "loop"
    assert main(["loop", *LOOP, "--out", str(out)]) == 0
    return out


def test_a_loop_is_not_replaced_or_resumed_with_other_settings(capsys, tmp_path, loop_run):
    capsys.readouterr()
    shutil.copytree(loop_run, tmp_path / "loop")
    refused(capsys, tmp_path, "loop", *LOOP, "--out", tmp_path / "loop",
            match=r"out: .*loop already holds a loop .*pass --overwrite")  # fmt: skip
    more = [*LOOP[: LOOP.index("--iterations")], "--iterations", "3", *LOOP[LOOP.index("--iterations") + 2 :]]
    # with --resume the lock is taken first (the settings are in the checkpoint): only .lock may change
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.endswith(".lock")}
    assert main(["loop", *more, "--out", str(tmp_path / "loop"), "--resume", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "resume: the loop in" in err and "iterations 2 vs 3" in err and "seed 0 vs 1" in err
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.endswith(".lock")} == before


def test_a_finished_loop_resumes_to_itself(capsys, tmp_path, loop_run):
    shutil.copytree(loop_run, tmp_path / "loop")
    before = snapshot(tmp_path / "loop")
    assert main(["loop", *LOOP, "--out", str(tmp_path / "loop"), "--resume"]) == 0
    assert "is complete (2 iterations); nothing to resume" in capsys.readouterr().out
    after = snapshot(tmp_path / "loop")
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }
