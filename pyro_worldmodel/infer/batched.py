"""The mean-field ELBO of a world model with its model terms batched over time.

Run through Pyro's traces, a :class:`~pyro_worldmodel.model.WorldModel` pays
for every latent site twice (model and guide, about 150 µs a site) and calls
its transition once per step (PYRO_NOTES §6). Yet once the guide has drawn
z_1 … z_T, nothing in the model is sequential: p(z_t | z_{t-1}, a_{t-1}),
KL(q_t ‖ p_t), p(x_t | z_t) and π(a_t | z_t) are functions of tensors that
are all known. :func:`mean_field_loss` computes the
:class:`~pyro_worldmodel.elbos.TraceMeanField_ELBO` loss that way: the
guide's recurrence step by step, with the same random draws in the same
order as under ``pyro.sample``, then every model term in one call over
(B, T). Same value, same gradient, same noise: the tests compare the two
paths for every supported combination.

It applies only where that equality is known to hold (:func:`supports`);
anything else takes Pyro's traces.
"""

from __future__ import annotations

import pyro
import torch
from pyro.distributions import Independent, Normal
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from torch.distributions import kl_divergence

from ..model.components import (
    BernoulliContinue,
    BernoulliEmission,
    CategoricalPolicy,
    Combiner,
    GatedTransition,
    GaussianMLPEmission,
    GaussianMLPTransition,
    GaussianReward,
    LearnedGaussianInit,
    LinearGaussianEmission,
    LinearGaussianPolicy,
    LinearGaussianTransition,
    NormalPolicy,
    StandardNormalInit,
    StudentTEmission,
    TanhNormalPolicy,
)
from ..model.components.nets import positive
from ..model.guides import FilterGuide, MeanFieldGuide, SmoothingGuide
from ..model.naming import register_module
from ..model.world_model import WorldModel

# Exactly these classes (not subclasses, which may change what the model or the
# guide computes): the init and transition give Independent(Normal) factors, so
# every KL is analytic, and the emission and policy sample nothing of their own.
_INITS = (StandardNormalInit, LearnedGaussianInit)
_TRANSITIONS = (GaussianMLPTransition, LinearGaussianTransition, GatedTransition)
_EMISSIONS = (GaussianMLPEmission, LinearGaussianEmission, StudentTEmission, BernoulliEmission)
_POLICIES = (NormalPolicy, TanhNormalPolicy, CategoricalPolicy, LinearGaussianPolicy)
_GUIDES = (FilterGuide, SmoothingGuide, MeanFieldGuide)
_HEADS = {"reward": (GaussianReward,), "continuation": (BernoulliContinue,)}


def supports(model_fn, guide, args, kwargs, *, vectorize_particles: bool) -> str | None:
    """None if :func:`mean_field_loss` computes exactly what Pyro's traces would; else why not."""
    model = getattr(model_fn, "__self__", None)
    if type(model) is not WorldModel or getattr(model_fn, "__func__", None) is not WorldModel.model:
        return "the model is not WorldModel.model"
    for part, known in (
        ("init", _INITS),
        ("transition", _TRANSITIONS),
        ("emission", _EMISSIONS),
        ("policy", _POLICIES),
    ):
        if type(getattr(model, part)) not in known:
            return f"the {part} is a {type(getattr(model, part)).__name__}"
    for part, known in _HEADS.items():
        head = getattr(model, part)
        if head is not None and type(head) not in known:
            return f"the {part} head is a {type(head).__name__}"
    if type(guide) not in _GUIDES:
        return f"the guide is a {type(guide).__name__}"
    if hasattr(guide, "combiner") and type(guide.combiner) is not Combiner:
        return f"the guide's combiner is a {type(guide.combiner).__name__}"
    extra = {k: v for k, v in kwargs.items() if k not in ("mask", "rewards", "continues")}
    if (
        not 2 <= len(args) + ("mask" in kwargs) <= 3
        or len(args) < 2
        or extra.get("horizon", 0) not in (0, None)
        or extra.get("future_actions") is not None
        or set(extra) - {"horizon", "future_actions"}
    ):
        return "the model is called with a horizon or other arguments"
    if vectorize_particles:
        return "particles are vectorised"
    # Only SVI's parameter capture may watch: any other handler (scale, mask,
    # condition, a trace of the sample sites) needs Pyro's sites.
    if not all(isinstance(m, TraceMessenger) and m.param_only for m in _PYRO_STACK):
        return "a Pyro handler is active"
    return None


