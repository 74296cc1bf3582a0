"""Training by SVI, and checkpoints that survive a crash."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import ELBO, SVI
from pyro.optim.optim import _get_state_dict  # handles optimisers and LR schedulers
from tqdm.auto import tqdm

from .elbos import TraceMeanField_ELBO
from .evaluate import elbo_terms

MAX_PLATE_NESTING = 2  # episodes (dim -2) and time (dim -1)
CHECKPOINT_FORMAT = "pyro_worldmodel.checkpoint/1"


@dataclass
class History:
    """What :func:`fit` records.

    :ivar loss: −ELBO per observed timestep of each step's minibatch (nats).
    :ivar terms: every ``terms_every`` steps, a dict with ``step``, ``elbo``,
        ``log_px``, ``log_pa`` and ``kl``, per observed timestep.
    """

    loss: list[float] = field(default_factory=list)
    terms: list[dict[str, float]] = field(default_factory=list)


def default_elbo() -> ELBO:
    """``TraceMeanField_ELBO``: the KL terms of the bound computed analytically.

    It is :class:`pyro_worldmodel.elbos.TraceMeanField_ELBO`, Pyro's estimator
    with a warning where a pair of distributions has no analytic KL.
    """
    return TraceMeanField_ELBO(max_plate_nesting=MAX_PLATE_NESTING)


def default_optim(lr: float = 1e-3, clip_norm: float = 10.0, lrd: float = 1.0) -> pyro.optim.PyroOptim:
    """Pyro's ClippedAdam, as the DMM example uses."""
    return pyro.optim.ClippedAdam({"lr": lr, "clip_norm": clip_norm, "lrd": lrd})


