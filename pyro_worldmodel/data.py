"""Episodes from gymnasium environments: collection, storage, splits and batches.

This is the only module that imports gymnasium. An episode of length T keeps
T observations x_t, the T actions a_t taken after seeing them, T rewards, the
final observation, and gymnasium's ``terminated`` / ``truncated`` flags.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from .inference import atomic_write
from .spaces import ActionSpace

EPISODES_FORMAT = "pyro_worldmodel.episodes/1"
# Fields of Episodes with one row per episode; the rest describe the whole set.
_PER_EPISODE = ("obs", "actions", "rewards", "mask", "terminated", "truncated", "final_obs")


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
        """Real units → model units, for ``(..., X)``."""
        return (x - self.obs_loc.to(x)) / self.obs_scale.to(x)

    def obs_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Model units → real units, for ``(..., X)``."""
        return x * self.obs_scale.to(x) + self.obs_loc.to(x)

    def actions(self, a: torch.Tensor) -> torch.Tensor:
        """Real units → model units for box actions; discrete actions unchanged."""
        if self.action_loc is None:
            return a
        return (a - self.action_loc.to(a)) / self.action_scale.to(a)

    def actions_inverse(self, a: torch.Tensor) -> torch.Tensor:
        """Model units → real units for box actions; discrete actions unchanged."""
        if self.action_loc is None:
            return a
        return a * self.action_scale.to(a) + self.action_loc.to(a)

    def rewards(self, r: torch.Tensor) -> torch.Tensor:
        """Real units → model units for rewards (unchanged without reward statistics)."""
        if self.reward_loc is None:
            return r
        return (r - self.reward_loc.to(r)) / self.reward_scale.to(r)

    def rewards_inverse(self, r: torch.Tensor) -> torch.Tensor:
        """Model units → real units for rewards."""
        if self.reward_loc is None:
            return r
        return r * self.reward_scale.to(r) + self.reward_loc.to(r)

    def action_space(self, space: ActionSpace) -> ActionSpace:
        """``space`` in model units: a box's bounds mapped as :meth:`actions` maps
        actions (an infinite bound stays infinite). Discrete spaces, unbounded
        boxes and a normaliser without action statistics return ``space``.

        A bounded policy such as :class:`~pyro_worldmodel.components.TanhNormalPolicy`
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


@dataclass
class Episodes:
    """N episodes padded to the longest, T steps.

    :ivar obs: ``(N, T, X)`` float32 observations x_t, zero after each episode.
    :ivar actions: ``(N, T, A)`` float32, or ``(N, T)`` int64 for discrete spaces.
    :ivar rewards: ``(N, T)`` float32, the reward after a_t.
    :ivar mask: ``(N, T)`` bool, True on the steps of each episode.
    :ivar terminated: ``(N,)`` bool, the episode ended in a terminal state.
    :ivar truncated: ``(N,)`` bool, the episode was cut off by a time limit.
    :ivar final_obs: ``(N, X)`` the observation after the last action.
    :ivar action_space: the actions' :class:`ActionSpace`.
    :ivar env_id: the gymnasium id the episodes came from, or ``""``.
    :ivar normalizer: statistics the model trains with, from :meth:`fit_normalizer`.
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

    def __post_init__(self):
        N, T = self.mask.shape
        expected = {
            "obs": (N, T, self.obs.shape[-1]),
            "actions": (N, T) if self.action_space.kind == "discrete" else (N, T, self.action_space.dim),
            "rewards": (N, T),
            "terminated": (N,),
            "truncated": (N,),
            "final_obs": (N, self.obs.shape[-1]),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(getattr(self, name).shape)}")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"mask: expected dtype torch.bool, got {self.mask.dtype}")

    def __len__(self) -> int:
        return self.mask.shape[0]

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
        T = max(self.mask.shape[1], other.mask.shape[1])

        def pad(x):
            extra = T - x.shape[1]
            return torch.cat([x, x.new_zeros((x.shape[0], extra, *x.shape[2:]))], 1) if extra else x

        joined = {
            name: torch.cat([pad(getattr(self, name)), pad(getattr(other, name))])
            if name in ("obs", "actions", "rewards", "mask")
            else torch.cat([getattr(self, name), getattr(other, name)])
            for name in _PER_EPISODE
        }
        return replace(self, **joined)

    def __getitem__(self, index) -> Episodes:
        """The episodes at ``index`` (an int, slice, list or tensor of indices)."""
        if isinstance(index, int):
            index = [index]
        per_episode = {name: getattr(self, name)[index] for name in _PER_EPISODE}
        T = int(per_episode["mask"].sum(1).max()) if len(per_episode["mask"]) else 0
        for name in ("obs", "actions", "rewards", "mask"):
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

    def fit_normalizer(self, min_obs_scale=None) -> Episodes:
        """These episodes with a :class:`Normalizer` fitted to their observed steps.

        :param min_obs_scale: ``(X,)`` floors of the observation scales, e.g.
            :func:`observation_scale_floor`: data from random actions can span a
            sliver of what a planner will reach (CartPole's cart position), and
            states 30 scales out are far outside what the networks were fitted on.
        """
        obs = self.obs[self.mask]  # (n, X)
        action_loc = action_scale = None
        if self.action_space.kind == "box":
            actions = self.actions[self.mask]  # (n, A)
            action_loc, action_scale = actions.mean(0), actions.std(0).clamp(min=1e-6)
        rewards = self.rewards[self.mask]  # (n,)
        reward_scale = rewards.std() if len(rewards) > 1 else torch.tensor(0.0)
        reward_scale = torch.where(
            reward_scale > 1e-6, reward_scale, torch.tensor(1.0)
        )  # constant: centre only
        return replace(
            self,
            normalizer=Normalizer(
                obs.mean(0),
                _floored(obs.std(0).clamp(min=1e-6), min_obs_scale),
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
        self, length: int, num: int, *, generator: torch.Generator | None = None, targets: bool = False
    ):
        """``num`` random windows of ``length`` steps, as Dreamer trains on.

        Each starts at a uniformly drawn observed step of a uniformly drawn
        episode; a window that runs past its episode's end is masked there.
        Windows are cut from the tensors as they are: call it on episodes in
        model units to get windows in model units.

        :param targets: also return the windows' rewards and continue flags.
        :returns: ``(obs, actions, mask)`` of shapes ``(num, length, ...)``, then
            ``rewards`` and ``continues`` ``(num, length)`` with ``targets``.
        """
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
        obs = torch.where(inside[..., None], self.obs[rows, t], 0.0)
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
        arrays = {name: getattr(self, name).numpy() for name in _PER_EPISODE}
        arrays["format"] = np.array(EPISODES_FORMAT)
        arrays["env_id"] = np.array(self.env_id)
        arrays["action_kind"] = np.array(self.action_space.kind)
        arrays["action_dim"] = np.array(self.action_space.dim)
        for bound in ("low", "high"):
            value = getattr(self.action_space, bound)
            if value is not None:
                arrays[f"action_{bound}"] = np.array(value)
        if self.normalizer is not None:
            for f in fields(Normalizer):
                value = getattr(self.normalizer, f.name)
                if value is not None:
                    arrays[f"normalizer_{f.name}"] = value.numpy()

        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(cls, path) -> Episodes:
        """Read a file written by :meth:`save`; never unpickles objects."""
        try:
            # An open file, not a path: numpy leaves a path's file open when the zip is bad.
            with open(path, "rb") as file, np.load(file, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except FileNotFoundError:
            raise
        except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, OSError, ...
            raise ValueError(
                f"path: expected a readable {EPISODES_FORMAT} .npz file, but {path} is truncated or"
                f" corrupted ({type(e).__name__}: {e})"
            ) from e
        if str(data.get("format", "")) != EPISODES_FORMAT:
            raise ValueError(f"path: expected a {EPISODES_FORMAT} file, got {path}")
        missing = [k for k in (*_PER_EPISODE, "env_id", "action_kind", "action_dim") if k not in data]
        if missing:
            raise ValueError(f"path: {path} is an incomplete {EPISODES_FORMAT} file; it lacks {missing}")
        space = ActionSpace(
            str(data["action_kind"]),
            int(data["action_dim"]),
            tuple(data["action_low"].tolist()) if "action_low" in data else None,
            tuple(data["action_high"].tolist()) if "action_high" in data else None,
        )
        normalizer = None
        if "normalizer_obs_loc" in data:
            normalizer = Normalizer(
                **{
                    f.name: torch.from_numpy(data[f"normalizer_{f.name}"])
                    if f"normalizer_{f.name}" in data
                    else None
                    for f in fields(Normalizer)
                }
            )
        per_episode = {name: torch.from_numpy(data[name]) for name in _PER_EPISODE}
        return cls(**per_episode, action_space=space, env_id=str(data["env_id"]), normalizer=normalizer)


def _floored(scale: torch.Tensor, floor) -> torch.Tensor:
    if floor is None:
        return scale
    floor = torch.as_tensor(floor, dtype=scale.dtype)
    if floor.shape != scale.shape:
        raise ValueError(f"min_obs_scale: expected shape {tuple(scale.shape)}, got {tuple(floor.shape)}")
    return torch.maximum(scale, floor)


def observation_scale_floor(env_id: str, fraction: float = 0.125) -> torch.Tensor:
    """``(X,)`` ``fraction`` of each observation's range where the environment bounds it, else 0.

    With the default, observations anywhere in a bounded range stay within ±4
    scales of any centre inside it, in model units.
    """
    env = gym.make(env_id)
    try:
        low, high = (
            torch.as_tensor(np.asarray(b, dtype=np.float64))
            for b in (env.observation_space.low, env.observation_space.high)
        )
    finally:
        env.close()
    width = high - low
    return torch.where(torch.isfinite(width), fraction * width, 0.0).float()


Policy = Callable[[np.ndarray], np.ndarray]


def collect(
    env_id: str,
    num_episodes: int,
    *,
    policy: Policy | None = None,
    seed: int = 0,
    num_envs: int = 1,
    max_episode_steps: int | None = None,
    progress: bool = True,
    **env_kwargs,
) -> Episodes:
    """Collect whole episodes from a gymnasium environment.

    :param env_id: any registered id whose observation space is a rank-1 Box
        and whose action space is a rank-1 Box or a Discrete.
    :param num_episodes: how many finished episodes to return.
    :param policy: maps observations ``(num_envs, X)`` to actions
        ``(num_envs, ...)``; uniformly random actions if None.
    :param seed: seeds ``env.reset`` (sub-env i gets ``seed + i``) and the
        action space, so collection is reproducible.
    :param num_envs: environments stepped together, through gymnasium's
        synchronous vector environment.
    :param max_episode_steps: overrides the environment's time limit.
    :param env_kwargs: passed to ``gymnasium.make``.
    """
    if not isinstance(num_episodes, int) or num_episodes < 1:
        raise ValueError(f"num_episodes: expected a positive int, got {num_episodes!r}")
    if not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs: expected a positive int, got {num_envs!r}")
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        raise ValueError(
            f"env_id: expected a registered gymnasium id, got {env_id!r} ({e}). Supported: any id whose"
            " observation space is a rank-1 Box and whose action space is a rank-1 Box or a Discrete,"
            " e.g. Pendulum-v1, CartPole-v1, MountainCarContinuous-v0, Acrobot-v1"
        ) from None
    make_kwargs = dict(env_kwargs)
    if max_episode_steps is not None:
        make_kwargs["max_episode_steps"] = max_episode_steps
    envs = gym.make_vec(
        spec.id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
        **make_kwargs,
    )
    try:
        obs_space = envs.single_observation_space
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise ValueError(
                f"env_id: expected a rank-1 Box observation space, got {obs_space} for {env_id}."
                " Supported: rank-1 Box observations with rank-1 Box or Discrete actions"
            )
        try:
            space = ActionSpace.from_gym(envs.single_action_space)
        except ValueError as e:
            raise ValueError(
                f"env_id: {env_id} has an unsupported action space ({e}). Supported: rank-1 Box"
                " observations with rank-1 Box or Discrete actions"
            ) from None
        envs.action_space.seed(seed)
        obs, _ = envs.reset(seed=seed)
        running = [_Episode(o.copy()) for o in obs]
        done: list[_Episode] = []
        bar = tqdm(total=num_episodes, desc=f"collect {env_id}", disable=not progress)
        while len(done) < num_episodes:
            actions = envs.action_space.sample() if policy is None else np.asarray(policy(obs))
            obs, rewards, terminated, truncated, info = envs.step(actions)
            for i, episode in enumerate(running):
                episode.actions.append(actions[i])
                episode.rewards.append(float(rewards[i]))
                if terminated[i] or truncated[i]:
                    episode.close(info["final_obs"][i], bool(terminated[i]), bool(truncated[i]))
                    if len(done) < num_episodes:
                        done.append(episode)
                        bar.update(1)
                    running[i] = _Episode(obs[i])
                else:
                    episode.obs.append(obs[i])
        bar.close()
    finally:
        envs.close()
    return _pad(done, space, spec.id)


def play(
    env_id: str,
    agent,
    num_episodes: int,
    *,
    seed: int = 0,
    num_envs: int = 1,
    progress: bool = True,
    **env_kwargs,
) -> Episodes:
    """Run an agent for whole episodes, ``num_envs`` environments in lockstep.

    :param agent: has ``reset(obs)`` and ``act(obs) -> actions``, on ``(B, X)``
        observations of B environments that start together; an environment whose
        episode has ended keeps being shown its final observation until the
        others end, and its actions are ignored (e.g. :class:`~pyro_worldmodel.loop.Agent`).
    :param num_episodes: episodes in all, in rounds of at most ``num_envs``.
    :param seed: episode i is reset with ``seed + i``.
    :returns: the episodes, with the agent's actions as taken.
    """
    if not isinstance(num_episodes, int) or num_episodes < 1:
        raise ValueError(f"num_episodes: expected a positive int, got {num_episodes!r}")
    if not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs: expected a positive int, got {num_envs!r}")
    done: list[_Episode] = []
    space = None
    bar = tqdm(total=num_episodes, desc=f"play {env_id}", disable=not progress)
    while len(done) < num_episodes:
        B = min(num_envs, num_episodes - len(done))
        envs = [gym.make(env_id, **env_kwargs) for _ in range(B)]
        try:
            space = ActionSpace.from_gym(envs[0].action_space)
            obs = np.stack([env.reset(seed=seed + len(done) + i)[0] for i, env in enumerate(envs)])
            running = [_Episode(o.copy()) for o in obs]  # copies: obs is overwritten below
            live = [True] * B
            agent.reset(obs)
            while any(live):
                actions = np.asarray(agent.act(obs))
                for i, env in enumerate(envs):
                    if not live[i]:
                        continue
                    o, r, terminated, truncated, _ = env.step(actions[i])
                    running[i].actions.append(actions[i])
                    running[i].rewards.append(float(r))
                    if terminated or truncated:
                        running[i].close(o, bool(terminated), bool(truncated))
                        live[i] = False
                    else:
                        running[i].obs.append(o)
                    obs[i] = o
        finally:
            for env in envs:
                env.close()
        done += running
        bar.update(B)
    bar.close()
    return _pad(done, space, gym.spec(env_id).id)


class _Episode:
    """One episode as it is collected."""

    def __init__(self, first_obs):
        self.obs, self.actions, self.rewards = [first_obs], [], []

    def close(self, final_obs, terminated, truncated):
        self.final_obs, self.terminated, self.truncated = final_obs, terminated, truncated


def _pad(episodes: list[_Episode], space: ActionSpace, env_id: str) -> Episodes:
    N, T = len(episodes), max(len(e.actions) for e in episodes)
    X = len(episodes[0].obs[0])
    obs = np.zeros((N, T, X), np.float32)
    if space.kind == "discrete":
        actions = np.zeros((N, T), np.int64)
    else:
        actions = np.zeros((N, T, space.dim), np.float32)
    rewards = np.zeros((N, T), np.float32)
    mask = np.zeros((N, T), bool)
    for n, e in enumerate(episodes):
        L = len(e.actions)
        obs[n, :L] = np.stack(e.obs)
        actions[n, :L] = np.stack(e.actions)
        rewards[n, :L] = e.rewards
        mask[n, :L] = True
    return Episodes(
        obs=torch.from_numpy(obs),
        actions=torch.from_numpy(actions),
        rewards=torch.from_numpy(rewards),
        mask=torch.from_numpy(mask),
        terminated=torch.tensor([e.terminated for e in episodes]),
        truncated=torch.tensor([e.truncated for e in episodes]),
        final_obs=torch.from_numpy(np.stack([e.final_obs for e in episodes]).astype(np.float32)),
        action_space=space,
        env_id=env_id,
    )
