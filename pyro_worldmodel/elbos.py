"""ELBO estimators that say what they compute.

Pyro's ``TraceMeanField_ELBO`` uses the analytic KL(q ‖ p) of each latent site
when ``kl_divergence`` knows the pair, and otherwise, silently, the Monte
Carlo estimate log q(z) − log p(z) (PYRO_NOTES §3). Pairs without an analytic
KL arise by design here (a Student-t transition, a flow in the guide) and by
accident (a guide site masked differently from the model's). The class below
computes the same bound, but records which estimator each site got and
warns, once per pair of distributions, when it is Monte Carlo.
"""

from __future__ import annotations

import warnings

import pyro.infer
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled, torch_item
from torch.distributions import kl_divergence

ANALYTIC, MONTE_CARLO = "analytic", "monte_carlo"


class MonteCarloKLWarning(UserWarning):
    """A KL term of a mean-field ELBO is estimated by Monte Carlo: its pair has no analytic KL."""


def analytic_kl(q, p) -> torch.Tensor | None:
    """KL(q ‖ p) if ``torch.distributions.kl_divergence`` knows the pair, else None."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


def describe_pair(q, p) -> str:
    """``KL(Normal ‖ StudentT)``: the pair by its innermost distributions."""
    return f"KL({_innermost(q)} ‖ {_innermost(p)})"


def _innermost(d) -> str:
    while hasattr(d, "base_dist") and type(d).__name__ in ("MaskedDistribution", "Independent"):
        d = d.base_dist
    return type(d).__name__


class TraceMeanField_ELBO(pyro.infer.TraceMeanField_ELBO):
    """Pyro's ``TraceMeanField_ELBO``, with no silent Monte Carlo fallback.

    The bound and its gradient are Pyro's: the analytic KL wherever the pair of
    distributions has one, log q(z) − log p(z) at the guide's sample where it
    has none. What differs is that the fallback is never silent:

    :param monte_carlo_kl: what to do at a site with no analytic KL:
        ``"warn"`` (default) issues a :class:`MonteCarloKLWarning` naming the
        pair and the sites, once per pair per ELBO object; ``"error"`` raises
        ``ValueError``; ``"allow"`` uses Monte Carlo quietly at every such
        site. A list of pairs, e.g. ``["KL(Normal ‖ StudentT)"]``, allows
        exactly those (as :func:`describe_pair` writes them) and warns for any other.
    :ivar kl_estimators: site name → ``"analytic"`` or ``"monte_carlo"``, as
        used by the last particle of the last step.

    The other arguments are Pyro's ``ELBO``'s.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        retain_graph: bool | None = None,
        *,
        monte_carlo_kl: str | list[str] = "warn",
    ):
        _check_monte_carlo_kl(monte_carlo_kl)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            retain_graph=retain_graph,
        )
        self.monte_carlo_kl = (
            list(monte_carlo_kl) if isinstance(monte_carlo_kl, (list, tuple)) else monte_carlo_kl
        )
        self.kl_estimators: dict[str, str] = {}
        self._warned: set[str] = set()  # once per pair per ELBO object
        self._warnings_registry: dict = {}  # so that Python's "default" filter does not hide the next ELBO's

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo_particle = 0.0
        fallbacks: dict[str, list[str]] = {}
        self.kl_estimators = {}
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo_particle = elbo_particle + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            kl_qp = analytic_kl(guide_site["fn"], model_site["fn"])
            if kl_qp is not None:  # as Pyro's TraceMeanField_ELBO
                kl_qp = scale_and_mask(kl_qp, scale=guide_site["scale"], mask=guide_site["mask"])
                if torch.is_tensor(kl_qp):
                    assert torch._C._get_tracing_state() or kl_qp.shape == guide_site["fn"].batch_shape
                    kl_qp_sum = kl_qp.sum()
                else:  # a number, e.g. 0.0 for a site masked out entirely
                    kl_qp_sum = kl_qp * torch.Size(guide_site["fn"].batch_shape).numel()
                elbo_particle = elbo_particle - kl_qp_sum
                self.kl_estimators[name] = ANALYTIC
            else:
                entropy_term = guide_site["score_parts"].entropy_term
                elbo_particle = elbo_particle + model_site["log_prob_sum"] - entropy_term.sum()
                self.kl_estimators[name] = MONTE_CARLO
                fallbacks.setdefault(describe_pair(guide_site["fn"], model_site["fn"]), []).append(name)
        for name, guide_site in guide_trace.nodes.items():  # auxiliary guide sites, as Pyro does
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                assert guide_site["infer"].get("is_auxiliary")
                if is_validation_enabled():
                    check_fully_reparametrized(guide_site)
                elbo_particle = elbo_particle - guide_site["score_parts"].entropy_term.sum()
        for pair, sites in fallbacks.items():
            self._report(pair, sites)
        loss = -(elbo_particle.detach() if torch._C._get_tracing_state() else torch_item(elbo_particle))
        return loss, -elbo_particle

    def _report(self, pair, sites):
        policy = self.monte_carlo_kl
        if policy == "allow" or (isinstance(policy, list) and pair in policy):
            return
        where = sites[0] if len(sites) == 1 else f"{len(sites)} sites ({sites[0]} … {sites[-1]})"
        if policy == "error":
            raise ValueError(
                f"TraceMeanField_ELBO(monte_carlo_kl='error'): no analytic {pair} at {where};"
                " pass monte_carlo_kl='warn' or 'allow' to estimate it by Monte Carlo, or use Trace_ELBO"
            )
        if pair in self._warned:
            return
        self._warned.add(pair)
        frame = _user_frame()
        warnings.warn_explicit(
            f"TraceMeanField_ELBO: no analytic {pair} at {where}; estimating it by Monte Carlo,"
            f" log q(z) − log p(z) at the guide's sample. Pass monte_carlo_kl=['{pair}'] if that is"
            " intended, or use Trace_ELBO.",
            MonteCarloKLWarning,
            frame.f_code.co_filename,
            frame.f_lineno,
            module=frame.f_globals.get("__name__"),
            registry=self._warnings_registry,
        )


def _check_monte_carlo_kl(value):
    if isinstance(value, (list, tuple)):
        for pair in value:
            if not (
                isinstance(pair, str) and pair.startswith("KL(") and " ‖ " in pair and pair.endswith(")")
            ):
                raise ValueError(
                    f"monte_carlo_kl: expected pairs written as 'KL(Normal ‖ StudentT)', got {pair!r}"
                )
    elif value not in ("warn", "error", "allow"):
        raise ValueError(
            f"monte_carlo_kl: expected 'warn', 'error', 'allow' or a list of pairs, got {value!r}"
        )


def _user_frame():
    """The innermost frame outside Pyro, torch and this package: where the user's call is."""
    import sys

    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] in (
        "pyro",
        "torch",
        "pyro_worldmodel",
        "contextlib",
    ):
        frame = frame.f_back
    return frame
