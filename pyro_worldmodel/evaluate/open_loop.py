"""Open-loop prediction: after a context, the model's imagined futures against baselines."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..spaces import INT_DTYPES, check_inputs, check_observed
from .imagination import imagine


@dataclass
class OpenLoop:
    """Open-loop prediction: after ``context`` observed steps, predict ``horizon`` more.

    Each predictor (``"model"`` and the baselines) is given the true actions.
    Figures are per horizon h = 1 … H, averaged over the windows:

    :ivar mse: predictor → ``[H]`` mean squared error of the predicted mean, in
        real units, averaged over observation dimensions.
    :ivar log_lik: predictor → ``[H]`` log-density of the true x_{C+h} under the
        predictor's distribution for it, in nats (summed over dimensions, in
        real units).
    :ivar num_windows: windows evaluated.
    :ivar count: ``[H]`` windows whose episode reaches each horizon; the
        figures at horizon h average over these.

    A horizon that no window reaches (every episode too short) is NaN.
    """

    context: int
    horizon: int
    mse: dict[str, list[float]]
    log_lik: dict[str, list[float]]
    num_windows: int
    count: list[int]

    def table(self, horizons=(1, 5, 15)) -> str:
        """A markdown table of MSE and log-likelihood at ``horizons``."""
        horizons = [h for h in horizons if 1 <= h <= self.horizon]
        head = "| predictor | " + " | ".join(f"MSE h={h}" for h in horizons)
        head += " | " + " | ".join(f"log-lik h={h}" for h in horizons) + " |"
        rule = "|---|" + "---:|" * (2 * len(horizons))
        rows = [
            f"| {name} | "
            + " | ".join(f"{self.mse[name][h - 1]:.3g}" for h in horizons)
            + " | "
            + " | ".join(f"{self.log_lik[name][h - 1]:.2f}" for h in horizons)
            + " |"
            for name in self.mse
        ]
        return "\n".join([head, rule, *rows])


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
) -> OpenLoop:
    """Predict ``horizon`` steps open loop after ``context`` observed ones, given the true actions.

    Windows start at every step of every episode that leaves at least one step
    to predict (a random ``max_windows`` of them if there are more). At
    horizon h a window counts only if its episode reaches that step. The model
    predicts by :func:`~pyro_worldmodel.evaluate.imagine`: the mean is the
    average of ``num_samples`` emission means, and the log-likelihood is
    log (1/S) Σ_s p(x | z_s), a Monte Carlo estimate of the predictive density.

    :param obs: ``(N, T, X)`` real units; :param actions: ``(N, T, ...)``.
    :param mask: ``(N, T)`` bool, each row a prefix of True values; at least one True.
        Inside it, values are checked as :func:`~pyro_worldmodel.spaces.check_inputs`
        checks them, whether or not Pyro validation is on; outside it they are padding.
    :param normalizer: maps real units to the model's (and the baselines'); None
        when the data are already in model units.
    :param baselines: name → a fitted predictor with ``predict(context_obs,
        actions, horizon)`` returning a Normal over ``(B, H, X)`` in model
        units, e.g. :class:`~pyro_worldmodel.model.baselines.LinearLeastSquares`.
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
    lengths = mask.sum(1)
    episode, start = _window_starts(lengths, context, max_windows, seed)
    if len(episode) == 0:
        raise ValueError(
            f"mask: expected an episode longer than context={context}, got lengths up to {int(lengths.max())}"
        )
    W = context + horizon
    t = start[:, None] + torch.arange(W)  # (n, W)
    inside = t < lengths[episode][:, None]
    t = t.clamp(max=obs.shape[1] - 1)
    w_obs, w_act = obs[episode[:, None], t], actions[episode[:, None], t]
    # Past an episode's end lies padding, NaN included: never let it reach a network.
    w_obs = torch.where(inside[..., None], w_obs, 0.0)
    w_act = torch.where(inside[..., None] if w_act.dim() == 3 else inside, w_act, 0)
    valid = inside[:, context:]  # (n, H)
    to_model = (lambda x: x) if normalizer is None else normalizer.obs
    # log-density in real units = in model units − log |d real / d model|
    log_jac = 0.0 if normalizer is None else float(normalizer.obs_scale.log().sum())
    predictors = {"model": None, **(baselines or {})}
    sq_err = {name: [] for name in predictors}
    log_lik = {name: [] for name in predictors}
    device = next(model.parameters()).device
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
            log_p = model.emission(im.emission_input).log_prob(target)  # (S, b, H)
        sq_err["model"].append((im.obs_mean.mean(0).cpu() - future_obs) ** 2)
        log_lik["model"].append((torch.logsumexp(log_p, 0) - math.log(num_samples)).cpu() - log_jac)
        for name, predictor in (baselines or {}).items():
            model_act = w_act[sl, : W - 1]
            if normalizer is not None and model_act.is_floating_point():
                model_act = normalizer.actions(model_act)
            pred = predictor.predict(to_model(ctx_obs), model_act, horizon)
            mean = pred.mean if normalizer is None else normalizer.obs_inverse(pred.mean)
            sq_err[name].append((mean - future_obs) ** 2)
            log_lik[name].append(pred.log_prob(to_model(future_obs)).sum(-1) - log_jac)
    count = valid.sum(0)  # (H,); a horizon no window reaches gets NaN

    def per_h(chunks, reduce_dims):
        x = torch.cat(chunks)
        x = x.mean(-1) if reduce_dims else x  # (n, H)
        return (torch.where(valid, x, 0.0).sum(0) / count).tolist()

    return OpenLoop(
        context=context,
        horizon=horizon,
        mse={name: per_h(v, True) for name, v in sq_err.items()},
        log_lik={name: per_h(v, False) for name, v in log_lik.items()},
        num_windows=len(episode),
        count=count.tolist(),
    )


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
