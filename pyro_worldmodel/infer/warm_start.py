"""Start training at the least-squares linear system of the data.

Random-policy data from physical systems is close to linear over one step
(least squares reaches a one-step MSE of about 5e-7 on random CartPole data). SVI from a
random start gets within 1e-3 of that slowly, because Adam moves each
log-scale by about the learning rate per step. A warm start sets the model's
linear paths to the least-squares solution, so training begins where the
linear baseline ends and the MLPs learn only what is not linear.
"""

from __future__ import annotations

import torch

from ..model.baselines import LinearLeastSquares
from ..model.components import IdentityEncoder


def linear_warm_start(
    model,
    guide,
    obs,
    actions,
    mask=None,
    *,
    obs_noise: float = 0.3,
    latent_noise: float = 1e-2,
    min_scale: float = 1e-3,
) -> LinearLeastSquares:
    """Set ``model`` and ``guide`` to the least-squares linear system x_{t+1} = W [x_t, a_t, 1].

    The first X latent dimensions become the observation: the filter reads
    z_t = x_t, the emission reads x_t back out, and the transition steps those
    dimensions by W with its one-step error as noise. The other latent
    dimensions start as a slow random walk, free for what x_t does not show.
    Every MLP's last layer starts at zero.

    :param model: a :class:`~pyro_worldmodel.model.WorldModel` whose transition
        and emission have ``init_linear`` (the Gaussian MLP ones) and
        ``latent_dim >= obs_dim``.
    :param guide: a :class:`~pyro_worldmodel.model.guides.FilterGuide`.
    :param obs: ``(N, T, X)`` training data, in the units the model trains in.
    :param obs_noise: emission and filter scale of each dimension, as a
        fraction of its least-squares one-step error.
    :param latent_noise: transition scale of the extra latent dimensions.
    :param min_scale: floor of every scale set here, in model units.
    :returns: the fitted :class:`~pyro_worldmodel.model.baselines.LinearLeastSquares`.
    """
    reason = why_no_linear_warm_start(model, guide)
    if reason is not None:
        raise ValueError(reason)
    Z, X, A = model.latent_dim, model.obs_dim, model.action_space.feature_dim
    if not 0 < obs_noise:
        raise ValueError(f"obs_noise: expected a positive float, got {obs_noise!r}")
    ls = LinearLeastSquares(model.action_space).fit(obs, actions, mask, horizon=1)
    W = ls.W.float()  # (X, X + A + 1)
    step_sd = ls.var[0].float().sqrt()  # (X,)
    # Floors keep every scale within reach of SVI: one Adam step moves a mean
    # by about lr, which must not be thousands of standard deviations. On
    # CartPole a 1e-5 floor made the loss jump from 2e2 to 2e6 in one step.
    noise = (obs_noise * step_sd).clamp(min=min_scale)  # (X,)

    weight = torch.zeros(Z, Z + A)
    weight[:X, :X] = W[:, :X]
    weight[:X, Z:] = W[:, X : X + A]
    weight[X:, X:Z] = torch.eye(Z - X)
    bias = torch.zeros(Z)
    bias[:X] = W[:, -1]
    scale = torch.full((Z,), latent_noise)
    scale[:X] = step_sd.clamp(min=min_scale)
    model.transition.init_linear(weight, bias, scale)

    read_out = torch.eye(X, Z)
    model.emission.init_linear(read_out, torch.zeros(X), noise)
    guide.init_reading(read_out.T, torch.cat([noise, torch.full((Z - X,), latent_noise)]))
    return ls


def why_no_linear_warm_start(model, guide) -> str | None:
    """Why :func:`linear_warm_start` cannot set this model and guide, or None if it can."""
    Z, X = model.latent_dim, model.obs_dim
    if Z < X:
        return f"model: expected latent_dim >= obs_dim = {X} for a linear warm start, got {Z}"
    for owner, part, method in (
        ("model.transition", model.transition, "init_linear"),
        ("model.emission", model.emission, "init_linear"),
        ("guide", guide, "init_reading"),
    ):
        if not hasattr(part, method):
            return f"{owner}: expected a component with {method}(), got {type(part).__name__}"
    encoder = getattr(guide, "encoder", None)
    if encoder is not None and not isinstance(encoder, IdentityEncoder):
        return f"guide.encoder: expected the identity (z_t is read off x_t), got {type(encoder).__name__}"
    return None
