"""Episodes from gymnasium environments: collection, storage, splits and batches.

This is the only module that imports gymnasium. An episode of length T keeps
T observations x_t, the T actions a_t taken after seeing them, T rewards, the
final observation, and gymnasium's ``terminated`` / ``truncated`` flags.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write, check_env_id
from ..spaces import INT_DTYPES, ActionSpace, check_bounds

EPISODES_FORMAT = "pyro_worldmodel.episodes/1"
# Fields of Episodes with one row per episode; the rest describe the whole set.
_PER_EPISODE = ("obs", "actions", "rewards", "mask", "terminated", "truncated", "final_obs")
# Per-episode fields that only episodes with frames hold.
_FRAME_FIELDS = ("frames", "final_frames")
# The fields indexed by step as well as by episode: padded in time, cut with the episodes.
_IN_TIME = ("obs", "actions", "rewards", "mask", "frames", "state")
# Channels of a frame: 1 (grayscale) or 3 (RGB).
_CHANNELS = (1, 3)
# The dtypes numpy can save and torch computes with; bfloat16 has no numpy dtype.
_FLOAT_DTYPES = (torch.float16, torch.float32, torch.float64)
# The integer dtypes torch compares and indexes with; its uint16/32/64 support little else.
# A dimension read from a file sizes the networks built for it (a one-hot per discrete
# action); a forged one must not make them allocate gigabytes.
MAX_ACTION_DIM = 2**20
# gymnasium's functional environments, which step jax arrays rather than numpy ones.


@dataclass
class Normalizer:
    """Per-dimension affine maps to and from the units the model trains in.

    ``normalize(x) = (x - loc) / scale``. Box actions are normalised too;
    discrete actions are left as they are (``action_loc`` is None). Rewards
    are normalised when ``reward_loc`` is set; a constant reward (CartPole's
    +1) is only centred, with ``reward_scale`` 1.
    """

    obs_loc: torch.Tensor  # (X,)
    obs_scale: torch.Tensor  # (X,)
    action_loc: torch.Tensor | None = None  # (A,)
    action_scale: torch.Tensor | None = None  # (A,)
    reward_loc: torch.Tensor | None = None  # ()
    reward_scale: torch.Tensor | None = None  # ()

    def obs(self, x: torch.Tensor) -> torch.Tensor:
        """Real units → model units, for ``(..., X)``; integer ``x`` gives the statistics' dtype."""
        x = _floating(x, self.obs_loc)
        return (x - self.obs_loc.to(x)) / self.obs_scale.to(x)

    def obs_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Model units → real units, for ``(..., X)``."""
        x = _floating(x, self.obs_loc)
        return x * self.obs_scale.to(x) + self.obs_loc.to(x)

    def actions(self, a: torch.Tensor) -> torch.Tensor:
        """Real units → model units for box actions; discrete actions unchanged."""
        if self.action_loc is None:
            return a
        a = _floating(a, self.action_loc)
        return (a - self.action_loc.to(a)) / self.action_scale.to(a)

    def actions_inverse(self, a: torch.Tensor) -> torch.Tensor:
        """Model units → real units for box actions; discrete actions unchanged."""
        if self.action_loc is None:
            return a
        a = _floating(a, self.action_loc)
        return a * self.action_scale.to(a) + self.action_loc.to(a)

    def rewards(self, r: torch.Tensor) -> torch.Tensor:
        """Real units → model units for rewards (unchanged without reward statistics)."""
        if self.reward_loc is None:
            return r
        r = _floating(r, self.reward_loc)
        return (r - self.reward_loc.to(r)) / self.reward_scale.to(r)

    def rewards_inverse(self, r: torch.Tensor) -> torch.Tensor:
        """Model units → real units for rewards."""
        if self.reward_loc is None:
            return r
        r = _floating(r, self.reward_loc)
        return r * self.reward_scale.to(r) + self.reward_loc.to(r)

    def action_space(self, space: ActionSpace) -> ActionSpace:
        """``space`` in model units: a box's bounds mapped as :meth:`actions` maps
        actions (an infinite bound stays infinite). Discrete spaces, unbounded
        boxes and a normaliser without action statistics return ``space``.

        A bounded policy such as :class:`~pyro_worldmodel.model.components.TanhNormalPolicy`
        needs its bounds in the units it is trained in.
        """
        if space.kind != "box" or self.action_loc is None or (space.low is None and space.high is None):
            return space
        if tuple(self.action_loc.shape) != (space.dim,):
            raise ValueError(
                f"space: expected {tuple(self.action_loc.shape)[0]} action dimensions as this"
                f" normaliser has, got {space}"
            )

        def mapped(bound):  # in float64, as the bounds are Python floats
            if bound is None:
                return None
            return tuple(self.actions(torch.tensor(bound, dtype=torch.float64)).tolist())

        return ActionSpace.box(space.dim, mapped(space.low), mapped(space.high))


def _floating(x: torch.Tensor, stat: torch.Tensor) -> torch.Tensor:
    """``x`` in a floating dtype: its own if it has one, else the statistic's.

    ``stat.to(x)`` casts the statistics to x's dtype: for integer observations a
    loc of 0.5 and a scale of 0.25 would become 0 and 0.
    """
    if x.is_floating_point():
        return x
    return x.to(stat.dtype if stat.is_floating_point() else torch.get_default_dtype())


@dataclass
class Episodes:
    """N episodes padded to the longest, T steps.

    Every construction is checked, vectorised over the steps: dtypes and shapes,
    at least one episode and one observed step in each, each mask row a run of
    True then False, finite observations, box actions and rewards on observed
    steps, discrete actions in range, finite final observations, a safe
    ``env_id`` and a normaliser that fits the data. Anything else raises a
    ``ValueError`` naming the field and the first bad (episode, step). Values
    on padding are not checked: nothing reads them unmasked.

    :ivar obs: ``(N, T, X)`` float32 observations x_t, zero after each episode
        (float16 and float64 are kept as given); uint8 pixel values, with ``final_obs``
        uint8 too, where frames are the observations (:meth:`frames_as_obs`).
    :ivar actions: ``(N, T, A)`` float32, or ``(N, T)`` int64 for discrete spaces
        (any integer dtype is converted to int64).
    :ivar rewards: ``(N, T)`` float32, the reward after a_t.
    :ivar mask: ``(N, T)`` bool, True on the steps of each episode.
    :ivar terminated: ``(N,)`` bool, the episode ended in a terminal state.
    :ivar truncated: ``(N,)`` bool, the episode was cut off by a time limit.
    :ivar final_obs: ``(N, X)`` the observation after the last action.
    :ivar action_space: the actions' :class:`ActionSpace`.
    :ivar env_id: the gymnasium id the episodes came from, or ``""``.
    :ivar normalizer: statistics the model trains with, from :meth:`fit_normalizer`.
    :ivar frames: ``(N, T, C, H, W)`` uint8 rendered frames (C = 1 grayscale or 3 RGB),
        zero after each episode, or None: what the environment showed at each x_t
        (``collect(pixels=True)``). ``obs`` then keeps the low-dimensional state beside them.
    :ivar final_frames: ``(N, C, H, W)`` uint8, the frame after the last action; set
        with ``frames`` and only with them.
    :ivar obs_image_shape: ``(C, H, W)`` of the frames that uint8 ``obs`` flatten
        (:meth:`frames_as_obs`); None for any other observations.
    :ivar state: ``(N, T, S)`` the low-dimensional observations the frames show, kept
        beside pixel observations for evaluation only (a state probe); None otherwise.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    final_obs: torch.Tensor
    action_space: ActionSpace
    env_id: str = ""
    normalizer: Normalizer | None = None
    frames: torch.Tensor | None = None
    final_frames: torch.Tensor | None = None
    obs_image_shape: tuple[int, int, int] | None = None
    state: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.action_space, ActionSpace):
            raise ValueError(f"action_space: expected an ActionSpace, got {type(self.action_space).__name__}")
        check_env_id(self.env_id)
        for name in _PER_EPISODE:
            if not torch.is_tensor(getattr(self, name)):
                raise ValueError(f"{name}: expected a torch.Tensor, got {type(getattr(self, name)).__name__}")
        self._check_dtypes()
        self._check_shapes()
        self._check_values()
        self._check_frames()
        if self.normalizer is not None:
            _check_normalizer(self.normalizer, self.obs_dim, self.action_space)

    def _check_dtypes(self):
        floats = ("obs", "rewards", "final_obs") + (("actions",) if self.action_space.kind == "box" else ())
        pixels = self.obs.dtype == torch.uint8 and self.final_obs.dtype == torch.uint8
        for name in floats:
            dtype = getattr(self, name).dtype
            if pixels and name in ("obs", "final_obs"):
                continue  # pixel values: frames as the observations (frames_as_obs)
            if dtype not in _FLOAT_DTYPES:
                what = " for a box action space" if name == "actions" else ""
                raise ValueError(
                    f"{name}: expected a real floating dtype (float16, float32 or float64){what}, got {dtype}"
                )
        if self.action_space.kind == "discrete":
            if self.actions.dtype not in INT_DTYPES:
                raise ValueError(
                    f"actions: expected an integer dtype (int8 to int64, or uint8) for"
                    f" {self.action_space.dim} discrete actions, got {self.actions.dtype}"
                )
            self.actions = self.actions.long()
        for name in ("mask", "terminated", "truncated"):
            dtype = getattr(self, name).dtype
            if dtype != torch.bool:
                raise ValueError(f"{name}: expected dtype torch.bool, got {dtype}")

    def _check_shapes(self):
        if self.mask.dim() != 2:
            raise ValueError(f"mask: expected shape (N, T), got {tuple(self.mask.shape)}")
        N, T = self.mask.shape
        if N < 1:
            raise ValueError(f"mask: expected at least one episode, got shape {tuple(self.mask.shape)}")
        if self.obs.dim() != 3 or self.obs.shape[-1] < 1:
            raise ValueError(f"obs: expected shape (N, T, X) with X >= 1, got {tuple(self.obs.shape)}")
        X = self.obs.shape[-1]
        expected = {
            "obs": (N, T, X),
            "actions": (N, T) if self.action_space.kind == "discrete" else (N, T, self.action_space.dim),
            "rewards": (N, T),
            "terminated": (N,),
            "truncated": (N,),
            "final_obs": (N, X),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(getattr(self, name).shape)}")

    def _check_values(self):
        mask = self.mask  # (N, T)
        holes = mask[:, 1:] & ~mask[:, :-1]  # (N, T - 1)
        if holes.any():
            b, t = _first(holes)
            raise ValueError(
                "mask: expected each row to be a prefix of True values (an episode, then padding), got"
                f" True after False in {int(holes.any(1).sum())} episodes (first at episode {b},"
                f" step {t + 1})"
            )
        empty = ~mask[:, 0] if mask.shape[1] else torch.ones(len(mask), dtype=torch.bool)  # (N,)
        if empty.any():
            raise ValueError(
                "mask: expected at least one observed step per episode, got none in episodes"
                f" {_some(empty.nonzero().flatten().tolist())}"
            )
        for name in ("obs", "rewards") + (("actions",) if self.action_space.kind == "box" else ()):
            value = getattr(self, name)
            bad = ~torch.isfinite(value)
            bad = (bad.any(-1) if value.dim() == 3 else bad) & mask  # (N, T)
            if bad.any():
                b, t = _first(bad)
                raise ValueError(
                    f"{name}: expected finite values on observed steps, got {int(bad.sum())} steps"
                    f" with NaN or inf (first at episode {b}, step {t})"
                )
        if self.action_space.kind == "discrete":
            n = self.action_space.dim
            bad = mask & ((self.actions < 0) | (self.actions >= n))  # (N, T)
            if bad.any():
                b, t = _first(bad)
                raise ValueError(
                    f"actions: expected integers in [0, {n}) on observed steps, got {int(bad.sum())}"
                    f" steps outside it (first {int(self.actions[b, t])} at episode {b}, step {t})"
                )
        bad = ~torch.isfinite(self.final_obs).all(-1)  # (N,)
        if bad.any():
            raise ValueError(
                f"final_obs: expected finite values, got {int(bad.sum())} episodes with NaN or inf"
                f" (first at episode {int(bad.byte().argmax())})"
            )

    def _check_frames(self):
        shape = self.obs_image_shape
        if self.pixel_obs or shape is not None:
            ok = (
                isinstance(shape, tuple)
                and len(shape) == 3
                and all(isinstance(v, int) and v >= 1 for v in shape)
                and shape[0] in _CHANNELS
            )
            if not ok or not self.pixel_obs or math.prod(shape) != self.obs_dim:
                raise ValueError(
                    f"obs_image_shape: expected (C, H, W) with C·H·W = obs_dim = {self.obs_dim} for uint8"
                    f" pixel observations, and None otherwise; got {shape!r} with {self.obs.dtype} obs"
                )
        if self.state is not None:
            if not self.pixel_obs:
                raise ValueError("state: expected None unless the observations are frames (frames_as_obs)")
            if not torch.is_tensor(self.state) or self.state.dtype not in _FLOAT_DTYPES:
                raise ValueError(
                    f"state: expected a floating tensor, got {getattr(self.state, 'dtype', self.state)}"
                )
            if self.state.dim() != 3 or tuple(self.state.shape[:2]) != tuple(self.mask.shape):
                raise ValueError(
                    f"state: expected shape (N, T, S) = ({len(self)}, {self.mask.shape[1]}, S), got"
                    f" {tuple(self.state.shape)}"
                )
        if (self.frames is None) != (self.final_frames is None):
            given, missing = (
                ("frames", "final_frames") if self.final_frames is None else ("final_frames", "frames")
            )
            raise ValueError(f"{missing}: expected a tensor as {given} is set, got None")
        if self.frames is None:
            return
        N, T = self.mask.shape
        for name in _FRAME_FIELDS:
            value = getattr(self, name)
            if not torch.is_tensor(value):
                raise ValueError(f"{name}: expected a torch.Tensor of uint8, got {type(value).__name__}")
            if value.dtype != torch.uint8:
                raise ValueError(
                    f"{name}: expected dtype torch.uint8 (pixel values 0-255), got {value.dtype}"
                )
        shape = tuple(self.frames.shape)
        if len(shape) != 5 or shape[:2] != (N, T) or shape[2] not in _CHANNELS or min(shape[3:]) < 1:
            raise ValueError(
                f"frames: expected shape (N, T, C, H, W) = ({N}, {T}, 1 or 3, H, W) with H, W >= 1,"
                f" got {shape}"
            )
        if tuple(self.final_frames.shape) != (N, *shape[2:]):
            raise ValueError(
                f"final_frames: expected shape {(N, *shape[2:])}, got {tuple(self.final_frames.shape)}"
            )

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of the frames, kept beside the observations or as them; None for
        episodes without frames."""
        return tuple(self.frames.shape[2:]) if self.frames is not None else self.obs_image_shape

    @property
    def pixel_obs(self) -> bool:
        """Whether the observations are frames' pixel values (:meth:`frames_as_obs`)."""
        return self.obs.dtype == torch.uint8

    def frames_as_obs(self) -> Episodes:
        """These episodes with their frames as the observations: x_t is the frame flattened
        channel-major, X = C·H·W uint8 pixel values (a view of the frames, not a copy), as the
        image parts read them. The low-dimensional observations are kept as :attr:`state`;
        any normaliser is dropped."""
        if self.frames is None:
            raise ValueError(
                "frames: expected episodes with frames (collect with pixels=True, or --pixels), got none"
            )
        return replace(
            self,
            obs=self.frames.flatten(2),
            final_obs=self.final_frames.flatten(1),
            frames=None,
            final_frames=None,
            normalizer=None,
            obs_image_shape=self.image_shape,
            state=self.obs,
        )

    def _per_episode(self) -> tuple[str, ...]:
        """The per-episode fields these episodes hold."""
        optional = (_FRAME_FIELDS if self.frames is not None else ()) + (
            ("state",) if self.state is not None else ()
        )
        return _PER_EPISODE + optional

    @property
    def obs_dim(self) -> int:
        return self.obs.shape[-1]

    @property
    def lengths(self) -> torch.Tensor:
        """``(N,)`` the number of steps of each episode."""
        return self.mask.sum(1)

    @property
    def continues(self) -> torch.Tensor:
        """``(N, T)`` float32 c_t: 0 at the last step of each terminated episode, else 1.

        A truncated episode (time limit) did not end in a terminal state, so its
        last step continues. Padding is 1 and is masked anyway.
        """
        c = torch.ones(self.mask.shape)
        last = (self.lengths - 1).clamp(min=0)  # (N,)
        rows = torch.arange(len(self))
        c[rows, last] = torch.where(self.terminated, 0.0, 1.0)
        return c

    @property
    def returns(self) -> torch.Tensor:
        """``(N,)`` float32, the undiscounted return of each episode."""
        return torch.where(self.mask, self.rewards, 0.0).sum(1)

    def __add__(self, other: Episodes) -> Episodes:
        """Both sets of episodes, padded to the longer; the action spaces must agree,
        and the normaliser is this one's."""
        if not isinstance(other, Episodes):
            return NotImplemented
        if other.action_space != self.action_space or other.obs_dim != self.obs_dim:
            raise ValueError(
                f"other: expected episodes with {self.obs_dim}-dimensional observations and"
                f" {self.action_space}, got {other.obs_dim} and {other.action_space}"
            )
        if (other.state is None) != (self.state is None):
            raise ValueError("other: expected episodes that both keep their state beside frames, or neither")
        if other.image_shape != self.image_shape:
            raise ValueError(
                f"other: expected episodes with frames of shape {self.image_shape}, got {other.image_shape}"
            )
        T = max(self.mask.shape[1], other.mask.shape[1])

        def pad(x):
            extra = T - x.shape[1]
            return torch.cat([x, x.new_zeros((x.shape[0], extra, *x.shape[2:]))], 1) if extra else x

        joined = {
            name: torch.cat([pad(getattr(self, name)), pad(getattr(other, name))])
            if name in _IN_TIME
            else torch.cat([getattr(self, name), getattr(other, name)])
            for name in self._per_episode()
        }
        return replace(self, **joined)

    def __getitem__(self, index) -> Episodes:
        """The episodes at ``index`` (an int, slice, list or tensor of indices)."""
        if isinstance(index, int):
            index = [index]
        per_episode = {name: getattr(self, name)[index] for name in self._per_episode()}
        if len(per_episode["mask"]) == 0:
            raise ValueError(f"index: expected at least one of the {len(self)} episodes, got none")
        T = int(per_episode["mask"].sum(1).max())
        for name in _IN_TIME:
            if name in per_episode:
                per_episode[name] = per_episode[name][:, :T]
        return replace(self, **per_episode)

    def split(self, val_fraction: float = 0.2, *, seed: int = 0) -> tuple[Episodes, Episodes]:
        """Training and validation sets, split by whole episodes at random."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
        N = len(self)
        n_val = int(round(val_fraction * N))
        if n_val == 0 or n_val == N:
            raise ValueError(
                f"val_fraction: {val_fraction} of {N} episodes leaves an empty split; collect more"
            )
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        return self[perm[n_val:].sort().values], self[perm[:n_val].sort().values]

    def fit_normalizer(self, min_obs_scale=None, *, scale_obs: bool = True) -> Episodes:
        """These episodes with a :class:`Normalizer` fitted to their observed steps.

        :param min_obs_scale: ``(X,)`` floors of the observation scales, e.g.
            :func:`observation_scale_floor`: data from random actions can span a
            sliver of what a planner will reach (CartPole's cart position), and
            states 30 scales out are far outside what the networks were fitted on.
        :param scale_obs: False to leave observations as they are (loc 0, scale 1):
            binary observations, for a Bernoulli emission, must stay 0 or 1.
        """
        obs = self.obs[self.mask] if scale_obs else None  # (n, X)
        X = self.obs.shape[-1]
        stat = dict(dtype=self.obs.dtype if self.obs.is_floating_point() else torch.float32)
        action_loc = action_scale = None
        if self.action_space.kind == "box":
            actions = self.actions[self.mask]  # (n, A)
            action_loc, action_scale = actions.mean(0), actions.std(0).clamp(min=1e-6)
        rewards = self.rewards[self.mask]  # (n,)
        reward_scale = rewards.std() if len(rewards) > 1 else torch.tensor(0.0)
        reward_scale = torch.where(
            reward_scale > 1e-6, reward_scale, torch.tensor(1.0)
        )  # constant: centre only
        if self.pixel_obs and scale_obs:
            raise ValueError(
                "scale_obs: expected False for pixel observations, which the image parts read as"
                " pixel values 0-255, got True"
            )
        return replace(
            self,
            normalizer=Normalizer(
                obs.mean(0) if scale_obs else torch.zeros(X, **stat),
                _floored(obs.std(0).clamp(min=1e-6), min_obs_scale) if scale_obs else torch.ones(X, **stat),
                action_loc,
                action_scale,
                rewards.mean(),
                reward_scale,
            ),
        )

    def normalized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(obs, actions, mask)`` in model units, ready for :func:`~pyro_worldmodel.fit`."""
        if self.normalizer is None:
            raise ValueError("normalizer: expected one fitted by fit_normalizer(), got None")
        m = self.mask.unsqueeze(-1)
        if self.pixel_obs:  # pixel values stay uint8, a quarter of float32: the model converts each batch
            obs = torch.where(m, self.obs, self.obs.new_zeros(()))
        else:
            obs = torch.where(m, self.normalizer.obs(self.obs), 0.0)
        actions = self.actions
        if self.action_space.kind == "box":
            actions = torch.where(m, self.normalizer.actions(actions), 0.0)
        return obs, actions, self.mask

    def in_model_units(self) -> Episodes:
        """These episodes with observations, box actions and rewards mapped by the
        normaliser (zero on padding), and no normaliser left to apply."""
        obs, actions, mask = self.normalized()
        rewards, _ = self.targets()
        return replace(self, obs=obs, actions=actions, rewards=rewards, normalizer=None)

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rewards, continues)`` ``(N, T)`` for the reward and continue heads, the
        rewards in model units when the normaliser has reward statistics."""
        rewards = self.rewards if self.normalizer is None else self.normalizer.rewards(self.rewards)
        return torch.where(self.mask, rewards, 0.0), self.continues

    def windows(
        self,
        length: int,
        num: int,
        *,
        generator: torch.Generator | None = None,
        targets: bool = False,
        frames: bool = False,
    ):
        """``num`` random windows of ``length`` steps, as Dreamer trains on.

        Each starts at a uniformly drawn observed step of a uniformly drawn
        episode; a window that runs past its episode's end is masked there.
        Windows are cut from the tensors as they are: call it on episodes in
        model units to get windows in model units.

        :param targets: also return the windows' rewards and continue flags.
        :param frames: return the windows' frames ``(num, length, C, H, W)`` uint8 in place
            of ``obs``: only the windows' frames are gathered, never the whole set.
        :returns: ``(obs, actions, mask)`` of shapes ``(num, length, ...)``, then
            ``rewards`` and ``continues`` ``(num, length)`` with ``targets``.
        """
        if frames and self.frames is None:
            raise ValueError("frames: expected episodes with frames (collect(pixels=True)), got none")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length: expected a positive int, got {length!r}")
        if not isinstance(num, int) or num < 1:
            raise ValueError(f"num: expected a positive int, got {num!r}")
        episode = torch.randint(len(self), (num,), generator=generator)
        start = (torch.rand(num, generator=generator) * self.lengths[episode]).long()  # (num,)
        t = start[:, None] + torch.arange(length)  # (num, length)
        inside = t < self.lengths[episode][:, None]
        t = t.clamp(max=self.mask.shape[1] - 1)
        rows = episode[:, None]
        if frames:
            obs = torch.where(inside[:, :, None, None, None], self.frames[rows, t], 0)
        else:
            obs = torch.where(inside[..., None], self.obs[rows, t], self.obs.new_zeros(()))
        actions = self.actions[rows, t]
        actions = torch.where(inside[..., None] if actions.dim() == 3 else inside, actions, 0)
        if not targets:
            return obs, actions, inside
        rewards = torch.where(inside, self.rewards[rows, t], 0.0)
        continues = torch.where(inside, self.continues[rows, t], 1.0)
        return obs, actions, inside, rewards, continues

    def save(self, path) -> Path:
        """Write to a ``.npz`` file, atomically. :returns: the path."""
        path = Path(path)
        arrays = {name: getattr(self, name).numpy() for name in self._per_episode()}
        arrays["format"] = np.array(EPISODES_FORMAT)
        arrays["env_id"] = np.array(self.env_id)
        arrays["action_kind"] = np.array(self.action_space.kind)
        arrays["action_dim"] = np.array(self.action_space.dim)
        for bound in ("low", "high"):
            value = getattr(self.action_space, bound)
            if value is not None:
                arrays[f"action_{bound}"] = np.array(value)
        if self.obs_image_shape is not None:
            arrays["obs_image_shape"] = np.array(self.obs_image_shape, dtype=np.int64)
        if self.normalizer is not None:
            for f in fields(Normalizer):
                value = getattr(self.normalizer, f.name)
                if value is not None:
                    arrays[f"normalizer_{f.name}"] = value.numpy()

        # Frames are compressed: rendered classic-control scenes are mostly background, and
        # 64x64 frames of Pendulum-v1 shrink about 50 times, of CartPole-v1 about 100.
        save = np.savez_compressed if self.frames is not None or self.pixel_obs else np.savez
        atomic_write(path, lambda f: save(f, **arrays))
        return path

    @classmethod
    def load(cls, path) -> Episodes:
        """Read a file written by :meth:`save`; never unpickles objects.

        Every refusal is a ``ValueError`` naming the file and, where one key is
        at fault, that key; a missing file raises ``FileNotFoundError``. Keys
        this format does not define are ignored, unread. Positions in messages
        (episode, step) are the file's indices.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"path: expected an episodes .npz file path, got {type(path).__name__}")
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"path: expected an episodes .npz file, got a directory {path}")
        data = _read_npz(path, _FILE_KEYS)
        fmt = data.get("format")
        if fmt is None or _string(fmt) != EPISODES_FORMAT:
            got = "no format key" if fmt is None else f"format {_describe(fmt)}"
            raise ValueError(f"path: expected a {EPISODES_FORMAT} file, got {path} ({got})")
        missing = [k for k in (*_PER_EPISODE, "env_id", "action_kind", "action_dim") if k not in data]
        if missing:
            raise ValueError(
                f"path: {path}: expected the keys of a {EPISODES_FORMAT} file, but it lacks {missing}"
            )

        def refuse(key, expected):
            return ValueError(f"path: {path}: {key}: expected {expected}, got {_describe(data[key])}")

        env_id, kind = _string(data["env_id"]), _string(data["action_kind"])
        if env_id is None:
            raise refuse("env_id", "a string")
        if kind not in ("box", "discrete"):
            raise refuse("action_kind", "'box' or 'discrete'")
        dim = data["action_dim"]
        if dim.shape != () or dim.dtype.kind not in "iu" or not 1 <= int(dim) <= MAX_ACTION_DIM:
            raise refuse("action_dim", f"a positive int of at most {MAX_ACTION_DIM}")
        bounds = {}
        for key in ("action_low", "action_high"):
            if key not in data:
                continue
            if kind == "discrete":
                raise refuse(key, "no bounds for discrete actions")
            if data[key].ndim != 1 or data[key].dtype.kind not in "iuf":
                raise refuse(key, f"a vector of {int(dim)} real numbers")
            bounds[key] = data[key].tolist()
        try:
            low, high = check_bounds(
                bounds.get("action_low"), bounds.get("action_high"), int(dim), ("action_low", "action_high")
            )
        except ValueError as e:
            raise ValueError(f"path: {path}: {e}") from None

        image_shape = None
        if "obs_image_shape" in data:
            value = data["obs_image_shape"]
            if (
                value.shape != (3,)
                or value.dtype.kind not in "iu"
                or not (1 <= value).all()
                or (value > 2**16).any()
            ):
                raise refuse("obs_image_shape", "(C, H, W), three positive ints")
            image_shape = tuple(int(v) for v in value)
        tensors = {}
        for key in (*_PER_EPISODE, *_FRAME_FIELDS, "state", *_NORMALIZER_KEYS):
            if key not in data:
                continue
            if data[key].dtype.kind not in "biufc":
                raise refuse(key, "an array of numbers")
            try:
                tensors[key] = torch.from_numpy(data[key])
            except TypeError:  # a dtype torch has no counterpart of, such as float128
                raise refuse(key, "an array of numbers") from None
        normalizer = None
        if any(k in tensors for k in _NORMALIZER_KEYS):
            normalizer = Normalizer(
                **{f.name: tensors.get(f"normalizer_{f.name}") for f in fields(Normalizer)}
            )
        try:
            return cls(
                **{name: tensors[name] for name in _PER_EPISODE},
                action_space=ActionSpace(kind, int(dim), low, high),
                env_id=env_id,
                normalizer=normalizer,
                **{name: tensors.get(name) for name in _FRAME_FIELDS},
                obs_image_shape=image_shape,
                state=tensors.get("state"),
            )
        except ValueError as e:
            raise ValueError(f"path: {path}: {e}") from None


