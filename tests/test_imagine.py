"""Imagination is the model's posterior predictive: checked against the Kalman forecast."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_worldmodel import ActionSpace, FilterGuide, LinearGaussianSSM, WorldModel
from pyro_worldmodel.data import Normalizer
from pyro_worldmodel.evaluate import CopyLast, imagine, open_loop


def brute_force_forecast(ssm, obs, actions, future_actions):
    """p(x_{C+1:C+H} | x_{1:C}, a_{1:C}) with the future actions set, from the
    joint Gaussian of every variable written as an affine map of unit noises."""
    B, C, X = obs.shape
    H = future_actions.shape[1]
    Z, A = ssm.latent_dim, ssm.action_dim
    T = C + H
    n_noise = Z + T * (X + A + Z)
    f64 = torch.float64
    out = []
    for b in range(B):
        z_mean, z_M = ssm.init_loc.clone(), torch.zeros(Z, n_noise, dtype=f64)
        z_M[:, :Z] = torch.diag(ssm.init_scale)
        offset = Z
        past_means, past_Ms, fut_means, fut_Ms = [], [], [], []
        for t in range(T):
            x_mean, x_M = ssm.H @ z_mean + ssm.obs_bias, ssm.H @ z_M
            x_M[:, offset : offset + X] += torch.diag(ssm.obs_scale)
            offset += X
            if t < C:
                a_mean, a_M = ssm.K @ z_mean + ssm.act_bias, ssm.K @ z_M
                a_M[:, offset : offset + A] += torch.diag(ssm.act_scale)
                past_means += [x_mean, a_mean]
                past_Ms += [x_M, a_M]
            else:  # an intervention: a constant, not emitted from z
                a_mean, a_M = future_actions[b, t - C], torch.zeros(A, n_noise, dtype=f64)
                fut_means.append(x_mean)
                fut_Ms.append(x_M)
            offset += A
            z_mean = ssm.F @ z_mean + ssm.G @ a_mean + ssm.bias
            z_M = ssm.F @ z_M + ssm.G @ a_M
            z_M[:, offset : offset + Z] += torch.diag(ssm.trans_scale)
            offset += Z
        mp, Mp = torch.cat(past_means), torch.cat(past_Ms)
        mf, Mf = torch.stack(fut_means), torch.stack(fut_Ms)  # (H, X), (H, X, n)
        y = torch.cat([obs[b], actions[b]], dim=-1).reshape(-1)
        gain = torch.linalg.solve(Mp @ Mp.T, Mp @ Mf.reshape(H * X, -1).T).T  # (H X, P)
        loc = mf.reshape(-1) + gain @ (y - mp)
        cov = Mf.reshape(H * X, -1) @ Mf.reshape(H * X, -1).T - gain @ Mp @ Mf.reshape(H * X, -1).T
        out.append(
            (
                loc.reshape(H, X),
                torch.stack([cov[h * X : (h + 1) * X, h * X : (h + 1) * X] for h in range(H)]),
            )
        )
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


@pytest.fixture
def system():
    return LinearGaussianSSM.random(latent_dim=3, obs_dim=4, action_dim=2, seed=1)


def test_forecast_matches_the_brute_force_joint_gaussian(system):
    obs, actions, _ = system.sample(3, 9, seed=2)
    C = 6
    forecast = system.forecast(obs[:, :C], actions[:, :C], actions[:, C:])
    loc, cov = brute_force_forecast(system, obs[:, :C], actions[:, :C], actions[:, C:])
    torch.testing.assert_close(forecast.loc, loc, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(forecast.covariance_matrix, cov, rtol=1e-9, atol=1e-9)


def kalman_guide(system, C):
    """A guide whose q(z_C) is the Kalman filter's posterior; the future depends on nothing else."""

    def guide(obs, actions, mask=None, **_):
        B = obs.shape[0]
        posterior = system.filter(obs, actions)
        with pyro.plate("episodes", B, dim=-2):
            for t in range(C - 1):
                pyro.sample(
                    f"z_{t}",
                    dist.Normal(torch.zeros(B, 1, system.latent_dim, dtype=obs.dtype), 1.0).to_event(1),
                )
            last = dist.MultivariateNormal(posterior.loc[:, None], posterior.covariance_matrix[:, None])
            pyro.sample(f"z_{C - 1}", last)

    return guide


