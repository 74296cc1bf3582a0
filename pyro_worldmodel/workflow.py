"""The workflow that notebooks, the command line and the loop share.

Every rule that turns data and a spec into a trained, evaluated, saved world
model is here, once:

- :func:`prepare`: split by whole episodes, fit the normaliser on the training
  split and attach it to every split, cut the training windows in model units;
- :func:`training_spec` and :func:`training_settings`: the learning-rate
  schedule and the SVI settings of a spec;
- :func:`build_model` and :func:`start`: the model, guide, ELBO and optimiser
  in the data's units, and the linear warm start where the parts allow it;
- :func:`train`: SVI on the prepared windows (with the heads' targets);
- :func:`evaluate`: held-out bounds, open-loop prediction against the
  baselines, and the figures;
- one run format: :class:`Architecture` and :func:`run_info` in every
  checkpoint, :func:`load_run` to read any run back (a train's or a loop's).

The ``*_run`` functions do each command's job in a run directory, with its
checks, lock and transaction (:mod:`pyro_worldmodel.io`); the command line
only parses arguments and calls them.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pyro
import torch

from .config import Built, Spec, build, resolve
from .data import Episodes, Normalizer, collect
from .errors import RunDirectoryError
from .evaluate import (
    CopyLast,
    LinearLeastSquares,
    StateProbe,
    heldout_bounds,
    imagine,
    open_loop,
    r_squared,
    video_open_loop,
)
from .infer import (
    DataParallel,
    History,
    check_training_data,
    elbo_terms,
    fit,
    linear_warm_start,
    why_no_linear_warm_start,
)
from .io import (
    RunDirectory,
    check_env_id,
    check_free_space,
    check_unlocked,
    load_checkpoint,
    physical_memory,
    read_checkpoint,
    strict_json,
)
from .model.components.images import FRAMES
from .spaces import ActionSpace

RUN_FORMAT = "pyro_worldmodel.run/1"
DEFAULT_STEPS, DEFAULT_BATCH_SIZE, DEFAULT_WINDOW = 1500, 32, 30
# ClippedAdam's learning rate decays to this fraction of its start over the run.
DEFAULT_FINAL_LR = 0.01
# Each training step is drawn about this many times by the random windows.
WINDOW_REPEATS = 4
# Video prediction decodes every imagined frame: at most this many futures and windows.
VIDEO_SAMPLES, VIDEO_WINDOWS = 10, 200
MAX_OBS_DIM = 2**16
FIGURES_BYTES = 8 * 2**20  # what a command's figures and JSON need on disk, with room to spare


# ---------------------------------------------------------------- data


@dataclass
class Prepared:
    """Episodes ready to train on, in one normaliser's units.

    :ivar episodes: all episodes; :ivar train: the training split; :ivar val: the
        held-out split (None without one). Each carries the normaliser fitted on
        ``train`` and stays in real units.
    :ivar obs: ``(N, W, X)`` training windows in model units, with ``actions``,
        ``mask``, ``rewards`` and ``continues`` of the same windows.
    :ivar val_windows: ``(obs, actions, mask)`` of the held-out episodes cut into
        consecutive windows as long as the training ones, in model units, for
        :func:`~pyro_worldmodel.fit`'s ``val`` (None without a held-out split).
    """

    episodes: Episodes
    train: Episodes
    val: Episodes | None
    obs: torch.Tensor
    actions: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    continues: torch.Tensor
    val_windows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def normalizer(self) -> Normalizer:
        return self.train.normalizer

    @property
    def action_space(self) -> ActionSpace:
        """The actions in model units: a box's bounds mapped as the actions are."""
        return self.normalizer.action_space(self.train.action_space)

    @property
    def windows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(obs, actions, mask)`` of the training windows, as :func:`~pyro_worldmodel.fit` takes them."""
        return self.obs, self.actions, self.mask


def prepare(
    episodes: Episodes,
    *,
    val_fraction: float | None = 0.2,
    seed: int = 0,
    window: int = DEFAULT_WINDOW,
    draws: int | None = None,
    obs_scale_floor=None,
    scale_obs: bool = True,
) -> Prepared:
    """Split, normalise and window ``episodes`` for training.

    :param val_fraction: episodes held out, split by whole episodes at random
        (:meth:`Episodes.split`); None to train on all of them.
    :param window: training window length; 0 (or one as long as the longest
        episode) trains on whole episodes.
    :param draws: at most this many windows (e.g. steps × batch size); the
        number is otherwise chosen so that each step is drawn about
        ``WINDOW_REPEATS`` times.
    :param obs_scale_floor: ``(X,)`` floors of the observation scales
        (:func:`~pyro_worldmodel.data.observation_scale_floor`).
    :param scale_obs: False to leave observations unscaled (:func:`scales_observations`).
    """
    if val_fraction is None:
        train, val = episodes, None
    else:
        train, val = episodes.split(val_fraction, seed=seed)
    normalizer = train.fit_normalizer(obs_scale_floor, scale_obs=scale_obs).normalizer
    train = replace(train, normalizer=normalizer)
    obs, actions, mask, rewards, continues = training_windows(train, window, draws, seed)
    if val is not None:
        val = replace(val, normalizer=normalizer)
    return Prepared(
        episodes=replace(episodes, normalizer=normalizer),
        train=train,
        val=val,
        obs=obs,
        actions=actions,
        mask=mask,
        rewards=rewards,
        continues=continues,
        val_windows=None if val is None else tiled_windows(val, obs.shape[1]),
    )


def tiled_windows(episodes: Episodes, window: int):
    """``(obs, actions, mask)`` in model units: every episode cut into consecutive windows of
    ``window`` steps, each step in exactly one (the last window of an episode padded and
    masked), windows without an observed step left out."""
    units = episodes.in_model_units()
    obs, actions, mask = units.obs, units.actions, units.mask
    N, T = mask.shape
    pad = (-T) % window
    if pad:
        obs = torch.cat([obs, obs.new_zeros(N, pad, *obs.shape[2:])], 1)
        actions = torch.cat([actions, actions.new_zeros(N, pad, *actions.shape[2:])], 1)
        mask = torch.cat([mask, mask.new_zeros(N, pad)], 1)
    n = (T + pad) // window
    obs, actions, mask = (x.reshape(N * n, window, *x.shape[2:]) for x in (obs, actions, mask))
    keep = mask.any(1)
    return obs[keep], actions[keep], mask[keep]


def scales_observations(spec) -> bool:
    """Whether a model of ``spec`` trains on normalised observations: not with an emission
    of binary values (``real_valued = False``, the Bernoulli's), whose data must stay 0 or 1,
    nor with image parts, which read pixel values."""
    spec = Spec.from_dict(spec)
    return getattr(resolve("emission", spec.emission["name"]), "real_valued", True) and not observes_frames(
        spec
    )


def observes_frames(spec) -> bool:
    """Whether a model of ``spec`` reads frames: its encoder or its emission is an image part
    (``observes = "frames"``, e.g. ``conv`` and ``conv_gaussian``)."""
    return bool(_frame_parts(spec))


def _frame_parts(spec) -> list[str]:
    """``["encoder conv", ...]``: the parts of ``spec`` that read frames."""
    spec = Spec.from_dict(spec)
    names = {slot: getattr(spec, slot)["name"] for slot in ("encoder", "emission")}
    return [
        f"{slot} {name}"
        for slot, name in names.items()
        if getattr(resolve(slot, name), "observes", None) == FRAMES
    ]


def model_episodes(episodes: Episodes, spec, what: str = "data") -> Episodes:
    """``episodes`` as a model of ``spec`` observes them: the frames as the observations
    (:meth:`Episodes.frames_as_obs`) for a model of frames, else as they are."""
    parts = _frame_parts(spec)
    if not parts or episodes.pixel_obs:
        return episodes
    if episodes.frames is None:
        raise ValueError(
            f"{what}: the spec's {', '.join(parts)} read frames, but these {episodes.env_id or ''} episodes"
            " have none; collect them with --pixels (collect(..., pixels=True))"
        )
    return episodes.frames_as_obs()


def training_windows(train: Episodes, window: int, draws: int | None, seed: int):
    """Fixed-length windows in model units, enough that each step is drawn about
    ``WINDOW_REPEATS`` times: ``(obs, actions, mask, rewards, continues)``."""
    units = train.in_model_units()
    if window <= 0 or window >= int(train.lengths.max()):
        return units.obs, units.actions, units.mask, units.rewards, units.continues
    num = max(int(train.lengths.sum()) // window, 1) * WINDOW_REPEATS
    if draws is not None:
        num = min(num, draws)
    generator = torch.Generator().manual_seed(seed)
    return units.windows(window, num, generator=generator, targets=True)


# ---------------------------------------------------------------- spec, model, training


def training_spec(spec: Spec | None = None, *, final_lr: float | None = None) -> Spec:
    """``spec`` (``Spec()`` if None) with its learning-rate schedule: ClippedAdam's ``lrd``
    chosen so that the learning rate decays to ``final_lr`` (default
    ``DEFAULT_FINAL_LR``) of its start over ``train.num_steps`` steps. A spec that
    sets ``lrd`` keeps it unless ``final_lr`` is given."""
    spec = Spec() if spec is None else Spec.from_dict(spec)
    if spec.optim["name"] == "ClippedAdam" and ("lrd" not in spec.optim or final_lr is not None):
        fraction = DEFAULT_FINAL_LR if final_lr is None else final_lr
        if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
            raise ValueError(f"final_lr: expected a number in (0, 1], got {fraction!r}")
        steps = spec.train.get("num_steps", DEFAULT_STEPS)
        spec = spec.with_overrides({"optim.lrd": fraction ** (1.0 / steps)})
    return spec


def training_settings(spec: Spec) -> dict:
    """:func:`~pyro_worldmodel.fit`'s keywords for a spec: its ``train`` part over the
    defaults (1,500 steps of 32 windows, 50 records of the terms, 10 checkpoints)."""
    steps = spec.train.get("num_steps", DEFAULT_STEPS)
    return {
        "num_steps": steps,
        "batch_size": DEFAULT_BATCH_SIZE,
        "terms_every": max(steps // 50, 1),
        "checkpoint_every": max(steps // 10, 1),
        **spec.train,
    }


def build_model(spec, prepared: Prepared) -> Built:
    """:func:`~pyro_worldmodel.config.build` in the prepared data's units (a bounded
    policy's box mapped by the normaliser), with the frames' shape where they are the observations."""
    return build(
        spec, prepared.train.obs_dim, prepared.action_space, image_shape=prepared.train.obs_image_shape
    )


def start(model, guide, prepared: Prepared, init: str = "auto") -> str:
    """The initial parameters: ``"linear"`` (the least-squares linear system of the
    training windows, :func:`~pyro_worldmodel.infer.linear_warm_start`) where the
    parts allow it, or ``"random"`` (as built). ``init="linear"`` refuses parts that
    cannot start there; ``"random"`` never warm starts.

    :returns: ``"linear"``, or ``"random"`` with the reason when ``auto`` could not.
    """
    if init not in ("auto", "linear", "random"):
        raise ValueError(f"init: expected 'auto', 'linear' or 'random', got {init!r}")
    reason = why_no_linear_warm_start(model, guide)
    if init == "linear" and reason:
        raise ValueError(f"init: {reason}")
    if init == "random" or reason is not None:
        return "random" if reason is None or init == "random" else f"random ({reason})"
    linear_warm_start(model, guide, *prepared.windows)
    return "linear"


def train(prepared: Prepared, built: Built, *, seed: int = 0, **fit_kwargs) -> History:
    """SVI on the prepared windows with the built ELBO and optimiser, the spec's
    settings (:func:`training_settings`) and the targets of the heads the model has.
    Further keywords go to :func:`~pyro_worldmodel.fit` (``checkpoint``, ``device``,
    ``progress``, ``callback``, ...)."""
    model = built.model
    targets = model.targets(prepared.rewards, prepared.continues)
    settings = {**training_settings(built.spec), **fit_kwargs}
    return fit(
        model,
        built.guide,
        *prepared.windows,
        **targets,
        elbo=built.elbo,
        optim=built.optim,
        seed=seed,
        val=prepared.val_windows,
        **settings,
    )


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalSettings:
    """How :func:`evaluate` measures a model.

    :ivar context: observed steps before each open-loop prediction.
    :ivar horizon: steps predicted.
    :ivar num_samples: imagined futures per window.
    :ivar iwae_particles: K of the held-out IWAE bound.
    :ivar max_windows: open-loop windows at most.
    :ivar seed: seeds the evaluation's draws.
    :ivar episode: the held-out episode whose first window ``imagination.png`` draws;
        None draws three open-loop windows: a random one, the median one and the
        10th-percentile one by the model's log-likelihood.
    :ivar calibrate: also score the model's futures with their spread recalibrated
        (``open_loop(calibrate=True)``, cross-fitted over the held-out episodes), where
        the emission is real-valued and both folds have windows.

    A model of frames is scored by video prediction
    (:func:`~pyro_worldmodel.evaluate.video_open_loop`), each imagined window decoded into
    frames: there ``num_samples`` is at most :data:`VIDEO_SAMPLES` and ``max_windows`` at
    most :data:`VIDEO_WINDOWS`, and ``episode``, ``calibrate`` do not apply.
    """

    context: int = 5
    horizon: int = 15
    num_samples: int = 100
    iwae_particles: int = 100
    max_windows: int = 1000
    seed: int = 0
    episode: int | None = None
    calibrate: bool = True


@dataclass
class Evaluation:
    """What :func:`evaluate` returns: ``metrics`` (strict-JSON-ready) and ``figures`` by file name."""

    metrics: dict
    figures: dict


def evaluate(
    model, guide, train: Episodes, val: Episodes, settings: EvalSettings | None = None, *, env_id=""
) -> Evaluation:
    """Held-out bounds (ELBO, its terms, IWAE), the KL per time index, open-loop
    prediction against the copy-last and least-squares baselines (fitted on
    ``train``), and the figures ``kl_per_t.png``, ``open_loop.png`` and ``imagination.png``.

    :param train: the training episodes, with the normaliser the model trains in.
    :param val: the episodes to evaluate on (real units; the normaliser is train's).
    """
    from .plots import plot_imagination_windows, plot_kl_per_t, plot_open_loop

    s = settings or EvalSettings()
    normalizer = train.normalizer
    val = replace(val, normalizer=normalizer)
    if val.pixel_obs:
        return _evaluate_frames(model, guide, train, val, s, env_id=env_id)
    if s.episode is not None:
        L = int(val.lengths[s.episode]) if 0 <= s.episode < len(val) else 0
        if L <= s.context:
            raise ValueError(
                f"episode: expected a held-out episode longer than context={s.context} to draw,"
                f" got episode {s.episode} of {L} steps among {len(val)}"
            )
    pyro.set_rng_seed(s.seed)
    obs, actions, mask = val.normalized()
    bounds = heldout_bounds(model, guide, obs, actions, mask, iwae_particles=s.iwae_particles)
    kl_terms = elbo_terms(model, guide, obs, actions, mask, num_particles=8)
    kl_per_t = kl_terms.kl_per_t

    t_obs, t_actions, t_mask = train.normalized()
    baselines = {
        "copy_last": CopyLast(train.action_space).fit(t_obs, t_actions, t_mask, horizon=s.horizon),
        "linear": LinearLeastSquares(train.action_space).fit(t_obs, t_actions, t_mask, horizon=s.horizon),
    }
    ol = open_loop(
        model,
        guide,
        val.obs,
        val.actions,
        val.mask,
        context=s.context,
        horizon=s.horizon,
        num_samples=s.num_samples,
        normalizer=normalizer,
        baselines=baselines,
        max_windows=s.max_windows,
        seed=s.seed,
        calibrate=s.calibrate and _can_calibrate(model, val, s.context),
    )
    if s.episode is None:
        windows = drawn_windows(ol, s.seed)
    else:
        windows = [(f"episode {s.episode}", s.episode, 0)]
    panels = []
    for title, episode, start in windows:
        horizon = min(s.horizon, int(val.lengths[episode]) - start - s.context)
        im, future = imagine_episode(
            model, guide, val, episode, start=start, context=s.context, horizon=horizon,
            num_samples=s.num_samples,
        )  # fmt: skip
        panels.append((f"{title}: episode {episode}, step {start}", im, future))
    figures = {
        "kl_per_t.png": plot_kl_per_t(kl_per_t, monte_carlo=bool(kl_terms.monte_carlo_kl)),
        "open_loop.png": plot_open_loop(ol),
        "imagination.png": plot_imagination_windows(panels),
    }
    metrics = {
        "env_id": env_id,
        "num_episodes": len(val),
        "heldout": bounds,
        "kl_per_t": kl_per_t.tolist(),
        "open_loop": asdict(ol),
    }
    return Evaluation(metrics, figures)


def _evaluate_frames(
    model, guide, train: Episodes, val: Episodes, s: EvalSettings, *, env_id=""
) -> Evaluation:
    """:func:`evaluate` for a model of frames: held-out bounds in nats per frame and bits per
    dimension, the KL per time index, and open-loop video prediction against the last
    context frame and the mean training frame, with ``video.png`` and ``video.gif``."""
    from .plots import plot_kl_per_t, plot_video, video_gif

    pyro.set_rng_seed(s.seed)
    obs, actions, mask = val.normalized()
    bounds = heldout_bounds(model, guide, obs, actions, mask, iwae_particles=s.iwae_particles)
    kl_terms = elbo_terms(model, guide, obs, actions, mask, num_particles=8)
    t_obs, t_actions, t_mask = train.normalized()
    counts = t_mask.sum().clamp(min=1)
    mean_frame = (t_obs.double() * t_mask[..., None]).sum((0, 1)) / counts  # (X,) pixel values
    probe, probe_metrics = None, None
    if train.state is not None and val.state is not None:
        # the state probe: fitted on the training episodes' filtered latents, scored on the held-out ones
        probe = StateProbe.fit(
            _filtered_features(model, guide, t_obs, t_actions, t_mask), train.state[t_mask]
        )
        val_features = _filtered_features(model, guide, obs, actions, mask)
        probe_metrics = {"filtered_r2": r_squared(probe.predict(val_features), val.state[mask])}
    video = video_open_loop(
        model,
        guide,
        obs,
        actions,
        mask,
        image_shape=val.obs_image_shape,
        mean_frame=mean_frame.float(),
        context=s.context,
        horizon=s.horizon,
        num_samples=min(s.num_samples, VIDEO_SAMPLES),
        max_windows=min(s.max_windows, VIDEO_WINDOWS),
        seed=s.seed,
        state=val.state,
        probe=probe,
    )
    if probe_metrics is not None:
        probe_metrics["imagined_r2"] = video.state_r2
    # the bounds on log p(x_t, a_t | x_<t, a_<t) per step, in bits per pixel value
    X = val.obs_dim
    bits = {k: -v / (X * math.log(2)) for k, v in bounds.items() if k in ("elbo", "iwae")}
    figures = {
        "kl_per_t.png": plot_kl_per_t(kl_terms.kl_per_t, monte_carlo=bool(kl_terms.monte_carlo_kl)),
        "video.png": plot_video(video),
        "video.gif": video_gif(video),
    }
    metrics = {
        "env_id": env_id,
        "num_episodes": len(val),
        "heldout": bounds,
        "heldout_bits_per_dim": bits,
        "image_shape": list(val.obs_image_shape),
        "kl_per_t": kl_terms.kl_per_t.tolist(),
        "video": video.as_dict(),
        "state_probe": probe_metrics,
    }
    return Evaluation(metrics, figures)


def _filtered_features(model, guide, obs, actions, mask, chunk: int = 16) -> torch.Tensor:
    """``(n, F)`` the features (z_t, or [h_t, z_t]) of every observed step, z_t drawn from
    the guide, ``chunk`` episodes at a time (pixel observations are converted per chunk)."""
    from .act.planners import posterior_states

    out = []
    with torch.no_grad():
        for lo in range(0, len(mask), chunk):
            sl = slice(lo, lo + chunk)
            out.append(posterior_states(model, guide, obs[sl], actions[sl], mask[sl]).features.cpu())
    return torch.cat(out)


def _can_calibrate(model, val: Episodes, context: int) -> bool:
    """Whether ``open_loop`` can cross-fit the spread: a real-valued emission, and windows
    in even- and odd-numbered episodes."""
    long_enough = (val.lengths > context).tolist()
    folds = {i % 2 for i, ok in enumerate(long_enough) if ok}
    return getattr(model.emission, "real_valued", True) and folds == {0, 1}


def drawn_windows(ol, seed: int = 0) -> list[tuple[str, int, int]]:
    """``(title, episode, start)`` of three open-loop windows to draw: a random one, and
    the median and the 10th-percentile one when ranked by the model's log-likelihood
    (:attr:`OpenLoop.window_log_lik <pyro_worldmodel.evaluate.OpenLoop.window_log_lik>`)."""
    n = len(ol.windows)
    order = sorted(range(n), key=lambda i: ol.window_log_lik[i])
    pick = {
        "random": int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed))),
        "median": order[(n - 1) // 2],
        "10th percentile": order[int(0.1 * (n - 1))],
    }
    return [(f"{title}, log-lik {ol.window_log_lik[i]:.3g}", *ol.windows[i]) for title, i in pick.items()]


def imagine_episode(
    model, guide, episodes: Episodes, episode: int, *, start: int = 0, context: int = 5, horizon: int = 15,
    num_samples: int = 100, policy: bool = False,
):  # fmt: skip
    """Futures dreamt after ``context`` steps of one episode (real units, through its
    normaliser): ``(Imagination, the recorded future (1, H, X) or None if shorter)``.

    :param policy: act from the learned π instead of the recorded actions.
    """
    n = len(episodes)
    if not 0 <= episode < n:
        raise ValueError(f"episode: expected an index in [0, {n}), got {episode}")
    L = int(episodes.lengths[episode])
    if not 0 <= start or start + context > L:
        raise ValueError(
            f"start: expected the context [start, start + {context}) inside episode {episode} of"
            f" {L} steps, got start={start}"
        )
    ctx = slice(start, start + context)
    recorded = L - start - context  # steps of the episode after the context
    fut = slice(start + context, start + context + min(horizon, recorded))
    obs = episodes.obs[episode : episode + 1]
    actions = episodes.actions[episode : episode + 1]
    future_actions = None
    if not policy:
        future_actions = actions[:, fut]
        if recorded < horizon:
            raise ValueError(
                f"horizon: episode {episode} has {recorded} recorded actions after the"
                f" context, fewer than horizon={horizon}; use --policy model to act from π"
            )
    im = imagine(
        model,
        guide,
        obs[:, ctx],
        actions[:, ctx],
        horizon,
        future_actions=future_actions,
        num_samples=num_samples,
        normalizer=episodes.normalizer,
    )
    future_obs = obs[:, fut]
    return im, future_obs if future_obs.shape[1] == horizon else None


# ---------------------------------------------------------------- the run format


@dataclass
class Architecture:
    """What rebuilds a trained model and guide: the data's sizes and the spec; stored in every checkpoint."""

    obs_dim: int
    action_space: dict
    env_id: str = ""
    spec: dict = field(default_factory=lambda: Spec().to_dict())
    image_shape: list | None = None  # [C, H, W] of the frames a model of frames reads

    @classmethod
    def of(cls, episodes: Episodes, spec) -> Architecture:
        """The architecture of a model of ``spec`` for ``episodes`` (as the model observes them,
        :func:`model_episodes`)."""
        return cls(
            episodes.obs_dim,
            space_dict(episodes.action_space),
            episodes.env_id,
            Spec.from_dict(spec).to_dict(),
            list(episodes.obs_image_shape) if episodes.pixel_obs else None,
        )

    def build(self, normalizer: Normalizer | None = None) -> Built:
        """The model, guide, ELBO and optimiser; with a ``normalizer``, for actions in
        its units: a box's bounds mapped as the actions are (``action_space`` stays in real units)."""
        space = ActionSpace(**self.action_space)
        if normalizer is not None:
            space = normalizer.action_space(space)
        return build(self.spec, self.obs_dim, space, image_shape=self.frame_shape)

    @property
    def frame_shape(self) -> tuple[int, int, int] | None:
        return None if self.image_shape is None else tuple(self.image_shape)

    def describe(self) -> str:
        space = ActionSpace(**self.action_space)
        frames = "" if self.image_shape is None else ", frames {}×{}×{}".format(*self.image_shape)
        return f"{self.env_id or 'unknown env'} (obs_dim {self.obs_dim}{frames}, actions {space})"

    @classmethod
    def from_dict(cls, data, where: str) -> Architecture:
        """From a checkpoint's stored dict, every entry checked: nothing read from a file is trusted."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an architecture dict, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown or "obs_dim" not in data or "action_space" not in data:
            raise ValueError(f"{where}: expected architecture keys {known}, got {sorted(map(str, data))}")
        obs_dim = data["obs_dim"]
        if not isinstance(obs_dim, int) or isinstance(obs_dim, bool) or not 1 <= obs_dim <= MAX_OBS_DIM:
            raise ValueError(f"{where}: obs_dim: expected an int in [1, {MAX_OBS_DIM}], got {obs_dim!r}")
        space = data["action_space"]
        if not isinstance(space, dict) or set(space) != {"kind", "dim", "low", "high"}:
            raise ValueError(f"{where}: action_space: expected kind, dim, low and high, got {space!r}")
        try:
            ActionSpace(**space)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: action_space: {e}") from None
        env_id = check_env_id(data.get("env_id", ""), f"{where}: env_id")
        spec = Spec.from_dict(data.get("spec", Spec().to_dict())).to_dict()
        image_shape = data.get("image_shape")
        if image_shape is not None and not (
            isinstance(image_shape, list)
            and len(image_shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in image_shape)
            and math.prod(image_shape) == obs_dim
        ):
            raise ValueError(
                f"{where}: image_shape: expected [C, H, W] with C·H·W = obs_dim = {obs_dim}, got {image_shape!r}"
            )
        return cls(obs_dim, space, env_id, spec, image_shape)

    def check_compatible(self, episodes: Episodes, what: str) -> None:
        """Refuse data of another environment, observation size or action space, naming the difference."""
        got = Architecture(
            episodes.obs_dim,
            space_dict(episodes.action_space),
            env_id=episodes.env_id,
            image_shape=list(episodes.obs_image_shape) if episodes.pixel_obs else None,
        )
        differs = []
        if self.env_id and got.env_id and self.env_id != got.env_id:
            differs.append(f"environment {self.env_id} vs {got.env_id}")
        if self.image_shape != got.image_shape:
            differs.append(f"frames {_shape(self.image_shape)} vs {_shape(got.image_shape)}")
        elif self.obs_dim != got.obs_dim:
            differs.append(f"obs_dim {self.obs_dim} vs {got.obs_dim}")
        if ActionSpace(**self.action_space) != ActionSpace(**got.action_space):
            differs.append(f"actions {ActionSpace(**self.action_space)} vs {ActionSpace(**got.action_space)}")
        if differs:
            raise ValueError(
                f"data: the checkpoint was made for {self.describe()}, but {what} is {got.describe()};"
                f" they differ in {', '.join(differs)}"
            )


def _shape(image_shape) -> str:
    return "none" if image_shape is None else "×".join(map(str, image_shape))


def space_dict(space: ActionSpace) -> dict:
    return {
        "kind": space.kind,
        "dim": space.dim,
        "low": None if space.low is None else list(space.low),
        "high": None if space.high is None else list(space.high),
    }


def run_info(
    arch: Architecture,
    normalizer: Normalizer,
    *,
    val_fraction: float | None,
    seed: int,
    context: int | None = None,
    horizon: int | None = None,
) -> dict:
    """The ``run`` entry of every checkpoint a run writes (a train's and a loop's alike):
    what rebuilds the model, its units, and the split it was trained on (``val_fraction``
    None: it trained on all its episodes)."""
    return {
        "format": RUN_FORMAT,
        "architecture": asdict(arch),
        "normalizer": {k: v for k, v in asdict(normalizer).items() if v is not None},
        "val_fraction": val_fraction,
        "seed": seed,
        "context": context,
        "horizon": horizon,
    }


@dataclass
class Run:
    """A run read back by :func:`load_run`: the model and guide with their weights, and
    what the checkpoint says of them."""

    model: torch.nn.Module
    guide: torch.nn.Module
    architecture: Architecture
    normalizer: Normalizer
    info: dict
    path: Path

    def splits(self, episodes: Episodes) -> tuple[Episodes, Episodes | None]:
        """``(train, val)`` of ``episodes`` as the run split them (val None: it trained on all),
        each with the run's normaliser."""
        if self.info["val_fraction"] is None:
            return replace(episodes, normalizer=self.normalizer), None
        train, val = episodes.split(self.info["val_fraction"], seed=self.info["seed"])
        return replace(train, normalizer=self.normalizer), replace(val, normalizer=self.normalizer)


def load_run(path, device: str | torch.device = "cpu", *, files: RunDirectory | None = None) -> Run:
    """A trained run from its directory (checked against its manifest) or its checkpoint file."""
    path = Path(path)
    if path.is_file():
        ckpt = path
    else:
        files = files or RunDirectory(path)
        if not files.has("model.ckpt"):
            raise FileNotFoundError(
                f"run: expected a checkpoint at {path / 'model.ckpt'}; train one with `pyro-worldmodel train`"
            )
        ckpt = files.file("model.ckpt")
    info = read_run_info(ckpt)
    arch = Architecture.from_dict(info["architecture"], f"{ckpt}")
    normalizer = _normalizer_from(info["normalizer"], arch, f"{ckpt}")
    built = arch.build(normalizer)
    model, guide = built.model, built.guide
    model.to(device)
    guide.to(device)
    load_checkpoint(ckpt, model, guide)
    return Run(model, guide, arch, normalizer, info, ckpt.parent if not path.is_file() else path)


def read_run_info(ckpt: Path) -> dict:
    """The ``run`` entry of a checkpoint, its types checked."""
    state = read_checkpoint(ckpt)
    info = state["extra"].get("run")
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise ValueError(f"run: {ckpt} was not written by pyro-worldmodel's train or loop")
    for key, check in (
        ("val_fraction", lambda v: v is None or (isinstance(v, float) and 0 < v < 1)),
        ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool)),
        ("architecture", lambda v: isinstance(v, dict)),
        ("normalizer", lambda v: isinstance(v, dict)),
    ):
        if key not in info or not check(info[key]):
            raise ValueError(f"run: {ckpt} has a missing or malformed {key!r} entry: {info.get(key)!r}")
    return info


