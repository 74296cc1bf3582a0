"""The exact anchor against an independent brute-force computation."""

import pytest
import torch

from pyro_worldmodel import LinearGaussianSSM


def joint_gaussian_log_prob(ssm, obs, actions):
    """log p(x, a) from the full joint Gaussian of all (x_t, a_t), built by
    writing every variable as an affine map of the stacked unit noises."""
    B, T, X = obs.shape
    Z, A = ssm.latent_dim, ssm.action_dim
    n_noise = Z + T * (X + A + Z)
    f64 = torch.float64
    # each variable: (mean, M) with value = mean + M @ eps
    z_mean, z_M = ssm.init_loc.clone(), torch.zeros(Z, n_noise, dtype=f64)
    z_M[:, :Z] = torch.diag(ssm.init_scale)
    offset = Z
    means, Ms = [], []
    for _ in range(T):
        x_mean = ssm.H @ z_mean + ssm.obs_bias
        x_M = ssm.H @ z_M
        x_M[:, offset : offset + X] += torch.diag(ssm.obs_scale)
        offset += X
        a_mean = ssm.K @ z_mean + ssm.act_bias
        a_M = ssm.K @ z_M
        a_M[:, offset : offset + A] += torch.diag(ssm.act_scale)
        offset += A
        means += [x_mean, a_mean]
        Ms += [x_M, a_M]
        z_mean = ssm.F @ z_mean + ssm.G @ a_mean + ssm.bias
        z_M = ssm.F @ z_M + ssm.G @ a_M
        z_M[:, offset : offset + Z] += torch.diag(ssm.trans_scale)
        offset += Z
    mean = torch.cat(means)
    M = torch.cat(Ms)
    joint = torch.distributions.MultivariateNormal(mean, covariance_matrix=M @ M.T)
    y = torch.cat([obs, actions], dim=-1).reshape(B, -1)  # (B, T * (X + A))
    return joint.log_prob(y)


def test_exact_log_prob_matches_joint_gaussian():
    ssm = LinearGaussianSSM.random(3, 4, 2, seed=3)
    obs, actions, _ = ssm.sample(5, 6, seed=4)
    expected = joint_gaussian_log_prob(ssm, obs, actions)
    torch.testing.assert_close(ssm.log_prob(obs, actions), expected, rtol=1e-9, atol=1e-9)


def test_exact_log_prob_with_mask_equals_truncated_episodes():
    ssm = LinearGaussianSSM.random(2, 3, 1, seed=5)
    obs, actions, _ = ssm.sample(3, 7, seed=6)
    lengths = torch.tensor([7, 4, 1])
    mask = torch.arange(7) < lengths[:, None]
    out = ssm.log_prob(obs, actions, mask)
    for b, L in enumerate(lengths.tolist()):
        expected = joint_gaussian_log_prob(ssm, obs[b : b + 1, :L], actions[b : b + 1, :L])
        torch.testing.assert_close(out[b : b + 1], expected, rtol=1e-9, atol=1e-9)


def test_exact_log_prob_rejects_a_mask_with_holes():
    ssm = LinearGaussianSSM.random(2, 3, 1)
    obs, actions, _ = ssm.sample(1, 3)
    with pytest.raises(ValueError, match="mask: expected each row to be a prefix"):
        ssm.log_prob(obs, actions, torch.tensor([[True, False, True]]))


def test_world_model_density_at_the_true_parameters_is_the_ssm_density():
    """log p(x, a, z) of the Pyro program equals the SSM's own factors at given z."""
    import pyro.poutine as poutine

    ssm = LinearGaussianSSM.random(3, 4, 2, seed=7)
    obs, actions, z = ssm.sample(4, 5, seed=8)
    model = ssm.world_model()
    data = {f"z_{t}": z[:, t : t + 1] for t in range(5)}
    trace = poutine.trace(poutine.condition(model.model, data=data)).get_trace(obs, actions)
    got = trace.log_prob_sum()

    N = torch.distributions.Normal
    expected = N(ssm.init_loc, ssm.init_scale).log_prob(z[:, 0]).sum()
    expected += N(z @ ssm.H.T + ssm.obs_bias, ssm.obs_scale).log_prob(obs).sum()
    expected += N(z @ ssm.K.T + ssm.act_bias, ssm.act_scale).log_prob(actions).sum()
    loc = z[:, :-1] @ ssm.F.T + actions[:, :-1] @ ssm.G.T + ssm.bias
    expected += N(loc, ssm.trans_scale).log_prob(z[:, 1:]).sum()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
