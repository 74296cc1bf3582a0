"""The model-based loop: collect, train the world model, act with a planner, repeat.

::

    data = random episodes
    for each iteration:
        train model and guide on windows of all the data (ELBO with reward and continue heads)
        train the planner in imagination (actor-critic only)
        act in the real environment with the planner (plus exploration noise); add the episodes
        evaluate: the planner's mean return over evaluation episodes, without noise

The environment is reached only through :mod:`pyro_worldmodel.data`
(:func:`~pyro_worldmodel.data.collect`, :func:`~pyro_worldmodel.data.play`).
Environment steps count the steps of the episodes added to the data;
evaluation episodes are not training data and are not counted.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyro
import torch

from .act import Agent, CEMPlanner, posterior_states, reward_units
from .config import Spec, build
from .data import Episodes, Pixels, collect, observation_scale_floor, play
from .errors import RunDirectoryError
from .infer import fit, linear_warm_start, why_no_linear_warm_start
from .io import (
    RunDirectory,
    check_free_space,
    check_unlocked,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    strict_json,
)
from .spaces import check_device, check_int
from .workflow import WINDOW_REPEATS, Architecture, run_info
from .workflow import observes_frames as _observes_frames

LOOP_FORMAT = "pyro_worldmodel.loop/1"


@dataclass
class LoopResult:
    """One run of :func:`model_based_loop`: a row per iteration."""

    env_id: str
    planner: str
    spec: dict
    settings: dict
    iterations: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"format": LOOP_FORMAT, **asdict(self)}

    @property
    def env_steps(self) -> list[int]:
        return [row["env_steps"] for row in self.iterations]

    @property
    def eval_returns(self) -> list[float | None]:
        return [row["eval_return"] for row in self.iterations]

    def first_reaching(self, target: float) -> dict | None:
        """The first iteration whose evaluation return is ≥ ``target``, or None."""
        for row in self.iterations:
            if row["eval_return"] is not None and row["eval_return"] >= target:
                return row
        return None


def model_based_loop(
    env_id: str,
    spec=None,
    *,
    iterations: int = 10,
    seed_episodes: int = 5,
    episodes_per_iteration: int = 1,
    train_steps: int = 300,
    batch_size: int = 32,
    window: int = 50,
    eval_episodes: int = 10,
    eval_every: int = 1,
    context: int = 16,
    explore: float = 0.3,
    max_env_steps: int | None = None,
    stop_at: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    pixels: Pixels | bool | None = None,
) -> LoopResult:
    """Collect, train, act with a planner, add the episodes, train again; ``iterations`` times.

    :param env_id: a gymnasium id (rank-1 Box observations; Box or Discrete actions).
    :param spec: the model, guide, ELBO, optimiser and planner (a dict,
        :class:`~pyro_worldmodel.config.Spec` or YAML); must have a reward head.
        ``Spec.preset("loop")`` if None: the default model with the heads, CEM and the
        transition's scale floored higher (see ``presets.yaml``).
    :param seed_episodes: random-action episodes collected first.
    :param episodes_per_iteration: episodes the planner adds each iteration.
    :param train_steps: SVI steps per iteration (the model keeps training; the optimiser keeps its state).
    :param window: training windows' length.
    :param eval_episodes: episodes per evaluation, run in parallel, with no exploration noise.
    :param eval_every: evaluate every this many iterations (and after the last).
    :param context: steps the guide filters to act.
    :param explore: exploration noise while collecting (see :class:`Agent`).
    :param max_env_steps: stop before an iteration would collect past this many steps.
    :param stop_at: stop once an evaluation's mean return reaches this.
    :param device: where the model, guide and planner live and plan, e.g. ``"cuda"``.
    :param out: a run directory for ``loop.json``, ``loop.png``, ``model.ckpt`` and
        ``episodes.npz``. It is locked while the loop runs, and after every iteration
        the four files are committed together (:class:`~pyro_worldmodel.io.RunDirectory`),
        so a crash leaves the last complete iteration.
    :param resume: continue the loop in ``out`` from its last complete iteration; the
        result is the one an uninterrupted run with the same settings and seed gives.
    :param overwrite: replace a loop already in ``out`` (refused otherwise).
    :param log: called with one line per iteration (None: silent).
    :param pixels: for a spec that reads frames (e.g. the ``pixels`` preset over ``loop``):
        how they are rendered (:class:`~pyro_worldmodel.data.Pixels`; None or True: 64×64
        RGB). The model then sees only frames, collecting and acting; the state is kept
        beside them. Refused for a spec of vector observations.
    """
    for arg, value, low in (
        ("iterations", iterations, 1),
        ("seed_episodes", seed_episodes, 1),
        ("episodes_per_iteration", episodes_per_iteration, 1),
        ("train_steps", train_steps, 1),
        ("batch_size", batch_size, 1),
        ("window", window, 2),
        ("eval_episodes", eval_episodes, 1),
        ("eval_every", eval_every, 1),
        ("context", context, 1),
    ):
        check_int(arg, value, low)
    if max_env_steps is not None:
        check_int("max_env_steps", max_env_steps, 1)
    if isinstance(explore, bool) or not isinstance(explore, (int, float)) or not 0 <= explore < math.inf:
        raise ValueError(f"explore: expected a finite number >= 0, got {explore!r}")
    if stop_at is not None and (
        isinstance(stop_at, bool) or not isinstance(stop_at, (int, float)) or math.isnan(stop_at)
    ):
        raise ValueError(f"stop_at: expected a number, got {stop_at!r}")
    if resume and out is None:
        raise ValueError("resume: expected an out directory to resume from, got out=None")
    device = check_device(device)
    spec = Spec.preset("loop") if spec is None else spec
    spec = Spec.from_yaml(spec) if isinstance(spec, (str, Path)) else Spec.from_dict(spec)
    if _observes_frames(spec):
        if pixels is False:
            raise ValueError(
                "pixels: expected frames for a spec whose encoder or emission reads them, got False"
            )
        pixels = Pixels() if pixels in (None, True) else pixels
        if not isinstance(pixels, Pixels):
            raise ValueError(f"pixels: expected a bool or a Pixels, got {type(pixels).__name__}")
    elif pixels not in (None, False):
        raise ValueError(
            "pixels: the spec reads vector observations; give it an encoder or emission that reads"
            " frames (e.g. --preset loop --preset pixels) to act from them"
        )
    else:
        pixels = False
    if spec.reward is None:
        raise ValueError(
            "spec: the loop plans with the model's reward head, and this spec has none;"
            " add reward: {name: gaussian} (and continuation: {name: bernoulli} for episodes that terminate)"
        )
    if spec.planner is None:
        spec = replace(spec, planner={"name": "cem"})
    settings = dict(
        iterations=iterations,
        seed_episodes=seed_episodes,
        episodes_per_iteration=episodes_per_iteration,
        train_steps=train_steps,
        batch_size=batch_size,
        window=window,
        eval_episodes=eval_episodes,
        eval_every=eval_every,
        context=context,
        explore=explore,
        max_env_steps=max_env_steps,
        stop_at=stop_at,
        seed=seed,
        pixels=None if not pixels else {"size": list(pixels.size), "grayscale": pixels.grayscale},
    )
    log = log or (lambda line: None)
    # The environment is made once before anything is written: an unknown id, a missing
    # optional dependency or an unsupported space is refused here.
    floor = observation_scale_floor(env_id)
    run = None
    if out is not None:
        check_unlocked(out)
        # a checkpoint, the dataset and the figure, staged beside the last iteration's
        check_free_space(out, 64 * 2**20, "loop")
        run = RunDirectory.open(Path(out), "pyro-worldmodel loop")
    try:
        return _loop(env_id, spec, settings, run, resume, overwrite, device, progress, log, floor)
    finally:
        if run is not None:
            run.close()


def _loop(env_id, spec, settings, run, resume, overwrite, device, progress, log, floor) -> LoopResult:
    s = SimpleNamespace(**settings)
    seed = s.seed
    pixels = False if s.pixels is None else Pixels(tuple(s.pixels["size"]), s.pixels["grayscale"])
    saved = None
    if run is not None:
        if resume and run.has("model.ckpt"):
            saved = _read_loop_state(run, spec, settings)
        elif run.files and not overwrite:
            raise RunDirectoryError(
                f"out: {run.path} already holds a loop ({', '.join(list(run.files)[:4])}); pass"
                " --overwrite (overwrite=True) to replace it, --resume (resume=True) to continue it,"
                " or choose another directory"
            )
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    if saved is None:
        data = collect(env_id, s.seed_episodes, seed=seed, progress=progress, pixels=pixels)
        if pixels:  # the frames are what the model observes, in pixel values
            data = data.frames_as_obs()
            normalizer = data.fit_normalizer(scale_obs=False).normalizer
        else:
            # Fixed from here, so the model's units never move; floored by the observation
            # space's bounds, as the planner will go where random actions did not.
            normalizer = data.fit_normalizer(floor).normalizer
    else:
        data, normalizer = saved["data"], saved["normalizer"]
    real_space = data.action_space
    pyro.set_rng_seed(seed)
    built = build(spec, data.obs_dim, normalizer.action_space(real_space), image_shape=data.obs_image_shape)
    model, guide, planner = built.model, built.guide, built.planner
    if device is not None:
        for part in (model, guide, planner):
            if isinstance(part, torch.nn.Module):
                part.to(device)
    if spec.continuation is None and bool(data.terminated.any()):
        log(
            "note: episodes terminate but the spec has no continuation head; planners will ignore termination"
        )
    result = LoopResult(
        env_id=data.env_id, planner=spec.planner["name"], spec=spec.to_dict(), settings=settings
    )
    generator = torch.Generator().manual_seed(seed)
    first = 0
    if saved is not None:
        load_checkpoint(saved["checkpoint"], model, guide, built.optim)
        state = saved["state"]
        if callable(getattr(planner, "load_training_state", None)):
            planner.load_training_state(state.get("planner"))
        generator.set_state(state["generator"])
        if isinstance(getattr(built.elbo, "step", None), int):  # a schedule over SVI steps
            built.elbo.step = int(state["elbo_step"])
        result.iterations = saved["rows"]
        first = len(result.iterations)
        start -= result.iterations[-1]["seconds"]
        if state.get("finished"):
            log(f"the loop in {run.path} is complete ({first} iterations); nothing to resume")
            result.seconds = result.iterations[-1]["seconds"]
            return result
        log(f"resuming the loop in {run.path} at iteration {first}")
    # Episode seeds never repeat those of the random episodes.
    ep_seed = seed + 1000 + first * s.episodes_per_iteration
    for it in range(first, s.iterations):
        units = replace(data, normalizer=normalizer).in_model_units()
        num = max(int(units.lengths.sum()) // s.window, 1) * WINDOW_REPEATS
        obs, actions, mask, rewards, continues = units.windows(
            min(s.window, int(units.lengths.max())), num, generator=generator, targets=True
        )
        if it == 0 and why_no_linear_warm_start(model, guide) is None:
            linear_warm_start(model, guide, obs, actions, mask)
        t0 = time.perf_counter()
        with pyro.validation_enabled(False):
            history = fit(
                model,
                guide,
                obs,
                actions,
                mask,
                **model.targets(rewards, continues),  # a spec may have a reward head only
                num_steps=s.train_steps,
                batch_size=s.batch_size,
                elbo=built.elbo,
                optim=built.optim,
                seed=seed + it,
                progress=progress,
            )
        train_seconds = time.perf_counter() - t0
        planner_stats = None
        if _learns_in_imagination(planner):
            starts = posterior_states(model, guide, obs, actions, mask)
            planner_stats = planner.update(model, starts, **reward_units(normalizer, model))

        def agent(noise):
            return Agent(
                model,
                guide,
                planner,
                normalizer,
                real_space,
                context=s.context,
                explore=noise,
                generator=generator,
            )

        new = play(
            env_id, agent(s.explore), s.episodes_per_iteration, seed=ep_seed, progress=False, pixels=pixels
        )
        if pixels:
            new = new.frames_as_obs()
        ep_seed += s.episodes_per_iteration
        data = data + new
        env_steps = int(data.lengths.sum())
        last = it == s.iterations - 1 or (
            s.max_env_steps is not None and env_steps + _expected(new) > s.max_env_steps
        )
        eval_return = eval_std = None
        if (it + 1) % s.eval_every == 0 or last:
            evaluation = play(
                env_id,
                agent(0.0),
                s.eval_episodes,
                seed=10**6 + it * s.eval_episodes,
                num_envs=s.eval_episodes,
                progress=False,
                pixels=pixels,
            )
            eval_return, eval_std = (
                float(evaluation.returns.mean()),
                float(evaluation.returns.std(unbiased=False)),
            )
        row = {
            "iteration": it,
            "env_steps": env_steps,
            "episodes": len(data),
            "collect_return": float(new.returns.mean()),
            "eval_return": eval_return,
            "eval_return_std": eval_std,
            "loss": float(np.mean(history.loss[-max(1, s.train_steps // 10) :])),
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - start,
            **({"planner": planner_stats} if planner_stats else {}),
        }
        result.iterations.append(row)
        result.seconds = row["seconds"]
        log(
            f"iteration {it}: {env_steps} env steps, collected return {row['collect_return']:.1f}"
            + ("" if eval_return is None else f", evaluation return {eval_return:.1f} ± {eval_std:.1f}")
            + f", loss {row['loss']:.3f}, {row['seconds']:.0f} s"
        )
        finished = last or (s.stop_at is not None and eval_return is not None and eval_return >= s.stop_at)
        if run is not None:
            state = {
                "generator": generator.get_state(),
                "elbo_step": int(getattr(built.elbo, "step", 0) or 0),
                "finished": bool(finished),
            }
            if callable(getattr(planner, "training_state", None)):
                state["planner"] = planner.training_state()
            _write(
                run, result, model, guide, built.optim, state, data, normalizer, Architecture.of(data, spec)
            )
        if finished:
            break
    return result


def _expected(new: Episodes) -> int:
    """Steps the next iteration is likely to add: as many as this one's."""
    return int(new.lengths.sum())


