"""Guide factors q(z_t | ·)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pyro.distributions as dist
import torch
from torch import nn

from .nets import ScaleMap, check_dim, check_hidden, mlp, set_linear_gaussian


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
        min_scale: float | Literal["learned"] = 1e-3,
    ):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.summary_dim = check_dim("summary_dim", summary_dim)
        self.scale_map = ScaleMap(latent_dim, min_scale)
        self.min_scale = self.scale_map.min_scale
        self.linear = nn.Linear(latent_dim + summary_dim, latent_dim)
        self.net = mlp(latent_dim + summary_dim, check_hidden(hidden), 2 * latent_dim)
        self._deep = len(self.net) > 1  # at least one hidden layer
        self._hidden = tuple(self.net)[1:-1]  # between the first layer and the last, as step() applies them

    def forward(self, z_prev: torch.Tensor, h_t: torch.Tensor) -> dist.Distribution:
        """:param z_prev: ``(..., Z)``; :param h_t: ``(..., H)``."""
        return self.step(z_prev, self.project(h_t), self.step_weights())

    # A filter calls the combiner once per step, on z_{t-1} and h_t. Only the
    # z part is sequential: the h part of the linear path and of the MLP's
    # first layer is one matmul over every t (project), and each step adds
    # z_{t-1}'s part (step), with one matmul for both. The last layer's two
    # halves, loc and scale, are two matmuls, the loc's added to the linear
    # path in the same call; its bias is already in project's.

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """h_t's part of the linear path and of the first layer, with the biases: ``(..., H)`` → ``(..., Z + W)``."""
        Z = self.latent_dim
        first = self.net[0]
        weight = torch.cat([self.linear.weight[:, Z:], first.weight[:, Z:]], 0)  # (Z + W, H)
        loc_bias = self.linear.bias + self.net[-1].bias[:Z] if self._deep else self.linear.bias
        return nn.functional.linear(h, weight, torch.cat([loc_bias, first.bias]))

    def step_weights(self) -> tuple[torch.Tensor, ...]:
        """What :meth:`step` takes besides z_{t-1} and ``project(h_t)``: slices of the weights, cut once per sequence."""
        Z = self.latent_dim
        z_weight = torch.cat([self.linear.weight[:, :Z], self.net[0].weight[:, :Z]], 0)  # (Z + W, Z)
        if not self._deep:
            return (z_weight,)
        last = self.net[-1]
        return z_weight, last.weight[:Z].t(), last.weight[Z:].t(), last.bias[Z:]

    def step(self, z_prev: torch.Tensor, projected: torch.Tensor, weights: tuple) -> dist.Distribution:
        """q(z_t | z_{t-1}, h_t) from z_{t-1} ``(..., Z)`` and ``project(h_t)`` ``(..., Z + W)``."""
        return dist.Normal(*self.loc_scale(z_prev, projected, weights)).to_event(1)

    def loc_scale(self, z_prev, projected, weights) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step`'s loc and scale, without building a distribution."""
        # (B, ·) both, as the batched path calls it; else (..., B, 1, ·), broadcast
        flat = z_prev.dim() == projected.dim() == 2 and z_prev.shape[0] == projected.shape[0]
        z_weight = weights[0]
        u = (
            torch.addmm(projected, z_prev, z_weight.t())
            if flat
            else nn.functional.linear(z_prev, z_weight) + projected
        )
        linear, out = u.split([self.latent_dim, u.shape[-1] - self.latent_dim], dim=-1)
        if not self._deep:  # the first layer is the last: u holds [linear, delta, raw scale]
            delta, raw_scale = out.chunk(2, dim=-1)
            return linear + delta, self.scale_map(raw_scale)
        for layer in self._hidden:  # without building a Sequential (or running hooks) each step
            out = layer.forward(out)
        _, w_loc, w_scale, b_scale = weights
        if flat:
            loc, raw_scale = torch.addmm(linear, out, w_loc), torch.addmm(b_scale, out, w_scale)
        else:
            loc, raw_scale = linear + out @ w_loc, out @ w_scale + b_scale
        return loc, self.scale_map(raw_scale)

    def init_linear(self, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> None:
        """Start as N(weight [z_{t-1}, h_t] + bias, diag scale²), the MLP at zero.

        :param weight: ``(Z, Z + H)``; :param bias: ``(Z,)``; :param scale: ``(Z,)``.
        """
        set_linear_gaussian(self.linear, self.net[-1], weight, bias, scale, self.scale_map.start())