def _normalizer_from(data, arch: Architecture, where: str) -> Normalizer:
    """The checkpoint's normaliser, its shapes checked against the architecture."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: normalizer: expected a dict of tensors, got {type(data).__name__}")
    A = arch.action_space["dim"]
    shapes = {"obs_loc": (arch.obs_dim,), "obs_scale": (arch.obs_dim,), "reward_loc": (), "reward_scale": ()}
    if arch.action_space["kind"] == "box":
        shapes.update(action_loc=(A,), action_scale=(A,))
    unknown = [k for k in data if k not in shapes]
    if unknown or "obs_loc" not in data or "obs_scale" not in data:
        raise ValueError(f"{where}: normalizer: expected keys {sorted(shapes)}, got {sorted(map(str, data))}")
    for key, value in data.items():
        if not torch.is_tensor(value) or not value.is_floating_point() or tuple(value.shape) != shapes[key]:
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(
                f"{where}: normalizer.{key}: expected a float tensor of shape {shapes[key]}, got {got}"
            )
        if not bool(value.isfinite().all()) or (key.endswith("scale") and not bool((value > 0).all())):
            raise ValueError(
                f"{where}: normalizer.{key}: expected finite values (scales > 0), got {value.tolist()}"
            )
    return Normalizer(**data)


# ---------------------------------------------------------------- runs in directories


def collect_run(
    env_id: str,
    num_episodes: int,
    out,
    *,
    seed: int = 0,
    num_envs: int = 8,
    max_episode_steps: int | None = None,
    overwrite: bool = False,
    pixels=False,
    action_repeat: int = 1,
    log=print,
) -> Path:
    """Collect episodes with random actions into ``out/episodes.npz``, as one commit.

    :param overwrite: replace a run or dataset already in ``out`` (refused otherwise).
    :param pixels: also record rendered frames (:func:`~pyro_worldmodel.data.collect`).
    :param action_repeat: environment steps per action.
    """
    out = Path(out)
    check_unlocked(out)  # before collecting, which a busy directory would waste
    if not overwrite and out.is_dir():  # refused before collecting; checked again under the lock
        refuse_replacing(RunDirectory(out), "collect")
    episodes = collect(
        env_id,
        num_episodes,
        seed=seed,
        num_envs=num_envs,
        max_episode_steps=max_episode_steps,
        pixels=pixels,
        action_repeat=action_repeat,
    )
    check_free_space(out, 2 * _episodes_bytes(episodes), "collect")
    with _writing(out, "collect") as run:
        if not overwrite:
            refuse_replacing(run, "collect")
        tx = run.transaction("collect", replace=True)
        episodes.save(tx.path("episodes.npz"))
        tx.commit()
    frames = "" if episodes.frames is None else ", frames {}×{}×{}".format(*episodes.image_shape)
    log(
        f"collected {len(episodes)} episodes ({int(episodes.lengths.sum())} steps) of {episodes.env_id}{frames}"
    )
    log(f"dataset: {out / 'episodes.npz'}")
    return out / "episodes.npz"


@dataclass
class TrainSettings:
    """How :func:`train_run` trains: the split, the windows, the start and the run directory.

    :ivar val_fraction: episodes held out. :ivar seed: seeds everything.
    :ivar window: training window length (0: whole episodes).
    :ivar init: ``"auto"``, ``"linear"`` or ``"random"`` (:func:`start`).
    :ivar device: where to train. :ivar resume: continue the run in the directory.
    :ivar overwrite: replace a run already there. :ivar evaluate: settings of the
        evaluation after training, None to skip it.
    """

    val_fraction: float = 0.2
    seed: int = 0
    window: int = DEFAULT_WINDOW
    init: str = "auto"
    device: str | None = None
    resume: bool = False
    overwrite: bool = False
    evaluate: EvalSettings | None = field(default_factory=EvalSettings)


def train_run(
    episodes: Episodes,
    spec,
    out,
    settings: TrainSettings | None = None,
    *,
    data_path=None,
    progress=True,
    log=print,
) -> dict:
    """Train a model of ``spec`` on ``episodes`` into the run directory ``out``: the
    dataset, the checkpoint, ``training.png`` and (with ``settings.evaluate``) the
    evaluation, committed together. Everything that can be refused is checked before
    the directory is touched; a crash or a divergence leaves the previous run.

    :param spec: a spec with its schedule (:func:`training_spec`).
    :param data_path: the file ``episodes`` came from, if any: training into the
        directory that holds it needs no ``overwrite``.
    :returns: the evaluation's metrics (empty without one).
    """
    s = settings or TrainSettings()
    out = Path(out)
    spec = Spec.from_dict(spec)
    settings_fit = training_settings(spec)
    episodes = model_episodes(episodes, spec)
    prepared = prepare(
        episodes,
        val_fraction=s.val_fraction,
        seed=s.seed,
        window=s.window,
        draws=settings_fit["num_steps"] * settings_fit["batch_size"],
        scale_obs=scales_observations(spec),
    )
    arch = Architecture.of(prepared.train, spec)
    arch.env_id = episodes.env_id
    pyro.set_rng_seed(s.seed)
    built = build_model(spec, prepared)
    model, guide = built.model, built.guide
    if s.init == "linear" and why_no_linear_warm_start(model, guide):
        raise ValueError(f"init: {why_no_linear_warm_start(model, guide)}")
    if s.evaluate is not None:
        _check_evaluable(prepared.train, prepared.val, s.evaluate.context, s.evaluate.horizon, arch)
        val = prepared.val
        check_evaluation_memory(s.evaluate, arch, len(val) * int(val.lengths.max()), int(val.lengths.max()))
    targets = model.targets(prepared.rewards, prepared.continues)
    check_training_data(model, guide, *prepared.windows, **targets)  # what fit would refuse
    info = run_info(
        arch,
        prepared.normalizer,
        val_fraction=s.val_fraction,
        seed=s.seed,
        context=None if s.evaluate is None else s.evaluate.context,
        horizon=None if s.evaluate is None else s.evaluate.horizon,
    )
    same_data = data_path is not None and (out / "episodes.npz").resolve() == Path(data_path).resolve()
    ranks = DataParallel.of_process_group()
    if ranks is not None and ranks.rank != 0:
        return _train_beside_rank_0(ranks, prepared, built, s)
    needed = 2 * (_episodes_bytes(episodes) + _checkpoint_bytes(model, guide)) + FIGURES_BYTES
    check_free_space(out, needed, "train")
    # The other ranks wait for rank 0's word: where training starts, or why it does not.
    told = {"done": ranks is None}

    def tell(source):
        ranks.broadcast({"resume_from": None if source is None else str(source)})
        told["done"] = True

    try:
        metrics = _train_into(
            out, s, info, same_data, prepared, built, arch, progress, log, None if ranks is None else tell
        )
    except BaseException as e:
        if not told["done"]:
            ranks.broadcast({"error": str(e).splitlines()[0] if str(e) else type(e).__name__})
        raise
    log(f"checkpoint: {out / 'model.ckpt'}")
    return metrics


def _train_beside_rank_0(ranks, prepared, built, s) -> dict:
    """A rank other than 0 of a data-parallel train: the same data, model and start as rank 0,
    its shard of every minibatch, and nothing written (rank 0 writes the run and evaluates)."""
    word = ranks.broadcast()
    if "error" in word:
        raise ValueError(f"rank 0 stopped before training: {word['error']}")
    source = word["resume_from"]
    if source is None:
        start(built.model, built.guide, prepared, s.init)
    with pyro.validation_enabled(False):
        train(prepared, built, seed=s.seed, device=s.device, checkpoint=source, resume=source is not None,
              progress=False)  # fmt: skip
    return {}


def _train_into(out, s, info, same_data, prepared, built, arch, progress, log, tell) -> dict:
    """Rank 0's (or the only process's) part of :func:`train_run`: the run directory.
    ``tell(source)`` gives the other ranks of a data-parallel train the checkpoint to resume
    from (None: the start), once it is known."""
    model, guide = built.model, built.guide
    # One writer: the directory's lock, then what is already there.
    with _writing(out, "train") as run:
        staged = run.staged_transaction("train")
        resumable = run.staging_of("train") / "model.ckpt"
        source = None
        if s.resume:  # an interrupted train's last good checkpoint, else the finished run's
            candidates = [resumable] if staged is not None and resumable.exists() else []
            candidates += [run.file("model.ckpt")] if run.has("model.ckpt") else []
            for candidate in candidates:
                try:
                    _check_resumable(candidate, info)
                except ValueError:
                    if not s.overwrite:  # with overwrite, another run's is replaced
                        raise
                    continue
                source = candidate
                break
        if source is None and not s.overwrite:
            refuse_replacing(run, "train", keep=("episodes.npz",) if same_data else ())
        if staged is not None and source is None and resumable.exists():
            log(
                f"note: discarding the checkpoint of an interrupted train (pid {staged.get('pid', '?')},"
                f" started {staged.get('started', '?')}), {resumable}"
            )
        if tell is not None:  # the other ranks start where this one starts, and read what it resumes
            tell(source)

        # Everything is written into the transaction, which becomes the run at its commit.
        # Of an interrupted train's files only its checkpoint is kept, and only to resume it.
        tx = run.transaction("train", replace=True, keep=("model.ckpt",) if source == resumable else ())
        checkpoint = tx.path("model.ckpt")
        if source is not None and source != resumable:
            shutil.copyfile(source, checkpoint)
        prepared.episodes.save(tx.path("episodes.npz"))
        if source is None:
            how = start(model, guide, prepared, s.init)
            if how.startswith("random ("):
                log(f"starting at random: no linear warm start for this spec {how[len('random ') :]}")
        backend = getattr(built.elbo, "compile_backend", None)
        if backend is not None:
            log(f"compiling the guide's steps with torch.compile ({backend}): the first step waits for it")
        began = time.perf_counter()
        with pyro.validation_enabled(False):  # inputs were checked once, up front
            history = train(
                prepared,
                built,
                seed=s.seed,
                device=s.device,
                checkpoint=checkpoint,
                resume=source is not None,
                extra={"run": info},
                progress=progress,
            )
        seconds = time.perf_counter() - began
        from .plots import plot_training, save_figure

        save_figure(plot_training(history), tx.path("figures/training.png"))
        log(f"trained {len(history.loss)} steps in {seconds:.0f} s{_compiled(built.elbo)}")
        metrics = {}
        if s.evaluate is not None:
            result = evaluate(
                model,
                guide,
                prepared.train,
                prepared.val,
                replace(s.evaluate, seed=s.seed),
                env_id=arch.env_id,
            )
            _stage_evaluation(result, tx)
            metrics = result.metrics
        tx.commit()
    return metrics


def _compiled(elbo) -> str:
    """What compiling the guide's steps took, for the log line of a train: "" without compile."""
    if getattr(elbo, "compile_backend", None) is None:
        return ""
    if elbo.compile_error is not None:
        return f" (not compiled: {elbo.compile_error}; the steps ran eagerly)"
    return f", {elbo.compile_seconds:.0f} s of which compiling the guide's steps"


