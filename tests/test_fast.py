"""The batched path computes exactly what Pyro's traces compute: value, gradient and draws."""

import itertools

import pyro
import pytest
import torch

from pyro_worldmodel import ActionSpace, fit
from pyro_worldmodel.config import build
from pyro_worldmodel.infer.batched import _guide_draws
from pyro_worldmodel.infer.elbos import FreeNats_ELBO, KLAnnealing_ELBO, KLBalancing_ELBO, TraceMeanField_ELBO

BOX, DISCRETE = ActionSpace.box(2), ActionSpace.discrete(3)


def data(space, B=5, T=7, X=3, binary=False):
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(B, T, X, generator=g)
    if binary:
        obs = (obs > 0).float()
    if space.kind == "box":
        actions = torch.randn(B, T, space.dim, generator=g)
    else:
        actions = torch.randint(space.dim, (B, T), generator=g)
    mask = torch.arange(T) < torch.tensor([7, 7, 5, 3, 1])[:B, None]  # episodes of every length
    return obs, actions, mask


def small_spec(transition, emission, guide):
    sizes = {"linear_gaussian": {}}
    guide_sizes = {"mean_field": {"hidden": [8]}}
    return {
        "latent_dim": 3,
        "transition": {"name": transition, **sizes.get(transition, {"hidden": [8]})},
        "emission": {"name": emission, **sizes.get(emission, {"hidden": [8]})},
        "guide": {"name": guide, **guide_sizes.get(guide, {"rnn_dim": 8, "hidden": [8]})},
    }


def both_paths(b, make_elbo, args, seed=11):
    """(loss, grads, path) from the batched path and from Pyro's traces, on the same seed."""
    out = []
    for fast_path in (True, False):
        elbo = make_elbo(fast_path)
        params = [*b.model.parameters(), *b.guide.parameters()]
        for p in params:
            p.grad = None
        pyro.set_rng_seed(seed)
        loss = elbo.differentiable_loss(b.model.model, b.guide, *args)
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        out.append((loss.item(), grads, elbo.path))
    return out


def assert_same(fast, slow):
    (loss_f, grads_f, path_f), (loss_s, grads_s, path_s) = fast, slow
    assert path_f == "batched" and path_s == "pyro traces: fast_path=False"
    assert loss_f == pytest.approx(loss_s, rel=1e-5)
    for g_f, g_s in zip(grads_f, grads_s):
        torch.testing.assert_close(g_f, g_s, rtol=1e-4, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads_f)


@pytest.mark.parametrize(
    "transition, emission, guide",
    list(
        itertools.product(
            ["gaussian_mlp", "linear_gaussian", "gated"],
            ["gaussian_mlp", "linear_gaussian", "student_t", "bernoulli"],
            ["filter", "smoothing", "mean_field"],
        )
    ),
)
@pytest.mark.parametrize("space", [BOX, DISCRETE], ids=["box", "discrete"])
def test_every_supported_combination_gives_the_traces_loss_and_gradient(transition, emission, guide, space):
    b = build(small_spec(transition, emission, guide), 3, space)
    args = data(space, binary=emission == "bernoulli")
    fast, slow = both_paths(
        b, lambda fast_path: TraceMeanField_ELBO(max_plate_nesting=2, fast_path=fast_path), args
    )
    assert_same(fast, slow)


@pytest.mark.parametrize(
    "make",
    [
        lambda f: KLAnnealing_ELBO(beta=0.5, max_plate_nesting=2, fast_path=f),
        lambda f: FreeNats_ELBO(free_nats=0.3, max_plate_nesting=2, fast_path=f),
        lambda f: KLBalancing_ELBO(alpha=0.3, max_plate_nesting=2, fast_path=f),
        lambda f: TraceMeanField_ELBO(num_particles=3, max_plate_nesting=2, fast_path=f),
    ],
    ids=["annealing", "free_nats", "balancing", "three_particles"],
)
@pytest.mark.parametrize("guide", ["filter", "smoothing", "mean_field"])
def test_the_world_model_objectives_and_particles_agree_on_both_paths(make, guide):
    b = build(small_spec("gaussian_mlp", "gaussian_mlp", guide), 3, BOX)
    assert_same(*both_paths(b, make, data(BOX)))


def test_the_draws_are_the_guides_own():
    """Same seed, same z: the batched path consumes the random stream as the guide's pyro.sample calls do."""
    b = build(small_spec("gaussian_mlp", "gaussian_mlp", "filter"), 3, BOX)
    obs, actions, mask = data(BOX)
    pyro.set_rng_seed(4)
    expected = b.guide(obs, actions, mask)  # (B, T, Z), the guide run as a Pyro program

    obs, actions, mask = b.guide.check_inputs(obs, actions, mask)  # padding zeroed, as the guide does
    pyro.set_rng_seed(4)
    z, _ = _guide_draws(b.guide, obs, b.model.action_space.features(actions, obs.dtype), mask)
    torch.testing.assert_close(
        z, expected, rtol=1e-6, atol=1e-6
    )  # addcmul may round the last bit differently


