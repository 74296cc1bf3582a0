"""Action spaces, and the one place where observed inputs are checked.

The inference code never imports gymnasium; it describes actions with
:class:`ActionSpace`, which :meth:`ActionSpace.from_gym` builds from any
object shaped like a gymnasium ``Box`` or ``Discrete`` space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pyro.infer.util import is_validation_enabled


@dataclass(frozen=True)
class ActionSpace:
    """The actions a policy π(a_t | z_t) emits.

    :param kind: ``"box"`` for real vectors of size ``dim``, ``"discrete"``
        for integers in ``[0, dim)``.
    :param dim: the action size (box) or the number of actions (discrete).
    :param low: optional lower bounds of a box, one per dimension.
    :param high: optional upper bounds of a box, one per dimension.
    """

    kind: Literal["box", "discrete"]
    dim: int
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in ("box", "discrete"):
            raise ValueError(f"kind: expected 'box' or 'discrete', got {self.kind!r}")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim: expected a positive int, got {self.dim!r}")
        for name in ("low", "high"):
            bound = getattr(self, name)
            if bound is None:
                continue
            if self.kind == "discrete":
                raise ValueError(f"{name}: discrete spaces take no bounds, got {bound!r}")
            bound = tuple(float(v) for v in bound)
            if len(bound) != self.dim:
                raise ValueError(f"{name}: expected {self.dim} values, got {len(bound)}")
            object.__setattr__(self, name, bound)

    @classmethod
    def box(cls, dim: int, low=None, high=None) -> ActionSpace:
        """Real actions of size ``dim``, optionally bounded."""
        if low is not None and not isinstance(low, (tuple, list)):
            low = (float(low),) * dim
        if high is not None and not isinstance(high, (tuple, list)):
            high = (float(high),) * dim
        return cls("box", dim, low, high)

    @classmethod
    def discrete(cls, n: int) -> ActionSpace:
        """Integer actions in ``[0, n)``."""
        return cls("discrete", n)

    @classmethod
    def from_gym(cls, space) -> ActionSpace:
        """From a gymnasium ``Box`` (rank 1) or ``Discrete`` space, by duck typing."""
        if hasattr(space, "n") and not hasattr(space, "low"):
            if int(getattr(space, "start", 0)) != 0:
                raise ValueError(f"space: expected Discrete starting at 0, got {space}")
            return cls.discrete(int(space.n))
        shape = tuple(getattr(space, "shape", ()) or ())
        if hasattr(space, "low") and len(shape) == 1:
            return cls.box(shape[0], [float(v) for v in space.low], [float(v) for v in space.high])
        raise ValueError(f"space: expected a rank-1 Box or a Discrete space, got {space}")

    @property
    def feature_dim(self) -> int:
        """Size of the real vector that networks see for one action."""
        return self.dim

    def features(self, actions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Actions as network inputs: one-hot for discrete, as they are for box.

        :param actions: ``(B, T)`` integers or ``(B, T, A)`` reals.
        :returns: ``(B, T, A)`` reals of ``dtype``.
        """
        if self.kind == "discrete":
            return F.one_hot(actions, self.dim).to(dtype)
        return actions.to(dtype)


class ChecksInputs:
    """For modules whose Pyro program takes ``(obs, actions, mask)``: they have
    ``obs_dim``, ``action_space`` and at least one parameter."""

    def check_inputs(self, obs, actions, mask=None, *, check_values: bool | None = None):
        """Checked ``(obs, actions, mask)`` on this module's device and dtype; see
        :func:`check_inputs`. Values are checked while Pyro validation is on,
        unless ``check_values`` says otherwise."""
        ref = next(self.parameters())
        if check_values is None:
            check_values = is_validation_enabled()
        return check_inputs(
            obs,
            actions,
            mask,
            obs_dim=self.obs_dim,
            action_space=self.action_space,
            dtype=ref.dtype,
            device=ref.device,
            check_values=check_values,
        )


