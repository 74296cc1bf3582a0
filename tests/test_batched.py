"""The batched path computes exactly what Pyro's traces compute: value, gradient and draws.

It calls the factor methods the Pyro programs call, so every registered
component is compared on both paths, and a factor changed in one place changes
both.
"""

import pyro
import pytest
import torch

from pyro_worldmodel import ActionSpace, WorldModel, fit
from pyro_worldmodel.config import REGISTRY, build
from pyro_worldmodel.infer.batched import guide_draws
from pyro_worldmodel.infer.elbos import FreeNats_ELBO, KLAnnealing_ELBO, KLBalancing_ELBO, TraceMeanField_ELBO
from pyro_worldmodel.model import FilterGuide

BOX, DISCRETE = ActionSpace.box(2), ActionSpace.discrete(3)
BOUNDED = ActionSpace.box(2, -1.0, 1.0)


def data(space, B=5, T=7, X=3, binary=False):
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(B, T, X, generator=g)
    if binary:
        obs = (obs > 0).float()
    if space.kind == "box":
        actions = torch.randn(B, T, space.dim, generator=g)
        if space.low is not None:
            actions = actions.tanh() * 0.9
    else:
        actions = torch.randint(space.dim, (B, T), generator=g)
    mask = torch.arange(T) < torch.tensor([7, 7, 5, 3, 1])[:B, None]  # episodes of every length
    return obs, actions, mask


def small_spec(transition="gaussian_mlp", emission="gaussian_mlp", guide="filter", **parts):
    sizes = {"linear_gaussian": {}}
    guide_sizes = {"mean_field": {"hidden": [8]}, "iaf_filter": {"rnn_dim": 8, "iaf_hidden": [8]}}
    transition_sizes = {"rssm": {"hidden": [8], "deter_dim": 4}}
    return {
        "latent_dim": 3,
        "transition": {
            "name": transition,
            **transition_sizes.get(transition, sizes.get(transition, {"hidden": [8]})),
        },
        "emission": {"name": emission, **sizes.get(emission, {"hidden": [8]})},
        "guide": {"name": guide, **guide_sizes.get(guide, {"rnn_dim": 8, "hidden": [8]})},
        **parts,
    }


def both_paths(b, make_elbo, args, seed=11, targets=None):
    """(loss, grads, path) from the batched path and from Pyro's traces, on the same seed."""
    out = []
    for batched in (True, False):
        elbo = make_elbo(batched)
        params = [*b.model.parameters(), *b.guide.parameters()]
        for p in params:
            p.grad = None
        pyro.set_rng_seed(seed)
        loss = elbo.differentiable_loss(b.model.model, b.guide, *args, **(targets or {}))
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        out.append((loss.item(), grads, elbo.path))
    return out


def assert_same(fast, slow):
    (loss_f, grads_f, path_f), (loss_s, grads_s, path_s) = fast, slow
    assert path_f == "batched" and path_s == "pyro traces: batched=False"
    assert loss_f == pytest.approx(loss_s, rel=1e-5)
    for g_f, g_s in zip(grads_f, grads_s):
        torch.testing.assert_close(g_f, g_s, rtol=1e-4, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads_f)


def tmf(batched):
    return TraceMeanField_ELBO(max_plate_nesting=2, batched=batched, monte_carlo_kl="allow")


# Every registered part in its slot, the others at their defaults: the space and data it needs,
# and why it takes Pyro's traces, where it does.
NOT_BATCHED = {
    ("transition", "student_t"): "the StudentTMLPTransition gives a StudentT, not a diagonal Normal",
    ("guide", "iaf_filter"): "IAFFilterGuide's steps are not the diagonal Normals of its step_params",
}
SPACES = {("policy", "categorical"): DISCRETE, ("policy", "tanh_normal"): BOUNDED}
# The parts of a categorical state are compared within one: a categorical init, transition and guide.
CATEGORICAL = {
    "init": {"name": "categorical", "classes": 3},
    "transition": {"name": "categorical_mlp", "hidden": [8]},
    "guide": {"name": "categorical_filter", "rnn_dim": 8, "hidden": [8]},
}
CATEGORICAL_SIZES = {"categorical_rssm": {"hidden": [8], "deter_dim": 4}}
for _slot, _name in (
    ("init", "categorical"),
    ("transition", "categorical_mlp"),
    ("transition", "categorical_rssm"),
    ("guide", "categorical_filter"),
):
    NOT_BATCHED[(_slot, _name)] = (
        "CategoricalFilterGuide's steps are not the diagonal Normals of its step_params"
    )


# Parts that read frames get 8×8 grayscale ones, as pixel values in a uint8 tensor.
IMAGE = (1, 8, 8)
IMAGE_SIZES = {"depth": 2, "layers": 2}


