"""Recalibrating the spread of imagined futures: known factors recovered, and a linear-Gaussian
model whose noises are all twice the truth's brought back to the exact forecast's coverage."""

from dataclasses import replace

import pyro
import pytest
import torch
from test_imagine import kalman_guide

from pyro_worldmodel import LinearGaussianSSM
from pyro_worldmodel.evaluate import open_loop
from pyro_worldmodel.evaluate.calibration import GRID, CoverageOffsets, SpreadCalibration, fit_spread

STEP = float(GRID[1] / GRID[0])  # the grid's ratio between neighbours, 1.12


@pytest.mark.parametrize("k", [0.3, 1.0, 2.5])
def test_the_factor_is_the_ratio_of_the_truths_spread_to_the_predictives(k):
    """Draws from N(0, 1) per window, truths from N(0, k²): the draws must be moved by k."""
    g = torch.Generator().manual_seed(0)
    S, n, H, X = 400, 2000, 2, 3
    draws = torch.randn(S, n, H, X, generator=g, dtype=torch.float64) + torch.randn(n, H, X, generator=g)
    mean = draws.mean(0)
    truth = mean + k * torch.randn(n, H, X, generator=g, dtype=torch.float64)
    valid = torch.ones(n, H, dtype=torch.bool)
    valid[:, 1] = False  # no window reaches the second horizon
    offsets = CoverageOffsets()
    offsets.add(draws[:, :1000], mean[:1000], truth[:1000], valid[:1000])  # in two chunks
    offsets.add(draws[:, 1000:], mean[1000:], truth[1000:], valid[1000:])
    cal = fit_spread(offsets.select(torch.ones(n, dtype=torch.bool)))
    assert cal.num_windows == [n, 0]
    assert torch.all((cal.factor[0] / k).log().abs() <= 2 * torch.tensor(STEP).log())
    assert torch.equal(cal.factor[1], torch.ones(X, dtype=torch.float64))  # nothing to fit: unmoved
    shared = fit_spread(offsets.select(torch.ones(n, dtype=torch.bool)), per_dimension=False)
    assert torch.all(shared.factor[0] == shared.factor[0, 0])  # one factor for every dimension
    assert abs(float(shared.factor[0, 0] / k)) == pytest.approx(1.0, rel=STEP - 1)
    moved = cal.apply(draws, mean)
    assert torch.allclose(moved.mean(0), mean)  # the mean stays
    assert torch.allclose(moved.std(0)[:, 0], draws.std(0)[:, 0] * cal.factor[0])
    again = SpreadCalibration.from_dict(cal.to_dict())  # as metrics.json keeps it
    assert torch.equal(again.factor, cal.factor) and again.num_windows == cal.num_windows


def test_a_model_with_every_noise_doubled_is_recalibrated_to_the_exact_forecast():
    """Every noise of a linear-Gaussian system doubled leaves the Kalman gain, so the predictive
    mean, as it is and multiplies the predictive covariance by 4: the exact factor is 1/2 at
    every horizon and dimension. Cross-fitted, the calibrated predictor covers what its
    intervals claim and scores the true forecast's log-likelihood; the model does neither."""
    truth = LinearGaussianSSM.random(latent_dim=3, obs_dim=4, action_dim=2, seed=1)
    wide = replace(
        truth,
        init_scale=2 * truth.init_scale,
        trans_scale=2 * truth.trans_scale,
        obs_scale=2 * truth.obs_scale,
        act_scale=2 * truth.act_scale,
    )
    N, T, C, H = 40, 30, 4, 5
    obs, actions, _ = truth.sample(N, T, seed=3)
    kwargs = dict(context=C, horizon=H, num_samples=500, max_windows=None)
    pyro.set_rng_seed(0)
    ol = open_loop(wide.world_model(), kalman_guide(wide, C), obs, actions, calibrate=True, **kwargs)
    factor = torch.tensor(ol.calibration["factor"])  # (H, X), fitted on every window
    assert factor.shape == (H, 4) and ol.calibration["num_windows"] == [N * (T - C - h) for h in range(H)]
    assert 0.42 <= factor.median() <= 0.6 and factor.min() >= 0.3 and factor.max() <= 0.8
    for level in ("0.5", "0.9"):
        raw = torch.tensor(ol.coverage[level]["model"])
        calibrated = torch.tensor(ol.coverage[level]["calibrated"])
        assert (calibrated - float(level)).abs().max() < 0.05
        assert (raw - float(level)).min() > 0.09  # twice as wide: 0.82 and 0.999 expected
    # the exact forecast's log-likelihood, window by window, as the true model's open loop has it
    pyro.set_rng_seed(0)
    exact = open_loop(truth.world_model(), kalman_guide(truth, C), obs, actions, **kwargs)
    gaussian = torch.tensor(ol.log_lik_gaussian["calibrated"])
    torch.testing.assert_close(gaussian, torch.tensor(exact.log_lik_gaussian["model"]), rtol=0, atol=0.15)
    assert (torch.tensor(ol.log_lik_gaussian["model"]) < gaussian - 0.5).all()
    # the mean is the model's: moving the futures about it leaves the MSE
    assert ol.mse["calibrated"] == ol.mse["model"]
    # the scoring pass draws what it would without calibration: the model's figures are unchanged
    pyro.set_rng_seed(0)
    plain = open_loop(wide.world_model(), kalman_guide(wide, C), obs, actions, **kwargs)
    assert plain.log_lik["model"] == ol.log_lik["model"] and plain.crps["model"] == ol.crps["model"]
    assert "calibrated" not in plain.mse and plain.calibration is None


def test_calibration_needs_both_folds_and_real_values():
    truth = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, action_dim=1, seed=2)
    obs, actions, _ = truth.sample(1, 12, seed=0)
    with pytest.raises(
        ValueError, match=r"calibrate: cross-fitting needs windows from even- and odd-numbered"
    ):
        open_loop(truth.world_model(), kalman_guide(truth, 3), obs, actions, context=3, horizon=2,
                  num_samples=4, calibrate=True)  # fmt: skip
