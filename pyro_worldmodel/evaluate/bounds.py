"""Bounds on held-out data: the ELBO's terms and the importance-weighted bound (IWAE).

The estimators are :mod:`pyro_worldmodel.infer.terms`' (``fit``'s validation measures them
too); this module gathers them for evaluation.
"""

from __future__ import annotations

from ..infer.terms import elbo_terms, iwae_log_likelihood, log_weights
from ..spaces import check_observed

__all__ = ["heldout_bounds", "iwae_log_likelihood", "log_weights"]


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