def check_inputs(
    obs,
    actions,
    mask,
    *,
    obs_dim: int,
    action_space: ActionSpace,
    dtype: torch.dtype,
    device: torch.device,
    check_values: bool = True,
):
    """Check the observed inputs of a model or guide and return clean tensors.

    Shapes are always checked; values (NaN, inf, out-of-range actions) when
    ``check_values``. Each row of ``mask`` must be a run of True then False:
    an episode, then padding. Entries outside the mask are replaced by zeros, so that
    padding can never reach a loss or a gradient.

    :returns: ``obs`` ``(B, T, X)`` of ``dtype``, ``actions`` ``(B, T, A)`` of
        ``dtype`` or ``(B, T)`` long, and ``mask`` ``(B, T)`` bool.
    """
    obs = _as_tensor("obs", obs, device)
    actions = _as_tensor("actions", actions, device)
    if obs.dim() != 3 or obs.shape[-1] != obs_dim:
        raise ValueError(f"obs: expected shape (B, T, {obs_dim}), got {tuple(obs.shape)}")
    if not (obs.is_floating_point() or obs.dtype in _INT_DTYPES):
        raise ValueError(f"obs: expected a real dtype, got {obs.dtype}")
    B, T = obs.shape[:2]
    if B < 1 or T < 1:
        raise ValueError(f"obs: expected B >= 1 and T >= 1, got shape {tuple(obs.shape)}")

    if action_space.kind == "discrete":
        expected = "(B, T)"
        if actions.dim() != 2:
            raise ValueError(
                f"actions: expected shape {expected} for {action_space.dim} discrete actions,"
                f" got {tuple(actions.shape)}"
            )
        if actions.dtype not in _INT_DTYPES:
            raise ValueError(
                f"actions: expected an integer dtype for a discrete action space, got {actions.dtype}"
            )
        actions = actions.long()
    else:
        expected = f"(B, T, {action_space.dim})"
        if actions.dim() != 3 or actions.shape[-1] != action_space.dim:
            raise ValueError(f"actions: expected shape {expected}, got {tuple(actions.shape)}")
        if not actions.is_floating_point():
            raise ValueError(f"actions: expected a floating dtype for a box space, got {actions.dtype}")
        actions = actions.to(dtype)
    if tuple(actions.shape[:2]) != (B, T):
        raise ValueError(f"actions: expected (B, T) = {(B, T)} as in obs, got {tuple(actions.shape[:2])}")

    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
    else:
        mask = _as_tensor("mask", mask, device)
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"mask: expected shape (B, T) = {(B, T)}, got {tuple(mask.shape)}")

    obs = obs.to(dtype)
    if check_values:
        holes = mask[:, 1:] & ~mask[:, :-1]
        if holes.any():
            b, t = holes.nonzero()[0].tolist()
            raise ValueError(
                "mask: expected each row to be a prefix of True values (an episode, then"
                f" padding), got True after False at episode {b}, step {t + 1}"
            )
        _check_finite("obs", obs, mask)
        if action_space.kind == "discrete":
            bad = mask & ((actions < 0) | (actions >= action_space.dim))
            if bad.any():
                b, t = bad.nonzero()[0].tolist()
                raise ValueError(
                    f"actions: expected integers in [0, {action_space.dim}), got"
                    f" {actions[b, t].item()} at episode {b}, step {t}"
                )
        else:
            _check_finite("actions", actions, mask)

    obs = torch.where(mask.unsqueeze(-1), obs, obs.new_zeros(()))
    if action_space.kind == "discrete":
        actions = torch.where(mask, actions, actions.new_zeros(()))
    else:
        actions = torch.where(mask.unsqueeze(-1), actions, actions.new_zeros(()))
    return obs, actions, mask


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _as_tensor(name, value, device):
    if not torch.is_tensor(value):
        try:
            return torch.as_tensor(value, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name}: expected a tensor or array, got {type(value).__name__}") from e
    tensor = value
    if tensor.device != torch.device(device):
        raise ValueError(
            f"{name}: expected a tensor on {torch.device(device)} (the parameters' device),"
            f" got one on {tensor.device}"
        )
    return tensor


def _check_finite(name, value, mask):
    bad = ~torch.isfinite(value)
    if value.dim() == 3:
        bad = bad.any(-1)
    bad = bad & mask
    if bad.any():
        b, t = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{name}: expected finite values where mask is True, got"
            f" {int(bad.sum())} steps with NaN or inf (first at episode {b}, step {t})"
        )
