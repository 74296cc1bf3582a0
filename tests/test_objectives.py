"""World-model objectives as ELBO classes: each checked against the same draw computed by hand."""

import inspect

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI
from worlds import X, world

from pyro_worldmodel import elbo_terms, fit
from pyro_worldmodel.infer.elbos import (
    FreeNats_ELBO,
    KLAnnealing_ELBO,
    KLBalancing_ELBO,
    LatentOvershooting_ELBO,
    TraceMeanField_ELBO,
)
from pyro_worldmodel.model.components import (
    StudentTMLPTransition,
)

LENGTHS = (6, 6, 4, 2)  # episodes of different lengths: padded steps are masked out
OBSERVED = sum(LENGTHS)


def data(T=6):
    g = torch.Generator().manual_seed(3)
    mask = torch.arange(T) < torch.tensor(LENGTHS)[:, None]
    return torch.randn(4, T, X, generator=g), torch.randn(4, T, 2, generator=g), mask


def params(model, guide):
    return {
        **{f"model.{n}": p for n, p in model.named_parameters()},
        **{f"guide.{n}": p for n, p in guide.named_parameters()},
    }


def loss_and_grads(elbo, model, guide, args, seed=5):
    """The ELBO's loss and the gradient of every parameter, on the draw of ``seed``."""
    for p in params(model, guide).values():
        p.grad = None
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(model.model, guide, *args)
    loss.backward()
    return loss.item(), _grads(model, guide)


def _grads(model, guide):
    return {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in params(model, guide).items()
    }


def hand(model, guide, args, seed=5):
    """The draw of ``seed`` as the ELBO sees it: log p(x|z) + log π(a|z), and each latent site's parts."""
    pyro.set_rng_seed(seed)
    guide_tr = poutine.trace(guide).get_trace(*args)
    model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(*args)
    mask = args[2]
    log_lik = sum(model_tr.nodes[n]["fn"].log_prob(model_tr.nodes[n]["value"]).sum() for n in ("x", "a"))
    sites = []
    for t in range(mask.shape[1]):
        q, p = guide_tr.nodes[f"z_{t}"]["fn"], model_tr.nodes[f"z_{t}"]["fn"]
        sites.append((q, p, guide_tr.nodes[f"z_{t}"]["value"], mask[:, t : t + 1]))  # mask (B, 1)
    return log_lik, sites


def normal_kl(q, p):
    """KL between the diagonal Normals inside two MaskedDistribution(Independent(Normal)), written out: (B, 1)."""
    q, p = q.base_dist.base_dist, p.base_dist.base_dist
    return (p.scale.log() - q.scale.log() + (q.scale**2 + (q.loc - p.loc) ** 2) / (2 * p.scale**2) - 0.5).sum(
        -1
    )


def observed(kl_t, m):
    return torch.where(m, kl_t, torch.zeros(()))


def assert_grads_equal(got, want, *, rtol=1e-4, atol=1e-5, factor=None, only=None):
    for name in want:
        if only is not None and not name.startswith(only):
            continue
        expected = want[name] if factor is None else factor * want[name]
        assert torch.allclose(got[name], expected, rtol=rtol, atol=atol), name


def plain():
    return TraceMeanField_ELBO(max_plate_nesting=2, monte_carlo_kl="error")


# ---------------------------------------------------------------- KL balancing


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_kl_balancing_has_the_elbo_value(alpha):
    model, guide = world()
    args = data()
    want = plain()
    pyro.set_rng_seed(5)
    expected = want.loss(model.model, guide, *args)
    balancing = KLBalancing_ELBO(alpha, max_plate_nesting=2)
    pyro.set_rng_seed(5)
    assert balancing.loss(model.model, guide, *args) == pytest.approx(expected, rel=1e-6)
    got, _ = loss_and_grads(balancing, model, guide, args)
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_kl_balancing_scales_the_priors_gradient_by_alpha(alpha):
    """The transition enters the loss only through p(z_t | z_{t-1}, a_{t-1}); the emission
    and the policy only through the likelihood, which balancing leaves alone."""
    model, guide = world()
    args = data()
    _, want = loss_and_grads(plain(), model, guide, args)
    _, got = loss_and_grads(KLBalancing_ELBO(alpha, max_plate_nesting=2), model, guide, args)
    assert any(want[n].abs().sum() > 0 for n in want if n.startswith("model.transition"))
    assert_grads_equal(got, want, factor=alpha, only="model.transition")
    assert_grads_equal(got, want, only="model.emission")
    assert_grads_equal(got, want, only="model.policy")


