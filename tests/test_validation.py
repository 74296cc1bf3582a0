"""Held-out monitoring and early stopping in fit, on a linear-Gaussian anchor of this file's
own (latent 2, observations 4, actions 1, T = 40), whose exact log-likelihood is known."""

import pyro
import pytest
import torch

from pyro_worldmodel import ActionSpace, FilterGuide, LinearGaussianSSM, elbo_terms, fit
from pyro_worldmodel.infer.validation import bound_per_step
from pyro_worldmodel.io import read_checkpoint
from pyro_worldmodel.model.guides import IAFFilterGuide

D, X, A, T = 2, 4, 1, 40


@pytest.fixture(scope="module")
def anchor():
    ssm = LinearGaussianSSM.random(D, X, A, seed=7)
    train = ssm.sample(64, T, seed=8)[:2]
    val = ssm.sample(64, T, seed=9)[:2]
    exact = {"train": ssm.log_prob(*train).mean().item(), "val": ssm.log_prob(*val).mean().item()}
    return ssm, train, val, exact


def fresh(ssm, cls=FilterGuide, **kwargs):
    pyro.clear_param_store()
    model = ssm.world_model()
    pyro.set_rng_seed(0)
    return model, cls.for_model(model, **kwargs).double()


@pytest.mark.parametrize("cls", [FilterGuide, IAFFilterGuide], ids=["batched", "traces"])
def test_the_validation_bound_is_elbo_terms_on_the_same_draws(anchor, cls):
    """The batched path (the filter) and Pyro's traces (the IAF guide) both give the ELBO that
    elbo_terms computes from the same draws; and the draws are the same at every call."""
    ssm, _, (obs, actions), _ = anchor
    model, guide = fresh(ssm, cls)
    mask = torch.ones(obs.shape[:2], dtype=torch.bool)
    ours = bound_per_step(model, guide, obs, actions, mask, num_particles=1, seed=3)
    torch.manual_seed(3)
    with torch.no_grad():
        theirs = elbo_terms(model, guide, obs, actions, mask).elbo
    assert ours == pytest.approx(theirs, rel=1e-9)
    state = torch.get_rng_state()
    again = bound_per_step(model, guide, obs, actions, mask, num_particles=1, seed=3)
    assert again == ours and torch.equal(torch.get_rng_state(), state)


def test_monitoring_changes_nothing_of_the_training(anchor):
    ssm, train, val, _ = anchor
    runs = []
    for kwargs in ({}, {"val": val, "val_every": 7}):
        model, guide = fresh(ssm)
        history = fit(
            model, guide, *train, num_steps=20, lr=3e-3, train="guide", seed=0, progress=False, **kwargs
        )
        runs.append((history, [p.detach().clone() for p in guide.parameters()]))
    (plain, p1), (watched, p2) = runs
    assert plain.loss == watched.loss and all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert [r["step"] for r in watched.validation] == [7, 14, 20] and plain.validation == []
    assert set(watched.validation[0]) == {"step", "train_elbo", "val_elbo"}


def test_early_stopping_keeps_the_best_check_and_the_held_out_gap_stays_near_the_training_gap(
    anchor, tmp_path
):
    """The filter overfits its 64 training sequences: with early stopping the run ends, the
    parameters are those of the best held-out check (their bound is that check's, on the same
    draws), the checkpoint keeps them, and the held-out gap to the exact log-likelihood is
    within 1.5 times the training gap (measured: 9.7 against 8.9 nats per sequence)."""
    ssm, train, val, exact = anchor
    model, guide = fresh(ssm)
    ckpt = tmp_path / "run.ckpt"
    history = fit(model, guide, *train, num_steps=4000, lr=3e-3, train="guide", seed=0, progress=False,
                  val=val, val_every=100, patience=5, checkpoint=ckpt, checkpoint_every=500)  # fmt: skip
    assert history.stopped_at is not None and history.stopped_at < 4000
    assert len(history.loss) == history.stopped_at
    best = max(history.validation, key=lambda r: r["val_elbo"])
    assert history.best_step == best["step"] and history.stopped_at == best["step"] + 5 * 100
    mask = torch.ones(64, T, dtype=torch.bool)
    assert bound_per_step(model, guide, *val, mask, num_particles=4) == pytest.approx(
        best["val_elbo"], rel=1e-12
    )
    saved = read_checkpoint(ckpt)
    assert saved["extra"]["best"]["step"] == best["step"]
    assert all(torch.equal(saved["guide"][k], v) for k, v in guide.state_dict().items())
    # the gaps, per sequence, with more draws
    train_gap = exact["train"] - T * bound_per_step(model, guide, *train, mask, num_particles=32)
    val_gap = exact["val"] - T * bound_per_step(model, guide, *val, mask, num_particles=32)
    assert 0 < train_gap and 0 < val_gap < 1.5 * train_gap, (train_gap, val_gap)
    # an early-stopped run is finished: resuming it trains no further
    again = fit(model, guide, *train, num_steps=4000, lr=3e-3, train="guide", seed=0, progress=False,
                val=val, val_every=100, patience=5, checkpoint=ckpt, resume=True)  # fmt: skip
    assert again.stopped_at == history.stopped_at and len(again.loss) == len(history.loss)


