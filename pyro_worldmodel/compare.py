"""Comparing ELBO estimators on one model, guide and dataset.

:func:`compare_estimators` fixes the model, the guide, the data, the initial
parameters and the seed, and varies only the estimator. For each one it
measures, in nats per observed timestep:

**Bound.** ``-elbo.loss(...) / n`` on a fixed evaluation batch of ``n``
observed timesteps, at the initial parameters, as the mean ± standard error
(sd / √R) of R independent draws. ``TraceTailAdaptive_ELBO`` has no value (Pyro
does not implement its ``loss``), so its bound is None.

**Variability.** Over the same R draws, the variance of the loss per
timestep, and over R draws of ``elbo.loss_and_grads`` at the same initial
parameters, the gradient g of the loss per timestep with respect to the
model's parameters and, separately, the guide's. With E and Var the sample
mean and the unbiased sample variance over the R draws, element by element:

* gradient variance = mean over elements i of Var[g_i];
* gradient signal-to-noise ratio = mean over elements i with sd[g_i] > 0
  of |E[g_i]| / sd[g_i].

Elements are those of the parameters the estimator's gradient reaches in at
least one draw. With ``train="guide"`` the model is held fixed and its
figures are None (and the guide's with ``train="model"``).

**Cost.** Wall time per SVI step: the median, over the training steps after
``warmup`` (which excludes Jit compilation), of the time from the start of a
step's ``loss_and_grads`` to the start of the next one, so the optimiser
step and the training loop's own work count. Peak memory per step, in bytes,
during the last training step (its optimiser state already exists):

* on CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  less ``memory_allocated`` when the step began: the peak rise of allocated
  memory, so a tensor of an earlier step freed in this one lowers it;
* on the CPU, the allocation and free events of ``torch.profiler``
  (``profile_memory=True``) in time order: the peak total size of the blocks
  allocated during the step that are alive at once. The profiler cannot see
  every free of a block allocated before the step, so those frees are left
  out: the peak of the step's own allocations.

Both count tensor memory only (not the allocator's cache, nor Python objects).
``tests/test_compare.py`` checks them against allocations of known size and
a model that holds a known tensor through the step. Other devices give NaN.

**Training.** Each estimator trains from the same initial parameters with a
fresh optimiser by :func:`~pyro_worldmodel.fit` with the same seed, hence the
same minibatches; then again with each further seed (``seeds``, 3 by default):
the held-out figures are the mean and standard deviation over those runs, so
that a reader can tell a difference between estimators from a rerun's. Its own loss per step is recorded (for
``TraceTailAdaptive_ELBO``, which has none, −ELBO averaged over its particles),
and, as one measure common to all estimators, the held-out ELBO per timestep
(:func:`~pyro_worldmodel.evaluate.elbo_terms`, analytic KL where there is one)
at a few checkpoints. At the end, the held-out IWAE-K estimate of
log p(x, a) per timestep (:func:`~pyro_worldmodel.evaluate.iwae_log_likelihood`).
Held-out evaluations use their own fixed seed and restore the random state
afterwards, so they change nothing in training and every estimator is
evaluated on the same random numbers.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import pyro
import pyro.infer
import torch
from pyro import poutine
from torch import nn
from tqdm.auto import tqdm

from .config import REGISTRY, build, resolve, typed_kwargs
from .evaluate import iwae_log_likelihood
from .evaluate.profiling import PeakMemory
from .infer import MAX_PLATE_NESTING, TraceEnum_ELBO, elbo_terms, fit, minibatch_indices, why_not_enumerable
from .infer.validation import isolated_rng
from .spaces import ActionSpace, check_device

# What the default comparison and the smoke setting use where an argument is None.
DEFAULTS = {
    "repeats": 30,
    "num_steps": 200,
    "batch_size": 32,
    "iwae_particles": 100,
    "num_checkpoints": 4,
    "checkpoint_particles": 2,
    "num_particles": 8,
    "seeds": 3,
}
SMOKE = {
    "repeats": 3,
    "num_steps": 8,
    "batch_size": 4,
    "iwae_particles": 4,
    "num_checkpoints": 1,
    "checkpoint_particles": 1,
    "num_particles": 2,
    "seeds": 2,
}
# Bootstrap resamples of the R gradient draws, for the standard errors of their statistics.
BOOTSTRAP = 200
# Pyro's compiled estimators, keyed by argument count and not by shape: a loss compiled
# at one T answers for another (docs/pyro_pitfalls.md).
_PYRO_JIT = (pyro.infer.JitTrace_ELBO, pyro.infer.JitTraceGraph_ELBO, pyro.infer.JitTraceMeanField_ELBO)
# Spec keys that configure how an estimator runs rather than what it estimates; not in labels.
_QUIET_KWARGS = ("vectorize_particles", "ignore_jit_warnings", "max_plate_nesting", "num_particles")


def default_estimators(num_particles: int = 8, num_steps: int = 200) -> list[dict]:
    """The estimators compared by default, as spec dicts.

    :param num_particles: K of the multi-particle estimators (Rényi, tail-adaptive).
    :param num_steps: training steps; KL annealing warms up over the first half.
    """
    K = num_particles
    return [
        {"name": "Trace_ELBO"},
        {"name": "TraceMeanField_ELBO"},
        {"name": "TraceGraph_ELBO"},
        {"name": "RenyiELBO", "alpha": 0, "num_particles": K},
        {"name": "RenyiELBO", "alpha": 0.5, "num_particles": K},
        {"name": "TraceTailAdaptive_ELBO", "num_particles": K},
        {"name": "JitTrace_ELBO"},
        {"name": "JitTraceGraph_ELBO"},
        {"name": "JitTraceMeanField_ELBO"},
        {"name": "KLAnnealing_ELBO", "warmup_steps": max(num_steps // 2, 1)},
        {"name": "FreeNats_ELBO"},
        {"name": "KLBalancing_ELBO"},
        {"name": "LatentOvershooting_ELBO"},
    ]


@dataclass
class EstimatorResult:
    """One estimator's figures; every value is in nats per observed timestep unless it says otherwise.

    :ivar label: e.g. ``RenyiELBO(alpha=0, K=8)``.
    :ivar spec: the spec dict it was built from, as given.
    :ivar bound: mean of the R draws of −loss at the initial parameters; None without a value.
    :ivar bound_se: its standard error, sd / √R.
    :ivar loss_variance: the variance of those R draws.
    :ivar loss_variance_se: its standard error, Var · √(2 / (R − 1)) (Gaussian draws).
    :ivar grad_variance: ``{"model": …, "guide": …}``, mean over elements of Var[g_i].
    :ivar grad_snr: ``{"model": …, "guide": …}``, mean of |E[g_i]| / sd[g_i] over elements with sd > 0.
    :ivar grad_variance_se, grad_snr_se: their standard errors, by the bootstrap over the R draws.
    :ivar step_time: median seconds per SVI step after the warm-up.
    :ivar step_time_quartiles: the 25% and 75% quantiles of those seconds.
    :ivar peak_memory: bytes, peak memory of one training step (NaN where it cannot be measured).
    :ivar heldout_elbo: held-out ELBO after training, the mean over the training seeds.
    :ivar heldout_iwae: held-out IWAE-K estimate of log p(x, a) after training, likewise.
    :ivar heldout_elbo_sd, heldout_iwae_sd: their standard deviations over the training seeds.
    :ivar heldout_exact: for a model whose chain enumeration sums out (one categorical state,
        :func:`~pyro_worldmodel.infer.why_not_enumerable`), the held-out log p(x, a) itself,
        exactly, after training (mean over the seeds); NaN for any other model.
    :ivar heldout_exact_sd: its standard deviation over the training seeds.
    :ivar heldout_by_seed: ``[{"seed": s, "heldout_elbo": …, "heldout_iwae": …}]`` (and
        ``"heldout_exact"`` where it exists).
    :ivar train_loss: the estimator's own loss per training step (the first seed).
    :ivar checkpoints: ``[{"step": s, "heldout_elbo": …}]`` during training, step 0 first (the first seed).
    :ivar seconds: wall time for this estimator, all phases.
    :ivar path: how the package's mean-field estimators evaluated the loss in the
        variability phase (``"batched"``, or ``"pyro traces: <why>"``); empty for others.
    :ivar notes: what a reader needs to know about missing or unusual figures.
    """

    label: str
    spec: dict
    bound: float | None = None
    bound_se: float | None = None
    loss_variance: float | None = None
    loss_variance_se: float | None = None
    grad_variance: dict[str, float | None] = field(default_factory=dict)
    grad_snr: dict[str, float | None] = field(default_factory=dict)
    grad_variance_se: dict[str, float | None] = field(default_factory=dict)
    grad_snr_se: dict[str, float | None] = field(default_factory=dict)
    step_time: float = math.nan
    step_time_quartiles: tuple[float, float] = (math.nan, math.nan)
    peak_memory: float = math.nan
    heldout_elbo: float = math.nan
    heldout_iwae: float = math.nan
    heldout_elbo_sd: float = math.nan
    heldout_iwae_sd: float = math.nan
    heldout_exact: float = math.nan
    heldout_exact_sd: float = math.nan
    heldout_by_seed: list[dict[str, float]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    checkpoints: list[dict[str, float]] = field(default_factory=list)
    seconds: float = math.nan
    path: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class EstimatorComparison:
    """What :func:`compare_estimators` returns: one :class:`EstimatorResult` per estimator, in order.

    :ivar settings: how the comparison was run (repeats, steps, batch sizes, seed, device …).
    """

    results: list[EstimatorResult]
    settings: dict

    def __getitem__(self, label: str) -> EstimatorResult:
        for row in self.results:
            if row.label == label:
                return row
        raise KeyError(f"label: expected one of {[r.label for r in self.results]}, got {label!r}")

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.results]

    def table(self) -> str:
        """A markdown table, one row per estimator; ``n/a`` where a figure does not exist."""
        K = self.settings["iwae_particles"]
        exact = any(math.isfinite(r.heldout_exact) for r in self.results)
        head = (
            "| estimator | bound ± se | Var loss | Var ∇ model | Var ∇ guide | SNR model | SNR guide"
            f" | ms / step | MB / step | held-out ELBO | held-out IWAE-{K} |"
            + (" held-out exact |" if exact else "")
        )
        rule = "|---|" + "---:|" * (11 if exact else 10)
        rows = []
        for r in self.results:
            bound = "n/a" if r.bound is None else f"{r.bound:.3f} ± {r.bound_se:.3f}"
            cells = [
                r.label,
                bound,
                _pm(r.loss_variance, r.loss_variance_se, ".3g"),
                _pm(r.grad_variance.get("model"), r.grad_variance_se.get("model"), ".3g"),
                _pm(r.grad_variance.get("guide"), r.grad_variance_se.get("guide"), ".3g"),
                _pm(r.grad_snr.get("model"), r.grad_snr_se.get("model"), ".3g"),
                _pm(r.grad_snr.get("guide"), r.grad_snr_se.get("guide"), ".3g"),
                _fmt(r.step_time * 1e3, ".3g"),
                _fmt(r.peak_memory / 1e6, ".3g"),
                _pm(r.heldout_elbo, r.heldout_elbo_sd, ".3f"),
                _pm(r.heldout_iwae, r.heldout_iwae_sd, ".3f"),
                *([_pm(r.heldout_exact, r.heldout_exact_sd, ".3f")] if exact else []),
            ]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join([head, rule, *rows])

    def notes(self) -> list[str]:
        """Every estimator's notes, as ``label: note`` lines, then :meth:`spread_notes`."""
        return [f"{r.label}: {note}" for r in self.results for note in r.notes] + self.spread_notes()

    def spread_notes(self) -> list[str]:
        """Which held-out ELBOs differ from the reference's (``TraceMeanField_ELBO``, else the
        first row's) by more than twice the standard error of the difference over the seeds."""
        if len(self.results) < 2:
            return []
        ref = next((r for r in self.results if r.label == "TraceMeanField_ELBO"), self.results[0])
        n = len(ref.heldout_by_seed)
        if n < 2 or not math.isfinite(ref.heldout_elbo_sd):
            return []
        beyond, within = [], []
        for r in self.results:
            if r is ref or not math.isfinite(r.heldout_elbo) or not math.isfinite(r.heldout_elbo_sd):
                continue
            diff = r.heldout_elbo - ref.heldout_elbo
            se = math.sqrt((r.heldout_elbo_sd**2 + ref.heldout_elbo_sd**2) / n)
            (beyond if abs(diff) > 2 * se else within).append(f"{r.label} ({diff:+.3f} ± {se:.3f})")
        out = []
        if beyond:
            out.append(
                f"held-out ELBO beyond the spread over {n} seeds of {ref.label}'s: " + ", ".join(beyond)
            )
        if within:
            out.append(
                f"held-out ELBO within the spread over {n} seeds of {ref.label}'s: " + ", ".join(within)
            )
        return out

    def markdown(self) -> str:
        """A report: what was compared, the table, the notes and the definitions."""
        s = self.settings
        lines = [
            "# Estimator comparison",
            "",
            f"Nats per observed timestep. Bound and variability: {s['repeats']} draws at the initial"
            f" parameters on a fixed batch of {s['eval_batch_size']} sequences ({s['eval_timesteps']}"
            f" observed steps). Training: {s['num_steps']} SVI steps of {s['batch_size']} sequences from"
            f" the same initial parameters, seeds {s['seed']} to {s['seed'] + s['seeds'] - 1} (held-out"
            f" columns: mean ± sd over them), training {s['train']!r}. Held-out:"
            f" {s['heldout_sequences']} sequences ({s['heldout_timesteps']} observed steps). Time: median"
            f" over the steps after a warm-up of {s['warmup']}. Memory: {s['memory_method']}."
            f" Device: {s['device']}.",
            "",
            self.table(),
            "",
        ]
        notes = self.notes()
        if notes:
            lines += ["Notes:", "", *[f"- {n}" for n in notes], ""]
        lines += [
            "Definitions: over the draws, Var ∇ is the mean over parameter elements of Var[g_i];"
            " SNR is the mean of |E[g_i]| / sd[g_i] over elements with sd > 0; g is the gradient of"
            " the loss per timestep. ± after a variance or an SNR is its standard error (Var loss:"
            f" Var·√(2/(R−1)); the gradient's: {BOOTSTRAP} bootstrap resamples of the R draws). Held-out ELBO uses the analytic KL where there is one, the"
            " same measure for every estimator."
            + (
                " Held-out exact is log p(x, a) itself, the chain summed out by enumeration (TraceEnum_ELBO)."
                if any(math.isfinite(r.heldout_exact) for r in self.results)
                else ""
            ),
            "",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain data, with NaN and infinities as None, so that it is strict JSON."""
        return _strict({"settings": self.settings, "estimators": [asdict(r) for r in self.results]})

    def to_json(self) -> str:
        """Strict JSON (no NaN literals: missing figures are null)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"


def estimator_label(spec: dict) -> str:
    """``RenyiELBO(alpha=0, K=8)``: the name, the keywords that change the estimate, and K > 1.

    A spec's own ``label`` wins.
    """
    if "label" in spec:
        return str(spec["label"])
    shown = [f"{k}={_fmt_value(v)}" for k, v in spec.items() if k not in ("name", "label", *_QUIET_KWARGS)]
    K = spec.get("num_particles")
    if K is None and spec["name"] in REGISTRY["elbo"]:
        K = _default_particles(REGISTRY["elbo"][spec["name"]])
    if K is not None and K != 1:
        shown.append(f"K={K}")
    return f"{spec['name']}({', '.join(shown)})" if shown else spec["name"]


def make_estimator(spec: dict | str) -> pyro.infer.ELBO:
    """An ELBO from a spec dict through the registry, as :func:`~pyro_worldmodel.config.build` makes one.

    ``max_plate_nesting`` is the package's; ``vectorize_particles=True`` is
    added for more than one particle and ``ignore_jit_warnings=True`` for a
    Jit estimator, unless the spec sets them. ``TraceTailAdaptive_ELBO``
    reports −ELBO averaged over its particles as its loss value (Pyro's
    reports infinity), so that training can check the value is finite.
    """
    spec = _as_spec(spec)
    cls = resolve("elbo", spec["name"])
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "label")}
    kwargs = typed_kwargs("elbo", cls, kwargs)  # names, types and ranges, as a spec's are checked
    params = inspect.signature(cls).parameters
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if kwargs.get("num_particles", _default_particles(cls)) > 1 and (
        "vectorize_particles" in params or accepts_any
    ):
        kwargs.setdefault("vectorize_particles", True)
    if "Jit" in spec["name"] and ("ignore_jit_warnings" in params or accepts_any):
        kwargs.setdefault("ignore_jit_warnings", True)
    if issubclass(cls, pyro.infer.TraceTailAdaptive_ELBO):
        if kwargs.get("num_particles", _default_particles(cls)) < 2 or not kwargs.get(
            "vectorize_particles", False
        ):
            raise ValueError(
                f"elbo: {spec['name']} needs num_particles > 1 and vectorize_particles=True,"
                f" got {estimator_label(spec)}"
            )
        cls = _with_elbo_value(cls)
    try:
        return cls(max_plate_nesting=MAX_PLATE_NESTING, **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"elbo ({estimator_label(spec)}): {e}") from None


