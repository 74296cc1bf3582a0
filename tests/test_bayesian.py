"""The Bayesian transition (BayesianMLPTransition): weights with a prior and a posterior,
checked against closed forms: its bound is the MLP transition's plus θ's Gaussian KL, the
KL's share per minibatch is B / N, each imagined future draws its own θ, and the spread
of the next state's mean over q(θ) is the linear-Gaussian one."""

import pyro
import pytest
import torch
from pyro.infer import Predictive

from pyro_worldmodel import ActionSpace, FilterGuide, TraceMeanField_ELBO, WorldModel, elbo_terms, fit
from pyro_worldmodel.act import CEMPlanner, LatentState
from pyro_worldmodel.config import build
from pyro_worldmodel.evaluate import iwae_log_likelihood
from pyro_worldmodel.model.components import (
    BayesianMLPTransition,
    GaussianMLPEmission,
    GaussianMLPTransition,
    NormalPolicy,
    StandardNormalInit,
)

Z, X, A = 2, 3, 1
SPACE = ActionSpace.box(A)


def models(posterior_scale=0.05, seed=0):
    """A Bayesian world model and the same model with a point-estimate transition: the same
    weights (θ's mean), emission, policy and guide."""
    torch.manual_seed(seed)
    bayes = BayesianMLPTransition(Z, A, hidden=(5,), posterior_scale=posterior_scale, prior_scale=0.7)
    with torch.no_grad():  # θ's mean away from zero
        for layer in (bayes.linear, bayes.net[-1]):
            layer.weight.normal_(0, 0.3)
            layer.bias.normal_(0, 0.3)
        bayes.weight_log_scale.set(torch.log(torch.rand(bayes.num_weights) * posterior_scale + 1e-3))
    plain = GaussianMLPTransition(Z, A, hidden=(5,))
    plain.load_state_dict({k: v for k, v in bayes.state_dict().items() if k in plain.state_dict()})
    parts = StandardNormalInit(Z), GaussianMLPEmission(Z, X, hidden=(4,)), NormalPolicy(Z, SPACE, hidden=(4,))
    m_bayes = WorldModel(parts[0], bayes, parts[1], parts[2])
    m_plain = WorldModel(parts[0], plain, parts[1], parts[2])
    guide = FilterGuide.for_model(m_bayes, rnn_dim=4, hidden=(4,))
    return m_bayes, m_plain, guide


def data(B=4, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, X, generator=g), torch.randn(B, T, A, generator=g)


def gaussian_kl(q_loc, q_scale, p_scale):
    """KL(N(q_loc, q_scale²) ‖ N(0, p_scale²)), summed: the closed form."""
    return (torch.log(p_scale / q_scale) + (q_scale**2 + q_loc**2) / (2 * p_scale**2) - 0.5).sum()


def test_the_bound_is_the_mlp_transitions_plus_the_weights_kl_as_the_posterior_narrows():
    """With σ(θ) → 0 the draw of θ is its mean: the loss is the point-estimate model's at the
    same z draws, plus (B / N) · KL(q(θ) ‖ p(θ)), the Gaussian closed form."""
    model, plain, guide = models()
    tr = model.transition
    tr.weight_log_scale.set(torch.full((tr.num_weights,), -30.0))  # σ = 9e-14
    obs, actions = data()
    N = 10
    tr.num_episodes.fill_(N)
    plain_guide = FilterGuide.for_model(plain, rnn_dim=4, hidden=(4,))
    plain_guide.load_state_dict(guide.state_dict())
    for batched in (True, False):
        elbo = TraceMeanField_ELBO(max_plate_nesting=2, batched=batched)
        pyro.set_rng_seed(3)
        loss = elbo.loss(model.model, guide, obs, actions)
        # the guide draws θ first: consume the same normals before the plain model's z draws
        pyro.set_rng_seed(3)
        torch.randn(tr.num_weights)
        plain_loss = TraceMeanField_ELBO(max_plate_nesting=2, batched=batched).loss(
            plain.model, plain_guide, obs, actions
        )
        loc = tr.weight_loc().detach()
        kl = gaussian_kl(loc, torch.full_like(loc, 9.357622968840175e-14), torch.tensor(0.7))
        assert loss == pytest.approx(plain_loss + float(kl) * obs.shape[0] / N, rel=1e-5)