def fit(
    model,
    guide,
    obs,
    actions,
    mask=None,
    *,
    rewards=None,
    continues=None,
    num_steps: int = 1000,
    batch_size: int = 32,
    elbo: ELBO | None = None,
    optim: pyro.optim.PyroOptim | None = None,
    lr: float = 1e-3,
    train: str = "all",
    terms_every: int = 0,
    device: str | torch.device | None = None,
    seed: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    progress: bool = True,
    extra: dict | None = None,
    callback=None,
) -> History:
    """Train ``model`` and ``guide`` by SVI on minibatches of episodes.

    :param model: a :class:`~pyro_worldmodel.model.WorldModel`.
    :param guide: a guide over the model's ``z_{t}`` sites, e.g.
        :class:`~pyro_worldmodel.guides.FilterGuide`.
    :param obs: ``(N, T, X)`` observations of N episodes.
    :param actions: ``(N, T, A)`` reals or ``(N, T)`` integers.
    :param mask: ``(N, T)`` bool, True on observed steps; all True if None.
    :param rewards: ``(N, T)`` rewards, for a model with a reward head (site ``r``).
    :param continues: ``(N, T)`` continue flags, for a model with a continue head (site ``c``);
        see :attr:`Episodes.continues <pyro_worldmodel.data.Episodes.continues>`.
    :param num_steps: total SVI steps (including those of a resumed run).
    :param batch_size: episodes per step, drawn without replacement each epoch.
    :param elbo: any Pyro ELBO instance; ``TraceMeanField_ELBO`` by default.
    :param optim: a Pyro optimiser; ClippedAdam with ``lr`` by default.
    :param train: ``"all"``, or ``"guide"`` / ``"model"`` to hold the other fixed.
    :param terms_every: if positive, record :func:`~pyro_worldmodel.evaluate.elbo_terms`
        of the minibatch every this many steps, in ``History.terms``.
    :param device: move model, guide and data here first, e.g. ``"cuda"``.
    :param seed: seeds Pyro, torch and the minibatch order.
    :param checkpoint: a file to save to every ``checkpoint_every`` steps and
        at the end, atomically, so a crash leaves the last good one.
    :param resume: continue from ``checkpoint`` if that file exists.
    :param progress: show a progress bar.
    :param extra: further entries for every checkpoint, as in
        :func:`save_checkpoint`, e.g. what is needed to rebuild the model.
    :param callback: called as ``callback(step, history)`` after each step,
        e.g. :class:`~pyro_worldmodel.plots.LiveTraining` to redraw a plot in
        a notebook.
    :returns: the :class:`History` of the run (of all runs, when resumed).
    """
    _check_int("num_steps", num_steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("terms_every", terms_every, 0)
    _check_int("checkpoint_every", checkpoint_every, 1)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback: expected a callable f(step, history), got {type(callback).__name__}")
    if train not in ("all", "model", "guide"):
        raise ValueError(f"train: expected 'all', 'model' or 'guide', got {train!r}")
    elbo = default_elbo() if elbo is None else elbo
    if not isinstance(elbo, ELBO):
        raise ValueError(f"elbo: expected a pyro.infer.ELBO instance, got {type(elbo).__name__}")
    optim = default_optim(lr) if optim is None else optim
    if not isinstance(optim, pyro.optim.PyroOptim):
        raise ValueError(f"optim: expected a pyro.optim.PyroOptim, got {type(optim).__name__}")
    if resume and checkpoint is None:
        raise ValueError("resume: expected a checkpoint path to resume from, got checkpoint=None")

    if device is not None:
        model.to(device)
        guide.to(device)
    device = next(model.parameters()).device
    obs, actions, mask = (None if x is None else torch.as_tensor(x).to(device) for x in (obs, actions, mask))
    obs, actions, mask = model.check_inputs(obs, actions, mask, check_values=True)
    if rewards is not None or continues is not None:
        with pyro.validation_enabled(True):
            rewards, continues = model.check_targets(rewards, continues, mask, obs.dtype)
    targets = {k: v for k, v in (("rewards", rewards), ("continues", continues)) if v is not None}
    if hasattr(guide, "check_inputs"):
        guide.check_inputs(obs, actions, mask, check_values=False)
    lengths = mask.sum(1).cpu()  # (N,)
    if (lengths == 0).any():
        raise ValueError(
            f"mask: expected at least one observed step per episode, got none in episodes"
            f" {(lengths == 0).nonzero().flatten().tolist()}"
        )
    N = obs.shape[0]
    batch_size = min(batch_size, N)

    if seed is not None:
        pyro.set_rng_seed(seed)
    order_seed = int(torch.randint(2**62, ())) if seed is None else seed
    history = History()
    start = 0
    if resume and Path(checkpoint).exists():
        saved = load_checkpoint(checkpoint, model, guide, optim)
        history = History(**saved["history"])
        start = len(history.loss)
        order_seed = saved["order_seed"]
        _set_rng_state(saved["rng"])
        if isinstance(getattr(elbo, "step", None), int):  # a schedule over steps, e.g. KL annealing
            elbo.step = start

    frozen = {"all": None, "guide": model, "model": guide}[train]
    model_fn = model.model
    guide_fn = guide
    if train == "guide":
        model_fn = poutine.block(model_fn, hide_types=["param"])
    elif train == "model":
        guide_fn = poutine.block(guide_fn, hide_types=["param"])
    svi = SVI(model_fn, guide_fn, optim, loss=elbo)

    def save(step):
        save_checkpoint(
            checkpoint,
            model,
            guide,
            optim,
            step=step,
            history=asdict(history),
            order_seed=order_seed,
            rng=_get_rng_state(),
            **(extra or {}),
        )

    bar = tqdm(range(start, num_steps), desc="SVI", disable=not progress, initial=start, total=num_steps)
    try:
        for step in bar:
            idx = _minibatch(step, N, batch_size, order_seed)  # on the CPU, like lengths
            T_b = int(lengths[idx].max())
            on_device = idx.to(obs.device)
            batch = (obs[on_device, :T_b], actions[on_device, :T_b], mask[on_device, :T_b])
            batch_targets = {k: v[on_device, :T_b] for k, v in targets.items()}
            loss = svi.step(*batch, **batch_targets) / float(lengths[idx].sum())
            if not math.isfinite(loss):
                where = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
                raise FloatingPointError(f"loss: got {loss} at step {step}{where}")
            history.loss.append(loss)
            if terms_every and step % terms_every == 0:
                history.terms.append({"step": step, **elbo_terms(model, guide, *batch).as_dict()})
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")
            if checkpoint is not None and (step + 1) % checkpoint_every == 0:
                save(step + 1)
            if callback is not None:
                callback(step, history)
        if checkpoint is not None and start < num_steps:
            save(num_steps)
    finally:
        bar.close()
        if frozen is not None:
            # Blocked params are not stepped, but backward still reached them.
            for p in frozen.parameters():
                p.grad = None
    return history


def _minibatch(step, N, batch_size, seed):
    """The episodes of one step: each epoch a permutation drawn from (seed, epoch).

    A function of the step alone, so a run resumed mid-epoch sees the same batches.
    """
    per_epoch = N // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[i * batch_size : (i + 1) * batch_size]


def _get_rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    # load_checkpoint maps tensors to the parameters' device; RNG states live on the CPU.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _check_int(name, value, low):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


def save_checkpoint(path, model, guide, optim=None, **extra) -> Path:
    """Save model, guide and optimiser state to ``path``, atomically.

    The file is written beside ``path`` and renamed over it, so a crash
    leaves either the old file or the new one, never half of one. Optimiser
    state is stored by parameter name relative to its module, so it loads
    into a model whose param-store prefix differs.

    :param extra: further tensors, numbers, strings, lists and dicts to store.
    """
    path = Path(path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "guide": guide.state_dict(),
        "optim": _relative_optim_state(optim, model, guide) if optim is not None else None,
        "extra": extra,
    }
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def atomic_write(path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path, model, guide, optim=None) -> dict:
    """Load a :func:`save_checkpoint` file into ``model``, ``guide`` and ``optim``.

    Uses ``torch.load(weights_only=True)``: nothing but tensors and plain
    containers is ever unpickled.

    :returns: the ``extra`` entries that were saved.
    """
    device = next(model.parameters()).device
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"path: {path} is not a readable pyro_worldmodel checkpoint: {e}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"path: expected a {CHECKPOINT_FORMAT} file, got {path}")
    for key, module in (("model", model), ("guide", guide)):
        try:
            module.load_state_dict(state[key])
        except RuntimeError as e:
            raise ValueError(f"{key}: the checkpoint's {key} does not fit this one: {e}") from e
    if optim is not None and state["optim"] is not None:
        optim.set_state(
            {
                f"{owner.name}$$${rel}": value
                for key, owner in (("model", model), ("guide", guide))
                for rel, value in state["optim"][key].items()
            }
        )
    return state["extra"]


def _relative_optim_state(optim, model, guide):
    # Keyed by the parameter objects, not by param-store names, so a cleared
    # store (pyro.clear_param_store() in a notebook) loses nothing.
    owners = {
        id(p): (key, rel)
        for key, owner in (("model", model), ("guide", guide))
        for rel, p in owner.named_parameters()
    }
    out = {"model": {}, "guide": {}}
    for param, optimizer in optim.optim_objs.items():
        if id(param) in owners:
            key, rel = owners[id(param)]
            out[key][rel] = _get_state_dict(optimizer)
    return out