def compare_estimators(
    obs,
    actions,
    mask=None,
    *,
    heldout: Sequence,
    estimators: Sequence[dict | str] | None = None,
    spec=None,
    action_space: ActionSpace | None = None,
    model=None,
    guide: nn.Module | None = None,
    train: str = "all",
    repeats: int | None = None,
    num_steps: int | None = None,
    batch_size: int | None = None,
    eval_batch_size: int | None = None,
    iwae_particles: int | None = None,
    num_checkpoints: int | None = None,
    checkpoint_particles: int | None = None,
    warmup: int | None = None,
    optim: dict | None = None,
    seed: int = 0,
    seeds: int | None = None,
    device: str | torch.device | None = None,
    smoke: bool = False,
    progress: bool = True,
    info: dict | None = None,
) -> EstimatorComparison:
    """Compare ELBO estimators on one model, guide and dataset; see the module's docstring.

    Either ``spec`` and ``action_space`` (the model and guide are built from
    them, seeded by ``seed``) or ``model`` and ``guide`` (for instance the
    exact linear-Gaussian anchor with ``train="guide"``). Their parameters are
    snapshotted once and restored before each estimator and at the end.

    :param obs: ``(N, T, X)`` training sequences; :param actions: ``(N, T, A)``
        or ``(N, T)``; :param mask: ``(N, T)`` bool, all True if None.
    :param heldout: ``(obs, actions)`` or ``(obs, actions, mask)`` of held-out sequences.
    :param estimators: spec dicts such as ``{"name": "RenyiELBO", "alpha": 0,
        "num_particles": 8}`` (a bare name is ``{"name": name}``; an optional
        ``label`` names the row); :func:`default_estimators` if None.
    :param train: ``"all"``, ``"guide"`` or ``"model"``, as in :func:`~pyro_worldmodel.fit`.
    :param repeats: R, draws of the bound and of the gradient.
    :param num_steps: training steps per estimator.
    :param batch_size: sequences per training step.
    :param eval_batch_size: the first this many training sequences are the
        fixed batch of the bound and the gradients; ``batch_size`` by default.
    :param iwae_particles: K of the held-out IWAE-K estimate.
    :param num_checkpoints: held-out ELBO at this many evenly spaced steps after step 0.
    :param checkpoint_particles: guide draws averaged in each held-out ELBO.
    :param warmup: training steps left out of the timing; by default a tenth
        of the steps, at least 3 and at most 20.
    :param optim: an optimiser spec such as ``{"name": "ClippedAdam", "lr": 1e-3}``;
        the spec's, or the default job's, ``Spec().optim``, by default.
    :param seed: seeds the model's construction, every phase and the minibatch order.
    :param seeds: each estimator trains this many times from the same initial parameters,
        with seeds ``seed``, ``seed + 1``, …: other minibatches and draws; the held-out
        columns are the mean and standard deviation over them (3; 2 with ``smoke``).
    :param device: run here, e.g. ``"cuda"``; the model's device by default.
    :param smoke: tiny defaults for every setting left as None (and K = 2 in the
        default estimators), so that a comparison runs in seconds.
    :param progress: show a progress bar.
    :param info: further entries for :attr:`EstimatorComparison.settings`, e.g. the data's source.
    """
    preset = SMOKE if smoke else DEFAULTS
    repeats = _setting("repeats", repeats, preset, 2)
    num_steps = _setting("num_steps", num_steps, preset, 2)
    batch_size = _setting("batch_size", batch_size, preset, 1)
    iwae_particles = _setting("iwae_particles", iwae_particles, preset, 1)
    num_checkpoints = _setting("num_checkpoints", num_checkpoints, preset, 1)
    checkpoint_particles = _setting("checkpoint_particles", checkpoint_particles, preset, 1)
    seeds = _setting("seeds", seeds, preset, 1)
    if train not in ("all", "model", "guide"):
        raise ValueError(f"train: expected 'all', 'model' or 'guide', got {train!r}")
    default = estimators is None
    if default:
        estimators = default_estimators(preset["num_particles"], num_steps)
    specs = [_as_spec(e) for e in estimators]
    if not specs:
        raise ValueError("estimators: expected at least one estimator, got none")
    labels = [estimator_label(s) for s in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"estimators: each needs its own label; {repeated} appear more than once")
    for s in specs:  # every estimator is built once before anything runs, so a bad one fails first
        make_estimator(s)
    optim_spec = _optim_spec(optim, spec)
    _make_optim(optim_spec)

    obs, actions = torch.as_tensor(obs), torch.as_tensor(actions)
    if (model is None) != (guide is None) or (model is None) == (spec is None):
        raise ValueError("model, guide, spec: expected either spec (with action_space) or model and guide")
    if model is None:
        if action_space is None:
            raise ValueError("action_space: expected the data's ActionSpace to build the spec's model")
        if obs.dim() != 3:
            raise ValueError(f"obs: expected shape (N, T, X), got {tuple(obs.shape)}")
        pyro.set_rng_seed(seed)
        built = build(spec, obs.shape[-1], action_space)
        model, guide = built.model, built.guide
    if default and train != "guide" and why_not_enumerable(model) is None:  # exact enumeration joins them
        specs.append({"name": "TraceEnum_ELBO"})
        labels.append(estimator_label(specs[-1]))
    device = check_device(device)
    if device is not None:
        model.to(device)
        guide.to(device)
    device = next(model.parameters()).device
    not_enumerable = why_not_enumerable(model)
    for spec_i, label in zip(specs, labels, strict=True):
        if not issubclass(resolve("elbo", spec_i["name"]), TraceEnum_ELBO):
            continue
        if not_enumerable is not None:
            raise ValueError(
                f"estimators: {label} sums the chain out exactly, but not this model's: {not_enumerable}"
            )
        if train == "guide":
            raise ValueError(
                f"estimators: {label} trains the model alone (it runs no guide), but train='guide' holds"
                " the model fixed; leave it out or train 'all'"
            )

    def on_device(x):
        return None if x is None else torch.as_tensor(x).to(device)

    obs, actions, mask = model.check_inputs(
        on_device(obs), on_device(actions), on_device(mask), check_values=True
    )
    if len(heldout) not in (2, 3):
        raise ValueError(
            f"heldout: expected (obs, actions) or (obs, actions, mask), got {len(heldout)} items"
        )
    heldout = model.check_inputs(*(on_device(x) for x in heldout), check_values=True)
    lengths = mask.sum(1).cpu()
    if (lengths == 0).any():
        raise ValueError("mask: expected at least one observed step in every training sequence")
    N = obs.shape[0]
    batch_size = min(batch_size, N)
    eval_batch_size = min(_setting("eval_batch_size", eval_batch_size, {"eval_batch_size": batch_size}, 1), N)
    eval_batch = (obs[:eval_batch_size], actions[:eval_batch_size], mask[:eval_batch_size])
    T_eval = int(lengths[:eval_batch_size].max())
    eval_batch = tuple(x[:, :T_eval] for x in eval_batch)
    eval_steps = int(lengths[:eval_batch_size].sum())
    if warmup is None:
        warmup = max(3, min(20, num_steps // 10))
    warmup = min(_setting("warmup", warmup, {}, 0), max(num_steps - 2, 0))
    _check_jit(specs, labels, lengths, num_steps, batch_size, seed, train)

    initial = _snapshot(model, guide)
    settings = {
        "repeats": repeats,
        "num_steps": num_steps,
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "eval_timesteps": eval_steps,
        "heldout_sequences": int(heldout[2].shape[0]),
        "heldout_timesteps": int(heldout[2].sum()),
        "iwae_particles": iwae_particles,
        "num_checkpoints": num_checkpoints,
        "checkpoint_particles": checkpoint_particles,
        "warmup": warmup,
        "optim": optim_spec,
        "train": train,
        "seed": seed,
        "seeds": seeds,
        "smoke": smoke,
        "device": str(device),
        "memory_method": PeakMemory.describe(device),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        **(info or {}),
    }
    checkpoint_steps = sorted({round(num_steps * c / num_checkpoints) for c in range(num_checkpoints + 1)})
    # The part held fixed is not hidden from Pyro (a poutine.block would take the loss off
    # the batched path): its gradients are computed, left out of the figures and cleared.
    model_fn, guide_fn = model.model, guide
    parts = {"model": model if train != "guide" else None, "guide": guide if train != "model" else None}

    def heldout_elbo():
        with isolated_rng(seed + 1), poutine.block():
            return elbo_terms(model, guide, *heldout, num_particles=checkpoint_particles).elbo

    def heldout_exact():
        if not_enumerable is not None:
            return math.nan
        exact = TraceEnum_ELBO().log_likelihood(model, *heldout)
        return float(exact.sum() / heldout[2].sum())

    def heldout_iwae():
        with isolated_rng(seed + 2):
            iwae = iwae_log_likelihood(model, guide, *heldout, num_particles=iwae_particles)
        return float(iwae.sum() / heldout[2].sum())

    def train_from_start(elbo, train_seed, callback=None):
        """Fit from the initial parameters with a fresh optimiser; ``train_seed`` draws the minibatches."""
        _restore(model, guide, initial)
        return fit(model, guide, obs, actions, mask, num_steps=num_steps, batch_size=batch_size, elbo=elbo,
                   optim=_make_optim(optim_spec), train=train, seed=train_seed, progress=False,
                   callback=callback)  # fmt: skip

    results = []
    bar = tqdm(
        total=len(specs) * (2 * repeats + seeds * num_steps),
        desc="compare",
        disable=not progress,
        unit="step",
    )
    try:
        for spec_i, label in zip(specs, labels, strict=True):
            bar.set_postfix_str(label)
            start = time.perf_counter()
            row = EstimatorResult(label=label, spec=spec_i)
            _restore(model, guide, initial)
            pyro.set_rng_seed(seed)
            _variability(
                row, make_estimator(spec_i), model_fn, guide_fn, eval_batch, eval_steps, repeats, parts, bar
            )
            _restore(model, guide, initial)
            elbo = make_estimator(spec_i)
            probe = _Probe(
                elbo, checkpoint_steps, heldout_elbo, profile_step=num_steps - 1, device=device, bar=bar
            )
            try:
                history = train_from_start(elbo, seed)
                probe.finish(num_steps)
            finally:
                probe.close()
            row.train_loss = list(history.loss)
            row.checkpoints = probe.checkpoints
            row.heldout_by_seed = [
                {
                    "seed": seed,
                    "heldout_elbo": probe.checkpoints[-1]["heldout_elbo"],
                    "heldout_iwae": heldout_iwae(),
                    "heldout_exact": heldout_exact(),
                }
            ]
            for k in range(1, seeds):  # the same start, other minibatches and draws
                train_from_start(
                    make_estimator(spec_i), seed + k, callback=lambda step, history: bar.update(1)
                )
                row.heldout_by_seed.append(
                    {
                        "seed": seed + k,
                        "heldout_elbo": float(heldout_elbo()),
                        "heldout_iwae": heldout_iwae(),
                        "heldout_exact": heldout_exact(),
                    }
                )
            if not_enumerable is not None:
                for r in row.heldout_by_seed:
                    del r["heldout_exact"]
            for key in ("heldout_elbo", "heldout_iwae", "heldout_exact")[: 2 if not_enumerable else 3]:
                values = torch.tensor([r[key] for r in row.heldout_by_seed], dtype=torch.float64)
                setattr(row, key, float(values.mean()))
                setattr(row, f"{key}_sd", float(values.std()) if len(values) > 1 else math.nan)
            times = probe.step_times(warmup)
            if times:
                row.step_time = statistics.median(times)
                q = torch.tensor(times, dtype=torch.float64).quantile(
                    torch.tensor([0.25, 0.75], dtype=torch.float64)
                )
                row.step_time_quartiles = tuple(q.tolist())
            else:
                row.notes.append(
                    f"too few training steps ({num_steps}) after a warm-up of {warmup} to time one"
                )
            row.peak_memory = probe.peak_memory
            if isinstance(elbo, TraceEnum_ELBO):
                row.notes.append(
                    "exact: its bound is log p(x, a) itself, with no variance; it trains no guide, so its"
                    " held-out ELBO and IWAE use the guide as it started: compare its held-out exact"
                )
            if isinstance(elbo, pyro.infer.TraceTailAdaptive_ELBO):
                row.notes.append(
                    "no bound and no loss variance: Pyro does not implement TraceTailAdaptive_ELBO.loss;"
                    " its training loss is −ELBO averaged over its particles"
                )
            row.seconds = time.perf_counter() - start
            results.append(row)
    finally:
        bar.close()
        _restore(model, guide, initial)
    return EstimatorComparison(results, settings)


# ---------------------------------------------------------------- measurements


def _variability(row, elbo, model_fn, guide_fn, batch, n, repeats, parts, bar):
    """Bound, loss variance, gradient variance and SNR from ``repeats`` draws at the current parameters."""
    values = []
    try:
        with torch.no_grad():
            for _ in range(repeats):
                values.append(-float(elbo.loss(model_fn, guide_fn, *batch)) / n)
                bar.update(1)
    except NotImplementedError:  # TraceTailAdaptive_ELBO has no value
        bar.update(repeats - len(values))
        values = None
    beta = getattr(elbo, "current_beta", None)
    if values is not None and isinstance(beta, (int, float)) and beta < 1:
        row.notes.append(
            f"not a bound: its value weighs the KL by β = {beta:g} < 1 at the initial parameters"
        )
    if values is not None:
        v = torch.tensor(values, dtype=torch.float64)
        row.bound = float(v.mean())
        row.bound_se = float(v.std() / math.sqrt(repeats))
        row.loss_variance = float(v.var())
        row.loss_variance_se = row.loss_variance * math.sqrt(2 / (repeats - 1))
    params = {part: list(m.parameters()) if m is not None else [] for part, m in parts.items()}
    draws = {part: [] for part in params}
    # Every parameter's gradient is cleared, the fixed part's too, which is computed but not drawn.
    owners = [getattr(model_fn, "__self__", None), guide_fn, *parts.values()]
    everything = list(
        {id(p): p for m in owners if isinstance(m, torch.nn.Module) for p in m.parameters()}.values()
    )
    # A scheduled estimator (KLAnnealing_ELBO) counts loss_and_grads calls in ``step``;
    # every draw is taken at the schedule's start, where the bound was.
    step0 = getattr(elbo, "step", None)
    for _ in range(repeats):
        for p in everything:
            p.grad = None
        if isinstance(step0, int):
            elbo.step = step0
        elbo.loss_and_grads(model_fn, guide_fn, *batch)
        row.path = getattr(elbo, "path", "")
        for part, ps in params.items():
            draws[part].append([None if p.grad is None else p.grad.detach().flatten() / n for p in ps])
        bar.update(1)
    for p in everything:
        p.grad = None
    for part, m in parts.items():
        if m is None:
            row.grad_variance[part] = row.grad_snr[part] = None
            row.grad_variance_se[part] = row.grad_snr_se[part] = None
            continue
        stats = _gradient_stats(draws[part], params[part])
        row.grad_variance[part], row.grad_snr[part] = stats[:2]
        row.grad_variance_se[part], row.grad_snr_se[part] = stats[2:]


def _gradient_stats(draws, params):
    """Mean over elements of Var[g_i], and of |E[g_i]| / sd[g_i] where sd > 0, with their standard
    errors by the bootstrap over the R draws; Nones if nothing is reached."""
    reached = [i for i in range(len(params)) if any(d[i] is not None for d in draws)]
    if not reached:
        return None, None, None, None
    G = torch.stack(
        [
            torch.cat([d[i] if d[i] is not None else torch.zeros_like(params[i]).flatten() for i in reached])
            for d in draws
        ]
    ).double()  # (R, P)

    def stats(g):
        mean, var = g.mean(0), g.var(0)
        sd = var.sqrt()
        varying = sd > 0
        snr = float((mean[varying].abs() / sd[varying]).mean()) if varying.any() else math.nan
        return float(var.mean()), snr

    variance, snr = stats(G)
    R = G.shape[0]
    generator = torch.Generator().manual_seed(0)
    boot = torch.tensor(
        [stats(G[torch.randint(R, (R,), generator=generator).to(G.device)]) for _ in range(BOOTSTRAP)],
        dtype=torch.float64,
    )  # (BOOTSTRAP, 2)
    ok = torch.isfinite(boot)
    se = [float(boot[ok[:, j], j].std()) if ok[:, j].sum() > 1 else math.nan for j in range(2)]
    return variance, snr, se[0], se[1]


class _Probe:
    """Wraps an ELBO's ``loss_and_grads``: times each step, evaluates checkpoints, measures one step's memory.

    SVI calls ``elbo.loss_and_grads`` once per step, so an instance attribute
    of that name sees every step that :func:`~pyro_worldmodel.fit` takes.
    """

    def __init__(self, elbo, checkpoint_steps, evaluate, *, profile_step, device, bar):
        self.inner = elbo.loss_and_grads
        self.checkpoint_steps = set(checkpoint_steps)
        self.evaluate = evaluate
        self.profile_step = profile_step
        self.memory = PeakMemory(device)
        self.bar = bar
        self.entry, self.start = [], []  # perf_counter at each call, and when its own work starts
        self.checkpoints = []
        self.peak_memory = math.nan
        elbo.loss_and_grads = self

    def __call__(self, model, guide, *args, **kwargs):
        step = len(self.start)
        self.entry.append(time.perf_counter())
        self._checkpoint(step)
        self.bar.update(1)
        if step == self.profile_step:
            self.memory.start()
        self.start.append(time.perf_counter())
        return self.inner(model, guide, *args, **kwargs)

    def _checkpoint(self, step):
        if step in self.checkpoint_steps:
            self.checkpoints.append({"step": step, "heldout_elbo": float(self.evaluate())})

    def finish(self, num_steps):
        """After training: the last step's memory, and the checkpoint after the last step."""
        if self.memory.running:
            self.peak_memory = self.memory.stop()
        self._checkpoint(num_steps)

    def close(self):
        """Stop measuring memory if training ended early (an error)."""
        if self.memory.running:
            self.memory.stop()

    def step_times(self, warmup) -> list[float]:
        """Seconds of each step after ``warmup`` that has a next one; the profiled step is left out."""
        return [
            self.entry[i + 1] - self.start[i]
            for i in range(warmup, len(self.start) - 1)
            if i != self.profile_step
        ]


# ---------------------------------------------------------------- helpers


def _with_elbo_value(cls):
    """``cls`` (a TraceTailAdaptive_ELBO) whose loss value is −ELBO averaged over its particles."""

    class TailAdaptiveWithValue(cls):
        def _differentiable_loss_particle(self, model_trace, guide_trace):
            _, surrogate = super()._differentiable_loss_particle(model_trace, guide_trace)
            log_w = 0.0
            for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        log_w = log_w + sign * site["log_prob"].detach().reshape(self.num_particles, -1).sum(
                            -1
                        )
            # loss_and_grads divides by num_particles: the sum over particles gives their mean.
            return -float(log_w.sum()), surrogate

    TailAdaptiveWithValue.__name__ = TailAdaptiveWithValue.__qualname__ = cls.__name__
    return TailAdaptiveWithValue


def _check_jit(specs, labels, lengths, num_steps, batch_size, seed, train):
    """What Jit estimators cannot do: hold a part fixed, or (Pyro's) change shape (docs/pyro_pitfalls.md)."""
    classes = [resolve("elbo", s["name"]) for s in specs]
    compiled = [label for cls, label in zip(classes, labels, strict=True) if "Jit" in cls.__name__]
    if compiled and train != "all":
        raise ValueError(
            f"estimators: {compiled} compile the parameters they train as inputs, and torch.jit refuses"
            f" the parameters of the part held fixed by train={train!r}, constants that require grad;"
            " compare them with train='all' or leave them out"
        )
    jit = [label for cls, label in zip(classes, labels, strict=True) if issubclass(cls, _PYRO_JIT)]
    if not jit:
        return
    N = len(lengths)
    seen = {int(lengths[minibatch_indices(step, N, batch_size, seed)].max()) for step in range(num_steps)}
    if len(seen) > 1:
        raise ValueError(
            f"estimators: {jit} compile once per argument count, not per shape, but the training"
            f" minibatches have {len(seen)} different lengths {sorted(seen)}; give sequences of one"
            " length (e.g. fixed-length windows) or leave the Jit estimators out"
        )


def _default_particles(cls) -> int:
    """The ``num_particles`` an ELBO class uses when a spec does not say (RenyiELBO's is 2)."""
    try:
        param = inspect.signature(cls).parameters.get("num_particles")
    except (TypeError, ValueError):
        return 1
    if param is None or not isinstance(param.default, int):
        return 1
    return param.default


def _as_spec(estimator) -> dict:
    if isinstance(estimator, str):
        return {"name": estimator}
    if not isinstance(estimator, dict) or "name" not in estimator:
        raise ValueError(f"estimators: expected a name or a dict with a 'name', got {estimator!r}")
    return dict(estimator)


def _optim_spec(optim, spec) -> dict:
    if optim is None:
        from .config import Spec

        if spec is None:
            return dict(Spec().optim)  # the default job's optimiser
        spec = Spec.from_yaml(spec) if isinstance(spec, (str, os.PathLike)) else Spec.from_dict(spec)
        return dict(spec.optim)
    if not isinstance(optim, dict) or "name" not in optim:
        raise ValueError(f"optim: expected a dict with a 'name', got {optim!r}")
    return dict(optim)


def _make_optim(optim_spec):
    return resolve("optim", optim_spec["name"])({k: v for k, v in optim_spec.items() if k != "name"})


def _setting(name, value, preset, low):
    value = preset.get(name) if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def _snapshot(model, guide):
    return {
        k: {n: t.detach().clone() for n, t in m.state_dict().items()}
        for k, m in (("model", model), ("guide", guide))
    }


def _restore(model, guide, state):
    """Load the snapshot in place: the param store keeps holding the same tensors."""
    for key, module in (("model", model), ("guide", guide)):
        module.load_state_dict(state[key])
        for p in module.parameters():
            p.grad = None


def _pm(value, se, spec) -> str:
    """``value ± se`` (``se`` to 2 significant digits), ``value`` alone without a finite se, n/a without a value."""
    text = _fmt(value, spec)
    if text == "n/a" or se is None or not math.isfinite(se):
        return text
    return f"{text} ± {se:.2g}"


def _fmt(value, spec) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _strict(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _strict(x.tolist())
    return x
