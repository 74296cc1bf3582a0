"""Specs and the registry: every part swappable by name, from Python or YAML."""

import contextlib
import inspect
import itertools
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import yaml
from torch import nn

from pyro_worldmodel import ActionSpace, elbo_terms, fit
from pyro_worldmodel.config import (
    MAX_SIZE,
    REGISTRY,
    Spec,
    _parse_presets,
    build,
    count_parameters,
    register,
    spec_of,
    yaml_value,
)
from pyro_worldmodel.infer.elbos import MonteCarloKLWarning

ROOT = Path(__file__).resolve().parents[1]
BOX, DISCRETE = ActionSpace.box(2), ActionSpace.discrete(3)


def data(space, B=6, T=5, X=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(B, T, X, generator=g)
    actions = (
        torch.randn(B, T, space.dim, generator=g)
        if space.kind == "box"
        else torch.randint(3, (B, T), generator=g)
    )
    return obs, actions


def parameters(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# Every registered part, so that a part registered later is trained in every combination too.
TRANSITIONS, EMISSIONS, GUIDES, INITS = (
    list(REGISTRY[slot]) for slot in ("transition", "emission", "guide", "init")
)


def state(slot, name) -> str:
    """The kind of z_t a part is for: ``categorical`` (it takes the init's classes) or ``gaussian``."""
    cls = REGISTRY[slot][name]
    if slot == "init":
        return "categorical" if "classes" in inspect.signature(cls).parameters else "gaussian"
    return "categorical" if "latent_classes" in inspect.signature(cls).parameters else "gaussian"


# A categorical state of one group of 3 classes (latent_dim 3); its transition and guide get them.
CATEGORICAL_INIT = {"name": "categorical", "classes": 3}


def init_for(transition) -> dict:
    return (
        CATEGORICAL_INIT if state("transition", transition) == "categorical" else {"name": "standard_normal"}
    )


# Transitions and guides of the same kind of state, with every emission.
COMBINATIONS = [
    (t, e, g)
    for t, e, g in itertools.product(TRANSITIONS, EMISSIONS, GUIDES)
    if state("transition", t) == state("guide", g)
]
# Small sizes, so that every combination trains in a fraction of a second; a part not
# listed is built with its own defaults.
SIZES = {
    "transition": {
        "gaussian_mlp": {"hidden": [8]},
        "gated": {"hidden": [8]},
        "rssm": {"hidden": [8], "deter_dim": 4},
        "student_t": {"hidden": [8]},
        "categorical_mlp": {"hidden": [8]},
        "categorical_rssm": {"hidden": [8], "deter_dim": 4},
    },
    "emission": {
        "gaussian_mlp": {"hidden": [8]},
        "student_t": {"hidden": [8]},
        "bernoulli": {"hidden": [8]},
        "conv_gaussian": {"depth": 2, "layers": 2},
        "conv_logistic": {"depth": 2, "layers": 2},
    },
    "guide": {
        "filter": {"rnn_dim": 8, "hidden": [8]},
        "smoothing": {"rnn_dim": 8, "hidden": [8]},
        "mean_field": {"hidden": [8]},
        "iaf_filter": {"rnn_dim": 8, "hidden": [8], "iaf_hidden": [8]},
        "categorical_filter": {"rnn_dim": 8, "hidden": [8]},
    },
}


def small(slot, name):
    return {"name": name, **SIZES[slot].get(name, {})}


# A part that reads frames is built for 16×16 grayscale ones (X = 256) and given pixel values.
IMAGE = (1, 16, 16)


def reads_frames(spec) -> bool:
    return any(
        getattr(REGISTRY[slot][spec[slot]["name"]], "observes", None) == "frames"
        for slot in ("emission", "encoder")
        if slot in spec
    )


def build_for(spec, space):
    """``build`` with the data's sizes: 3 dimensions, or 8×8 frames for a part that reads them."""
    return build(spec, 256, space, image_shape=IMAGE) if reads_frames(spec) else build(spec, 3, space)


def pixels(obs):
    """Observations ``(B, T, 3)`` made 16×16 frames of pixel values, each value a third of the frame."""
    return (obs.sigmoid() * 255).round().repeat_interleave(86, -1)[..., :256]


def test_the_small_sizes_name_registered_parts():
    """A renamed part would otherwise be built at its full size, unnoticed."""
    for slot, parts in SIZES.items():
        assert set(parts) <= set(REGISTRY[slot]), slot


def expected_kl(transition, guide, T):
    """Which estimator each z_t's KL must get: analytic wherever the pair has one."""
    weights = {"transition_weights": "analytic"} if transition == "bayesian" else {}  # KL(Normal ‖ Normal)
    if guide == "iaf_filter":  # a flow: no pair has an analytic KL
        return {**weights, **{f"z_{t}": "monte_carlo" for t in range(T)}}
    later = "monte_carlo" if transition == "student_t" else "analytic"  # KL(Normal ‖ StudentT)
    return {**weights, "z_0": "analytic", **{f"z_{t}": later for t in range(1, T)}}


@pytest.mark.parametrize("elbo", ["TraceMeanField_ELBO", "Trace_ELBO"])
@pytest.mark.parametrize("transition, emission, guide", COMBINATIONS)
@pytest.mark.parametrize("space", [BOX, DISCRETE], ids=["box", "discrete"])
def test_every_combination_trains(transition, emission, guide, elbo, space):
    spec = {
        "latent_dim": 3,
        "init": init_for(transition),
        "transition": small("transition", transition),
        "emission": small("emission", emission),
        "guide": small("guide", guide),
        "elbo": {"name": elbo},
        "optim": {"name": "ClippedAdam", "lr": 1e-2},
    }
    b = build_for(spec, space)
    obs, actions = data(space)
    if emission == "bernoulli":
        obs = (obs > 0).float()
    if reads_frames(spec):
        obs = pixels(obs)
    expected = expected_kl(transition, guide, obs.shape[1])
    before = {**parameters(b.model), **{f"g.{k}": v for k, v in parameters(b.guide).items()}}
    # No silent fallback: warnings are errors in this suite, so a Monte Carlo KL
    # that is not expected fails here, and one that is expected must be announced.
    with contextlib.ExitStack() as stack:
        if elbo == "TraceMeanField_ELBO" and "monte_carlo" in expected.values():
            stack.enter_context(pytest.warns(MonteCarloKLWarning))
        history = fit(
            b.model,
            b.guide,
            obs,
            actions,
            num_steps=3,
            batch_size=3,
            elbo=b.elbo,
            optim=b.optim,
            progress=False,
        )
    assert all(torch.isfinite(torch.tensor(history.loss)))
    after = {**parameters(b.model), **{f"g.{k}": v for k, v in parameters(b.guide).items()}}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("transition") for k in changed) and any(k.startswith("g.") for k in changed)
    if elbo == "TraceMeanField_ELBO":
        assert b.elbo.kl_estimators == expected
    terms = elbo_terms(b.model, b.guide, obs, actions)
    assert terms.monte_carlo_kl == tuple(k for k, v in expected.items() if v == "monte_carlo")
    assert math.isfinite(terms.elbo)


def test_round_trip_object_spec_yaml_spec_object():
    for transition, emission, init in itertools.product(TRANSITIONS, EMISSIONS, INITS):
        if state("transition", transition) != state("init", init):
            continue
        categorical = state("init", init) == "categorical"
        spec = {
            "latent_dim": 4,
            "init": {"name": init, "classes": 2} if categorical else {"name": init},
            "transition": small("transition", transition),
            "emission": small("emission", emission),
            **({"guide": small("guide", "categorical_filter")} if categorical else {}),
        }
        pyro.set_rng_seed(1)
        first = build_for(spec, BOX)
        read_back = spec_of(first.model, first.guide, first.elbo, first.optim)
        text = read_back.to_yaml()
        again = Spec.from_yaml(text)
        assert again == read_back and again.to_yaml() == text
        pyro.set_rng_seed(1)
        second = build_for(again.to_dict(), BOX)
        assert spec_of(second.model, second.guide, second.elbo, second.optim) == read_back
        for a, b in ((first.model, second.model), (first.guide, second.guide)):
            pa, pb = parameters(a), parameters(b)
            assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
        assert (
            type(second.elbo) is type(first.elbo) and second.optim.pt_optim_args == first.optim.pt_optim_args
        )


@pytest.mark.parametrize("guide", GUIDES)
def test_round_trip_of_each_guide(guide):
    spec = {"latent_dim": 3, "guide": small("guide", guide)}
    if state("guide", guide) == "categorical":
        spec.update(init=CATEGORICAL_INIT, transition=small("transition", "categorical_mlp"))
    pyro.set_rng_seed(3)
    first = build(spec, 3, DISCRETE)
    read_back = spec_of(first.model, first.guide)
    assert read_back.guide == small("guide", guide)
    pyro.set_rng_seed(3)
    second = build(Spec.from_yaml(read_back.to_yaml()), 3, DISCRETE)
    assert type(second.guide) is type(first.guide)
    pa, pb = parameters(first.guide), parameters(second.guide)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_round_trip_of_a_tanh_policy_on_a_bounded_box():
    space = ActionSpace.box(2, low=[-1.0, 0.0], high=[2.0, 0.5])
    pyro.set_rng_seed(2)
    first = build({"latent_dim": 3, "policy": {"name": "tanh_normal", "hidden": [8]}}, 3, space)
    text = spec_of(first.model, first.guide).to_yaml()
    assert Spec.from_yaml(text).policy == {"name": "tanh_normal", "hidden": [8]}
    pyro.set_rng_seed(2)
    second = build(Spec.from_yaml(text), 3, space)
    pa, pb = parameters(first.model), parameters(second.model)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert torch.equal(second.model.policy.low, torch.tensor([-1.0, 0.0]))


def test_pyros_own_mean_field_elbo_reads_back_as_ours():
    """Pyro's class is read back under the name that builds this package's, which computes the same bound."""
    b = build({"latent_dim": 3}, 3, BOX)
    stock = pyro.infer.TraceMeanField_ELBO(max_plate_nesting=2, num_particles=3)
    spec = spec_of(b.model, b.guide, stock)
    assert spec.elbo == {"name": "TraceMeanField_ELBO", "num_particles": 3}
    assert isinstance(build(spec, 3, BOX).elbo, pyro.infer.TraceMeanField_ELBO)


def test_a_user_registered_class_is_used_by_name():
    @register("transition", "test_random_walk")
    class RandomWalk(nn.Module):
        def __init__(self, latent_dim, action_dim, step=0.5):
            super().__init__()
            self.latent_dim, self.action_dim, self.step = latent_dim, action_dim, step
            self.log_step = nn.Parameter(torch.tensor(step).log())

        def forward(self, z_prev, a_prev):
            return dist.Normal(z_prev, self.log_step.exp().expand(z_prev.shape)).to_event(1)

    try:
        b = build({"latent_dim": 2, "transition": {"name": "test_random_walk", "step": 0.25}}, 3, BOX)
        assert isinstance(b.model.transition, RandomWalk) and b.model.transition.step == 0.25
        assert spec_of(b.model, b.guide).transition == {"name": "test_random_walk", "step": 0.25}
        obs, actions = data(BOX)
        fit(b.model, b.guide, obs, actions, num_steps=2, elbo=b.elbo, optim=b.optim, progress=False)
        assert b.model.transition.log_step.item() != pytest.approx(torch.tensor(0.25).log().item(), abs=1e-6)
    finally:
        del REGISTRY["transition"]["test_random_walk"]


def test_two_specs_in_one_process_keep_their_own_parameters():
    obs, actions = data(BOX)
    a = build({"latent_dim": 3, "transition": small("transition", "gaussian_mlp")}, 3, BOX)
    b = build({"latent_dim": 3, "transition": small("transition", "linear_gaussian")}, 3, BOX)
    fit(a.model, a.guide, obs, actions, num_steps=2, elbo=a.elbo, optim=a.optim, progress=False)
    frozen_a = {**parameters(a.model), **parameters(a.guide)}
    fit(b.model, b.guide, obs, actions, num_steps=2, elbo=b.elbo, optim=b.optim, progress=False)
    store = pyro.get_param_store()
    names_a = {n for n in store.keys() if n.startswith((a.model.name, a.guide.name))}
    names_b = {n for n in store.keys() if n.startswith((b.model.name, b.guide.name))}
    assert names_a and names_b and not names_a & names_b
    ids_a = {id(p) for p in [*a.model.parameters(), *a.guide.parameters()]}
    assert not ids_a & {id(p) for p in [*b.model.parameters(), *b.guide.parameters()]}
    now_a = {**parameters(a.model), **parameters(a.guide)}
    assert all(torch.equal(frozen_a[k], now_a[k]) for k in frozen_a)  # training b left a alone
    before = parameters(a.model)
    fit(a.model, a.guide, obs, actions, num_steps=2, elbo=a.elbo, optim=a.optim, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in parameters(a.model).items())  # a still trains


@pytest.mark.parametrize(
    "spec, space, message",
    [
        (
            {"transition": {"name": "gausian_mlp"}},
            BOX,
            "transition.name: unknown 'gausian_mlp' (did you mean 'gaussian_mlp'?); registered: ['bayesian', 'categorical_mlp', 'categorical_rssm', 'ensemble', 'gated', 'gaussian_mlp', 'linear_gaussian', 'rssm', 'student_t'",
        ),
        ({"guide": {"name": "smoother"}}, BOX, "guide.name: unknown 'smoother' (did you mean 'smoothing'?)"),
        (
            {"transition": {"name": "gaussian_mlp", "hiden": [8]}},
            BOX,
            "transition.hiden: GaussianMLPTransition takes no keyword 'hiden' (did you mean 'hidden'?); it accepts ['hidden', 'min_scale']",
        ),
        (
            {"elbo": {"name": "RenyiELBO", "alpha_": 0.5}},
            BOX,
            "elbo.alpha_: RenyiELBO takes no keyword 'alpha_' (did you mean 'alpha'?)",
        ),
        (
            {"train": {"num_step": 3}},
            BOX,
            "train.num_step: fit takes no keyword 'num_step' (did you mean 'num_steps'?)",
        ),
        (
            {"policy": {"name": "categorical"}},
            BOX,
            "policy.name: 'categorical' is for discrete actions, but the data's actions are",
        ),
        ({"policy": {"name": "normal"}}, DISCRETE, "policy.name: 'normal' is for box actions"),
        ({"policy": {"name": "tanh_normal"}}, DISCRETE, "policy.name: 'tanh_normal' is for box actions"),
        (
            {"policy": {"name": "tanh_normal"}},
            BOX,
            "policy (tanh_normal): action_space: expected a box with finite low < high for a tanh-squashed policy",
        ),
        (
            {"transition": {"name": "rssm", "deter_dim": 0}},
            BOX,
            "transition.deter_dim: expected an int in [1, 65536], got 0",
        ),
        (  # a component's own check, of two arguments together, is named by the part
            {"planner": {"name": "cem", "candidates": 10, "top_k": 20}},
            BOX,
            "planner (cem): top_k: expected at most candidates=10, got 20",
        ),
        ({"latent": 3}, BOX, "spec: unknown key 'latent' (did you mean 'latent_dim'?)"),
        ({"latent_dim": 0}, BOX, "latent_dim: expected an int in [1, 65536], got 0"),
        ({"emission": {"hidden": [8]}}, BOX, "emission: expected a dict with a 'name'"),
    ],
)
def test_a_bad_spec_is_refused_before_anything_is_built(spec, space, message):
    before = len(list(pyro.get_param_store().keys()))
    with pytest.raises(ValueError) as e:
        build(spec, 3, space)
    assert message in str(e.value)
    assert len(list(pyro.get_param_store().keys())) == before


def test_overrides_set_dotted_keys():
    spec = Spec().with_overrides({"transition.hidden": [128, 128], "latent_dim": 4, "optim.lr": 0.01})
    assert spec.transition == {"name": "gaussian_mlp", "hidden": [128, 128]} and spec.latent_dim == 4
    assert build(spec, 3, BOX).model.transition.hidden == (128, 128)
    with pytest.raises(ValueError, match="--set transitions.hidden: 'transitions' is not a part of the spec"):
        Spec().with_overrides({"transitions.hidden": [1]})


# ---------------------------------------------------------------- the default and the presets

# The default job's spec (`pyro-worldmodel train`): its results depend on every value here.
DEFAULT_JOB = {
    "latent_dim": 8,
    "init": {"name": "standard_normal"},
    "transition": {"name": "gaussian_mlp"},
    "emission": {"name": "gaussian_mlp"},
    "policy": {"name": "auto"},
    "guide": {"name": "filter"},
    "encoder": {"name": "identity"},
    "elbo": {"name": "TraceMeanField_ELBO"},
    "optim": {"name": "ClippedAdam", "lr": 0.001, "clip_norm": 10.0},
    "train": {},
}
# What each preset changes in DEFAULT_JOB, in the order of presets.yaml.
PRESET_CHANGES = {
    "default": {},
    # The model-based loop's spec: `pyro-worldmodel loop`'s results depend on it.
    "loop": {
        "transition": {"name": "gaussian_mlp", "min_scale": 0.02},
        "reward": {"name": "gaussian"},
        "continuation": {"name": "bernoulli"},
        "planner": {"name": "cem"},
    },
    "dmm": {"transition": {"name": "gated"}, "guide": {"name": "smoothing"}},
    "planet": {"transition": {"name": "rssm", "deter_dim": 32}},
    "heavy_tails": {
        "transition": {"name": "student_t"},
        "emission": {"name": "student_t"},
        "elbo": {"name": "TraceMeanField_ELBO", "monte_carlo_kl": ["KL(Normal ‖ StudentT)"]},
    },
    "iaf": {
        "guide": {"name": "iaf_filter"},
        "elbo": {"name": "TraceMeanField_ELBO", "monte_carlo_kl": ["KL(TransformedDistribution ‖ Normal)"]},
    },
    "iwae_smoothing": {
        "guide": {"name": "smoothing"},
        "elbo": {"name": "RenyiELBO", "alpha": 0, "num_particles": 8, "vectorize_particles": True},
    },
    "pixels": {"encoder": {"name": "conv"}, "emission": {"name": "conv_gaussian"}},
    "binary": {"emission": {"name": "bernoulli"}},
    "dreamer": {
        "transition": {"name": "rssm", "deter_dim": 32, "min_scale": 0.02},
        "elbo": {"name": "KLBalancing_ELBO", "alpha": 0.8},
        "reward": {"name": "gaussian"},
        "continuation": {"name": "bernoulli"},
        "planner": {"name": "actor_critic"},
    },
    "categorical": {
        "latent_dim": 32,
        "init": {"name": "categorical", "classes": 4},
        "transition": {"name": "categorical_mlp"},
        "guide": {"name": "categorical_filter"},
    },
    "dreamerv2": {
        "latent_dim": 32,
        "init": {"name": "categorical", "classes": 4},
        "transition": {"name": "categorical_rssm", "deter_dim": 32},
        "guide": {"name": "categorical_filter"},
        "elbo": {"name": "KLBalancing_ELBO", "alpha": 0.8},
        "reward": {"name": "gaussian"},
        "continuation": {"name": "bernoulli"},
        "planner": {"name": "actor_critic"},
    },
    "smoke": {
        "latent_dim": 4,
        "transition": {"name": "gaussian_mlp", "hidden": [16]},
        "emission": {"name": "gaussian_mlp", "hidden": [16]},
        "policy": {"name": "auto", "hidden": [16]},
        "guide": {"name": "filter", "rnn_dim": 16, "hidden": [16]},
        "train": {"num_steps": 20, "batch_size": 8},
    },
}


def test_the_default_spec_is_the_default_jobs():
    spec = Spec()
    assert spec.to_dict() == DEFAULT_JOB
    assert type(spec.optim["lr"]) is float and type(spec.optim["clip_norm"]) is float  # 10 == 10.0
    assert spec.to_yaml() == (
        "latent_dim: 8\n"
        "init: {name: standard_normal}\n"
        "transition: {name: gaussian_mlp}\n"
        "emission: {name: gaussian_mlp}\n"
        "policy: {name: auto}\n"
        "guide: {name: filter}\n"
        "encoder: {name: identity}\n"
        "elbo: {name: TraceMeanField_ELBO}\n"
        "optim: {name: ClippedAdam, lr: 0.001, clip_norm: 10.0}\n"
        "train: {}\n"
    )
    assert Spec.preset() == Spec.preset("default") == Spec.from_yaml("") == spec
    b = build(spec, 3, BOX)
    assert b.model.latent_dim == 8 and b.optim.pt_optim_args == {"lr": 1e-3, "clip_norm": 10.0}


def test_each_preset_is_listed_with_a_one_line_description():
    presets = Spec.presets()
    assert list(presets) == list(PRESET_CHANGES)
    for name, description in presets.items():
        assert description and "\n" not in description and description == description.strip(), name
    presets["default"] = "changed"
    assert Spec.presets()["default"] != "changed"  # the caller's copy, not the table


@pytest.mark.parametrize("name", PRESET_CHANGES)
def test_each_preset_is_the_default_spec_with_its_changes(name):
    spec = Spec.preset(name)
    assert spec.to_dict() == {**DEFAULT_JOB, **PRESET_CHANGES[name]}
    assert Spec.from_yaml(spec.to_yaml()) == spec


def assert_built_as_specified(b, spec):
    """Each part is the class its spec names and holds the keywords the spec gives it."""
    model = b.model
    objects = {
        **{s: getattr(model, s, None) for s in ("init", "transition", "emission", "policy")},
        **{s: getattr(model, s, None) for s in ("reward", "continuation")},  # None where absent
        "guide": b.guide,
        "encoder": b.guide.encoder,
        "elbo": b.elbo,
        "planner": b.planner,
    }
    assert model.latent_dim == spec.latent_dim
    for slot, obj in objects.items():
        part = getattr(spec, slot)
        if part is None:
            assert obj is None, slot
            continue
        if part["name"] != "auto":  # a factory: the action space chooses the class
            assert type(obj) is REGISTRY[slot][part["name"]], slot
        for key, value in part.items():
            got = getattr(obj, key, None) if key != "name" else value
            assert (list(got) if isinstance(got, tuple) else got) == value, (slot, key, got)
    assert b.optim.pt_optim_args == {k: v for k, v in spec.optim.items() if k != "name"}


@pytest.mark.parametrize("smoke", [False, True], ids=["alone", "smoke_over_it"])
@pytest.mark.parametrize("space", [BOX, DISCRETE], ids=["box", "discrete"])
@pytest.mark.parametrize("name", PRESET_CHANGES)
def test_every_preset_builds_trains_and_acts(name, space, smoke):
    spec = Spec.preset(name, "smoke") if smoke else Spec.preset(name)
    b = build_for(spec.to_dict(), space)
    assert_built_as_specified(b, spec)
    obs, actions = data(space)
    if spec.emission["name"] == "bernoulli":
        obs = (obs > 0).float()
    if reads_frames(spec.to_dict()):
        obs = pixels(obs)
    targets, heads = {}, set()  # fit's keyword for each head's data, and the heads to train
    if spec.reward is not None:
        targets["rewards"] = torch.randn(obs.shape[:2], generator=torch.Generator().manual_seed(1))
        heads.add("reward")
    if spec.continuation is not None:
        targets["continues"] = torch.ones(obs.shape[:2])
        heads.add("continuation")
    # smoke's own schedule where it is merged in: fit must take it
    settings = dict(spec.train) if smoke else {"num_steps": 2, "batch_size": 3}
    before = {**parameters(b.model), **{f"g.{k}": v for k, v in parameters(b.guide).items()}}
    history = fit(
        b.model, b.guide, obs, actions, **targets, elbo=b.elbo, optim=b.optim, progress=False, **settings
    )
    assert len(history.loss) == settings["num_steps"] and all(map(math.isfinite, history.loss))
    after = {**parameters(b.model), **{f"g.{k}": v for k, v in parameters(b.guide).items()}}
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"transition", "emission", "g", *heads} <= changed  # g: the guide
    if b.planner is not None:
        from pyro_worldmodel.act.planners import belief

        action = b.planner.plan(b.model, belief(b.model, b.guide, obs, actions))
        if space.kind == "box":
            assert action.shape == (6, 2) and torch.isfinite(action).all()
        else:
            assert action.shape == (6,) and not action.is_floating_point()
            assert ((action >= 0) & (action < 3)).all()