def evaluate_run(
    run, settings: EvalSettings | None = None, *, data: Episodes | None = None, device="cpu"
) -> dict:
    """Evaluate the run in directory ``run`` (on its held-out split, or on ``data``) and
    commit ``metrics.json`` and the figures. :returns: the metrics."""
    s = settings or EvalSettings()
    run = Path(run)
    require_run(run)
    arch = Architecture.from_dict(read_run_info(run / "model.ckpt")["architecture"], str(run / "model.ckpt"))
    if data is not None:
        data = model_episodes(data, arch.spec)
    sizes = data if data is not None else Episodes.load(run / "episodes.npz")
    check_evaluation_memory(s, arch, len(sizes) * int(sizes.lengths.max()), int(sizes.lengths.max()))
    check_free_space(run, FIGURES_BYTES, "evaluate")
    with _writing(run, "evaluate") as files:
        loaded = load_run(run, device, files=files)
        episodes = Episodes.load(files.file("episodes.npz"))
        loaded.architecture.check_compatible(episodes, f"the run's {run / 'episodes.npz'}")
        if data is not None:
            loaded.architecture.check_compatible(data, "the data")
        train_split, val = loaded.splits(episodes)
        if data is not None:
            val = data
        if val is None:
            raise ValueError(
                f"data: {run} trained on all its episodes (a loop's run): evaluate it on held-out data (--data)"
            )
        result = evaluate(loaded.model, loaded.guide, train_split, val, s, env_id=loaded.architecture.env_id)
        tx = files.transaction("evaluate")
        _stage_evaluation(result, tx)
        tx.commit()
    return result.metrics


