"""The Pyro model: its sites, its masking and its parameters."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_worldmodel import ActionSpace, FilterGuide, LinearGaussianSSM, WorldModel, fit

BOX = ActionSpace.box(2)


def small(space=BOX, name=None):
    model = WorldModel.default(3, space, latent_dim=2, hidden=(8,), name=name)
    return model, FilterGuide.for_model(model, rnn_dim=8, hidden=(8,))


def test_sites_and_shapes():
    model, guide = small()
    obs, actions = torch.randn(4, 6, 3), torch.randn(4, 6, 2)
    trace = poutine.trace(
        poutine.replay(model.model, poutine.trace(guide).get_trace(obs, actions))
    ).get_trace(obs, actions)
    sample_sites = [
        n for n, s in trace.nodes.items() if s["type"] == "sample" and s["name"] not in ("episodes", "time")
    ]
    assert sample_sites == [f"z_{t}" for t in range(6)] + ["x", "a"]
    assert trace.nodes["x"]["is_observed"] and trace.nodes["a"]["is_observed"]
    assert not trace.nodes["z_0"]["is_observed"]
    assert trace.nodes["z_3"]["fn"].batch_shape == (4, 1)
    assert trace.nodes["z_3"]["fn"].event_shape == (2,)
    assert trace.nodes["x"]["fn"].batch_shape == (4, 6)
    assert trace.nodes["x"]["fn"].event_shape == (3,)


def test_discrete_actions_use_a_categorical_policy():
    model, guide = small(ActionSpace.discrete(3))
    obs, actions = torch.randn(2, 4, 3), torch.randint(3, (2, 4))
    trace = poutine.trace(model.model).get_trace(obs, actions)
    z = torch.cat([trace.nodes[f"z_{t}"]["value"] for t in range(4)], dim=-2)  # (B, T, Z)
    logits = model.policy.net(z)
    expected = torch.distributions.Categorical(logits=logits).log_prob(actions).sum()
    torch.testing.assert_close(trace.nodes["a"]["fn"].log_prob(actions).sum(), expected)
    fit(model, guide, obs, actions, num_steps=2, progress=False)


def tmf_loss(model, guide, obs, actions, mask, seed=1):
    pyro.set_rng_seed(seed)
    return TraceMeanField_ELBO(max_plate_nesting=2).loss(model.model, guide, obs, actions, mask)


def test_junk_after_the_mask_does_not_change_the_loss():
    model, guide = small()
    obs, actions = torch.randn(3, 8, 3), torch.randn(3, 8, 2)
    lengths = torch.tensor([8, 5, 2])
    mask = torch.arange(8) < lengths[:, None]
    clean = tmf_loss(model, guide, obs * mask[..., None], actions * mask[..., None], mask)
    junk_obs = torch.where(mask[..., None], obs, 1e3 * torch.randn_like(obs))
    junk_actions = torch.where(mask[..., None], actions, -7.0)
    assert tmf_loss(model, guide, junk_obs, junk_actions, mask) == pytest.approx(clean, rel=1e-6)
    # the control: junk inside the mask does change it
    inside = junk_obs.clone()
    inside[1, 4] = 50.0
    assert abs(tmf_loss(model, guide, inside, junk_actions, mask) - clean) > 1.0


def test_masked_density_is_the_sum_over_truncated_episodes():
    ssm = LinearGaussianSSM.random(2, 3, 2, seed=1)
    obs, actions, z = ssm.sample(3, 6, seed=2)
    model = ssm.world_model()
    lengths = [6, 3, 1]
    mask = torch.arange(6) < torch.tensor(lengths)[:, None]

    def log_density(o, a, zz, m=None):
        data = {f"z_{t}": zz[:, t : t + 1] for t in range(o.shape[1])}
        return poutine.trace(poutine.condition(model.model, data)).get_trace(o, a, m).log_prob_sum()

    padded = log_density(obs, actions, z, mask)
    parts = sum(
        log_density(obs[b : b + 1, :L], actions[b : b + 1, :L], z[b : b + 1, :L])
        for b, L in enumerate(lengths)
    )
    torch.testing.assert_close(padded, parts, rtol=1e-12, atol=1e-10)


def test_guide_is_a_filter():
    """q(z_t | ·) must not depend on x or a after t."""
    model, guide = small()
    obs, actions = torch.randn(2, 7, 3), torch.randn(2, 7, 2)
    trace = poutine.trace(guide).get_trace(obs, actions)
    later = obs.clone()
    later[:, 4:] += 5.0
    late_actions = actions.clone()
    late_actions[:, 4:] -= 3.0  # a_4 first enters q(z_5)
    data = {f"z_{t}": trace.nodes[f"z_{t}"]["value"] for t in range(7)}
    trace2 = poutine.trace(poutine.condition(guide, data)).get_trace(later, late_actions)
    for t in range(7):
        same = torch.equal(trace.nodes[f"z_{t}"]["fn"].mean, trace2.nodes[f"z_{t}"]["fn"].mean)
        assert same == (t < 4), t


@pytest.mark.parametrize("elbo_cls", [TraceMeanField_ELBO, Trace_ELBO])
def test_vectorized_particles(elbo_cls):
    model, guide = small()
    obs, actions = torch.randn(2, 5, 3), torch.randn(2, 5, 2)
    with pyro.plate("particles", 7, dim=-3):
        guide_trace = poutine.trace(guide).get_trace(obs, actions)
        trace = poutine.trace(poutine.replay(model.model, guide_trace)).get_trace(obs, actions)
    assert trace.nodes["z_4"]["value"].shape == (7, 2, 1, 2)  # (K, B, 1, Z)
    assert trace.nodes["x"]["fn"].batch_shape == (7, 2, 5)  # (K, B, T)
    assert trace.nodes["a"]["fn"].batch_shape == (7, 2, 5)
    # each particle's z gives that particle's own x likelihood
    z = torch.cat([trace.nodes[f"z_{t}"]["value"] for t in range(5)], dim=-2)  # (K, B, T, Z)
    per_particle = trace.nodes["x"]["fn"].log_prob(obs)  # (K, B, T)
    torch.testing.assert_close(per_particle[3], model.emission(z[3]).log_prob(obs))
    # the vectorised K-particle loss is the mean of K single-particle losses on the same draws
    pyro.set_rng_seed(4)
    elbo = elbo_cls(num_particles=7, vectorize_particles=True, max_plate_nesting=2)
    loss = elbo.differentiable_loss(model.model, guide, obs, actions)
    loss.backward()
    assert all(p.grad is not None for p in model.transition.parameters())
    pyro.set_rng_seed(4)
    with pyro.plate("particles", 7, dim=-3):
        guide_trace = poutine.trace(guide).get_trace(obs, actions)
    singles = []
    for k in range(7):
        draw = poutine.Trace()
        for t in range(5):
            value = guide_trace.nodes[f"z_{t}"]["value"][k]
            draw.add_node(f"z_{t}", type="sample", value=value, is_observed=False, infer={})
        single = elbo_cls(max_plate_nesting=2).loss(
            model.model, poutine.replay(guide, trace=draw), obs, actions
        )
        singles.append(single)
    assert loss.item() == pytest.approx(sum(singles) / 7, rel=1e-5)


def test_two_models_in_one_process_have_disjoint_parameters_and_both_train():
    obs, actions = torch.randn(8, 5, 3), torch.randn(8, 5, 2)
    first, first_guide = small()
    second, second_guide = small()
    fit(first, first_guide, obs, actions, num_steps=3, progress=False)
    before = [p.detach().clone() for p in first.parameters()]
    second_before = [p.detach().clone() for p in second.parameters()]
    fit(second, second_guide, obs, actions, num_steps=3, progress=False)
    names = {m.name for m in (first, first_guide, second, second_guide)}
    assert len(names) == 4
    store = pyro.get_param_store()
    ids = {}
    for key in store.keys():
        ids.setdefault(key.split("$$$")[0], set()).add(id(store._params[key]))
    assert set(ids) == names
    assert not ids[first.name] & ids[second.name]
    assert all(torch.equal(b, p) for b, p in zip(before, first.parameters()))  # untouched
    assert any(not torch.equal(b, p) for b, p in zip(second_before, second.parameters()))


def test_a_name_taken_by_another_module_is_refused():
    obs, actions = torch.randn(2, 3, 3), torch.randn(2, 3, 2)
    first, _ = small(name="wm")
    first.model(obs, actions)
    second, _ = small(name="wm")
    with pytest.raises(ValueError, match=r"name: the Pyro param store holds another tensor under 'wm'"):
        second.model(obs, actions)


def test_components_must_agree_on_sizes():
    from pyro_worldmodel.model.components import (
        GaussianMLPEmission,
        GaussianMLPTransition,
        NormalPolicy,
        StandardNormalInit,
    )

    space = ActionSpace.box(2)
    with pytest.raises(
        ValueError, match=r"GaussianMLPEmission: expected latent_dim=4 as in StandardNormalInit, got 3"
    ):
        WorldModel(
            StandardNormalInit(4),
            GaussianMLPTransition(4, 2),
            GaussianMLPEmission(3, 5),
            NormalPolicy(4, space),
        )
    with pytest.raises(ValueError, match=r"transition: expected action_dim=2"):
        WorldModel(
            StandardNormalInit(4),
            GaussianMLPTransition(4, 3),
            GaussianMLPEmission(4, 5),
            NormalPolicy(4, space),
        )


def test_a_component_swapped_in_after_training_began_is_refused():
    obs, actions = torch.randn(4, 3, 3), torch.randn(4, 3, 2)
    model, guide = small()
    fit(model, guide, obs, actions, num_steps=2, progress=False)
    from pyro_worldmodel.model.components import GaussianMLPEmission

    model.emission = GaussianMLPEmission(2, 3, hidden=(8,))
    with pytest.raises(ValueError, match=r"name: the Pyro param store holds another tensor under .*emission"):
        fit(model, guide, obs, actions, num_steps=2, progress=False)


def rssm_model(D=5, space=BOX):
    from pyro_worldmodel.model.components import (
        GaussianMLPEmission,
        RSSMTransition,
        StandardNormalInit,
        auto_policy,
    )

    Z = 2
    return WorldModel(
        StandardNormalInit(Z),
        RSSMTransition(Z, space.feature_dim, deter_dim=D, hidden=(8,)),
        GaussianMLPEmission(Z + D, 3, hidden=(8,)),
        auto_policy(Z + D, space, hidden=(8,)),
    )


def test_a_recurrent_transition_gives_the_rssm_joint_density():
    """log p(x, a, z) of the RSSM written out by hand: h_1 = 0, h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]),
    and the emission and the policy read [h_t, z_t]."""
    model = rssm_model()
    B, T, Z, D = 3, 5, 2, 5
    obs, actions, z = torch.randn(B, T, 3), torch.randn(B, T, 2), torch.randn(B, T, Z)
    conditioned = poutine.condition(model.model, data={f"z_{t}": z[:, t : t + 1] for t in range(T)})
    trace = poutine.trace(conditioned).get_trace(obs, actions)
    got = trace.log_prob_sum()
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z[:, 0]).sum()
    h = torch.zeros(B, 1, D)
    feats = [torch.cat([h, z[:, :1]], -1)]
    for t in range(1, T):
        prior, h = model.transition(z[:, t - 1 : t], actions[:, t - 1 : t], h)
        expected = expected + prior.log_prob(z[:, t : t + 1]).sum()
        feats.append(torch.cat([h, z[:, t : t + 1]], -1))
    feats = torch.cat(feats, 1)  # (B, T, D + Z)
    expected = (
        expected + model.emission(feats).log_prob(obs).sum() + model.policy(feats).log_prob(actions).sum()
    )
    torch.testing.assert_close(got, expected)


def test_the_rssm_prior_remembers_more_than_the_last_latent():
    """With a Markov transition, z_3's prior depends on the past through z_2 only;
    through the deterministic path, the RSSM's depends on z_1 as well."""
    model = rssm_model()
    obs, actions = torch.randn(1, 3, 3), torch.randn(1, 3, 2)

    def prior_of_z2(z0):
        data = {"z_0": z0, "z_1": torch.zeros(1, 1, 2), "z_2": torch.zeros(1, 1, 2)}
        trace = poutine.trace(poutine.condition(model.model, data=data)).get_trace(obs, actions)
        return trace.nodes["z_2"]["fn"].mean

    assert not torch.allclose(prior_of_z2(torch.zeros(1, 1, 2)), prior_of_z2(torch.ones(1, 1, 2)))