@pytest.mark.parametrize("parallel", [True, False])
def test_imagined_means_equal_the_kalman_forecast(system, parallel):
    obs, actions, _ = system.sample(3, 11, seed=3)
    C, H, S = 6, 5, 4000 if parallel else 1000
    model = system.world_model()
    im = imagine(
        model,
        kalman_guide(system, C),
        obs[:, :C],
        actions[:, :C],
        H,
        future_actions=actions[:, C:],
        num_samples=S,
        parallel=parallel,
    )
    assert im.obs.shape == (S, 3, H, 4) and im.latents.shape == (S, 3, H, 3)
    torch.testing.assert_close(im.actions, actions[:, C:].expand(S, 3, H, 2))
    forecast = system.forecast(obs[:, :C], actions[:, :C], actions[:, C:])
    # The means over samples agree within 5 standard errors of the Monte Carlo mean.
    var = forecast.covariance_matrix.diagonal(dim1=-2, dim2=-1)  # (B, H, X)
    se = (var / S).sqrt()
    assert ((im.obs.mean(0) - forecast.loc).abs() < 5 * se).all()
    # obs_mean is E[x | z] per sample; its average has the same expectation.
    assert ((im.obs_mean.mean(0) - forecast.loc).abs() < 5 * se).all()
    # And the spread of the sampled observations is the forecast's.
    if parallel:
        torch.testing.assert_close(im.obs.var(0), var, rtol=0.15, atol=0.0)


def test_obs_mean_is_the_emission_mean_of_each_latent(system):
    obs, actions, _ = system.sample(2, 6, seed=4)
    model = system.world_model()
    im = imagine(model, kalman_guide(system, 6), obs, actions, 3, num_samples=7)
    expected = im.latents @ system.H.T + system.obs_bias
    torch.testing.assert_close(im.obs_mean, expected)


def test_imagination_samples_actions_from_the_policy_when_none_given(system):
    obs, actions, _ = system.sample(2, 6, seed=5)
    model = system.world_model()
    S = 4000
    im = imagine(model, kalman_guide(system, 6), obs, actions, 2, num_samples=S)
    # π(a | z) = N(K z + d, diag s²): the residuals have the policy's scale.
    resid = im.actions - (im.latents @ system.K.T + system.act_bias)
    torch.testing.assert_close(resid.std(dim=(0, 1, 2)), system.act_scale, rtol=0.05, atol=0.0)


def test_callable_actions_see_the_imagined_latent(system):
    obs, actions, _ = system.sample(2, 6, seed=6)
    model = system.world_model()

    def act(z):  # (..., B, 1, Z) -> (..., B, 1, A)
        return z[..., :2].tanh()

    im = imagine(model, kalman_guide(system, 6), obs, actions, 4, future_actions=act, num_samples=5)
    torch.testing.assert_close(im.actions, im.latents[..., :2].tanh())


def test_normalizer_makes_inputs_and_outputs_real_units(system):
    obs, actions, _ = system.sample(2, 6, seed=7)
    obs, actions = obs.float(), actions.float()
    model = WorldModel.default(4, ActionSpace.box(2), latent_dim=3, hidden=(8,))
    guide = FilterGuide.for_model(model, rnn_dim=8)
    norm = Normalizer(
        torch.tensor([1.0, -2, 3, 0]),
        torch.tensor([2.0, 0.5, 1, 3]),
        torch.tensor([0.5, 0]),
        torch.tensor([2.0, 4]),
    )
    future = torch.randn(2, 3, 2)
    pyro.set_rng_seed(1)
    real = imagine(model, guide, obs, actions, 3, future_actions=future, num_samples=4, normalizer=norm)
    pyro.set_rng_seed(1)
    units = imagine(
        model,
        guide,
        norm.obs(obs),
        norm.actions(actions),
        3,
        future_actions=norm.actions(future),
        num_samples=4,
    )
    torch.testing.assert_close(real.obs, norm.obs_inverse(units.obs))
    torch.testing.assert_close(real.obs_mean, norm.obs_inverse(units.obs_mean))
    torch.testing.assert_close(real.actions, future.expand(4, 2, 3, 2))
    torch.testing.assert_close(real.latents, units.latents)
    torch.testing.assert_close(real.context_obs, obs)


