"""The mean-field ELBO of a world model, its model terms batched over time.

Run through Pyro's traces, a :class:`~pyro_worldmodel.model.WorldModel` pays
for every latent site twice (model and guide, about 150 µs a site) and calls
its transition once per step (docs/pyro_pitfalls.md). Yet once the guide has
drawn z_1 … z_T, nothing in a Markov model is sequential: p(z_t | z_{t-1},
a_{t-1}), KL(q_t ‖ p_t), p(x_t | z_t) and π(a_t | z_t) are functions of
tensors that are all known. :func:`mean_field_loss` computes the
:class:`~pyro_worldmodel.infer.TraceMeanField_ELBO` loss that way.

It calls the very methods the Pyro programs call, so that a change to a
factor changes both paths: the guide's :meth:`~FilterGuide.context` and
:meth:`~FilterGuide.step_params` step by step, with the same random draws in
the same order as under ``pyro.sample``; then the model's
:meth:`~WorldModel.priors` (a recurrent transition steps its h_t there) and
:meth:`~WorldModel.observation_sites`. The tests compare the two paths for
every registered component.

It applies where that equality holds (:func:`supports`): the Pyro programs
are the package's own (not overridden), the guide's steps are its diagonal
Normals, the init and the transition give diagonal Normals (so every KL is
analytic), and no component samples anything of its own. Anything else takes
Pyro's traces.
"""

from __future__ import annotations

import weakref

import pyro
import torch
from pyro import poutine
from pyro.distributions import Independent, Normal
from pyro.poutine.runtime import _PYRO_STACK  # Pyro's handler stack: no public accessor
from pyro.poutine.trace_messenger import TraceMessenger
from torch.distributions import kl_divergence

from ..model.components.transition import WEIGHTS_SITE
from ..model.guides import FilterGuide, MeanFieldGuide
from ..model.naming import register_module
from ..model.world_model import WorldModel

# Guides whose Pyro program is step() on context(), and whose step() is the Normal of step_params().
_PROGRAMS = (FilterGuide, MeanFieldGuide)


def supports(model_fn, guide, args, kwargs, *, vectorize_particles: bool) -> str | None:
    """None if :func:`mean_field_loss` computes exactly what Pyro's traces would; else why not."""
    model = getattr(model_fn, "__self__", None)
    if isinstance(model, WorldModel) and type(model).model is not WorldModel.model:
        return f"{type(model).__name__} overrides WorldModel.model"
    if not isinstance(model, WorldModel) or getattr(model_fn, "__func__", None) is not WorldModel.model:
        return "the model is not WorldModel.model"
    program = next((base for base in _PROGRAMS if isinstance(guide, base)), None)
    if program is None:
        return f"the guide is a {type(guide).__name__}"
    if type(guide).forward is not program.forward:
        return f"{type(guide).__name__} overrides {program.__name__}.forward"
    if type(guide).step is not program.step:
        return f"{type(guide).__name__}'s steps are not the diagonal Normals of its step_params"
    if getattr(guide, "covariance", "diagonal") != "diagonal":
        return f"{type(guide).__name__}'s steps have a {guide.covariance} covariance"
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
    if not guide.draws_globals_of(model):
        return "the guide does not draw the weights of the model's Bayesian transition"
    # Only SVI's parameter capture may watch: any other handler (scale, mask,
    # condition, a trace of the sample sites) needs Pyro's sites.
    if not all(isinstance(m, TraceMessenger) and m.param_only for m in _PYRO_STACK):
        return "a Pyro handler is active"
    return _probe(model)


