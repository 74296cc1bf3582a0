"""The bound's terms: Σ log p(x|z), Σ log π(a|z) and the KL, per observed timestep."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..model.components.transition import is_global
from ..spaces import check_observed
from .elbos import analytic_kl


@dataclass
class ELBOTerms:
    """The ELBO's terms in nats per observed timestep, as the DMM reports them.

    ``kl_per_t`` is the KL at each time index, averaged over the episodes
    observed there. ``monte_carlo_kl`` names the latent sites whose pair of
    distributions has no analytic KL, where the KL is the Monte Carlo estimate
    log q(z) − log p(z) at the guide's sample; it is empty when every KL is exact.
    """

    log_px: float
    log_pa: float
    kl: float
    kl_per_t: torch.Tensor
    num_timesteps: int
    monte_carlo_kl: tuple[str, ...] = ()

    @property
    def elbo(self) -> float:
        """log p(x|z) + log π(a|z) − KL, per observed timestep."""
        return self.log_px + self.log_pa - self.kl

    def as_dict(self) -> dict[str, float]:
        """The four figures, and ``kl_monte_carlo_sites``: how many latent sites' KL is a Monte Carlo estimate."""
        return {
            "elbo": self.elbo,
            "log_px": self.log_px,
            "log_pa": self.log_pa,
            "kl": self.kl,
            "kl_monte_carlo_sites": len(self.monte_carlo_kl),
        }


def elbo_terms(model, guide, obs, actions, mask=None, *, num_particles: int = 1) -> ELBOTerms:
    """Σ log p(x|z), Σ log π(a|z) and the KL, per observed timestep.

    Uses the analytic KL wherever the pair of distributions has one, and
    log q(z) − log p(z) at the guide's sample where it has none (a Student-t
    transition, a flow in the guide); those sites are listed in
    ``ELBOTerms.monte_carlo_kl``.

    :param model: a :class:`~pyro_worldmodel.model.WorldModel`.
    :param guide: a guide over the same ``z_{t}`` sites.
    :param num_particles: number of guide samples to average.

    With an ensemble transition (``members`` K > 1), whose member is chosen by an
    episode's row, every episode is scored under every member once (each row
    repeated K times), so the terms are the average over members, whatever the
    order of the episodes: a lower bound on the log-likelihood of the members'
    equal mixture, which :func:`~pyro_worldmodel.evaluate.iwae_log_likelihood`
    estimates with particle k under member k mod K.

    With a Bayesian transition, each particle draws its weights θ ~ q(θ), and the terms
    leave out θ's KL: they bound the posterior predictive, E_q(θ) log p(x, a | θ) on
    data not trained on, rather than the training bound (whose θ term
    :func:`~pyro_worldmodel.fit` pays once per data set).
    """
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles: expected a positive int, got {num_particles!r}")
    obs, actions, mask = model.check_inputs(obs, actions, mask)
    check_observed(mask)
    members = 1 if model.has_global_latents else getattr(model.transition, "members", 1)
    if members > 1:
        obs, actions, mask = (x.repeat_interleave(members, 0) for x in (obs, actions, mask))
    B, T = mask.shape
    n = mask.sum()
    log_lik = {"x": 0.0, "a": 0.0}
    monte_carlo = {}  # an ordered set of site names
    kl_t = torch.zeros(T, dtype=obs.dtype, device=obs.device)
    with torch.no_grad():
        for _ in range(num_particles):
            guide_tr, model_tr = traces(model, guide, obs, actions, mask)
            for name, site in model_tr.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site) or is_global(site):
                    continue  # θ of a Bayesian transition: the terms average over q(θ)
                if site["is_observed"]:
                    log_lik[name] = log_lik.get(name, 0.0) + site["fn"].log_prob(site["value"]).sum()
                else:
                    t = int(name.split("_")[1])
                    q, p = guide_tr.nodes[name]["fn"], site["fn"]
                    kl = analytic_kl(q, p)
                    if kl is None:
                        value = site["value"]
                        kl = q.log_prob(value) - p.log_prob(value)
                        monte_carlo.setdefault(name, None)
                    kl_t[t] += kl.sum()
    per_step = num_particles * n
    return ELBOTerms(
        log_px=float(log_lik["x"] / per_step),
        log_pa=float(log_lik["a"] / per_step),
        kl=float(kl_t.sum() / per_step),
        kl_per_t=(kl_t / (num_particles * mask.sum(0).clamp(min=1))).cpu(),
        num_timesteps=int(n),
        monte_carlo_kl=tuple(monte_carlo),
    )


def traces(model, guide, *args):
    """A guide trace, and the model's trace with its latents replayed from it."""
    guide_tr = poutine.trace(guide).get_trace(*args)
    return guide_tr, poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)


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