def imagine_run(
    run,
    *,
    data: Episodes | None = None,
    episode: int = 0,
    start_step: int = 0,
    context: int = 5,
    horizon: int = 30,
    num_samples: int = 100,
    policy: bool = False,
    seed: int = 0,
    device="cpu",
    calibrated: bool = False,
) -> Path:
    """Dream futures of one held-out episode (or one of ``data``) and commit
    ``imagination.npz`` and ``figures/imagination.png``. :returns: the samples' path.

    :param calibrated: move the futures about their mean by the spread factors that
        ``evaluate`` fitted (``metrics.json``'s ``open_loop.calibration``,
        :class:`~pyro_worldmodel.evaluate.calibration.SpreadCalibration`); they hold for the
        context length they were fitted after and reach its horizon. ``imagination.npz``
        then holds the moved draws as ``obs`` and the factors as ``spread_factor``.
    """
    from .plots import plot_imagination, save_figure

    run = Path(run)
    require_run(run)
    arch = Architecture.from_dict(read_run_info(run / "model.ckpt")["architecture"], str(run / "model.ckpt"))
    if arch.image_shape is not None:
        raise ValueError(
            f"run: {run} is a model of frames; imagine draws vector observations. Its imagined"
            " frames are in evaluate's figures/video.png and figures/video.gif"
        )
    spec = Spec.from_dict(arch.spec)
    width = arch.obs_dim + 2 * spec.latent_dim + arch.action_space["dim"]
    check_sampling_memory("num_samples", num_samples, 1, "episode", context + horizon, width)
    check_free_space(run, FIGURES_BYTES + 4 * 4 * num_samples * horizon * width, "imagine")
    with _writing(run, "imagine") as files:
        loaded = load_run(run, device, files=files)
        if data is not None:
            loaded.architecture.check_compatible(data, "the data")
            episodes = replace(data, normalizer=loaded.normalizer)
        else:
            episodes = Episodes.load(files.file("episodes.npz"))
            loaded.architecture.check_compatible(episodes, f"the run's {run / 'episodes.npz'}")
            train_split, episodes = loaded.splits(episodes)
            episodes = train_split if episodes is None else episodes
        spread = _spread_factors(files, context, horizon) if calibrated else None
        pyro.set_rng_seed(seed)
        im, future = imagine_episode(
            loaded.model,
            loaded.guide,
            episodes,
            episode,
            start=start_step,
            context=context,
            horizon=horizon,
            num_samples=num_samples,
            policy=policy,
        )
        if spread is not None:
            im = replace(im, obs=spread.apply(im.obs, im.obs_mean.mean(0)))
        arrays = {
            k: getattr(im, k).cpu().numpy() for k in ("latents", "actions", "obs_mean", "obs", "context_obs")
        }
        if spread is not None:
            arrays["spread_factor"] = spread.factor.numpy()
        if future is not None:
            arrays["future_obs"] = future.numpy()
        fig = plot_imagination(im, future)
        tx = files.transaction("imagine")
        tx.write("imagination.npz", lambda f: np.savez(f, **arrays))
        save_figure(fig, tx.path("figures/imagination.png"))
        tx.commit()
    return run / "imagination.npz"