_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probe(model: WorldModel) -> str | None:
    """Whether the model's chain gives diagonal Normals and its factors sample nothing,
    found by calling them once on zeros (no random draw), and remembered per set of parts."""
    key = tuple(id(part) for part in model.children())
    cached = _PROBED.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    ref = next(model.parameters())
    Z, A = model.latent_dim, model.action_space.feature_dim
    z, a = ref.new_zeros(1, 2, Z), ref.new_zeros(1, 2, A)
    why = None
    with torch.no_grad(), pyro.validation_enabled(False), poutine.trace() as tape:
        priors, features = model.priors(z, a)
        for i, prior in enumerate(priors):
            if _normal(prior) is None:
                part = type(model.init if i == 0 else model.transition).__name__
                why = f"the {part} gives a {_family(prior)}, not a diagonal Normal"
                break
        values = {"obs": ref.new_zeros(1, 2, model.obs_dim), "actions": _some_actions(model, ref)}
        targets = model.targets(ref.new_zeros(1, 2), ref.new_ones(1, 2))  # for the heads it has
        model.observation_sites(features, a, **values, **targets)
    if why is None and tape.trace.nodes:
        why = f"a component samples or registers sites of its own ({', '.join(tape.trace.nodes)})"
    _PROBED[model] = (key, why)
    return why


def _some_actions(model, ref):
    space = model.action_space
    if space.kind == "discrete":
        return torch.zeros(1, 2, dtype=torch.long, device=ref.device)
    return ref.new_zeros(1, 2, space.dim)


def _family(d) -> str:
    while type(d).__name__ in ("MaskedDistribution", "Independent"):
        d = d.base_dist
    return type(d).__name__


def _normal(d) -> Normal | None:
    """The diagonal Normal inside ``Independent(Normal, 1)`` (masked or not), else None."""
    while type(d).__name__ == "MaskedDistribution":
        d = d.base_dist
    if isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1 and type(d.base_dist) is Normal:
        return d.base_dist
    return None


def mean_field_loss(
    elbo, model_fn, guide, obs, actions, mask=None, rewards=None, continues=None
) -> torch.Tensor:
    """One particle of −ELBO, differentiable: the guide step by step, the model batched over time.

    :param elbo: the :class:`~pyro_worldmodel.infer.TraceMeanField_ELBO` (or
        subclass) whose ``shape_kl`` shapes the KL terms, as on Pyro's path.
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


def heldout_loss(model, guide, obs, actions, mask) -> torch.Tensor:
    """One particle of −ELBO of the observations and actions, the bound :func:`~pyro_worldmodel.elbo_terms`
    estimates, without a global latent's KL (θ ~ q(θ) is drawn, its KL paid by the training
    set): for data not trained on. Needs :func:`supports` (with ``kwargs={}``) to hold."""
    from .elbos import TraceMeanField_ELBO  # the plain bound, whatever the training objective

    obs, actions, mask = model.check_inputs(obs, actions, mask)
    guide.check_inputs(obs, actions, mask, check_values=False)
    register_module(model.name, model)
    register_module(guide.name, guide)
    with pyro.validation_enabled(False):
        return _loss(TraceMeanField_ELBO(), model, guide, obs, actions, mask, global_kl=False)


def _loss(elbo, model, guide, obs, actions, mask, rewards=None, continues=None, *, global_kl=True):
    if not model.has_global_latents:
        return _chain_loss(elbo, model, guide, obs, actions, mask, rewards, continues)
    # A Bayesian transition: θ ~ q(θ) first, as the guide draws it, then the chain under θ.
    transition = model.transition
    q_theta, p_theta = transition.posterior(), transition.prior()
    theta = q_theta.rsample()
    kl = elbo.shape_kl(WEIGHTS_SITE, kl_divergence(q_theta, p_theta), q_theta, p_theta, None, "analytic")
    with transition.using(theta):
        loss = _chain_loss(elbo, model, guide, obs, actions, mask, rewards, continues)
    if not global_kl:
        return loss
    elbo.kl_estimators[WEIGHTS_SITE] = "analytic"
    return loss + kl * transition.kl_scale(mask.shape[0])


def _chain_loss(elbo, model, guide, obs, actions, mask, rewards=None, continues=None):
    B, T = mask.shape
    a_feat = model.action_space.features(actions, obs.dtype)  # (B, T, A)
    z, q = guide_draws(guide, obs, a_feat, mask)  # (B, T, Z); Normal, batch (B, T, Z)
    priors, features = model.priors(z, a_feat)  # p(z_1), then p(z_t | ·) for t ≥ 2
    normals = [_normal(p) for p in priors]
    p = Normal(torch.cat([n.loc for n in normals], 1), torch.cat([n.scale for n in normals], 1))
    q, p = Independent(q, 1).mask(mask), Independent(p, 1).mask(mask)  # as the z_t sites are masked
    kl = elbo.shape_kl(f"z_0 … z_{T - 1}", kl_divergence(q, p), q, p, mask, "analytic")  # (B, T)
    kl = elbo.combine_kl(kl, model, z, q.base_dist.base_dist, a_feat, mask)
    sites = model.observation_sites(features, a_feat, obs, actions, rewards, continues)
    log_px, *others = (d.mask(mask).log_prob(value).sum() for d, value in sites.values())
    log_pa = others[0]  # log π(a|z), then the heads', in the order of the sites
    for term in others[1:]:
        log_pa = log_pa + term
    elbo.kl_estimators = {f"z_{t}": "analytic" for t in range(T)}
    return -(log_px + log_pa - kl.sum())


def guide_draws(guide, obs, a_feat, mask) -> tuple[torch.Tensor, Normal]:
    """z_t ~ q(z_t | ·) for t = 0 … T-1, drawn in the order, and with the calls, of the
    guide's ``pyro.sample``: ``(z (B, T, Z), q as one Normal of batch (B, T, Z))``."""
    B = mask.shape[0]
    # Steps of shape (B, ·), not (B, 1, ·): fewer views, one fused matmul; the draws are the
    # same numbers in the same order. unbind, not c[:, t]: the backward of each slice would
    # zero a gradient the size of all of the context.
    context = guide.context(obs, a_feat, mask)  # (B, T, C)
    weights = guide.step_weights()
    z_prev = guide.initial_latent(B)  # (B, Z)
    zs, locs, scales = [], [], []
    for c_t in context.unbind(1):  # (B, C) each
        loc, scale = guide.step_params(z_prev, c_t, weights)  # (B, Z) each
        z_prev = torch.addcmul(loc, _standard_normal(loc), scale)  # Normal(loc, scale).rsample()
        zs.append(z_prev)
        locs.append(loc)
        scales.append(scale)
    return torch.stack(zs, 1), Normal(torch.stack(locs, 1), torch.stack(scales, 1))


