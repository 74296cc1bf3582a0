"""Training by SVI, and checkpoints that survive a crash."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import ELBO
from tqdm.auto import tqdm

from ..errors import DivergenceError
from ..io import load_checkpoint, save_checkpoint
from ..model.components.categorical import check_guide_state
from ..spaces import check_device, check_int
from .elbos import TraceEnum_ELBO, TraceMeanField_ELBO
from .terms import elbo_terms
from .validation import Monitor, as_sequences, set_training_mode

MAX_PLATE_NESTING = 2  # episodes (dim -2) and time (dim -1)


@dataclass
class History:
    """What :func:`fit` records.

    :ivar loss: −ELBO per observed timestep of each step's minibatch (nats).
    :ivar terms: every ``terms_every`` steps, a dict with ``step``, ``elbo``,
        ``log_px``, ``log_pa`` and ``kl``, per observed timestep.
    :ivar validation: with ``val`` data, every ``val_every`` steps (and after the last), a
        dict with ``step`` (updates so far), ``val_elbo`` and ``train_elbo``: the ELBO of
        the held-out sequences and of a fixed subset of as many training sequences, per
        observed timestep, on fixed draws; ``val_iwae`` and ``train_iwae`` with ``val_iwae``.
    :ivar best_step: the check with the best held-out ELBO (None without ``val``).
    :ivar stopped_at: the update after which early stopping ended the run, else None.
    """

    loss: list[float] = field(default_factory=list)
    terms: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    stopped_at: int | None = None


def default_elbo() -> ELBO:
    """``TraceMeanField_ELBO``: the KL terms of the bound computed analytically.

    It is :class:`pyro_worldmodel.infer.elbos.TraceMeanField_ELBO`, Pyro's estimator
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
    val=None,
    val_every: int = 100,
    val_particles: int = 4,
    val_iwae: int = 0,
    patience: int | None = None,
) -> History:
    """Train ``model`` and ``guide`` by SVI on minibatches of episodes.

    :param model: a :class:`~pyro_worldmodel.model.WorldModel`.
    :param guide: a guide over the model's ``z_{t}`` sites, e.g.
        :class:`~pyro_worldmodel.model.guides.FilterGuide`.
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
    :param val: held-out sequences to monitor, ``(obs, actions)``, ``(obs, actions, mask)``
        or a dict of them, checked as the training data are: every ``val_every`` steps and
        after the last, their ELBO per observed timestep (``val_particles`` fixed draws,
        the same at every check) and the same bound on a fixed subset of the training
        sequences go to ``History.validation``. The parameters with the best held-out
        ELBO are kept in memory and in every checkpoint (entry ``best``).
    :param val_iwae: K > 0 also records IWAE-K on both (slower: Pyro's traces).
    :param patience: stop after this many checks without a better held-out ELBO, and
        load the best parameters back (early stopping); None trains all ``num_steps``
        and keeps the last parameters.
    :returns: the :class:`History` of the run (of all runs, when resumed).

    **Data-parallel.** Called in every process of an initialised ``torch.distributed``
    process group of N > 1 ranks (as ``torchrun`` starts them, gloo on CPU, NCCL on GPU),
    each rank computes the loss and gradient of its shard of every minibatch (the batch's
    episodes r, r + N, …, so that the N shards are the batch), the gradients and losses are
    summed over the ranks in one all-reduce, and every rank takes the same update: the
    gradient of the whole batch, as one process with the same ``batch_size`` takes it (the
    ELBO is a sum over episodes). The ranks draw their own random numbers (each reseeded
    from the minibatch seed and its rank), so a stochastic estimator's draws differ from
    one process's; an exact one (``TraceEnum_ELBO``) gives the same parameters. Only rank 0
    writes checkpoints and shows the progress bar; a checkpoint holds no rank count, so a
    run saved by N ranks resumes with any number. Every rank must call ``fit`` with the
    same data and arguments.
    """
    check_int("num_steps", num_steps, 1)
    check_int("batch_size", batch_size, 1)
    check_int("terms_every", terms_every, 0)
    check_int("checkpoint_every", checkpoint_every, 1)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback: expected a callable f(step, history), got {type(callback).__name__}")
    if train not in ("all", "model", "guide"):
        raise ValueError(f"train: expected 'all', 'model' or 'guide', got {train!r}")
    elbo = default_elbo() if elbo is None else elbo
    if not isinstance(elbo, ELBO):
        raise ValueError(f"elbo: expected a pyro.infer.ELBO instance, got {type(elbo).__name__}")
    if optim is None:
        check_positive("lr", lr)
        optim = default_optim(lr)
    if not isinstance(optim, pyro.optim.PyroOptim):
        raise ValueError(f"optim: expected a pyro.optim.PyroOptim, got {type(optim).__name__}")
    optim_args = getattr(optim, "pt_optim_args", None)
    if isinstance(optim_args, dict) and "lr" in optim_args:  # a callable gives per-parameter args
        check_positive("optim's lr", optim_args["lr"])
    if resume and checkpoint is None:
        raise ValueError("resume: expected a checkpoint path to resume from, got checkpoint=None")
    device = check_device(device)
    if val is None and patience is not None:
        raise ValueError(
            f"patience: early stopping needs held-out data (val), got patience={patience} and val=None"
        )

    if device is not None:
        model.to(device)
        guide.to(device)
    raw_obs = obs
    obs, actions, mask, targets = check_training_data(
        model, guide, obs, actions, mask, rewards=rewards, continues=continues
    )
    obs = _keep_pixels(raw_obs, obs, mask)
    lengths = mask.sum(1).cpu()  # (N,)
    N = obs.shape[0]
    batch_size = min(batch_size, N)
    monitor = None
    if val is not None:
        v_obs, v_actions, v_mask = as_sequences("val", val)
        raw_v_obs = v_obs
        try:
            v_obs, v_actions, v_mask, _ = check_training_data(model, guide, v_obs, v_actions, v_mask)
        except ValueError as e:
            raise ValueError(f"val: {e}") from None
        v_obs = _keep_pixels(raw_v_obs, v_obs, v_mask)
        monitor = Monitor(
            model, guide, (v_obs, v_actions, v_mask), (obs, actions, mask),
            every=val_every, particles=val_particles, iwae=val_iwae, patience=patience,
            exact=isinstance(elbo, TraceEnum_ELBO),
        )  # fmt: skip
    if getattr(model, "has_global_latents", False):
        # A minibatch of B episodes carries B / N of the global latents' KL.
        model.transition.num_episodes.fill_(N)

    if isinstance(elbo, TraceEnum_ELBO) and train == "guide":
        raise ValueError(
            "train: expected 'all' or 'model' with TraceEnum_ELBO, which runs no guide and sums the"
            " model's chain out, got 'guide': there would be nothing to train"
        )
    if isinstance(elbo, pyro.infer.TraceMeanField_ELBO) and getattr(guide, "straight_through", True) is False:
        raise ValueError(
            f"guide.straight_through: expected True with {type(elbo).__name__}, which needs samples that"
            " carry a gradient; got False: train with TraceGraph_ELBO (or Trace_ELBO), which score them"
        )
    ranks = DataParallel.of_process_group()
    if ranks is not None and batch_size < ranks.world:
        raise ValueError(
            f"batch_size: expected at least one episode per rank, {ranks.world} ranks, got {batch_size}"
        )
    if seed is not None:
        pyro.set_rng_seed(seed)
    order_seed = int(torch.randint(2**62, ())) if seed is None else seed
    if ranks is not None:
        order_seed = ranks.agree(order_seed)  # rank 0's: every rank draws the same minibatches
    history = History()
    start = 0
    if resume and Path(checkpoint).exists():
        saved = load_checkpoint(checkpoint, model, guide, optim)
        history = History(**saved["history"])
        start = len(history.loss)
        order_seed = saved["order_seed"]
        _set_rng_state(saved["rng"])
        if monitor is not None:
            monitor.load_entry(saved.get("best"))
        if history.stopped_at is not None:  # an early-stopped run is finished
            return history
        if isinstance(getattr(elbo, "step", None), int):  # a schedule over steps, e.g. KL annealing
            elbo.step = start
    if ranks is not None:
        ranks.reseed(order_seed, start)

    frozen = {"all": None, "guide": model, "model": guide}[train]
    # The frozen side's parameters are left out of each update, not hidden from Pyro: a
    # poutine.block around the model would take the loss off the batched path.
    frozen_ids = set() if frozen is None else {id(p) for p in frozen.parameters()}
    model_fn = model.model
    guide_fn = guide
    names = _parameter_names(model, guide)  # {parameter: name}, in the order first seen
    params = list(names)
    # Two snapshots, alternately overwritten: the parameters at the start of this step and
    # of the last one. A non-finite loss condemns the parameters that produced it, so the
    # last good ones are then the previous step's.
    snapshots = ([p.detach().clone() for p in params], [p.detach().clone() for p in params])
    last_saved = {"step": start if resume and Path(checkpoint).exists() else None}
    # Whether the parameters the last update wrote are finite: a 0-d tensor, read at the next
    # step's one synchronisation rather than at a second one of its own.
    after_update = None

    def track(touched):
        """Parameters Pyro created during this step (a guide that builds them on its first
        call) join the snapshots, with their value before any update."""
        for p in touched:
            if p not in names:
                names[p] = f"param {pyro.get_param_store().param_name(p)!r}"
                params.append(p)
                for snapshot in snapshots:
                    snapshot.append(p.detach().clone())

    def save(step, rng):
        if ranks is not None and ranks.rank != 0:  # rank 0 writes; every rank holds the same state
            last_saved["step"] = step
            return
        save_checkpoint(
            checkpoint,
            model,
            guide,
            optim,
            step=step,
            history=asdict(history),
            order_seed=order_seed,
            rng=rng,
            **({} if monitor is None else {"best": monitor.checkpoint_entry()}),
            **(extra or {}),
        )
        last_saved["step"] = step

    def diverged(step, what, good):
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in params], good)
        if checkpoint is None:
            where = "no checkpoint was asked for"
        elif last_saved["step"] is None:
            where = f"no checkpoint was written before it (the first is due at step {checkpoint_every})"
        else:
            where = f"the last good checkpoint is {checkpoint} (step {last_saved['step']})"
        return DivergenceError(
            f"training diverged at step {step}: {what}. The parameters are restored to those of"
            f" the last step with a finite loss; {where}. Lower the learning rate (optim.lr) or"
            " check the data",
            step=step,
            checkpoint=None if last_saved["step"] is None else Path(checkpoint),
        )

    quiet = not progress or (ranks is not None and ranks.rank != 0)
    bar = tqdm(range(start, num_steps), desc="SVI", disable=quiet, initial=start, total=num_steps)
    set_training_mode(True, model, guide)  # training-time noise (a guide's input_noise) on while fitting
    try:
        for step in bar:
            idx = minibatch_indices(step, N, batch_size, order_seed)  # on the CPU, like lengths
            observed = float(lengths[idx].sum())  # the whole batch's steps, every rank's shard together
            if ranks is not None:
                idx = ranks.shard(idx)
            T_b = int(lengths[idx].max())
            on_device = idx.to(obs.device)
            batch = (obs[on_device, :T_b], actions[on_device, :T_b], mask[on_device, :T_b])
            batch_targets = {k: v[on_device, :T_b] for k, v in targets.items()}
            now, before = snapshots[step % 2], snapshots[(step + 1) % 2]
            with torch.no_grad():
                torch._foreach_copy_(now, [p.detach() for p in params])
            due = checkpoint is not None and step > start and step % checkpoint_every == 0
            rng = _get_rng_state() if due else None
            try:
                with poutine.trace(param_only=True) as capture, warnings.catch_warnings():
                    # Pyro warns of a NaN loss; here it stops training with a DivergenceError instead.
                    warnings.filterwarnings(
                        "ignore", message=r"Encountered (NaN|[+-]?inf)", category=UserWarning
                    )
                    loss = elbo.loss_and_grads(model_fn, guide_fn, *batch, **batch_targets)
            except ValueError:
                # With Pyro's validation on, a distribution refuses a NaN parameter before
                # any loss exists: that is divergence too, when a parameter is not finite.
                cause = _nonfinite_parameter(names, step - 1 if step > start else None)
                if not cause:
                    raise
                for p in params:
                    p.grad = None
                raise diverged(
                    step, f"the loss is not finite{cause}", before if step > start else now
                ) from None
            touched = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
            if ranks is not None:  # the batch's loss and gradient: every shard's, summed
                loss = ranks.sum_loss_and_grads(loss, touched)
            loss = float(loss) / observed
            track(touched)
            if not math.isfinite(loss):
                pyro.infer.util.zero_grads(touched)
                cause = _nonfinite_parameter(names, step - 1 if step > start else None)
                cause = cause or _nonfinite_terms(model, guide, batch)
                raise diverged(step, f"the loss is {loss}{cause}", before if step > start else now)
            # Before the update, so that a bad gradient never reaches the optimiser's state; and
            # the last update's parameters with it: one host-device sync for both.
            graded = [p for p in touched if p.grad is not None]
            finite = _finite_flags([p.grad for p in graded])  # (n,) bool, no sync
            ok = finite.all() if after_update is None else finite.all() & after_update
            if not bool(ok):
                pyro.infer.util.zero_grads(touched)
                if after_update is not None and not bool(after_update):
                    raise diverged(step - 1, _nonfinite_parameter(names, step - 1)[2:-1], before)
                first = graded[int((~finite).nonzero()[0])]
                raise diverged(step, f"the gradient of {names.get(first, 'a parameter')} is not finite", now)
            if due:  # the parameters of this step are finite and gave a finite loss: a good checkpoint
                save(step, rng)
            optim({p for p in touched if id(p) not in frozen_ids})
            after_update = _finite_flags(touched).all()
            pyro.infer.util.zero_grads(touched)
            history.loss.append(loss)
            if terms_every and step % terms_every == 0:
                history.terms.append({"step": step, **elbo_terms(model, guide, *batch).as_dict()})
            if monitor is not None and monitor.due(step + 1, num_steps):
                history.validation.append(monitor.measure(step + 1))
                history.best_step = monitor.best_step
                bar.set_postfix(loss=f"{loss:.3f}", val_elbo=f"{history.validation[-1]['val_elbo']:.3f}")
            elif step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")
            if callback is not None:
                callback(step, history)
            if monitor is not None and monitor.should_stop():
                history.stopped_at = step + 1
                break
        if after_update is not None and not bool(after_update):
            last = len(history.loss) - 1
            raise diverged(last, _nonfinite_parameter(names, last)[2:-1], snapshots[last % 2])
        if monitor is not None and patience is not None:
            monitor.restore_best()
        if checkpoint is not None and start < len(history.loss):
            save(len(history.loss), _get_rng_state())
    finally:
        bar.close()
        set_training_mode(False, model, guide)  # and off for what follows: evaluation, imagination, planning
        if frozen is not None:
            # Blocked params are not stepped, but backward still reached them.
            for p in frozen.parameters():
                p.grad = None
    return history


