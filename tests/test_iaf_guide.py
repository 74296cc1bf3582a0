"""The filter with IAF layers: its density, its identity start, its sites, and its bound on the anchor."""

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_worldmodel import ActionSpace, FilterGuide, LinearGaussianSSM, WorldModel, fit
from pyro_worldmodel.evaluate import log_weights
from pyro_worldmodel.model.guides import IAFFilterGuide


def perturbed_guide(latent_dim=2, num_iafs=2, dtype=torch.float64):
    """An IAF filter whose flows are far from the identity."""
    torch.manual_seed(0)
    guide = IAFFilterGuide(3, ActionSpace.box(1), latent_dim, hidden=(8,), num_iafs=num_iafs, iaf_hidden=(8,))
    guide = guide.to(dtype)
    with torch.no_grad():
        for iaf in guide.iafs:
            last = iaf.arn.layers[-1]
            last.weight.normal_(0.0, 0.5)
            last.bias.normal_(0.0, 0.5)
    return guide


def step_distribution(guide, batch=()):
    """q(z_t | z_{t-1}, h_t) at a random z_{t-1} and summary h_t."""
    dtype = guide.z_0.dtype
    z_prev = torch.randn(*batch, guide.latent_dim, dtype=dtype)
    h_t = torch.randn(*batch, guide.combiner.summary_dim, dtype=dtype)
    return guide.step(z_prev, guide.combiner.project(h_t), guide.step_weights())


def test_the_density_integrates_to_one_on_a_grid():
    """Scoring values the flow never sampled goes through its inverse and the log-Jacobians."""
    guide = perturbed_guide()
    q = step_distribution(guide)
    assert q.event_shape == (2,) and q.batch_shape == ()
    with torch.no_grad():
        draws = q.sample((20000,))
        low, high = draws.min(0).values - 1.0, draws.max(0).values + 1.0
        n = 500
        axes = [torch.linspace(low[i].item(), high[i].item(), n, dtype=torch.float64) for i in range(2)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (n, n, 2)
        cell = (axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0])
        mass = (q.log_prob(grid).exp().sum() * cell).item()
        # Its dimensions are correlated, unlike the combiner's Normal: the flow does something.
        corr = torch.corrcoef(draws.T)[0, 1].item()
    assert mass == pytest.approx(1.0, abs=2e-3)
    assert abs(corr) > 0.1, corr


def test_log_prob_of_a_sample_is_base_density_minus_log_det_jacobian():
    """log q(f(ε)) = log N(ε) − log|det ∂f/∂ε|, the Jacobian taken by autograd through f = f_K ∘ … ∘ f_1."""
    guide = perturbed_guide(latent_dim=3, num_iafs=3)
    q = step_distribution(guide)
    base = q.base_dist
    eps = base.sample()
    z = eps
    for iaf in q.transforms:
        z = iaf(z)  # fills each transform's cache, as rsample does

    def flow(x):
        for iaf in guide.iafs:
            x = iaf.fresh()(x)
        return x

    jacobian = torch.autograd.functional.jacobian(flow, eps)  # (Z, Z)
    expected = base.log_prob(eps) - torch.linalg.slogdet(jacobian).logabsdet
    torch.testing.assert_close(q.log_prob(z), expected)  # from the cache
    torch.testing.assert_close(q.log_prob(z.clone()), expected)  # by inverting the flow
    torch.testing.assert_close(flow(eps), z)
    assert q.has_rsample


def test_scoring_its_own_draws_inverts_nothing():
    """Each step's transforms keep that step's sample, so log q(z_t) after the whole
    sequence reads caches; one shared transform would invert Z network calls per step."""
    guide = perturbed_guide(latent_dim=3)
    calls = []
    for iaf in guide.iafs:
        iaf.arn.register_forward_hook(lambda *_: calls.append(1))
    obs, actions = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 1, dtype=torch.float64)
    trace = pyro.poutine.trace(guide).get_trace(obs, actions)
    assert len(calls) == 4 * guide.num_iafs  # one call per transform per step, to sample
    trace.compute_log_prob()
    assert len(calls) == 4 * guide.num_iafs
    values = [trace.nodes[f"z_{t}"]["value"] for t in range(4)]
    fresh = [trace.nodes[f"z_{t}"]["fn"].log_prob(v.clone()) for t, v in enumerate(values)]
    assert len(calls) == 4 * guide.num_iafs * (1 + 3)  # a value it did not draw: Z calls per transform
    for t in range(4):
        torch.testing.assert_close(trace.nodes[f"z_{t}"]["log_prob"], fresh[t])


