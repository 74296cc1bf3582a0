"""Planners in latent space (act/planners.py): CEM against LQR, imagined and λ-returns,
the actor-critic, box bounds, terminal values, and the belief they start from."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_worldmodel import ActionSpace, WorldModel
from pyro_worldmodel.act import (
    ActorCriticPlanner,
    CEMPlanner,
    LatentState,
    PolicyPlanner,
    belief,
    imagined_returns,
    lambda_returns,
)
from pyro_worldmodel.config import Spec, build
from pyro_worldmodel.loop import model_based_loop
from pyro_worldmodel.model.components import (
    GaussianMLPEmission,
    LinearGaussianTransition,
    NormalPolicy,
    StandardNormalInit,
)

# ------------------------------------------------------------------ a hand-written linear-quadratic system

A_ = torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)  # a double integrator, dt = 0.1
B_ = torch.tensor([[0.005], [0.1]], dtype=torch.float64)
Q_ = torch.diag(torch.tensor([1.0, 0.1], dtype=torch.float64))
R_ = torch.tensor([[0.01]], dtype=torch.float64)


class QuadraticReward(nn.Module):
    """r(z, a) = −(zᵀ Q z + aᵀ R a), as a Normal head with a fixed unit scale."""

    def __init__(self, action_space):
        super().__init__()
        self.latent_dim, self.action_space = 2, action_space
        self.register_buffer("Q", Q_.clone())
        self.register_buffer("R", R_.clone())

    def forward(self, z, a):
        loc = -((z @ self.Q) * z).sum(-1) - ((a @ self.R) * a).sum(-1)
        return dist.Normal(loc, torch.ones_like(loc))


def linear_quadratic_model(space):
    transition = LinearGaussianTransition(2, 1)
    with torch.no_grad():
        transition.F.copy_(A_)
        transition.G.copy_(B_)
        transition.log_scale.fill_(-20.0)  # deterministic for planning purposes
    model = WorldModel(
        StandardNormalInit(2),
        transition,
        GaussianMLPEmission(2, 2, hidden=(4,)),
        NormalPolicy(2, space, hidden=(4,)),
        reward=QuadraticReward(space),
    ).double()
    return model


def lqr_first_action(z0, H):
    """Finite-horizon LQR: maximise Σ_{k<H} r(z_k, a_k) with z_{k+1} = A z_k + B a_k; the optimal a_0."""
    P = torch.zeros(2, 2, dtype=torch.float64)
    K = None
    for _ in range(H):
        K = torch.linalg.solve(R_ + B_.T @ P @ B_, B_.T @ P @ A_)
        P = Q_ + A_.T @ P @ A_ - A_.T @ P @ B_ @ K
    return -(K @ z0)


def test_cem_first_action_is_the_lqr_optimum():
    pyro.set_rng_seed(0)
    space = ActionSpace.box(1)
    model = linear_quadratic_model(space)
    H = 10
    z0 = torch.tensor([[1.0, -0.5], [-0.3, 0.8], [0.5, 0.5]], dtype=torch.float64)  # three states at once
    planner = CEMPlanner(
        horizon=H, candidates=2000, top_k=100, iterations=10, discount=1.0, init_std=5.0, min_std=1e-3
    )
    planned = planner.plan(model, LatentState(z0))  # (3, 1)
    optimal = torch.stack([lqr_first_action(z, H) for z in z0])  # (3, 1)
    assert planned.shape == optimal.shape
    # The optimal actions are of size 2–10; CEM lands within 0.1 of each.
    assert optimal.abs().min() > 1.0
    torch.testing.assert_close(planned, optimal, atol=0.1, rtol=0.0)


def test_planners_respect_the_box_even_when_reward_pushes_outside():
    space = ActionSpace.box(1, -0.5, 0.25)

    class Greedy(nn.Module):  # reward grows without bound in a
        latent_dim, action_space = 2, space

        def forward(self, z, a):
            loc = 100 * a.sum(-1) + 0 * z.sum(-1)
            return dist.Normal(loc, torch.ones_like(loc))

    model = linear_quadratic_model(space)
    model.reward = Greedy().double()
    z0 = torch.randn(4, 2, dtype=torch.float64)
    actor_critic = ActorCriticPlanner(2, space, horizon=3, updates=20, batch_size=8, lr=1e-2).double()
    actor_critic.update(model, LatentState(torch.randn(64, 2, dtype=torch.float64)))
    with torch.no_grad():
        model.policy.linear.bias.fill_(100.0)  # the learned π's mean far outside the box
    planners = (
        CEMPlanner(horizon=5, candidates=100, top_k=10, init_std=10.0),
        CEMPlanner(horizon=5, candidates=100, top_k=1),
        PolicyPlanner(mode=False),
        PolicyPlanner(mode=True),
        actor_critic,
    )
    for planner in planners:
        a = planner.plan(model, LatentState(z0))
        assert a.shape == (4, 1)
        assert ((a >= -0.5) & (a <= 0.25)).all(), a
    # the CEM plan goes to the upper bound, where the reward is highest
    a = CEMPlanner(horizon=5, candidates=200, top_k=20).plan(model, LatentState(z0))
    torch.testing.assert_close(a, torch.full_like(a, 0.25), atol=0.01, rtol=0)


def test_discrete_cem_picks_the_rewarded_action_and_unbounded_boxes_plan():
    space = ActionSpace.discrete(3)

    class PrefersTwo(nn.Module):  # reward 1 for action 2, 0 otherwise
        latent_dim, action_space = 2, space

        def forward(self, z, a_feat):
            loc = a_feat[..., 2] + 0 * z.sum(-1)
            return dist.Normal(loc, torch.ones_like(loc))

    model = WorldModel(
        StandardNormalInit(2),
        LinearGaussianTransition(2, 3),
        GaussianMLPEmission(2, 2, hidden=(4,)),
        build(Spec(latent_dim=2), 2, space).model.policy,
        reward=PrefersTwo(),
    )
    a = CEMPlanner(horizon=4, candidates=50, top_k=5).plan(model, LatentState(torch.randn(6, 2)))
    assert a.dtype == torch.long and (a == 2).all()
    # A box without finite bounds (gymnasium's Box(-inf, inf)) plans finite actions.
    box = ActionSpace.box(1, float("-inf"), float("inf"))
    model = linear_quadratic_model(box)
    for planner in (CEMPlanner(horizon=3, candidates=20, top_k=4), ActorCriticPlanner(2, box).double()):
        assert torch.isfinite(planner.plan(model, LatentState(torch.randn(2, 2, dtype=torch.float64)))).all()


def test_imagined_returns_weigh_rewards_by_the_chance_of_getting_there():
    space = ActionSpace.box(1)
    model = linear_quadratic_model(space)

    class Constant(nn.Module):
        latent_dim, action_space = 2, space

        def forward(self, z, a):
            loc = torch.ones(torch.broadcast_shapes(z.shape[:-1], a.shape[:-1]), dtype=z.dtype)
            return dist.Normal(loc, torch.ones_like(loc))

    class HalfContinue(nn.Module):
        latent_dim = 2

        def forward(self, z):
            return dist.Bernoulli(probs=torch.full(z.shape[:-1], 0.5, dtype=z.dtype))

    model.reward, model.continuation = Constant(), HalfContinue()
    z0 = torch.zeros(1, 2, dtype=torch.float64)
    got = imagined_returns(
        model,
        LatentState(z0),
        torch.zeros(1, 4, 1, dtype=torch.float64),
        discount=0.9,
        reward_scale=2.0,
        reward_loc=-1.0,
    )
    # each real reward is −1 + 2·1 = 1; step k counts with weight (0.9 · 0.5)^k
    expected = sum(0.45**k for k in range(4))
    assert got.item() == pytest.approx(expected)


def test_lambda_returns_reduce_to_monte_carlo_and_to_td():
    g = torch.Generator().manual_seed(0)
    r, c, v = torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g), torch.randn(6, 3, generator=g)
    gamma = 0.9
    # λ = 1: Σ_k γ^k (Π_{j<k} c_j) r_k + γ^H Π c · v_H
    mc = torch.zeros(3)
    w = torch.ones(3)
    for k in range(5):
        mc = mc + w * r[k]
        w = w * gamma * c[k]
    mc = mc + w * v[-1]
    torch.testing.assert_close(lambda_returns(r, c, v, gamma, 1.0)[0], mc)
    # λ = 0: one-step targets
    torch.testing.assert_close(lambda_returns(r, c, v, gamma, 0.0), r + gamma * c * v[1:])
    with pytest.raises(ValueError, match="values: expected H \\+ 1 = 6"):
        lambda_returns(r, c, v[:-1], gamma, 0.5)


def test_actor_critic_improves_its_imagined_return_and_stays_in_the_box():
    pyro.set_rng_seed(0)
    space = ActionSpace.box(1, -10.0, 10.0)
    model = linear_quadratic_model(space).float()
    model.reward.Q, model.reward.R = Q_.float(), R_.float()
    planner = ActorCriticPlanner(2, space, horizon=10, updates=1, batch_size=64, lr=3e-3)
    starts = LatentState(torch.randn(512, 2))
    first = np.mean([planner.update(model, starts)["return"] for _ in range(5)])
    for _ in range(300):
        last = planner.update(model, starts)
    later = np.mean([planner.update(model, starts)["return"] for _ in range(5)])
    assert later > first + 1.0, (first, later)
    # The model is left as it was: trainable, and without gradients from the actor or critic.
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert np.isfinite(last["critic_loss"])


def test_cem_terminal_value_looks_past_the_horizon():
    space = ActionSpace.box(1, -1.0, 1.0)
    model = linear_quadratic_model(space)

    class NoReward(nn.Module):
        latent_dim, action_space = 2, space

        def forward(self, z, a):
            loc = 0 * z.sum(-1) + 0 * a.sum(-1)
            return dist.Normal(loc, torch.ones_like(loc))

    model.reward = NoReward()
    z0 = torch.zeros(2, 2, dtype=torch.float64)
    # Rewards are all 0 within the horizon: only a value of the final state can tell plans apart.
    planner = CEMPlanner(
        horizon=2, candidates=200, top_k=20, terminal_value=True, latent_dim=2, action_space=space
    )
    planner.critic.value = lambda f: 100.0 * f[..., 1]  # worth: the final velocity, which a pushes up
    a = planner.plan(model, LatentState(z0))
    torch.testing.assert_close(a, torch.ones_like(a), atol=0.02, rtol=0)
    blind = CEMPlanner(horizon=2, candidates=200, top_k=20).plan(model, LatentState(z0))
    assert blind.abs().max() < 0.9  # without it every plan is worth 0: no pull to the bound
    # It trains in imagination through update(), and needs the sizes build() supplies.
    stats = CEMPlanner(terminal_value=True, latent_dim=2, action_space=space, value_updates=2).update(
        linear_quadratic_model(space).float(), LatentState(torch.randn(16, 2))
    )
    assert np.isfinite(stats["critic_loss"])
    with pytest.raises(ValueError, match="terminal_value: expected latent_dim and action_space"):
        CEMPlanner(terminal_value=True)


def test_actor_log_density_is_the_change_of_variables_into_the_box():
    pyro.set_rng_seed(0)
    space = ActionSpace.box(2, [-2.0, 0.0], [2.0, 1.0])
    ac = ActorCriticPlanner(3, space)
    f = torch.randn(5, 3)
    a, log_p, _ = ac.sample(f)
    pi = ac.policy(f)
    squashed = dist.TransformedDistribution(
        pi,
        [
            dist.transforms.TanhTransform(),
            dist.transforms.AffineTransform(torch.tensor([0.0, 0.5]), torch.tensor([2.0, 0.5])),
        ],
    )
    torch.testing.assert_close(log_p, squashed.log_prob(a).sum(-1), atol=1e-4, rtol=1e-4)
    assert ((a >= torch.tensor([-2.0, 0.0])) & (a <= torch.tensor([2.0, 1.0]))).all()


def test_planners_refuse_a_model_without_a_reward_head():
    built = build(Spec(latent_dim=2, planner={"name": "cem"}), 2, ActionSpace.box(1, -1.0, 1.0))
    state = LatentState(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="the 'cem' planner needs a reward head"):
        built.planner.plan(built.model, state)
    ac = ActorCriticPlanner(2, ActionSpace.box(1, -1.0, 1.0))
    with pytest.raises(ValueError, match="the 'actor_critic' planner needs a reward head"):
        ac.update(built.model, state)
    with pytest.raises(ValueError, match="spec: the loop plans with the model's reward head"):
        model_based_loop("Pendulum-v1", Spec(latent_dim=2), iterations=1, progress=False)


def test_recurrent_models_plan_from_the_filtered_deterministic_state():
    pyro.set_rng_seed(0)
    spec = Spec(
        latent_dim=3,
        transition={"name": "rssm", "deter_dim": 5, "hidden": [8]},
        emission={"name": "gaussian_mlp", "hidden": [8]},
        guide={"name": "filter", "rnn_dim": 8, "hidden": [8]},
        reward={"name": "gaussian", "hidden": [8]},
        continuation={"name": "bernoulli", "hidden": [8]},
    )
    space = ActionSpace.box(1, -1.0, 1.0)
    model, guide = (lambda b: (b.model, b.guide))(build(spec, 2, space))
    obs, actions = torch.randn(2, 4, 2), torch.rand(2, 4, 1) * 2 - 1
    pyro.set_rng_seed(1)
    state = belief(model, guide, obs, actions)
    # h_4 is the model's recurrence over the guide's z_1 … z_3 and a_1 … a_3: replay the model on the same draws.
    pyro.set_rng_seed(1)
    guide_tr = poutine.trace(guide).get_trace(obs, actions)
    h = model.transition.initial_deter((2,), obs)
    for t in range(3):
        _, h = model.transition(guide_tr.nodes[f"z_{t}"]["value"].squeeze(-2), actions[:, t], h)
    torch.testing.assert_close(state.h, h)
    torch.testing.assert_close(state.z, guide_tr.nodes["z_3"]["value"].squeeze(-2))
    a = CEMPlanner(horizon=3, candidates=20, top_k=4).plan(model, state)
    assert a.shape == (2, 1) and ((a >= -1) & (a <= 1)).all()
    ac = ActorCriticPlanner(model.latent_dim + model.deter_dim, space, horizon=3, updates=2, batch_size=4)
    ac.update(model, state)
    assert ac.plan(model, state).shape == (2, 1)


def test_acting_needs_a_guide_that_does_not_read_the_future():
    built = build(
        Spec(latent_dim=2, guide={"name": "smoothing"}, reward={"name": "gaussian"}), 2, ActionSpace.box(1)
    )
    with pytest.raises(ValueError, match="guide: SmoothingGuide reads a_t and the future"):
        belief(built.model, built.guide, torch.zeros(1, 3, 2), torch.zeros(1, 3, 1))


# ------------------------------------------------------------------ ensembles: one dynamics per future


def two_member_model(space, signs=(1.0, -1.0), Z=2):
    """An ensemble whose member k moves z[0] by signs[k] · a: z' = z + signs[k] a, the MLPs at zero."""
    from pyro_worldmodel.model.components import EnsembleTransition

    transition = EnsembleTransition(Z, 1, members=len(signs), hidden=(4,))
    with torch.no_grad():
        for member, sign in zip(transition.member, signs):
            member.linear.weight.zero_()
            member.linear.weight[0, Z] = sign

    class FirstCoordinate(nn.Module):  # r = z[0]
        latent_dim, action_space = Z, space

        def forward(self, z, a):
            loc = z[..., 0] + 0 * a.sum(-1)
            return dist.Normal(loc, torch.ones_like(loc))

    return WorldModel(
        StandardNormalInit(Z),
        transition,
        GaussianMLPEmission(Z, 2, hidden=(4,)),
        NormalPolicy(Z, space, hidden=(4,)),
        reward=FirstCoordinate(),
    )


