"""Each component returns one factor's distribution, with its event dims set."""

import math

import pytest
import torch

from pyro_worldmodel import ActionSpace
from pyro_worldmodel.model.components import (
    BernoulliEmission,
    CategoricalPolicy,
    Combiner,
    GatedTransition,
    GaussianMLPEmission,
    GaussianMLPTransition,
    LearnedGaussianInit,
    LinearGaussianEmission,
    LinearGaussianPolicy,
    LinearGaussianTransition,
    NormalPolicy,
    RSSMTransition,
    StandardNormalInit,
    StudentTEmission,
    StudentTMLPTransition,
    auto_policy,
)

Z, X, A = 3, 5, 2
Normal = torch.distributions.Normal


@pytest.mark.parametrize("init_cls", [StandardNormalInit, LearnedGaussianInit])
def test_init_priors(init_cls):
    d = init_cls(Z)((4, 1))
    assert d.batch_shape == (4, 1) and d.event_shape == (Z,)
    z = torch.randn(4, 1, Z)
    torch.testing.assert_close(d.log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_learned_init_has_its_own_parameters():
    init = LearnedGaussianInit(Z)
    with torch.no_grad():
        init.loc.fill_(2.0)
        init.log_scale.fill_(torch.tensor(0.5).log())
    z = torch.randn(Z)
    torch.testing.assert_close(init(()).log_prob(z), Normal(2.0, 0.5).log_prob(z).sum())


def test_untrained_mlp_transition_is_a_random_walk():
    trans = GaussianMLPTransition(Z, A, hidden=(16,))
    z, a = torch.randn(4, 1, Z), torch.randn(4, 1, A)
    d = trans(z, a)
    assert d.batch_shape == (4, 1) and d.event_shape == (Z,)
    torch.testing.assert_close(d.mean, z)


def test_transitions_broadcast_particles():
    for trans in (
        GaussianMLPTransition(Z, A, hidden=(16,)),
        LinearGaussianTransition(Z, A),
        GatedTransition(Z, A, hidden=(16,)),
        StudentTMLPTransition(Z, A, hidden=(16,)),
    ):
        d = trans(torch.randn(7, 4, 1, Z), torch.randn(4, 1, A))  # particles on z only
        assert d.batch_shape == (7, 4, 1) and d.event_shape == (Z,)
    d, h = RSSMTransition(Z, A, deter_dim=5, hidden=(16,))(
        torch.randn(7, 4, 1, Z), torch.randn(4, 1, A), torch.zeros(4, 1, 5)
    )
    assert d.batch_shape == (7, 4, 1) and d.event_shape == (Z,) and h.shape == (7, 4, 1, 5)


def _set_gate(trans, bias):
    with torch.no_grad():
        trans.gate[-1].weight.zero_()
        trans.gate[-1].bias.fill_(bias)


def test_gated_transition_interpolates_between_its_linear_path_and_its_proposal():
    trans = GatedTransition(Z, A, hidden=(16,))
    z, a = torch.randn(4, 1, Z), torch.randn(4, 1, A)
    _set_gate(trans, -40.0)  # gate shut: the linear path, which starts as the identity on z
    torch.testing.assert_close(trans(z, a).mean, z)
    _set_gate(trans, 40.0)  # gate open: the proposal m(u)
    u = torch.cat([z, a], -1)
    m = trans.proposed_mean(u)
    d = trans(z, a)
    torch.testing.assert_close(d.mean, m)
    scale = torch.nn.functional.softplus(trans.scale(torch.relu(m))) + trans.min_scale
    torch.testing.assert_close(d.stddev, scale)
    _set_gate(trans, 0.0)  # half open: the average
    torch.testing.assert_close(trans(z, a).mean, 0.5 * z + 0.5 * m)


def test_student_t_transition_has_the_gaussian_mean_and_scale_and_heavy_tails():
    gauss = GaussianMLPTransition(Z, A, hidden=(16,))
    torch.nn.init.normal_(gauss.net[-1].weight)  # away from the random walk
    for df in (5.0, "learned"):
        student = StudentTMLPTransition(Z, A, hidden=(16,), df=df)
        student.load_state_dict(gauss.state_dict(), strict=False)
        z, a, z_next = torch.randn(4, 1, Z), torch.randn(4, 1, A), torch.randn(4, 1, Z)
        normal = gauss(z, a).base_dist
        nu = 5.0 if df == 5.0 else 2.0 + torch.nn.functional.softplus(torch.tensor(1.0))
        expected = torch.distributions.StudentT(nu, normal.loc, normal.scale).log_prob(z_next).sum(-1)
        torch.testing.assert_close(student(z, a).log_prob(z_next), expected)
        far = normal.loc + 10 * normal.scale  # ten scales out, the t is far more likely
        assert (student(z, a).log_prob(far) > gauss(z, a).log_prob(far) + 10).all()
    learned = StudentTMLPTransition(Z, A, df="learned")
    assert "raw_df" in dict(learned.named_parameters())
    with torch.no_grad():
        learned.raw_df.fill_(-10.0)
    assert (learned.degrees_of_freedom() > 2).all()  # so the mean and variance exist
    for bad in (0, float("inf")):
        with pytest.raises(
            ValueError, match=rf"df: expected 'learned' or a finite positive float, got {bad}"
        ):
            StudentTMLPTransition(Z, A, df=bad)


@pytest.mark.parametrize(
    "cls", [GaussianMLPTransition, StudentTMLPTransition, GatedTransition, RSSMTransition]
)
def test_a_negative_scale_floor_is_refused(cls):
    with pytest.raises(ValueError, match=r"min_scale: expected a finite float >= 0 or 'learned', got -0.1"):
        cls(Z, A, min_scale=-0.1)


def test_a_learned_floor_starts_at_the_fixed_one_and_falls_to_the_datas_noise():
    """z' = z + W a + ε, σ(ε) = 1e-4: from the exact linear warm start, maximum likelihood
    would put σ at the error of the fitted mean. A fixed floor of 1e-3 holds σ at 1e-3, many
    times that error; a learned floor starts there (the same distribution before training)
    and lets σ fall to within a few times the error."""
    from pyro_worldmodel.model.components.nets import HARD_FLOOR

    g = torch.Generator().manual_seed(0)
    z, a = torch.randn(512, Z, generator=g), torch.randn(512, A, generator=g)
    W = torch.randn(Z, A, generator=g)
    z_next = z + a @ W.T + 1e-4 * torch.randn(512, Z, generator=g)
    fitted = {}
    for floor in (1e-3, "learned"):
        torch.manual_seed(1)
        tr = GaussianMLPTransition(Z, A, hidden=(8,), min_scale=floor)
        tr.init_linear(torch.cat([torch.eye(Z), W], 1), torch.zeros(Z), torch.full((Z,), 2e-3))
        if floor == "learned":
            torch.manual_seed(1)
            fixed = GaussianMLPTransition(Z, A, hidden=(8,), min_scale=1e-3)
            fixed.init_linear(torch.cat([torch.eye(Z), W], 1), torch.zeros(Z), torch.full((Z,), 2e-3))
            torch.testing.assert_close(tr(z, a).base_dist.scale, fixed(z, a).base_dist.scale)
        opt = torch.optim.Adam(tr.parameters(), lr=1e-3)
        for _ in range(1500):
            opt.zero_grad()
            (-tr(z, a).log_prob(z_next).mean()).backward()
            opt.step()
        with torch.no_grad():
            d = tr(z, a).base_dist
            fitted[floor] = (d.scale.median().item(), (d.loc - z_next).pow(2).mean().sqrt().item())
    (fixed_scale, fixed_error), (learned_scale, learned_error) = fitted[1e-3], fitted["learned"]
    assert 1e-3 <= fixed_scale and fixed_scale > 4 * fixed_error, fitted
    assert learned_scale < 4 * learned_error and learned_scale < 0.5e-3, fitted
    assert tr.scale_map.floor().min().item() >= HARD_FLOOR


def test_rssm_transition_is_a_gru_then_a_gaussian():
    trans = RSSMTransition(Z, A, deter_dim=5, hidden=(16,))
    z, a, h_prev = torch.randn(4, 1, Z), torch.randn(4, 1, A), torch.randn(4, 1, 5)
    d, h = trans(z, a, h_prev)
    e = torch.nn.functional.elu(trans.embed[0](torch.cat([z, a], -1)))
    expected_h = trans.cell(e.reshape(4, -1), h_prev.reshape(4, 5)).reshape(4, 1, 5)
    torch.testing.assert_close(h, expected_h)
    loc, raw = trans.prior(expected_h).chunk(2, -1)
    torch.testing.assert_close(d.mean, loc)
    torch.testing.assert_close(d.stddev, torch.nn.functional.softplus(raw) + trans.min_scale)
    torch.testing.assert_close(trans.initial_deter((4, 1), z), torch.zeros(4, 1, 5))
    with pytest.raises(ValueError, match=r"deter_dim: expected a positive int, got 0"):
        RSSMTransition(Z, A, deter_dim=0)
    with pytest.raises(ValueError, match=r"hidden: expected at least one width"):
        RSSMTransition(Z, A, hidden=())


def test_linear_gaussian_transition_density():
    trans = LinearGaussianTransition(Z, A)
    with torch.no_grad():
        trans.F.copy_(torch.randn(Z, Z))
        trans.G.copy_(torch.randn(Z, A))
        trans.bias.copy_(torch.randn(Z))
        trans.log_scale.copy_(torch.randn(Z))
    z, a, z_next = torch.randn(Z), torch.randn(A), torch.randn(Z)
    loc = trans.F @ z + trans.G @ a + trans.bias
    expected = Normal(loc, trans.log_scale.exp()).log_prob(z_next).sum()
    torch.testing.assert_close(trans(z, a).log_prob(z_next), expected)


def test_emissions():
    z = torch.randn(4, 6, Z)
    for emit in (GaussianMLPEmission(Z, X, hidden=(16,)), LinearGaussianEmission(Z, X)):
        d = emit(z)
        assert d.batch_shape == (4, 6) and d.event_shape == (X,)
    fixed = GaussianMLPEmission(Z, X, hidden=(16,), scale=0.1)
    torch.testing.assert_close(fixed(z).stddev, torch.full((4, 6, X), 0.1))
    assert not any("log_scale" in name for name, _ in fixed.named_parameters())
    learned = GaussianMLPEmission(Z, X, hidden=(16,))
    assert "gained_log_scale.raw" in dict(learned.named_parameters())
    with pytest.raises(ValueError, match=r"scale: expected 'learned' or a positive float, got -1"):
        GaussianMLPEmission(Z, X, scale=-1)


def test_policies():
    z = torch.randn(4, 6, Z)
    box, disc = ActionSpace.box(A), ActionSpace.discrete(4)
    for policy in (NormalPolicy(Z, box), LinearGaussianPolicy(Z, box)):
        d = policy(z)
        assert d.batch_shape == (4, 6) and d.event_shape == (A,)
    d = CategoricalPolicy(Z, disc)(z)
    assert d.batch_shape == (4, 6) and d.event_shape == ()
    torch.testing.assert_close(d.probs.sum(-1), torch.ones(4, 6))
    assert isinstance(auto_policy(Z, box), NormalPolicy)
    assert isinstance(auto_policy(Z, disc), CategoricalPolicy)
    with pytest.raises(ValueError, match=r"action_space: expected a discrete space"):
        CategoricalPolicy(Z, box)
    with pytest.raises(ValueError, match=r"action_space: expected a box space"):
        NormalPolicy(Z, disc)


def test_combiner():
    d = Combiner(Z, 8, hidden=(16,))(torch.randn(7, 4, 1, Z), torch.randn(4, 1, 8))
    assert d.batch_shape == (7, 4, 1) and d.event_shape == (Z,)
    assert (d.base_dist.scale > 0).all()


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_sizes_must_be_positive_ints(bad):
    with pytest.raises(ValueError, match=r"latent_dim: expected a positive int"):
        StandardNormalInit(bad)


def test_student_t_emission_is_the_student_t_density():
    torch.manual_seed(0)
    em = StudentTEmission(2, 3, hidden=(8,))
    z, x = torch.randn(5, 2), torch.randn(5, 3)
    p = em(z)
    loc, scale, df = p.base_dist.loc, p.base_dist.scale, em.degrees_of_freedom()
    u = (x - loc) / scale
    by_hand = (
        torch.lgamma((df + 1) / 2)
        - torch.lgamma(df / 2)
        - 0.5 * torch.log(df * math.pi)
        - scale.log()
        - (df + 1) / 2 * torch.log1p(u**2 / df)
    ).sum(-1)
    torch.testing.assert_close(p.log_prob(x), by_hand)
    assert (df > 2).all()  # the mean and the variance exist
    assert torch.equal(StudentTEmission(2, 3, df=4.0).degrees_of_freedom(), torch.full((3,), 4.0))
    with pytest.raises(ValueError, match="df: expected 'learned' or a finite positive float, got -1"):
        StudentTEmission(2, 3, df=-1)


def test_bernoulli_emission_is_the_product_of_bernoullis():
    torch.manual_seed(0)
    em = BernoulliEmission(2, 4, hidden=(8,))
    z, x = torch.randn(6, 2), (torch.rand(6, 4) > 0.5).float()
    p = em(z)
    probs = p.mean
    by_hand = (x * probs.log() + (1 - x) * (1 - probs).log()).sum(-1)
    torch.testing.assert_close(p.log_prob(x), by_hand)
    assert ((probs > 0) & (probs < 1)).all()


def test_bernoulli_emission_refuses_observations_other_than_0_and_1():
    em = BernoulliEmission(2, 4, hidden=(8,))
    obs = (torch.rand(3, 5, 4) > 0.5).float()
    em.check_obs(obs)  # binary floats pass
    em.check_obs(obs.long(), torch.ones(3, 5, dtype=torch.bool))  # and binary integers
    obs[2, 3, 1], obs[1, 4, 0] = 0.5, -1.0
    message = (
        r"obs: expected 0 or 1 on observed steps for a BernoulliEmission, got -1 at episode 1, step 4,"
        r" dimension 0 \(2 steps with other values\)"
    )
    with pytest.raises(ValueError, match=message):
        em.check_obs(obs)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 4:] = False  # padding is not observed: only the 0.5 is left
    with pytest.raises(ValueError, match=r"got 0.5 at episode 2, step 3, dimension 1 \(1 steps"):
        em.check_obs(obs, mask)
    mask[2, 3:] = False
    em.check_obs(obs, mask)