def _learns_in_imagination(planner) -> bool:
    """Whether the planner has something to train on imagined rollouts (its ``update``):
    the actor-critic, or CEM with a terminal value."""
    if isinstance(planner, CEMPlanner):
        return planner.critic is not None
    return callable(getattr(planner, "update", None))


def _write(
    run: RunDirectory,
    result: LoopResult,
    model,
    guide,
    optim,
    state,
    data: Episodes,
    normalizer,
    arch,
) -> None:
    """One iteration's files, committed together: a reader sees this iteration or the last, whole."""
    from .plots import plot_loop, save_figure

    fig = plot_loop(result)
    text = strict_json(result.as_dict())
    tx = run.transaction("loop", replace=True)
    save_checkpoint(
        tx.path("model.ckpt"),
        model,
        guide,
        optim,
        run=run_info(arch, normalizer, val_fraction=None, seed=result.settings["seed"]),
        loop=result.as_dict(),
        loop_state=state,
    )
    replace(data, normalizer=normalizer).save(tx.path("episodes.npz"))
    tx.write("loop.json", lambda f: f.write(text.encode()))
    save_figure(fig, tx.path("loop.png"))
    tx.commit()


def _read_loop_state(run: RunDirectory, spec: Spec, settings: dict) -> dict:
    """What a resumed loop continues from, checked against the settings it is resumed with."""
    ckpt = run.file("model.ckpt")
    extra = read_checkpoint(ckpt)["extra"]
    loop, state = extra.get("loop"), extra.get("loop_state")
    if not isinstance(loop, dict) or loop.get("format") != LOOP_FORMAT or not isinstance(state, dict):
        raise RunDirectoryError(f"resume: {ckpt} was not written by the model-based loop")
    differs = [
        f"{key} {loop['settings'].get(key)!r} vs {value!r}"
        for key, value in settings.items()
        if loop.get("settings", {}).get(key) != value
    ]
    if loop.get("spec") != spec.to_dict():
        differs.append("the spec")
    if differs:
        raise ValueError(
            f"resume: the loop in {run.path} was run with other settings; it differs in"
            f" {'; '.join(differs)}. Resume with the same settings, or pass --overwrite"
        )
    data = Episodes.load(run.file("episodes.npz"))
    if data.normalizer is None:
        raise RunDirectoryError(f"resume: {run.path / 'episodes.npz'} has no normaliser")
    rows = loop.get("iterations")
    if not isinstance(rows, list) or not rows:
        raise RunDirectoryError(f"resume: {ckpt} records no iteration")
    return {
        "checkpoint": ckpt,
        "state": state,
        "data": replace(data, normalizer=None),
        "normalizer": data.normalizer,
        "rows": rows,
    }
