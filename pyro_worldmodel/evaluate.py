"""Evaluating a trained world model: ELBO terms and importance-weighted bounds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

# Our programs nest two plates (episodes at -2, time at -1); particles go left of both.
_PARTICLE_DIM = -3


@dataclass
class ELBOTerms:
    """The ELBO's terms in nats per observed timestep, as the DMM reports them.

    ``kl_per_t`` is the KL at each time index, averaged over the episodes
    observed there.
    """

    log_px: float
    log_pa: float
    kl: float
    kl_per_t: torch.Tensor
    num_timesteps: int

    @property
    def elbo(self) -> float:
        """log p(x|z) + log π(a|z) − KL, per observed timestep."""
        return self.log_px + self.log_pa - self.kl

    def as_dict(self) -> dict[str, float]:
        return {"elbo": self.elbo, "log_px": self.log_px, "log_pa": self.log_pa, "kl": self.kl}


def elbo_terms(model, guide, obs, actions, mask=None, *, num_particles: int = 1) -> ELBOTerms:
    """Σ log p(x|z), Σ log π(a|z) and the analytic KL, per observed timestep.

    Uses the analytic KL for every latent site and raises ``ValueError`` if a
    pair of distributions has none, rather than falling back to Monte Carlo.

    :param model: a :class:`~pyro_worldmodel.model.WorldModel`.
    :param guide: a guide over the same ``z_{t}`` sites.
    :param num_particles: number of guide samples to average.
    """
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles: expected a positive int, got {num_particles!r}")
    obs, actions, mask = model.check_inputs(obs, actions, mask)
    B, T = mask.shape
    n = mask.sum()
    log_lik = {"x": 0.0, "a": 0.0}
    kl_t = torch.zeros(T, dtype=obs.dtype, device=obs.device)
    with torch.no_grad():
        for _ in range(num_particles):
            guide_tr, model_tr = _traces(model, guide, obs, actions, mask)
            for name, site in model_tr.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                if site["is_observed"]:
                    log_lik[name] = log_lik.get(name, 0.0) + site["fn"].log_prob(site["value"]).sum()
                else:
                    t = int(name.split("_")[1])
                    kl_t[t] += _analytic_kl(name, guide_tr.nodes[name]["fn"], site["fn"]).sum()
    per_step = num_particles * n
    return ELBOTerms(
        log_px=float(log_lik["x"] / per_step),
        log_pa=float(log_lik["a"] / per_step),
        kl=float(kl_t.sum() / per_step),
        kl_per_t=(kl_t / (num_particles * mask.sum(0).clamp(min=1))).cpu(),
        num_timesteps=int(n),
    )


def _traces(model, guide, *args):
    """A guide trace, and the model's trace with its latents replayed from it."""
    guide_tr = poutine.trace(guide).get_trace(*args)
    return guide_tr, poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)


def _analytic_kl(name, q, p):
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        raise ValueError(
            f"guide: no analytic KL({type(q).__name__} ‖ {type(p).__name__}) at site {name};"
            " TraceMeanField_ELBO would silently fall back to Monte Carlo here"
        ) from None


def log_weights(model, guide, obs, actions, mask=None, *, num_particles: int) -> torch.Tensor:
    """log p(x, a, z) − log q(z | x, a) per episode for ``num_particles`` draws z ~ q.

    :returns: ``(K, B)``.
    """
    with torch.no_grad(), pyro.plate("particles", num_particles, dim=_PARTICLE_DIM):
        guide_tr, model_tr = _traces(model, guide, obs, actions, mask)
    return _site_sum(model_tr) - _site_sum(guide_tr)


def _site_sum(trace) -> torch.Tensor:
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
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
    chunks = []
    for start in range(0, num_particles, chunk_size):
        k = min(chunk_size, num_particles - start)
        chunks.append(log_weights(model, guide, obs, actions, mask, num_particles=k))
    log_w = torch.cat(chunks)  # (K, B)
    return torch.logsumexp(log_w, dim=0) - math.log(num_particles)