_NORMALIZER_KEYS = tuple(f"normalizer_{f.name}" for f in fields(Normalizer))
# Every key Episodes.save writes; a reader that asks for no others never reads junk.
_FILE_KEYS = (
    *_PER_EPISODE,
    *_FRAME_FIELDS,
    "obs_image_shape",
    "state",
    "format",
    "env_id",
    "action_kind",
    "action_dim",
    "action_low",
    "action_high",
    *_NORMALIZER_KEYS,
)


def _first(bad: torch.Tensor) -> tuple[int, int]:
    """(row, column) of the first True of a ``(N, T)`` bool tensor, in row-major order."""
    # argmax returns the first of equal maxima
    flat = int(bad.reshape(-1).byte().argmax())
    return divmod(flat, bad.shape[1])


def _some(indices: list[int], shown: int = 10) -> str:
    """``[1, 4]``, or ``[1, 4, ...] (37 in all)`` when there are many."""
    if len(indices) <= shown:
        return str(indices)
    return f"[{', '.join(map(str, indices[:shown]))}, ...] ({len(indices)} in all)"


def _check_normalizer(normalizer, obs_dim: int, space: ActionSpace) -> None:
    """``ValueError`` unless ``normalizer`` maps data of these sizes: shapes, finite
    statistics, scales > 0, and no action statistics for discrete actions."""
    if not isinstance(normalizer, Normalizer):
        raise ValueError(f"normalizer: expected a Normalizer, got {type(normalizer).__name__}")
    shapes = {"obs": (obs_dim,), "action": (space.dim,), "reward": ()}
    for part, shape in shapes.items():
        loc, scale = getattr(normalizer, f"{part}_loc"), getattr(normalizer, f"{part}_scale")
        if part == "action" and space.kind == "discrete":
            for name, value in ((f"{part}_loc", loc), (f"{part}_scale", scale)):
                if value is not None:
                    raise ValueError(
                        f"normalizer.{name}: expected None for {space.dim} discrete actions, got"
                        f" {_describe_tensor(value)}"
                    )
            continue
        if loc is None and scale is None and part != "obs":
            continue  # left as they are
        for name, value in ((f"{part}_loc", loc), (f"{part}_scale", scale)):
            if not torch.is_tensor(value):
                why = f" as {part}_loc is set" if name.endswith("scale") and loc is not None else ""
                why = f" as {part}_scale is set" if name.endswith("loc") and scale is not None else why
                raise ValueError(
                    f"normalizer.{name}: expected a tensor of shape {shape}{why}, got {type(value).__name__}"
                )
            if value.dtype not in _FLOAT_DTYPES:
                raise ValueError(
                    f"normalizer.{name}: expected a real floating dtype (float16, float32 or float64),"
                    f" got {value.dtype}"
                )
            if tuple(value.shape) != shape:
                raise ValueError(f"normalizer.{name}: expected shape {shape}, got {tuple(value.shape)}")
            bad = ~torch.isfinite(value) if name.endswith("loc") else ~(torch.isfinite(value) & (value > 0))
            if bad.any():
                expected = "finite values" if name.endswith("loc") else "finite values > 0"
                if not shape:
                    raise ValueError(f"normalizer.{name}: expected {expected}, got {value.item()!r}")
                i = int(bad.reshape(-1).byte().argmax())
                raise ValueError(
                    f"normalizer.{name}: expected {expected}, got {int(bad.sum())} that are not"
                    f" (first {value[i].item()!r} at index {i})"
                )


