"""Guide factors q(z_t | ·)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, register_kl

from .nets import ScaleMap, check_dim, check_hidden, mlp, set_linear_gaussian

COVARIANCES = ("diagonal", "full")


class Combiner(nn.Module):
    """q(z_t | z_{t-1}, h_t) = N(loc, diag(scale²)) from u = [z_{t-1}, h_t].

    ``h_t`` summarises what the guide has seen, e.g. a GRU state over
    x_{≤t} and a_{<t}; the name follows the Deep Markov Model example.
    The mean has a linear path beside the MLP, loc = W u + f(u), so that a
    latent that is a linear function of the data is easy to infer precisely.

    With ``covariance="full"`` the Normal has a full covariance, L Lᵀ with
    L = M diag(scale): M is a learned unit lower-triangular matrix, the same for
    every input (``tril``, Z(Z−1)/2 parameters, zero at the start, so the
    combiner starts diagonal), and scale is the MLP's, as for the diagonal
    Normal. Every covariance has this form (its LDLᵀ factorisation); with M
    fixed across inputs, only the variances follow the data. Where the exact
    posterior correlates the dimensions of z_t, as a linear-Gaussian model's
    does, a diagonal q pays Σ_t ½ (Σ_i log P_ii − log det P) nats for it, P
    the conditional precision; the full covariance need not.
    """

    def __init__(
        self,
        latent_dim: int,
        summary_dim: int,
        hidden: Sequence[int] = (64,),
        min_scale: float | Literal["learned"] = 1e-3,
        covariance: Literal["diagonal", "full"] = "diagonal",
    ):
        super().__init__()
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance: expected one of {COVARIANCES}, got {covariance!r}")
        self.covariance = covariance
        self.latent_dim = check_dim("latent_dim", latent_dim)
        if covariance == "full":
            self.tril = nn.Parameter(torch.zeros(latent_dim * (latent_dim - 1) // 2))
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
        """What :meth:`step` takes besides z_{t-1} and ``project(h_t)``: slices of the weights
        and, with ``covariance="full"``, the mixing matrix M last; cut once per sequence."""
        Z = self.latent_dim
        z_weight = torch.cat([self.linear.weight[:, :Z], self.net[0].weight[:, :Z]], 0)  # (Z + W, Z)
        weights = (z_weight,)
        if self._deep:
            last = self.net[-1]
            weights += (last.weight[:Z].t(), last.weight[Z:].t(), last.bias[Z:])
        return weights + ((self.mixing(),) if self.covariance == "full" else ())

    def step(self, z_prev: torch.Tensor, projected: torch.Tensor, weights: tuple) -> dist.Distribution:
        """q(z_t | z_{t-1}, h_t) from z_{t-1} ``(..., Z)`` and ``project(h_t)`` ``(..., Z + W)``."""
        return self.distribution(*self.loc_scale(z_prev, projected, weights), weights)

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor, weights: tuple) -> dist.TorchDistribution:
        """The Normal of :meth:`loc_scale`'s ``loc`` and ``scale``, event ``(Z,)``: diagonal, or
        with ``covariance="full"`` a ``MultivariateNormal`` with ``scale_tril`` M diag(scale),
        M the last of :meth:`step_weights`."""
        if self.covariance == "diagonal":
            return dist.Normal(loc, scale).to_event(1)
        return dist.MultivariateNormal(loc, scale_tril=weights[-1] * scale.unsqueeze(-2))

    def mixing(self) -> torch.Tensor:
        """M, ``(Z, Z)``: unit lower-triangular, its strictly lower part ``tril``."""
        Z = self.latent_dim
        eye = torch.eye(Z, dtype=self.linear.weight.dtype, device=self.linear.weight.device)
        if self.covariance == "diagonal":
            return eye
        rows, cols = torch.tril_indices(Z, Z, -1, device=eye.device)
        return eye.index_put((rows, cols), self.tril)

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
        _, w_loc, w_scale, b_scale = weights[:4]
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


@register_kl(MultivariateNormal, Independent)
def _kl_mvn_diagonal_normal(q: MultivariateNormal, p: Independent) -> torch.Tensor:
    """KL(q ‖ p) in closed form, q a full-covariance Normal and p a diagonal one
    (``Independent(Normal, 1)``): ½ [tr(Σ_p⁻¹ Σ_q) + ‖(μ_q − μ_p) / σ_p‖² − Z
    + 2 Σ log σ_p − log det Σ_q]. Torch and Pyro know only the reverse pair;
    without this, ``TraceMeanField_ELBO`` would estimate it by Monte Carlo."""
    if p.reinterpreted_batch_ndims != 1 or not isinstance(p.base_dist, Normal):
        raise NotImplementedError
    loc, scale = p.base_dist.loc, p.base_dist.scale
    L = q.scale_tril
    trace = (L.pow(2).sum(-1) / scale.pow(2)).sum(-1)  # Σ_i (L Lᵀ)_ii / σ_i²
    mahalanobis = ((q.loc - loc) / scale).pow(2).sum(-1)
    log_det = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + mahalanobis - loc.shape[-1] + 2 * scale.log().sum(-1) - log_det)