def _spread_factors(files, context: int, horizon: int):
    """The run's spread factors for ``horizon`` steps after ``context``, from its ``metrics.json``."""
    from .evaluate.calibration import SpreadCalibration

    try:
        ol = json.loads(files.file("metrics.json").read_text())["open_loop"]
    except FileNotFoundError:
        ol = {}
    if not ol.get("calibration"):
        raise ValueError(
            "calibrated: the run has no spread factors; `pyro-worldmodel evaluate` fits them on"
            " held-out data with windows in even- and odd-numbered episodes"
        )
    if ol["context"] != context:
        raise ValueError(
            f"context: the spread factors were fitted after {ol['context']} context steps, got"
            f" context={context}"
        )
    spread = SpreadCalibration.from_dict(ol["calibration"])
    if horizon > spread.factor.shape[0]:
        raise ValueError(
            f"horizon: the spread factors reach horizon {spread.factor.shape[0]}, got horizon={horizon}"
        )
    return SpreadCalibration(spread.factor[:horizon], spread.num_windows[:horizon])


def _stage_evaluation(result: Evaluation, tx) -> None:
    from .plots import save_figure

    text = strict_json(result.metrics)  # a value JSON cannot hold fails here, before a file is staged
    for name, fig in result.figures.items():
        if isinstance(fig, bytes):  # an animation, already encoded
            tx.write(f"figures/{name}", lambda f, data=fig: f.write(data))
        else:
            save_figure(fig, tx.path(f"figures/{name}"))
    tx.write("metrics.json", lambda f: f.write(text.encode()))