# Every preset that declares Monte Carlo KL terms, and the pairs it declares.
DECLARED = {
    "heavy_tails": ["KL(Normal ‖ StudentT)"],
    "iaf": ["KL(TransformedDistribution ‖ Normal)"],
}


def test_only_the_presets_without_analytic_kl_terms_declare_monte_carlo_ones():
    declaring = {
        n: Spec.preset(n).elbo["monte_carlo_kl"]
        for n in PRESET_CHANGES
        if "monte_carlo_kl" in Spec.preset(n).elbo
    }
    assert declaring == DECLARED


@pytest.mark.parametrize("name", DECLARED)
def test_a_preset_declares_exactly_the_monte_carlo_kl_pairs_it_meets(name):
    """Trained with the fallback made loud, it meets the pairs it declares, and no other."""
    spec = Spec.preset(name, "smoke").with_overrides({"elbo.monte_carlo_kl": "warn"})
    b = build(spec, 3, BOX)
    obs, actions = data(BOX)
    with pytest.warns(MonteCarloKLWarning) as record:
        fit(
            b.model,
            b.guide,
            obs,
            actions,
            num_steps=2,
            batch_size=3,
            elbo=b.elbo,
            optim=b.optim,
            progress=False,
        )
    met = {re.search(r"no analytic (KL\(.*?\)) at ", str(w.message)).group(1) for w in record}
    assert sorted(met) == sorted(DECLARED[name])


