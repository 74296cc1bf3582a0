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
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pyro
import torch

from .config import Built, Spec, build, load_yaml, yaml_value
from .data import Episodes, Normalizer, collect
from .errors import RunDirectoryError, WorldModelError
from .evaluate import CopyLast, LinearLeastSquares, heldout_bounds, imagine, open_loop
from .infer import (
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
from .spaces import ActionSpace, check_device

DEFAULT_ENV = "Pendulum-v1"
RUN_FORMAT = "pyro_worldmodel.run/1"


# The default job's model: the default spec with an 8-dimensional latent.
DEFAULT_SPEC = Spec(latent_dim=8, optim={"name": "ClippedAdam", "lr": 1e-3, "clip_norm": 10.0})
DEFAULT_STEPS, DEFAULT_BATCH_SIZE, DEFAULT_LR_DECAY = 1500, 32, 0.01
MAX_OBS_DIM = 2**16
FIGURES_BYTES = 8 * 2**20  # what a command's figures and JSON need on disk, with room to spare


@dataclass
class Architecture:
    """What rebuilds a trained model and guide: the data's sizes and the spec; stored in the checkpoint."""

    obs_dim: int
    action_space: dict
    env_id: str = ""
    spec: dict = field(default_factory=lambda: DEFAULT_SPEC.to_dict())

    def build(self, normalizer: Normalizer | None = None) -> Built:
        """The model, guide, ELBO and optimiser; with a ``normalizer``, for actions in
        its units: a box's bounds mapped as the actions are (``action_space`` stays in real units)."""
        space = ActionSpace(**self.action_space)
        if normalizer is not None:
            space = normalizer.action_space(space)
        return build(self.spec, self.obs_dim, space)

    def describe(self) -> str:
        space = ActionSpace(**self.action_space)
        return f"{self.env_id or 'unknown env'} (obs_dim {self.obs_dim}, actions {space})"

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
        spec = Spec.from_dict(data.get("spec", DEFAULT_SPEC.to_dict())).to_dict()
        return cls(obs_dim, space, env_id, spec)


def _space_dict(space: ActionSpace) -> dict:
    return {
        "kind": space.kind,
        "dim": space.dim,
        "low": None if space.low is None else list(space.low),
        "high": None if space.high is None else list(space.high),
    }


# ---------------------------------------------------------------- run files


def _normalizer_dict(n: Normalizer) -> dict:
    return {k: v for k, v in asdict(n).items() if v is not None}


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


def _load_run(run: Path, device: str, *, files: RunDirectory | None = None):
    """Model, guide, architecture, normalizer and split of a trained run."""
    if run.is_file():
        ckpt = run
    else:
        files = files or RunDirectory(run)
        if not files.has("model.ckpt"):
            raise FileNotFoundError(
                f"run: expected a checkpoint at {run / 'model.ckpt'}; train one with `pyro-worldmodel train`"
            )
        ckpt = files.file("model.ckpt")
    info = _read_run_info(ckpt)
    arch = Architecture.from_dict(info["architecture"], f"{ckpt}")
    normalizer = _normalizer_from(info["normalizer"], arch, f"{ckpt}")
    built = arch.build(normalizer)
    model, guide = built.model, built.guide
    model.to(device)
    guide.to(device)
    load_checkpoint(ckpt, model, guide)
    return model, guide, arch, normalizer, info


def _read_run_info(ckpt: Path) -> dict:
    state = read_checkpoint(ckpt)
    info = state["extra"].get("run")
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise ValueError(f"run: {ckpt} was not written by `pyro-worldmodel train`")
    for key, check in (
        ("val_fraction", lambda v: isinstance(v, float) and 0 < v < 1),
        ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool)),
        ("architecture", lambda v: isinstance(v, dict)),
        ("normalizer", lambda v: isinstance(v, dict)),
    ):
        if key not in info or not check(info[key]):
            raise ValueError(f"run: {ckpt} has a missing or malformed {key!r} entry: {info.get(key)!r}")
    return info