def test_the_weights_kl_is_shared_out_over_the_episodes_of_the_data():
    """loss(N₁) − loss(N₂) = KL · (B/N₁ − B/N₂), at the same draws; N unset is the whole KL."""
    model, _, guide = models()
    tr = model.transition
    obs, actions = data()
    B = obs.shape[0]
    elbo = TraceMeanField_ELBO(max_plate_nesting=2)
    losses = {}
    for n in (0, 8, 80):
        tr.num_episodes.fill_(n)
        pyro.set_rng_seed(5)
        losses[n] = elbo.loss(model.model, guide, obs, actions)
    kl = float(gaussian_kl(tr.weight_loc().detach(), tr.weight_log_scale().exp().detach(), torch.tensor(0.7)))
    assert losses[0] - losses[80] == pytest.approx(kl * (1 - B / 80), rel=1e-4)
    assert losses[8] - losses[80] == pytest.approx(kl * (B / 8 - B / 80), rel=1e-4)


def test_fit_spreads_the_kl_over_its_episodes_and_refuses_a_guide_without_the_weights():
    model, _, guide = models()
    obs, actions = data(B=6)
    fit(model, guide, obs, actions, num_steps=2, batch_size=2, progress=False, seed=0)
    assert int(model.transition.num_episodes) == 6
    bare = FilterGuide(X, SPACE, Z, rnn_dim=4)  # made by hand, not attached
    with pytest.raises(
        ValueError, match="guide: expected it to draw the weights of the model's BayesianMLPTransition"
    ):
        fit(model, bare, obs, actions, num_steps=1, progress=False)


def test_each_imagined_future_draws_its_own_weights_from_the_posterior():
    model, _, guide = models(posterior_scale=0.2)
    obs, actions = data(B=2, T=4)
    S = 4000
    samples = Predictive(model.model, guide=guide, num_samples=S, parallel=True,
                         return_sites=["transition_weights"])(obs, actions, horizon=2)  # fmt: skip
    theta = samples["transition_weights"].reshape(S, -1)  # one θ per future
    tr = model.transition
    torch.testing.assert_close(theta.mean(0), tr.weight_loc().detach(), atol=0.02, rtol=0)
    torch.testing.assert_close(theta.std(0), tr.weight_log_scale().exp().detach(), atol=0.01, rtol=0.05)


def test_the_spread_of_the_next_mean_over_the_posterior_is_the_linear_gaussian_one():
    """loc(θ) is linear in θ: Var_q[loc_d] = Σ_i u_i² σ²(W_di) + σ²(b_d) + Σ_j f_j² σ²(H_dj) + σ²(c_d),
    u = [z, a] the linear path's input, f the MLP's last hidden features."""
    model, _, _ = models(posterior_scale=0.3)
    tr = model.transition
    z, a = torch.tensor([0.5, -1.0]), torch.tensor([0.8])
    S = 200_000
    theta = tr.posterior().sample((S,))
    with torch.no_grad(), tr.using(theta):
        loc = tr(z.expand(S, Z), a.expand(S, A)).base_dist.loc  # (S, Z)
        u = torch.cat([z, a])
        f = tr.net[:-1](u)
        var_lin, var_bias, var_head, var_head_bias = (
            v**2 for v in tr._unflatten(tr.weight_log_scale().exp())
        )
    want = var_lin @ (u**2) + var_bias + var_head[:Z] @ (f**2) + var_head_bias[:Z]
    torch.testing.assert_close(loc.var(0), want, rtol=0.02, atol=0)


