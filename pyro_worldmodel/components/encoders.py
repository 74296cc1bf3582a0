"""Guide factors q(z_t | ·)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from ._nets import cat_batched, check_dim, check_hidden, check_min_scale, mlp, positive, set_linear_gaussian


class Combiner(nn.Module):
    """q(z_t | z_{t-1}, h_t) = N(loc, diag(scale²)) from u = [z_{t-1}, h_t].

    ``h_t`` summarises what the guide has seen, e.g. a GRU state over
    x_{≤t} and a_{<t}; the name follows the Deep Markov Model example.
    The mean has a linear path beside the MLP, loc = W u + f(u), so that a
    latent that is a linear function of the data is easy to infer precisely.
    """

    def __init__(
        self,
        latent_dim: int,
        summary_dim: int,
        hidden: Sequence[int] = (64,),
        min_scale: float = 1e-3,
    ):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.summary_dim = check_dim("summary_dim", summary_dim)
        self.min_scale = check_min_scale(min_scale)
        self.linear = nn.Linear(latent_dim + summary_dim, latent_dim)
        self.net = mlp(latent_dim + summary_dim, check_hidden(hidden), 2 * latent_dim)

    def forward(self, z_prev: torch.Tensor, h_t: torch.Tensor) -> dist.Distribution:
        """:param z_prev: ``(..., Z)``; :param h_t: ``(..., H)``."""
        u = cat_batched(z_prev, h_t)
        delta, raw_scale = self.net(u).chunk(2, dim=-1)  # (..., Z) each
        return dist.Normal(self.linear(u) + delta, positive(raw_scale, self.min_scale)).to_event(1)

    def init_linear(self, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> None:
        """Start as N(weight [z_{t-1}, h_t] + bias, diag scale²), the MLP at zero.

        :param weight: ``(Z, Z + H)``; :param bias: ``(Z,)``; :param scale: ``(Z,)``.
        """
        set_linear_gaussian(self.linear, self.net[-1], weight, bias, scale, self.min_scale)
