"""TanhNormalPolicy: the change-of-variables density, bounds, and training in a whole model."""

import copy
import math

import pyro
import pytest
import torch

from pyro_worldmodel import ActionSpace, FilterGuide, WorldModel, fit
from pyro_worldmodel.data import Normalizer
from pyro_worldmodel.model.components import (
    GaussianMLPEmission,
    GaussianMLPTransition,
    StandardNormalInit,
    TanhNormalPolicy,
)

Z, X = 3, 4
BOX = ActionSpace.box(2, [-1.0, 0.0], [3.0, 0.5])  # mid (1, 0.25), half (2, 0.25)


def randomized(policy: TanhNormalPolicy) -> TanhNormalPolicy:
    """The policy with σ away from 1, so that a wrong scale would show."""
    with torch.no_grad():
        policy.log_scale.uniform_(-0.7, 0.7)
    return policy


def test_log_prob_is_the_change_of_variables_density():
    policy = randomized(TanhNormalPolicy(Z, BOX, hidden=(8,))).double()
    z = torch.randn(50, Z, dtype=torch.float64)
    low, high = torch.tensor(BOX.low, dtype=torch.float64), torch.tensor(BOX.high, dtype=torch.float64)
    a = low + (high - low) * torch.rand(50, 2, dtype=torch.float64)  # inside the box
    mid, half = (high + low) / 2, (high - low) / 2

    u = torch.atanh((a - mid) / half)
    loc = policy.linear(z) + policy.net(z)
    scale = policy.log_scale.exp()
    log_normal = -0.5 * ((u - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)
    by_hand = (log_normal - torch.log(half * (1 - torch.tanh(u) ** 2))).sum(-1)  # (50,)

    d = policy(z)
    assert d.batch_shape == (50,) and d.event_shape == (2,)
    torch.testing.assert_close(d.log_prob(a), by_hand)


def test_density_integrates_to_one():
    space = ActionSpace.box(1, -1.0, 3.0)
    policy = randomized(TanhNormalPolicy(Z, space, hidden=(8,))).double()
    d = policy(torch.randn(Z, dtype=torch.float64))
    a = torch.linspace(-1.0, 3.0, 200_001, dtype=torch.float64)[1:-1, None]  # (n, 1)
    mass = torch.trapezoid(d.log_prob(a).exp(), a[:, 0])
    torch.testing.assert_close(mass, torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)


def test_log_prob_is_finite_on_the_bounds_and_clamps_outside():
    policy = randomized(TanhNormalPolicy(Z, BOX, hidden=(8,)))
    d = policy(torch.zeros(Z))
    d64 = copy.deepcopy(policy).double()(torch.zeros(Z, dtype=torch.float64))
    low, high = torch.tensor(BOX.low), torch.tensor(BOX.high)  # float32, as gymnasium records them
    assert torch.isfinite(d.log_prob(low)) and torch.isfinite(d.log_prob(high))
    # Scored as the action 1e-6 · half inside the bound (1 - 1e-6 rounded to float32), here in float64.
    mid, half = torch.tensor([1.0, 0.25], dtype=torch.float64), torch.tensor([2.0, 0.25], dtype=torch.float64)
    y = torch.tensor(1 - 1e-6, dtype=torch.float32).double()
    for bound, inside in ((low, mid - half * y), (high, mid + half * y)):
        torch.testing.assert_close(d.log_prob(bound).double(), d64.log_prob(inside), rtol=1e-5, atol=0)
    # Outside the box: clamped to the same point, not NaN.
    assert d.log_prob(high + 10.0) == d.log_prob(high)
    assert d.log_prob(low - 10.0) == d.log_prob(low)


def test_log_prob_refuses_nan_under_validation():
    d = TanhNormalPolicy(Z, BOX, hidden=(8,))(torch.randn(Z))
    with pytest.raises(ValueError, match="support"):
        d.log_prob(torch.tensor([float("nan"), 0.0]))


def test_samples_stay_in_the_box():
    # float32 bounds where mid + half rounds above high and mid - half below low.
    low, high = [-1.0, 0.9668247699737549], [3.0, 5.655956268310547]
    space = ActionSpace.box(2, low, high)
    policy = TanhNormalPolicy(Z, space, hidden=(8,))
    with torch.no_grad():
        policy.log_scale.fill_(math.log(20.0))  # most u saturate tanh to ±1
    d = policy(torch.randn(10_000, Z))
    low, high = torch.tensor(low), torch.tensor(high)
    for a in (d.sample(), d.rsample()):
        assert a.shape == (10_000, 2)
        assert ((a >= low) & (a <= high)).all()
        assert (a == high).any() and (a == low).any()  # saturated draws land on the bounds
    # The density of an rsample uses its exact u (the same draw of the base Normal), even
    # where tanh(u) rounds to ±1 and inverting the action could not recover u.
    torch.manual_seed(1)
    a = d.rsample()
    torch.manual_seed(1)
    u = d.base_dist.base_dist.rsample()  # (10000, 2)
    assert (u.abs() > 10).sum() > 1000  # tanh(u) = ±1 in float32
    half = (high - low).double() / 2
    log_cosh = u.double().abs() + torch.log1p(torch.exp(-2 * u.double().abs())) - math.log(2)
    log_det = half.log() - 2 * log_cosh  # log(half · (1 - tanh²(u))), stable for large |u|
    by_hand = (d.base_dist.base_dist.log_prob(u).double() - log_det).sum(-1)
    torch.testing.assert_close(d.log_prob(a).double(), by_hand, rtol=1e-5, atol=1e-4)  # float32


def test_mask_and_vectorized_particles():
    policy = randomized(TanhNormalPolicy(Z, BOX, hidden=(8,)))
    z = torch.randn(7, 4, 1, Z)  # (particles, B, 1, Z)
    mask = torch.tensor([True, True, False, False])[:, None]  # (B, 1)
    a = torch.tensor([[0.5, 0.1], [3.0, 0.5], [100.0, 0.0], [0.0, 0.0]])[:, None]  # (B, 1, A)
    d = policy(z)
    assert d.batch_shape == (7, 4, 1) and d.event_shape == (2,)
    masked = d.mask(mask).log_prob(a)  # (7, 4, 1)
    assert masked.shape == (7, 4, 1)
    torch.testing.assert_close(masked[:, :2], d.log_prob(a)[:, :2])
    assert (masked[:, 2:] == 0).all()
    # Under a Pyro plate, with validation on, as the model scores actions.
    with pyro.plate("episodes", 4, dim=-2):
        trace = pyro.poutine.trace(lambda: pyro.sample("a", policy(z).mask(mask), obs=a)).get_trace()
    trace.compute_log_prob()
    torch.testing.assert_close(trace.nodes["a"]["log_prob"], masked)


@pytest.mark.parametrize(
    "space",
    [
        ActionSpace.discrete(3),
        ActionSpace.box(2),
        ActionSpace.box(2, low=-1.0),
        ActionSpace.box(2, [-1.0, -math.inf], [1.0, 1.0]),
        ActionSpace.box(2, [-1.0, 1.0], [1.0, 1.0]),
    ],
    ids=["discrete", "unbounded", "no high", "infinite", "low == high"],
)
def test_bad_spaces_are_refused(space):
    with pytest.raises(ValueError, match=r"action_space: expected a box with finite low < high"):
        TanhNormalPolicy(Z, space)


def test_a_box_with_low_above_high_is_refused_by_the_space_itself():
    with pytest.raises(
        ValueError, match=r"low: expected low <= high in every dimension, got low 2.0 > high 1.0"
    ):
        ActionSpace.box(2, [-1.0, 2.0], [1.0, 1.0])


def test_whole_model_trains():
    model = WorldModel(
        StandardNormalInit(Z),
        GaussianMLPTransition(Z, BOX.dim, (8,)),
        GaussianMLPEmission(Z, X, (8,)),
        TanhNormalPolicy(Z, BOX, (8,)),
    )
    guide = FilterGuide.for_model(model, rnn_dim=8, hidden=(8,))
    obs = torch.randn(6, 5, X)
    low, high = torch.tensor(BOX.low), torch.tensor(BOX.high)
    actions = low + (high - low) * torch.rand(6, 5, 2)
    actions[0, 0], actions[1, 1] = low, high  # on the bounds, as gymnasium can record them
    before = {k: v.detach().clone() for k, v in model.policy.named_parameters()}
    elbo = pyro.infer.Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=2)
    history = fit(model, guide, obs, actions, num_steps=3, batch_size=4, elbo=elbo, progress=False)
    assert len(history.loss) == 3 and all(math.isfinite(x) for x in history.loss)
    for name, param in model.policy.named_parameters():
        assert not torch.equal(param, before[name]), name


