"""Observation encoders: what a guide reads of x_t."""

from __future__ import annotations

import torch
from torch import nn

from .nets import check_dim


class IdentityEncoder(nn.Module):
    """e(x_t) = x_t, for observations that are vectors already.

    Guides read observations through an encoder: the slot where an image model
    puts its convolutions. ``out_dim`` is the size of what it returns.
    """

    def __init__(self, obs_dim: int):
        super().__init__()
        self.obs_dim = check_dim("obs_dim", obs_dim)
        self.out_dim = self.obs_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """``(..., X)`` → ``(..., X)``."""
        return obs
