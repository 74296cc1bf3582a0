"""Gymnasium environments: collection, play and their spaces. The only module that imports gymnasium."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from ..spaces import ActionSpace
from .episodes import Episodes

_JAX_ENV_MODULES = ("gymnasium.envs.phys2d", "gymnasium.envs.tabular")


def observation_scale_floor(env_id: str, fraction: float = 0.125) -> torch.Tensor:
    """``(X,)`` ``fraction`` of each observation's range where the environment bounds it, else 0.

    With the default, observations anywhere in a bounded range stay within ±4
    scales of any centre inside it, in model units.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < math.inf:
        raise ValueError(f"fraction: expected a finite number > 0, got {fraction!r}")
    spec = _env_spec(env_id)
    with _dependencies(env_id):
        env = gym.make(spec.id)
    try:
        _check_observation_space(env_id, env.observation_space)
        low, high = (
            torch.as_tensor(np.asarray(b, dtype=np.float64))
            for b in (env.observation_space.low, env.observation_space.high)
        )
    finally:
        env.close()
    width = high - low
    return torch.where(torch.isfinite(width), fraction * width, 0.0).float()


Policy = Callable[[np.ndarray], np.ndarray]

# ITU-R BT.601 luma, the weights of gymnasium's GrayscaleObservation (through OpenCV).
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Pixels:
    """How :func:`collect` records frames: rendered (``render_mode="rgb_array"``),
    resized to ``size`` (an int for a square, or ``(height, width)``) by area averaging,
    and stored as uint8, RGB or ``grayscale``."""

    size: int | tuple[int, int] = 64
    grayscale: bool = False

    def __post_init__(self):
        size = (
            (self.size, self.size)
            if isinstance(self.size, int) and not isinstance(self.size, bool)
            else self.size
        )
        if not (
            isinstance(size, tuple)
            and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024 for v in size)
        ):
            raise ValueError(
                f"size: expected an int or (height, width) of ints in [1, 1024], got {self.size!r}"
            )
        if not isinstance(self.grayscale, bool):
            raise ValueError(f"grayscale: expected a bool, got {self.grayscale!r}")
        object.__setattr__(self, "size", size)

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    def __call__(self, rendered) -> np.ndarray:
        """``(..., h, w, 3)`` rendered uint8 → ``(..., C, H, W)`` uint8."""
        x = torch.as_tensor(np.ascontiguousarray(rendered))
        lead = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float()  # (B, 3, h, w)
        if self.grayscale:
            x = (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(x, size=self.size, mode="area")
        x = x.round().clamp(0, 255).to(torch.uint8)
        return x.reshape(*lead, *x.shape[1:]).numpy()


class ActionRepeat(gym.Wrapper):
    """Each action held for ``repeat`` steps of the environment, their rewards summed, as
    PlaNet collects (it stops early where an episode ends). A time limit set by
    ``gymnasium.make`` counts the environment's own steps."""

    def __init__(self, env, repeat: int):
        super().__init__(env)
        self.repeat = repeat

    def step(self, action):
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


def collect(
    env_id: str,
    num_episodes: int,
    *,
    policy: Policy | None = None,
    seed: int = 0,
    num_envs: int = 1,
    max_episode_steps: int | None = None,
    progress: bool = True,
    pixels: Pixels | bool = False,
    action_repeat: int = 1,
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
    :param pixels: also record what the environment renders at each step, as
        :attr:`Episodes.frames`: True for 64×64 RGB, or a :class:`Pixels`. The policy
        still sees the low-dimensional observations, which are kept beside the frames.
    :param action_repeat: hold each action for this many environment steps, summing
        their rewards (:class:`ActionRepeat`); an episode's steps are then the agent's.
    :param env_kwargs: passed to ``gymnasium.make``.
    """
    if not isinstance(num_episodes, int) or num_episodes < 1:
        raise ValueError(f"num_episodes: expected a positive int, got {num_episodes!r}")
    if not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs: expected a positive int, got {num_envs!r}")
    if isinstance(action_repeat, bool) or not isinstance(action_repeat, int) or action_repeat < 1:
        raise ValueError(f"action_repeat: expected a positive int, got {action_repeat!r}")
    pixels = _pixels(pixels)
    spec = _env_spec(env_id)
    make_kwargs = dict(env_kwargs)
    if max_episode_steps is not None:
        make_kwargs["max_episode_steps"] = max_episode_steps
    wrappers = [] if action_repeat == 1 else [lambda env: ActionRepeat(env, action_repeat)]
    if pixels:
        _render_off_screen(env_id, spec, make_kwargs)
        wrappers.append(_with_frames)
    with _dependencies(env_id):
        envs = gym.make_vec(
            spec.id,
            num_envs=num_envs,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
            wrappers=wrappers or None,
            **make_kwargs,
        )
    try:
        single = envs.single_observation_space
        _check_observation_space(env_id, single["state"] if pixels else single)
        space = _action_space(env_id, envs.single_action_space)
        envs.action_space.seed(seed)
        with _dependencies(env_id):  # rendering first imports what it draws with (pygame)
            obs, _ = envs.reset(seed=seed)
        state, frames = _split(obs, pixels)
        running = [_Episode(o.copy(), None if frames is None else frames[i]) for i, o in enumerate(state)]
        done: list[_Episode] = []
        bar = tqdm(total=num_episodes, desc=f"collect {env_id}", disable=not progress)
        try:
            while len(done) < num_episodes:
                actions = envs.action_space.sample() if policy is None else np.asarray(policy(state))
                obs, rewards, terminated, truncated, info = envs.step(actions)
                state, frames = _split(obs, pixels)
                for i, episode in enumerate(running):
                    episode.actions.append(actions[i])
                    episode.rewards.append(float(rewards[i]))
                    if terminated[i] or truncated[i]:
                        final, final_frame = _split(info["final_obs"][i], pixels)
                        episode.close(final, bool(terminated[i]), bool(truncated[i]), final_frame)
                        if len(done) < num_episodes:
                            done.append(episode)
                            bar.update(1)
                        running[i] = _Episode(state[i], None if frames is None else frames[i])
                    else:
                        episode.obs.append(state[i])
                        if frames is not None:
                            episode.frames.append(frames[i])
        finally:
            bar.close()
    finally:
        envs.close()
    return _pad(done, space, spec.id)


def _pixels(pixels) -> Pixels | bool:
    """``pixels`` as given to :func:`collect` and :func:`play`: False, or a :class:`Pixels`."""
    if pixels is True:
        return Pixels()
    if pixels is not False and not isinstance(pixels, Pixels):
        raise ValueError(f"pixels: expected a bool or a Pixels, got {type(pixels).__name__}")
    return pixels


def _split(obs, pixels: Pixels | bool):
    """``(state, frames)`` of an observation: as it is and None without pixels, else the
    state and the rendered frames resized (``(..., C, H, W)`` uint8)."""
    if not pixels:
        return obs, None
    return obs["state"], pixels(obs["pixels"])


def _render_off_screen(env_id: str, spec, make_kwargs: dict) -> None:
    """Make ``env_id`` render ``rgb_array`` frames (``ValueError`` where it cannot): its
    ``make_kwargs`` get the render mode, and SDL the dummy video driver."""
    with _dependencies(env_id):  # finding the render modes imports the environment
        _check_renders(env_id, spec)
    # rgb_array draws off screen: no display is needed, and without one SDL's default
    # video driver complains on stderr. A driver the user chose stands.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    make_kwargs["render_mode"] = "rgb_array"


def _with_frames(env):
    """The observation becomes {"state": x_t, "pixels": the frame rendered after the step}."""
    return gym.wrappers.AddRenderObservation(env, render_only=False)


def _check_renders(env_id: str, spec) -> None:
    """``ValueError`` unless ``env_id`` renders ``rgb_array`` frames."""
    modes = _render_modes(spec)
    if "rgb_array" not in modes:
        raise ValueError(
            f"env_id: expected an environment that renders rgb_array frames for pixels, got {env_id!r},"
            f" whose render modes are {modes or 'none'}"
        )


def _render_modes(spec) -> list[str]:
    entry = spec.entry_point
    if isinstance(entry, str):  # "module:Class", imported as gymnasium.make would
        entry = gym.envs.registration.load_env_creator(entry)
    return list(getattr(entry, "metadata", {}).get("render_modes", []))


def play(
    env_id: str,
    agent,
    num_episodes: int,
    *,
    seed: int = 0,
    num_envs: int = 1,
    progress: bool = True,
    pixels: Pixels | bool = False,
    **env_kwargs,
) -> Episodes:
    """Run an agent for whole episodes, ``num_envs`` environments in lockstep.

    :param agent: has ``reset(obs)`` and ``act(obs) -> actions``, on ``(B, X)``
        observations of B environments that start together; an environment whose
        episode has ended keeps being shown its final observation until the
        others end, and its actions are ignored (e.g. :class:`~pyro_worldmodel.loop.Agent`).
    :param num_episodes: episodes in all, in rounds of at most ``num_envs``.
    :param seed: episode i is reset with ``seed + i``.
    :param pixels: record the rendered frames too (as :func:`collect` does), and show the
        agent the frames, flattened to ``(B, C·H·W)`` uint8 pixel values, instead of the state.
    :returns: the episodes, with the agent's actions as taken.
    """
    if not isinstance(num_episodes, int) or num_episodes < 1:
        raise ValueError(f"num_episodes: expected a positive int, got {num_episodes!r}")
    if not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs: expected a positive int, got {num_envs!r}")
    pixels = _pixels(pixels)
    spec = _env_spec(env_id)
    make_kwargs = dict(env_kwargs)
    if pixels:
        _render_off_screen(env_id, spec, make_kwargs)
    done: list[_Episode] = []
    space = None
    bar = tqdm(total=num_episodes, desc=f"play {env_id}", disable=not progress)
    try:
        while len(done) < num_episodes:
            B = min(num_envs, num_episodes - len(done))
            envs = []
            try:
                with _dependencies(env_id):
                    for _ in range(B):
                        env = gym.make(spec.id, **make_kwargs)
                        if pixels:
                            env = _with_frames(env)
                        envs.append(env)
                single = envs[0].observation_space
                _check_observation_space(env_id, single["state"] if pixels else single)
                space = _action_space(env_id, envs[0].action_space)
                with _dependencies(env_id):
                    first = [
                        _split(env.reset(seed=seed + len(done) + i)[0], pixels) for i, env in enumerate(envs)
                    ]
                running = [_Episode(o.copy(), f) for o, f in first]  # copies: obs is overwritten below
                # what the agent sees: the state, or the frames flattened to pixel values
                obs = np.stack([o if f is None else f.reshape(-1) for o, f in first])
                live = [True] * B
                agent.reset(obs)
                while any(live):
                    actions = np.asarray(agent.act(obs))
                    for i, env in enumerate(envs):
                        if not live[i]:
                            continue
                        o, r, terminated, truncated, _ = env.step(actions[i])
                        o, frame = _split(o, pixels)
                        running[i].actions.append(actions[i])
                        running[i].rewards.append(float(r))
                        if terminated or truncated:
                            running[i].close(o, bool(terminated), bool(truncated), frame)
                            live[i] = False
                        else:
                            running[i].obs.append(o)
                            if frame is not None:
                                running[i].frames.append(frame)
                        obs[i] = o if frame is None else frame.reshape(-1)
            finally:
                for env in envs:
                    env.close()
            done += running
            bar.update(B)
    finally:
        bar.close()
    return _pad(done, space, spec.id)


_SUPPORTED = (
    "Supported: any id whose observation space is a rank-1 Box and whose action space is a rank-1"
    " Box or a Discrete, e.g. Pendulum-v1, CartPole-v1, MountainCarContinuous-v0, Acrobot-v1"
)


def _env_spec(env_id) -> gym.envs.registration.EnvSpec:
    """The registered spec of ``env_id``, else ``ValueError``; gymnasium's jax
    environments are refused by name, whether or not jax is installed."""
    if not isinstance(env_id, str):
        raise ValueError(
            f"env_id: expected a registered gymnasium id, got {type(env_id).__name__}. {_SUPPORTED}"
        )
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        raise ValueError(
            f"env_id: expected a registered gymnasium id, got {env_id!r} ({e}). {_SUPPORTED}"
        ) from None
    entry = spec.entry_point
    jax = (
        entry.split(":")[0].startswith(_JAX_ENV_MODULES)
        if isinstance(entry, str)
        else bool(getattr(entry, "metadata", {}).get("jax", False))
    )
    if jax:
        numpy_version = gym.envs.registration.find_highest_version(None, spec.name)
        instead = f"; use {spec.name}-v{numpy_version} instead" if numpy_version is not None else ""
        raise ValueError(
            f"env_id: expected an environment that steps with numpy arrays, got {env_id!r}, a jax"
            f" functional environment ({entry}) whose observations are jax arrays{instead}"
        )
    return spec


@contextmanager
def _dependencies(env_id: str):
    """Turns an environment's missing optional dependency into a ``ValueError``
    naming ``env_id``, the package and, as gymnasium says it, how to install it."""
    try:
        yield
    except gym.error.DependencyNotInstalled as e:
        cause = e.__cause__
        package = getattr(cause, "name", None) if isinstance(cause, ImportError) else None
        needs = f", which needs {package}" if package else ""
        raise ValueError(
            f"env_id: expected an environment whose dependencies are installed, got {env_id!r}{needs} ({e})"
        ) from None
    except ImportError as e:
        needs = f", which needs {e.name}" if e.name else ""
        raise ValueError(
            f"env_id: expected an environment whose dependencies are installed, got {env_id!r}{needs}"
            f" ({type(e).__name__}: {e})"
        ) from None


def _check_observation_space(env_id: str, space) -> None:
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ValueError(
            f"env_id: expected a rank-1 Box observation space, got {space} for {env_id}. {_SUPPORTED}"
        )


def _action_space(env_id: str, space) -> ActionSpace:
    try:
        return ActionSpace.from_gym(space)
    except ValueError as e:
        raise ValueError(f"env_id: {env_id} has an unsupported action space ({e}). {_SUPPORTED}") from None


class _Episode:
    """One episode as it is collected."""

    def __init__(self, first_obs, first_frame=None):
        self.obs, self.actions, self.rewards = [first_obs], [], []
        self.frames = None if first_frame is None else [first_frame]

    def close(self, final_obs, terminated, truncated, final_frame=None):
        self.final_obs, self.terminated, self.truncated = final_obs, terminated, truncated
        self.final_frame = final_frame


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
    with_frames = episodes[0].frames is not None
    frames = np.zeros((N, T, *episodes[0].frames[0].shape), np.uint8) if with_frames else None
    for n, e in enumerate(episodes):
        L = len(e.actions)
        obs[n, :L] = np.stack(e.obs)
        actions[n, :L] = np.stack(e.actions)
        rewards[n, :L] = e.rewards
        mask[n, :L] = True
        if with_frames:
            frames[n, :L] = np.stack(e.frames)
    pixels = {}
    if with_frames:
        pixels = {
            "frames": torch.from_numpy(frames),
            "final_frames": torch.from_numpy(np.stack([e.final_frame for e in episodes])),
        }
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
        **pixels,
    )