def test_discrete_actions():
    model = WorldModel.default(3, ActionSpace.discrete(4), latent_dim=2, hidden=(8,))
    guide = FilterGuide.for_model(model, rnn_dim=8)
    obs, actions = torch.randn(5, 4, 3), torch.randint(4, (5, 4))
    im = imagine(model, guide, obs, actions, 6, num_samples=3)
    assert im.actions.shape == (3, 5, 6) and im.actions.dtype == torch.int64
    assert ((im.actions >= 0) & (im.actions < 4)).all()
    future = torch.randint(4, (5, 6))
    im = imagine(model, guide, obs, actions, 6, future_actions=future, num_samples=3)
    assert torch.equal(im.actions, future.expand(3, 5, 6))


def test_horizon_zero_leaves_the_training_program_unchanged():
    model = WorldModel.default(3, ActionSpace.box(1), latent_dim=2, hidden=(8,))
    obs, actions = torch.randn(2, 4, 3), torch.randn(2, 4, 1)
    trace = pyro.poutine.trace(model.model).get_trace(obs, actions)
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert names == ["episodes", "z_0", "z_1", "z_2", "z_3", "time", "x", "a"]


def test_bad_input():
    model = WorldModel.default(3, ActionSpace.box(1), latent_dim=2, hidden=(8,))
    guide = FilterGuide.for_model(model, rnn_dim=8)
    obs, actions = torch.randn(2, 4, 3), torch.randn(2, 4, 1)
    for horizon in (-1, 0):
        with pytest.raises(ValueError, match=f"horizon: expected a positive int, got {horizon}"):
            imagine(model, guide, obs, actions, horizon)
    with pytest.raises(ValueError, match="horizon: expected an int >= 0, got -1"):
        model.model(obs, actions, horizon=-1)
    with pytest.raises(ValueError, match=r"future_actions: expected shape \(2, 3, 1\).*got \(2, 2, 1\)"):
        imagine(model, guide, obs, actions, 3, future_actions=torch.zeros(2, 2, 1))
    with pytest.raises(ValueError, match="num_samples: expected a positive int, got 0"):
        imagine(model, guide, obs, actions, 3, num_samples=0)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    with pytest.raises(ValueError, match="mask: expected every context step observed"):
        model.model(obs, actions, mask, horizon=2)


