"""Policies π(a_t | z_t)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torch.distributions.transforms import Transform

from ...spaces import ActionSpace
from .nets import check_dim, check_hidden, mlp


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


class TanhNormalPolicy(NormalPolicy):
    """π(a_t | z_t) for a bounded box: a_t = mid + half · tanh(u_t), with
    u_t ~ N(W z_t + f(z_t), diag(σ²)), mid = (high + low) / 2 and half = (high − low) / 2.

    Samples lie in ``[low, high]``. The log-density is by change of variables,
    log N(u; loc, σ²) − Σ log(half · (1 − tanh²(u))) with u = atanh((a − mid) / half).
    Recorded actions may sit exactly on a bound (gymnasium's ``Box.sample``
    returns the bounds; float32 rounds onto them), where that density is
    infinite. So ``log_prob`` first clamps (a − mid) / half into
    ``[-1 + ε, 1 - ε]`` with ε = max(1e-6, 4 · dtype eps): an action on (or
    outside) a bound is scored as the action ε · half inside it. Values
    outside the box are clamped in the same way rather than refused, so
    that masked padding anywhere is harmless; NaN still fails Pyro's
    validation. The density of the latest ``rsample`` is exact, from its cached u.

    :param latent_dim: Z.
    :param action_space: a box with finite bounds, ``low < high`` in every dimension.
    :param hidden: widths of f's hidden layers.
    """

    def __init__(self, latent_dim: int, action_space: ActionSpace, hidden: Sequence[int] = (64,)):
        low, high = _finite_box("action_space", action_space)
        super().__init__(latent_dim, action_space, hidden)  # u's mean and scale, as NormalPolicy
        self.register_buffer("mid", (high + low) / 2)  # (A,)
        self.register_buffer("half_range", (high - low) / 2)  # (A,); nn.Module.half is taken
        # Rounding can put mid + half one ulp outside the box; samples are clamped onto it.
        self.register_buffer("low", low)  # (A,)
        self.register_buffer("high", high)  # (A,)

    def check_actions(self, actions: torch.Tensor, mask: torch.Tensor) -> None:
        """Refuse observed actions outside the box (by more than 1e-5 of its width).

        ``log_prob`` would clamp them silently, which hides actions in the wrong
        units, e.g. normalised actions against a box in real units (map the
        box with :meth:`~pyro_worldmodel.data.Normalizer.action_space`).

        :param actions: ``(B, T, A)``; :param mask: ``(B, T)``.
        """
        tol = 1e-5 * (self.high - self.low)
        outside = ((actions < self.low - tol) | (actions > self.high + tol)).any(-1) & mask
        if outside.any():
            b, t = outside.nonzero()[0].tolist()
            raise ValueError(
                f"actions: expected values in the policy's box [{self.low.tolist()}, {self.high.tolist()}],"
                f" got {actions[b, t].tolist()} at episode {b}, step {t} ({int(outside.sum())} steps"
                " outside); are the actions and the box in the same units? Normalizer.action_space"
                " maps a box into normalised units"
            )

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        """:param z: ``(..., Z)``. :returns: a tanh-squashed Normal with event shape ``(A,)``."""
        base = super().forward(z).base_dist  # N(W z + f(z), diag σ²), batch (..., A)
        squash = TanhToBox(self.mid, self.half_range, self.low, self.high, cache_size=1)
        return dist.TransformedDistribution(base, [squash]).to_event(1)


def _finite_box(name: str, space: ActionSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` of a box with finite bounds and low < high, else a ValueError naming ``name``."""
    ok = space.kind == "box" and space.low is not None and space.high is not None
    if ok:
        low, high = torch.tensor(space.low), torch.tensor(space.high)  # (A,)
        ok = bool(torch.isfinite(low).all() and torch.isfinite(high).all() and (low < high).all())
    if not ok:
        raise ValueError(
            f"{name}: expected a box with finite low < high for a tanh-squashed policy, got {space}"
        )
    return low, high


class TanhToBox(Transform):
    """a = mid + half · tanh(u) elementwise; the inverse clamps a strictly inside the box."""

    domain = constraints.real
    # Not the box: the inverse clamps values outside it instead of refusing them (see TanhNormalPolicy).
    codomain = constraints.real
    bijective = True
    sign = +1

    def __init__(self, mid, half, low, high, cache_size=0):
        super().__init__(cache_size=cache_size)
        self.mid, self.half, self.low, self.high = mid, half, low, high

    def with_cache(self, cache_size=1):
        if self._cache_size == cache_size:
            return self
        return TanhToBox(self.mid, self.half, self.low, self.high, cache_size=cache_size)

    def _call(self, u):
        return torch.clamp(self.mid + self.half * u.tanh(), self.low, self.high)

    def _inverse(self, a):
        eps = max(1e-6, 4 * torch.finfo(a.dtype).eps)  # 1e-6 is 1.0 in half precision
        y = ((a - self.mid) / self.half).clamp(-1 + eps, 1 - eps)
        return torch.atanh(y)

    def log_abs_det_jacobian(self, u, a):
        # log(1 - tanh²(u)) in the form that stays finite for large |u|, as TanhTransform.
        return self.half.log() + 2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))


def auto_policy(latent_dim: int, action_space: ActionSpace, hidden: Sequence[int] = (64,)) -> nn.Module:
    """The default policy for a space: Normal for box, Categorical for discrete."""
    if action_space.kind == "discrete":
        return CategoricalPolicy(latent_dim, action_space, hidden)
    return NormalPolicy(latent_dim, action_space, hidden)
