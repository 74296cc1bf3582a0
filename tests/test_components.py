"""Each component returns one factor's distribution, with its event dims set."""

import math

import pytest
import torch

from pyro_worldmodel import ActionSpace
from pyro_worldmodel.components import (
    BernoulliEmission,
    CategoricalPolicy,
    Combiner,
    GaussianMLPEmission,
    GaussianMLPTransition,
    LearnedGaussianInit,
    LinearGaussianEmission,
    LinearGaussianPolicy,
    LinearGaussianTransition,
    NormalPolicy,
    StandardNormalInit,
    StudentTEmission,
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
    for trans in (GaussianMLPTransition(Z, A, hidden=(16,)), LinearGaussianTransition(Z, A)):
        d = trans(torch.randn(7, 4, 1, Z), torch.randn(4, 1, A))  # particles on z only
        assert d.batch_shape == (7, 4, 1)


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
    assert "log_scale" not in dict(fixed.named_parameters())
    learned = GaussianMLPEmission(Z, X, hidden=(16,))
    assert "log_scale" in dict(learned.named_parameters())
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
    with pytest.raises(ValueError, match="df: expected 'learned' or a positive float, got -1"):
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
