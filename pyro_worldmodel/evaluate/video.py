"""Open-loop video prediction: a model of frames imagines the frames after a context.

Each window of ``context`` observed frames is followed by ``horizon`` frames
the model imagines from the true actions (:func:`~pyro_worldmodel.evaluate.imagine`);
its prediction is the average of the decoded means of ``num_samples`` futures.
Two baselines predict the same frames: the last context frame (``copy_last``)
and the mean training frame (``mean_frame``). Scores are per horizon, over
the windows whose episode reaches it, with pixel values scaled to [0, 1]:

* MSE, the mean squared error per pixel;
* PSNR, 10 log10(1 / MSE) of each predicted frame, averaged over windows
  (an exact prediction scores :data:`MAX_PSNR`).

A state probe asks how much of the environment's state the latents hold:
:class:`StateProbe`, a ridge regression from the latent features (what the
emission reads: z_t, or [h_t, z_t]) to the low-dimensional state, fitted on
training episodes; its R² on held-out ones, for filtered latents and, per
horizon, for imagined ones (the probe applied to each future, averaged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .imagination import imagine
from .open_loop import cut_windows


@dataclass
class StateProbe:
    """A linear map from latent features to the state, s ≈ W [f, 1], fitted by ridge
    regression (:meth:`fit`).

    :ivar weight: ``(F + 1, S)`` float64.
    """

    weight: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor, state: torch.Tensor, ridge: float = 1e-3) -> StateProbe:
        """Least squares with a penalty of ``ridge`` × n × the mean feature variance on the
        weights (not on the bias). :param features: ``(n, F)``; :param state: ``(n, S)``."""
        if features.dim() != 2 or state.dim() != 2 or len(features) != len(state) or len(features) < 2:
            raise ValueError(
                f"features, state: expected (n, F) and (n, S) with n >= 2 rows each, got"
                f" {tuple(features.shape)} and {tuple(state.shape)}"
            )
        x = _with_bias(features.double())
        penalty = ridge * len(x) * float(features.double().var(0).mean().clamp(min=1e-12))
        eye = torch.eye(x.shape[1], dtype=torch.float64)
        eye[-1, -1] = 0.0
        return cls(torch.linalg.solve(x.T @ x + penalty * eye, x.T @ state.double()))

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., F)`` → ``(..., S)``."""
        return _with_bias(features.double().cpu()) @ self.weight


