"""The shared workflow: each rule it holds, against the rule written out by hand."""

import math

import pyro
import pytest
import torch

from pyro_worldmodel import Spec, workflow
from pyro_worldmodel.cli import main
from pyro_worldmodel.data import Episodes, collect
from pyro_worldmodel.io import RunDirectory


@pytest.fixture(scope="module")
def episodes() -> Episodes:
    return collect("Pendulum-v1", 6, seed=0, num_envs=2, max_episode_steps=40, progress=False)


def test_prepare_fits_the_normaliser_on_the_training_split_alone_and_attaches_it_everywhere(episodes):
    prepared = workflow.prepare(episodes, val_fraction=0.2, seed=3, window=10)
    train, val = episodes.split(0.2, seed=3)
    expected = train.fit_normalizer().normalizer
    for part in (prepared.train, prepared.val, prepared.episodes):
        assert torch.equal(part.normalizer.obs_loc, expected.obs_loc)
        assert torch.equal(part.normalizer.obs_scale, expected.obs_scale)
    assert torch.equal(prepared.val.obs, val.obs) and torch.equal(prepared.train.obs, train.obs)  # real units
    assert not torch.equal(
        expected.obs_loc, episodes.fit_normalizer().normalizer.obs_loc
    )  # not all episodes'


def test_the_training_windows_are_the_windows_of_the_training_split_in_model_units(episodes):
    prepared = workflow.prepare(episodes, val_fraction=0.2, seed=3, window=10)
    train = prepared.train
    num = 4 * int(train.lengths.sum()) // 10  # each step drawn about four times
    assert prepared.obs.shape == (num, 10, 3)
    obs, actions, mask = train.windows(10, num, generator=torch.Generator().manual_seed(3))  # real units
    n = train.normalizer
    torch.testing.assert_close(prepared.obs[mask], n.obs(obs)[mask])
    torch.testing.assert_close(prepared.actions[mask], n.actions(actions)[mask])
    assert torch.equal(prepared.mask, mask)
    capped = workflow.prepare(episodes, val_fraction=0.2, seed=3, window=10, draws=7)
    assert capped.obs.shape[0] == 7
    whole = workflow.prepare(episodes, val_fraction=0.2, seed=3, window=0)
    assert whole.obs.shape == train.obs.shape  # whole episodes


def test_prepare_without_a_split_trains_on_every_episode(episodes):
    prepared = workflow.prepare(episodes, val_fraction=None, window=10)
    assert prepared.val is None and len(prepared.train) == len(episodes)


def test_the_learning_rate_decays_to_its_final_fraction_over_the_run():
    spec = workflow.training_spec(Spec().with_overrides({"train.num_steps": 200}))
    assert spec.optim["lrd"] ** 200 == pytest.approx(workflow.DEFAULT_FINAL_LR)
    spec = workflow.training_spec(Spec().with_overrides({"train.num_steps": 50}), final_lr=0.5)
    assert spec.optim["lrd"] ** 50 == pytest.approx(0.5)
    kept = Spec().with_overrides({"optim.lrd": 0.9})
    assert workflow.training_spec(kept).optim["lrd"] == 0.9  # a spec's own schedule stays
    sgd = Spec().with_overrides({"optim": {"name": "SGD", "lr": 0.1}})
    assert "lrd" not in workflow.training_spec(sgd).optim  # only ClippedAdam has one
    with pytest.raises(ValueError, match=r"final_lr: expected a number in \(0, 1\], got 2"):
        workflow.training_spec(Spec(), final_lr=2)


def test_the_fitted_learning_rate_is_the_schedules(episodes):
    """Measured on the optimiser itself: after N steps the rate is its start times lrd^N."""
    prepared = workflow.prepare(episodes, window=10)
    spec = workflow.training_spec(Spec.preset("smoke").with_overrides({"train.num_steps": 5}), final_lr=0.1)
    built = workflow.build_model(spec, prepared)
    workflow.train(prepared, built, progress=False)
    rates = [group["lr"] for opt in built.optim.optim_objs.values() for group in opt.param_groups]
    assert rates and all(r == pytest.approx(spec.optim["lr"] * spec.optim["lrd"] ** 5) for r in rates)
    assert rates[0] == pytest.approx(spec.optim["lr"] * 0.1 ** (5 / 5))  # the final fraction, reached


def test_training_settings_are_the_specs_over_the_defaults():
    settings = workflow.training_settings(Spec())
    assert settings == {"num_steps": 1500, "batch_size": 32, "terms_every": 30, "checkpoint_every": 150}
    settings = workflow.training_settings(
        Spec().with_overrides({"train.num_steps": 40, "train.batch_size": 4})
    )
    assert settings == {"num_steps": 40, "batch_size": 4, "terms_every": 1, "checkpoint_every": 4}


def test_start_warm_starts_where_it_can_and_says_why_not(episodes):
    prepared = workflow.prepare(episodes, window=10)
    pyro.set_rng_seed(0)
    built = workflow.build_model(Spec(), prepared)
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    assert workflow.start(built.model, built.guide, prepared) == "linear"
    assert any(not torch.equal(v, before[k]) for k, v in built.model.state_dict().items())
    linear = workflow.build_model(Spec(transition={"name": "linear_gaussian"}), prepared)
    how = workflow.start(linear.model, linear.guide, prepared)
    assert how.startswith("random (model.transition: expected a component with init_linear()")
    with pytest.raises(ValueError, match=r"init: model.transition: expected a component with init_linear"):
        workflow.start(linear.model, linear.guide, prepared, "linear")
    kept = {k: v.clone() for k, v in linear.model.state_dict().items()}
    assert workflow.start(linear.model, linear.guide, prepared, "random") == "random"
    assert all(torch.equal(v, kept[k]) for k, v in linear.model.state_dict().items())


