"""Initial priors p(z_1)."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from .nets import check_dim


class StandardNormalInit(nn.Module):
    """p(z_1) = N(0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self, batch_shape: torch.Size | tuple[int, ...]) -> dist.Distribution:
        """:returns: a Normal with ``batch_shape`` and event shape ``(Z,)``."""
        shape = (*batch_shape, self.latent_dim)
        return dist.Normal(self.loc.expand(shape), self.scale.expand(shape)).to_event(1)


class LearnedGaussianInit(nn.Module):
    """p(z_1) = N(μ, diag(σ²)) with learned μ and σ."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, batch_shape: torch.Size | tuple[int, ...]) -> dist.Distribution:
        """:returns: a Normal with ``batch_shape`` and event shape ``(Z,)``."""
        shape = (*batch_shape, self.latent_dim)
        return dist.Normal(self.loc.expand(shape), self.log_scale.exp().expand(shape)).to_event(1)