def test_a_later_preset_wins_where_two_set_the_same_thing():
    # smoke refines whichever transition is there; planet names another class, which replaces it
    assert Spec.preset("planet", "smoke").transition == {"name": "rssm", "deter_dim": 32, "hidden": [16]}
    assert Spec.preset("smoke", "planet").transition == {"name": "rssm", "deter_dim": 32}
    assert Spec.preset("smoke", "planet").latent_dim == Spec.preset("planet", "smoke").latent_dim == 4
    assert Spec.preset("dmm", "planet").transition == {"name": "rssm", "deter_dim": 32}
    assert Spec.preset("planet", "dmm").transition == {"name": "gated"}
    assert Spec.preset("dmm", "planet").guide == Spec.preset("planet", "dmm").guide == {"name": "smoothing"}
    # loop floors whichever transition is there: after planet, PlaNet's agent
    planet_agent = Spec.preset("planet", "loop")
    assert planet_agent.transition == {"name": "rssm", "deter_dim": 32, "min_scale": 0.02}
    assert (planet_agent.reward, planet_agent.planner) == ({"name": "gaussian"}, {"name": "cem"})
    assert Spec.preset("loop", "planet").transition == {"name": "rssm", "deter_dim": 32}
    # heavy_tails names its ELBO: after dreamer it replaces KL balancing, which has no Monte Carlo KL
    assert Spec.preset("dreamer", "heavy_tails").elbo == PRESET_CHANGES["heavy_tails"]["elbo"]
    assert Spec.preset("heavy_tails", "dreamer").elbo == {"name": "KLBalancing_ELBO", "alpha": 0.8}


