"""Specs and the registry: every part swappable by name, from Python or YAML."""

import contextlib
import itertools
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_worldmodel import ActionSpace, elbo_terms, fit
from pyro_worldmodel.config import REGISTRY, Spec, build, register, spec_of
from pyro_worldmodel.elbos import MonteCarloKLWarning

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


TRANSITIONS = ["gaussian_mlp", "linear_gaussian", "gated", "rssm", "student_t"]
EMISSIONS = ["gaussian_mlp", "linear_gaussian", "student_t", "bernoulli"]
GUIDES = {
    "filter": {"rnn_dim": 8, "hidden": [8]},
    "smoothing": {"rnn_dim": 8, "hidden": [8]},
    "mean_field": {"hidden": [8]},
    "iaf_filter": {"rnn_dim": 8, "hidden": [8], "iaf_hidden": [8]},
}
SIZES = {"linear_gaussian": {}, "rssm": {"hidden": [8], "deter_dim": 4}}


def small(name):
    return {"name": name, **SIZES.get(name, {"hidden": [8]})}


def expected_kl(transition, guide, T):
    """Which estimator each z_t's KL must get: analytic wherever the pair has one."""
    if guide == "iaf_filter":  # a flow: no pair has an analytic KL
        return {f"z_{t}": "monte_carlo" for t in range(T)}
    later = "monte_carlo" if transition == "student_t" else "analytic"  # KL(Normal ‖ StudentT)
    return {"z_0": "analytic", **{f"z_{t}": later for t in range(1, T)}}


@pytest.mark.parametrize("elbo", ["TraceMeanField_ELBO", "Trace_ELBO"])
@pytest.mark.parametrize(
    "transition, emission, guide", list(itertools.product(TRANSITIONS, EMISSIONS, GUIDES))
)
@pytest.mark.parametrize("space", [BOX, DISCRETE], ids=["box", "discrete"])
def test_every_combination_trains(transition, emission, guide, elbo, space):
    spec = {
        "latent_dim": 3,
        "transition": small(transition),
        "emission": small(emission),
        "guide": {"name": guide, **GUIDES[guide]},
        "elbo": {"name": elbo},
        "optim": {"name": "ClippedAdam", "lr": 1e-2},
    }
    b = build(spec, 3, space)
    obs, actions = data(space)
    if emission == "bernoulli":
        obs = (obs > 0).float()
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
    for transition, emission, init in itertools.product(
        TRANSITIONS, EMISSIONS, ["standard_normal", "learned_gaussian"]
    ):
        spec = {
            "latent_dim": 4,
            "init": {"name": init},
            "transition": small(transition),
            "emission": small(emission),
        }
        pyro.set_rng_seed(1)
        first = build(spec, 3, BOX)
        read_back = spec_of(first.model, first.guide, first.elbo, first.optim)
        text = read_back.to_yaml()
        again = Spec.from_yaml(text)
        assert again == read_back and again.to_yaml() == text
        pyro.set_rng_seed(1)
        second = build(again, 3, BOX)
        assert spec_of(second.model, second.guide, second.elbo, second.optim) == read_back
        for a, b in ((first.model, second.model), (first.guide, second.guide)):
            pa, pb = parameters(a), parameters(b)
            assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
        assert (
            type(second.elbo) is type(first.elbo) and second.optim.pt_optim_args == first.optim.pt_optim_args
        )


@pytest.mark.parametrize("guide", sorted(GUIDES))
def test_round_trip_of_each_guide(guide):
    spec = {"latent_dim": 3, "guide": {"name": guide, **GUIDES[guide]}}
    pyro.set_rng_seed(3)
    first = build(spec, 3, DISCRETE)
    read_back = spec_of(first.model, first.guide)
    assert read_back.guide == {"name": guide, **GUIDES[guide]}
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
    a = build({"latent_dim": 3, "transition": small("gaussian_mlp")}, 3, BOX)
    b = build({"latent_dim": 3, "transition": small("linear_gaussian")}, 3, BOX)
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
            "transition.name: unknown 'gausian_mlp' (did you mean 'gaussian_mlp'?); registered: ['gated', 'gaussian_mlp', 'linear_gaussian', 'rssm', 'student_t'",
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
            "transition (rssm): deter_dim: expected a positive int, got 0",
        ),
        ({"latent": 3}, BOX, "spec: unknown key 'latent' (did you mean 'latent_dim'?)"),
        ({"latent_dim": 0}, BOX, "latent_dim: expected a positive int, got 0"),
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


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_build(path):
    spec = Spec.from_yaml(path)
    b = build(spec, 3, BOX)
    assert spec_of(b.model, b.guide).transition["name"] == spec.transition["name"]


@pytest.mark.parametrize(
    "name",
    [
        "student_t_transition__gaussian_mlp_emission__filter_guide",
        "student_t_transition__gaussian_mlp_emission__iaf_filter_guide",
        "rssm_transition__gaussian_mlp_emission__iaf_filter_guide",
    ],
)
def test_example_configs_declare_exactly_their_monte_carlo_pairs(name):
    """Warnings are errors here: an undeclared fallback would fail, and a declared one trains quietly."""
    spec = Spec.from_yaml(ROOT / "examples" / "configs" / f"{name}.yaml").with_overrides(
        {
            "latent_dim": 3,
            "transition.hidden": [8],
            "guide.rnn_dim": 8,
            "guide.hidden": [8],
            "guide.iaf_hidden": [8],
        }
        if "iaf" in name
        else {"latent_dim": 3, "transition.hidden": [8], "guide.rnn_dim": 8}
    )
    b = build(spec, 3, BOX)
    obs, actions = data(BOX)
    fit(b.model, b.guide, obs, actions, num_steps=2, elbo=b.elbo, optim=b.optim, progress=False)
    assert "monte_carlo" in b.elbo.kl_estimators.values()


def test_there_is_an_example_config_for_each_built_in_combination():
    names = {p.stem for p in (ROOT / "examples" / "configs").glob("*.yaml")}
    expected = {
        f"{t}_transition__{e}_emission__{g}_guide"
        for t, e, g in itertools.product(REGISTRY["transition"], REGISTRY["emission"], REGISTRY["guide"])
    }
    assert names == expected
