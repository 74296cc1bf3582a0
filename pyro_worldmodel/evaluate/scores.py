"""Probabilistic scores of a predictive distribution given by samples.

Every score takes draws along the leftmost dimension and a truth of the
remaining shape. What each estimates, and how it errs:

* :func:`mixture_log_density`: log (1/S) Σ_s p(x | z_s), where p(x | z_s) is
  the emission of the s-th imagined latent. It estimates the log of the
  predictive density log p(x) = log E_z[p(x | z)]. The average inside the log
  is unbiased, so by Jensen's inequality the estimate is biased low:
  E[estimate] ≤ log p(x), with a bias of about −Var[p(x|z)] / (2 S p(x)²)
  that vanishes as S grows. When the truth lies outside every sampled
  component the bias is large: the estimate is then ruled by the one
  nearest component and can be thousands of nats below log p(x).
* :func:`moment_matched`: the Gaussian with the predictive's mean and
  covariance, from the law of total variance: Cov[x] = E_s[Cov[x | z_s]] +
  Cov_s[E[x | z_s]]. Its log density is a proper score of that Gaussian, the
  one a linear-Gaussian model's predictive equals exactly; with S samples its
  covariance is the sample covariance (divisor S − 1), which makes the log
  density biased by O(1/S) and its variance over draws O(1/S).
* :func:`crps`: Pyro's :func:`~pyro.ops.stats.crps_empirical`, per dimension:
  E|X − x| − ½ E|X − X'| over the S draws. Its second term averages over all
  S² pairs, the zero diagonal included, so it overstates the CRPS by
  E|X − X'| / (2 S), half a percent of the spread at S = 100.
* :func:`interval_coverage`: whether the truth lies in the central interval
  between the empirical (1 − level)/2 and (1 + level)/2 quantiles of the
  draws, per dimension.
"""

from __future__ import annotations

import math

import torch
from pyro.ops.stats import crps_empirical
from torch.distributions import MultivariateNormal, Normal

LEVELS = (0.5, 0.9)


def mixture_log_density(component_log_prob: torch.Tensor) -> torch.Tensor:
    """log (1/S) Σ_s exp(``component_log_prob[s]``): the equal-weight mixture's log density.

    :param component_log_prob: ``(S, ...)`` log p(x | z_s) of each draw.
    """
    S = component_log_prob.shape[0]
    return torch.logsumexp(component_log_prob, 0) - math.log(S)


def moment_matched(mean: torch.Tensor, variance: torch.Tensor, *, full: bool = True):
    """The Gaussian with the mixture's mean and covariance.

    :param mean: ``(S, ..., X)`` each component's mean E[x | z_s].
    :param variance: ``(S, ..., X)`` each component's variances (diagonal covariance).
    :param full: a full ``X × X`` covariance (the sample covariance of the means plus
        the mean diagonal); False for the diagonal only.
    :returns: a ``MultivariateNormal`` with event shape ``(X,)``, or with ``full=False``
        a ``Normal`` of batch shape ``(..., X)``.
    """
    loc = mean.mean(0)
    if not full:
        return Normal(loc, predictive_variance(mean, variance).sqrt())
    centred = mean - loc
    between = torch.einsum("s...i,s...j->...ij", centred, centred) / max(mean.shape[0] - 1, 1)  # (..., X, X)
    return MultivariateNormal(loc, covariance_matrix=between + torch.diag_embed(variance.mean(0)))


def predictive_variance(mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """The mixture's variance per dimension, E_s[Var[x | z_s]] + Var_s[E[x | z_s]] (divisor
    S − 1): the diagonal of :func:`moment_matched`'s covariance, without building a distribution.

    :param mean: ``(S, ..., X)``; :param variance: ``(S, ..., X)``. :returns: ``(..., X)``.
    """
    spread = ((mean - mean.mean(0)) ** 2).sum(0) / max(mean.shape[0] - 1, 1)
    return variance.mean(0) + spread


def crps(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """CRPS of each element of ``truth`` under ``samples`` ``(S, *truth.shape)``;
    lower is better, in the truth's units."""
    return crps_empirical(samples, truth)


def interval_coverage(samples: torch.Tensor, truth: torch.Tensor, level: float) -> torch.Tensor:
    """Whether each element of ``truth`` lies in the central ``level`` interval of ``samples``.

    :param samples: ``(S, *truth.shape)``.
    :param level: in (0, 1), e.g. 0.9 for the interval between the 5% and 95% quantiles.
    :returns: a bool tensor of ``truth``'s shape.
    """
    lo, hi = central_interval(samples, level)
    return (truth >= lo) & (truth <= hi)


def central_interval(samples: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The empirical (1 − level)/2 and (1 + level)/2 quantiles of ``samples`` ``(S, ...)``
    along the first dimension: two tensors of shape ``(...)``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a probability in (0, 1), got {level!r}")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype, device=samples.device)
    lo, hi = torch.quantile(samples, q, dim=0)
    return lo, hi


def summarise(
    values: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor | None = None
) -> dict[str, list[float]]:
    """Per column of ``values`` ``(n, H)``, over the rows where ``valid`` ``(n, H)``:
    the mean, its standard error, the median and the 10th percentile.
    A column with no valid row is NaN.

    :param groups: ``(n,)`` a group per row, e.g. the episode of each open-loop window.
        Windows of one episode overlap and their scores are correlated, so the standard
        error is then the cluster-robust one, sqrt(G / (G − 1) · Σ_g (Σ_{i∈g} (v_i − v̄))²) / n
        over the G groups; it equals the plain one when every row is its own group.
    """
    out = {"mean": [], "se": [], "median": [], "p10": []}
    for h in range(values.shape[1]):
        keep = valid[:, h]
        v = values[keep, h].double()
        n = v.numel()
        if n == 0:
            for key in out:
                out[key].append(float("nan"))
            continue
        mean = v.mean()
        out["mean"].append(float(mean))
        if groups is None:
            se = v.std() / math.sqrt(n) if n > 1 else float("nan")
        else:
            g = groups[keep]
            _, index = torch.unique(g, return_inverse=True)
            G = int(index.max()) + 1
            sums = torch.zeros(G, dtype=v.dtype).index_add_(0, index, v - mean)
            se = (G / (G - 1) * (sums**2).sum()).sqrt() / n if G > 1 else float("nan")
        out["se"].append(float(se))
        out["median"].append(float(v.quantile(0.5)))
        out["p10"].append(float(v.quantile(0.1)))
    return out