def test_open_loop_of_the_true_model_matches_the_exact_forecast(system, monkeypatch):
    """At the true parameters, the model's open-loop MSE and log-likelihood are the Kalman forecast's."""
    N, T, C, H = 8, 12, 4, 5
    obs, actions, _ = system.sample(N, T, seed=8)
    lengths = torch.tensor([12, 12, 10, 9, 8, 12, 5, 11])
    mask = torch.arange(T) < lengths[:, None]
    model = system.world_model()
    guide = kalman_guide(system, C)
    pyro.set_rng_seed(0)
    ol = open_loop(model, guide, obs, actions, mask, context=C, horizon=H, num_samples=3000, max_windows=None)
    # By hand: every start s with s + C < L, and at horizon h the windows where s + C + h - 1 < L.
    sq, ll, crps, cov, ll_diag = ([[] for _ in range(H)] for _ in range(5))
    for n in range(N):
        L = int(lengths[n])
        for s in range(L - C):
            future_actions = actions[n : n + 1, s + C : s + C + H]
            future_actions = torch.cat([future_actions, torch.zeros(1, H - future_actions.shape[1], 2)], 1)
            f = system.forecast(obs[n : n + 1, s : s + C], actions[n : n + 1, s : s + C], future_actions)
            for h in range(min(H, L - s - C)):
                x = obs[n, s + C + h]
                sq[h].append(((f.loc[0, h] - x) ** 2).mean())
                ll[h].append(dist.MultivariateNormal(f.loc[0, h], f.covariance_matrix[0, h]).log_prob(x))
                sd = f.covariance_matrix[0, h].diagonal().sqrt()
                ll_diag[h].append(dist.Normal(f.loc[0, h], sd).log_prob(x).sum())
                crps[h].append(gaussian_crps(f.loc[0, h], sd, x).mean())
                cov[h].append(((x - f.loc[0, h]).abs() <= 1.6448536 * sd).double().mean())
    assert ol.num_windows == sum(int(L) - C for L in lengths)
    mse = torch.stack([torch.stack(v).mean() for v in sq])
    log_lik = torch.stack([torch.stack(v).mean() for v in ll])
    torch.testing.assert_close(torch.tensor(ol.mse["model"], dtype=torch.float64), mse, rtol=0.05, atol=0.0)
    # log (1/S) Σ_s p(x | z_s) is biased low by Jensen; at S = 3000 by a few hundredths.
    torch.testing.assert_close(
        torch.tensor(ol.log_lik["model"], dtype=torch.float64), log_lik, rtol=0, atol=0.1
    )
    # The predictive is Gaussian here, so the moment-matched Gaussian is unbiased but for the
    # O(1/S) of its sample covariance: within 0.02 nats of the exact value, closer than the mixture.
    gaussian = torch.tensor(ol.log_lik_gaussian["model"], dtype=torch.float64)
    torch.testing.assert_close(gaussian, log_lik, rtol=0, atol=0.02)
    assert (gaussian - log_lik).abs().mean() < (torch.tensor(ol.log_lik["model"]) - log_lik).abs().mean()
    # CRPS from 3000 draws against the closed form of each Gaussian marginal.
    exact_crps = torch.stack([torch.stack(v).mean() for v in crps])
    torch.testing.assert_close(
        torch.tensor(ol.crps["model"], dtype=torch.float64), exact_crps, rtol=0.03, atol=0
    )
    # The 90% interval from the draws covers what the exact 90% interval covers, up to the
    # draws' quantile error (≈ 0.01 of probability at S = 3000) on these windows.
    exact_cov = torch.stack([torch.stack(v).mean() for v in cov])
    torch.testing.assert_close(
        torch.tensor(ol.coverage["0.9"]["model"], dtype=torch.float64), exact_cov, rtol=0, atol=0.03
    )
    # Per-window figures: the median and 10th percentile bracket as they must, and each
    # window's mean log-likelihood is listed with its (episode, start).
    assert all(p <= m for p, m in zip(ol.log_lik_p10["model"], ol.log_lik_median["model"]))
    assert len(ol.windows) == len(ol.window_log_lik) == ol.num_windows
    assert sorted(map(tuple, ol.windows)) == [(n, s) for n in range(N) for s in range(int(lengths[n]) - C)]
    # Beyond FULL_COVARIANCE_DIMS observation dimensions the Gaussian is the diagonal one:
    # the product of the exact forecast's marginals.
    import importlib

    monkeypatch.setattr(
        importlib.import_module("pyro_worldmodel.evaluate.open_loop"), "FULL_COVARIANCE_DIMS", 3
    )
    pyro.set_rng_seed(0)
    diag = open_loop(
        model, guide, obs, actions, mask, context=C, horizon=H, num_samples=3000, max_windows=None
    )
    exact_diag = torch.stack([torch.stack(v).mean() for v in ll_diag])
    # the variances from 3,000 draws, at the horizon with the fewest windows: within 0.05 nats
    torch.testing.assert_close(
        torch.tensor(diag.log_lik_gaussian["model"], dtype=torch.float64), exact_diag, rtol=0, atol=0.05
    )
    assert (exact_diag - log_lik).abs().max() > 0.1  # the dimensions are correlated: the two differ


def gaussian_crps(loc, scale, x):
    """The closed-form CRPS of N(loc, scale²) at x (Gneiting and Raftery, 2007)."""
    z = (x - loc) / scale
    normal = dist.Normal(torch.zeros_like(z), 1.0)
    return scale * (z * (2 * normal.cdf(z) - 1) + 2 * normal.log_prob(z).exp() - 1 / math.sqrt(math.pi))