def check_training_data(model, guide, obs, actions, mask=None, *, rewards=None, continues=None):
    """The checks :func:`fit` makes of its data, without training: shapes, dtypes, finite
    values, masks, targets and every episode observed at least once.

    Call it before writing anything that a refusal should not leave behind.

    :returns: ``(obs, actions, mask, targets)`` on the model's device, ``targets`` a dict
        of the ``rewards`` / ``continues`` given.
    """
    device = next(model.parameters()).device
    obs, actions, mask = (None if x is None else _as_tensor(x, device) for x in (obs, actions, mask))
    obs, actions, mask = model.check_inputs(obs, actions, mask, check_values=True)
    if rewards is not None or continues is not None:
        with pyro.validation_enabled(True):
            rewards, continues = model.check_targets(rewards, continues, mask, obs.dtype)
    targets = {k: v for k, v in (("rewards", rewards), ("continues", continues)) if v is not None}
    if hasattr(guide, "check_inputs"):
        guide.check_inputs(obs, actions, mask, check_values=False)
    check_guide_state(model, guide)
    if hasattr(guide, "draws_globals_of") and not guide.draws_globals_of(model):
        raise ValueError(
            f"guide: expected it to draw the weights of the model's {type(model.transition).__name__},"
            " got a guide that does not; call guide.attach_globals(model) (build() and for_model() do)"
        )
    lengths = mask.sum(1).cpu()  # (N,)
    if (lengths == 0).any():
        raise ValueError(
            f"mask: expected at least one observed step per episode, got none in episodes"
            f" {(lengths == 0).nonzero().flatten().tolist()}"
        )
    return obs, actions, mask, targets