def test_ensemble_member_k_gives_rows_k_mod_K_of_the_leading_dimension():
    from pyro_worldmodel.model.components import EnsembleTransition

    torch.manual_seed(0)
    tr = EnsembleTransition(2, 1, members=3, hidden=(4,))
    for member in tr.member:  # members apart, as training makes them
        nn.init.normal_(member.net[-1].weight)
        nn.init.normal_(member.linear.bias)
    z, a = torch.randn(7, 5, 2), torch.randn(5, 1)  # a broadcasts, as a planner's does
    d = tr(z, a).base_dist
    for k in range(3):
        want = tr.member[k](z[k::3], a.expand(7, 5, 1)[k::3]).base_dist
        torch.testing.assert_close(d.loc[k::3], want.loc)
        torch.testing.assert_close(d.scale[k::3], want.scale)
    torch.testing.assert_close(tr(z[:1], a).base_dist.loc, tr.member[0](z[:1], a).base_dist.loc)


def test_each_imagined_future_follows_one_member_from_context_to_horizon():
    from pyro_worldmodel import FilterGuide
    from pyro_worldmodel.evaluate import imagine
    from pyro_worldmodel.model.components import EnsembleTransition

    space = ActionSpace.box(1)
    K, Z = 3, 2
    transition = EnsembleTransition(Z, 1, members=K, hidden=(4,), min_scale=0.0)
    with torch.no_grad():
        for k, member in enumerate(transition.member):  # z' = z + (k, 0), noise ~ 1e-13
            member.linear.bias.copy_(torch.tensor([float(k), 0.0]))
            member.net[-1].bias[Z:] = -30.0
    model = WorldModel(StandardNormalInit(Z), transition, GaussianMLPEmission(Z, 2, hidden=(4,)),
                       NormalPolicy(Z, space, hidden=(4,)))  # fmt: skip
    guide = FilterGuide.for_model(model, rnn_dim=4)
    im = imagine(model, guide, torch.randn(2, 4, 2), torch.randn(2, 4, 1), 5,
                 future_actions=torch.randn(2, 5, 1), num_samples=2 * K)  # fmt: skip
    steps = im.latents[:, :, 1:, 0] - im.latents[:, :, :-1, 0]  # (S, B, H-1)
    for s in range(2 * K):
        torch.testing.assert_close(steps[s], torch.full_like(steps[s], float(s % K)), atol=1e-4, rtol=0)


