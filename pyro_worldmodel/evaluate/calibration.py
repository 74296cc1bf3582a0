"""Recalibrating the spread of imagined futures on held-out windows.

A world model trained by the ELBO on nearly deterministic dynamics can be
sure of its futures to the wrong degree. The emission's noise and the
width of q(z_t | ·) trade off almost freely in the bound (for a latent read
off the observation, widening one and narrowing the other leaves it nearly
unchanged), so where training leaves them says little about the error of
an imagined future. At short horizons the predictive is then typically
several times too wide; at long ones it can be too narrow.

:class:`SpreadCalibration` corrects this after training, as regression
forecasts are recalibrated (Kuleshov et al., 2018; for model-based RL,
Malik et al., 2019): each imagined future is moved towards or away from the
predictive mean m by a factor c per horizon h and observation dimension d,

    x̃ = m + c_{h,d} (x − m),

chosen on held-out windows so that the central 50% and 90% intervals of
the moved draws cover what they claim: the c on a log grid that minimises
(coverage₅₀ − 0.5)² + (coverage₉₀ − 0.9)². The predictive mean, and so the
MSE, is unchanged. For a location-scale emission the moved predictive is the
mixture of the components N(m + c (μ_s − m), c² σ_s²), whose density is the
original one at m + (x − m) / c divided by Π_d c_d.

Fitted on the very windows it is scored on, it would flatter itself:
:func:`~pyro_worldmodel.evaluate.open_loop` with ``calibrate=True`` scores
each window with factors fitted on the windows of other episodes (two folds
by episode), and returns the factors fitted on all of them for later use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .scores import LEVELS, central_interval

# Candidate factors: 0.01 … 100, 20 per decade (each 12% from the next).
GRID = torch.logspace(-2.0, 2.0, 81, dtype=torch.float64)


def moved(x: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """m + c (x − m): ``x`` moved about ``mean`` by ``factor``, all broadcast together."""
    return mean + factor * (x - mean)


@dataclass
class SpreadCalibration:
    """Factors c ``(H, X)`` that move each imagined future about the predictive mean.

    :ivar factor: ``(H, X)``, c for horizon h = 1 … H and observation dimension d;
        below 1 narrows the predictive, above 1 widens it.
    :ivar num_windows: ``[H]`` windows each horizon's factors were fitted on (0: left at 1).
    """

    factor: torch.Tensor
    num_windows: list[int]

    def apply(self, draws: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """m + c (x − m) for draws ``(S, ..., H, X)`` of any units that map to the model's by
        an affine map per dimension (real or model units); m is ``mean`` ``(..., H, X)``, by
        default the draws' own mean."""
        return moved(draws, draws.mean(0) if mean is None else mean, self.factor.to(draws))

    def to_dict(self) -> dict:
        return {"factor": self.factor.tolist(), "num_windows": list(self.num_windows)}

    @classmethod
    def from_dict(cls, data: dict) -> SpreadCalibration:
        return cls(torch.tensor(data["factor"], dtype=torch.float64), list(data["num_windows"]))


class CoverageOffsets:
    """What :func:`fit_spread` needs of each window, gathered chunk by chunk: where the
    truth and the draws' central intervals lie relative to the predictive mean."""

    def __init__(self):
        self.truth: list[torch.Tensor] = []
        self.bounds: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []

    def add(self, draws: torch.Tensor, mean: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> None:
        """:param draws: ``(S, b, H, X)``; :param mean: ``(b, H, X)`` the predictive mean;
        :param truth: ``(b, H, X)``; :param valid: ``(b, H)`` whether each horizon counts."""
        draws, mean = draws.double(), mean.double()
        bounds = [bound - mean for lv in LEVELS for bound in central_interval(draws, lv)]
        self.bounds.append(torch.stack(bounds))  # (2L, b, H, X): lo, hi of each level
        self.truth.append(truth.double() - mean)
        self.valid.append(valid)

    def select(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """The windows where ``keep`` ``(n,)``, in the order added."""
        return {
            "truth": torch.cat(self.truth)[keep],
            "bounds": torch.cat(self.bounds, 1)[:, keep],
            "valid": torch.cat(self.valid)[keep],
        }


def fit_spread(offsets: dict[str, torch.Tensor], *, per_dimension: bool = True) -> SpreadCalibration:
    """The factor per horizon and dimension whose moved draws' central 50% and 90% intervals
    come closest to covering 50% and 90% of the truths, from :meth:`CoverageOffsets.select`.

    Ties (a flat stretch of the grid) go to the factor nearest 1. A horizon that no window
    reaches keeps factor 1.

    :param per_dimension: one factor per horizon and dimension; False for one per horizon,
        from the coverage over all dimensions. Factors that differ between strongly
        correlated dimensions tilt a narrow predictive (e.g. cos θ and sin θ of an angle,
        whose joint predictive lies along the circle) off the truth, and its joint
        log-likelihood then collapses on those windows; one factor keeps the shape.
    """
    truth, bounds, valid = offsets["truth"], offsets["bounds"], offsets["valid"]  # (n, H, X), (2L, n, H, X)
    n, H, X = truth.shape
    count = valid.sum(0)  # (H,)
    weight = valid.double()[..., None] / count.clamp(min=1)[:, None]  # (n, H, 1)
    loss = torch.zeros(len(GRID), H, X, dtype=torch.float64)
    for i, level in enumerate(LEVELS):
        lo, hi = bounds[2 * i], bounds[2 * i + 1]
        for g, c in enumerate(GRID):
            inside = ((truth >= c * lo) & (truth <= c * hi)).double()
            covered = (inside * weight).sum(0)  # (H, X)
            if not per_dimension:  # one factor per horizon, from the coverage over dimensions
                covered = covered.mean(-1, keepdim=True).expand(H, X)
            loss[g] += (covered - level) ** 2
    # the smallest loss, and among equals (within 1e-12) the factor nearest 1
    best = loss.min(0).values
    distance = GRID.log().abs()[:, None, None].expand_as(loss)
    candidates = torch.where(loss <= best + 1e-12, distance, math.inf)
    factor = GRID[candidates.argmin(0)]
    factor = torch.where(count[:, None] > 0, factor, 1.0)
    return SpreadCalibration(factor, count.tolist())