def test_an_untrained_iaf_filter_is_the_plain_filter():
    """The IAFs start at the identity: with the filter's parameters loaded, the same draws, the same log q."""
    obs, actions = torch.randn(4, 6, 3), torch.randn(4, 6, 1)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 6, [True] + [False] * 5])
    plain = FilterGuide(3, ActionSpace.box(1), 2, hidden=(8,))
    iaf = IAFFilterGuide(3, ActionSpace.box(1), 2, hidden=(8,), iaf_hidden=(8,))
    missing, unexpected = iaf.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("iafs.") for k in missing)
    traces = []
    for guide in (plain, iaf):
        pyro.set_rng_seed(7)
        trace = pyro.poutine.trace(guide).get_trace(obs, actions, mask)
        trace.compute_log_prob()
        traces.append(trace)
    for t in range(6):
        p, q = traces[0].nodes[f"z_{t}"], traces[1].nodes[f"z_{t}"]
        torch.testing.assert_close(q["value"], p["value"])
        torch.testing.assert_close(q["log_prob"], p["log_prob"])
        # and at a value neither sampled
        other = torch.randn_like(p["value"])
        torch.testing.assert_close(q["fn"].log_prob(other), p["fn"].log_prob(other))
        assert (q["log_prob"][~mask[:, t]] == 0).all()  # masked steps score nothing
    # The same draws are not the same log q once the flows move.
    with torch.no_grad():
        iaf.iafs[0].arn.layers[-1].bias.fill_(0.3)
    pyro.set_rng_seed(7)
    moved = pyro.poutine.trace(iaf).get_trace(obs, actions, mask)
    assert not torch.allclose(moved.nodes["z_0"]["value"], traces[0].nodes["z_0"]["value"])


def test_samples_every_latent_site_with_the_models_shapes():
    model = WorldModel.default(3, ActionSpace.discrete(2), latent_dim=2, hidden=(8,))
    guide = IAFFilterGuide.for_model(model, hidden=(8,), iaf_hidden=(8,))
    obs, actions = torch.randn(4, 5, 3), torch.randint(2, (4, 5))
    model_trace = pyro.poutine.trace(model.model).get_trace(obs, actions)
    trace = pyro.poutine.trace(guide).get_trace(obs, actions)
    sites = {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and n.startswith("z_")}
    latents = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
    assert list(sites) == [f"z_{t}" for t in range(5)] == [n for n in latents if n.startswith("z_")]
    for site in sites.values():
        assert site["value"].shape == (4, 1, 2)
        assert site["fn"].batch_shape == (4, 1) and site["fn"].event_shape == (2,)
        assert site["fn"].has_rsample
    # Vectorised particles: a plate left of the episodes, and z_{t-1} with an extra leading dim.
    with pyro.plate("particles", 3, dim=-3):
        trace = pyro.poutine.trace(guide).get_trace(obs, actions)
    trace.compute_log_prob()
    assert trace.nodes["z_4"]["value"].shape == (3, 4, 1, 2)
    assert trace.nodes["z_4"]["log_prob"].shape == (3, 4, 1)
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=2)
    assert math.isfinite(elbo.loss(model.model, guide, obs, actions))


def test_a_few_svi_steps_train_the_flows():
    torch.manual_seed(0)
    model = WorldModel.default(3, ActionSpace.box(1), latent_dim=2, hidden=(8,))
    guide = IAFFilterGuide.for_model(model, hidden=(8,), iaf_hidden=(8,))
    obs, actions = torch.randn(8, 5, 3), torch.randn(8, 5, 1)
    before = {k: v.clone() for k, v in guide.iafs.state_dict().items()}
    history = fit(
        model,
        guide,
        obs,
        actions,
        num_steps=5,
        batch_size=8,
        elbo=Trace_ELBO(max_plate_nesting=2),
        progress=False,
    )
    assert len(history.loss) == 5 and all(math.isfinite(x) for x in history.loss)
    after = guide.iafs.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    # Every IAF's output layer learns, first from zero (the identity).
    for k in range(guide.num_iafs):
        assert f"{k}.arn.layers.1.weight" in moved and f"{k}.arn.layers.1.bias" in moved
    assert all(".permutation" not in name and ".mask" not in name for name in moved)