def _check_compatible(arch: Architecture, episodes: Episodes, what: str):
    got = Architecture(episodes.obs_dim, _space_dict(episodes.action_space), env_id=episodes.env_id)
    differs = []
    if arch.env_id and got.env_id and arch.env_id != got.env_id:
        differs.append(f"environment {arch.env_id} vs {got.env_id}")
    if arch.obs_dim != got.obs_dim:
        differs.append(f"obs_dim {arch.obs_dim} vs {got.obs_dim}")
    if ActionSpace(**arch.action_space) != ActionSpace(**got.action_space):
        differs.append(f"actions {ActionSpace(**arch.action_space)} vs {ActionSpace(**got.action_space)}")
    if differs:
        raise ValueError(
            f"data: the checkpoint was made for {arch.describe()}, but {what} is {got.describe()};"
            f" they differ in {', '.join(differs)}"
        )


def _splits(episodes: Episodes, info: dict) -> tuple[Episodes, Episodes]:
    return episodes.split(info["val_fraction"], seed=info["seed"])


def _default_out(episodes: Episodes, data) -> Path:
    """``runs/<env id>``, or ``runs/<the data file's name>`` when the data names no
    environment and that name is a plain one, else ``runs/data``: never a path made of text."""
    name = episodes.env_id
    if not name and data is not None:
        try:
            name = check_env_id(Path(data).stem)
        except ValueError:
            name = ""
    return Path("runs") / (name or "data")


