"""The ``pyro-worldmodel`` command: collect, train, evaluate, imagine, compare and loop.

Every subcommand works in a run directory::

    runs/Pendulum-v1/
      episodes.npz     the dataset, with the normalisation fitted on its training split
      model.ckpt       model, guide, optimiser and what rebuilds them
      metrics.json     held-out bounds and open-loop prediction against the baselines
      figures/         training.png, kl_per_t.png, open_loop.png, imagination.png
      run.json         the manifest: every file of the run with its SHA-256, written last

``pyro-worldmodel train`` with no arguments is the default job: collect
Pendulum-v1 with random actions, train the default model, evaluate it and
draw the figures. ``pyro-worldmodel compare`` compares ELBO estimators on one
model and dataset and writes ``compare/`` (compare.md, compare.json, figures/).

A run directory is written as a transaction (:class:`pyro_worldmodel.io.RunDirectory`):
every input is checked before anything is written, one process at a time holds
the directory's lock, and what a command writes becomes the run at one commit,
so a crash or a refusal leaves the previous run whole. A user error is printed
as one line with exit status 2; a bug shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import pyro
import torch

from . import workflow
from .config import Spec, load_yaml, yaml_value
from .data import Episodes, Pixels, collect
from .errors import WorldModelError
from .infer import DataParallel
from .io import check_unlocked
from .spaces import check_device

DEFAULT_ENV = "Pendulum-v1"


# ---------------------------------------------------------------- subcommands


def _pixels(args) -> Pixels | None:
    """The frames that ``--pixels``, ``--frame-size`` and ``--grayscale`` ask for; None without
    ``--pixels``, where the other two are refused."""
    if args.pixels:
        return Pixels(args.frame_size, args.grayscale)
    for flag, given in (("--grayscale", args.grayscale), ("--frame-size", args.frame_size != 64)):
        if given:
            raise ValueError(f"{flag}: expected together with --pixels, got it without")
    return None


def cmd_collect(args) -> Path:
    pixels = _pixels(args)
    return workflow.collect_run(
        args.env,
        args.episodes,
        args.out,
        seed=args.seed,
        num_envs=args.num_envs,
        max_episode_steps=args.max_episode_steps,
        overwrite=args.overwrite,
        pixels=pixels or False,
        action_repeat=args.action_repeat,
    )


def cmd_train(args) -> dict:
    # Everything that can be refused is checked before the run directory is touched.
    if args.out is not None:
        check_unlocked(args.out)  # before collecting or building, which a busy directory would waste
    spec = _train_spec(args)
    pyro.set_rng_seed(args.seed)
    if args.data is not None:
        episodes = _load_episodes(args.data)
    else:
        frames = workflow.observes_frames(spec)  # a model of frames: collect them too
        episodes = collect(  # every rank of a data-parallel train collects the same episodes
            args.env, args.episodes, seed=args.seed, num_envs=args.num_envs, pixels=frames, progress=_leader()
        )
    if args.out is None:  # named after the data's environment, not --env's default
        args.out = workflow.default_out(episodes, args.data)
    evaluation = None if args.no_evaluate else _eval_settings(args)
    settings = workflow.TrainSettings(
        val_fraction=args.val_fraction,
        seed=args.seed,
        window=args.window,
        init=args.init,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        evaluate=evaluation,
    )
    metrics = workflow.train_run(episodes, spec, args.out, settings, data_path=args.data)
    if metrics:
        workflow.print_metrics(metrics, args.out, evaluation)
    return metrics


def _eval_settings(args) -> workflow.EvalSettings:
    return workflow.EvalSettings(
        context=args.context,
        horizon=args.horizon,
        num_samples=args.num_samples,
        iwae_particles=args.iwae_particles,
        max_windows=args.max_windows,
        seed=args.seed,
        episode=getattr(args, "episode", None),
        calibrate=not getattr(args, "no_calibrate", False),
    )


def _spec(args, default: Spec) -> Spec:
    """The spec a command builds: ``--config`` (or ``default``), then ``--preset``s, then ``--set``."""
    spec = _config(args.config, default)
    if getattr(args, "preset", None):
        spec = spec.with_presets(*args.preset)
    return spec.with_overrides(dict(args.set or []))


def _train_spec(args) -> Spec:
    """The spec of a train run: --config, --preset, --set, then the explicit flags, with the schedule."""
    spec = _spec(args, Spec())
    flags = {
        "latent_dim": args.latent_dim,
        "transition.hidden": args.hidden,
        "emission.hidden": args.hidden,
        "guide.rnn_dim": args.rnn_dim,
        "train.num_steps": args.steps,
        "train.batch_size": args.batch_size,
        "optim.lr": args.lr,
    }
    spec = spec.with_overrides({k: v for k, v in flags.items() if v is not None})
    spec = workflow.training_spec(spec, final_lr=args.lr_decay)
    for key in ("model", "guide", "elbo", "optim", "checkpoint", "resume", "device", "seed", "extra"):
        if key in spec.train:
            raise ValueError(f"train.{key}: set by the command line, not by the spec")
    return spec


def _config(path, default: Spec) -> Spec:
    """``--config``: always a file, whatever its name; errors name the option."""
    if path is None:
        return default
    try:
        return Spec.from_file(path)
    except ValueError as e:
        raise ValueError(f"--config: {e}") from None


def key_value(text: str) -> tuple[str, object]:
    """``key.path=value`` with the value read as YAML: ``[128, 128]``, ``0.5``, ``1e-4``, ``filter``."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE such as transition.hidden=[128,128], got {text!r}"
        )
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml_value(value, f"--set {key.strip()}")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _load_episodes(path: Path, what: str = "data") -> Episodes:
    """An episodes file named on the command line; every value checked (see :class:`Episodes`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: expected an episodes .npz file, got the directory {path}")
    return Episodes.load(path)


def cmd_evaluate(args) -> dict:
    data = None if args.data is None else _load_episodes(args.data)
    settings = _eval_settings(args)
    metrics = workflow.evaluate_run(Path(args.run), settings, data=data, device=args.device)
    workflow.print_metrics(metrics, Path(args.run), settings)
    return metrics


def cmd_imagine(args) -> Path:
    data = None if args.data is None else _load_episodes(args.data)
    path = workflow.imagine_run(
        Path(args.run),
        data=data,
        episode=args.episode,
        start_step=args.start,
        context=args.context,
        horizon=args.horizon,
        num_samples=args.num_samples,
        policy=args.policy == "model",
        seed=args.seed,
        device=args.device,
        calibrated=args.calibrated,
    )
    print(
        f"imagined {args.num_samples} futures of {args.horizon} steps after {args.context} steps of episode {args.episode}"
    )
    print(f"samples: {path}\nfigure: {Path(args.run) / 'figures' / 'imagination.png'}")
    return path


def cmd_compare(args) -> dict:
    """Compare ELBO estimators on one model, guide and dataset; write compare.md, compare.json, figures/."""
    from .compare import make_estimator

    estimators = None if args.estimators is None else _estimators_option(args.estimators)
    for estimator in estimators or []:  # a bad name or keyword fails before any data is collected
        make_estimator(estimator)
    spec = _spec(args, Spec())
    pyro.set_rng_seed(args.seed)
    if args.data is not None:
        episodes = _load_episodes(args.data)
    else:
        episodes = collect(
            args.env,
            args.episodes or (6 if args.smoke else 60),
            seed=args.seed,
            num_envs=args.num_envs,
            max_episode_steps=50 if args.smoke else None,
        )
    out = args.compare_out or workflow.default_out(episodes, args.data) / "compare"
    result = workflow.compare_run(
        episodes,
        spec,
        out,
        estimators=estimators,
        num_steps=args.steps,
        batch_size=args.batch_size,
        num_particles=args.particles,
        repeats=args.repeats,
        seeds=args.seeds,
        iwae_particles=args.iwae_particles,
        window=args.window,
        val_fraction=args.val_fraction,
        init=args.init,
        seed=args.seed,
        device=args.device,
        smoke=args.smoke,
        data_label=None if args.data is None else str(args.data),
    )
    print(result.table())
    for note in result.notes():
        print(f"  {note}")
    print(f"report: {out / 'compare.md'}\njson: {out / 'compare.json'}\nfigures: {out / 'figures'}/")
    return result.to_dict()


def cmd_presets(args) -> dict:
    """List the named presets, or print one's spec as YAML."""
    presets = Spec.presets()
    if args.name:
        print(Spec.preset(*args.name).to_yaml(), end="")
        return presets
    width = max(map(len, presets))
    for name, description in presets.items():
        print(f"{name:<{width}}  {description}")
    print(
        "\nuse them as --preset NAME [NAME ...] with train, compare and loop, or Spec.preset(...) in Python"
    )
    return presets