def _keep_pixels(raw, checked, mask):
    """uint8 observations (pixel values) as given, zero outside ``mask``, on ``checked``'s
    device: a quarter of the float32 ``checked``, which each step's batch becomes when the
    model checks it. Anything else: ``checked``."""
    if not (torch.is_tensor(raw) and raw.dtype == torch.uint8):
        return checked
    raw = raw.to(checked.device)
    return torch.where(mask[..., None], raw, raw.new_zeros(()))


def _as_tensor(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    try:
        return torch.as_tensor(x).to(device)
    except (TypeError, ValueError, RuntimeError):
        return x  # check_inputs names what it got


def check_positive(name: str, value) -> float:
    """``value`` as a float if it is a finite number > 0, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def _parameter_names(model, guide) -> dict:
    """``{parameter: "model.transition.net.0.weight", ...}``, each parameter once."""
    names = {}
    for owner, module in (("model", model), ("guide", guide)):
        for name, p in module.named_parameters():
            names.setdefault(p, f"{owner}.{name}")
    return names


def _finite_flags(tensors) -> torch.Tensor:
    """``(n,)`` bool: whether each tensor is all finite. One fused reduction (the infinity
    norm propagates NaN) and no host-device sync."""
    tensors = [t.detach() for t in tensors]
    full = [i for i, t in enumerate(tensors) if t.numel()]
    flags = torch.ones(len(tensors), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")
    if full:
        norms = torch._foreach_norm([tensors[i] for i in full], float("inf"))
        flags[full] = torch.stack(norms).isfinite()
    return flags


def _nonfinite_parameter(names: dict, step: int | None) -> str:
    """``" (X is not finite after the optimiser's update at step k)"``, or ``""``; ``step`` None:
    before any update of this run. Syncs freely: it runs only on failure."""
    for p, name in names.items():
        if not bool(p.detach().isfinite().all()):
            if step is None:
                return f" ({name} is not finite)"
            return f" ({name} is not finite after the optimiser's update at step {step}; is the learning rate finite?)"
    return ""


def _nonfinite_terms(model, guide, batch) -> str:
    """``" (log p(x|z) is nan)"``: which term of the bound is not finite, where it can be told."""
    labels = {"log_px": "log p(x|z)", "log_pa": "log π(a|z)", "kl": "the KL"}
    try:  # without validation, a NaN shows up in its term instead of as a distribution's complaint
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            terms = elbo_terms(model, guide, *batch).as_dict()
    except (ValueError, RuntimeError) as e:
        return f" ({str(e).splitlines()[0]})"
    bad = [f"{labels[k]} is {terms[k]}" for k in labels if not math.isfinite(terms[k])]
    return f" ({', '.join(bad)})" if bad else " (a reward or continue term, or a Monte Carlo draw)"


class DataParallel:
    """This process's place in an initialised ``torch.distributed`` process group, for :func:`fit`."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    @classmethod
    def of_process_group(cls) -> DataParallel | None:
        """The group's rank and size, or None outside one (or in a group of one process)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's episodes of a minibatch: r, r + N, …"""
        return idx[self.rank :: self.world]

    def agree(self, value: int) -> int:
        """Rank 0's ``value`` (an int below 2**62), on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        torch.distributed.broadcast(t, src=0)
        return int(t)

    def broadcast(self, obj=None):
        """Rank 0's ``obj`` (any picklable object), on every rank; the others pass nothing."""
        box = [obj if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def reseed(self, order_seed: int, start: int) -> None:
        """Every rank its own random numbers, from the minibatch seed, its rank and the step."""
        pyro.set_rng_seed((order_seed + 1_000_003 * (self.rank + 1) + start) % 2**62)

    def sum_loss_and_grads(self, loss, params) -> float:
        """The sum over the ranks of ``loss`` and of each parameter's gradient (in place), in
        one all-reduce. A parameter without a gradient on this rank counts as zero."""
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        device = grads[0].device if grads else self._device()
        total = torch.tensor([float(loss)], dtype=torch.float64, device=device)
        flat = torch.cat([total, *[g.reshape(-1).to(torch.float64) for g in grads]])
        torch.distributed.all_reduce(flat)
        offset = 1
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
        return float(flat[0])

    def _device(self):
        backend = torch.distributed.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def minibatch_indices(step: int, N: int, batch_size: int, seed: int) -> torch.Tensor:
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