def _load_episodes(path: Path, what: str = "data") -> Episodes:
    """An episodes file named on the command line; every value checked (see :class:`Episodes`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: expected an episodes .npz file, got the directory {path}")
    return Episodes.load(path)


def _writing(path: Path, command: str) -> RunDirectory:
    """Hold ``path``'s lock for this command (one writer per run directory); a directory
    this creates and leaves without a run is removed again when it is closed."""
    return RunDirectory.open(Path(path), f"pyro-worldmodel {command}")


def _refuse_replacing(run: RunDirectory, command: str, keep: tuple[str, ...] = ()) -> None:
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


def _checkpoint_bytes(model, guide) -> int:
    n = sum(p.numel() * p.element_size() for m in (model, guide) for p in m.state_dict().values())
    return 3 * n + 2**20  # weights, two Adam moments, and the rest


# ---------------------------------------------------------------- subcommands


def cmd_collect(args) -> Path:
    out = args.out
    check_unlocked(out)  # before collecting, which a busy directory would waste
    if not args.overwrite and out.is_dir():  # refused before collecting; checked again under the lock
        _refuse_replacing(RunDirectory(out), "collect")
    episodes = collect(
        args.env,
        args.episodes,
        seed=args.seed,
        num_envs=args.num_envs,
        max_episode_steps=args.max_episode_steps,
    )
    check_free_space(out, 2 * _episodes_bytes(episodes), "collect")
    with _writing(out, "collect") as run:
        if not args.overwrite:
            _refuse_replacing(run, "collect")
        tx = run.transaction("collect", replace=True)
        episodes.save(tx.path("episodes.npz"))
        tx.commit()
    path = out / "episodes.npz"
    print(f"collected {len(episodes)} episodes ({int(episodes.lengths.sum())} steps) of {episodes.env_id}")
    print(f"dataset: {path}")
    return path


def _episodes_bytes(episodes: Episodes) -> int:
    return sum(
        getattr(episodes, k).numel() * getattr(episodes, k).element_size()
        for k in ("obs", "actions", "rewards", "mask")
    )


def cmd_train(args) -> dict:
    # 1. Everything that can be refused is checked before the run directory is touched.
    if args.out is not None:
        check_unlocked(args.out)  # before collecting or building, which a busy directory would waste
    spec = _train_spec(args)
    _set_seed(args.seed)
    if args.data is not None:
        episodes = _load_episodes(args.data)
    else:
        episodes = collect(args.env, args.episodes, seed=args.seed, num_envs=args.num_envs)
    out = args.out
    if out is None:  # named after the data's environment, not --env's default
        out = args.out = _default_out(episodes, args.data)
    train, val = episodes.split(args.val_fraction, seed=args.seed)
    steps = spec.train.get("num_steps", DEFAULT_STEPS)
    batch_size = spec.train.get("batch_size", DEFAULT_BATCH_SIZE)
    arch = Architecture(train.obs_dim, _space_dict(train.action_space), episodes.env_id, spec.to_dict())
    normalizer = train.fit_normalizer().normalizer  # the model's action bounds are in its units
    _set_seed(args.seed)
    built = arch.build(normalizer)
    if args.init == "linear" and why_no_linear_warm_start(built.model, built.guide):
        raise ValueError(f"init: {why_no_linear_warm_start(built.model, built.guide)}")
    if not args.no_evaluate:
        _check_evaluable(train, val, args.context, args.horizon)
        _check_evaluation_memory(args, arch, len(val) * int(val.lengths.max()), int(val.lengths.max()))
    episodes = replace(episodes, normalizer=normalizer)
    train = replace(train, normalizer=normalizer)
    obs, actions, mask, rewards, continues = _training_windows(
        train, args.window, steps * batch_size, args.seed
    )
    model, guide = built.model, built.guide
    targets = model.targets(rewards, continues)  # a spec with reward / continue heads trains them too
    check_training_data(model, guide, obs, actions, mask, **targets)  # what fit would refuse
    info = {
        "format": RUN_FORMAT,
        "architecture": asdict(arch),
        "normalizer": _normalizer_dict(normalizer),
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "context": args.context,
        "horizon": args.horizon,
    }
    settings = {
        "num_steps": steps,
        "batch_size": batch_size,
        "terms_every": max(steps // 50, 1),
        "checkpoint_every": max(steps // 10, 1),
        **spec.train,
    }
    same_data = args.data is not None and (out / "episodes.npz").resolve() == Path(args.data).resolve()
    needed = 2 * (_episodes_bytes(episodes) + _checkpoint_bytes(model, guide)) + FIGURES_BYTES
    check_free_space(out, needed, "train")

    # 2. One writer: the directory's lock, then what is already there.
    with _writing(out, "train") as run:
        staged = run.staged_transaction("train")
        resumable = run.staging_of("train") / "model.ckpt"
        source = None
        if args.resume:  # an interrupted train's last good checkpoint, else the finished run's
            candidates = [resumable] if staged is not None and resumable.exists() else []
            candidates += [run.file("model.ckpt")] if run.has("model.ckpt") else []
            for candidate in candidates:
                try:
                    _check_resumable(candidate, arch, args)
                except ValueError:
                    if not args.overwrite:  # with --overwrite, another run's is replaced
                        raise
                    continue
                source = candidate
                break
        if source is None and not args.overwrite:
            _refuse_replacing(run, "train", keep=("episodes.npz",) if same_data else ())
        if staged is not None and source is None and resumable.exists():
            print(
                f"note: discarding the checkpoint of an interrupted train (pid {staged.get('pid', '?')},"
                f" started {staged.get('started', '?')}), {resumable}"
            )

        # 3. Everything is written into the transaction, which becomes the run at its commit.
        # Of an interrupted train's files only its checkpoint is kept, and only to resume it.
        tx = run.transaction("train", replace=True, keep=("model.ckpt",) if source == resumable else ())
        checkpoint = tx.path("model.ckpt")
        if source is not None and source != resumable:
            shutil.copyfile(source, checkpoint)
        episodes.save(tx.path("episodes.npz"))
        if args.init != "random" and source is None:
            reason = why_no_linear_warm_start(model, guide)
            if reason is None:
                linear_warm_start(model, guide, obs, actions, mask)
            else:
                print(f"starting at random: no linear warm start for this spec ({reason})")
        start = time.perf_counter()
        with pyro.validation_enabled(False):  # inputs were checked once, up front
            history = fit(
                model,
                guide,
                obs,
                actions,
                mask,
                **targets,
                elbo=built.elbo,
                optim=built.optim,
                device=args.device,
                seed=args.seed,
                checkpoint=checkpoint,
                resume=source is not None,
                extra={"run": info},
                **settings,
            )
        seconds = time.perf_counter() - start
        from .plots import plot_training, save_figure

        save_figure(plot_training(history), tx.path("figures/training.png"))
        print(f"trained {len(history.loss)} steps in {seconds:.0f} s")
        metrics = {}
        if not args.no_evaluate:
            metrics = _evaluate(
                model, guide, arch, normalizer, info, episodes, None, _eval_settings(args), tx
            )
        tx.commit()
    print(f"checkpoint: {out / 'model.ckpt'}")
    if metrics:
        _print_metrics(metrics, out, args)
    return metrics


def _eval_settings(args) -> argparse.Namespace:
    return argparse.Namespace(
        context=args.context,
        horizon=args.horizon,
        num_samples=args.num_samples,
        iwae_particles=args.iwae_particles,
        seed=args.seed,
        max_windows=args.max_windows,
        episode=getattr(args, "episode", None),
    )


def _train_spec(args) -> Spec:
    """The spec of a train run: --config, then --set, then the explicit flags, over the default."""
    spec = _config(args.config, DEFAULT_SPEC)
    overrides = dict(args.set or [])
    flags = {
        "latent_dim": args.latent_dim,
        "transition.hidden": args.hidden,
        "emission.hidden": args.hidden,
        "guide.rnn_dim": args.rnn_dim,
        "train.num_steps": args.steps,
        "train.batch_size": args.batch_size,
        "optim.lr": args.lr,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    spec = spec.with_overrides(overrides)
    if spec.optim["name"] == "ClippedAdam" and ("lrd" not in spec.optim or args.lr_decay is not None):
        decay = DEFAULT_LR_DECAY if args.lr_decay is None else args.lr_decay
        steps = spec.train.get("num_steps", DEFAULT_STEPS)
        spec = spec.with_overrides({"optim.lrd": decay ** (1.0 / steps)})
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


def _check_sampling_memory(what: str, value: int, at_once: int, unit: str, steps: int, width: int) -> None:
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


def _check_evaluation_memory(args, arch: Architecture, num_windows: int, max_length: int) -> None:
    spec = Spec.from_dict(arch.spec)
    deter = int(spec.transition.get("deter_dim", 0) or 0)
    width = arch.obs_dim + 2 * spec.latent_dim + deter + arch.action_space["dim"]
    at_once = min(num_windows, args.max_windows, 256)  # open_loop imagines 256 windows at a time
    _check_sampling_memory(
        "num_samples", args.num_samples, at_once, "windows", args.context + args.horizon, width
    )
    _check_sampling_memory(
        "iwae_particles", min(args.iwae_particles, 250), num_windows, "episode steps", 1, width
    )


def _key_value(text: str) -> tuple[str, object]:
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


def _check_evaluable(train: Episodes, val: Episodes, context: int, horizon: int) -> None:
    if int(val.lengths.max()) <= context:
        raise ValueError(
            f"context: expected a held-out episode longer than context={context} to evaluate on,"
            f" got held-out episodes of at most {int(val.lengths.max())} steps"
        )
    if int(train.lengths.max()) <= horizon:
        raise ValueError(
            f"horizon: expected a training episode longer than horizon={horizon} to fit the"
            f" baselines' errors, got training episodes of at most {int(train.lengths.max())} steps"
        )


def _check_resumable(ckpt: Path, arch: Architecture, args) -> None:
    """--resume continues only the run that was started: same data, model, split and seed."""
    info = _read_run_info(ckpt)
    asked = {"architecture": asdict(arch), "val_fraction": args.val_fraction, "seed": args.seed}
    differs = [f"{key} {info[key]!r} vs {value!r}" for key, value in asked.items() if info.get(key) != value]
    if differs:
        raise ValueError(
            f"resume: the checkpoint {ckpt} belongs to another run; it differs in {'; '.join(differs)}."
            " Resume with the same data and settings, or train into another --out"
        )


def _training_windows(train: Episodes, window: int, draws: int, seed: int):
    """Fixed-length windows in model units, enough that each step is drawn about once per epoch:
    ``(obs, actions, mask, rewards, continues)``."""
    units = train.in_model_units()
    if window <= 0 or window >= int(train.lengths.max()):
        return units.obs, units.actions, units.mask, units.rewards, units.continues
    num = max(int(train.lengths.sum()) // window, 1) * 4
    generator = torch.Generator().manual_seed(seed)
    return units.windows(window, min(num, draws), generator=generator, targets=True)


def cmd_evaluate(args) -> dict:
    run = Path(args.run)
    _require_run(run)
    val = None
    if args.data is not None:
        val = _load_episodes(args.data)
    arch = Architecture.from_dict(_read_run_info(run / "model.ckpt")["architecture"], str(run / "model.ckpt"))
    sizes = val if val is not None else _load_episodes(run / "episodes.npz")
    _check_evaluation_memory(args, arch, len(sizes) * int(sizes.lengths.max()), int(sizes.lengths.max()))
    check_free_space(run, FIGURES_BYTES, "evaluate")
    with _writing(run, "evaluate") as files:
        model, guide, arch, normalizer, info = _load_run(run, args.device, files=files)
        episodes = Episodes.load(files.file("episodes.npz"))
        _check_compatible(arch, episodes, f"the run's {run / 'episodes.npz'}")
        if val is not None:
            _check_compatible(arch, val, f"data {args.data}")
        tx = files.transaction("evaluate")
        metrics = _evaluate(model, guide, arch, normalizer, info, episodes, val, args, tx)
        tx.commit()
    _print_metrics(metrics, run, args)
    return metrics


def _require_run(run: Path) -> None:
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


def _evaluate(model, guide, arch, normalizer, info, episodes, val, args, tx) -> dict:
    """Held-out bounds, open-loop prediction against the baselines and the figures, computed
    in full, then staged in ``tx``: ``metrics.json`` and ``figures/``."""
    from .plots import plot_imagination, plot_kl_per_t, plot_open_loop, save_figure

    train, heldout = _splits(episodes, info)
    if val is None:
        val = heldout
    val = replace(val, normalizer=normalizer)
    train = replace(train, normalizer=normalizer)
    episode = args.episode
    if episode is None:  # draw the longest held-out episode
        episode = int(val.lengths.argmax())
    L = int(val.lengths[episode]) if 0 <= episode < len(val) else 0
    if L <= args.context:
        raise ValueError(
            f"episode: expected a held-out episode longer than context={args.context} to draw,"
            f" got episode {episode} of {L} steps among {len(val)}"
        )
    _set_seed(args.seed)
    obs, actions, mask = val.normalized()
    bounds = heldout_bounds(model, guide, obs, actions, mask, iwae_particles=args.iwae_particles)
    kl_terms = elbo_terms(model, guide, obs, actions, mask, num_particles=8)
    kl_per_t = kl_terms.kl_per_t

    t_obs, t_actions, t_mask = train.normalized()
    baselines = {
        "copy_last": CopyLast(train.action_space).fit(t_obs, t_actions, t_mask, horizon=args.horizon),
        "linear": LinearLeastSquares(train.action_space).fit(t_obs, t_actions, t_mask, horizon=args.horizon),
    }
    ol = open_loop(
        model,
        guide,
        val.obs,
        val.actions,
        val.mask,
        context=args.context,
        horizon=args.horizon,
        num_samples=args.num_samples,
        normalizer=normalizer,
        baselines=baselines,
        max_windows=args.max_windows,
        seed=args.seed,
    )
    drawn = min(args.horizon, L - args.context)
    im, future = _imagine_episode(
        model, guide, val, normalizer, episode, 0, args.context, drawn, args.num_samples
    )
    figures = {
        "kl_per_t.png": plot_kl_per_t(kl_per_t, monte_carlo=bool(kl_terms.monte_carlo_kl)),
        "open_loop.png": plot_open_loop(ol),
        "imagination.png": plot_imagination(im, future),
    }
    metrics = {
        "env_id": arch.env_id,
        "num_episodes": len(val),
        "heldout": bounds,
        "kl_per_t": kl_per_t.tolist(),
        "open_loop": asdict(ol),
    }
    text = strict_json(metrics)  # a value JSON cannot hold fails here, before a file is staged
    for name, fig in figures.items():
        save_figure(fig, tx.path(f"figures/{name}"))
    tx.write("metrics.json", lambda f: f.write(text.encode()))
    return metrics


def _print_metrics(metrics: dict, run: Path, args) -> None:
    bounds, ol = metrics["heldout"], metrics["open_loop"]

    def num(x):
        return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"

    print(
        f"held-out, nats per timestep: ELBO {num(bounds['elbo'])}  IWAE-{args.iwae_particles} {num(bounds['iwae'])}"
    )
    print(f"  log p(x|z) {num(bounds['log_px'])}  log π(a|z) {num(bounds['log_pa'])}  KL {num(bounds['kl'])}")
    print(f"open loop after {args.context} context steps, {ol['num_windows']} windows (MSE in real units):")
    from .evaluate import OpenLoop

    print(OpenLoop(**ol).table())
    print(f"metrics: {run / 'metrics.json'}\nfigures: {run / 'figures'}/")


def _imagine_episode(
    model, guide, episodes, normalizer, episode, start, context, horizon, num_samples, policy=False
):
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
        normalizer=normalizer,
    )
    future_obs = obs[:, fut]
    return im, future_obs if future_obs.shape[1] == horizon else None


def cmd_imagine(args) -> Path:
    from .plots import plot_imagination, save_figure

    run = Path(args.run)
    _require_run(run)
    episodes = None
    if args.data is not None:
        episodes = _load_episodes(args.data)
    arch = Architecture.from_dict(_read_run_info(run / "model.ckpt")["architecture"], str(run / "model.ckpt"))
    spec = Spec.from_dict(arch.spec)
    width = arch.obs_dim + 2 * spec.latent_dim + arch.action_space["dim"]
    _check_sampling_memory("num_samples", args.num_samples, 1, "episode", args.context + args.horizon, width)
    check_free_space(run, FIGURES_BYTES + 4 * 4 * args.num_samples * args.horizon * width, "imagine")
    with _writing(run, "imagine") as files:
        model, guide, arch, normalizer, info = _load_run(run, args.device, files=files)
        if episodes is not None:
            _check_compatible(arch, episodes, f"data {args.data}")
        else:
            episodes = Episodes.load(files.file("episodes.npz"))
            _check_compatible(arch, episodes, f"the run's {run / 'episodes.npz'}")
            _, episodes = _splits(episodes, info)
        _set_seed(args.seed)
        im, future = _imagine_episode(
            model,
            guide,
            episodes,
            normalizer,
            args.episode,
            args.start,
            args.context,
            args.horizon,
            args.num_samples,
            policy=args.policy == "model",
        )
        arrays = {
            k: getattr(im, k).cpu().numpy() for k in ("latents", "actions", "obs_mean", "obs", "context_obs")
        }
        if future is not None:
            arrays["future_obs"] = future.numpy()
        fig = plot_imagination(im, future)
        tx = files.transaction("imagine")
        tx.write("imagination.npz", lambda f: np.savez(f, **arrays))
        save_figure(fig, tx.path("figures/imagination.png"))
        tx.commit()
    print(
        f"imagined {args.num_samples} futures of {args.horizon} steps after {args.context} steps of episode {args.episode}"
    )
    print(f"samples: {run / 'imagination.npz'}\nfigure: {run / 'figures' / 'imagination.png'}")
    return run / "imagination.npz"


def cmd_compare(args) -> dict:
    """Compare ELBO estimators on one model, guide and dataset; write compare.md, compare.json, figures/."""
    from .compare import DEFAULTS, SMOKE, compare_estimators, default_estimators, make_estimator
    from .plots import plot_estimator_comparison, plot_learning_curves, save_figure

    preset = SMOKE if args.smoke else DEFAULTS
    steps = args.steps or preset["num_steps"]
    batch_size = args.batch_size or preset["batch_size"]
    if args.estimators is None:
        estimators = default_estimators(args.particles or preset["num_particles"], steps)
    else:
        estimators = _estimators_option(args.estimators)
    for estimator in estimators:  # a bad name or keyword fails before any data is collected
        make_estimator(estimator)
    spec = _config(args.config, DEFAULT_SPEC).with_overrides(dict(args.set or []))
    _set_seed(args.seed)
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
    out = args.compare_out or _default_out(episodes, args.data) / "compare"
    train, val = episodes.split(args.val_fraction, seed=args.seed)
    normalizer = train.fit_normalizer().normalizer
    train, val = replace(train, normalizer=normalizer), replace(val, normalizer=normalizer)
    if args.smoke:
        val = val[: min(2, len(val))]
    arch = Architecture(train.obs_dim, _space_dict(train.action_space), episodes.env_id, spec.to_dict())
    _set_seed(args.seed)
    built = arch.build(normalizer)
    reason = why_no_linear_warm_start(built.model, built.guide)
    if args.init == "linear" and reason:
        raise ValueError(f"init: {reason}")
    window = args.window if args.window is not None else (10 if args.smoke else 30)
    obs, actions, mask, _, _ = _training_windows(train, window, steps * batch_size, args.seed)
    check_training_data(built.model, built.guide, obs, actions, mask)
    info = {
        "env_id": episodes.env_id,
        "data": str(args.data) if args.data is not None else f"collected {len(episodes)} episodes",
        "window": window,
        "init": args.init if args.init != "auto" else ("linear" if reason is None else "random"),
        "spec": spec.to_dict(),
    }
    check_free_space(out, FIGURES_BYTES, "compare")
    with _writing(out, "compare") as files:
        if args.init != "random" and reason is None:
            linear_warm_start(built.model, built.guide, obs, actions, mask)
        with pyro.validation_enabled(False):  # inputs are checked once, up front, by compare_estimators
            result = compare_estimators(
                obs,
                actions,
                mask,
                heldout=val.normalized(),
                estimators=estimators,
                model=built.model,
                guide=built.guide,
                repeats=args.repeats,
                num_steps=steps,
                batch_size=batch_size,
                iwae_particles=args.iwae_particles,
                optim=spec.optim,
                seed=args.seed,
                device=args.device,
                smoke=args.smoke,
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
    print(result.table())
    for note in result.notes():
        print(f"  {note}")
    print(f"report: {out / 'compare.md'}\njson: {out / 'compare.json'}\nfigures: {out / 'figures'}/")
    return result.to_dict()


def cmd_loop(args) -> dict:
    from .loop import DEFAULT_LOOP_SPEC, model_based_loop

    spec = _config(args.config, DEFAULT_LOOP_SPEC)
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
    out = args.out if args.out is not None else Path("runs") / args.env / "loop"
    result = model_based_loop(
        args.env,
        spec,
        seed=args.seed,
        out=out,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
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


def _set_seed(seed: int) -> None:
    pyro.set_rng_seed(seed)


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
        dest="command", required=True, metavar="{collect,train,evaluate,imagine,compare,loop}"
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
    p.add_argument(
        "--set",
        type=_key_value,
        action="append",
        metavar="KEY=VALUE",
        help="override a spec entry, e.g. --set transition.hidden=[128,128] (repeatable)",
    )
    p.add_argument("--steps", type=positive_int, default=None, help=f"SVI steps (default: {DEFAULT_STEPS})")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"windows per step (default: {DEFAULT_BATCH_SIZE})",
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
        help="start at the least-squares linear system of the data (see warm_start.py), or at random;"
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
        "--episode", type=int, default=None, help="episode drawn in imagination.png (default: the longest)"
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
    p.add_argument(
        "--set",
        type=_key_value,
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
    p.add_argument(
        "--planner",
        default=None,
        help=f"planner by name, one of {sorted(PLANNERS)} (default: the spec's, else cem);"
        " its settings with --set planner.KEY=VALUE",
    )
    p.add_argument(
        "--set",
        type=_key_value,
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
    p.add_argument("--smoke", action="store_true", help="tiny settings that finish in seconds")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed loop from its last complete iteration (same settings and seed)",
    )
    _overwrite_option(p)
    common(p)
    p.set_defaults(func=cmd_loop)
    return parser


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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "out", "unset") is None and getattr(args, "data", None) is None:
        args.out = Path("runs") / args.env  # train --data names it after the data's env
    if getattr(args, "run", "unset") is None:
        args.run = Path("runs") / args.env
    torch.set_num_threads(1)  # faster at these sizes, and no spinning threads fighting
    try:
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
    return 0


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