def cmd_loop(args) -> dict:
    from .loop import model_based_loop

    pixels = _pixels(args)  # None: the loop follows the spec
    spec = _config(args.config, Spec.preset("loop"))
    if getattr(args, "preset", None):
        spec = spec.with_presets(*args.preset)
    if pixels is not None and not workflow.observes_frames(spec):
        spec = spec.with_presets("pixels")  # acting from frames: the image parts over the loop's spec
    if spec.planner is None:
        spec = replace(spec, planner={"name": "cem"})
    if args.planner is not None and args.planner != spec.planner["name"]:  # another planner: its defaults
        spec = replace(spec, planner={"name": args.planner})
    spec = spec.with_overrides(dict(args.set or []))
    settings = dict(
        iterations=args.iterations,
        seed_episodes=args.seed_episodes,
        episodes_per_iteration=args.episodes_per_iteration,
        train_steps=args.train_steps,
        batch_size=args.batch_size,
        window=args.window,
        eval_episodes=args.eval_episodes,
        eval_every=args.eval_every,
        context=args.context,
        explore=args.explore,
        max_env_steps=args.max_env_steps,
        stop_at=args.stop_at,
    )
    if args.smoke:
        settings.update(iterations=2, seed_episodes=2, train_steps=10, eval_episodes=2, window=20)
        if spec.planner and spec.planner.get("name") == "cem":
            spec = spec.with_overrides({"planner.candidates": 50, "planner.top_k": 5, "planner.horizon": 5})
        if spec.planner and spec.planner.get("name") == "actor_critic":
            spec = spec.with_overrides({"planner.updates": 5, "planner.horizon": 5})
    out = args.out
    result = model_based_loop(
        args.env,
        spec,
        seed=args.seed,
        out=out,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        pixels=pixels,
        **settings,
    )
    best = max((r["eval_return"] for r in result.iterations if r["eval_return"] is not None), default=None)
    print(
        f"{result.env_id} with the {result.planner} planner: {len(result.iterations)} iterations,"
        f" {result.env_steps[-1]} environment steps, best evaluation return"
        f" {'n/a' if best is None else f'{best:.1f}'}, {result.seconds:.0f} s"
    )
    print(f"results: {out / 'loop.json'}; figure: {out / 'loop.png'}; checkpoint: {out / 'model.ckpt'}")
    return result.as_dict()


