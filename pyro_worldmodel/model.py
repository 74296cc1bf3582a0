"""The generative world model as a Pyro program."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import torch
from torch import nn

from ._naming import register, unique_name
from .components import GaussianMLPEmission, GaussianMLPTransition, StandardNormalInit, auto_policy
from .spaces import ActionSpace, ChecksInputs


class WorldModel(ChecksInputs, nn.Module):
    """p(z_1) · Π_t p(x_t | z_t) · π(a_t | z_t) · Π_{t<T} p(z_{t+1} | z_t, a_t).

    Composes four components, each a module returning one factor's
    distribution. The Pyro program is :meth:`model`; it holds no layers.

    :param init: p(z_1), called with a batch shape.
    :param transition: p(z_{t+1} | z_t, a_t), called with ``(z_t, a_t)``.
    :param emission: p(x_t | z_t), called with ``z_t``.
    :param policy: π(a_t | z_t), called with ``z_t``; carries the action space.
    :param name: prefix of the parameters in Pyro's param store; unique by
        default, so two models in one process never share parameters.
    """

    def __init__(
        self,
        init: nn.Module,
        transition: nn.Module,
        emission: nn.Module,
        policy: nn.Module,
        *,
        name: str | None = None,
    ):
        super().__init__()
        latent_dim = init.latent_dim
        for part in (transition, emission, policy):
            if part.latent_dim != latent_dim:
                raise ValueError(
                    f"{type(part).__name__}: expected latent_dim={latent_dim} as in"
                    f" {type(init).__name__}, got {part.latent_dim}"
                )
        if transition.action_dim != policy.action_space.feature_dim:
            raise ValueError(
                f"transition: expected action_dim={policy.action_space.feature_dim} to match"
                f" the policy's {policy.action_space}, got {transition.action_dim}"
            )
        self.init = init
        self.transition = transition
        self.emission = emission
        self.policy = policy
        self.name = unique_name("world_model", name)

    @classmethod
    def default(
        cls,
        obs_dim: int,
        action_space: ActionSpace,
        latent_dim: int = 16,
        hidden: Sequence[int] = (64, 64),
        *,
        name: str | None = None,
    ) -> WorldModel:
        """Gaussian MLP transition and emission, policy chosen by the space."""
        return cls(
            StandardNormalInit(latent_dim),
            GaussianMLPTransition(latent_dim, action_space.feature_dim, hidden),
            GaussianMLPEmission(latent_dim, obs_dim, hidden),
            auto_policy(latent_dim, action_space),
            name=name,
        )

    @property
    def latent_dim(self) -> int:
        return self.init.latent_dim

    @property
    def obs_dim(self) -> int:
        return self.emission.obs_dim

    @property
    def action_space(self) -> ActionSpace:
        return self.policy.action_space

    def model(self, obs, actions, mask=None):
        """The Pyro model.

        :param obs: ``(B, T, X)`` observations x_t.
        :param actions: ``(B, T, A)`` reals, or ``(B, T)`` integers for a
            discrete space: a_t, the action taken after seeing x_t.
        :param mask: ``(B, T)`` bool, True where a step was observed.
        :returns: the latents ``(B, T, Z)``.

        Sites: ``z_{t}`` for each t, then ``x`` and ``a`` over a time plate.
        """
        obs, actions, mask = self.check_inputs(obs, actions, mask)
        B, T = mask.shape
        register(self.name, self)
        a_feat = self.action_space.features(actions, obs.dtype)  # (B, T, A)
        z = []
        # Inside the loop the rightmost batch dim is one time slice, so the
        # latent sites share the episodes plate with the likelihood sites.
        with pyro.plate("episodes", B, dim=-2):
            for t in pyro.markov(range(T)):
                if t == 0:
                    prior = self.init((B, 1))
                else:
                    prior = self.transition(z[-1], a_feat[:, t - 1 : t])  # a_{t-1}: (B, 1, A)
                z.append(pyro.sample(f"z_{t}", prior.mask(mask[:, t : t + 1])))  # (..., B, 1, Z)
            z = torch.cat(z, dim=-2)  # (..., B, T, Z)
            with pyro.plate("time", T, dim=-1):
                pyro.sample("x", self.emission(z).mask(mask), obs=obs)
                pyro.sample("a", self.policy(z).mask(mask), obs=actions)
        return z

    def forward(self, obs, actions, mask=None):
        """Same as :meth:`model`."""
        return self.model(obs, actions, mask)