def test_kl_balancing_is_dreamers_two_kls_for_every_parameter():
    """α·KL(sg(q) ‖ p) + (1 − α)·KL(q ‖ sg(p)), written out with two KLs, on the same draw:
    this also checks the guide's gradient, which reaches p through z_{t-1}."""
    alpha = 0.3
    model, guide = world()
    args = data()
    value, got = loss_and_grads(KLBalancing_ELBO(alpha, max_plate_nesting=2), model, guide, args)

    def sg(d):
        n = d.base_dist.base_dist
        return dist.Normal(n.loc.detach(), n.scale.detach()).to_event(1).mask(d._mask)

    for p in params(model, guide).values():
        p.grad = None
    log_lik, sites = hand(model, guide, args)
    kl = sum(
        observed(alpha * normal_kl(sg(q), p) + (1 - alpha) * normal_kl(q, sg(p)), m).sum()
        for q, p, _, m in sites
    )
    (-(log_lik - kl)).backward()
    assert value == pytest.approx(-(log_lik - kl).item(), rel=1e-6)
    assert_grads_equal(got, _grads(model, guide))
    # and differs from the ELBO's gradient, or the check above would prove nothing
    _, elbo_grads = loss_and_grads(plain(), model, guide, args)
    assert not all(torch.allclose(got[n], elbo_grads[n], rtol=1e-3) for n in got if n.startswith("guide."))


# ---------------------------------------------------------------- free nats


def test_free_nats_zero_is_the_elbo():
    model, guide = world()
    args = data()
    want_value, want = loss_and_grads(plain(), model, guide, args)
    got_value, got = loss_and_grads(FreeNats_ELBO(0.0, max_plate_nesting=2), model, guide, args)
    assert got_value == pytest.approx(want_value, rel=1e-6)
    assert_grads_equal(got, want)


