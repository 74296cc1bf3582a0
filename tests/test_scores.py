"""The probabilistic scores against closed forms: the bias each estimator is documented to have."""

import math

import pyro.distributions as dist
import pytest
import torch
from pyro.ops.stats import crps_empirical

from pyro_worldmodel.evaluate.scores import (
    crps,
    interval_coverage,
    mixture_log_density,
    moment_matched,
    summarise,
)

# z ~ N(m, s²), x | z ~ N(z, σ²): p(x) = N(x; m, s² + σ²) in closed form.
M, S_Z, SIGMA = 0.3, 1.0, 0.2


def mixture_estimates(x, num_samples, repeats, seed):
    z = M + S_Z * torch.randn(num_samples, repeats, generator=torch.Generator().manual_seed(seed))
    return mixture_log_density(dist.Normal(z, SIGMA).log_prob(x))  # (repeats,)


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_mixture_estimate_is_biased_low_by_the_delta_method_amount():
    x = torch.tensor(M + 1.5)  # a tail value, where the bias is large
    exact = dist.Normal(M, math.hypot(S_Z, SIGMA)).log_prob(x)
    # E[p(x|z)²] / p(x)² in closed form: ∫ N(x; z, σ²)² N(z; m, s²) dz = N(x; m, s² + σ²/2) / (2σ√π).
    second = dist.Normal(M, math.sqrt(S_Z**2 + SIGMA**2 / 2)).log_prob(x).exp() / (
        2 * SIGMA * math.sqrt(math.pi)
    )
    rel_var = float(second / exact.exp() ** 2 - 1)
    for S in (100, 1000):
        est = mixture_estimates(x, S, 4000, seed=S)
        bias = float(est.mean() - exact)
        se = float(est.std() / math.sqrt(len(est)))
        assert bias < 0  # Jensen
        # −Var[p(x|z)] / (2 S p(x)²): the second-order term of E[log p̂] − log p.
        assert bias == pytest.approx(-rel_var / (2 * S), abs=4 * se + 0.2 * rel_var / (2 * S))
    # consistent: the bias at S = 1000 is a tenth of that at S = 100, and well below it
    assert abs(float(mixture_estimates(x, 1000, 4000, 1).mean() - exact)) < 0.2 * abs(
        float(mixture_estimates(x, 100, 4000, 2).mean() - exact)
    )


def test_moment_matched_gaussian_recovers_a_gaussian_predictive():
    x = torch.tensor([M + 1.5])
    exact = dist.Normal(M, math.hypot(S_Z, SIGMA)).log_prob(x).sum()
    z = M + S_Z * torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0))
    for full in (True, False):
        g = moment_matched(z, torch.full_like(z, SIGMA**2), full=full)
        value = g.log_prob(x) if full else g.log_prob(x).sum()
        assert float(value) == pytest.approx(float(exact), abs=0.01)


def test_moment_matched_covariance_is_within_plus_between():
    gen = torch.Generator().manual_seed(1)
    means, variances = torch.randn(7, 3, 2, generator=gen), torch.rand(7, 3, 2, generator=gen)
    g = moment_matched(means, variances)
    for b in range(3):
        expected = torch.cov(means[:, b].T) + torch.diag(variances[:, b].mean(0))
        torch.testing.assert_close(g.covariance_matrix[b], expected)
        torch.testing.assert_close(g.loc[b], means[:, b].mean(0))
    diagonal = moment_matched(means, variances, full=False)
    torch.testing.assert_close(diagonal.variance, g.covariance_matrix.diagonal(dim1=-2, dim2=-1))


def test_crps_is_pyros_and_matches_the_gaussian_closed_form():
    loc, scale = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 0.1, 3.0])
    truth = torch.tensor([0.5, 1.3, 1.0])
    draws = dist.Normal(loc, scale).sample((20_000,))
    torch.testing.assert_close(crps(draws, truth), crps_empirical(draws, truth))
    z = (truth - loc) / scale
    n = dist.Normal(0.0, 1.0)
    exact = scale * (z * (2 * n.cdf(z) - 1) + 2 * n.log_prob(z).exp() - 1 / math.sqrt(math.pi))
    # The all-pairs second term overstates the CRPS by E|X − X'| / (2S) = scale / (S √π): negligible here.
    torch.testing.assert_close(crps(draws, truth), exact, rtol=0.02, atol=0.0)


def test_interval_coverage_of_a_calibrated_predictive_is_its_level():
    gen = torch.Generator().manual_seed(2)
    draws = torch.randn(400, 5000, generator=gen)
    truth = torch.randn(5000, generator=gen)
    for level in (0.5, 0.9):
        observed = float(interval_coverage(draws, truth, level).double().mean())
        # binomial s.e. at n = 5000 is at most 0.007; the draws' quantiles add about as much
        assert observed == pytest.approx(level, abs=0.03)
    # an overconfident predictive (half the spread) covers less
    assert float(interval_coverage(0.5 * draws, truth, 0.9).double().mean()) < 0.7
    with pytest.raises(ValueError, match="level: expected a probability in"):
        interval_coverage(draws, truth, 1.0)


def test_summary_per_horizon_over_valid_windows_only():
    values = torch.tensor([[1.0, 5.0], [2.0, -100.0], [3.0, 0.0], [4.0, 7.0]])
    valid = torch.tensor([[True, True], [True, False], [True, True], [True, False]])
    out = summarise(values, valid)
    assert out["mean"] == [2.5, 2.5]
    assert out["median"] == [2.5, 2.5]
    assert out["se"][0] == pytest.approx(float(torch.tensor([1.0, 2, 3, 4]).std() / 2))
    assert out["p10"][0] == pytest.approx(1.3)
    none = summarise(values, torch.zeros_like(valid))
    assert all(math.isnan(v) for v in none["mean"])


def test_the_standard_error_is_clustered_by_group():
    """k identical copies of each of G values carry G values' information: the clustered
    standard error is the plain one of the G values, not of the G·k rows."""
    g = torch.Generator().manual_seed(3)
    distinct = torch.randn(12, 1, generator=g)
    copies = distinct.repeat_interleave(5, 0)  # (60, 1)
    groups = torch.arange(12).repeat_interleave(5)
    valid = torch.ones(60, 1, dtype=torch.bool)
    plain = summarise(distinct, valid[:12])["se"][0]
    assert summarise(copies, valid, groups)["se"][0] == pytest.approx(plain, rel=1e-9)
    assert summarise(copies, valid)["se"][0] < 0.5 * plain  # unclustered: too small
    # every row its own group: the plain standard error
    assert summarise(distinct, valid[:12], torch.arange(12))["se"][0] == pytest.approx(plain, rel=1e-9)