def test_the_command_line_is_the_workflow(episodes, tmp_path, capsys):
    """`pyro-worldmodel train` and train_run with the same settings write the same metrics."""
    data = tmp_path / "episodes.npz"
    episodes.save(data)
    args = "--steps 8 --window 10 --context 3 --horizon 5 --num-samples 4 --iwae-particles 3 --max-windows 10"
    assert main(["train", "--data", str(data), *args.split(), "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    spec = workflow.training_spec(Spec().with_overrides({"train.num_steps": 8}))
    settings = workflow.TrainSettings(
        window=10,
        evaluate=workflow.EvalSettings(context=3, horizon=5, num_samples=4, iwae_particles=3, max_windows=10),
    )
    pyro.set_rng_seed(0)
    metrics = workflow.train_run(
        Episodes.load(data), spec, tmp_path / "python", settings, progress=False, log=lambda *_: None
    )
    assert (tmp_path / "python" / "metrics.json").read_bytes() == (
        tmp_path / "cli" / "metrics.json"
    ).read_bytes()
    assert math.isfinite(metrics["heldout"]["elbo"])


def test_a_train_and_a_loop_write_one_run_format(tmp_path, capsys):
    """load_run reads either: the model, its units and the split it trained on."""
    main(
        [
            "collect",
            "--env",
            "CartPole-v1",
            "--episodes",
            "6",
            "--max-episode-steps",
            "30",
            "--out",
            str(tmp_path / "d"),
        ]
    )
    main(["train", "--data", str(tmp_path / "d" / "episodes.npz"), "--steps", "4", "--window", "10", "--no-evaluate",
          "--out", str(tmp_path / "train")])  # fmt: skip
    loop = "--env CartPole-v1 --iterations 1 --seed-episodes 2 --train-steps 2 --window 10 --eval-episodes 1"
    main(["loop", *loop.split(), "--set", "planner.candidates=8", "--set", "planner.top_k=2",
          "--set", "planner.horizon=2", "--out", str(tmp_path / "loop")])  # fmt: skip
    capsys.readouterr()
    trained, looped = workflow.load_run(tmp_path / "train"), workflow.load_run(tmp_path / "loop")
    assert trained.info["format"] == looped.info["format"] == workflow.RUN_FORMAT
    assert trained.info["val_fraction"] == 0.2 and looped.info["val_fraction"] is None
    data = Episodes.load(RunDirectory(tmp_path / "loop").file("episodes.npz"))
    train, val = looped.splits(data)
    assert val is None and len(train) == len(data)  # the loop trained on every episode
    assert torch.equal(looped.normalizer.obs_loc, data.normalizer.obs_loc)
    assert looped.model.reward is not None and trained.model.reward is None
    with pytest.raises(ValueError, match=r"trained on all its episodes .* evaluate it on held-out data"):
        workflow.evaluate_run(tmp_path / "loop", workflow.EvalSettings(context=3, horizon=3))


def test_binary_observations_are_modelled_as_they_are(episodes, tmp_path, capsys):
    """A Bernoulli emission needs 0s and 1s: the workflow leaves them unscaled, so
    `--preset binary` trains on binary data from the command line."""
    from dataclasses import replace

    binary = replace(episodes, obs=(episodes.obs > 0).float(), final_obs=(episodes.final_obs > 0).float())
    data = tmp_path / "binary.npz"
    binary.save(data)
    args = "--steps 4 --window 10 --context 3 --horizon 5 --num-samples 4 --iwae-particles 3 --max-windows 10"
    assert (
        main(
            ["train", "--data", str(data), "--preset", "binary", *args.split(), "--out", str(tmp_path / "r")]
        )
        == 0
    )
    capsys.readouterr()
    run = workflow.load_run(tmp_path / "r")
    assert torch.equal(run.normalizer.obs_loc, torch.zeros(3)) and torch.equal(
        run.normalizer.obs_scale, torch.ones(3)
    )
    assert type(run.model.emission).__name__ == "BernoulliEmission"
    assert workflow.scales_observations(Spec()) and not workflow.scales_observations(Spec.preset("binary"))


def test_the_drawn_windows_are_a_random_one_the_median_and_the_10th_percentile():
    from pyro_worldmodel.evaluate import OpenLoop

    scores = [5.0, -300.0, 2.0, 7.0, 1.0, 0.5, 3.0, 4.0, -2.0, 6.0, 8.0]  # 11 windows
    ol = OpenLoop(
        context=2, horizon=3, mse={}, log_lik={}, num_windows=11, count=[11, 11, 11],
        windows=[[i, 10 * i] for i in range(11)], window_log_lik=scores,
    )  # fmt: skip
    drawn = workflow.drawn_windows(ol, seed=3)
    assert [d[0].split(",")[0] for d in drawn] == ["random", "median", "10th percentile"]
    ranked = sorted(range(11), key=scores.__getitem__)  # -300, -2, 0.5, 1, 2, 3, ...
    assert drawn[1][1:] == (ranked[5], 10 * ranked[5]) and scores[ranked[5]] == 3.0
    assert drawn[2][1:] == (ranked[1], 10 * ranked[1]) and scores[ranked[1]] == -2.0
    assert drawn == workflow.drawn_windows(ol, seed=3)  # the random one is the seed's
    assert {workflow.drawn_windows(ol, seed=s)[0][1] for s in range(20)} != {drawn[0][1]}