def frames_data(space):
    obs, actions, mask = data(space, X=64)
    pixels = torch.randint(256, obs.shape, generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    return pixels, actions, mask


def registered_parts():
    out = []
    for slot in ("init", "transition", "emission", "policy", "guide", "encoder", "reward", "continuation"):
        for name in sorted(REGISTRY[slot]):
            out.append((slot, name))
    return out


@pytest.mark.parametrize("slot, name", registered_parts(), ids=lambda x: str(x))
def test_every_registered_part_gives_the_traces_loss_and_gradient(slot, name):
    space = SPACES.get((slot, name), BOX)
    spec = small_spec()
    part = {"name": name}
    if slot in ("transition", "emission", "guide"):
        part = small_spec(
            **{"transition": "gaussian_mlp", "emission": "gaussian_mlp", "guide": "filter", slot: name}
        )[slot]
    elif slot in ("policy", "reward", "continuation") and name not in ("linear_gaussian",):
        part = {"name": name, "hidden": [8]} if name != "auto" else {"name": name}
    frames = getattr(REGISTRY[slot][name], "observes", None) == "frames"
    if frames:
        part = {"name": name, **IMAGE_SIZES}
    if (slot, name) in NOT_BATCHED and "Categorical" in NOT_BATCHED[(slot, name)]:
        spec.update(CATEGORICAL)
        part = {**CATEGORICAL.get(slot, {}), "name": name, **CATEGORICAL_SIZES.get(name, {})}
    spec[slot] = part
    if frames:
        b = build(spec, 64, space, image_shape=IMAGE)
        obs, actions, mask = frames_data(space)
    else:
        b = build(spec, 3, space)
        obs, actions, mask = data(space, binary=(slot, name) == ("emission", "bernoulli"))
    g = torch.Generator().manual_seed(3)
    targets = {}
    if slot == "reward":
        targets["rewards"] = torch.randn(mask.shape, generator=g)
    if slot == "continuation":
        targets["continues"] = (torch.rand(mask.shape, generator=g) > 0.2).float()
    fast, slow = both_paths(b, tmf, (obs, actions, mask), targets=targets)
    reason = NOT_BATCHED.get((slot, name))
    if reason is None:
        assert_same(fast, slow)
    else:
        assert fast[2] == f"pyro traces: {reason}"
        assert fast[0] == pytest.approx(slow[0], rel=1e-5)  # the same traces both times


@pytest.mark.parametrize("space", [BOX, DISCRETE], ids=["box", "discrete"])
@pytest.mark.parametrize("guide", ["filter", "smoothing", "mean_field"])
def test_the_rssm_takes_the_batched_path_with_every_guide(space, guide):
    b = build(small_spec("rssm", guide=guide), 3, space)
    assert_same(*both_paths(b, tmf, data(space)))


class ShiftedEmission(torch.nn.Module):
    """p(x_t | z_t) of another module, its mean moved by +1: a factor changed in one place."""

    def __init__(self, emission):
        super().__init__()
        self.inner = emission
        self.latent_dim, self.obs_dim = emission.latent_dim, emission.obs_dim

    def forward(self, z):
        d = self.inner(z)
        return pyro.distributions.Normal(d.base_dist.loc + 1.0, d.base_dist.scale).to_event(1)


class SkippedActions(WorldModel):
    """A model whose observed factors leave out π(a | z): a change to observation_sites."""

    def observation_sites(self, *args, **kwargs):
        sites = super().observation_sites(*args, **kwargs)
        sites["a"] = (sites["a"][0], sites["a"][1])  # kept, but scored at zero weight below
        d, value = sites["a"]
        sites["a"] = (d.mask(False), value)
        return sites


class SlowerTransition(WorldModel):
    """A model whose step halves the prior's mean: a change to the chain."""

    def step(self, z_prev, a_prev, h_prev=None):
        prior, h = super().step(z_prev, a_prev, h_prev)
        base = prior.base_dist
        return pyro.distributions.Normal(base.loc / 2, base.scale).to_event(1), h


class ShiftedGuide(FilterGuide):
    """A guide whose every q(z_t | ·) is moved by +0.5: a change to the guide's one step."""

    def step_params(self, z_prev, context_t, weights):
        loc, scale = super().step_params(z_prev, context_t, weights)
        return loc + 0.5, scale


def test_a_factor_changed_in_one_place_changes_both_paths_together():
    b = build(small_spec(), 3, BOX)
    args = data(BOX)
    base_loss = both_paths(b, tmf, args)[0][0]
    m = b.model
    pyro.clear_param_store()
    variants = {
        "emission": (WorldModel(m.init, m.transition, ShiftedEmission(m.emission), m.policy), b.guide),
        "observation_sites": (SkippedActions(m.init, m.transition, m.emission, m.policy), b.guide),
        "step": (SlowerTransition(m.init, m.transition, m.emission, m.policy), b.guide),
    }
    guide = ShiftedGuide(3, BOX, 3, rnn_dim=8, hidden=(8,))
    guide.load_state_dict(b.guide.state_dict())
    variants["guide step"] = (m, guide)
    for what, (model, g) in variants.items():
        pyro.clear_param_store()
        fast, slow = both_paths(type(b)(model, g, b.elbo, b.optim, b.train, b.spec), tmf, args)
        assert_same(fast, slow)
        assert abs(fast[0] - base_loss) > 1e-3, f"changing the {what} changed nothing"


@pytest.mark.parametrize(
    "make",
    [
        lambda f: KLAnnealing_ELBO(beta=0.5, max_plate_nesting=2, batched=f),
        lambda f: FreeNats_ELBO(free_nats=0.3, max_plate_nesting=2, batched=f),
        lambda f: KLBalancing_ELBO(alpha=0.3, max_plate_nesting=2, batched=f),
        lambda f: TraceMeanField_ELBO(num_particles=3, max_plate_nesting=2, batched=f),
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
    z, _ = guide_draws(b.guide, obs, b.model.action_space.features(actions, obs.dtype), mask)
    torch.testing.assert_close(
        z, expected, rtol=1e-6, atol=1e-6
    )  # addcmul may round the last bit differently


@pytest.mark.parametrize(
    "spec, call, reason",
    [
        (
            {"transition": {"name": "student_t", "hidden": [8]}},
            None,
            "the StudentTMLPTransition gives a StudentT, not a diagonal Normal",
        ),
        (
            {"guide": {"name": "iaf_filter", "rnn_dim": 8, "iaf_hidden": [8]}},
            None,
            "IAFFilterGuide's steps are not the diagonal Normals of its step_params",
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


@pytest.mark.parametrize("train", ["all", "guide", "model"])
def test_fit_takes_the_batched_path_and_updates_only_the_side_it_trains(train):
    b = build({"latent_dim": 3, "guide": {"name": "filter", "rnn_dim": 8}}, 3, BOX)
    obs, actions, mask = data(BOX)
    elbo = TraceMeanField_ELBO(max_plate_nesting=2)
    before = {
        side: [p.detach().clone() for p in part.parameters()]
        for side, part in (("model", b.model), ("guide", b.guide))
    }
    history = fit(b.model, b.guide, obs, actions, mask, num_steps=3, elbo=elbo, train=train, progress=False)
    assert elbo.path == "batched" and all(torch.isfinite(torch.tensor(history.loss)))
    for side, part in (("model", b.model), ("guide", b.guide)):
        moved = any(not torch.equal(p, q) for p, q in zip(part.parameters(), before[side]))
        assert moved == (train in ("all", side)), side
        assert all(p.grad is None or not p.grad.any() for p in part.parameters())


def test_batched_must_be_a_bool():
    with pytest.raises(ValueError, match=r"batched: expected True or False, got 'yes'"):
        TraceMeanField_ELBO(batched="yes")


def test_mask_as_a_keyword_takes_the_batched_path_and_gives_the_same_loss():
    b = build(small_spec("gaussian_mlp", "gaussian_mlp", "filter"), 3, BOX)
    obs, actions, mask = data(BOX)
    losses, paths = [], []
    for batched in (True, False):
        elbo = TraceMeanField_ELBO(max_plate_nesting=2, batched=batched)
        pyro.set_rng_seed(2)
        losses.append(elbo.loss(b.model.model, b.guide, obs, actions, mask=mask))
        paths.append(elbo.path)
    assert paths == ["batched", "pyro traces: batched=False"]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_an_overridden_pyro_program_or_step_takes_the_traces():
    """What the batched path cannot follow: a model or guide whose Pyro program is its own,
    a guide step that is not the Normal of its step_params, a component that samples."""

    class OwnModel(WorldModel):
        def model(self, *args, **kwargs):
            return super().model(*args, **kwargs)

    class OwnForward(FilterGuide):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    class SamplingEmission(torch.nn.Module):
        def __init__(self, emission):
            super().__init__()
            self.inner, self.latent_dim, self.obs_dim = emission, emission.latent_dim, emission.obs_dim

        def forward(self, z):
            pyro.deterministic("noise", z.sum())  # a site of its own, which the batched path would skip
            return self.inner(z)

    class MyELBO(TraceMeanField_ELBO):
        def shape_kl(self, name, kl, q, p, mask, estimator):
            return kl

    obs, actions, mask = data(BOX)
    b = build(small_spec(), 3, BOX)
    m = b.model
    cases = {
        "OwnModel overrides WorldModel.model": (
            OwnModel(m.init, m.transition, m.emission, m.policy),
            b.guide,
        ),
        "a component samples or registers sites of its own (noise)": (
            WorldModel(m.init, m.transition, SamplingEmission(m.emission), m.policy),
            b.guide,
        ),
        "OwnForward overrides FilterGuide.forward": (m, OwnForward(3, BOX, 3, rnn_dim=8, hidden=(8,))),
    }
    for reason, (model, g) in cases.items():
        pyro.clear_param_store()
        elbo = TraceMeanField_ELBO(max_plate_nesting=2)
        elbo.loss(model.model, g, obs, actions, mask)
        assert elbo.path == f"pyro traces: {reason}"
    pyro.clear_param_store()
    mine = MyELBO(max_plate_nesting=2)
    mine.loss(m.model, b.guide, obs, actions, mask)
    assert mine.path.startswith("pyro traces: MyELBO overrides shape_kl")


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