def r_squared(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    """1 − Σ (s − ŝ)² / Σ (s − s̄)² over the rows, per state dimension, averaged over the
    dimensions. :param prediction: ``(n, S)``; :param truth: ``(n, S)``."""
    truth = truth.double()
    sse = ((prediction.double() - truth) ** 2).sum(0)
    sst = ((truth - truth.mean(0)) ** 2).sum(0).clamp(min=1e-300)
    return float((1 - sse / sst).mean())


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


#: The PSNR of a frame predicted exactly (its MSE is floored at 10^(−MAX_PSNR/10)).
MAX_PSNR = 100.0
PREDICTORS = ("model", "copy_last", "mean_frame")


@dataclass
class VideoPrediction:
    """Scores of open-loop video prediction, per predictor and horizon h = 1 … H.

    :ivar mse: predictor → ``[H]`` mean squared error per pixel, values in [0, 1].
    :ivar psnr: predictor → ``[H]`` mean PSNR in dB.
    :ivar count: ``[H]`` windows scored at each horizon.
    :ivar windows: ``[[episode, start], ...]`` of the windows, in order.
    :ivar state_r2: ``[H]`` the state probe's R² on the imagined latents at each horizon, or
        None without a probe.
    :ivar truth: ``(H, C, H', W')`` uint8, the frames of one window (the first that reaches
        the whole horizon), and ``imagined`` the model's prediction of them, for the figures.
    """

    context: int
    horizon: int
    num_samples: int
    num_windows: int
    count: list
    mse: dict
    psnr: dict
    windows: list
    state_r2: list | None = None
    truth: torch.Tensor | None = None
    imagined: torch.Tensor | None = None

    def as_dict(self) -> dict:
        """Everything but the frames, for ``metrics.json``."""
        return {k: v for k, v in self.__dict__.items() if k not in ("truth", "imagined")}

    def table(self, horizons=(1, 5, 15, 45)) -> str:
        """A markdown table at the given horizons (those within H)."""
        rows = ["| h | predictor | MSE | PSNR (dB) |", "|---:|---|---:|---:|"]
        for h in horizons:
            if h > self.horizon:
                continue
            for name in PREDICTORS:
                rows.append(f"| {h} | {name} | {self.mse[name][h - 1]:.4g} | {self.psnr[name][h - 1]:.3g} |")
        return "\n".join(rows)


def video_open_loop(
    model,
    guide,
    obs,
    actions,
    mask,
    *,
    image_shape,
    mean_frame,
    context: int = 5,
    horizon: int = 15,
    num_samples: int = 10,
    max_windows: int | None = 200,
    seed: int = 0,
    max_bytes: int = 2**28,
    state=None,
    probe: StateProbe | None = None,
) -> VideoPrediction:
    """Predict ``horizon`` frames open loop after ``context`` observed ones, given the true actions.

    :param obs: ``(N, T, X)`` pixel values (uint8 or float), X = C·H·W of ``image_shape``.
    :param actions: ``(N, T, ...)`` in the model's units. :param mask: ``(N, T)`` bool.
    :param mean_frame: ``(X,)`` the mean training frame, in pixel values.
    :param max_windows: at most this many windows, drawn at random with ``seed``; the
        futures are drawn from the random state as the caller left it.
    :param max_bytes: the futures are imagined a few windows at a time, so that their
        frames take at most about this much memory.
    :param state: ``(N, T, S)`` the episodes' state, and ``probe`` a :class:`StateProbe`:
        also score the probe on the imagined latents, per horizon (``state_r2``).
    """
    for arg, value in (("context", context), ("horizon", horizon), ("num_samples", num_samples)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg}: expected an int >= 1, got {value!r}")
    episode, start, t, w_obs, w_act, valid = cut_windows(
        obs, actions, mask, context, horizon, max_windows, seed
    )
    X = w_obs.shape[-1]
    probed = probe is not None and state is not None
    if probed:
        w_state = state[episode[:, None], t[:, context:]]  # (n, H, S)
        state_pred = []
    # imagine holds the sampled frames and their means: 2 S b H X floats per chunk of b windows
    chunk = max(1, int(max_bytes // (2 * num_samples * horizon * X * 4)))
    sq = {name: [] for name in PREDICTORS}
    # the window drawn in the figures: the first that reaches the whole horizon
    shown = int(valid.all(1).double().argmax()) if valid.all(1).any() else 0
    truth0 = imagined0 = None
    mean_frame = torch.as_tensor(mean_frame, dtype=torch.float32)
    for lo in range(0, len(episode), chunk):
        sl = slice(lo, lo + chunk)
        im = imagine(
            model, guide, w_obs[sl, :context], w_act[sl, :context], horizon,
            future_actions=w_act[sl, context:], num_samples=num_samples,
        )  # fmt: skip
        truth = w_obs[sl, context:].float()  # (b, H, X)
        preds = {
            "model": im.obs_mean.mean(0).cpu().clamp(0, 255),
            "copy_last": w_obs[sl, context - 1 : context].float().expand_as(truth),
            "mean_frame": mean_frame.expand_as(truth),
        }
        for name, pred in preds.items():
            sq[name].append((((pred - truth) / 255.0) ** 2).mean(-1))  # (b, H)
        if probed:  # the probe on each future's features, averaged over the futures
            state_pred.append(probe.predict(im.emission_input).mean(0))  # (b, H, S)
        if lo <= shown < lo + chunk:
            shape = (horizon, *image_shape)
            truth0 = w_obs[shown, context:].reshape(shape).to(torch.uint8)
            imagined0 = preds["model"][shown - lo].round().to(torch.uint8).reshape(shape)
    count = valid.sum(0)  # (H,)
    mse, psnr = {}, {}
    floor = 10 ** (-MAX_PSNR / 10)
    for name in PREDICTORS:
        err = torch.cat(sq[name]).double()  # (n, H)
        mse[name] = (torch.where(valid, err, 0.0).sum(0) / count).tolist()
        frame_psnr = -10 * torch.log10(err.clamp(min=floor))
        psnr[name] = (torch.where(valid, frame_psnr, 0.0).sum(0) / count).tolist()
    for name in PREDICTORS:  # a horizon no window reaches: NaN, as open_loop gives
        mse[name] = [v if c else math.nan for v, c in zip(mse[name], count.tolist())]
        psnr[name] = [v if c else math.nan for v, c in zip(psnr[name], count.tolist())]
    state_r2 = None
    if probed:
        predicted = torch.cat(state_pred)
        state_r2 = [
            r_squared(predicted[valid[:, h], h], w_state[valid[:, h], h]) if int(count[h]) > 1 else math.nan
            for h in range(horizon)
        ]
    return VideoPrediction(
        context=context,
        horizon=horizon,
        num_samples=num_samples,
        num_windows=len(episode),
        count=count.tolist(),
        mse=mse,
        psnr=psnr,
        windows=torch.stack([episode, start], 1).tolist(),
        state_r2=state_r2,
        truth=truth0,
        imagined=imagined0,
    )
