"""TraceMeanField_ELBO: analytic KL wherever the pair has one, and never a silent fallback."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from worlds import X, Z, world

from pyro_worldmodel import elbo_terms, fit
from pyro_worldmodel.infer.elbos import MonteCarloKLWarning, TraceMeanField_ELBO
from pyro_worldmodel.model.components import (
    StudentTMLPTransition,
)


def data(B=4, T=6):
    g = torch.Generator().manual_seed(3)
    mask = torch.arange(T) < torch.tensor([T, T, 4, 2])[:B, None]
    return torch.randn(B, T, X, generator=g), torch.randn(B, T, 2, generator=g), mask


def loss(elbo, model, guide, *args, seed=5):
    pyro.set_rng_seed(seed)
    return elbo.loss(model.model, guide, *args)


def test_with_analytic_pairs_it_is_the_analytic_decomposition():
    """A fallback at any z_t would replace its exact KL by log q − log p at one draw,
    and the loss would no longer equal −(log p(x|z) + log π(a|z) − KL) on that draw."""
    model, guide = world()
    obs, actions, mask = data()
    elbo = TraceMeanField_ELBO(max_plate_nesting=2, monte_carlo_kl="error")
    got = loss(elbo, model, guide, obs, actions, mask)
    pyro.set_rng_seed(5)
    terms = elbo_terms(model, guide, obs, actions, mask)
    assert terms.monte_carlo_kl == ()
    assert got == pytest.approx(-terms.elbo * terms.num_timesteps, rel=1e-5)
    assert set(elbo.kl_estimators.values()) == {"analytic"} and len(elbo.kl_estimators) == 6
    # and it is Pyro's estimator, value for value
    stock = pyro.infer.TraceMeanField_ELBO(max_plate_nesting=2)
    assert got == pytest.approx(loss(stock, model, guide, obs, actions, mask), rel=1e-6)


def test_a_pair_without_analytic_kl_warns_once_and_is_recorded():
    model, guide = world(StudentTMLPTransition)
    obs, actions, mask = data()
    elbo = TraceMeanField_ELBO(max_plate_nesting=2)
    with pytest.warns(
        MonteCarloKLWarning, match=r"no analytic KL\(Normal ‖ StudentT\) at 5 sites \(z_1 … z_5\)"
    ):
        got = loss(elbo, model, guide, obs, actions, mask)
    assert elbo.kl_estimators == {"z_0": "analytic", **{f"z_{t}": "monte_carlo" for t in range(1, 6)}}
    # the bound is Pyro's own, Monte Carlo where it must be
    stock = pyro.infer.TraceMeanField_ELBO(max_plate_nesting=2)
    assert got == pytest.approx(loss(stock, model, guide, obs, actions, mask), rel=1e-6)
    # elbo_terms computes the same bound on the same draw, and names the sites
    pyro.set_rng_seed(5)
    terms = elbo_terms(model, guide, obs, actions, mask)
    assert terms.monte_carlo_kl == tuple(f"z_{t}" for t in range(1, 6))
    assert terms.as_dict()["kl_monte_carlo_sites"] == 5  # what metrics.json and History.terms carry
    assert got == pytest.approx(-terms.elbo * terms.num_timesteps, rel=1e-5)
    with warnings.catch_warnings(record=True) as record:  # once per pair: training is not flooded
        warnings.simplefilter("always")
        fit(model, guide, obs, actions, mask, num_steps=3, elbo=elbo, progress=False)
    assert not [w for w in record if w.category is MonteCarloKLWarning]
    # A second ELBO object warns again, under Python's default filter too
    # (which shows a warning once per code location).
    model, guide = world(StudentTMLPTransition)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for _ in range(2):
            loss(TraceMeanField_ELBO(max_plate_nesting=2), model, guide, obs, actions, mask)
    assert [w.category for w in record] == [MonteCarloKLWarning] * 2
    assert record[0].filename == __file__  # it points at the caller, not at the library


def test_the_fallback_can_be_refused_or_allowed():
    model, guide = world(StudentTMLPTransition)
    obs, actions, mask = data()
    with pytest.raises(ValueError, match=r"monte_carlo_kl='error'\): no analytic KL\(Normal ‖ StudentT\)"):
        loss(
            TraceMeanField_ELBO(max_plate_nesting=2, monte_carlo_kl="error"), model, guide, obs, actions, mask
        )
    for allow in ("allow", ["KL(Normal ‖ StudentT)"]):
        quiet = TraceMeanField_ELBO(max_plate_nesting=2, monte_carlo_kl=allow)
        loss(quiet, model, guide, obs, actions, mask)  # warnings are errors in this suite
        assert quiet.kl_estimators["z_3"] == "monte_carlo"
    # allowing one pair leaves the others loud
    other = TraceMeanField_ELBO(max_plate_nesting=2, monte_carlo_kl=["KL(Normal ‖ Laplace)"])
    with pytest.warns(MonteCarloKLWarning, match=r"monte_carlo_kl=\['KL\(Normal ‖ StudentT\)'\]"):
        loss(other, model, guide, obs, actions, mask)
    with pytest.raises(
        ValueError, match=r"monte_carlo_kl: expected 'warn', 'error', 'allow' or a list of pairs, got 'no'"
    ):
        TraceMeanField_ELBO(monte_carlo_kl="no")
    with pytest.raises(
        ValueError,
        match=r"monte_carlo_kl: expected pairs written as 'KL\(Normal ‖ StudentT\)', got 'StudentT'",
    ):
        TraceMeanField_ELBO(monte_carlo_kl=["StudentT"])


def test_an_accidental_fallback_is_caught_too():
    """A guide that forgets to mask its sites has no analytic KL against the masked
    prior, and stock Pyro would silently use Monte Carlo there."""
    model, _ = world()
    obs, actions, mask = data()
    loc = torch.nn.Parameter(torch.zeros(Z))

    def unmasked_guide(obs, actions, mask=None, **_):
        B, T = obs.shape[:2]
        with pyro.plate("episodes", B, dim=-2):
            for t in pyro.markov(range(T)):
                pyro.sample(f"z_{t}", dist.Normal(pyro.param("loc", loc).expand(B, 1, Z), 1.0).to_event(1))

    with pytest.warns(MonteCarloKLWarning, match=r"KL\(Normal ‖ Normal\) at 6 sites"):
        loss(TraceMeanField_ELBO(max_plate_nesting=2), model, unmasked_guide, obs, actions, mask)


def test_a_site_masked_out_entirely_costs_nothing_as_in_pyro():
    """Pyro's KL of two distributions masked with False is the number 0.0, not a tensor."""
    x = torch.tensor([0.5, -1.0])

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1).mask(False))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide():
        loc = pyro.param("loc", torch.tensor([1.0, 2.0]))
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1).mask(False))

    losses = []
    for elbo in (TraceMeanField_ELBO(), pyro.infer.TraceMeanField_ELBO()):
        pyro.set_rng_seed(5)
        losses.append(elbo.loss(model, guide))
    assert losses[0] == losses[1] and losses[0] > 0  # −log p(x | z) alone