def test_open_loop_reports_real_units_and_baselines(system):
    N, T, C, H = 6, 10, 3, 4
    obs, actions, _ = system.sample(N, T, seed=9)
    obs, actions = obs.float(), actions.float()
    model = WorldModel.default(4, ActionSpace.box(2), latent_dim=3, hidden=(8,))
    guide = FilterGuide.for_model(model, rnn_dim=8)
    s, loc = 3.0, torch.tensor([1.0, 2.0, -1.0, 0.5])
    norm = Normalizer(loc, torch.full((4,), s), torch.zeros(2), torch.ones(2))
    copy_last = CopyLast(ActionSpace.box(2)).fit(obs, actions, None, horizon=H)
    pyro.set_rng_seed(3)
    in_units = open_loop(
        model, guide, obs, actions, context=C, horizon=H, num_samples=4, baselines={"copy": copy_last}
    )
    pyro.set_rng_seed(3)
    real = open_loop(
        model, guide, norm.obs_inverse(obs), actions, context=C, horizon=H, num_samples=4,
        normalizer=norm, baselines={"copy": copy_last},
    )  # fmt: skip
    for name in ("model", "copy"):
        torch.testing.assert_close(torch.tensor(real.mse[name]), s**2 * torch.tensor(in_units.mse[name]))
        torch.testing.assert_close(
            torch.tensor(real.log_lik[name]), torch.tensor(in_units.log_lik[name]) - 4 * math.log(s)
        )
    # copy-the-last-observation by hand
    expected = [
        sum(
            ((obs[n, s0 + C - 1] - obs[n, s0 + C + h]) ** 2).mean()
            for n in range(N)
            for s0 in range(T - C - h)
        )
        / sum(1 for n in range(N) for s0 in range(T - C - h))
        for h in range(H)
    ]
    torch.testing.assert_close(torch.tensor(in_units.mse["copy"]), torch.stack(expected))
    assert "| copy |" in in_units.table(horizons=(1, 4))


def test_future_actions_are_checked_and_converted():
    model = WorldModel.default(3, ActionSpace.discrete(2), latent_dim=2, hidden=(8,))
    guide = FilterGuide.for_model(model, rnn_dim=8)
    obs, actions = torch.randn(2, 4, 3), torch.randint(2, (2, 4))
    with pytest.raises(ValueError, match="future_actions: expected integers for .*got dtype torch.float32"):
        imagine(model, guide, obs, actions, 3, future_actions=torch.zeros(2, 3))
    im = imagine(model, guide, obs, actions, 3, future_actions=np.ones((2, 3), dtype=np.int64), num_samples=2)
    assert torch.equal(im.actions, torch.ones(2, 2, 3, dtype=torch.int64))
    # Integer actions for a box space are real actions: normalised like any other.
    box = WorldModel.default(3, ActionSpace.box(1), latent_dim=2, hidden=(8,))
    box_guide = FilterGuide.for_model(box, rnn_dim=8)
    norm = Normalizer(torch.zeros(3), torch.ones(3), torch.tensor([1.0]), torch.tensor([2.0]))
    future = torch.tensor([[[3], [5]], [[1], [-1]]])
    pyro.set_rng_seed(0)
    a = imagine(
        box, box_guide, obs, actions[..., None], 2, future_actions=future, num_samples=2, normalizer=norm
    )
    pyro.set_rng_seed(0)
    b = imagine(
        box,
        box_guide,
        obs,
        actions[..., None].float(),
        2,
        future_actions=future.float(),
        num_samples=2,
        normalizer=norm,
    )
    torch.testing.assert_close(a.obs, b.obs)
    torch.testing.assert_close(a.actions, future.float().expand(2, 2, 2, 1))