def _describe_tensor(value) -> str:
    if not torch.is_tensor(value):
        return type(value).__name__
    if value.dim() == 0:
        return f"{value.item()!r}"
    return f"a tensor of shape {tuple(value.shape)}"


def _describe(array: np.ndarray) -> str:
    """What a value read from a file is, briefly: ``'box'``, ``int64 3``, ``a (2,) array of float64``."""
    if array.shape == ():
        value = array.item()
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return shown if array.dtype.kind == "U" else f"{array.dtype} {shown}"
    return f"a {array.shape} array of {array.dtype}"


def _string(array: np.ndarray) -> str | None:
    """The string a 0-d str array holds, else None."""
    if array.shape != () or array.dtype.kind != "U":
        return None
    return str(array.item())


def _read_npz(path: Path, keys) -> dict[str, np.ndarray]:
    """The arrays of ``keys`` that the ``.npz`` file at ``path`` holds, read without
    unpickling and without trusting the sizes its headers declare.

    :raises ValueError: for anything but a readable zip of ``.npy`` arrays.
    :raises FileNotFoundError: when there is no file at ``path``.
    """
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(
            f"path: expected a readable episodes .npz file, got {path} ({e.strerror or e})"
        ) from None

    def corrupt(e, key=None):
        where = f"{key}: " if key else ""
        return ValueError(
            f"path: expected a readable {EPISODES_FORMAT} .npz file, but {path} is truncated or"
            f" corrupted ({where}{type(e).__name__}: {e})"
        )

    data = {}
    with file:
        try:
            archive = zipfile.ZipFile(file)
        except Exception as e:  # BadZipFile, EOFError, OSError, ...
            raise corrupt(e) from e
        with archive:
            members = {}
            for info in archive.infolist():
                name = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
                members[name] = info
            for key in keys:
                if key in members:
                    data[key] = _read_member(archive, members[key], key, path, corrupt)
    return data