@pytest.mark.parametrize(
    "spec, call, reason",
    [
        (
            {"transition": {"name": "rssm", "hidden": [8], "deter_dim": 4}},
            None,
            "the transition is a RSSMTransition",
        ),
        (
            {"transition": {"name": "student_t", "hidden": [8]}},
            None,
            "the transition is a StudentTMLPTransition",
        ),
        (
            {"guide": {"name": "iaf_filter", "rnn_dim": 8, "iaf_hidden": [8]}},
            None,
            "the guide is a IAFFilterGuide",
        ),
        ({}, "scaled", "a Pyro handler is active"),
        ({}, "vectorized", "particles are vectorised"),
    ],
)
def test_anything_else_takes_pyros_traces_and_says_why(spec, call, reason):
    b = build({"latent_dim": 3, **spec}, 3, BOX)
    obs, actions, mask = data(BOX)
    elbo = TraceMeanField_ELBO(
        max_plate_nesting=2, monte_carlo_kl="allow", num_particles=2 if call == "vectorized" else 1,
        vectorize_particles=call == "vectorized",
    )  # fmt: skip
    if call == "scaled":
        with pyro.poutine.scale(scale=0.5):
            elbo.loss(b.model.model, b.guide, obs, actions, mask)
    else:
        elbo.loss(b.model.model, b.guide, obs, actions, mask)
    assert elbo.path == f"pyro traces: {reason}"


def test_fit_takes_the_batched_path_by_default_and_the_traces_when_one_side_is_frozen():
    b = build({"latent_dim": 3, "guide": {"name": "filter", "rnn_dim": 8}}, 3, BOX)
    obs, actions, mask = data(BOX)
    elbo = TraceMeanField_ELBO(max_plate_nesting=2)
    history = fit(b.model, b.guide, obs, actions, mask, num_steps=3, elbo=elbo, progress=False)
    assert elbo.path == "batched" and all(torch.isfinite(torch.tensor(history.loss)))
    fit(b.model, b.guide, obs, actions, mask, num_steps=1, elbo=elbo, train="guide", progress=False)
    assert elbo.path == "pyro traces: the model is not WorldModel.model"


def test_fast_path_must_be_a_bool():
    with pytest.raises(ValueError, match=r"fast_path: expected True or False, got 'yes'"):
        TraceMeanField_ELBO(fast_path="yes")


def test_mask_as_a_keyword_takes_the_batched_path_and_gives_the_same_loss():
    b = build(small_spec("gaussian_mlp", "gaussian_mlp", "filter"), 3, BOX)
    obs, actions, mask = data(BOX)
    losses, paths = [], []
    for fast_path in (True, False):
        elbo = TraceMeanField_ELBO(max_plate_nesting=2, fast_path=fast_path)
        pyro.set_rng_seed(2)
        losses.append(elbo.loss(b.model.model, b.guide, obs, actions, mask=mask))
        paths.append(elbo.path)
    assert paths == ["batched", "pyro traces: fast_path=False"]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_subclasses_and_user_components_take_the_traces():
    """The batched path knows only the built-in classes: a subclass may compute something else."""
    from pyro_worldmodel import WorldModel
    from pyro_worldmodel.model.components import Combiner, GaussianMLPEmission

    class Doubled(WorldModel):
        @staticmethod
        def _features(z_t, h_t):
            return 2 * z_t

    class MyCombiner(Combiner):
        pass

    class MyEmission(GaussianMLPEmission):
        pass

    class MyELBO(TraceMeanField_ELBO):
        def _shape_kl(self, name, kl, q, p, mask, estimator):
            return kl

    obs, actions, mask = data(BOX)
    b = build(small_spec("gaussian_mlp", "gaussian_mlp", "filter"), 3, BOX)
    m = b.model
    cases = {
        "the model is not WorldModel.model": (Doubled(m.init, m.transition, m.emission, m.policy), b.guide),
        "the emission is a MyEmission": (
            WorldModel(m.init, m.transition, MyEmission(3, 3, (8,)), m.policy),
            b.guide,
        ),
    }
    guide = build(small_spec("gaussian_mlp", "gaussian_mlp", "filter"), 3, BOX).guide
    guide.combiner.__class__ = MyCombiner
    cases["the guide's combiner is a MyCombiner"] = (m, guide)
    for reason, (model, g) in cases.items():
        elbo = TraceMeanField_ELBO(max_plate_nesting=2)
        elbo.loss(model.model, g, obs, actions, mask)
        assert elbo.path == f"pyro traces: {reason}"
    mine = MyELBO(max_plate_nesting=2)
    mine.loss(m.model, b.guide, obs, actions, mask)
    assert mine.path.startswith("pyro traces: MyELBO overrides _shape_kl")


def test_the_batched_path_checks_values_while_validation_is_on():
    b = build(small_spec("gaussian_mlp", "gaussian_mlp", "filter"), 3, DISCRETE)
    obs, actions, mask = data(DISCRETE)
    elbo = TraceMeanField_ELBO(max_plate_nesting=2)
    bad_obs = obs.clone()
    bad_obs[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"obs: expected finite values where mask is True"):
        elbo.loss(b.model.model, b.guide, bad_obs, actions, mask)
    bad_actions = actions.clone()
    bad_actions[1, 2] = 7
    with pytest.raises(
        ValueError, match=r"actions: expected integers in \[0, 3\), got 7 at episode 1, step 2"
    ):
        elbo.loss(b.model.model, b.guide, obs, bad_actions, mask)
    assert elbo.path == "batched"


def test_loss_and_grads_without_gradients_returns_the_loss_as_pyro_does():
    b = build(small_spec("gaussian_mlp", "gaussian_mlp", "filter"), 3, BOX)
    elbo = TraceMeanField_ELBO(max_plate_nesting=2)
    with torch.no_grad():
        loss = elbo.loss_and_grads(b.model.model, b.guide, *data(BOX))
    assert elbo.path == "batched" and isinstance(loss, float) and loss == loss