def test_presets_that_change_different_things_commute_and_a_repeated_one_changes_nothing():
    for a, b in [("dmm", "binary"), ("planet", "iaf"), ("loop", "binary"), ("binary", "iaf")]:
        assert Spec.preset(a, b) != Spec.preset(a) and Spec.preset(a, b) == Spec.preset(b, a), (a, b)
    for name in PRESET_CHANGES:
        assert Spec.preset(name, name) == Spec.preset(name), name


def test_presets_merge_over_any_spec_and_a_merge_that_is_not_a_spec_is_refused_naming_them():
    spec = Spec.from_yaml("transition: {name: gated, hidden: [32]}\nguide: {name: smoothing}\n")
    small_spec = spec.with_presets("smoke")
    assert small_spec.transition == {"name": "gated", "hidden": [16]}
    assert (
        small_spec.guide == {"name": "smoothing", "rnn_dim": 16, "hidden": [16]}
        and small_spec.latent_dim == 4
    )
    assert spec.transition == {"name": "gated", "hidden": [32]}  # unchanged
    assert spec.with_presets() == spec
    with pytest.raises(ValueError) as e:  # the spec's own fault, not the presets'
        Spec(latent_dim=0).with_presets("smoke")
    assert str(e.value) == "latent_dim: expected an int in [1, 65536], got 0"
    with pytest.raises(ValueError) as e:
        Spec(transition={"name": "linear_gaussian"}).with_presets("binary", "smoke")
    assert str(e.value) == (
        "presets ['binary', 'smoke']: transition.hidden: LinearGaussianTransition takes no keyword 'hidden';"
        " it accepts []"
    )


@pytest.mark.parametrize(
    "names, message",
    [
        (("plannet",), "names[0]: unknown preset 'plannet' (did you mean 'planet'?)"),
        (("smoke", "heavy_tail"), "names[1]: unknown preset 'heavy_tail' (did you mean 'heavy_tails'?)"),
        (("xyz",), "names[0]: unknown preset 'xyz'"),
    ],
)
def test_an_unknown_preset_is_refused_with_the_closest_and_the_list(names, message):
    with pytest.raises(ValueError) as e:
        Spec.preset(*names)
    assert str(e.value) == f"{message}; expected one of {list(PRESET_CHANGES)}"


