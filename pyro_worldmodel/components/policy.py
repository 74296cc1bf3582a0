"""Policies π(a_t | z_t)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from ..spaces import ActionSpace
from ._nets import check_dim, check_hidden, mlp


class NormalPolicy(nn.Module):
    """π(a_t | z_t) = N(W z_t + f(z_t), diag(σ²)) for box actions."""

    def __init__(self, latent_dim: int, action_space: ActionSpace, hidden: Sequence[int] = (64,)):
        super().__init__()
        if action_space.kind != "box":
            raise ValueError(f"action_space: expected a box space, got {action_space}")
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.action_space = action_space
        self.hidden = check_hidden(hidden)
        self.linear = nn.Linear(latent_dim, action_space.dim)
        self.net = mlp(latent_dim, self.hidden, action_space.dim)
        self.log_scale = nn.Parameter(torch.zeros(action_space.dim))

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        """:param z: ``(..., Z)``. :returns: a Normal with event shape ``(A,)``."""
        loc = self.linear(z) + self.net(z)  # (..., A)
        return dist.Normal(loc, self.log_scale.exp().expand(loc.shape)).to_event(1)


class CategoricalPolicy(nn.Module):
    """π(a_t | z_t) = Categorical(softmax f(z_t)) for discrete actions."""

    def __init__(self, latent_dim: int, action_space: ActionSpace, hidden: Sequence[int] = (64,)):
        super().__init__()
        if action_space.kind != "discrete":
            raise ValueError(f"action_space: expected a discrete space, got {action_space}")
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.action_space = action_space
        self.hidden = check_hidden(hidden)
        self.net = mlp(latent_dim, self.hidden, action_space.dim)

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        """:param z: ``(..., Z)``. :returns: a Categorical with event shape ``()``."""
        return dist.Categorical(logits=self.net(z))  # logits (..., n)


class LinearGaussianPolicy(nn.Module):
    """π(a_t | z_t) = N(K z_t + b, diag(σ²)) for box actions."""

    def __init__(self, latent_dim: int, action_space: ActionSpace):
        super().__init__()
        if action_space.kind != "box":
            raise ValueError(f"action_space: expected a box space, got {action_space}")
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.action_space = action_space
        self.K = nn.Parameter(torch.zeros(action_space.dim, latent_dim))
        self.bias = nn.Parameter(torch.zeros(action_space.dim))
        self.log_scale = nn.Parameter(torch.zeros(action_space.dim))

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        """:param z: ``(..., Z)``. :returns: a Normal with event shape ``(A,)``."""
        loc = z @ self.K.T + self.bias  # (..., A)
        return dist.Normal(loc, self.log_scale.exp().expand(loc.shape)).to_event(1)


def auto_policy(latent_dim: int, action_space: ActionSpace, hidden: Sequence[int] = (64,)) -> nn.Module:
    """The default policy for a space: Normal for box, Categorical for discrete."""
    if action_space.kind == "discrete":
        return CategoricalPolicy(latent_dim, action_space, hidden)
    return NormalPolicy(latent_dim, action_space, hidden)