def _standard_normal(like):
    """The draw ``Normal.rsample`` makes for a loc like ``like`` (``empty(...).normal_()``): the same numbers."""
    return torch.randn_like(like)


def multi_step_kl(model, z, q: Normal, a_feat, mask, distance: int) -> torch.Tensor:
    """KL(q(z_t | ·) ‖ p(z_t | z_{t-d})) for t ≥ d, per element: ``(B, T - d)``, zero outside ``mask``.

    p(z_t | z_{t-d}) is the model's d-step prior from the guide's draw of z_{t-d}:
    d − 1 transitions sampled (reparameterised) under the recorded actions, then
    the last transition's Normal, so the KL is a one-sample estimate of
    E_{p(z_{t-1} | z_{t-d})}[KL(q_t ‖ p(z_t | z_{t-1}))] for a Markov transition.
    Computed for every t at once, through :meth:`WorldModel.step <pyro_worldmodel.model.WorldModel.step>`.

    :param z: ``(B, T, Z)`` the guide's draws; :param q: the guide's Normal, batch ``(B, T, Z)``.
    :param distance: d ≥ 1.
    """
    T = z.shape[1]
    s = z[:, : T - distance]  # z_{t-d} for t = d … T-1
    for k in range(distance):
        prior = _normal(model.step(s, a_feat[:, k : k + T - distance])[0])
        if k < distance - 1:
            s = torch.addcmul(prior.loc, torch.randn_like(prior.loc), prior.scale)
    q_t = Normal(q.loc[:, distance:], q.scale[:, distance:])
    kl = kl_divergence(q_t, prior).sum(-1)  # (B, T - d)
    return torch.where(mask[:, distance:], kl, 0.0)