def test_an_rssm_world_model_trains_and_dreams():
    from pyro_worldmodel import imagine

    model = rssm_model(space=ActionSpace.discrete(3))
    guide = FilterGuide.for_model(model, rnn_dim=8, hidden=(8,))
    obs, actions = torch.randn(4, 6, 3), torch.randint(3, (4, 6))
    before = {k: v.clone() for k, v in model.transition.state_dict().items()}
    history = fit(model, guide, obs, actions, num_steps=3, progress=False)
    assert all(torch.isfinite(torch.tensor(history.loss)))
    assert any(not torch.equal(before[k], v) for k, v in model.transition.state_dict().items())
    dream = imagine(model, guide, obs[:2], actions[:2], 4, num_samples=5)
    assert dream.obs.shape == (5, 2, 4, 3) and dream.latents.shape == (5, 2, 4, 2)
    seen = []
    imagine(
        model,
        guide,
        obs[:2],
        actions[:2],
        2,
        num_samples=3,
        future_actions=lambda f: seen.append(f.shape) or torch.zeros(f.shape[:-1], dtype=torch.long),
    )
    assert seen and all(s[-1] == 2 + 5 for s in seen)  # the callable sees [h_t, z_t], as the policy does


def test_readers_of_a_recurrent_transition_must_take_its_features():
    from pyro_worldmodel.model.components import (
        GaussianMLPEmission,
        NormalPolicy,
        RSSMTransition,
        StandardNormalInit,
    )

    with pytest.raises(
        ValueError,
        match=r"GaussianMLPEmission: expected latent_dim=7 = latent_dim \+ RSSMTransition.deter_dim",
    ):
        WorldModel(
            StandardNormalInit(2),
            RSSMTransition(2, 2, deter_dim=5),
            GaussianMLPEmission(2, 3),
            NormalPolicy(7, BOX),
        )