def test_open_loop_ignores_nan_padding():
    model = WorldModel.default(3, ActionSpace.box(1), latent_dim=2, hidden=(8,))
    guide = FilterGuide.for_model(model, rnn_dim=8)
    obs, actions = torch.randn(3, 8, 3), torch.randn(3, 8, 1)
    mask = torch.arange(8) < torch.tensor([8, 6, 5])[:, None]
    kwargs = dict(
        context=2,
        horizon=3,
        num_samples=3,
        baselines={"copy": CopyLast(ActionSpace.box(1)).fit(obs, actions, mask, horizon=3)},
    )
    pyro.set_rng_seed(0)
    clean = open_loop(model, guide, obs, actions, mask, **kwargs)
    nan_obs = torch.where(mask[..., None], obs, torch.nan)
    nan_actions = torch.where(mask[..., None], actions, torch.nan)
    pyro.set_rng_seed(0)
    padded = open_loop(model, guide, nan_obs, nan_actions, mask, **kwargs)
    assert padded.mse == clean.mse and padded.log_lik == clean.log_lik
    assert clean.count == [6 + 4 + 3, 5 + 3 + 2, 4 + 2 + 1]


def small(space):
    model = WorldModel.default(3, space, latent_dim=2, hidden=(8,))
    return model, FilterGuide.for_model(model, rnn_dim=8)


@pytest.mark.parametrize("validation", [True, False])
def test_the_context_is_checked_as_evaluation_checks_it(validation):
    """Whether or not Pyro validation is on: imagine is where a run's futures are drawn."""
    model, guide = small(ActionSpace.discrete(2))
    obs, actions = torch.randn(2, 4, 3), torch.randint(2, (2, 4))
    nan_obs = obs.clone()
    nan_obs[1, 2, 0] = torch.nan
    bad_actions = actions.clone()
    bad_actions[0, 3] = 5
    cases = [
        (obs.to(torch.complex64), actions, r"obs: expected a real dtype, got torch.complex64"),
        (obs > 0, actions, r"obs: expected a real dtype, got torch.bool"),
        (obs[0], actions, r"obs: expected shape \(B, T, 3\), got \(4, 3\)"),
        (nan_obs, actions, r"obs: expected finite values .*first at episode 1, step 2"),
        (obs, bad_actions, r"actions: expected integers in \[0, 2\), got 5 at episode 0, step 3"),
        (obs, actions.float(), r"actions: expected an integer dtype .*got torch.float32"),
        ("obs", actions, r"obs: expected a tensor or array, got str"),
    ]
    with pyro.validation_enabled(validation):
        for o, a, message in cases:
            with pytest.raises(ValueError, match=message):
                imagine(model, guide, o, a, 2, num_samples=2)
        box, box_guide = small(ActionSpace.box(1))
        nan_actions = torch.randn(2, 4, 1)
        nan_actions[1, 0, 0] = torch.inf
        with pytest.raises(ValueError, match=r"actions: expected finite values .*first at episode 1, step 0"):
            imagine(box, box_guide, obs, nan_actions, 2, num_samples=2)
        with pytest.raises(
            ValueError, match=r"actions: expected a floating dtype for a box space, got torch.complex64"
        ):
            imagine(box, box_guide, obs, torch.randn(2, 4, 1).to(torch.complex64), 2, num_samples=2)


def test_the_model_checks_the_context_in_its_own_units():
    """A Bernoulli emission reads {0, 1}: refused on real-valued context even with validation off."""
    from pyro_worldmodel.model.components import (
        BernoulliEmission,
        CategoricalPolicy,
        GaussianMLPTransition,
        StandardNormalInit,
    )

    space = ActionSpace.discrete(2)
    model = WorldModel(
        StandardNormalInit(2),
        GaussianMLPTransition(2, 2, hidden=(8,)),
        BernoulliEmission(2, 3, hidden=(8,)),
        CategoricalPolicy(2, space, hidden=(8,)),
    )
    guide = FilterGuide.for_model(model, rnn_dim=8)
    obs, actions = (torch.rand(2, 4, 3) > 0.5).float(), torch.randint(2, (2, 4))
    im = imagine(model, guide, obs, actions, 2, num_samples=2)
    assert set(im.obs.unique().tolist()) <= {0.0, 1.0}
    obs[1, 3, 2] = 0.25
    with (
        pyro.validation_enabled(False),
        pytest.raises(ValueError, match=r"obs: expected 0 or 1 .*got 0.25 at episode 1, step 3, dimension 2"),
    ):
        imagine(model, guide, obs, actions, 2, num_samples=2)