def test_bad_validation_settings_are_refused_by_name(anchor):
    ssm, train, val, _ = anchor
    model, guide = fresh(ssm)
    with pytest.raises(ValueError, match="patience: early stopping needs held-out data"):
        fit(model, guide, *train, num_steps=1, patience=3, progress=False)
    with pytest.raises(ValueError, match="val: expected .obs, actions.*got int"):
        fit(model, guide, *train, num_steps=1, val=3, progress=False)
    with pytest.raises(ValueError, match="val: obs: expected"):
        fit(model, guide, *train, num_steps=1, val=(val[0][..., :2], val[1]), progress=False)
    for arg, bad in (("val_every", 0), ("val_particles", 0), ("patience", 0)):
        with pytest.raises(ValueError, match=f"{arg}: expected an int >= 1, got 0"):
            fit(model, guide, *train, num_steps=1, val=val, progress=False, **{arg: bad})


def test_input_noise_is_added_in_training_mode_only_and_fit_leaves_the_guide_evaluating(anchor):
    ssm, train, val, _ = anchor
    model, guide = fresh(ssm, input_noise=0.5)
    obs = train[0][:2]
    guide.train()
    a, b = guide.read(obs), guide.read(obs)
    noise = a - obs  # the identity encoder: e(x) = x
    assert not torch.equal(a, b) and abs(noise.std().item() - 0.5) < 0.05
    guide.eval()
    assert torch.equal(guide.read(obs), obs)
    fit(model, guide, *train, num_steps=2, train="guide", progress=False)
    assert not guide.training and not model.training
    with pytest.raises(ValueError, match="input_noise: expected a finite float >= 0, got -1"):
        FilterGuide.for_model(model, input_noise=-1)


def test_a_learned_linear_gaussian_model_reads_back_as_its_system_and_exact_ml_beats_the_truth():
    """from_world_model is world_model's inverse (the same exact log-likelihood) and differentiable;
    maximum likelihood from a random start reaches a training log-likelihood above the true
    system's, as the maximiser over parameters must, and keeps stable dynamics."""
    from pyro_worldmodel.evaluate import maximum_likelihood

    truth = LinearGaussianSSM.random(1, 2, 1, seed=5)
    obs, actions, _ = truth.sample(16, 8, seed=6)
    back = LinearGaussianSSM.from_world_model(truth.world_model())
    torch.testing.assert_close(back.log_prob(obs, actions), truth.log_prob(obs, actions))
    assert back.F.requires_grad and truth.spectral_radius == pytest.approx(0.9)
    start = LinearGaussianSSM.random(1, 2, 1, seed=99).world_model()
    losses = maximum_likelihood(start, obs, actions, num_steps=150, lr=5e-2)
    learned = LinearGaussianSSM.from_world_model(start)
    assert learned.log_prob(obs, actions).mean().item() > truth.log_prob(obs, actions).mean().item()
    assert losses[-1] < losses[0] and learned.spectral_radius < 1.0
    from pyro_worldmodel import WorldModel

    with pytest.raises(ValueError, match="model: expected the linear-Gaussian parts"):
        LinearGaussianSSM.from_world_model(WorldModel.default(2, ActionSpace.box(1)))