def test_cem_is_optimistic_or_pessimistic_about_what_the_members_disagree_on():
    space = ActionSpace.box(1, -1.0, 1.0)
    # r_1 = z_1[0] = ±a_0: mean over members 0.25 a_0, spread 0.75 |a_0|
    model = two_member_model(space, signs=(1.0, -0.5))
    z0 = torch.zeros(3, 2)
    pyro.set_rng_seed(0)
    common = dict(horizon=2, candidates=300, top_k=30, iterations=5, discount=1.0)  # r_1 = ±a_0
    bold = CEMPlanner(epistemic=1.0, **common).plan(model, LatentState(z0))
    careful = CEMPlanner(epistemic=-1.0, **common).plan(model, LatentState(z0))
    # optimism: 0.25 a + 0.75 |a|, best at a = 1; pessimism: 0.25 a − 0.75 |a|, best at a = 0
    assert (bold > 0.95).all() and (careful.abs() < 0.1).all(), (bold, careful)
    # one member that alone decides: optimism and pessimism plan alike, for its best action
    agree = two_member_model(space, signs=(1.0, 1.0))
    for kappa in (1.0, -1.0, 0.0):
        a = CEMPlanner(epistemic=kappa, **common).plan(agree, LatentState(z0)) if kappa else None
        if a is not None:
            torch.testing.assert_close(a, torch.ones_like(a), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="epistemic: 1.0 weighs the disagreement of an ensemble's members"):
        CEMPlanner(epistemic=1.0, **common).plan(
            linear_quadratic_model(ActionSpace.box(1)), LatentState(z0.double())
        )
    with pytest.raises(ValueError, match="epistemic: expected a finite number, got inf"):
        CEMPlanner(epistemic=float("inf"))


