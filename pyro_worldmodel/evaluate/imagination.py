"""Imagination: futures dreamt by the model, as the posterior predictive of its own Pyro program."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.infer import Predictive

from ..spaces import INT_DTYPES, check_inputs


@dataclass
class Imagination:
    """Imagined futures after a context, in real units when a normalizer was given.

    S samples, B episodes, H imagined steps.

    :ivar latents: ``(S, B, H, Z)`` z_{C+1} … z_{C+H}.
    :ivar actions: ``(S, B, H, A)``, or ``(S, B, H)`` integers for a discrete space:
        the action taken at each imagined step.
    :ivar obs_mean: ``(S, B, H, X)`` the emission's mean E[x_t | z_t] per sample.
    :ivar obs: ``(S, B, H, X)`` observations sampled from the emission.
    :ivar context_obs: ``(B, C, X)`` the context the futures follow.
    :ivar features: ``(S, B, H, D + Z)`` [h_t, z_t], what the emission and the
        policy read, with a recurrent transition (D the size of h_t); None
        otherwise, where they read the latents.
    """

    latents: torch.Tensor
    actions: torch.Tensor
    obs_mean: torch.Tensor
    obs: torch.Tensor
    context_obs: torch.Tensor
    features: torch.Tensor | None = None

    @property
    def emission_input(self) -> torch.Tensor:
        """What the model's emission reads at each imagined step: the features, or the latents."""
        return self.latents if self.features is None else self.features

    @property
    def num_samples(self) -> int:
        return self.obs.shape[0]

    @property
    def horizon(self) -> int:
        return self.obs.shape[2]


def imagine(
    model,
    guide,
    obs,
    actions,
    horizon: int,
    *,
    future_actions=None,
    num_samples: int = 100,
    normalizer=None,
    parallel: bool = True,
) -> Imagination:
    """Dream ``horizon`` steps past a context, as the model's posterior predictive.

    The guide filters the context into q(z_{1:C} | x, a); the model then rolls
    forward from z_C with its own transition, takes actions from π, from
    ``future_actions`` or from a callable, and decodes each step with its
    emission. It is :class:`pyro.infer.Predictive` on
    :meth:`WorldModel.model <pyro_worldmodel.model.WorldModel.model>` with a
    ``horizon``: no second copy of the dynamics.

    :param model: a :class:`~pyro_worldmodel.model.WorldModel`.
    :param guide: its trained guide.
    :param obs: ``(B, C, X)`` context observations, every step observed.
    :param actions: ``(B, C, A)`` (or ``(B, C)``) context actions; a_C, the last,
        drives the first imagined step.
    :param horizon: H, steps to imagine.
    :param future_actions: None to sample from the learned π; a ``(B, H, A)``
        (or ``(B, H)``) tensor; or a callable ``f(z) -> a`` on latents
        ``(..., B, 1, Z)`` (features [h_t, z_t] with a recurrent transition,
        as the policy reads), returning ``(..., B, 1, A)`` (or ``(..., B, 1)``)
        with the same leading dims. In real units when ``normalizer`` is given.
    :param num_samples: S, futures drawn per episode.
    :param normalizer: a :class:`~pyro_worldmodel.data.Normalizer`: inputs are in
        real units and so is the result. None: everything in model units.
    :param parallel: draw the S samples in one vectorised pass.

    Everything is checked whether or not Pyro validation is on: shapes, dtypes (integers are real numbers, converted to the parameters'
    dtype before the normaliser; complex and bool are refused), finite values,
    discrete actions in ``[0, n)``, what the model's parts refuse (a Bernoulli
    emission's observations outside {0, 1}), and each action a callable returns,
    as it returns it.
    """
    for arg, value in (("horizon", horizon), ("num_samples", num_samples)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    ref = next(model.parameters())
    space = model.action_space
    box = space.kind == "box"
    obs = _on_device("obs", obs, ref.device)
    actions = _on_device("actions", actions, ref.device)
    if box and actions.dtype in INT_DTYPES:
        actions = actions.to(ref.dtype)  # real actions, so that integers are normalised too
    # The checks that evaluation makes, in the units given and whether or not Pyro
    # validation is on; integer observations become the parameters' float dtype
    # here, before the normaliser, whose statistics would be cast to integers.
    obs, actions, _ = check_inputs(
        obs,
        actions,
        None,
        obs_dim=model.obs_dim,
        action_space=space,
        dtype=ref.dtype,
        device=ref.device,
        check_values=True,
    )
    B = obs.shape[0]
    if future_actions is not None and not callable(future_actions):
        future_actions = model.check_future_actions(future_actions, B, horizon)
    context_obs = obs
    if normalizer is not None:
        obs = normalizer.obs(obs)
        if box:
            actions = normalizer.actions(actions)
            if torch.is_tensor(future_actions):
                future_actions = normalizer.actions(future_actions)
            elif callable(future_actions):
                future_actions = _in_model_units(future_actions, model, normalizer)
    # What the model's own parts refuse (a bounded policy's box, a Bernoulli emission's
    # {0, 1}) in the units they read.
    obs, actions, _ = model.check_inputs(obs, actions, check_values=True)
    predictive = Predictive(
        model.model,
        guide=guide,
        num_samples=num_samples,
        parallel=parallel,
        return_sites=["z_future", "a_future", "x_future_mean", "x_future"]
        + (["features_future"] if model.deter_dim else []),
    )
    with torch.no_grad():
        out = predictive(obs, actions, horizon=horizon, future_actions=future_actions)
    x_mean = out["x_future_mean"].reshape(num_samples, B, horizon, -1)
    x = out["x_future"].reshape(num_samples, B, horizon, -1)
    z = out["z_future"].reshape(num_samples, B, horizon, -1)
    space = model.action_space
    a = out["a_future"].reshape(num_samples, B, horizon, *(() if space.kind == "discrete" else (space.dim,)))
    if normalizer is not None:
        x_mean, x = normalizer.obs_inverse(x_mean), normalizer.obs_inverse(x)
        a = normalizer.actions_inverse(a) if box else a
    features = out["features_future"].reshape(num_samples, B, horizon, -1) if model.deter_dim else None
    return Imagination(
        latents=z, actions=a, obs_mean=x_mean, obs=x, context_obs=context_obs, features=features
    )


def _in_model_units(fn, model, normalizer):
    def wrapped(f):
        # The shape before the map, whose broadcasting would hide a wrong one; the
        # model checks the values after it, naming the step (the map keeps NaN and inf).
        a = model.check_future_action(fn(f), f, check_values=False)
        return normalizer.actions(a)

    return wrapped


def _on_device(name, value, device):
    """``value`` as a tensor on ``device``, or a ValueError naming ``name``."""
    try:
        return torch.as_tensor(value).to(device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name}: expected a tensor or array, got {type(value).__name__}") from e