def _read_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, path: Path, corrupt
) -> np.ndarray:
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:  # 3.0 only adds utf-8 field names, for structured dtypes no key may hold
                raise ValueError(f"unsupported .npy format version {version}")
            if dtype.hasobject:
                raise _Refused(
                    f"path: {path}: {key}: expected an array of numbers or a string, got an array of"
                    " Python objects, which are never unpickled (allow_pickle=False)"
                )
            count = math.prod(shape)
            # np.load allocates what the header declares before reading; a forged shape
            # would ask for terabytes, so the data must be there first.
            declared = count * dtype.itemsize
            held = info.file_size - member.tell()
            if declared != held:
                raise ValueError(
                    f"the header declares {shape} {dtype} ({declared} bytes), the file holds {held}"
                )
            raw = member.read()  # checks the CRC at the end
    except _Refused:
        raise
    except Exception as e:  # BadZipFile, zlib.error, EOFError, ValueError from the header, ...
        raise corrupt(e, key) from e
    if dtype.itemsize == 0:
        return np.zeros(shape, dtype)
    array = np.frombuffer(bytearray(raw), dtype=dtype, count=count)  # writable, as torch.from_numpy wants
    if fortran:
        array = array.reshape(shape, order="F").copy(order="C")
    else:
        array = array.reshape(shape)
    if dtype.kind in "biufc" and not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))  # torch reads native byte order only
    return array


class _Refused(ValueError):
    """A refusal whose message is complete, not a sign of corruption."""


def _floored(scale: torch.Tensor, floor) -> torch.Tensor:
    if floor is None:
        return scale
    floor = torch.as_tensor(floor, dtype=scale.dtype)
    if floor.shape != scale.shape:
        raise ValueError(f"min_obs_scale: expected shape {tuple(scale.shape)}, got {tuple(floor.shape)}")
    return torch.maximum(scale, floor)