def test_normalizer_maps_the_bounds():
    norm = Normalizer(torch.zeros(X), torch.ones(X), torch.tensor([1.0, 0.2]), torch.tensor([2.0, 0.1]))
    mapped = norm.action_space(BOX)
    assert mapped.kind == "box" and mapped.dim == 2
    assert mapped.low == pytest.approx((-1.0, -2.0)) and mapped.high == pytest.approx((1.0, 3.0))
    for bound, real in ((mapped.low, BOX.low), (mapped.high, BOX.high)):
        back = norm.actions_inverse(torch.tensor(bound, dtype=torch.float64))
        torch.testing.assert_close(back, torch.tensor(real, dtype=torch.float64))
    # Actions on the real bounds map onto the mapped ones.
    torch.testing.assert_close(norm.actions(torch.tensor(BOX.high)), torch.tensor(mapped.high))
    # An infinite bound stays infinite; unbounded and discrete spaces are unchanged.
    half_open = norm.action_space(ActionSpace.box(2, [-1.0, -math.inf], [3.0, math.inf]))
    assert half_open.low == pytest.approx((-1.0, -math.inf)) and half_open.high == (1.0, math.inf)
    assert norm.action_space(ActionSpace.box(2)) == ActionSpace.box(2)
    assert norm.action_space(ActionSpace.discrete(3)) == ActionSpace.discrete(3)
    with pytest.raises(ValueError, match=r"space: expected 2 action dimensions"):
        norm.action_space(ActionSpace.box(3, -1.0, 1.0))


def test_a_model_refuses_observed_actions_outside_the_box_before_training():
    """Clamping would hide actions in the wrong units: here, normalised actions against a box in real units."""
    space = ActionSpace.box(1, low=0.0, high=1.0)
    model = WorldModel(
        StandardNormalInit(2),
        GaussianMLPTransition(2, 1, (8,)),
        GaussianMLPEmission(2, 3, (8,)),
        TanhNormalPolicy(2, space, (8,)),
    )
    guide = FilterGuide.for_model(model, rnn_dim=8, hidden=(8,))
    obs, actions = torch.randn(4, 5, 3), torch.rand(4, 5, 1)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    actions[1, 4] = -3.0  # in the padding: ignored
    actions[0, 0] = 1.0 + 1e-6  # on the bound, within rounding: accepted
    fit(model, guide, obs, actions, mask, num_steps=1, progress=False)
    actions[2, 1] = -0.5
    with pytest.raises(
        ValueError,
        match=r"actions: expected values in the policy's box \[\[0.0\], \[1.0\]\], got \[-0.5\] at episode 2, step 1",
    ):
        fit(model, guide, obs, actions, mask, num_steps=1, progress=False)