def test_outside_the_programs_row_r_follows_posterior_draw_r_mod_K_until_resampled():
    model, _, _ = models(posterior_scale=0.3)
    tr = model.transition
    K = tr.members
    z, a = torch.randn(2 * K + 1, 3, Z), torch.randn(3, A)
    with torch.no_grad():
        loc = tr(z, a).base_dist.loc
        draws = tr.weight_loc() + tr.weight_log_scale().exp() * tr.noise
        for r in range(2 * K + 1):
            with tr.using(draws[r % K]):
                torch.testing.assert_close(loc[r], tr(z[r], a).base_dist.loc)
        tr.resample()
        assert not torch.allclose(loc, tr(z, a).base_dist.loc)


def test_cem_weighs_the_posterior_draws_as_an_ensembles_members():
    """A reward r = z[0] and posterior draws that disagree about how a moves z[0]: pessimism
    keeps a near 0, optimism pushes it to a bound, as with an ensemble."""
    space = ActionSpace.box(1, -1.0, 1.0)

    class FirstCoordinate(torch.nn.Module):
        latent_dim, action_space = Z, space

        def forward(self, z, a):
            loc = z[..., 0] + 0 * a.sum(-1)
            return pyro.distributions.Normal(loc, torch.ones_like(loc))

    tr = BayesianMLPTransition(Z, 1, hidden=(4,), posterior_scale=1.0, draws=8)
    with torch.no_grad():
        tr.weight_log_scale.set(torch.full((tr.num_weights,), -30.0))
        tr.weight_log_scale.raw[Z] = 0.0  # W[0, a] ~ N(0, 1): the draws disagree on a's effect
    model = WorldModel(StandardNormalInit(Z), tr, GaussianMLPEmission(Z, 2, hidden=(4,)),
                       NormalPolicy(Z, space, hidden=(4,)), reward=FirstCoordinate())  # fmt: skip
    pyro.set_rng_seed(0)
    common = dict(horizon=2, candidates=300, top_k=30, iterations=5, discount=1.0)
    z0 = torch.zeros(2, Z)
    careful = CEMPlanner(epistemic=-1.0, **common).plan(model, LatentState(z0))
    bold = CEMPlanner(epistemic=1.0, **common).plan(model, LatentState(z0))
    assert (careful.abs() < 0.15).all() and (bold.abs() > 0.9).all(), (careful, bold)


def test_held_out_bounds_average_over_the_posterior_without_its_kl():
    """elbo_terms and the IWAE leave θ's KL out: at σ(θ) → 0 they are the point-estimate model's."""
    model, plain, guide = models()
    model.transition.weight_log_scale.set(torch.full((model.transition.num_weights,), -30.0))
    model.transition.num_episodes.fill_(3)
    plain_guide = FilterGuide.for_model(plain, rnn_dim=4, hidden=(4,))
    plain_guide.load_state_dict(guide.state_dict())
    obs, actions = data()
    pyro.set_rng_seed(2)
    ours = elbo_terms(model, guide, obs, actions)
    pyro.set_rng_seed(2)
    torch.randn(model.transition.num_weights)  # the guide's draw of θ
    theirs = elbo_terms(plain, plain_guide, obs, actions)
    assert ours.elbo == pytest.approx(theirs.elbo, rel=1e-5)
    pyro.set_rng_seed(4)
    iw = iwae_log_likelihood(model, guide, obs, actions, num_particles=5)
    pyro.set_rng_seed(4)
    torch.randn(5, model.transition.num_weights)
    iw_plain = iwae_log_likelihood(plain, plain_guide, obs, actions, num_particles=5)
    torch.testing.assert_close(iw, iw_plain, rtol=1e-5, atol=1e-4)


def test_build_gives_a_guide_that_draws_the_weights_and_the_spec_round_trips():
    from pyro_worldmodel.config import spec_of

    b = build({"latent_dim": 2, "transition": {"name": "bayesian", "hidden": [4], "draws": 3}}, 3, SPACE)
    assert b.guide.draws_globals_of(b.model) and b.model.has_global_latents
    again = build(spec_of(b.model, b.guide), 3, SPACE)
    assert type(again.model.transition) is BayesianMLPTransition and again.model.transition.members == 3
    for arg in ("prior_scale", "posterior_scale"):
        with pytest.raises(ValueError, match=f"{arg}: expected a finite float > 0, got -1"):
            BayesianMLPTransition(2, 1, **{arg: -1})