def test_keeps_its_arguments_and_names_what_is_wrong():
    guide = IAFFilterGuide(3, ActionSpace.box(1), 2, 16, [8], num_iafs=3, iaf_hidden=[4, 5], name="q")
    assert (guide.rnn_dim, guide.hidden, guide.num_iafs, guide.iaf_hidden) == (16, (8,), 3, (4, 5))
    assert guide.name == "q" and len(guide.iafs) == 3
    assert IAFFilterGuide(3, ActionSpace.box(1), 2).name.startswith("iaf_filter_guide_")
    bad = [
        (dict(num_iafs=0), r"num_iafs: expected an int >= 1, got 0"),
        (dict(num_iafs=True), r"num_iafs: expected an int >= 1, got True"),
        (dict(iaf_hidden=()), r"iaf_hidden: expected a non-empty .* got \(\)"),
        (dict(iaf_hidden=(8, 1)), r"iaf_hidden: expected .* ints >= latent_dim=2, got \(8, 1\)"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            IAFFilterGuide(3, ActionSpace.box(1), 2, **kwargs)
    with pytest.raises(ValueError, match=r"latent_dim: expected an int >= 2 .* got 1"):
        IAFFilterGuide(3, ActionSpace.box(1), 1)


T = 25
STEPS = 300  # as the filter and the smoother get in test_evaluate.py


@pytest.mark.slow
def test_on_the_anchor_the_iaf_filter_is_within_the_filters_spread_over_seeds():
    """Both trained by Trace_ELBO with the model held at the true parameters; their ELBO gaps to exact log p(x, a)."""
    ssm = LinearGaussianSSM.random(4, 6, 2, seed=0)
    obs, actions, _ = ssm.sample(64, T, seed=1)
    val_obs, val_actions, _ = ssm.sample(64, T, seed=2)  # held out: the gaps are measured here
    model = ssm.world_model()
    exact = ssm.log_prob(val_obs, val_actions).mean().item()  # -115.8 nats per sequence
    gaps = {}
    for cls in (FilterGuide, IAFFilterGuide):
        pyro.set_rng_seed(0)
        guide = cls.for_model(model).double()
        elbo = Trace_ELBO(max_plate_nesting=2)
        fit(
            model,
            guide,
            obs,
            actions,
            num_steps=STEPS,
            lr=3e-3,
            train="guide",
            elbo=elbo,
            seed=0,
            progress=False,
        )
        pyro.set_rng_seed(1)
        draws = log_weights(model, guide, val_obs, val_actions, num_particles=50).mean(
            1
        )  # (K,): ELBO per sequence
        gap, se = exact - draws.mean().item(), draws.std().item() / 50**0.5
        assert math.isfinite(gap) and gap > -3 * se, (cls.__name__, gap, se)
        gaps[cls.__name__] = gap, se
    print(
        f"exact {exact:.2f}; ELBO gap: " + ", ".join(f"{k} {g:.2f} ± {s:.2f}" for k, (g, s) in gaps.items())
    )
    # measured on the held-out episodes, gap filter / IAF filter in nats per sequence (± Monte
    # Carlo error 0.1): 15.25 / 12.95 (seed 0). On the training episodes, seeds 0, 1 and 2 gave
    # 14.51 / 12.48, 13.68 / 14.91 and 13.39 / 11.34: the flow is comparable, tighter on average
    # by 0.9 nats, not reliably so at 300 steps; with TraceMeanField the filter reaches 14.2
    # held out (test_evaluate.py).
    filt, iaf = gaps["FilterGuide"][0], gaps["IAFFilterGuide"][0]
    assert iaf < filt + 2.5  # no worse than the filter beyond the spread over seeds
    assert iaf < 20.0 and filt < 20.0