def test_cem_explores_where_the_members_disagree_on_the_next_state():
    """The members move z[0] by +a and −0.5a, so their states part by 1.5|a|: the exploration
    bonus Σ_k γ^k · mean_i std_m(z_k,i) is 0.375 |a_0| + …, largest at |a| = 1."""
    space = ActionSpace.box(1, -1.0, 1.0)
    model = two_member_model(space, signs=(1.0, -0.5))  # r = z[0]: the members' mean return is 0.25 a_0
    z0 = torch.zeros(2, 2)
    pyro.set_rng_seed(0)
    common = dict(horizon=2, candidates=300, top_k=30, iterations=5, discount=1.0)
    calm = CEMPlanner(**{**common, "explore": 0.0, "epistemic": -1.0}).plan(model, LatentState(z0))
    curious = CEMPlanner(**{**common, "explore": 10.0, "epistemic": -1.0}).plan(model, LatentState(z0))
    # pessimism alone stays at a = 0; a large enough exploration bonus outweighs it
    assert (calm.abs() < 0.1).all() and (curious.abs() > 0.9).all(), (calm, curious)
    with pytest.raises(ValueError, match="explore: expected a finite number >= 0, got -1"):
        CEMPlanner(explore=-1)
    with pytest.raises(ValueError, match="explore: 1.0 weighs the disagreement of an ensemble's members"):
        CEMPlanner(explore=1.0, **common).plan(
            linear_quadratic_model(ActionSpace.box(1)), LatentState(z0.double())
        )