# ---------------------------------------------------------------- checks shared by the runs


def require_run(run: Path) -> None:
    """Before taking a lock (which would create the directory): is there a run to read?"""
    if run.is_file():
        raise ValueError(f"run: expected a run directory, got the file {run}")
    if RunDirectory(run).pending() is not None:  # a crash after a commit point: finish it first
        check_unlocked(run)
        RunDirectory.open(run, "pyro-worldmodel recover").close()
    check_unlocked(run)
    if not RunDirectory(run).has("model.ckpt"):
        raise FileNotFoundError(
            f"run: expected a checkpoint at {run / 'model.ckpt'}; train one with `pyro-worldmodel train`"
        )


def refuse_replacing(run: RunDirectory, command: str, keep: tuple[str, ...] = ()) -> None:
    """A run or dataset already in the directory is replaced only when asked (``--overwrite``)."""
    held = sorted((name for name in run.files if name not in keep), key=lambda n: (n != "model.ckpt", n))
    if held:
        what = "a trained run" if "model.ckpt" in held else "files of another run"
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise RunDirectoryError(
            f"out: {run.path} already holds {what} ({shown}); pass --overwrite to replace it"
            + (", --resume to continue it" if command in ("train", "loop") else "")
            + ", or choose another --out"
        )


def check_sampling_memory(what: str, value: int, at_once: int, unit: str, steps: int, width: int) -> None:
    """Refuse, before anything is written, sample counts whose tensors cannot fit in memory.

    ``value`` draws for each of ``at_once`` windows (or episodes), of ``steps`` steps of
    ``width`` numbers, are held at once, several times over (observations, their means,
    latents, the traces' copies).
    """
    memory = physical_memory()
    need = 8 * 4 * value * at_once * steps * max(width, 1)
    if memory is not None and need > memory:
        raise ValueError(
            f"{what}: {value} draws for each of {at_once} {unit} at once, of {steps} steps, need"
            f" about {need / 2**30:.0f} GiB, more than this machine's {memory / 2**30:.0f} GiB"
        )