def _estimators_option(text: str) -> list:
    """``--estimators``: a YAML list (or a .yaml file of one) of names and spec dicts."""
    if "\n" not in text and Path(text).suffix in (".yaml", ".yml"):
        path = Path(text)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"estimators: cannot read {path}: {e}") from None
    value = load_yaml(text, "estimators")
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(
            "estimators: expected a YAML list of names or dicts such as"
            f" '[Trace_ELBO, {{name: RenyiELBO, alpha: 0, num_particles: 8}}]', got {text!r}"
        )
    return value


# ---------------------------------------------------------------- parser


def _device(value: str) -> str:
    try:
        check_device(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("device: ")) from None
    return value


def _arg_type(convert, ok, expected: str):
    """An argparse ``type`` that converts, then checks, and says what it expected."""

    def parse(value: str):
        try:
            x = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return x

    parse.__name__ = expected
    return parse


positive_int = _arg_type(int, lambda n: n >= 1, "a positive int")
non_negative_int = _arg_type(int, lambda n: n >= 0, "an int >= 0")
positive_float = _arg_type(float, lambda x: x > 0.0, "a positive number")
non_negative_float = _arg_type(float, lambda x: x >= 0.0, "a number >= 0")
decay = _arg_type(float, lambda x: 0.0 < x <= 1.0, "a number in (0, 1]")
fraction = _arg_type(float, lambda x: 0.0 < x < 1.0, "a number in (0, 1)")
_at_least_two = _arg_type(int, lambda n: n >= 2, "an int >= 2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-worldmodel",
        description="Latent world models as Pyro programs: collect data, train, evaluate, imagine.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{collect,train,evaluate,imagine,compare,loop,presets}"
    )

    def common(p, out=True):
        p.add_argument(
            "--seed", type=int, default=0, help="seeds everything; the same seed gives the same metrics"
        )
        p.add_argument("--device", type=_device, default="cpu", help="torch device (default: cpu)")
        if out:
            p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<env id>)")

    p = sub.add_parser("collect", help="collect episodes from a gymnasium environment")
    p.add_argument("--env", default=DEFAULT_ENV, help=f"gymnasium id (default: {DEFAULT_ENV})")
    p.add_argument("--episodes", type=positive_int, default=50, help="episodes to collect (default: 50)")
    p.add_argument("--num-envs", type=positive_int, default=8, help="vector environments (default: 8)")
    p.add_argument("--max-episode-steps", type=positive_int, default=None, help="override the time limit")
    _pixel_options(p, "also record the rendered frames (uint8, beside the state)")
    p.add_argument(
        "--action-repeat", type=positive_int, default=1, help="environment steps per action (default: 1)"
    )
    _overwrite_option(p)
    common(p)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser(
        "train",
        help="train a world model (with no arguments: the default job on Pendulum-v1)",
        description="Collect (or load) data, train the default model, then evaluate it and draw figures.",
    )
    p.add_argument(
        "--env", default=DEFAULT_ENV, help=f"gymnasium id to collect from (default: {DEFAULT_ENV})"
    )
    p.add_argument(
        "--data", type=Path, default=None, help="an episodes .npz to train on instead of collecting"
    )
    p.add_argument("--episodes", type=positive_int, default=60, help="episodes to collect (default: 60)")
    p.add_argument("--num-envs", type=positive_int, default=8, help="vector environments (default: 8)")
    p.add_argument("--val-fraction", type=fraction, default=0.2, help="episodes held out (default: 0.2)")
    p.add_argument(
        "--config", type=Path, default=None, help="a YAML spec of the model, guide, ELBO and training"
    )
    _preset_option(p)
    p.add_argument(
        "--set",
        type=key_value,
        action="append",
        metavar="KEY=VALUE",
        help="override a spec entry, e.g. --set transition.hidden=[128,128] (repeatable)",
    )
    p.add_argument(
        "--steps", type=positive_int, default=None, help=f"SVI steps (default: {workflow.DEFAULT_STEPS})"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"windows per step (default: {workflow.DEFAULT_BATCH_SIZE})",
    )
    p.add_argument(
        "--window", type=non_negative_int, default=30, help="training window length; 0 for whole episodes"
    )
    p.add_argument("--lr", type=positive_float, default=None, help="initial learning rate (default: 1e-3)")
    p.add_argument(
        "--lr-decay", type=decay, default=None, help="final lr as a fraction of --lr (default: 0.01)"
    )
    p.add_argument("--latent-dim", type=positive_int, default=None, help="size of z_t (default: 8)")
    p.add_argument(
        "--hidden",
        type=positive_int,
        nargs="+",
        default=None,
        help="transition and emission MLP widths (default: 64 64)",
    )
    p.add_argument("--rnn-dim", type=positive_int, default=None, help="guide GRU size (default: 64)")
    p.add_argument(
        "--init",
        choices=["auto", "linear", "random"],
        default="auto",
        help="start at the least-squares linear system of the data (see pyro_worldmodel/infer/warm_start.py), or at random;"
        " auto (default) is linear wherever the spec's components allow it",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run: an interrupted train from its last good checkpoint, same settings",
    )
    _overwrite_option(p)
    p.add_argument("--no-evaluate", action="store_true", help="skip evaluation and its figures")
    _eval_options(p)
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="held-out bounds and open-loop prediction against baselines")
    p.add_argument("--run", type=Path, default=None, help="run directory (default: runs/<env id>)")
    p.add_argument("--env", default=DEFAULT_ENV, help="names the default run directory")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="episodes .npz to evaluate on (default: the run's held-out split)",
    )
    p.add_argument(
        "--episode",
        type=int,
        default=None,
        help="episode whose first window imagination.png draws (default: a random window, the median"
        " one and the 10th-percentile one by the model's log-likelihood)",
    )
    _eval_options(p)
    common(p, out=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("imagine", help="dream futures after a context and plot them against reality")
    p.add_argument("--run", type=Path, default=None, help="run directory (default: runs/<env id>)")
    p.add_argument("--env", default=DEFAULT_ENV, help="names the default run directory")
    p.add_argument(
        "--data", type=Path, default=None, help="episodes .npz (default: the run's held-out split)"
    )
    p.add_argument("--episode", type=int, default=0, help="which episode (default: 0)")
    p.add_argument("--start", type=int, default=0, help="first context step (default: 0)")
    p.add_argument("--context", type=positive_int, default=5, help="context steps (default: 5)")
    p.add_argument("--horizon", type=positive_int, default=30, help="steps to imagine (default: 30)")
    p.add_argument("--num-samples", type=positive_int, default=100, help="futures to draw (default: 100)")
    p.add_argument(
        "--policy",
        choices=["data", "model"],
        default="data",
        help="future actions: the recorded ones, or sampled from the learned π (default: data)",
    )
    p.add_argument(
        "--calibrated",
        action="store_true",
        help="move the futures about their mean by the spread factors evaluate fitted (metrics.json);"
        " they hold for its context and reach its horizon",
    )
    common(p, out=False)
    p.set_defaults(func=cmd_imagine)

    p = sub.add_parser(
        "compare",
        help="compare ELBO estimators on one model, guide and dataset",
        description="For each estimator, from the same initial parameters and seed: the bound, the"
        " variance of the loss and of the gradient, the gradient SNR, time and memory per step, and"
        " training (held-out ELBO and IWAE). Writes compare.md, compare.json and figures/.",
    )
    p.add_argument(
        "--env", default=DEFAULT_ENV, help=f"gymnasium id to collect from (default: {DEFAULT_ENV})"
    )
    p.add_argument(
        "--data", type=Path, default=None, help="an episodes .npz to compare on instead of collecting"
    )
    p.add_argument(
        "--episodes", type=positive_int, default=None, help="episodes to collect (default: 60; smoke: 6)"
    )
    p.add_argument("--num-envs", type=positive_int, default=8, help="vector environments (default: 8)")
    p.add_argument("--val-fraction", type=fraction, default=0.2, help="episodes held out (default: 0.2)")
    p.add_argument("--config", type=Path, default=None, help="a YAML spec of the model and guide")
    _preset_option(p)
    p.add_argument(
        "--set",
        type=key_value,
        action="append",
        metavar="KEY=VALUE",
        help="override a spec entry, e.g. --set latent_dim=4 (repeatable)",
    )
    p.add_argument(
        "--estimators",
        default=None,
        metavar="YAML",
        help="a YAML list (or .yaml file) of estimators, e.g. '[Trace_ELBO, {name: RenyiELBO, alpha: 0,"
        " num_particles: 8}]' (default: the built-in list)",
    )
    p.add_argument(
        "--particles",
        type=positive_int,
        default=None,
        help="K of the default list's Rényi and tail-adaptive (default: 8)",
    )
    p.add_argument(
        "--repeats", type=_at_least_two, default=None, help="draws of the bound and gradient (default: 30)"
    )
    p.add_argument(
        "--steps", type=_at_least_two, default=None, help="training steps per estimator (default: 200)"
    )
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help="trainings per estimator from the same start, seeds --seed, --seed + 1, ... (default: 3)",
    )
    p.add_argument("--batch-size", type=positive_int, default=None, help="windows per step (default: 32)")
    p.add_argument(
        "--window",
        type=non_negative_int,
        default=None,
        help="training window length; 0 for whole episodes (default: 30)",
    )
    p.add_argument(
        "--iwae-particles",
        type=positive_int,
        default=None,
        help="K of the held-out IWAE estimate (default: 100)",
    )
    p.add_argument(
        "--init",
        choices=["auto", "linear", "random"],
        default="auto",
        help="initial parameters, as for train (default: auto)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny settings that finish in seconds")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        dest="compare_out",
        help="output directory (default: runs/<env id>/compare)",
    )
    common(p, out=False)
    p.set_defaults(func=cmd_compare)

    from .act import PLANNERS

    p = sub.add_parser(
        "loop",
        help="the model-based loop: collect, train, act with a planner, repeat",
        description="Collect random episodes, then each iteration: train the world model (with its"
        " reward and continue heads) on all the data, act in the environment with a planner that"
        " uses only the model, add those episodes, and evaluate. Writes loop.json, loop.png,"
        " model.ckpt and episodes.npz after every iteration.",
    )
    p.add_argument("--env", default=DEFAULT_ENV, help=f"gymnasium id (default: {DEFAULT_ENV})")
    p.add_argument("--config", type=Path, default=None, help="a YAML spec (default: the loop's default spec)")
    _preset_option(p)
    p.add_argument(
        "--planner",
        default=None,
        help=f"planner by name, one of {sorted(PLANNERS)} (default: the spec's, else cem);"
        " its settings with --set planner.KEY=VALUE",
    )
    p.add_argument(
        "--set",
        type=key_value,
        action="append",
        metavar="KEY=VALUE",
        help="override a spec entry, e.g. --set planner.horizon=20 (repeatable)",
    )
    p.add_argument("--iterations", type=positive_int, default=10, help="iterations (default: 10)")
    p.add_argument("--seed-episodes", type=positive_int, default=5, help="random episodes first (default: 5)")
    p.add_argument(
        "--episodes-per-iteration",
        type=positive_int,
        default=1,
        help="episodes added per iteration (default: 1)",
    )
    p.add_argument(
        "--train-steps", type=positive_int, default=300, help="SVI steps per iteration (default: 300)"
    )
    p.add_argument("--batch-size", type=positive_int, default=32, help="windows per SVI step (default: 32)")
    p.add_argument("--window", type=positive_int, default=50, help="training window length (default: 50)")
    p.add_argument(
        "--eval-episodes", type=positive_int, default=10, help="episodes per evaluation (default: 10)"
    )
    p.add_argument(
        "--eval-every", type=positive_int, default=1, help="evaluate every N iterations (default: 1)"
    )
    p.add_argument(
        "--context", type=positive_int, default=16, help="steps the guide filters to act (default: 16)"
    )
    p.add_argument(
        "--explore",
        type=non_negative_float,
        default=0.3,
        help="exploration while collecting: action noise σ (box, model units) or random-action chance (discrete)",
    )
    p.add_argument(
        "--max-env-steps", type=positive_int, default=None, help="stop at this many environment steps"
    )
    p.add_argument("--stop-at", type=float, default=None, help="stop once an evaluation return reaches this")
    _pixel_options(
        p,
        "act from frames alone: the pixels preset's encoder and decoder over the spec, unless it reads frames",
    )
    p.add_argument("--smoke", action="store_true", help="tiny settings that finish in seconds")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed loop from its last complete iteration (same settings and seed)",
    )
    _overwrite_option(p)
    common(p)
    p.set_defaults(func=cmd_loop)

    p = sub.add_parser(
        "presets",
        help="list the named spec presets, or print the spec of some",
        description="With no names, the presets and what each changes from the default; with names,"
        " the spec they give, as YAML (the form --config reads).",
    )
    p.add_argument("name", nargs="*", help="presets to lay over the default, in order")
    p.set_defaults(func=cmd_presets)
    return parser


