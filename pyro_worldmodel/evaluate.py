"""Evaluating a trained world model: ELBO terms and importance-weighted bounds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .elbos import analytic_kl
from .imagine import imagine
from .spaces import _INT_DTYPES, check_inputs

# Our programs nest two plates (episodes at -2, time at -1); particles go left of both.
_PARTICLE_DIM = -3


@dataclass
class ELBOTerms:
    """The ELBO's terms in nats per observed timestep, as the DMM reports them.

    ``kl_per_t`` is the KL at each time index, averaged over the episodes
    observed there. ``monte_carlo_kl`` names the latent sites whose pair of
    distributions has no analytic KL, where the KL is the Monte Carlo estimate
    log q(z) − log p(z) at the guide's sample; it is empty when every KL is exact.
    """

    log_px: float
    log_pa: float
    kl: float
    kl_per_t: torch.Tensor
    num_timesteps: int
    monte_carlo_kl: tuple[str, ...] = ()

    @property
    def elbo(self) -> float:
        """log p(x|z) + log π(a|z) − KL, per observed timestep."""
        return self.log_px + self.log_pa - self.kl

    def as_dict(self) -> dict[str, float]:
        """The four figures, and ``kl_monte_carlo_sites``: how many latent sites' KL is a Monte Carlo estimate."""
        return {
            "elbo": self.elbo,
            "log_px": self.log_px,
            "log_pa": self.log_pa,
            "kl": self.kl,
            "kl_monte_carlo_sites": len(self.monte_carlo_kl),
        }


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


def elbo_terms(model, guide, obs, actions, mask=None, *, num_particles: int = 1) -> ELBOTerms:
    """Σ log p(x|z), Σ log π(a|z) and the KL, per observed timestep.

    Uses the analytic KL wherever the pair of distributions has one, and
    log q(z) − log p(z) at the guide's sample where it has none (a Student-t
    transition, a flow in the guide); those sites are listed in
    ``ELBOTerms.monte_carlo_kl``.

    :param model: a :class:`~pyro_worldmodel.model.WorldModel`.
    :param guide: a guide over the same ``z_{t}`` sites.
    :param num_particles: number of guide samples to average.
    """
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles: expected a positive int, got {num_particles!r}")
    obs, actions, mask = model.check_inputs(obs, actions, mask)
    _check_observed(mask)
    B, T = mask.shape
    n = mask.sum()
    log_lik = {"x": 0.0, "a": 0.0}
    monte_carlo = {}  # an ordered set of site names
    kl_t = torch.zeros(T, dtype=obs.dtype, device=obs.device)
    with torch.no_grad():
        for _ in range(num_particles):
            guide_tr, model_tr = _traces(model, guide, obs, actions, mask)
            for name, site in model_tr.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                if site["is_observed"]:
                    log_lik[name] = log_lik.get(name, 0.0) + site["fn"].log_prob(site["value"]).sum()
                else:
                    t = int(name.split("_")[1])
                    q, p = guide_tr.nodes[name]["fn"], site["fn"]
                    kl = analytic_kl(q, p)
                    if kl is None:
                        value = site["value"]
                        kl = q.log_prob(value) - p.log_prob(value)
                        monte_carlo.setdefault(name, None)
                    kl_t[t] += kl.sum()
    per_step = num_particles * n
    return ELBOTerms(
        log_px=float(log_lik["x"] / per_step),
        log_pa=float(log_lik["a"] / per_step),
        kl=float(kl_t.sum() / per_step),
        kl_per_t=(kl_t / (num_particles * mask.sum(0).clamp(min=1))).cpu(),
        num_timesteps=int(n),
        monte_carlo_kl=tuple(monte_carlo),
    )


def _traces(model, guide, *args):
    """A guide trace, and the model's trace with its latents replayed from it."""
    guide_tr = poutine.trace(guide).get_trace(*args)
    return guide_tr, poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)


def log_weights(model, guide, obs, actions, mask=None, *, num_particles: int) -> torch.Tensor:
    """log p(x, a, z) − log q(z | x, a) per episode for ``num_particles`` draws z ~ q.

    :returns: ``(K, B)``.
    """
    with torch.no_grad(), pyro.plate("particles", num_particles, dim=_PARTICLE_DIM):
        guide_tr, model_tr = _traces(model, guide, obs, actions, mask)
    return _site_sum(model_tr) - _site_sum(guide_tr)


def _site_sum(trace) -> torch.Tensor:
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            log_p = site["fn"].log_prob(site["value"])  # (K, B, 1) or (K, B, T)
            total = total + log_p.sum(-1)
    return total  # (K, B)


def iwae_log_likelihood(
    model,
    guide,
    obs,
    actions,
    mask=None,
    *,
    num_particles: int = 1000,
    chunk_size: int = 250,
) -> torch.Tensor:
    """The importance-weighted (IWAE) estimate of log p(x_{1:T}, a_{1:T}) per episode.

    log (1/K) Σ_k p(x, a, z_k) / q(z_k | x, a), z_k ~ q. It is a lower bound
    in expectation that tightens as K grows; at K = 1 it is the ELBO.

    :param num_particles: K.
    :param chunk_size: particles drawn at once, to bound memory.
    :returns: ``(B,)`` nats per episode; divide by ``mask.sum(1)`` for per timestep.
    """
    for arg, value in (("num_particles", num_particles), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    obs, actions, mask = model.check_inputs(obs, actions, mask)
    _check_observed(mask)
    chunks = []
    with torch.no_grad():  # an estimate, not a loss: no graph kept for K particles
        for start in range(0, num_particles, chunk_size):
            k = min(chunk_size, num_particles - start)
            chunks.append(log_weights(model, guide, obs, actions, mask, num_particles=k))
    log_w = torch.cat(chunks)  # (K, B)
    return torch.logsumexp(log_w, dim=0) - math.log(num_particles)


def heldout_bounds(
    model, guide, obs, actions, mask=None, *, num_particles: int = 8, iwae_particles: int = 100
) -> dict[str, float]:
    """Held-out ELBO and its terms, and the IWAE estimate, all in nats per observed timestep.

    :param num_particles: guide draws averaged in the ELBO terms.
    :param iwae_particles: K of the IWAE-K estimate.
    :returns: ``elbo``, ``log_px``, ``log_pa``, ``kl``, ``kl_monte_carlo_sites`` (0 when
        every KL is exact) and ``iwae``.
    """
    obs, actions, mask = model.check_inputs(obs, actions, mask)
    _check_observed(mask)
    terms = elbo_terms(model, guide, obs, actions, mask, num_particles=num_particles)
    iwae = iwae_log_likelihood(model, guide, obs, actions, mask, num_particles=iwae_particles)
    return {**terms.as_dict(), "iwae": float(iwae.sum() / mask.sum())}


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
    predicts by :func:`~pyro_worldmodel.imagine.imagine`: the mean is the
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
        units, e.g. :class:`~pyro_worldmodel.baselines.LinearLeastSquares`.
    """
    for arg, value, low in (
        ("context", context, 1),
        ("horizon", horizon, 1),
        ("num_samples", num_samples, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{arg}: expected an int >= {low}, got {value!r}")
    obs, actions, mask = _check_real_units(model, obs, actions, mask)
    _check_observed(mask)
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


def _check_observed(mask) -> None:
    """Refuse a mask with no observed step, where every figure per step would be 0 / 0."""
    if not bool(mask.any()):
        raise ValueError("mask: expected at least one observed step, got none")


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
    if model.action_space.kind == "box" and actions.dtype in _INT_DTYPES:
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