def check_evaluation_memory(s: EvalSettings, arch: Architecture, num_windows: int, max_length: int) -> None:
    spec = Spec.from_dict(arch.spec)
    deter = int(spec.transition.get("deter_dim", 0) or 0)
    width = arch.obs_dim + 2 * spec.latent_dim + deter + arch.action_space["dim"]
    at_once = min(num_windows, s.max_windows, 256)  # open_loop imagines 256 windows at a time
    if arch.image_shape is None:  # video prediction imagines as few windows at a time as fit in 256 MiB
        check_sampling_memory("num_samples", s.num_samples, at_once, "windows", s.context + s.horizon, width)
    check_sampling_memory(
        "iwae_particles", min(s.iwae_particles, 250), num_windows, "episode steps", 1, width
    )


def _check_evaluable(train: Episodes, val: Episodes, context: int, horizon: int, arch=None) -> None:
    if int(val.lengths.max()) <= context:
        raise ValueError(
            f"context: expected a held-out episode longer than context={context} to evaluate on,"
            f" got held-out episodes of at most {int(val.lengths.max())} steps"
        )
    if arch is not None and arch.image_shape is not None:
        return  # video prediction's baselines (the last frame, the mean frame) fit nothing per horizon
    if int(train.lengths.max()) <= horizon:
        raise ValueError(
            f"horizon: expected a training episode longer than horizon={horizon} to fit the"
            f" baselines' errors, got training episodes of at most {int(train.lengths.max())} steps"
        )