def test_the_dream_carries_h_on_from_the_context():
    """Past the data, the RSSM steps h on from h_T, not from zero, and decodes [h_t, z_t]."""
    model, D = rssm_model(), 5
    B, T, H = 2, 4, 3
    obs, actions, future = torch.randn(B, T, 3), torch.randn(B, T, 2), torch.randn(B, H, 2)
    trace = poutine.trace(model.model).get_trace(obs, actions, horizon=H, future_actions=future)
    z = [trace.nodes[f"z_{t}"]["value"] for t in range(T + H)]  # (B, 1, Z) each
    a = torch.cat([actions, future], 1)
    h, features = torch.zeros(B, 1, D), []
    for t in range(1, T + H):
        prior, h = model.transition(z[t - 1], a[:, t - 1 : t], h)
        torch.testing.assert_close(trace.nodes[f"z_{t}"]["fn"].mean, prior.mean)
        if t >= T:
            features.append(torch.cat([h, z[t]], -1))
    torch.testing.assert_close(trace.nodes["features_future"]["value"], torch.cat(features, 1))
    torch.testing.assert_close(
        trace.nodes["x_future_mean"]["value"], model.emission(torch.cat(features, 1)).mean
    )


def bernoulli_model(space=BOX):
    from pyro_worldmodel.model.components import (
        BernoulliEmission,
        GaussianMLPTransition,
        StandardNormalInit,
        auto_policy,
    )

    model = WorldModel(
        StandardNormalInit(2),
        GaussianMLPTransition(2, space.feature_dim, hidden=(8,)),
        BernoulliEmission(2, 3, hidden=(8,)),
        auto_policy(2, space, hidden=(8,)),
    )
    return model, FilterGuide.for_model(model, rnn_dim=8, hidden=(8,))


