"""The model-based loop (loop.py): model_based_loop, its observation normaliser, and the
CLI's loop command."""

import json

import pytest
import torch

from pyro_worldmodel import Spec
from pyro_worldmodel.cli import main
from pyro_worldmodel.data import collect, observation_scale_floor
from pyro_worldmodel.loop import model_based_loop


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


def test_the_loop_runs_with_a_reward_head_only(tmp_path):
    spec = Spec.preset("loop").with_overrides(
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


def test_a_loop_writes_into_a_folder_of_its_own_beside_a_trained_run(tmp_path, monkeypatch, capsys):
    """By default runs/<env>/loop/: a loop after a train on the same environment leaves the run."""
    monkeypatch.chdir(tmp_path)
    tiny = "--env CartPole-v1 --iterations 1 --seed-episodes 1 --train-steps 2 --window 10 --eval-episodes 1"
    run = tmp_path / "runs" / "CartPole-v1"
    run.mkdir(parents=True)
    (run / "model.ckpt").write_bytes(b"a trained run's checkpoint")
    assert (
        main(
            [
                *"loop".split(),
                *tiny.split(),
                "--set",
                "planner.candidates=8",
                "--set",
                "planner.horizon=2",
                "--set",
                "planner.top_k=2",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert json.loads((run / "loop" / "loop.json").read_text())["env_id"] == "CartPole-v1"
    assert (run / "model.ckpt").read_bytes() == b"a trained run's checkpoint"