def test_presets_are_named_one_per_argument():
    with pytest.raises(ValueError) as e:
        Spec.preset(["planet", "smoke"])
    assert str(e.value) == (
        "names[0]: expected a preset name (str), got ['planet', 'smoke']; pass each name as its own argument"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("- smoke\n", "p.yaml: expected a mapping of preset names to presets, got ['smoke']"),
        ("", "p.yaml: expected a mapping of preset names to presets, got None"),
        ("1: {description: x, delta: {}}\n", "p.yaml: expected preset names (str), got 1"),
        ("a: {delta: {}}\n", "p.yaml: a: expected a mapping with the keys 'description' and 'delta', got {'delta': {}}"),
        ("a: {description: x, delta: {}, b: 1}\n", "p.yaml: a: expected a mapping with the keys 'description' and 'delta', got {'b': 1, 'delta': {}, 'description': 'x'}"),
        ("a: {1: x, description: x, delta: {}}\n", "p.yaml: a: expected a mapping with the keys 'description' and 'delta', got {1: 'x', 'description': 'x', 'delta': {}}"),
        ("a: {description: ' ', delta: {}}\n", "p.yaml: a.description: expected one line of text, got ' '"),
        ('a: {description: "x\\ny", delta: {}}\n', "p.yaml: a.description: expected one line of text, got 'x\\ny'"),
        ("a: {description: x, delta: [1]}\n", "p.yaml: a.delta: expected a mapping of spec keys, got [1]"),
        ("a: {description: x, delta: {latent: 3}}\n", f"p.yaml: a.delta: unknown key 'latent' (did you mean 'latent_dim'?); expected some of {[*DEFAULT_JOB, 'reward', 'continuation', 'planner']}"),
        ("a: {description: x, delta: {latent_dim: 3}\n", "p.yaml: expected valid YAML, got expected ',' or '}', but got '<stream end>' at line 2, column 1 (while parsing a flow mapping)"),
    ],
)  # fmt: skip
def test_a_malformed_presets_file_is_refused_naming_the_entry(text, message):
    with pytest.raises(ValueError) as e:
        _parse_presets(text, "p.yaml")
    assert str(e.value) == message


def test_a_presets_file_gives_each_name_its_description_and_delta():
    text = "a: {description: ' One line. ', delta: }\nb:\n  description: Two.\n  delta: {latent_dim: 3}\n"
    assert _parse_presets(text, "p.yaml") == {"a": ("One line.", {}), "b": ("Two.", {"latent_dim": 3})}


def test_smoke_over_a_preset_makes_it_smaller():
    for name in PRESET_CHANGES:
        if name != "smoke":
            sizes = (256, BOX, IMAGE) if reads_frames(Spec.preset(name).to_dict()) else (3, BOX)
            small_count = count_parameters(Spec.preset(name, "smoke"), *sizes)
            assert small_count < count_parameters(Spec.preset(name), *sizes), name