def mean_field_loss(
    elbo, model_fn, guide, obs, actions, mask=None, rewards=None, continues=None
) -> torch.Tensor:
    """One particle of −ELBO, differentiable: the guide step by step, the model batched over time.

    :param elbo: the :class:`~pyro_worldmodel.elbos.TraceMeanField_ELBO` (or
        subclass) whose ``_shape_kl`` shapes the KL terms, as on Pyro's path.
    """
    model: WorldModel = model_fn.__self__
    # Values are checked while Pyro's validation is on, as on Pyro's path (each
    # check is a host-device sync on a GPU: train with validation off there).
    # The distributions below are built from checked inputs, without validation.
    obs, actions, mask = model.check_inputs(obs, actions, mask)
    rewards, continues = model.check_targets(rewards, continues, mask, obs.dtype)
    guide.check_inputs(obs, actions, mask, check_values=False)
    register_module(model.name, model)
    register_module(guide.name, guide)
    with pyro.validation_enabled(False):
        return _loss(elbo, model, guide, obs, actions, mask, rewards, continues)


def _loss(elbo, model, guide, obs, actions, mask, rewards=None, continues=None):
    B, T = mask.shape
    a_feat = model.action_space.features(actions, obs.dtype)  # (B, T, A)
    z, q = _guide_draws(guide, obs, a_feat, mask)  # (B, T, Z); Normal, batch (B, T, Z)
    p_1 = model.init((B, 1)).base_dist  # p(z_1): Normal (B, 1, Z)
    p_rest = model.transition(z[:, :-1], a_feat[:, :-1]).base_dist  # p(z_t | z_{t-1}, a_{t-1}): (B, T-1, Z)
    p = Normal(torch.cat([p_1.loc, p_rest.loc], 1), torch.cat([p_1.scale, p_rest.scale], 1))
    q, p = Independent(q, 1).mask(mask), Independent(p, 1).mask(mask)  # as the z_t sites are masked
    kl = elbo._shape_kl(f"z_0 … z_{T - 1}", kl_divergence(q, p), q, p, mask, "analytic")  # (B, T)
    log_px = model.emission(z).mask(mask).log_prob(obs).sum()
    log_pa = model.policy(z).mask(mask).log_prob(actions).sum()
    if rewards is not None:
        log_pa = log_pa + model.reward(z, a_feat).mask(mask).log_prob(rewards).sum()
    if continues is not None:
        log_pa = log_pa + model.continuation(z).mask(mask).log_prob(continues).sum()
    elbo.kl_estimators = {f"z_{t}": "analytic" for t in range(T)}
    return -(log_px + log_pa - kl.sum())


def _guide_draws(guide, obs, a_feat, mask):
    """z_t ~ q(z_t | ·) for t = 0 … T-1, drawn in the order, and with the calls, of the guide's ``pyro.sample``."""
    B, T = mask.shape
    if isinstance(guide, MeanFieldGuide):
        loc, raw_scale = guide.net(obs).chunk(2, dim=-1)  # (B, T, Z) each
        q = Normal(loc, positive(raw_scale, guide.min_scale))
        steps = [Normal(loc[:, t : t + 1], q.scale[:, t : t + 1]) for t in range(T)]
        return torch.cat([q_t.rsample() for q_t in steps], 1), q
    h = guide.combiner.project(guide._summaries(obs, a_feat, mask))  # (B, T, Z + W)
    weights = guide.combiner.step_weights()
    # Steps of shape (B, ·), not (B, 1, ·): fewer views, one fused matmul; the draws are the
    # same numbers in the same order. unbind, not h[:, t]: the backward of each slice would
    # zero a gradient the size of all of h.
    z_prev = guide.z_0.expand(B, guide.latent_dim)
    zs, locs, scales = [], [], []
    for h_t in h.unbind(1):  # (B, Z + W) each
        loc, scale = guide.combiner.loc_scale(z_prev, h_t, weights)  # (B, Z) each
        z_prev = torch.addcmul(loc, _standard_normal(loc), scale)  # Normal(loc, scale).rsample()
        zs.append(z_prev)
        locs.append(loc)
        scales.append(scale)
    return torch.stack(zs, 1), Normal(torch.stack(locs, 1), torch.stack(scales, 1))


def _standard_normal(like):
    """The draw ``Normal.rsample`` makes for a loc like ``like`` (``empty(...).normal_()``): the same numbers."""
    return torch.randn_like(like)
