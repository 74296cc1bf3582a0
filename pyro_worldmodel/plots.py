"""Figures of training, KL per timestep, imagined futures, open-loop error and estimator comparisons.

Every function builds a :class:`matplotlib.figure.Figure` directly, never
through pyplot, so nothing is left in pyplot's global state; it runs headless,
and a returned figure displays in a notebook. Given ``path``, the figure is
also saved there as a PNG, atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .io import atomic_write

if TYPE_CHECKING:
    from .compare import EstimatorComparison
    from .evaluate import Imagination, OpenLoop
    from .infer import History

DPI = 120


class _Figure(Figure):
    """A matplotlib Figure that a notebook shows as a PNG, with or without ``%matplotlib inline``.

    The figures here are built without pyplot, so no backend displays them.
    """

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=DPI)
        return buffer.getvalue()


_TERMS = (  # History.terms key, legend label
    ("elbo", "ELBO"),
    ("log_px", "log p(x | z)"),
    ("log_pa", "log π(a | z)"),
    ("kl", "KL(q ‖ p)"),
)


def plot_training(
    history: History, path: str | os.PathLike | None = None, *, window: int | None = None
) -> Figure:
    """The loss per SVI step and, if recorded, the ELBO's terms.

    :param history: a :class:`~pyro_worldmodel.infer.History` from
        :func:`~pyro_worldmodel.infer.fit`.
    :param path: if given, save the figure here as a PNG.
    :param window: steps in the trailing moving average of the loss; by
        default a twentieth of the steps, at most 100.
    :returns: the figure: −ELBO per step (raw, faint, and its moving average);
        beside it, if recorded, ``history.terms`` against step; and ``history.validation``:
        the ELBO of the held-out sequences and of as many training sequences, on fixed
        draws, with the best check marked (and where early stopping ended the run); all
        in nats per timestep.
    """
    loss = np.asarray(history.loss, dtype=np.float64)  # (N,)
    if loss.size == 0:
        raise ValueError("history: expected at least one recorded step, got none")
    if window is None:
        window = max(1, min(100, loss.size // 20))
    elif not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window: expected an int >= 1, got {window!r}")

    validation = getattr(history, "validation", None) or []
    ncols = 1 + bool(history.terms) + bool(validation)
    fig = _Figure(figsize=(6 * ncols, 4), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    steps = np.arange(loss.size)
    ax = axes[0]
    ax.plot(steps, loss, color="C0", alpha=0.3, linewidth=0.8, label="per step", gid="loss")
    ax.plot(steps, moving_average(loss, window), color="C0", label=f"mean of last {window}", gid="loss_ma")
    ax.set(xlabel="SVI step", ylabel="−ELBO (nats per timestep)", title="Loss")
    ax.legend()

    if history.terms:
        ax = axes[1]
        term_steps = [row["step"] for row in history.terms]
        for i, (key, label) in enumerate(_TERMS):
            style = {"color": "black", "linewidth": 2} if key == "elbo" else {"color": f"C{i}"}
            ys = [row[key] for row in history.terms]
            ax.plot(term_steps, ys, marker=".", label=label, gid=key, **style)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set(xlabel="SVI step", ylabel="nats per timestep", title="ELBO terms")
        ax.legend()
    if validation:
        ax = axes[-1]
        v_steps = [row["step"] for row in validation]
        for key, label, color in (
            ("train_elbo", "ELBO, training sequences", "C0"),
            ("val_elbo", "ELBO, held-out sequences", "C1"),
            ("train_iwae", "IWAE, training sequences", "C2"),
            ("val_iwae", "IWAE, held-out sequences", "C3"),
        ):
            if key in validation[0]:
                ax.plot(
                    v_steps, [row[key] for row in validation], marker=".", color=color, label=label, gid=key
                )
        if history.best_step is not None:
            best = next(row for row in validation if row["step"] == history.best_step)
            ax.plot([best["step"]], [best["val_elbo"]], marker="*", markersize=12, color="C1",
                    linestyle="none", label=f"best held-out (step {best['step']})", gid="best")  # fmt: skip
        if history.stopped_at is not None:
            ax.axvline(history.stopped_at, color="grey", linestyle="--", label="early stop", gid="stopped")
        ax.set(xlabel="SVI step", ylabel="nats per timestep", title="Held out against trained on")
        ax.legend()
    fig.suptitle("Training (nats per timestep)")
    return save_figure(fig, path)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values; over all of them before that many exist."""
    csum = np.concatenate([[0.0], np.cumsum(values)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    return (csum[end] - csum[start]) / (end - start)


class LiveTraining:
    """A :func:`~pyro_worldmodel.infer.fit` callback that redraws :func:`plot_training` as training runs.

    In a notebook the figure is displayed once, as a PNG (so no matplotlib
    backend is needed), and updated in place every ``every`` steps; elsewhere
    (no IPython) it only keeps the latest figure in :attr:`figure`. Choose
    ``every`` to divide the number of steps to see the last one.

    ::

        fit(model, guide, obs, actions, num_steps=1000, callback=LiveTraining(every=50))

    :param every: redraw every this many steps.
    """

    def __init__(self, every: int = 50):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        self.every = every
        self.figure: Figure | None = None
        self.redraws = 0
        self._handle = None

    def __call__(self, step: int, history: History) -> None:
        if (step + 1) % self.every:
            return
        self.figure = plot_training(history)
        self.redraws += 1
        try:
            from IPython import get_ipython
            from IPython.display import Image, display
        except ImportError:
            return
        if get_ipython() is None:
            return
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=DPI)
        image = Image(data=buffer.getvalue(), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)


def plot_bounds(
    exact: float,
    bounds: dict[str, tuple[float, float]],
    path: str | os.PathLike | None = None,
    *,
    title: str = "Bounds against the exact log-likelihood",
    unit: str = "nats per sequence",
) -> Figure:
    """Lower bounds beside the exact log-likelihood they bound, e.g. ELBOs by guide, or IWAE by K.

    :param exact: the exact log p(x, a), drawn as a line.
    :param bounds: label → (mean, standard error), drawn as bars with error bars, in order.
    :param path: if given, save the figure here as a PNG.
    :returns: the figure; each bar's gap to the exact value is written on it.
    """
    if not bounds:
        raise ValueError("bounds: expected at least one label → (mean, standard error), got none")
    labels = list(bounds)
    means = np.array([float(bounds[k][0]) for k in labels])
    errors = np.array([float(bounds[k][1]) for k in labels])
    fig = _Figure(figsize=(1.2 * len(labels) + 3, 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(labels))
    ax.bar(x, means - exact, bottom=exact, yerr=errors, color="C0", capsize=4, gid="bounds")
    ax.axhline(exact, color="black", linewidth=1.5, label=f"exact {exact:.2f}", gid="exact")
    for xi, m in zip(x, means):
        ax.annotate(
            f"gap {exact - m:.2f}", (xi, m), ha="center", va="top", xytext=(0, -4), textcoords="offset points"
        )
    ax.set_xticks(x, labels)
    low = min(means.min() - errors.max(), exact)
    ax.set_ylim(low - 0.1 * (exact - low + 1e-9), exact + 0.1 * (exact - low + 1e-9))
    ax.set(ylabel=f"log-likelihood ({unit})", title=title)
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_kl_per_t(
    kl_per_t: torch.Tensor | Sequence[float],
    path: str | os.PathLike | None = None,
    *,
    monte_carlo: bool = False,
) -> Figure:
    """KL(q(z_t | ·) ‖ p(z_t | z_{t-1}, a_{t-1})) at each time index t.

    :param kl_per_t: ``(T,)``, e.g. :attr:`~pyro_worldmodel.evaluate.ELBOTerms.kl_per_t`.
    :param path: if given, save the figure here as a PNG.
    :param monte_carlo: the KL is (partly) a Monte Carlo estimate, as
        :attr:`~pyro_worldmodel.evaluate.ELBOTerms.monte_carlo_kl` says; the title says so.
    """
    kl = _numpy(kl_per_t)
    if kl.ndim != 1 or kl.size == 0:
        raise ValueError(f"kl_per_t: expected shape (T,) with T >= 1, got {tuple(kl.shape)}")
    fig = _Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    finite = np.isfinite(kl)
    # An infinite bar cannot be drawn (a diverged model's KL can be one): those are left
    # out, and the title counts them.
    ax.bar(np.arange(kl.size), np.where(finite, kl, np.nan), width=0.8, color="C0", gid="kl")
    title = f"KL per time index (sum over t {kl.sum():.3g} nats)"
    if not finite.all():
        title += f"\n{int((~finite).sum())} time indices not finite, not drawn"
    if monte_carlo:
        title += "\nMonte Carlo estimate: no analytic KL for this pair"
    ax.set(xlabel="t", ylabel="KL(q ‖ p) nats", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(fig, path)


def plot_imagination(
    imagination: Imagination,
    future_obs: torch.Tensor | None = None,
    *,
    episode: int = 0,
    dim_names: Sequence[str] | None = None,
    band: float = 0.9,
    max_paths: int = 5,
    path: str | os.PathLike | None = None,
) -> Figure:
    """One episode's context, then its imagined futures, one panel per observation dimension.

    Over t = 0 … C−1 the context (black); over t = C … C+H−1 the median of the
    sampled observations, the central ``band`` of them, ``max_paths`` of the
    sample paths, and the true future if given (dashed black). A dotted
    vertical line at t = C − ½ marks where the context ends.

    :param imagination: an :class:`~pyro_worldmodel.evaluate.Imagination`.
    :param future_obs: ``(B, H, X)`` or ``(H, X)`` what really followed the context.
    :param episode: which of the B episodes to draw.
    :param dim_names: X names for the panels; ``x[0]``, ``x[1]`` … by default.
    :param band: the probability of the shaded central quantile band, in (0, 1).
    :param max_paths: sample paths drawn (fewer if there are fewer samples).
    :param path: if given, save the figure here as a PNG.
    """
    obs = imagination.obs
    context_obs = imagination.context_obs
    if obs.dim() != 4:
        raise ValueError(f"imagination: expected obs of shape (S, B, H, X), got {tuple(obs.shape)}")
    S, B, H, X = obs.shape
    if context_obs.dim() != 3 or context_obs.shape[0] != B or context_obs.shape[2] != X:
        raise ValueError(
            f"imagination: expected context_obs of shape (B, C, X) = ({B}, C, {X}), got {tuple(context_obs.shape)}"
        )
    C = context_obs.shape[1]
    if not isinstance(episode, int) or isinstance(episode, bool) or not 0 <= episode < B:
        raise ValueError(f"episode: expected an int in [0, {B}), got {episode!r}")
    if not isinstance(band, (int, float)) or isinstance(band, bool) or not 0.0 < band < 1.0:
        raise ValueError(f"band: expected a probability in (0, 1), got {band!r}")
    if not isinstance(max_paths, int) or isinstance(max_paths, bool) or max_paths < 0:
        raise ValueError(f"max_paths: expected an int >= 0, got {max_paths!r}")
    if dim_names is None:
        dim_names = [f"x[{i}]" for i in range(X)]
    elif len(dim_names) != X:
        raise ValueError(
            f"dim_names: expected {X} names, one per observation dimension, got {len(dim_names)}"
        )
    if future_obs is not None:
        future_obs = torch.as_tensor(future_obs)
        if future_obs.dim() == 3 and future_obs.shape == (B, H, X):
            future_obs = future_obs[episode]
        if future_obs.shape != (H, X):
            raise ValueError(
                f"future_obs: expected shape (B, H, X) = ({B}, {H}, {X}) or (H, X) = ({H}, {X}),"
                f" got {tuple(future_obs.shape)}"
            )
        future_obs = _numpy(future_obs)  # (H, X)

    samples = obs[:, episode].detach().to("cpu", torch.float64)  # (S, H, X)
    lo, median, hi = _band(samples, band)  # 3 × (H, X)
    samples = samples.numpy()
    context = _numpy(context_obs[episode])  # (C, X)

    ncols = 1 if X <= 4 else 2 if X <= 12 else 3
    nrows = math.ceil(X / ncols)
    fig = _Figure(figsize=(6 * ncols, 1.2 + 2.2 * nrows), layout="constrained")
    grid = fig.subplots(nrows, ncols, sharex=True, squeeze=False)
    axes = _keep_first(grid, X)
    for i, ax in enumerate(axes):
        _draw_dimension(ax, i, context, samples, lo, median, hi, future_obs, band, max_paths)
        ax.set_ylabel(dim_names[i])
    axes[0].legend(fontsize="small")
    fig.suptitle(f"Imagination, episode {episode}: {C} context steps, {H} imagined, {S} samples")
    return save_figure(fig, path)


def _band(samples: torch.Tensor, band: float) -> np.ndarray:
    """The lower edge, the median and the upper edge of the central ``band`` of ``samples``
    ``(S, H, X)`` float64, over S: ``(3, H, X)``."""
    q = torch.tensor([(1.0 - band) / 2, 0.5, (1.0 + band) / 2], dtype=torch.float64)
    return torch.quantile(samples, q, dim=0).numpy()


def _draw_dimension(ax, i, context, samples, lo, median, hi, future_obs, band, max_paths) -> None:
    """Dimension ``i`` of one imagination: the context (black), the central band, sample
    paths and median of the futures (C0), the true future (dashed), the context's end."""
    C, (S, H) = context.shape[0], samples.shape[:2]
    t_context, t_future = np.arange(C), np.arange(C, C + H)
    ax.plot(t_context, context[:, i], color="black", label="context", gid="context")
    ax.fill_between(
        t_future,
        lo[:, i],
        hi[:, i],
        color="C0",
        alpha=0.25,
        linewidth=0,
        label=f"{band:.0%} band",
        gid="band",
    )
    for s in range(min(max_paths, S)):
        ax.plot(
            t_future, samples[s, :, i], color="C0", alpha=0.5, linewidth=0.6,
            label="samples" if s == 0 else "_nolegend_", gid="sample",
        )  # fmt: skip
    ax.plot(t_future, median[:, i], color="C0", linewidth=2, label="median", gid="median")
    if future_obs is not None:
        ax.plot(t_future, future_obs[:, i], color="black", linestyle="--", label="true future", gid="future")
    ax.axvline(C - 0.5, color="grey", linestyle=":", gid="context_end")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_imagination_windows(
    windows: Sequence[tuple[str, Imagination, torch.Tensor]],
    *,
    dim_names: Sequence[str] | None = None,
    band: float = 0.9,
    max_paths: int = 5,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Several windows side by side, one column each and one row per observation
    dimension, drawn as :func:`plot_imagination` draws one.

    :param windows: ``(title, imagination of one episode, its true future (1, H, X) or (H, X))``
        per column; e.g. a random window, the median one and the 10th-percentile one.
    """
    if not windows:
        raise ValueError("windows: expected at least one (title, imagination, future), got none")
    if not isinstance(band, (int, float)) or isinstance(band, bool) or not 0.0 < band < 1.0:
        raise ValueError(f"band: expected a probability in (0, 1), got {band!r}")
    X = windows[0][1].obs.shape[-1]
    dim_names = [f"x[{i}]" for i in range(X)] if dim_names is None else list(dim_names)
    if len(dim_names) != X:
        raise ValueError(
            f"dim_names: expected {X} names, one per observation dimension, got {len(dim_names)}"
        )
    fig = _Figure(figsize=(4.5 * len(windows), 1.0 + 1.9 * X), layout="constrained")
    grid = fig.subplots(X, len(windows), sharex="col", squeeze=False)
    for j, (title, im, future) in enumerate(windows):
        if im.obs.dim() != 4 or im.obs.shape[1] != 1 or im.obs.shape[-1] != X:
            raise ValueError(
                f"windows[{j}]: expected an imagination of one episode, obs (S, 1, H, {X}), got {tuple(im.obs.shape)}"
            )
        samples = im.obs[:, 0].detach().to("cpu", torch.float64)  # (S, H, X)
        lo, median, hi = _band(samples, band)
        fut = None if future is None else _numpy(torch.as_tensor(future).reshape(samples.shape[1:]))
        context = _numpy(im.context_obs[0])
        for i in range(X):
            _draw_dimension(grid[i, j], i, context, samples.numpy(), lo, median, hi, fut, band, max_paths)
            if j == 0:
                grid[i, j].set_ylabel(dim_names[i])
        grid[0, j].set_title(title, fontsize="medium")
    grid[0, 0].legend(fontsize="small")
    S, _, H, _ = windows[0][1].obs.shape
    fig.suptitle(
        f"Imagination: {windows[0][1].context_obs.shape[1]} context steps, {H} imagined, {S} samples"
    )
    return save_figure(fig, path)


def plot_open_loop(open_loop: OpenLoop, path: str | os.PathLike | None = None) -> Figure:
    """Each predictor's scores against horizon h = 1 … H, one colour per predictor.

    Four panels: the MSE of the predicted mean (log scale); the log-likelihood of
    the truth (the mean over windows with its standard-error band, the median
    dashed, the 10th percentile dotted; a symmetric-log scale, as a few windows
    can score thousands of nats below the rest); the CRPS (log scale); and the
    calibration panel, the observed coverage of the central 50% (dashed) and 90%
    (solid) intervals against the nominal levels (grey). Scores the
    :class:`~pyro_worldmodel.evaluate.OpenLoop` lacks are left out.

    :param open_loop: an :class:`~pyro_worldmodel.evaluate.OpenLoop`.
    :param path: if given, save the figure here as a PNG.
    """
    H = open_loop.horizon
    names = list(dict.fromkeys([*open_loop.mse, *open_loop.log_lik]))
    per_h = {
        "mse": open_loop.mse, "log_lik": open_loop.log_lik, "log_lik_se": open_loop.log_lik_se,
        "log_lik_median": open_loop.log_lik_median, "log_lik_p10": open_loop.log_lik_p10,
        "log_lik_gaussian": open_loop.log_lik_gaussian, "crps": open_loop.crps,
        **{f"coverage[{lv!r}]": values for lv, values in open_loop.coverage.items()},
    }  # fmt: skip
    for field_name, table in per_h.items():
        for name, values in table.items():
            if len(values) != H:
                raise ValueError(
                    f"open_loop: expected {field_name}[{name!r}] to hold horizon = {H} values, got {len(values)}"
                )
    fig = _Figure(figsize=(11, 8), layout="constrained")
    (ax_mse, ax_ll), (ax_crps, ax_cal) = fig.subplots(2, 2, sharex=True)
    h = np.arange(1, H + 1)
    for i, name in enumerate(names):
        color = f"C{i}"
        if name in open_loop.mse:
            ax_mse.plot(h, open_loop.mse[name], marker="o", markersize=3, color=color, label=name)
        if name in open_loop.log_lik:
            mean = _values(open_loop.log_lik[name])
            ax_ll.plot(h, mean, marker="o", markersize=3, color=color, label=name)
            if name in open_loop.log_lik_se:
                se = _values(open_loop.log_lik_se[name])
                ax_ll.fill_between(h, mean - se, mean + se, color=color, alpha=0.2, linewidth=0)
            if name in open_loop.log_lik_median:
                ax_ll.plot(h, open_loop.log_lik_median[name], linestyle="--", color=color)
            if name in open_loop.log_lik_p10:
                ax_ll.plot(h, open_loop.log_lik_p10[name], linestyle=":", color=color)
            gaussian = open_loop.log_lik_gaussian.get(name)
            if gaussian is not None and gaussian != open_loop.log_lik[name]:
                ax_ll.plot(h, gaussian, linestyle="-.", color=color, linewidth=1)
        if name in open_loop.crps:
            ax_crps.plot(h, open_loop.crps[name], marker="o", markersize=3, color=color, label=name)
        for level, style in (("0.5", "--"), ("0.9", "-")):
            if name in open_loop.coverage.get(level, {}):
                label = name if level == "0.9" else None
                ax_cal.plot(h, open_loop.coverage[level][name], linestyle=style, color=color, label=label)
    for level in open_loop.coverage:
        ax_cal.axhline(float(level), color="grey", linewidth=1, zorder=0)
    ax_mse.set_yscale("log")
    ax_mse.set(ylabel="MSE of the predicted mean", title="Mean squared error")
    ax_ll.set_yscale("symlog", linthresh=10)
    ax_ll.set(
        ylabel=r"$\log p(x_{C+h})$ (nats)",
        title="Log-likelihood: mean ± s.e., median --, 10th pct :, Gaussian -.",
    )
    if any(open_loop.crps.values()):
        ax_crps.set_yscale("log")
    ax_crps.set(xlabel="horizon h", ylabel="CRPS (real units)", title="CRPS, lower is better")
    ax_cal.set(
        xlabel="horizon h", ylabel="observed coverage", ylim=(0, 1.02),
        title="Calibration: central 90% (—) and 50% (--) intervals; grey: nominal",
    )  # fmt: skip
    for ax in (ax_mse, ax_ll, ax_crps, ax_cal):
        if ax.get_lines():
            ax.legend(fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    samples = f", {open_loop.num_samples} draws each" if open_loop.num_samples else ""
    fig.suptitle(
        f"Open-loop prediction after {open_loop.context} context steps, {open_loop.num_windows} windows{samples}"
    )
    return save_figure(fig, path)


def plot_estimator_comparison(
    comparison: EstimatorComparison, path: str | os.PathLike | None = None
) -> Figure:
    """Each estimator's bound, loss variance, gradient SNR and time per step, as horizontal bars.

    Bars are drawn at exactly the values of the comparison's table: the bound
    (nats per timestep, ± its standard error), the variance of the loss per
    timestep (log scale), the gradient signal-to-noise ratio of the model's and
    the guide's parameters, and the median milliseconds per SVI step (the
    whiskers span the quartiles). A figure that does not exist (the bound of
    ``TraceTailAdaptive_ELBO``) is marked ``n/a``.

    :param comparison: an :class:`~pyro_worldmodel.compare.EstimatorComparison`.
    :param path: if given, save the figure here as a PNG.
    """
    rows = comparison.results
    if not rows:
        raise ValueError("comparison: expected at least one estimator, got none")
    labels = [r.label for r in rows]
    y = np.arange(len(rows))
    fig = _Figure(figsize=(17, 1.4 + 0.35 * len(rows)), layout="constrained")
    ax_bound, ax_var, ax_snr, ax_time = fig.subplots(1, 4, sharey=True)

    bound, bound_se = _values([r.bound for r in rows]), _values([r.bound_se for r in rows])
    ax_bound.barh(y, bound, xerr=bound_se, color="C0", capsize=3, gid="bound")
    ax_bound.set(xlabel="nats per timestep", title="Bound ± s.e.")
    ax_var.barh(y, _values([r.loss_variance for r in rows]), color="C1", gid="loss_variance")
    ax_var.set_xscale("log")
    ax_var.set(xlabel="Var[loss per timestep]", title="Loss variance")
    height = 0.4
    for offset, part, color in ((-height / 2, "model", "C2"), (height / 2, "guide", "C3")):
        snr = _values([r.grad_snr.get(part) for r in rows])
        ax_snr.barh(y + offset, snr, height=height, color=color, label=part, gid=f"snr_{part}")
    ax_snr.set(xlabel="mean |E g| / sd g", title="Gradient SNR")
    ax_snr.legend(fontsize="small")
    ms = 1e3 * _values([r.step_time for r in rows])
    quartiles = 1e3 * np.array([_values(r.step_time_quartiles) for r in rows])  # (E, 2)
    whiskers = np.abs(np.stack([ms - quartiles[:, 0], quartiles[:, 1] - ms]))  # (2, E)
    ax_time.barh(y, ms, xerr=whiskers, color="C4", capsize=3, gid="step_time")
    ax_time.set(xlabel="ms per SVI step (median, quartiles)", title="Time")

    for ax, values in (
        (ax_bound, bound),
        (ax_var, _values([r.loss_variance for r in rows])),
        (ax_time, ms),
    ):
        for i in np.flatnonzero(np.isnan(values)):
            ax.text(0.02, y[i], "n/a", transform=ax.get_yaxis_transform(), va="center", gid="missing")
    ax_bound.set_yticks(y, labels)
    ax_bound.invert_yaxis()
    s = comparison.settings
    fig.suptitle(
        f"Estimators at the same initial parameters: {s['repeats']} draws on {s['eval_timesteps']} observed steps"
    )
    return save_figure(fig, path)


def plot_learning_curves(
    comparison: EstimatorComparison, path: str | os.PathLike | None = None, *, window: int | None = None
) -> Figure:
    """Each estimator's own training loss, and the held-out ELBO that all share, against SVI step.

    The losses are of different objectives, so the right panel gives the
    comparable measure: the held-out ELBO per timestep at the checkpoints.

    :param comparison: an :class:`~pyro_worldmodel.compare.EstimatorComparison`.
    :param path: if given, save the figure here as a PNG.
    :param window: steps in the trailing moving average of each loss; by
        default a twentieth of the steps, at most 50.
    """
    rows = comparison.results
    if not rows or not all(r.train_loss for r in rows):
        raise ValueError("comparison: expected every estimator to have a training loss, got none for some")
    steps = max(len(r.train_loss) for r in rows)
    if window is None:
        window = max(1, min(50, steps // 20))
    elif not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window: expected an int >= 1, got {window!r}")
    fig = _Figure(figsize=(13, 4.5), layout="constrained")
    ax_loss, ax_held = fig.subplots(1, 2, sharex=True)
    colors = _colors(len(rows))
    for r, color in zip(rows, colors, strict=True):
        loss = np.asarray(r.train_loss, dtype=np.float64)
        ax_loss.plot(
            np.arange(loss.size),
            moving_average(loss, window),
            color=color,
            label=r.label,
            gid=f"loss:{r.label}",
        )
        ax_held.plot(
            [c["step"] for c in r.checkpoints],
            _values([c["heldout_elbo"] for c in r.checkpoints]),
            marker="o",
            markersize=3,
            color=color,
            label=r.label,
            gid=f"heldout:{r.label}",
        )
    ax_loss.set(
        xlabel="SVI step",
        ylabel="loss per timestep (nats)",
        title=f"Own training loss (mean of last {window})",
    )
    ax_held.set(xlabel="SVI step", ylabel="nats per timestep", title="Held-out ELBO (the common measure)")
    fig.legend(*ax_held.get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.suptitle("Learning curves from the same initial parameters and minibatches")
    return save_figure(fig, path)


def _values(xs) -> np.ndarray:
    """Floats, with None as NaN."""
    return np.array([np.nan if x is None else float(x) for x in xs], dtype=np.float64)


def _colors(n: int) -> list:
    """n distinguishable colours: the default cycle up to 10, then tab20."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def _keep_first(grid: np.ndarray, n: int) -> list[Axes]:
    """The first ``n`` axes of a shared-x grid, row by row; the rest are removed."""
    nrows, ncols = grid.shape
    for k in range(n, nrows * ncols):
        grid.flat[k].remove()
    axes = list(grid.flat[:n])
    for col in range(min(ncols, n)):
        # The lowest remaining axes of each column carries its x tick labels and label.
        bottom = axes[max(k for k in range(n) if k % ncols == col)]
        bottom.xaxis.set_tick_params(labelbottom=True)
        bottom.set_xlabel("t")
    return axes


def _numpy(x) -> np.ndarray:
    return torch.as_tensor(x).detach().to("cpu", torch.float64).numpy()


def save_figure(fig: Figure, path: str | os.PathLike | None) -> Figure:
    """Write ``fig`` as a PNG at ``path``, atomically (nothing when ``path`` is None)."""
    if path is not None:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight"))
    return fig


def plot_loop(result, path: str | os.PathLike | None = None, *, target: float | None = None) -> Figure:
    """The return of each iteration of the model-based loop against environment steps.

    :param result: a :class:`~pyro_worldmodel.loop.LoopResult` (or its ``as_dict()``).
    :param target: draw this return as a dashed line.
    :returns: evaluation returns (mean ± std over the evaluation episodes) and the
        mean return of the episodes collected with exploration, against the
        environment steps in the data at that point.
    """
    rows = result["iterations"] if isinstance(result, dict) else result.iterations
    if not rows:
        raise ValueError("result: expected at least one iteration, got none")
    env_id = result["env_id"] if isinstance(result, dict) else result.env_id
    planner = result["planner"] if isinstance(result, dict) else result.planner
    fig = _Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    steps = np.array([r["env_steps"] for r in rows])
    ax.plot(
        steps,
        [r["collect_return"] for r in rows],
        ".",
        color="C1",
        alpha=0.6,
        label="collected (exploring)",
        gid="collect",
    )
    ev = [
        (r["env_steps"], r["eval_return"], r["eval_return_std"]) for r in rows if r["eval_return"] is not None
    ]
    if ev:
        x, m, s = (np.array(v, dtype=float) for v in zip(*ev))
        ax.plot(x, m, "o-", color="C0", label="evaluation (mean)", gid="eval")
        ax.fill_between(x, m - s, m + s, color="C0", alpha=0.2, label="± std over episodes")
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set(
        xlabel="environment steps in the data",
        ylabel="return per episode",
        title=f"{env_id}: {planner} planner",
    )
    ax.legend()
    return save_figure(fig, path)


# ---------------------------------------------------------------- video


def _rgb(frames: torch.Tensor) -> np.ndarray:
    """``(..., C, H, W)`` uint8 → ``(..., H, W, 3)`` uint8 (grayscale repeated)."""
    x = torch.as_tensor(frames)
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return x.movedim(-3, -1).contiguous().numpy()


def _difference(truth: torch.Tensor, imagined: torch.Tensor) -> torch.Tensor:
    """|truth − imagined| per pixel, uint8."""
    return (truth.int() - imagined.int()).abs().to(torch.uint8)


def plot_video(prediction, path: str | os.PathLike | None = None, *, max_frames: int = 15) -> Figure:
    """One window of open-loop video prediction, and the scores at every horizon.

    :param prediction: a :class:`~pyro_worldmodel.evaluate.VideoPrediction`.
    :returns: rows of true frames, imagined frames and their absolute difference at up to
        ``max_frames`` horizons (evenly spaced), above the MSE and PSNR of the model and
        the baselines against the horizon.
    """
    truth, imagined = prediction.truth, prediction.imagined
    H = truth.shape[0]
    shown = sorted({round(i * (H - 1) / max(min(H, max_frames) - 1, 1)) for i in range(min(H, max_frames))})
    rows = (("true", truth), ("imagined", imagined), ("|difference|", _difference(truth, imagined)))
    fig = _Figure(figsize=(1.1 * len(shown) + 1.0, 7.0))
    grid = fig.add_gridspec(5, len(shown), height_ratios=[1, 1, 1, 0.15, 2.2])
    for r, (label, frames) in enumerate(rows):
        for c, h in enumerate(shown):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(_rgb(frames[h]))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"h={h + 1}", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    horizons = np.arange(1, prediction.horizon + 1)
    for k, (key, label) in enumerate((("mse", "MSE per pixel"), ("psnr", "PSNR (dB)"))):
        sub = grid[4, : len(shown) // 2] if k == 0 else grid[4, len(shown) // 2 :]
        ax = fig.add_subplot(sub)
        for name, values in getattr(prediction, key).items():
            ax.plot(horizons, values, marker=".", label=name)
        ax.set_xlabel("horizon")
        ax.set_title(label, fontsize=9)
        if key == "mse":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"open-loop video after {prediction.context} context frames, {prediction.num_windows} windows"
    )
    return save_figure(fig, path)


def video_gif(prediction, *, scale: int = 2, duration_ms: int = 150) -> bytes:
    """An animated GIF of one predicted window: true, imagined and |difference| side by side,
    one frame per horizon, each pixel drawn ``scale`` × ``scale``. Write it with
    :func:`~pyro_worldmodel.io.atomic_write`."""
    from PIL import Image

    truth, imagined = prediction.truth, prediction.imagined
    panels = [_rgb(truth), _rgb(imagined), _rgb(_difference(truth, imagined))]  # (H, h, w, 3) each
    gap = np.full((*panels[0].shape[:2], 2, 3), 255, np.uint8)
    strip = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=2)  # (H, h, 3w + 4, 3)
    strip = strip.repeat(scale, 1).repeat(scale, 2)
    images = [Image.fromarray(frame) for frame in strip]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0
    )
    return buffer.getvalue()
