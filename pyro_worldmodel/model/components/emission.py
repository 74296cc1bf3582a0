"""Emissions p(x_t | z_t)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from .nets import (
    DEFAULT_SCALE_GAIN,
    GainedParameter,
    LearnedDF,
    check_dim,
    check_hidden,
    mlp,
    set_linear_gaussian,
)


class _MLPMean(nn.Module):
    """The mean path of the MLP emissions: W z_t + f(z_t), with W linear and f an MLP."""

    def __init__(self, latent_dim: int, obs_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.obs_dim = check_dim("obs_dim", obs_dim)
        self.hidden = check_hidden(hidden)
        self.linear = nn.Linear(latent_dim, obs_dim)
        self.net = mlp(latent_dim, self.hidden, obs_dim)

    def mean_path(self, z: torch.Tensor) -> torch.Tensor:
        """``(..., Z)`` → ``(..., X)``."""
        return self.linear(z) + self.net(z)


class _Scale(nn.Module):
    """σ per observation dimension of the MLP emissions: learned, its log stored divided by
    a gain (:class:`~pyro_worldmodel.model.components.nets.GainedParameter`), or fixed."""

    def _init_scale(self, obs_dim: int, scale, gain: float) -> None:
        if scale == "learned":
            self.gained_log_scale = GainedParameter(obs_dim, gain)
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
            self.register_buffer("fixed_log_scale", torch.full((obs_dim,), float(scale)).log())
        else:
            raise ValueError(f"scale: expected 'learned' or a positive float, got {scale!r}")
        self.scale, self.scale_gain = scale, gain

    @property
    def log_scale(self) -> torch.Tensor:
        """log σ, ``(X,)``."""
        return self.gained_log_scale() if self.scale == "learned" else self.fixed_log_scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint written before the gain held log σ itself as ``log_scale``.
        old = prefix + "log_scale"
        if old in state_dict:
            value = state_dict.pop(old)
            if self.scale == "learned":
                state_dict[prefix + "gained_log_scale.raw"] = value / self.gained_log_scale.gain
            else:
                state_dict[prefix + "fixed_log_scale"] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GaussianMLPEmission(_Scale, _MLPMean):
    """p(x_t | z_t) = N(W z_t + f(z_t), diag(σ²)).

    :param scale: ``"learned"`` for a learned σ per observation dimension, or
        a positive float for a fixed σ.
    :param scale_gain: g, the gain of a learned log σ: the parameter
        ``gained_log_scale.raw`` holds log σ / g (:class:`~pyro_worldmodel.model.components.nets.GainedParameter`).
    """

    def __init__(
        self,
        latent_dim: int,
        obs_dim: int,
        hidden: Sequence[int] = (64, 64),
        scale: float | str = "learned",
        scale_gain: float = DEFAULT_SCALE_GAIN,
    ):
        super().__init__(latent_dim, obs_dim, hidden)
        self._init_scale(obs_dim, scale, scale_gain)

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        """:param z: ``(..., Z)``. :returns: a Normal with event shape ``(X,)``."""
        loc = self.mean_path(z)  # (..., X)
        return dist.Normal(loc, self.log_scale.exp().expand(loc.shape)).to_event(1)

    def init_linear(self, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> None:
        """Start as N(weight z + bias, diag scale²), the MLP at zero (a learned scale only).

        :param weight: ``(X, Z)``; :param bias: ``(X,)``; :param scale: ``(X,)``.
        """
        set_linear_gaussian(self.linear, self.net[-1], weight, bias, None, 0.0)
        if self.scale == "learned":
            self.gained_log_scale.set(torch.as_tensor(scale).log())


class LinearGaussianEmission(nn.Module):
    """p(x_t | z_t) = N(H z_t + b, diag(σ²))."""

    def __init__(self, latent_dim: int, obs_dim: int):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.obs_dim = check_dim("obs_dim", obs_dim)
        self.H = nn.Parameter(torch.randn(obs_dim, latent_dim) / latent_dim**0.5)
        self.bias = nn.Parameter(torch.zeros(obs_dim))
        self.log_scale = nn.Parameter(torch.zeros(obs_dim))

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        """:param z: ``(..., Z)``. :returns: a Normal with event shape ``(X,)``."""
        loc = z @ self.H.T + self.bias  # (..., X)
        return dist.Normal(loc, self.log_scale.exp().expand(loc.shape)).to_event(1)


class StudentTEmission(LearnedDF, _Scale, _MLPMean):
    """p(x_t | z_t) = StudentT(ν, W z_t + f(z_t), diag σ), heavy-tailed per dimension.

    :param df: ``"learned"`` for a learned ν > 2 per dimension (so the mean and
        variance exist), or a fixed float > 0.
    :param scale_gain: the gain of the learned log σ, as :class:`GaussianMLPEmission`'s.
    """

    def __init__(
        self,
        latent_dim: int,
        obs_dim: int,
        hidden: Sequence[int] = (64, 64),
        df: float | str = "learned",
        scale_gain: float = DEFAULT_SCALE_GAIN,
    ):
        super().__init__(latent_dim, obs_dim, hidden)
        self._init_scale(obs_dim, "learned", scale_gain)
        self._init_df(df, obs_dim)

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        """:param z: ``(..., Z)``. :returns: a StudentT with event shape ``(X,)``."""
        loc = self.mean_path(z)  # (..., X)
        df = self.degrees_of_freedom().to(loc.dtype).expand(loc.shape)
        return dist.StudentT(df, loc, self.log_scale.exp().expand(loc.shape)).to_event(1)


class BernoulliEmission(_MLPMean):
    """p(x_t | z_t) = Π_i Bernoulli(x_ti; sigmoid(W z_t + f(z_t))_i), for binary observations.

    Observations must be 0 or 1 on observed steps; :meth:`check_obs` says which are not.
    They are modelled as they are, so the workflow does not normalise them (``real_valued``).
    """

    real_valued = False

    def __init__(self, latent_dim: int, obs_dim: int, hidden: Sequence[int] = (64, 64)):
        super().__init__(latent_dim, obs_dim, hidden)

    def check_obs(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Refuse observed values other than 0 and 1.

        Pyro's own check of the Bernoulli's support runs only while validation is
        on, inside a step, and never on the batched training path
        (:mod:`pyro_worldmodel.infer.batched`), which builds its distributions from checked
        inputs without validation; this one runs whenever
        :meth:`WorldModel.check_inputs <pyro_worldmodel.model.WorldModel.check_inputs>`
        checks values, e.g. in :func:`~pyro_worldmodel.fit` before the first step.
        Normalised observations fail it: a Bernoulli emission reads raw binary data.

        :param obs: ``(B, T, X)``; :param mask: ``(B, T)`` bool, all True if None.
        """
        bad_value = (obs != 0) & (obs != 1)  # (B, T, X)
        bad = bad_value.any(-1)  # (B, T)
        if mask is not None:
            bad = bad & mask
        if bad.any():
            b, t = bad.nonzero()[0].tolist()
            d = int(bad_value[b, t].nonzero()[0])
            raise ValueError(
                f"obs: expected 0 or 1 on observed steps for a {type(self).__name__}, got"
                f" {obs[b, t, d].item():.6g} at episode {b}, step {t}, dimension {d}"
                f" ({int(bad.sum())} steps with other values); a Bernoulli emission"
                " reads raw binary observations, not normalised ones"
            )

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        """:param z: ``(..., Z)``. :returns: Bernoullis with event shape ``(X,)``; the mean is p."""
        return dist.Bernoulli(logits=self.mean_path(z)).to_event(1)
