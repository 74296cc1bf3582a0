"""Bounds on held-out data: the ELBO's terms and the importance-weighted bound (IWAE)."""

from __future__ import annotations

import math

import pyro
import torch
from pyro.poutine.util import site_is_subsample

from ..infer.terms import elbo_terms, traces
from ..model.components.transition import is_global
from ..spaces import check_observed

# Our programs nest two plates (episodes at -2, time at -1); particles go left of both.
_PARTICLE_DIM = -3


def log_weights(model, guide, obs, actions, mask=None, *, num_particles: int) -> torch.Tensor:
    """log p(x, a, z) − log q(z | x, a) per episode for ``num_particles`` draws z ~ q.

    :returns: ``(K, B)``.
    """
    with torch.no_grad():
        with pyro.plate("particles", num_particles, dim=_PARTICLE_DIM):
            guide_tr, model_tr = traces(model, guide, obs, actions, mask)
        # The log-densities are computed here, from the traces' parameters: inside no_grad,
        # or the result would hold the autograd graph of every particle.
        return _site_sum(model_tr) - _site_sum(guide_tr)


def _site_sum(trace) -> torch.Tensor:
    total = 0.0
    for site in trace.nodes.values():
        # θ of a Bayesian transition is drawn from q(θ) per particle and left out of the
        # weights: the estimate is of the posterior predictive, ∫ q(θ) p(x, a | θ) dθ.
        if site["type"] == "sample" and not site_is_subsample(site) and not is_global(site):
            log_p = site["fn"].log_prob(site["value"])  # (K, B, 1) or (K, B, T)
            total = total + log_p.sum(-1)
    return total  # (K, B)


def iwae_log_likelihood(
    model,
    guide,
    obs,
    actions,
    mask=None,
    *,
    num_particles: int = 1000,
    chunk_size: int = 250,
) -> torch.Tensor:
    """The importance-weighted (IWAE) estimate of log p(x_{1:T}, a_{1:T}) per episode.

    log (1/K) Σ_k p(x, a, z_k) / q(z_k | x, a), z_k ~ q. It is a lower bound
    in expectation that tightens as K grows; at K = 1 it is the ELBO.

    :param num_particles: K.
    :param chunk_size: particles drawn at once, to bound memory.
    :returns: ``(B,)`` nats per episode; divide by ``mask.sum(1)`` for per timestep.
    """
    for arg, value in (("num_particles", num_particles), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    obs, actions, mask = model.check_inputs(obs, actions, mask)
    check_observed(mask)
    chunks = []
    with torch.no_grad():  # an estimate, not a loss: no graph kept for K particles
        for start in range(0, num_particles, chunk_size):
            k = min(chunk_size, num_particles - start)
            chunks.append(log_weights(model, guide, obs, actions, mask, num_particles=k))
    log_w = torch.cat(chunks)  # (K, B)
    return torch.logsumexp(log_w, dim=0) - math.log(num_particles)


def heldout_bounds(
    model, guide, obs, actions, mask=None, *, num_particles: int = 8, iwae_particles: int = 100
) -> dict[str, float]:
    """Held-out ELBO and its terms, and the IWAE estimate, all in nats per observed timestep.

    :param num_particles: guide draws averaged in the ELBO terms.
    :param iwae_particles: K of the IWAE-K estimate.
    :returns: ``elbo``, ``log_px``, ``log_pa``, ``kl``, ``kl_monte_carlo_sites`` (0 when
        every KL is exact) and ``iwae``.
    """
    obs, actions, mask = model.check_inputs(obs, actions, mask)
    check_observed(mask)
    terms = elbo_terms(model, guide, obs, actions, mask, num_particles=num_particles)
    iwae = iwae_log_likelihood(model, guide, obs, actions, mask, num_particles=iwae_particles)
    return {**terms.as_dict(), "iwae": float(iwae.sum() / mask.sum())}