def test_the_presets_file_is_inside_a_built_wheel_and_read_from_it(tmp_path):
    """Built with `python -m build`, unpacked, and imported from there, not from this checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "pyro_worldmodel", source / "pyro_worldmodel", ignore=shutil.ignore_patterns("__pycache__")
    )
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        packed = z.read("pyro_worldmodel/presets.yaml")
        z.extractall(tmp_path / "installed")
    assert packed == (ROOT / "pyro_worldmodel" / "presets.yaml").read_bytes()
    code = (
        "import json, pyro_worldmodel.config as c;"
        " print(json.dumps([c.__file__, c.Spec.presets(), c.Spec.preset('planet', 'smoke').to_dict()]))"
    )
    path = os.pathsep.join([str(tmp_path / "installed"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    read = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert read.returncode == 0, read.stderr[-3000:]
    file, presets, spec = json.loads(read.stdout)
    assert Path(file).is_relative_to(tmp_path / "installed")
    assert presets == Spec.presets() and spec == Spec.preset("planet", "smoke").to_dict()


# ---------------------------------------------------------------- reading YAML


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1e-4", 1e-4),
        ("1E5", 1e5),
        ("-2.5e+3", -2500.0),
        (".5", 0.5),
        ("1.", 1.0),
        ("1.0e-4", 1e-4),
        ("0.9", 0.9),
        (".inf", math.inf),
        ("-.inf", -math.inf),
        ("3", 3),
        ("-7", -7),
        ("'1e-4'", "1e-4"),
        ("[128, 128]", [128, 128]),
        ("filter", "filter"),
        ("true", True),
        ("", None),
    ],
)
def test_yaml_values_read_numbers_as_yaml_1_2_does(text, expected):
    value = yaml_value(text, "--set x")
    assert value == expected and type(value) is type(expected)


def test_yaml_nan_is_a_float_and_pyyaml_itself_is_left_alone():
    assert math.isnan(yaml_value(".nan", "--set x"))
    # Our loader is a subclass: yaml.safe_load still reads YAML 1.1, so 1e-4 is a str there.
    assert yaml.safe_load("1e-4") == "1e-4" and yaml.safe_load("1.0e-4") == 1e-4


def test_set_lr_as_yaml_gives_a_float_and_an_optimiser_with_that_lr():
    spec = Spec().with_overrides({"optim.lr": yaml_value("1e-4", "--set optim.lr")})
    assert (
        spec.optim == {"name": "ClippedAdam", "lr": 1e-4, "clip_norm": 10.0}
        and type(spec.optim["lr"]) is float
    )
    b = build(spec, 3, BOX)
    obs, actions = data(BOX)
    fit(b.model, b.guide, obs, actions, num_steps=1, elbo=b.elbo, optim=b.optim, progress=False)
    groups = [g for opt in b.optim.optim_objs.values() for g in opt.param_groups]
    assert groups and {g["lr"] for g in groups} == {1e-4}


def test_both_yaml_forms_of_a_float_and_a_yaml_1_1_string_give_the_same_spec():
    short = Spec.from_yaml("optim: {name: ClippedAdam, lr: 1e-4}\n")
    assert short == Spec.from_yaml("optim: {name: ClippedAdam, lr: 1.0e-4}\n")
    assert short == Spec.from_dict({"optim": {"name": "ClippedAdam", "lr": "1e-4"}})  # as PyYAML reads 1e-4
    assert short.optim["lr"] == 1e-4 and Spec.from_yaml(short.to_yaml()) == short


def test_a_str_that_looks_like_a_float_is_written_quoted_and_read_back_a_str():
    spec = Spec.from_dict({"train": {"device": "1e3"}})
    assert "device: '1e3'" in spec.to_yaml()
    assert Spec.from_yaml(spec.to_yaml()) == spec and spec.train["device"] == "1e3"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "latent_dim: [1, 2",
            "spec: expected valid YAML, got expected ',' or ']', but got '<stream end>' at line 1,"
            " column 18 (while parsing a flow sequence)",
        ),
        ("latent_dim: 3\n  transition: x\n", "spec: expected valid YAML, got mapping values are not allowed here at line 2, column 13"),
        (
            "latent_dim: !!python/object/apply:os.system ['echo hi']\n",
            "spec: expected valid YAML, got could not determine a constructor for the tag"
            " 'tag:yaml.org,2002:python/object/apply:os.system' at line 1, column 13",
        ),
        ("- 1\n- 2\n", "spec: expected a mapping of spec keys (latent_dim, transition, ...) at the top level, got list [1, 2]"),
        ("false\n", "spec: expected a mapping of spec keys (latent_dim, transition, ...) at the top level, got bool False"),
        ("a: &a [1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
         "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
         "f: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
         "spec: expected at most 100000 values, got more (YAML aliases that repeat a part?)"),
        ("a: &a [*a]\n", "spec: expected at most 32 levels of nesting, got more"),
    ],
)  # fmt: skip
def test_text_that_is_not_a_spec_document_is_refused_in_one_line(text, message):
    with pytest.raises(ValueError) as e:
        Spec.from_yaml(text)
    assert str(e.value) == message


def test_a_python_tag_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "config.yaml"
    config.write_text(f'!!python/object/apply:os.system ["touch {marker}"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"could not determine a constructor for the tag .*os\.system"):
        Spec.from_file(config)
    with pytest.raises(ValueError, match=r"--set latent_dim: expected valid YAML, got could not determine"):
        yaml_value(f'!!python/object/apply:os.system ["touch {marker}"]', "--set latent_dim")
    assert not marker.exists()


def test_from_file_reads_any_suffix_and_refuses_what_is_not_a_spec_file(tmp_path):
    (tmp_path / "spec.txt").write_text("latent_dim: 4\noptim: {name: SGD, lr: 1e-2}\n", encoding="utf-8")
    spec = Spec.from_file(tmp_path / "spec.txt")
    assert spec.latent_dim == 4 and spec.optim == {"name": "SGD", "lr": 0.01}
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    assert Spec.from_file(tmp_path / "empty.yaml") == Spec()  # an empty file is the default spec
    folder = tmp_path / "configs.yaml"
    folder.mkdir()
    for read in (Spec.from_file, Spec.from_yaml, lambda p: Spec.from_yaml(str(p))):
        with pytest.raises(ValueError) as e:
            read(folder)
        assert str(e.value) == f"{folder}: expected a YAML spec file, got a directory"
    with pytest.raises(ValueError) as e:
        Spec.from_file(tmp_path / "missing.yaml")
    assert str(e.value) == f"{tmp_path / 'missing.yaml'}: expected a YAML spec file, got no such file"
    (tmp_path / "latin1.yaml").write_bytes(b"latent_dim: 4\n# caf\xe9\n")
    with pytest.raises(ValueError) as e:
        Spec.from_file(tmp_path / "latin1.yaml")
    assert str(e.value) == f"{tmp_path / 'latin1.yaml'}: expected UTF-8 text, got the byte 0xe9 at offset 19"
    (tmp_path / "list.yaml").write_text("- latent_dim\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"list\.yaml: expected a mapping of spec keys .* got list \['latent_dim'\]"
    ):
        Spec.from_file(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("latent_dim: 4\ntransition: {name: gated\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^\S*bad\.yaml: expected valid YAML, got .* at line 3, column 1"):
        Spec.from_file(tmp_path / "bad.yaml")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_from_file_refuses_an_unreadable_file(tmp_path):
    config = tmp_path / "secret.yaml"
    config.write_text("latent_dim: 4\n", encoding="utf-8")
    config.chmod(0)
    with pytest.raises(
        ValueError, match=r"secret\.yaml: expected a readable YAML spec file, got .*Permission denied"
    ):
        Spec.from_file(config)


# ---------------------------------------------------------------- typed values


@pytest.mark.parametrize(
    "overrides, slot, expected",
    [
        ({"latent_dim": 12.0}, "latent_dim", 12),  # not the default's 8, which an ignored override would give
        ({"transition.hidden": [64.0, 32]}, "transition", {"name": "gaussian_mlp", "hidden": [64, 32]}),
        ({"emission.scale": 1}, "emission", {"name": "gaussian_mlp", "scale": 1.0}),
        ({"emission.scale": "learned"}, "emission", {"name": "gaussian_mlp", "scale": "learned"}),
        ({"planner": {"name": "cem", "discount": 1, "candidates": 1e3}}, "planner", {"name": "cem", "discount": 1.0, "candidates": 1000}),
        ({"train.lr": "1e-4", "train.num_steps": 2e3}, "train", {"lr": 1e-4, "num_steps": 2000}),
        ({"elbo": {"name": "Trace_ELBO", "num_particles": 2.0}}, "elbo", {"name": "Trace_ELBO", "num_particles": 2}),
        ({"elbo": {"name": "RenyiELBO", "alpha": 0}}, "elbo", {"name": "RenyiELBO", "alpha": 0.0}),
        ({"optim.weight_decay": 0}, "optim", {"name": "ClippedAdam", "lr": 1e-3, "clip_norm": 10.0, "weight_decay": 0.0}),
        ({"optim": {"name": "SGD", "lr": 1, "momentum": 0.9}}, "optim", {"name": "SGD", "lr": 1.0, "momentum": 0.9}),
        ({"optim": {"name": "Adam", "betas": (0.5, 0.9)}}, "optim", {"name": "Adam", "betas": [0.5, 0.9]}),
    ],
)  # fmt: skip
def test_values_are_converted_to_their_declared_types(overrides, slot, expected):
    value = getattr(Spec().with_overrides(overrides), slot)
    assert value == expected
    pairs = (
        [(value, expected)] if not isinstance(value, dict) else [(value[k], expected[k]) for k in expected]
    )
    for got, want in pairs:  # 1 == 1.0, so the types are compared too
        assert type(got) is type(want), (got, want)
        if isinstance(got, list):
            assert [type(v) for v in got] == [type(v) for v in want]


def test_check_stores_the_converted_values_and_build_checks_a_spec_object():
    spec = Spec(latent_dim=8.0, transition={"name": "gaussian_mlp", "hidden": (8.0,)})
    spec.check()
    assert spec.latent_dim == 8 and type(spec.latent_dim) is int
    assert (
        spec.transition == {"name": "gaussian_mlp", "hidden": [8]}
        and type(spec.transition["hidden"][0]) is int
    )
    b = build(Spec(latent_dim=3, optim={"name": "ClippedAdam", "lr": "1e-4"}), 3, BOX)
    assert b.optim.pt_optim_args == {"lr": 1e-4} and b.spec.optim["lr"] == 1e-4
    with pytest.raises(ValueError, match=r"^optim\.lr: expected a finite number > 0, got -1\.0$"):
        build(Spec(latent_dim=3, optim={"name": "ClippedAdam", "lr": -1}), 3, BOX)


def test_sgd_momentum_is_accepted_where_an_int_step_count_is_refused():
    spec = Spec().with_overrides({"optim": {"name": "SGD", "lr": 0.1, "momentum": 0.9}})
    b = build(spec.with_overrides({"latent_dim": 3}), 3, BOX)
    assert b.optim.pt_optim_constructor is torch.optim.SGD and b.optim.pt_optim_args == {
        "lr": 0.1,
        "momentum": 0.9,
    }
    with pytest.raises(ValueError) as e:
        Spec().with_overrides({"train.num_steps": 0.9})
    assert str(e.value) == "train.num_steps: expected an int, got 0.9"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optim.lr": -1}, "optim.lr: expected a finite number > 0, got -1.0"),
        ({"optim.lr": 0}, "optim.lr: expected a finite number > 0, got 0.0"),
        ({"optim.lr": math.nan}, "optim.lr: expected a number, got nan"),
        ({"optim.lr": math.inf}, "optim.lr: expected a finite number > 0, got inf"),
        ({"optim.lr": "fast"}, "optim.lr: expected a number, got 'fast'"),
        ({"optim.lr": True}, "optim.lr: expected a number, got True"),
        ({"optim.clip_norm": -1}, "optim.clip_norm: expected a finite number > 0, got -1.0"),
        ({"optim.lrd": 0}, "optim.lrd: expected a number in (0, 1], got 0.0"),
        ({"optim.lrd": 2}, "optim.lrd: expected a number in (0, 1], got 2.0"),
        ({"optim.eps": 0}, "optim.eps: expected a finite number > 0, got 0.0"),
        ({"optim.weight_decay": -0.1}, "optim.weight_decay: expected a finite number >= 0, got -0.1"),
        ({"optim.betas": [0.9, 1.0]}, "optim.betas[1]: expected a number in [0, 1), got 1.0"),
        ({"optim.betas": 0.9}, "optim.betas: expected a list of 2 numbers, got 0.9"),
        ({"optim.betas": [0.9]}, "optim.betas: expected a list of 2 numbers, got [0.9]"),
        ({"optim.centered_variance": "yes"}, "optim.centered_variance: expected true or false, got 'yes'"),
        ({"optim": {"name": "SGD", "lr": 0.1, "momentum": 1.0}}, "optim.momentum: expected a number in [0, 1), got 1.0"),
        ({"optim": {"name": "SGD", "lr": 0.1, "dampening": -0.5}}, "optim.dampening: expected a number in [0, 1), got -0.5"),
        ({"optim": {"name": "RMSprop", "alpha": 1}}, "optim.alpha: expected a number in [0, 1), got 1.0"),
        ({"optim.momentum": 0.9}, "optim.momentum: ClippedAdam takes no keyword 'momentum'; it accepts ['lr', 'betas', 'eps', 'weight_decay', 'clip_norm', 'lrd', 'centered_variance']"),
        ({"optim": {"name": "Adam", "lr_": 0.1}}, "optim.lr_: Adam takes no keyword 'lr_' (did you mean 'lr'?); it accepts"),
        ({"optim": {"name": "Adam", "params": []}}, "optim.params: Adam takes no keyword 'params'"),
        ({"train.num_steps": 0}, "train.num_steps: expected an int >= 1, got 0"),
        ({"train.batch_size": 0}, "train.batch_size: expected an int >= 1, got 0"),
        ({"train.checkpoint_every": 0}, "train.checkpoint_every: expected an int >= 1, got 0"),
        ({"train.terms_every": -1}, "train.terms_every: expected an int >= 0, got -1"),
        ({"train.lr": 0}, "train.lr: expected a finite number > 0, got 0.0"),
        ({"train.train": "both"}, "train.train: expected one of ['all', 'model', 'guide'], got 'both'"),
        ({"train.progress": 1}, "train.progress: expected true or false, got 1"),
        ({"train.device": 3}, "train.device: expected a str or a device or null, got 3"),
        ({"train": [1]}, "train: expected a dict of fit's keywords, got [1]"),
        ({"elbo": {"name": "RenyiELBO", "alpha": 1}}, "elbo.alpha: expected a finite number other than 1, got 1.0"),
        ({"elbo.num_particles": 0}, "elbo.num_particles: expected an int in [1, 65536], got 0"),
        ({"elbo.num_particles": 1.5}, "elbo.num_particles: expected an int, got 1.5"),
        ({"elbo.max_plate_nesting": -1}, "elbo.max_plate_nesting: expected an int >= 0, got -1"),
        ({"elbo.batched": "yes"}, "elbo.batched: expected true or false, got 'yes'"),
        ({"elbo.monte_carlo_kl": 3}, "elbo.monte_carlo_kl: expected a str or a list of strs, got 3"),
        ({"transition.hidden": [8, 0.5]}, "transition.hidden[1]: expected an int, got 0.5"),
        ({"transition.hidden": "64"}, "transition.hidden: expected a list of ints, got '64'"),
        ({"transition.hidden": [8, 100000]}, "transition.hidden[1]: expected an int in [1, 65536], got 100000"),
        ({"transition.min_scale": None}, "transition.min_scale: expected a number or one of ['learned'], got None"),
        ({"emission.scale": [1]}, "emission.scale: expected a number or a str, got [1]"),
        ({"guide.rnn_dim": True}, "guide.rnn_dim: expected an int, got True"),
        ({"guide.rnn_dim": 2**64}, "guide.rnn_dim: expected an int in [1, 65536], got an int of 65 bits"),
        ({"planner": {"name": "cem", "candidates": 10**6}}, "planner.candidates: expected an int in [1, 65536], got 1000000"),
        ({"planner": {"name": "cem", "sample_latents": "no"}}, "planner.sample_latents: expected true or false, got 'no'"),
        ({"latent_dim": 1000000000}, "latent_dim: expected an int in [1, 65536], got 1000000000"),
        ({"latent_dim": 0.5}, "latent_dim: expected an int, got 0.5"),
        ({"policy.name": ["auto"]}, "policy.name: expected a str, got ['auto']"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_naming_the_key_the_expected_and_the_given(overrides, message):
    with pytest.raises(ValueError) as e:
        Spec().with_overrides(overrides)
    assert str(e.value).startswith(message)


def test_a_user_optimiser_is_checked_against_the_torch_optimiser_it_wraps():
    def wrapping(cls):
        def factory(optim_args):
            return pyro.optim.PyroOptim(cls, optim_args)

        return factory

    def hiding(optim_args, name="Adagrad"):  # its torch class cannot be found: only names are checked
        return pyro.optim.PyroOptim(getattr(torch.optim, name), optim_args)

    register("optim", "test_adagrad")(wrapping(torch.optim.Adagrad))
    register("optim", "test_hidden")(hiding)
    try:
        spec = Spec().with_overrides({"optim": {"name": "test_adagrad", "lr": 1, "lr_decay": 0}})
        assert spec.optim == {"name": "test_adagrad", "lr": 1.0, "lr_decay": 0.0}
        assert type(spec.optim["lr_decay"]) is float  # annotated float in torch, given 0
        b = build(spec.with_overrides({"latent_dim": 3}), 3, BOX)
        assert b.optim.pt_optim_constructor is torch.optim.Adagrad
        with pytest.raises(
            ValueError,
            match=r"^optim\.lr_decy: Adagrad takes no keyword 'lr_decy' \(did you mean 'lr_decay'\?\)",
        ):
            Spec().with_overrides({"optim": {"name": "test_adagrad", "lr_decy": 0.1}})
        with pytest.raises(ValueError, match=r"^optim\.lr: expected a finite number > 0, got -1\.0$"):
            Spec().with_overrides({"optim": {"name": "test_hidden", "lr": -1}})
        hidden = Spec().with_overrides({"optim": {"name": "test_hidden", "lr": "1e-2", "lr_decay": 0}})
        assert hidden.optim == {
            "name": "test_hidden",
            "lr": 0.01,
            "lr_decay": 0,
        }  # lr by name; lr_decay as given
    finally:
        del REGISTRY["optim"]["test_adagrad"], REGISTRY["optim"]["test_hidden"]


def test_a_user_class_is_typed_by_its_annotations_or_defaults_and_needs_its_required_arguments():
    @register("transition", "test_typed")
    class Typed(nn.Module):
        def __init__(self, latent_dim, action_dim, width, step=0.5, widths: Sequence[int] = (4,), mode="a"):
            super().__init__()
            self.latent_dim, self.action_dim = latent_dim, action_dim
            self.width, self.step, self.widths, self.mode = width, step, widths, mode

    try:
        spec = Spec().with_overrides(
            {"transition": {"name": "test_typed", "width": 3, "step": 1, "widths": [2.0]}}
        )
        assert spec.transition == {"name": "test_typed", "width": 3, "step": 1.0, "widths": [2]}
        assert type(spec.transition["step"]) is float and type(spec.transition["widths"][0]) is int
        for part, message in [
            ({"step": 0.1}, "transition.width: Typed needs a value for 'width', got none"),
            ({"width": 3, "step": "x"}, "transition.step: expected a number, got 'x'"),
            ({"width": 3, "mode": 1}, "transition.mode: expected a str, got 1"),
            ({"width": [3]}, None),  # no annotation and no default: any plain value
            ({"width": 3, "widths": [0]}, None),  # not named as a size: left to the class
            ({"width": {1: 2}}, "transition.width: expected a mapping with str keys, got the key 1"),
        ]:
            if message is None:
                Spec().with_overrides({"transition": {"name": "test_typed", **part}})
                continue
            with pytest.raises(ValueError) as e:
                Spec().with_overrides({"transition": {"name": "test_typed", **part}})
            assert str(e.value) == message
    finally:
        del REGISTRY["transition"]["test_typed"]


# ---------------------------------------------------------------- sizes and memory


def _model_and_guide_parameters(b):
    modules = [
        b.model,
        b.guide,
        b.planner if isinstance(b.planner, nn.Module) else getattr(b.planner, "critic", None),
    ]
    tensors = {id(p): p for m in modules if m is not None for p in m.parameters()}
    return sum(p.numel() for p in tensors.values())


@pytest.mark.parametrize(
    "spec",
    [
        {"latent_dim": 3},
        {"latent_dim": 40, "transition": {"name": "rssm", "deter_dim": 50, "hidden": [70]}, "reward": {"name": "gaussian"}, "planner": {"name": "actor_critic", "hidden": [33]}},
        {"latent_dim": 70, "guide": {"name": "iaf_filter", "iaf_hidden": [80, 90], "hidden": [40]}, "emission": {"name": "student_t"}, "init": {"name": "learned_gaussian"}},
        {"latent_dim": 5, "transition": {"name": "student_t"}, "continuation": {"name": "bernoulli"}, "reward": {"name": "gaussian"}, "planner": {"name": "cem", "terminal_value": True}},
        {"latent_dim": 50, "transition": {"name": "gated", "hidden": [200]}, "guide": {"name": "smoothing", "rnn_dim": 100}, "policy": {"name": "tanh_normal"}},
    ],
)  # fmt: skip
def test_the_parameter_count_is_that_of_the_built_model_without_building_it(spec):
    space = ActionSpace.box(2, low=[-1.0, 0.0], high=[2.0, 0.5])
    store = len(list(pyro.get_param_store().keys()))
    torch.manual_seed(5)
    count = count_parameters(spec, 3, space)
    after_count = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_count)  # the count drew no random numbers
    assert count == _model_and_guide_parameters(build(spec, 3, space))
    assert len(list(pyro.get_param_store().keys())) == store


def test_a_spec_too_large_for_memory_is_refused_fast_before_anything_is_allocated():
    spec = {"latent_dim": MAX_SIZE, "transition": {"name": "gaussian_mlp", "hidden": [MAX_SIZE, MAX_SIZE]}}
    count = count_parameters(spec, 3, BOX)
    H = MAX_SIZE
    assert count > (H + 2) * H + H * H + H * 2 * H  # the transition's three weight matrices alone
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 16 * count <= memory:
        pytest.skip(f"this machine has {memory} bytes of memory, room for the spec")
    first = build({"latent_dim": 3}, 3, BOX)
    peak, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(ValueError) as e:
        build(spec, 3, BOX)
    assert time.perf_counter() - start < 5.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2**20  # KiB: less than 1 GiB more
    assert str(e.value).startswith(
        f"spec: expected parameters that fit in this machine's {memory / 2**30:,.1f} GiB of memory, got"
        f" {count:,} parameters, which need {16 * count / 2**30:,.1f} GiB"
    )
    # Counting built nothing that took a param-store name: the next model and guide are numbered on.
    second = build({"latent_dim": 3}, 3, BOX)
    names = (first.model.name, first.guide.name, second.model.name, second.guide.name)
    numbers = [int(name.rsplit("_", 1)[1]) for name in names]
    assert numbers == list(range(numbers[0], numbers[0] + 4))


def test_latent_dim_beyond_the_bound_is_refused_before_building():
    start = time.perf_counter()
    with pytest.raises(ValueError) as e:
        build(Spec.from_yaml("latent_dim: 1000000000\n"), 3, BOX)
    assert str(e.value) == "latent_dim: expected an int in [1, 65536], got 1000000000"
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
)  # fmt: skip
def test_running_out_of_memory_while_building_is_a_value_error_naming_the_spec(error):
    @register("transition", "test_greedy")
    class Greedy(nn.Module):  # fails only when it allocates for real, after the count
        def __init__(self, latent_dim, action_dim):
            super().__init__()
            self.latent_dim, self.action_dim = latent_dim, action_dim
            if not torch.empty(2000).is_meta:
                raise error

    try:
        with pytest.raises(ValueError) as e:
            build({"latent_dim": 2, "transition": {"name": "test_greedy"}}, 3, BOX)
        assert str(e.value).startswith(f"spec: building its parts ran out of memory ({type(error).__name__}")
        assert str(e.value).endswith("make latent_dim (2) or the hidden widths smaller")
    finally:
        del REGISTRY["transition"]["test_greedy"]


def test_an_allocation_that_fails_while_counting_and_an_unrelated_error_are_told_apart():
    @register("transition", "test_huge")
    class Huge(nn.Module):  # asks for 128 TiB on the CPU, past the meta device
        def __init__(self, latent_dim, action_dim, boom: bool = False):
            super().__init__()
            self.latent_dim, self.action_dim, self.boom = latent_dim, action_dim, boom
            if boom:
                raise RuntimeError("boom")
            self.table = torch.empty(2**45, device="cpu")

    try:
        with pytest.raises(
            ValueError,
            match=r"^spec: building its parts ran out of memory \(RuntimeError: .*can't allocate memory",
        ):
            build({"latent_dim": 2, "transition": {"name": "test_huge"}}, 3, BOX)
        with pytest.raises(RuntimeError, match="^boom$"):  # not a memory error: not relabelled
            build({"latent_dim": 2, "transition": {"name": "test_huge", "boom": True}}, 3, BOX)
    finally:
        del REGISTRY["transition"]["test_huge"]


def test_a_part_that_cannot_be_counted_without_allocating_is_built_unchecked():
    @register("transition", "test_reads_values")
    class ReadsValues(nn.Module):  # reads a tensor it allocates: impossible on the meta device
        def __init__(self, latent_dim, action_dim):
            super().__init__()
            self.latent_dim, self.action_dim = latent_dim, action_dim
            self.weight = nn.Parameter(torch.zeros(latent_dim, 2000))
            self.total = float(self.weight.sum().item())

    try:
        spec = {"latent_dim": 2, "transition": {"name": "test_reads_values"}}
        assert count_parameters(spec, 3, BOX) is None
        assert build(spec, 3, BOX).model.transition.weight.shape == (2, 2000)
    finally:
        del REGISTRY["transition"]["test_reads_values"]


def test_overrides_copy_the_values_they_are_given():
    part = {"name": "gated", "hidden": [4]}
    spec = Spec().with_overrides({"transition": part, "transition.hidden": [8]})
    assert spec.transition == {"name": "gated", "hidden": [8]} and part == {"name": "gated", "hidden": [4]}