def test_integer_observations_are_normalised_as_the_same_floats():
    model, guide = small(ActionSpace.box(1))
    norm = Normalizer(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 0.5, 4]), torch.zeros(1), torch.ones(1))
    obs, actions = torch.randint(-5, 6, (2, 4, 3)), torch.randn(2, 4, 1)
    results = []
    for o in (obs, obs.float()):
        pyro.set_rng_seed(0)
        results.append(imagine(model, guide, o, actions, 3, num_samples=4, normalizer=norm))
    ints, floats = results
    assert ints.context_obs.dtype == torch.float32
    torch.testing.assert_close(ints.context_obs, obs.float())
    torch.testing.assert_close(ints.latents, floats.latents)
    torch.testing.assert_close(ints.obs_mean, floats.obs_mean)
    torch.testing.assert_close(ints.obs, floats.obs)
    # The context reached the guide: a different one gives different latents.
    pyro.set_rng_seed(0)
    other = imagine(model, guide, obs.float() + 10, actions, 3, num_samples=4, normalizer=norm)
    assert not torch.allclose(other.latents, ints.latents)


def test_future_action_tensors_are_checked():
    model, guide = small(ActionSpace.discrete(2))
    obs, actions = torch.randn(2, 4, 3), torch.randint(2, (2, 4))
    cases = [
        (torch.tensor([[0, 1, 1], [1, 0, 5]]), r"expected integers in \[0, 2\), got 5 at episode 1, step 2"),
        (
            torch.tensor([[0, -1, 1], [1, 0, 1]]),
            r"expected integers in \[0, 2\), got -1 at episode 0, step 1",
        ),
        (torch.ones(2, 3, dtype=torch.bool), r"expected integers for .*got dtype torch.bool"),
        (torch.ones(2, 3, 1, dtype=torch.long), r"expected shape \(2, 3\) for .*got \(2, 3, 1\)"),
    ]
    for future, message in cases:
        with pytest.raises(ValueError, match="future_actions: " + message):
            imagine(model, guide, obs, actions, 3, future_actions=future, num_samples=2)
    with pytest.raises(
        ValueError, match=r"future_actions: expected integers in \[0, 2\), got 2 at episode 0"
    ):
        model.model(obs, actions, horizon=3, future_actions=torch.full((2, 3), 2))
    box, box_guide = small(ActionSpace.box(1))
    nan = torch.zeros(2, 3, 1)
    nan[1, 0, 0] = torch.nan
    norm = Normalizer(torch.zeros(3), torch.ones(3), torch.tensor([1.0]), torch.tensor([2.0]))
    for normalizer in (None, norm):
        for future, message in (
            (nan, r"expected finite values, got \[nan\] at episode 1, step 0"),
            (torch.zeros(2, 3, 1, dtype=torch.complex64), r"expected real numbers for .*torch.complex64"),
            (torch.zeros(2, 3), r"expected shape \(2, 3, 1\) for .*got \(2, 3\)"),
        ):
            with pytest.raises(ValueError, match="future_actions: " + message):
                imagine(
                    box, box_guide, obs, torch.randn(2, 4, 1), 3,
                    future_actions=future, num_samples=2, normalizer=normalizer,
                )  # fmt: skip


