"""Action spaces, and the one place where observed inputs are checked.

The inference code never imports gymnasium; it describes actions with
:class:`ActionSpace`, which :meth:`ActionSpace.from_gym` builds from any
object shaped like a gymnasium ``Box`` or ``Discrete`` space.
"""

from __future__ import annotations

import math
import numbers
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
    :param low: optional lower bounds of a box, one per dimension; -inf leaves a side open.
    :param high: optional upper bounds of a box, one per dimension, each >= its lower bound.

    Anything else (a bool or float ``dim``, NaN bounds, ``low > high``) raises
    ``ValueError`` naming the field.
    """

    kind: Literal["box", "discrete"]
    dim: int
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.kind, str) or self.kind not in ("box", "discrete"):
            raise ValueError(f"kind: expected 'box' or 'discrete', got {self.kind!r}")
        # a numpy str_ read from a file compares equal, but prints as np.str_('box')
        object.__setattr__(self, "kind", str(self.kind))
        if isinstance(self.dim, bool) or not isinstance(self.dim, numbers.Integral) or self.dim < 1:
            raise ValueError(f"dim: expected a positive int, got {self.dim!r}")
        object.__setattr__(self, "dim", int(self.dim))
        if self.kind == "discrete":
            for name in ("low", "high"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: discrete spaces take no bounds, got {getattr(self, name)!r}")
            return
        low, high = check_bounds(self.low, self.high, self.dim)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @classmethod
    def box(cls, dim: int, low=None, high=None) -> ActionSpace:
        """Real actions of size ``dim``, optionally bounded; a single number bounds every dimension."""
        if isinstance(dim, numbers.Integral) and not isinstance(dim, bool) and dim >= 1:
            low, high = (b if b is None or _is_sequence(b) else (b,) * dim for b in (low, high))
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


def check_bounds(low, high, dim: int, names: tuple[str, str] = ("low", "high")):
    """``(low, high)`` as tuples of ``dim`` floats (either may be None), else ``ValueError``.

    Each bound is a real number or ±inf (an unbounded side); NaN, a wrong length
    and ``low > high`` in any dimension are refused. ``names`` are what the
    messages call the two bounds, e.g. the keys of the file they were read from.
    """
    bounds = []
    for name, bound in zip(names, (low, high)):
        if bound is None:
            bounds.append(None)
            continue
        if not _is_sequence(bound):
            raise ValueError(f"{name}: expected a sequence of {dim} numbers, got {bound!r}")
        if len(bound) != dim:
            raise ValueError(f"{name}: expected {dim} values, got {len(bound)}")
        values = []
        for i, v in enumerate(bound):
            # bool and str convert to floats silently, and a bound is never meant as either
            if isinstance(v, (bool, str, bytes)) or not _is_real(v):
                raise ValueError(f"{name}: expected real numbers, got {v!r} in dimension {i}")
            v = float(v)
            if math.isnan(v):
                raise ValueError(f"{name}: expected numbers or ±inf, got NaN in dimension {i}")
            values.append(v)
        bounds.append(tuple(values))
    low, high = bounds
    if low is not None and high is not None:
        for i, (lo, hi) in enumerate(zip(low, high)):
            if lo > hi:
                raise ValueError(
                    f"{names[0]}: expected {names[0]} <= {names[1]} in every dimension, got"
                    f" {names[0]} {lo} > {names[1]} {hi} in dimension {i}"
                )
    return low, high


def _is_sequence(x) -> bool:
    if isinstance(x, (str, bytes)):
        return False
    try:
        len(x)  # a 0-d array or tensor has __len__ but no length
    except TypeError:
        return False
    return True


def _is_real(v) -> bool:
    if isinstance(v, numbers.Real):
        return True
    if torch.is_tensor(v):
        return v.dim() == 0 and not v.is_complex() and v.dtype != torch.bool
    return False


def check_device(device) -> torch.device | None:
    """``device`` as a :class:`torch.device` if this machine has it, else ``ValueError``.

    None is returned unchanged: callers take it as "leave everything where it is".
    A string must parse (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), and
    an accelerator must be available, with the index (if given) below the number of devices.
    """
    if device is None:
        return None
    if isinstance(device, str):
        try:
            parsed = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(
                f"device: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}"
            ) from None
    elif isinstance(device, torch.device):
        parsed = device
    else:
        raise ValueError(
            f"device: expected a str or torch.device such as 'cpu' or 'cuda:0', got {type(device).__name__}"
        )
    shown = str(device) if isinstance(device, str) else str(parsed)

    def missing(why):
        return ValueError(f"device: expected a device this machine has, got {shown!r} ({why})")

    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise missing("no CUDA device is available")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise missing(f"this machine has {count} CUDA device{'s' if count != 1 else ''}")
        return parsed
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise missing("no MPS device is available")
        return parsed
    if parsed.type == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise missing("no XPU device is available")
        count = torch.xpu.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise missing(f"this machine has {count} XPU device{'s' if count != 1 else ''}")
        return parsed
    # A meta or other backend device holds no data that training or planning could use.
    raise ValueError(
        "device: expected 'cpu', 'cuda', 'mps' or 'xpu', optionally with an index such as 'cuda:1',"
        f" got {shown!r}"
    )


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
    if not (obs.is_floating_point() or obs.dtype in INT_DTYPES):
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
        if actions.dtype not in INT_DTYPES:
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


INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


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


def check_int(name: str, value, low: int) -> int:
    """``value`` if it is an int (not a bool) >= ``low``, else ``ValueError`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def check_real(name: str, value, *, low=None, high=None) -> float:
    """``value`` as a float if it is a finite real number (not a bool) in [``low``, ``high``],
    else ``ValueError`` naming ``name``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        expected = "a finite number"
        if low is not None and high is not None:
            expected += f" in [{low:g}, {high:g}]"
        elif low is not None:
            expected += f" >= {low:g}"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def check_observed(mask) -> None:
    """Refuse a mask with no observed step, where every figure per step would be 0 / 0."""
    if not bool(mask.any()):
        raise ValueError("mask: expected at least one observed step, got none")
