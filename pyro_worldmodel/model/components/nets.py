"""Small building blocks shared by the components."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """A multilayer perceptron with ELU activations and a linear output layer."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ELU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def cat_batched(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate on the last dim after broadcasting all the others.

    Vectorised particles add leading dims to z but not to x or a.
    """
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(*shape, t.shape[-1]) for t in tensors], dim=-1)


def positive(raw: torch.Tensor, min_scale) -> torch.Tensor:
    """A scale from an unconstrained tensor, bounded away from zero.

    :param min_scale: the floor: a float, or a tensor ``(n,)`` of one floor per last-dim
        entry (a :class:`ScaleMap`'s learned one).
    """
    return nn.functional.softplus(raw) + min_scale


def check_dim(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_hidden(hidden: Sequence[int]) -> tuple[int, ...]:
    hidden = tuple(hidden)
    if not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ValueError(f"hidden: expected a sequence of positive ints, got {hidden!r}")
    return hidden


def check_min_scale(value) -> float | str:
    if value == "learned":
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
        raise ValueError(f"min_scale: expected a finite float >= 0 or 'learned', got {value!r}")
    return float(value)


def softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    """The x with softplus(x) = y, for y > 0."""
    return y + torch.log(-torch.expm1(-y))


def set_linear_gaussian(linear: nn.Linear, head: nn.Linear, weight, bias, scale, min_scale: float) -> None:
    """Make ``linear(u)`` equal ``weight @ u + bias`` and zero the MLP's last layer ``head``,
    whose second half then gives the scale: ``positive(head.bias[Z:], min_scale) = scale``."""
    Z = linear.out_features
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
        head.weight.zero_()
        head.bias.zero_()
        if head.out_features == 2 * Z:
            head.bias[Z:] = softplus_inverse((torch.as_tensor(scale) - min_scale).clamp(min=1e-12))


class LearnedDF(nn.Module):
    """Degrees of freedom ν of a Student-t: learned, ν = 2 + softplus(raw) > 2 so the
    mean and variance exist, or fixed. The parameter is ``raw_df``."""

    def _init_df(self, df, dim: int) -> None:
        if df == "learned":
            self.raw_df = nn.Parameter(torch.full((dim,), 1.0))  # ν = 2 + softplus(1) = 3.3 at start
        elif isinstance(df, (int, float)) and not isinstance(df, bool) and 0 < df < float("inf"):
            self.register_buffer("raw_df", None)
        else:
            raise ValueError(f"df: expected 'learned' or a finite positive float, got {df!r}")
        self.df = df
        self._df_dim = dim

    def degrees_of_freedom(self) -> torch.Tensor:
        """ν, ``(dim,)``."""
        if self.df == "learned":
            return 2.0 + nn.functional.softplus(self.raw_df)
        return torch.full((self._df_dim,), float(self.df), device=next(self.parameters()).device)


# Adam moves each parameter by about its learning rate per step, whatever the size of
# its gradient: over the default schedule (1,500 steps, lr 1e-3 decaying to 1e-5) about
# 0.3 in all. A log-scale started at the linear warm start's (a fraction of the
# least-squares one-step error) then stays within 0.3 nats of it, while the trained
# model's own error is often 3 times (1.1 nats) smaller: measured on Pendulum-v1 and
# Acrobot-v1, the 90% intervals of the imagined futures then covered 99-100% at h = 1
# and 97% at h = 15. Stored divided by a gain of 10 (GainedParameter), the log-scale
# moves up to 3 nats.
DEFAULT_SCALE_GAIN = 10.0


# A learned floor starts where the fixed default is, and may fall 3 nats (to 5e-5) over the
# default schedule (its log is a GainedParameter); it never falls below HARD_FLOOR, where
# float32 scales of a unit-variance latent lose their precision.
LEARNED_FLOOR_START = 1e-3
HARD_FLOOR = 1e-6


class ScaleMap(nn.Module):
    """σ = softplus(raw) + floor: a network's raw output made a scale, per dimension.

    The floor is fixed (a float, 1e-3 by default) or learned per dimension
    (``min_scale="learned"``). A fixed floor keeps σ away from zero, where one Adam step
    moves a mean by many standard deviations (about the learning rate, 1e-3 at the
    start) and the KL between two narrow Normals and the log-density of a
    near-deterministic latent jump; but where the data's one-step error is smaller than
    the floor (near-deterministic dynamics in normalised units), the floor, not the data,
    sets the width of every imagined future. A learned floor starts at
    ``LEARNED_FLOOR_START`` and is lowered only as far as the bound gains, as the means
    settle: log(floor − HARD_FLOOR) is a :class:`GainedParameter`, which moves up to
    about 3 nats over the default schedule.

    :param dim: the number of scales.
    :param min_scale: the floor, a float >= 0 or ``"learned"``.
    """

    def __init__(self, dim: int, min_scale=1e-3):
        super().__init__()
        self.min_scale = check_min_scale(min_scale)
        if self.min_scale == "learned":
            self.log_floor = GainedParameter(dim)
            self.log_floor.set(torch.full((dim,), LEARNED_FLOOR_START - HARD_FLOOR).log())

    @property
    def learned(self) -> bool:
        return self.min_scale == "learned"

    def floor(self):
        """The floor: the float, or a ``(dim,)`` tensor when learned."""
        if not self.learned:
            return self.min_scale
        return self.log_floor().exp() + HARD_FLOOR

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """σ from ``raw`` ``(..., dim)``."""
        return positive(raw, self.floor())

    def start(self) -> float:
        """The floor before training: what a warm start subtracts from the scale it sets."""
        return LEARNED_FLOOR_START if self.learned else self.min_scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint written before floors were learned trained with the fixed 1e-3, where
        # a learned floor starts: it loads as that.
        key = prefix + "log_floor.raw"
        if self.learned and key not in state_dict:
            state_dict[key] = torch.full_like(self.log_floor.raw, LEARNED_FLOOR_START - HARD_FLOOR).log() / (
                self.log_floor.gain
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GainedParameter(nn.Module):
    """A learned per-dimension vector stored divided by a gain: :meth:`forward` is ``raw · gain``.

    An optimiser that moves a parameter by about its learning rate per step (Adam)
    then moves the vector ``gain`` times as far.
    """

    def __init__(self, dim: int, gain: float = DEFAULT_SCALE_GAIN):
        super().__init__()
        if not isinstance(gain, (int, float)) or isinstance(gain, bool) or not 0 < gain < float("inf"):
            raise ValueError(f"scale_gain: expected a finite float > 0, got {gain!r}")
        self.gain = float(gain)
        self.raw = nn.Parameter(torch.zeros(dim))

    def forward(self) -> torch.Tensor:
        """The vector, ``(dim,)``."""
        return self.raw * self.gain

    def set(self, value: torch.Tensor) -> None:
        """Make :meth:`forward` return ``value``."""
        with torch.no_grad():
            self.raw.copy_(torch.as_tensor(value) / self.gain)
