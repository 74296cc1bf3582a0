"""Open-loop prediction: after a context, the model's imagined futures against baselines."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..spaces import INT_DTYPES, check_inputs, check_observed
from .calibration import CoverageOffsets, fit_spread, moved
from .imagination import imagine
from .scores import (
    LEVELS,
    crps,
    interval_coverage,
    mixture_log_density,
    moment_matched,
    predictive_variance,
    summarise,
)

# Up to this many observation dimensions the moment-matched Gaussian has a full covariance:
# (windows, H, X, X) per chunk, 15 MB at X = 64 for 256 windows and H = 15 in float64.
FULL_COVARIANCE_DIMS = 64


@dataclass
class OpenLoop:
    """Open-loop prediction: after ``context`` observed steps, predict ``horizon`` more.

    Each predictor (``"model"`` and the baselines) is given the true actions and
    scored as a predictive distribution on the same windows. Every figure is a
    list over horizons h = 1 … H and a mean over the windows that reach h,
    except where said; the estimators are those of
    :mod:`pyro_worldmodel.evaluate.scores`.

    :ivar mse: predictor → mean squared error of the predicted mean, in real
        units, averaged over observation dimensions.
    :ivar log_lik: predictor → log-density of the true x_{C+h} under the
        predictor's distribution for it, in nats (summed over dimensions, in
        real units). The model's is the sample mixture's, log (1/S) Σ_s p(x | z_s),
        biased low; a baseline's is its Gaussian's, exact.
    :ivar log_lik_se: the standard error of ``log_lik``, clustered by episode: the windows
        of one episode overlap, and their scores are correlated.
    :ivar log_lik_median: the median of the per-window log-likelihood.
    :ivar log_lik_p10: its 10th percentile: how bad the worst tenth of windows is.
    :ivar log_lik_gaussian: the log-density under the moment-matched Gaussian
        (the predictive's mean and full covariance; its diagonal beyond
        ``FULL_COVARIANCE_DIMS`` observation dimensions, where the covariances
        would not fit in memory); a baseline's equals ``log_lik``. The model's is
        missing where its emission is not real-valued.
    :ivar crps: the CRPS of each dimension from S draws, in real units, averaged
        over dimensions; lower is better.
    :ivar coverage: level (``"0.5"``, ``"0.9"``) → predictor → the fraction of true
        values, over windows and dimensions, inside the central interval of
        that probability, from S draws. Calibrated: equal to the level.
    :ivar sq_z: the squared error over the predictive variance, per dimension,
        averaged: 1 when the variance is right, above 1 when overconfident.
    :ivar num_samples: S, draws per window of each predictor.
    :ivar windows: ``[episode, start]`` of each window, the episode an index into
        the data given; its context is steps start … start + C − 1.
    :ivar window_log_lik: the model's log-likelihood of each window, averaged over
        the horizons its episode reaches: which windows it dreams well and which badly.
    :ivar num_windows: windows evaluated.
    :ivar count: ``[H]`` windows whose episode reaches each horizon; the
        figures at horizon h average over these.
    :ivar calibration: with ``calibrate=True``, the spread factors fitted on every
        window (:meth:`SpreadCalibration.to_dict`): what to apply to the model's
        futures on new data. The ``"calibrated"`` predictor's scores use factors
        fitted on the other fold's episodes, never on the window scored.

    A horizon that no window reaches (every episode too short) is NaN.
    """

    context: int
    horizon: int
    mse: dict[str, list[float]]
    log_lik: dict[str, list[float]]
    num_windows: int
    count: list[int]
    log_lik_se: dict[str, list[float]] = field(default_factory=dict)
    log_lik_median: dict[str, list[float]] = field(default_factory=dict)
    log_lik_p10: dict[str, list[float]] = field(default_factory=dict)
    log_lik_gaussian: dict[str, list[float]] = field(default_factory=dict)
    crps: dict[str, list[float]] = field(default_factory=dict)
    coverage: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    sq_z: dict[str, list[float]] = field(default_factory=dict)
    num_samples: int | None = None
    windows: list[list[int]] = field(default_factory=list)
    window_log_lik: list[float] = field(default_factory=list)
    calibration: dict | None = None

    def table(self, horizons=(1, 5, 15)) -> str:
        """A markdown table, one row per horizon and predictor: MSE, the log-likelihood's
        mean ± standard error, median and 10th percentile, the moment-matched Gaussian's
        log-likelihood, CRPS and the coverage of the central 50% and 90% intervals."""
        horizons = [h for h in horizons if 1 <= h <= self.horizon]
        head = (
            "| h | predictor | MSE | log-lik ± s.e. | median | 10th pct | Gaussian log-lik"
            " | CRPS | 50% cov. | 90% cov. |"
        )
        rule = "|---:|---|" + "---:|" * 8
        rows = []
        for h in horizons:
            for name in self.mse:
                i = h - 1
                rows.append(
                    f"| {h} | {name} | {self.mse[name][i]:.3g} | {_ll(self.log_lik, name, i)}"
                    + _se(self.log_lik_se, name, i)
                    + f" | {_ll(self.log_lik_median, name, i)} | {_ll(self.log_lik_p10, name, i)}"
                    + f" | {_ll(self.log_lik_gaussian, name, i)} | {_num(self.crps, name, i, '.3g')}"
                    + f" | {_num(self.coverage.get('0.5', {}), name, i, '.2f')}"
                    + f" | {_num(self.coverage.get('0.9', {}), name, i, '.2f')} |"
                )
        return "\n".join([head, rule, *rows])


def _num(values: dict, name: str, i: int, fmt: str) -> str:
    if name not in values or values[name][i] is None or not math.isfinite(values[name][i]):
        return "–"
    return format(values[name][i], fmt)


def _se(values: dict, name: str, i: int) -> str:
    """`` ± s.e.``; `` ± n/a`` where there is none (the windows of one held-out episode)."""
    if name not in values:
        return ""
    v = values[name][i]
    return " ± n/a" if v is None or not math.isfinite(v) else f" ± {v:.2g}"


def _ll(values: dict, name: str, i: int) -> str:
    """A log-likelihood to as many digits as a rerun repeats: three significant, at most two decimals."""
    if name not in values or values[name][i] is None or not math.isfinite(values[name][i]):
        return "–"
    v = values[name][i]
    decimals = max(0, min(2, 2 - int(math.floor(math.log10(abs(v)))) if v else 2))
    return f"{v:.{decimals}f}"


def open_loop(
    model,
    guide,
    obs,
    actions,
    mask=None,
    *,
    context: int = 5,
    horizon: int = 15,
    num_samples: int = 100,
    normalizer=None,
    baselines=None,
    max_windows: int | None = 2000,
    chunk_size: int = 256,
    seed: int = 0,
    calibrate: bool = False,
) -> OpenLoop:
    """Predict ``horizon`` steps open loop after ``context`` observed ones, given the true actions.

    Windows start at every step of every episode that leaves at least one step
    to predict (a random ``max_windows`` of them if there are more). At
    horizon h a window counts only if its episode reaches that step. The model
    predicts by :func:`~pyro_worldmodel.evaluate.imagine`: the mean is the
    average of ``num_samples`` emission means, and the log-likelihood is
    log (1/S) Σ_s p(x | z_s), a Monte Carlo estimate of the predictive density
    that is biased low, beside the moment-matched Gaussian's
    (:mod:`~pyro_worldmodel.evaluate.scores` states each estimator's bias). Each
    baseline's Gaussian is scored exactly where it can be (log-likelihood) and
    from ``num_samples`` draws where the model is (CRPS, coverage), so that
    both carry the same sampling error.

    :param obs: ``(N, T, X)`` real units; :param actions: ``(N, T, ...)``.
    :param mask: ``(N, T)`` bool, each row a prefix of True values; at least one True.
        Inside it, values are checked as :func:`~pyro_worldmodel.spaces.check_inputs`
        checks them, whether or not Pyro validation is on; outside it they are padding.
    :param normalizer: maps real units to the model's (and the baselines'); None
        when the data are already in model units.
    :param baselines: name → a fitted predictor with ``predict(context_obs,
        actions, horizon)`` returning a Normal over ``(B, H, X)`` in model
        units, e.g. :class:`~pyro_worldmodel.model.baselines.LinearLeastSquares`.
    :param calibrate: also score ``"calibrated"``: the model's futures moved about
        their mean by :class:`~pyro_worldmodel.evaluate.calibration.SpreadCalibration`
        factors, fitted by cross-fitting: the windows of even-numbered episodes are
        scored with factors fitted on the odd-numbered ones', and the other way
        round. Needs windows from episodes of both kinds and a real-valued emission.
        The model is imagined twice, with the same draws.
    """
    for arg, value, low in (
        ("context", context, 1),
        ("horizon", horizon, 1),
        ("num_samples", num_samples, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{arg}: expected an int >= {low}, got {value!r}")
    obs, actions, mask = _check_real_units(model, obs, actions, mask)
    check_observed(mask)
    episode, start, _, w_obs, w_act, valid = cut_windows(
        obs, actions, mask, context, horizon, max_windows, seed
    )
    to_model = (lambda x: x) if normalizer is None else normalizer.obs
    to_real = (lambda x: x) if normalizer is None else normalizer.obs_inverse
    # log-density in real units = in model units − log |d real / d model|
    log_jac = 0.0 if normalizer is None else float(normalizer.obs_scale.log().sum())
    predictors = {"model": None, **({"calibrated": None} if calibrate else {}), **(baselines or {})}
    keys = ("sq_err", "log_lik", "log_lik_gaussian", "crps", "sq_z", *(f"cov{lv}" for lv in LEVELS))
    scores = {name: {k: [] for k in keys} for name in predictors}
    gaussian_model = getattr(model.emission, "real_valued", True)
    device = next(model.parameters()).device
    calibration, fold_factor = None, None
    if calibrate:
        calibration, fold_factor = _cross_fitted_spread(
            model, guide, w_obs, w_act, valid, episode, context, horizon, num_samples, normalizer, chunk_size
        )
    for lo in range(0, len(episode), chunk_size):
        sl = slice(lo, lo + chunk_size)
        ctx_obs, ctx_act = w_obs[sl, :context], w_act[sl, :context]
        future_obs, future_act = w_obs[sl, context:], w_act[sl, context:]
        im = imagine(
            model, guide, ctx_obs, ctx_act, horizon,
            future_actions=future_act, num_samples=num_samples, normalizer=normalizer,
        )  # fmt: skip
        target = to_model(future_obs).to(device)  # (b, H, X)
        with torch.no_grad():
            emission = model.emission(im.emission_input)  # batch (S, b, H), event (X,)
            mixture = mixture_log_density(emission.log_prob(target)).cpu() - log_jac  # (b, H)
            # The predictive's variance per dimension, by the law of total variance; where an
            # emission has none that is finite (a Student-t with ν ≤ 2), NaN.
            mean_s, var_s = emission.mean.double(), emission.variance.double()
            variance = {"model": predictive_variance(mean_s, var_s).cpu()}  # (b, H, X), model units
            finite = bool(torch.isfinite(mean_s).all() and torch.isfinite(var_s).all())
            gaussian = None  # none for an emission of binary values
            if gaussian_model and finite:
                full = model.obs_dim <= FULL_COVARIANCE_DIMS
                gaussian = moment_matched(mean_s, var_s, full=full).log_prob(target.double())
                gaussian = (gaussian if full else gaussian.sum(-1)).cpu() - log_jac  # diagonal: per dimension
            elif gaussian_model:
                gaussian = torch.full_like(mixture, float("nan"), dtype=torch.float64)
            if not finite:
                variance["model"] = torch.full_like(variance["model"], float("nan"))
            record = {"model": (mixture, gaussian)}
        draws = {"model": im.obs.cpu()}  # (S, b, H, X) real units
        means = {"model": im.obs_mean.mean(0).cpu()}
        if calibrate:
            c = fold_factor[sl].to(device)  # (b, H, X), fitted on the other fold
            with torch.no_grad():
                m = mean_s.mean(0)  # (b, H, X) model units
                read_at = moved(target.double(), m, 1 / c)  # where the original density is read
                log_c = c.log().sum(-1)  # (b, H)
                mixture_c = mixture_log_density(emission.log_prob(read_at.to(target.dtype))).double() - log_c
                gaussian_c = None
                if finite:
                    full = model.obs_dim <= FULL_COVARIANCE_DIMS
                    g = moment_matched(moved(mean_s, m, c), c**2 * var_s, full=full).log_prob(target.double())
                    gaussian_c = (g if full else g.sum(-1)).cpu() - log_jac
                else:
                    gaussian_c = torch.full_like(mixture_c, float("nan")).cpu()
            record["calibrated"] = (mixture_c.cpu() - log_jac, gaussian_c)
            variance["calibrated"] = variance["model"] * c.cpu() ** 2
            means["calibrated"] = means["model"]
            draws["calibrated"] = moved(draws["model"], means["model"], c.cpu().to(draws["model"].dtype))
        for name, predictor in (baselines or {}).items():
            model_act = w_act[sl, : context + horizon - 1]
            if normalizer is not None and model_act.is_floating_point():
                model_act = normalizer.actions(model_act)
            pred = predictor.predict(to_model(ctx_obs), model_act, horizon)
            means[name] = to_real(pred.mean)
            draws[name] = to_real(pred.sample((num_samples,)))
            ll = pred.log_prob(to_model(future_obs)).sum(-1) - log_jac
            record[name] = (ll, ll)
            variance[name] = pred.variance
        target = target.cpu()
        for name in predictors:
            s = scores[name]
            s["sq_err"].append(((means[name] - future_obs) ** 2).mean(-1))
            s["log_lik"].append(record[name][0])
            if record[name][1] is not None:
                s["log_lik_gaussian"].append(record[name][1])
            s["crps"].append(crps(draws[name], future_obs).mean(-1))
            for lv in LEVELS:
                s[f"cov{lv}"].append(interval_coverage(draws[name], future_obs, lv).double().mean(-1))
            loc = to_model(means[name])
            s["sq_z"].append(((target - loc) ** 2 / variance[name]).mean(-1))
    count = valid.sum(0)  # (H,); a horizon no window reaches gets NaN

    def mean(chunks):
        x = torch.cat(chunks)  # (n, H)
        return (torch.where(valid, x, 0.0).sum(0) / count).tolist()

    out = {k: {} for k in ("mse", "log_lik", "log_lik_se", "log_lik_median", "log_lik_p10",
                           "log_lik_gaussian", "crps", "sq_z")}  # fmt: skip
    coverage = {str(lv): {} for lv in LEVELS}
    model_ll = torch.cat(scores["model"]["log_lik"])  # (n, H)
    window_ll = torch.where(valid, model_ll, 0.0).sum(1) / valid.sum(1)
    for name, s in scores.items():
        ll = summarise(torch.cat(s["log_lik"]), valid, groups=episode)
        out["mse"][name] = mean(s["sq_err"])
        out["log_lik"][name] = ll["mean"]
        out["log_lik_se"][name] = ll["se"]
        out["log_lik_median"][name] = ll["median"]
        out["log_lik_p10"][name] = ll["p10"]
        if s["log_lik_gaussian"]:
            out["log_lik_gaussian"][name] = mean(s["log_lik_gaussian"])
        out["crps"][name] = mean(s["crps"])
        out["sq_z"][name] = mean(s["sq_z"])
        for lv in LEVELS:
            coverage[str(lv)][name] = mean(s[f"cov{lv}"])
    return OpenLoop(
        context=context,
        horizon=horizon,
        num_windows=len(episode),
        count=count.tolist(),
        coverage=coverage,
        num_samples=num_samples,
        windows=torch.stack([episode, start], 1).tolist(),
        window_log_lik=window_ll.tolist(),
        calibration=None if calibration is None else calibration.to_dict(),
        **out,
    )


def _cross_fitted_spread(model, guide, w_obs, w_act, valid, episode, context, horizon, num_samples,
                         normalizer, chunk_size):  # fmt: skip
    """The model's futures imagined once, without touching the random state the scoring
    pass draws from: the spread factors fitted on all windows, and ``(n, H, X)`` the factors
    of each window, fitted on the windows of the other fold (episode parity)."""
    if not getattr(model.emission, "real_valued", True):
        raise ValueError(
            f"calibrate: moving futures about their mean needs a real-valued emission,"
            f" got {type(model.emission).__name__}"
        )
    fold = episode % 2
    if fold.unique().numel() < 2:
        raise ValueError(
            "calibrate: cross-fitting needs windows from even- and odd-numbered episodes,"
            f" got windows from episodes {sorted(set(episode.tolist()))} only"
        )
    device = next(model.parameters()).device
    offsets = CoverageOffsets()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for lo in range(0, len(episode), chunk_size):
            sl = slice(lo, lo + chunk_size)
            im = imagine(
                model, guide, w_obs[sl, :context], w_act[sl, :context], horizon,
                future_actions=w_act[sl, context:], num_samples=num_samples, normalizer=normalizer,
            )  # fmt: skip
            offsets.add(im.obs.cpu(), im.obs_mean.mean(0).cpu(), w_obs[sl, context:], valid[sl])
    everything = fit_spread(offsets.select(torch.ones_like(fold, dtype=torch.bool)))
    per_fold = [fit_spread(offsets.select(fold == k)).factor for k in (0, 1)]
    # a window of fold k gets the factors fitted on fold 1 - k
    factor = torch.where((fold == 0)[:, None, None], per_fold[1], per_fold[0])
    return everything, factor


def _check_real_units(model, obs, actions, mask):
    """``(obs, actions, mask)`` in real units as :func:`~pyro_worldmodel.spaces.check_inputs`
    checks them, values included: NaN inside the mask would reach the figures, and a
    mask that is no prefix would misplace the windows. Where they are stays as given.

    Not ``model.check_inputs``: a bounded policy's box and a Bernoulli emission's
    {0, 1} are in model units, which :func:`imagine` checks after the normaliser.
    """
    obs, actions = torch.as_tensor(obs), torch.as_tensor(actions)
    ref = next(model.parameters())
    # Keep the data's precision, as the figures compare them in real units.
    dtype = obs.dtype if obs.is_floating_point() else ref.dtype
    if model.action_space.kind == "box" and actions.dtype in INT_DTYPES:
        actions = actions.to(dtype)  # real actions, normalised like any other
    return check_inputs(
        obs,
        actions,
        mask,
        obs_dim=model.obs_dim,
        action_space=model.action_space,
        dtype=dtype,
        device=obs.device,
        check_values=True,
    )


class Windows(NamedTuple):
    """Open-loop windows of ``context + horizon`` steps cut from episodes (:func:`cut_windows`)."""

    episode: torch.Tensor  # (n,) the episode of each window
    start: torch.Tensor  # (n,) its first step
    steps: torch.Tensor  # (n, W) the steps it covers, clamped to the episodes' padded length
    obs: torch.Tensor  # (n, W, X), zero past the episode's end
    actions: torch.Tensor  # (n, W, ...), zero past the episode's end
    valid: torch.Tensor  # (n, H) whether each predicted step lies inside the episode


def cut_windows(obs, actions, mask, context: int, horizon: int, max_windows, seed) -> Windows:
    """Windows starting at every step of every episode that leaves at least one step to
    predict (a random ``max_windows`` of them, drawn with ``seed``, if there are more).

    :raises ValueError: where no episode is longer than ``context``.
    """
    lengths = mask.sum(1)
    episode, start = _window_starts(lengths, context, max_windows, seed)
    if len(episode) == 0:
        raise ValueError(
            f"mask: expected an episode longer than context={context}, got lengths up to {int(lengths.max())}"
        )
    t = start[:, None] + torch.arange(context + horizon)  # (n, W)
    inside = t < lengths[episode][:, None]
    t = t.clamp(max=obs.shape[1] - 1)
    w_obs, w_act = obs[episode[:, None], t], actions[episode[:, None], t]
    # Past an episode's end lies padding, NaN included: never let it reach a network.
    w_obs = torch.where(inside[..., None], w_obs, w_obs.new_zeros(()))
    w_act = torch.where(inside[..., None] if w_act.dim() == 3 else inside, w_act, w_act.new_zeros(()))
    return Windows(episode, start, t, w_obs, w_act, inside[:, context:])


def _window_starts(lengths, context, max_windows, seed):
    """(episode, start) of every window with a full context and one step to predict."""
    episode, start = [], []
    for n, L in enumerate(lengths.tolist()):
        s = torch.arange(max(L - context, 0))
        episode.append(torch.full_like(s, n))
        start.append(s)
    episode, start = torch.cat(episode), torch.cat(start)
    if max_windows is not None and len(episode) > max_windows:
        keep = torch.randperm(len(episode), generator=torch.Generator().manual_seed(seed))[:max_windows]
        keep = keep.sort().values
        episode, start = episode[keep], start[keep]
    return episode, start