def test_check_inputs_asks_the_emission_to_check_its_observations():
    model, _ = bernoulli_model()
    binary, actions = (torch.rand(2, 5, 3) > 0.5).float(), torch.randn(2, 5, 2)
    real = binary.clone()
    real[1, 2, 0] = 0.7
    message = r"obs: expected 0 or 1 on observed steps for a BernoulliEmission, got 0.7 at episode 1, step 2"
    with pyro.validation_enabled(False):
        with pytest.raises(ValueError, match=message):
            model.check_inputs(real, actions, check_values=True)
        model.check_inputs(real, actions)  # values unchecked: as asked, with validation off
    with pytest.raises(ValueError, match=message):
        model.check_inputs(real, actions)  # validation on, as in the suite
    model.check_inputs(real, actions, check_values=False)
    obs, _, _ = model.check_inputs(binary, actions, check_values=True)
    torch.testing.assert_close(obs, binary)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2:] = False  # the 0.7 is padding now
    model.check_inputs(real, actions, mask, check_values=True)


def test_fit_refuses_real_data_for_a_bernoulli_emission_before_any_step(tmp_path):
    """Pyro's own check comes only inside the first SVI step, and not at all with validation off."""
    model, guide = bernoulli_model()
    obs, actions = torch.randn(4, 5, 3), torch.randn(4, 5, 2)
    before = [p.detach().clone() for p in model.parameters()]
    steps = []
    with (
        pyro.validation_enabled(False),
        pytest.raises(
            ValueError, match=r"obs: expected 0 or 1 on observed steps for a BernoulliEmission, got"
        ),
    ):
        fit(
            model, guide, obs, actions, num_steps=3, checkpoint=tmp_path / "run.pt", checkpoint_every=1,
            callback=lambda step, history: steps.append(step), progress=False,
        )  # fmt: skip
    assert steps == [] and not (tmp_path / "run.pt").exists()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert not list(pyro.get_param_store().keys())
    # Binary data trains.
    history = fit(model, guide, (obs > 0).float(), actions, num_steps=3, progress=False)
    assert len(history.loss) == 3 and all(torch.isfinite(torch.tensor(history.loss)))


def test_the_default_model_is_the_default_specs():
    """One default: WorldModel.default makes the parts that build(Spec()) makes."""
    from pyro_worldmodel import ActionSpace, Spec, WorldModel, build

    for space in (ActionSpace.box(2), ActionSpace.discrete(3)):
        made = WorldModel.default(5, space)
        built = build(Spec(), 5, space).model
        assert made.latent_dim == built.latent_dim == Spec().latent_dim
        for part in ("init", "transition", "emission", "policy"):
            assert type(getattr(made, part)) is type(getattr(built, part)), part
        assert {k: v.shape for k, v in made.state_dict().items()} == {
            k: v.shape for k, v in built.state_dict().items()
        }