def test_an_emission_checks_its_observations_exactly_when_its_support_is_restricted():
    """Gaussian and Student-t emissions have support on all reals: any finite value is
    theirs, and they have no ``check_obs``. A Bernoulli's is {0, 1}, which it checks."""
    constraints = torch.distributions.constraints
    for em in (
        GaussianMLPEmission(Z, X, hidden=(8,)),
        LinearGaussianEmission(Z, X),
        StudentTEmission(Z, X, hidden=(8,)),
        BernoulliEmission(Z, X, hidden=(8,)),
    ):
        support = em(torch.randn(2, Z)).base_dist.support
        assert support in (constraints.real, constraints.boolean)
        assert hasattr(em, "check_obs") == (support is not constraints.real), type(em).__name__


@pytest.mark.parametrize("emission", [GaussianMLPEmission, StudentTEmission])
def test_one_adam_step_moves_a_learned_log_scale_by_gain_times_the_learning_rate(emission):
    """Adam's first step is lr · sign(gradient) per parameter, so log σ moves by gain · lr."""
    torch.manual_seed(0)
    z, x = torch.randn(5, Z), 10 * torch.randn(5, X)  # far off: every log σ wants to grow
    for gain in (1.0, 10.0):
        emit = emission(Z, X, hidden=(16,), scale_gain=gain)
        before = emit.log_scale.detach().clone()
        opt = torch.optim.Adam(emit.parameters(), lr=1e-3)
        (-emit(z).log_prob(x).sum()).backward()
        opt.step()
        torch.testing.assert_close(
            emit.log_scale.detach() - before, torch.full((X,), gain * 1e-3), rtol=1e-3, atol=0
        )
    emit.gained_log_scale.set(torch.full((X,), -3.0))
    torch.testing.assert_close(emit(z).base_dist.scale, torch.full((5, X), math.exp(-3.0)))
    with pytest.raises(ValueError, match="scale_gain: expected a finite float > 0, got 0"):
        emission(Z, X, scale_gain=0)


def test_a_state_dict_from_before_the_gain_loads_with_the_same_scale():
    """Checkpoints written when the parameter was ``log_scale`` (log σ itself) still load."""
    for make in (
        lambda: GaussianMLPEmission(Z, X, hidden=(16,)),
        lambda: GaussianMLPEmission(Z, X, hidden=(16,), scale=0.3),
        lambda: StudentTEmission(Z, X, hidden=(16,)),
    ):
        new = make()
        old = {k: v for k, v in new.state_dict().items() if "log_scale" not in k}
        old["log_scale"] = torch.linspace(-3.0, 0.5, X)
        new.load_state_dict(old)
        torch.testing.assert_close(new.log_scale, torch.linspace(-3.0, 0.5, X))