def test_free_nats_clamp_each_observed_steps_kl_and_leave_padding_at_zero():
    model, guide = world()
    args = data()
    log_lik, sites = hand(model, guide, args)
    kls = torch.cat([normal_kl(q, p)[m] for q, p, _, m in sites]).detach()  # observed steps
    assert kls.numel() == OBSERVED
    middle = kls.sort().values[OBSERVED // 2 - 1 : OBSERVED // 2 + 1]
    c = float(middle.mean())  # half the steps' KL lies below c, none at it
    elbo = FreeNats_ELBO(c, max_plate_nesting=2)
    value, got = loss_and_grads(elbo, model, guide, args)

    for p in params(model, guide).values():
        p.grad = None
    log_lik, sites = hand(model, guide, args)
    kl = sum(observed(normal_kl(q, p).clamp(min=c), m).sum() for q, p, _, m in sites)
    (-(log_lik - kl)).backward()
    assert value == pytest.approx(-(log_lik - kl).item(), rel=1e-6)
    assert_grads_equal(got, _grads(model, guide))

    # Above every step's KL: each observed step costs exactly c nats, and a padded
    # step nothing; no gradient reaches the prior.
    big = float(kls.max()) + 1.0
    value, got = loss_and_grads(FreeNats_ELBO(big, max_plate_nesting=2), model, guide, args)
    log_lik, _ = hand(model, guide, args)
    assert value == pytest.approx(-log_lik.item() + big * OBSERVED, rel=1e-6)
    assert all((got[n] == 0).all() for n in got if n.startswith("model.transition"))


# ---------------------------------------------------------------- annealing


def test_annealing_at_beta_one_is_the_elbo():
    model, guide = world()
    args = data()
    want_value, want = loss_and_grads(plain(), model, guide, args)
    got_value, got = loss_and_grads(KLAnnealing_ELBO(1.0, max_plate_nesting=2), model, guide, args)
    assert got_value == pytest.approx(want_value, rel=1e-6)
    assert_grads_equal(got, want)


def annealed_loss(model, guide, args, beta, seed=5):
    """−(log p(x|z) + log π(a|z) − β·KL) on the draw of ``seed``, from elbo_terms."""
    pyro.set_rng_seed(seed)
    terms = elbo_terms(model, guide, *args)
    return -(terms.log_px + terms.log_pa - beta * terms.kl) * terms.num_timesteps


def test_annealing_weighs_the_kl_by_beta():
    model, guide = world()
    args = data()
    elbo = KLAnnealing_ELBO(0.5, max_plate_nesting=2)
    pyro.set_rng_seed(5)
    got = elbo.loss(model.model, guide, *args)
    assert got == pytest.approx(annealed_loss(model, guide, args, 0.5), rel=1e-5)
    assert got != pytest.approx(annealed_loss(model, guide, args, 1.0), rel=1e-3)
    assert elbo.step == 0  # loss() does not advance the schedule


def test_the_warm_up_schedule_follows_svi_steps():
    model, guide = world()
    args = data()
    elbo = KLAnnealing_ELBO(beta=1.0, warmup_steps=4, beta_start=0.2, max_plate_nesting=2)
    svi = SVI(model.model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    expected = {0: 0.2, 2: 0.6, 4: 1.0, 6: 1.0}
    for s in range(7):
        assert elbo.step == s
        if s in expected:
            assert elbo.current_beta == pytest.approx(expected[s])
            pyro.set_rng_seed(5)
            got = elbo.loss(model.model, guide, *args)  # the β of this step is the one used
            assert got == pytest.approx(annealed_loss(model, guide, args, expected[s]), rel=1e-5)
        svi.step(*args)
    assert elbo.step == 7
    # fit drives it the same way, one step per SVI step
    elbo = KLAnnealing_ELBO(beta=2.0, warmup_steps=4, beta_start=1.0, max_plate_nesting=2)
    fit(model, guide, *args, num_steps=3, elbo=elbo, progress=False)
    assert elbo.step == 3 and elbo.current_beta == pytest.approx(1.75)


def test_annealing_at_a_monte_carlo_site_scales_log_p_and_log_q_alike():
    """StudentT prior, Normal guide: KL_t is log q(z_t) − log p(z_t) at the draw; β multiplies both."""
    beta = 0.5
    model, guide = world(StudentTMLPTransition)
    args = data()
    elbo = KLAnnealing_ELBO(beta, max_plate_nesting=2, monte_carlo_kl="allow")
    value, got = loss_and_grads(elbo, model, guide, args)
    assert elbo.kl_estimators["z_3"] == "monte_carlo" and elbo.kl_estimators["z_0"] == "analytic"

    for p in params(model, guide).values():
        p.grad = None
    log_lik, sites = hand(model, guide, args)
    q0, p0, _, m0 = sites[0]
    kl = observed(normal_kl(q0, p0), m0).sum()  # z_0: Normal prior, analytic
    for q, p, z, _ in sites[1:]:
        kl = kl + (q.log_prob(z) - p.log_prob(z)).sum()  # masked distributions: padded steps give 0
    (-(log_lik - beta * kl)).backward()
    assert value == pytest.approx(-(log_lik - beta * kl).item(), rel=1e-6)
    assert_grads_equal(got, _grads(model, guide))
    # the transition enters only through log p(z_t): its gradient is β times the ELBO's
    _, want = loss_and_grads(
        TraceMeanField_ELBO(max_plate_nesting=2, monte_carlo_kl="allow"), model, guide, args
    )
    assert_grads_equal(got, want, factor=beta, only="model.transition")


# ---------------------------------------------------------------- sites an objective refuses


def test_free_nats_and_balancing_refuse_monte_carlo_sites():
    model, guide = world(StudentTMLPTransition)
    args = data()
    for elbo, who in (
        (FreeNats_ELBO(1.0, max_plate_nesting=2, monte_carlo_kl="allow"), "FreeNats_ELBO"),
        (KLBalancing_ELBO(0.8, max_plate_nesting=2, monte_carlo_kl="allow"), "KLBalancing_ELBO"),
    ):
        with pytest.raises(ValueError, match=rf"{who}: no analytic KL\(Normal ‖ StudentT\) at z_1"):
            elbo.loss(model.model, guide, *args)


def test_balancing_refuses_distributions_it_cannot_rebuild():
    x = torch.tensor([0.5, -1.0])

    def model():
        z = pyro.sample("z", dist.Laplace(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide():
        pyro.sample("z", dist.Laplace(pyro.param("loc", torch.zeros(2)), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"KL\(Laplace ‖ Laplace\) at z: Laplace is not supported"):
        KLBalancing_ELBO(0.8).loss(model, guide)


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (KLAnnealing_ELBO, {"beta": -0.5}, r"beta: expected a finite number >= 0, got -0.5"),
        (KLAnnealing_ELBO, {"beta": float("nan")}, r"beta: expected a finite number >= 0, got nan"),
        (KLAnnealing_ELBO, {"beta": "1"}, r"beta: expected a finite number >= 0, got '1'"),
        (KLAnnealing_ELBO, {"warmup_steps": 2.5}, r"warmup_steps: expected an int >= 0, got 2.5"),
        (KLAnnealing_ELBO, {"warmup_steps": -1}, r"warmup_steps: expected an int >= 0, got -1"),
        (KLAnnealing_ELBO, {"beta_start": -1}, r"beta_start: expected a finite number >= 0, got -1"),
        (FreeNats_ELBO, {"free_nats": -0.1}, r"free_nats: expected a finite number >= 0, got -0.1"),
        (FreeNats_ELBO, {"free_nats": float("inf")}, r"free_nats: expected a finite number >= 0, got inf"),
        (KLBalancing_ELBO, {"alpha": 1.5}, r"alpha: expected a finite number in \[0, 1\], got 1.5"),
        (KLBalancing_ELBO, {"alpha": True}, r"alpha: expected a finite number in \[0, 1\], got True"),
        (KLBalancing_ELBO, {"num_particles": 0}, r"num_particles: expected an int >= 1, got 0"),
        (FreeNats_ELBO, {"max_plate_nesting": -1}, r"max_plate_nesting: expected an int >= 0, got -1"),
        (FreeNats_ELBO, {"monte_carlo_kl": "no"}, r"monte_carlo_kl: expected 'warn', 'error', 'allow'"),
    ],
)
def test_bad_arguments_are_named(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (KLAnnealing_ELBO, {"beta": 2.0, "warmup_steps": 10, "beta_start": 0.1}),
        (FreeNats_ELBO, {"free_nats": 3.0}),
        (KLBalancing_ELBO, {"alpha": 0.6}),
    ],
)
def test_every_argument_is_kept_under_its_name_and_trains(cls, kwargs):
    """A spec reader rebuilds an ELBO from the attributes named like its arguments."""
    given = {**kwargs, "num_particles": 2, "max_plate_nesting": 2, "monte_carlo_kl": ["KL(Normal ‖ Laplace)"]}
    elbo = cls(**given)
    for name, param in inspect.signature(cls).parameters.items():
        assert getattr(elbo, name) == given.get(name, param.default), name
    assert (
        cls(**{k: getattr(elbo, k) for k in inspect.signature(cls).parameters}).__dict__.keys()
        == vars(elbo).keys()
    )
    model, guide = world()
    before = {n: p.detach().clone() for n, p in params(model, guide).items()}
    history = fit(model, guide, *data(), num_steps=2, elbo=elbo, progress=False)
    assert all(torch.isfinite(torch.tensor(history.loss)))
    assert any(not torch.equal(p, before[n]) for n, p in params(model, guide).items())


# ---------------------------------------------------------------- latent overshooting


def test_overshooting_with_distance_one_is_the_elbo():
    model, guide = world()
    args = data()
    want_loss, want = loss_and_grads(plain(), model, guide, args)
    for beta in (0.0, 1.0, 5.0):
        loss, got = loss_and_grads(LatentOvershooting_ELBO(distance=1, beta=beta), model, guide, args)
        assert loss == pytest.approx(want_loss, rel=1e-6)
        assert_grads_equal(got, want, rtol=1e-5, atol=1e-6)


def test_overshooting_adds_the_d_step_kls_at_beta_over_d():
    """With β = 0 it is the ELBO at any D; with β, the loss grows by (β / D) Σ_t Σ_{d≥2} KL_d,
    the same terms whatever β: linear in β on one draw."""
    from pyro_worldmodel.infer.batched import multi_step_kl  # noqa: F401 (the terms it adds)

    model, guide = world()
    args = data()
    elbo_loss, want = loss_and_grads(plain(), model, guide, args)
    loss0, got = loss_and_grads(LatentOvershooting_ELBO(distance=4, beta=0.0), model, guide, args)
    assert loss0 == pytest.approx(elbo_loss, rel=1e-6)
    assert_grads_equal(got, want, rtol=1e-5, atol=1e-6)
    loss1, _ = loss_and_grads(LatentOvershooting_ELBO(distance=4, beta=1.0), model, guide, args)
    loss3, _ = loss_and_grads(LatentOvershooting_ELBO(distance=4, beta=3.0), model, guide, args)
    assert loss1 > loss0  # KLs are non-negative: a looser bound
    assert loss3 - loss0 == pytest.approx(3 * (loss1 - loss0), rel=1e-4)


def test_overshooting_terms_train_the_transition_only():
    model, guide = world()
    args = data()
    _, base = loss_and_grads(LatentOvershooting_ELBO(distance=4, beta=0.0), model, guide, args)
    _, over = loss_and_grads(LatentOvershooting_ELBO(distance=4, beta=1.0), model, guide, args)
    changed = {n for n in base if not torch.allclose(base[n], over[n], rtol=1e-6, atol=1e-7)}
    assert changed and all(n.startswith("model.transition.") for n in changed)


def test_the_two_step_kl_is_unbiased_for_its_closed_form():
    """For z' = F z + G a + b + σ ε, E_s[KL(q ‖ N(F s + G a' + b, σ²))] with s ~ p(· | z_{t-2})
    is KL(q ‖ N(F m + G a' + b, σ²)) + ½ Σ_i (F diag(σ²) Fᵀ)_ii / σ_i², m = F z_{t-2} + G a + b."""
    from pyro_worldmodel.infer.batched import multi_step_kl
    from pyro_worldmodel.model.components import LinearGaussianTransition

    torch.manual_seed(0)
    model, _ = world()
    model.transition = tr = LinearGaussianTransition(2, 2)
    with torch.no_grad():
        tr.F.copy_(torch.tensor([[0.9, 0.2], [-0.3, 0.8]]))
        tr.G.copy_(torch.randn(2, 2))
        tr.bias.copy_(torch.tensor([0.1, -0.2]))
        tr.log_scale.copy_(torch.tensor([0.3, 0.6]).log())
    N = 200_000
    z = torch.randn(1, 3, 2).expand(N, 3, 2)
    a_feat = torch.randn(1, 3, 2).expand(N, 3, 2)
    q = dist.Normal(torch.randn(1, 3, 2).expand(N, 3, 2), torch.tensor([0.2, 0.5]).expand(N, 3, 2))
    mask = torch.ones(N, 3, dtype=torch.bool)
    with torch.no_grad():
        kl = multi_step_kl(model, z, q, a_feat, mask, 2)  # (N, 1): z_2 from z_0
    F, G, b, var = tr.F, tr.G, tr.bias, tr.log_scale.exp().detach() ** 2
    m = F @ z[0, 0] + G @ a_feat[0, 0] + b
    p = dist.Normal(F @ m + G @ a_feat[0, 1] + b, var.sqrt())
    q2 = dist.Normal(q.loc[0, 2], q.scale[0, 2])
    exact = (
        torch.distributions.kl_divergence(q2, p).sum()
        + 0.5 * ((F @ torch.diag(var) @ F.T).diagonal() / var).sum()
    )
    assert kl.mean().item() == pytest.approx(exact.item(), abs=4 * kl.std().item() / N**0.5)


def test_overshooting_refuses_what_it_cannot_compute():
    from pyro_worldmodel import Spec, build

    with pytest.raises(ValueError, match="distance: expected an int >= 1, got 0"):
        LatentOvershooting_ELBO(distance=0)
    with pytest.raises(
        ValueError, match="batched: LatentOvershooting_ELBO is computed on the batched path only"
    ):
        LatentOvershooting_ELBO(batched=False)
    rssm = build(Spec.preset("planet", "smoke"), X, world()[0].action_space)
    with pytest.raises(ValueError, match=r"LatentOvershooting_ELBO: .*\(the transition is recurrent\)"):
        LatentOvershooting_ELBO().differentiable_loss(rssm.model.model, rssm.guide, *data())
    model, guide = world()
    with pytest.raises(ValueError, match=r"\(a Pyro handler is active\)"):
        with poutine.scale(scale=0.5):
            LatentOvershooting_ELBO().differentiable_loss(model.model, guide, *data())