def _check_resumable(ckpt: Path, info: dict) -> None:
    """Resume continues only the run that was started: same data, model, split and seed."""
    saved = read_run_info(ckpt)
    differs = [
        f"{key} {saved[key]!r} vs {info[key]!r}"
        for key in ("architecture", "val_fraction", "seed")
        if saved.get(key) != info[key]
    ]
    if differs:
        raise ValueError(
            f"resume: the checkpoint {ckpt} belongs to another run; it differs in {'; '.join(differs)}."
            " Resume with the same data and settings, or train into another --out"
        )


def _writing(path: Path, command: str) -> RunDirectory:
    """Hold ``path``'s lock for this command (one writer per run directory); a directory
    this creates and leaves without a run is removed again when it is closed."""
    return RunDirectory.open(Path(path), f"pyro-worldmodel {command}")


def _episodes_bytes(episodes: Episodes) -> int:
    # uncompressed: a bound on what the file needs (frames are saved compressed)
    return sum(
        getattr(episodes, k).numel() * getattr(episodes, k).element_size()
        for k in ("obs", "actions", "rewards", "mask", "frames", "final_frames")
        if getattr(episodes, k) is not None
    )


def _checkpoint_bytes(model, guide) -> int:
    n = sum(p.numel() * p.element_size() for m in (model, guide) for p in m.state_dict().values())
    return 3 * n + 2**20  # weights, two Adam moments, and the rest


def default_out(episodes: Episodes, data=None) -> Path:
    """``runs/<env id>``, or ``runs/<the data file's name>`` when the data names no
    environment and that name is a plain one, else ``runs/data``: never a path made of text."""
    name = episodes.env_id
    if not name and data is not None:
        try:
            name = check_env_id(Path(data).stem)
        except ValueError:
            name = ""
    return Path("runs") / (name or "data")


def print_metrics(metrics: dict, run: Path, settings: EvalSettings, log=print) -> None:
    """The evaluation's figures as the command line prints them."""
    from .evaluate import OpenLoop, VideoPrediction

    bounds = metrics["heldout"]

    def num(x):
        return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"

    log(
        f"held-out, nats per timestep: ELBO {num(bounds['elbo'])}  IWAE-{settings.iwae_particles}"
        f" {num(bounds['iwae'])}"
    )
    log(f"  log p(x|z) {num(bounds['log_px'])}  log π(a|z) {num(bounds['log_pa'])}  KL {num(bounds['kl'])}")
    if "video" in metrics:
        bits = metrics["heldout_bits_per_dim"]
        log(f"  in bits per pixel value: ELBO {num(bits['elbo'])}  IWAE {num(bits['iwae'])}")
        video = metrics["video"]
        log(
            f"open-loop video after {video['context']} context frames, {video['num_windows']} windows,"
            f" {video['num_samples']} futures each (MSE per pixel, values in [0, 1]):"
        )
        log(VideoPrediction(**video).table())
        probe = metrics.get("state_probe")
        if probe is not None:
            imagined = probe["imagined_r2"]
            at = ", ".join(f"h={h} {imagined[h - 1]:.2f}" for h in (1, 5, 15, 45) if h <= len(imagined))
            log(f"state probe R² (held out): filtered {probe['filtered_r2']:.3f}; imagined {at}")
    else:
        ol = metrics["open_loop"]
        log(
            f"open loop after {settings.context} context steps, {ol['num_windows']} windows (MSE in real units):"
        )
        log(OpenLoop(**ol).table())
    log(f"metrics: {run / 'metrics.json'}\nfigures: {run / 'figures'}/")


def compare_run(
    episodes: Episodes,
    spec,
    out,
    *,
    estimators: list | None = None,
    num_steps: int | None = None,
    batch_size: int | None = None,
    num_particles: int | None = None,
    repeats: int | None = None,
    seeds: int | None = None,
    iwae_particles: int | None = None,
    window: int | None = None,
    val_fraction: float = 0.2,
    init: str = "auto",
    seed: int = 0,
    device=None,
    smoke: bool = False,
    data_label: str | None = None,
):
    """Compare ELBO estimators on one model of ``spec`` and ``episodes``, and commit
    ``compare.md``, ``compare.json`` and ``figures/`` into ``out`` (its own files: the
    rest of the directory stays). :returns: the :class:`~pyro_worldmodel.compare.EstimatorComparison`."""
    from .compare import DEFAULTS, SMOKE, compare_estimators, default_estimators, make_estimator
    from .plots import plot_estimator_comparison, plot_learning_curves, save_figure

    preset = SMOKE if smoke else DEFAULTS
    steps = num_steps or preset["num_steps"]
    batch_size = batch_size or preset["batch_size"]
    if estimators is None:
        estimators = default_estimators(num_particles or preset["num_particles"], steps)
    for estimator in estimators:  # a bad name or keyword fails before anything is trained
        make_estimator(estimator)
    spec = Spec.from_dict(spec)
    out = Path(out)
    window = window if window is not None else (10 if smoke else DEFAULT_WINDOW)
    episodes = model_episodes(episodes, spec)
    prepared = prepare(
        episodes,
        val_fraction=val_fraction,
        seed=seed,
        window=window,
        draws=steps * batch_size,
        scale_obs=scales_observations(spec),
    )
    val = prepared.val[: min(2, len(prepared.val))] if smoke else prepared.val
    pyro.set_rng_seed(seed)
    built = build_model(spec, prepared)
    reason = why_no_linear_warm_start(built.model, built.guide)
    if init == "linear" and reason:
        raise ValueError(f"init: {reason}")
    check_training_data(built.model, built.guide, *prepared.windows)
    info = {
        "env_id": episodes.env_id,
        "data": data_label or f"collected {len(episodes)} episodes",
        "window": window,
        "init": init if init != "auto" else ("linear" if reason is None else "random"),
        "spec": spec.to_dict(),
    }
    check_free_space(out, FIGURES_BYTES, "compare")
    with _writing(out, "compare") as files:
        if init != "random" and reason is None:
            linear_warm_start(built.model, built.guide, *prepared.windows)
        with pyro.validation_enabled(False):  # inputs are checked once, up front, by compare_estimators
            result = compare_estimators(
                *prepared.windows,
                heldout=val.normalized(),
                estimators=estimators,
                model=built.model,
                guide=built.guide,
                repeats=repeats,
                seeds=seeds,
                num_steps=steps,
                batch_size=batch_size,
                iwae_particles=iwae_particles,
                optim=spec.optim,
                seed=seed,
                device=device,
                smoke=smoke,
                info=info,
            )
        figures = {
            "estimators.png": plot_estimator_comparison(result),
            "learning_curves.png": plot_learning_curves(result),
        }
        report = result.markdown()
        text = strict_json(result.to_dict())
        tx = files.transaction("compare")  # its own files: anything else in the directory stays
        for name, fig in figures.items():
            save_figure(fig, tx.path(f"figures/{name}"))
        tx.write("compare.md", lambda f: f.write(report.encode()))
        tx.write("compare.json", lambda f: f.write(text.encode()))
        tx.commit()
    return result