def _preset_option(p):
    p.add_argument(
        "--preset",
        nargs="+",
        default=None,
        metavar="NAME",
        help="named spec presets, laid over the spec in order (see `pyro-worldmodel presets`)",
    )


def _pixel_options(p, help_pixels: str) -> None:
    """``--pixels`` (its help ``help_pixels``), ``--frame-size`` and ``--grayscale``, read by :func:`_pixels`."""
    p.add_argument("--pixels", action="store_true", help=help_pixels)
    p.add_argument(
        "--frame-size",
        type=positive_int,
        default=64,
        help="with --pixels: frames resized to N×N (default: 64)",
    )
    p.add_argument("--grayscale", action="store_true", help="with --pixels: one channel instead of RGB")


def _overwrite_option(p):
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run or dataset already in the directory (refused without it)",
    )


def _eval_options(p):
    p.add_argument(
        "--context", type=positive_int, default=5, help="context steps before prediction (default: 5)"
    )
    p.add_argument("--horizon", type=positive_int, default=15, help="open-loop horizon (default: 15)")
    p.add_argument(
        "--num-samples", type=positive_int, default=100, help="imagined futures per window (default: 100)"
    )
    p.add_argument(
        "--iwae-particles", type=positive_int, default=100, help="K of the IWAE estimate (default: 100)"
    )
    p.add_argument("--max-windows", type=positive_int, default=1000, help="open-loop windows (default: 1000)")
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="leave out the 'calibrated' predictor: the model's futures with their spread refitted on"
        " held-out episodes (cross-fitted), which imagines every window twice",
    )


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "out", "unset") is None and getattr(args, "data", None) is None:
        # train --data names it after the data's environment; a loop has a folder of its own
        args.out = Path("runs") / args.env / ("loop" if args.command == "loop" else "")
    if getattr(args, "run", "unset") is None:
        args.run = Path("runs") / args.env
    torch.set_num_threads(1)  # faster at these sizes, and no spinning threads fighting
    joined = False
    try:
        joined = _join_process_group(args)
        args.func(args)
    except KeyboardInterrupt:
        print(
            f"pyro-worldmodel {args.command}: interrupted; the directory holds its last complete run"
            " (train --resume and loop --resume continue from where they were)",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        message = user_error(e)
        if message is None or os.environ.get("PYRO_WORLDMODEL_TRACEBACK"):
            raise  # a bug (or a user who asked): the traceback
        print(f"pyro-worldmodel {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    return 0


def _leader() -> bool:
    """Whether this process prints: the only one, or rank 0 of a data-parallel train."""
    ranks = DataParallel.of_process_group()
    return ranks is None or ranks.rank == 0


def _join_process_group(args) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), join its process group: gloo on the CPU, NCCL
    on CUDA with one GPU per rank (``LOCAL_RANK``). Only ``train`` runs data-parallel."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an int (torchrun sets it), got {text!r}") from None
    if world < 2:
        return False
    if args.command != "train":
        raise ValueError(
            f"WORLD_SIZE: expected 1 for {args.command}, which runs in one process; only train runs"
            f" data-parallel under torchrun, got {world}"
        )
    device = str(args.device or "cpu")
    backend = "gloo"
    if device.startswith("cuda"):
        backend = "nccl"
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    torch.distributed.init_process_group(backend)
    return True


def user_error(e: BaseException) -> str | None:
    """One line for an error the user can act on, or None for a bug.

    User errors are bad input (``ValueError``, with the argument named), the
    package's named errors, the file system's (a missing, read-only or full
    disk) and memory that cannot be allocated.
    """
    if isinstance(e, (ValueError, WorldModelError)):
        text = str(e)
    elif isinstance(e, OSError):
        text = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else (e.strerror or str(e))
    elif isinstance(e, MemoryError) or _is_out_of_memory(e):
        first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        text = f"memory: the sizes asked for cannot be allocated ({first})"
    else:
        return None
    # Pyro appends its "Trace Shapes:" table to errors raised inside a model or guide.
    text = text.split("\nTrace Shapes:")[0]
    return " ".join(line.strip() for line in text.strip().splitlines()) or type(e).__name__


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))


if __name__ == "__main__":
    sys.exit(main())