def test_a_callable_must_return_one_action_per_particle_and_episode():
    model, guide = small(ActionSpace.box(1))
    obs, actions = torch.randn(2, 4, 3), torch.randn(2, 4, 1)
    norm = Normalizer(torch.zeros(3), torch.ones(3), torch.tensor([1.0]), torch.tensor([2.0]))

    def per_episode(z):  # (2, 1, 1): the same action for every sample, broadcast before
        return torch.zeros(2, 1, 1)

    shape = r"expected the callable to return shape \(3, 2, 1, 1\) for its input of shape \(3, 2, 1, 2\)"
    with pytest.raises(ValueError, match=f"future_actions: {shape} at imagined step 0, got \\(2, 1, 1\\)"):
        imagine(model, guide, obs, actions, 3, future_actions=per_episode, num_samples=3)
    # Through the normaliser, whose broadcasting would widen a (..., 1) action to A dims.
    with pytest.raises(ValueError, match=f"future_actions: {shape}, got \\(2, 1, 1\\)"):
        imagine(model, guide, obs, actions, 3, future_actions=per_episode, num_samples=3, normalizer=norm)
    calls = []

    def nan_at_step_2(z):  # each run of the model calls it once per step, in order
        calls.append(None)
        a = torch.zeros(*z.shape[:-1], 1)
        if (len(calls) - 1) % 3 == 2:
            a[..., 1, :, :] = torch.nan
        return a

    for normalizer in (None, norm):  # the model checks values after the map, naming the step
        calls.clear()
        with pytest.raises(
            ValueError,
            match=r"future_actions: expected the callable to return finite values at imagined step 2,"
            r" got \[nan\] for episode 1",
        ):
            imagine(
                model, guide, obs, actions, 3,
                future_actions=nan_at_step_2, num_samples=3, normalizer=normalizer,
            )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"future_actions: expected the callable to return a tensor .*got str"
    ):
        imagine(model, guide, obs, actions, 3, future_actions=lambda z: "left", num_samples=3)

    discrete, discrete_guide = small(ActionSpace.discrete(2))
    int_actions = torch.randint(2, (2, 4))
    for act, message in (
        (
            lambda z: torch.full(z.shape[:-1], 7),
            r"integers in \[0, 2\) at imagined step 0, got 7 for episode 0",
        ),
        (lambda z: torch.zeros(z.shape[:-1]), r"integers for .* at imagined step 0, got dtype torch.float32"),
        (
            lambda z: torch.zeros(*z.shape[:-1], 1, dtype=torch.long),
            r"shape \(2, 1\) for its input of shape \(2, 1, 2\) .*got \(2, 1, 1\)",
        ),
    ):
        with pytest.raises(ValueError, match="future_actions: expected the callable to return " + message):
            imagine(discrete, discrete_guide, obs, int_actions, 2, future_actions=act, num_samples=3)
    # A right one passes, its actions as given.
    im = imagine(
        discrete, discrete_guide, obs, int_actions, 2,
        future_actions=lambda z: (z[..., 0] > 0).to(torch.int32), num_samples=3,
    )  # fmt: skip
    assert im.actions.dtype == torch.int64
    assert torch.equal(im.actions, (im.latents[..., 0] > 0).long())


def test_open_loop_scores_emissions_without_a_finite_variance_or_real_values():
    """A Student-t emission with ν = 2 has no finite variance: its Gaussian score and squared
    error over variance are NaN (null in metrics.json), the rest as usual. A Bernoulli
    emission of saturated probabilities has no Gaussian score at all."""
    from pyro_worldmodel.model.components import (
        BernoulliEmission,
        GaussianMLPTransition,
        NormalPolicy,
        StandardNormalInit,
        StudentTEmission,
    )

    def model_with(emission):
        return WorldModel(
            StandardNormalInit(2),
            GaussianMLPTransition(2, 1, hidden=(4,)),
            emission,
            NormalPolicy(2, ActionSpace.box(1), hidden=(4,)),
        )

    obs, actions = torch.randn(3, 9, 2), torch.randn(3, 9, 1)
    model = model_with(StudentTEmission(2, 2, hidden=(4,), df=2.0))
    guide = FilterGuide.for_model(model, rnn_dim=4)
    ol = open_loop(model, guide, obs, actions, context=3, horizon=4, num_samples=6)
    assert all(math.isnan(v) for v in ol.log_lik_gaussian["model"] + ol.sq_z["model"])
    assert all(math.isfinite(v) for v in ol.mse["model"] + ol.crps["model"] + ol.log_lik["model"])
    assert "| 1 | model |" in ol.table(horizons=(1,)) and "–" in ol.table(horizons=(1,))
    model = model_with(BernoulliEmission(2, 2, hidden=(4,)))
    with torch.no_grad():
        model.emission.linear.bias.fill_(40.0)  # p = 1 - 4e-18: a zero variance
    guide = FilterGuide.for_model(model, rnn_dim=4)
    binary = (torch.rand(3, 9, 2) < 0.5).float()
    ol = open_loop(model, guide, binary, actions, context=3, horizon=4, num_samples=6)
    assert "model" not in ol.log_lik_gaussian and "model" in ol.crps
