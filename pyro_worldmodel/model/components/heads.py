"""Reward and continue heads: p(r_t | z_t, a_t) and p(c_t | z_t).

Alignment (as gymnasium's): r_t is the reward after a_t was taken in the state
of x_t; c_t = 0 when the episode terminated after step t, 1 otherwise. A
truncated episode (time limit) did not terminate: its last step has c_t = 1.
Both read what the emission and the policy read: z_t, or [h_t, z_t] with a
recurrent transition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pyro.distributions as dist
import torch
from torch import nn

from ...spaces import ActionSpace
from .nets import ScaleMap, cat_batched, check_dim, check_hidden, mlp


class GaussianReward(nn.Module):
    """p(r_t | z_t, a_t) = N(f([z_t, a_t]), σ²), σ learned (one for all steps).

    :param latent_dim: what it reads from the state, Z (or D + Z).
    :param action_space: the actions, read as :meth:`ActionSpace.features`.
    :param hidden: widths of f's hidden layers.
    :param min_scale: σ's floor. Rewards that are a deterministic function of the
        state (most gymnasium tasks) would otherwise drive σ towards 0 and the
        likelihood's gradients up without bound; at 0.1 (normalised rewards)
        the head still fits the mean by least squares.
    """

    def __init__(
        self,
        latent_dim: int,
        action_space: ActionSpace,
        hidden: Sequence[int] = (64, 64),
        min_scale: float | Literal["learned"] = 0.1,
    ):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.action_space = action_space
        self.hidden = check_hidden(hidden)
        self.scale_map = ScaleMap(1, min_scale)
        self.min_scale = self.scale_map.min_scale
        self.net = mlp(latent_dim + action_space.feature_dim, self.hidden, 1)
        self.raw_scale = nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor, a_feat: torch.Tensor) -> dist.Distribution:
        """:param z: ``(..., Z)``; :param a_feat: ``(..., A)`` action features.
        :returns: a Normal with batch shape ``(...)`` and event shape ``()``."""
        loc = self.net(cat_batched(z, a_feat)).squeeze(-1)  # (...)
        return dist.Normal(loc, self.scale_map(self.raw_scale).expand(loc.shape))


class BernoulliContinue(nn.Module):
    """p(c_t | z_t) = Bernoulli(sigmoid f(z_t)): does the episode go on after step t?

    The logit's bias starts at +5 (p = 0.993), as most steps continue.

    :param latent_dim: what it reads, Z (or D + Z).
    :param hidden: widths of f's hidden layers.
    """

    def __init__(self, latent_dim: int, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.hidden = check_hidden(hidden)
        self.net = mlp(latent_dim, self.hidden, 1)
        with torch.no_grad():
            self.net[-1].bias.fill_(5.0)

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        """:param z: ``(..., Z)``. :returns: a Bernoulli with batch shape ``(...)``."""
        return dist.Bernoulli(logits=self.net(z).squeeze(-1))
