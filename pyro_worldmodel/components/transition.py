"""Transition priors p(z_{t+1} | z_t, a_t)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from ._nets import cat_batched, check_dim, check_hidden, mlp, positive, set_linear_gaussian


class GaussianMLPTransition(nn.Module):
    """p(z_{t+1} | z_t, a_t) = N(z_t + W[z_t, a_t] + f(z_t, a_t), diag σ(z_t, a_t)²).

    The mean is residual with a linear path: random-policy data is close to
    linear, and an MLP alone, trained briefly, does not reach least squares.
    The linear path and the MLP's last layer start at zero, so an untrained
    transition is a random walk.
    """

    def __init__(
        self,
        latent_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (64, 64),
        min_scale: float = 1e-3,
    ):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.action_dim = check_dim("action_dim", action_dim)
        self.hidden = check_hidden(hidden)
        self.min_scale = min_scale
        self.linear = nn.Linear(latent_dim + action_dim, latent_dim)
        self.net = mlp(latent_dim + action_dim, self.hidden, 2 * latent_dim)
        for layer in (self.linear, self.net[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z_prev: torch.Tensor, a_prev: torch.Tensor) -> dist.Distribution:
        """:param z_prev: ``(..., Z)``; :param a_prev: ``(..., A)`` action features."""
        u = cat_batched(z_prev, a_prev)  # (..., Z + A)
        delta, raw_scale = self.net(u).chunk(2, dim=-1)  # (..., Z) each
        loc = z_prev + self.linear(u) + delta
        return dist.Normal(loc, positive(raw_scale, self.min_scale)).to_event(1)

    def init_linear(self, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> None:
        """Start as the linear-Gaussian N(weight [z, a] + bias, diag scale²), the MLP at zero.

        :param weight: ``(Z, Z + A)``; :param bias: ``(Z,)``; :param scale: ``(Z,)``.
        """
        eye = torch.eye(self.latent_dim, self.latent_dim + self.action_dim)  # the residual z
        set_linear_gaussian(self.linear, self.net[-1], weight - eye, bias, scale, self.min_scale)


class LinearGaussianTransition(nn.Module):
    """p(z_{t+1} | z_t, a_t) = N(F z_t + G a_t + b, diag(σ²))."""

    def __init__(self, latent_dim: int, action_dim: int):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.action_dim = check_dim("action_dim", action_dim)
        self.F = nn.Parameter(torch.eye(latent_dim))
        self.G = nn.Parameter(torch.zeros(latent_dim, action_dim))
        self.bias = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, z_prev: torch.Tensor, a_prev: torch.Tensor) -> dist.Distribution:
        """:param z_prev: ``(..., Z)``; :param a_prev: ``(..., A)`` action features."""
        loc = z_prev @ self.F.T + a_prev @ self.G.T + self.bias  # (..., Z)
        return dist.Normal(loc, self.log_scale.exp().expand(loc.shape)).to_event(1)
