"""ELBO estimators that say what they compute.

Pyro's ``TraceMeanField_ELBO`` uses the analytic KL(q ‖ p) of each latent site
when ``kl_divergence`` knows the pair, and otherwise, silently, the Monte
Carlo estimate log q(z) − log p(z) (docs/pyro_pitfalls.md, "The silent Monte Carlo fallback"). Pairs without an analytic
KL arise by design here (a Student-t transition, a flow in the guide) and by
accident (a guide site masked differently from the model's).
:class:`TraceMeanField_ELBO` computes the same bound, but records which
estimator each site got and warns, once per pair of distributions, when it is
Monte Carlo.

Every latent site's KL term passes through one hook,
:meth:`TraceMeanField_ELBO.shape_kl`, which the world-model objectives
override; each says whether it is still a bound on log p(x, a):

- :class:`KLAnnealing_ELBO`: β·KL, β warmed up over SVI steps;
- :class:`FreeNats_ELBO`: max(KL_t, c) per observed step;
- :class:`KLBalancing_ELBO`: DreamerV2's α·KL(sg(q) ‖ p) + (1 − α)·KL(q ‖ sg(p));
- :class:`LatentOvershooting_ELBO`: PlaNet's KL against the d-step priors, d = 1 … D.

:class:`JitTraceMeanField_ELBO` is the same bound compiled once per input shape.
"""

from __future__ import annotations

import numbers
import warnings
import weakref

import pyro.distributions as dist
import pyro.infer
import pyro.ops.jit
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled, torch_item
from pyro.util import warn_if_nan
from torch.distributions import Normal, kl_divergence

from ..model.components.categorical import GroupedOneHot
from ..model.world_model import WorldModel
from ..spaces import check_real
from . import batched

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

    Subclasses change the objective by overriding :meth:`shape_kl`, through
    which each latent site's KL term passes.

    :param batched: for a :class:`~pyro_worldmodel.model.WorldModel` whose init and
        transition give diagonal Normals, with a filter, smoothing or mean-field guide,
        compute the same loss without Pyro's traces: the guide step by step and every
        model term batched over time, through the same factor methods the Pyro programs
        call (:mod:`pyro_worldmodel.infer.batched`): the same value, gradient and random
        draws, several times faster. Anything it cannot compute exactly (an overridden
        Pyro program, a flow in the guide, a Student-t transition, a horizon, vectorised
        particles, a Pyro handler around the call, an ELBO subclass whose ``shape_kl``
        is not element-wise) takes Pyro's traces; so does everything with ``batched=False``.
    :ivar path: ``"batched"``, or why the last call took Pyro's traces.

    :param compile: on the batched path, run the guide's steps (the recurrence over time,
        :func:`pyro_worldmodel.infer.batched.recurrence`) through ``torch.compile``: True for
        its default backend (inductor), or a backend's name (e.g. ``"aot_eager"``). The loop
        over time is unrolled 25 steps at a time into one graph, compiled once per guide and
        chunk shape, whatever T (:class:`~pyro_worldmodel.infer.batched.CompiledRecurrence`);
        the loss and gradient are eager's to float tolerance, with the same random draws.
        A :class:`CompileFallbackWarning` says when nothing is compiled: if compiling fails
        (the steps then run eagerly from then on), or, once, if a call takes Pyro's traces.
        Whether it pays depends on the device: on a GPU it removes launches; on a CPU it may
        not (``benchmarks/svi_step.py --compile``).
    :ivar compile_seconds: seconds spent compiling, over all shapes.
    :ivar compile_error: why compiling failed, or None.

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
        batched: bool = True,
        compile: bool | str = False,
    ):
        _check_pyro_args(num_particles, max_plate_nesting)
        _check_monte_carlo_kl(monte_carlo_kl)
        if not isinstance(batched, bool):
            raise ValueError(f"batched: expected True or False, got {batched!r}")
        _check_compile(compile)
        self.compile = compile
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            retain_graph=retain_graph,
        )
        self.batched = batched
        self.path = ""
        self._steps = None  # the compiled recurrence, made at the first batched call
        self._said_idle = False  # whether it warned that compile has nothing to compile
        self.monte_carlo_kl = (
            list(monte_carlo_kl) if isinstance(monte_carlo_kl, (list, tuple)) else monte_carlo_kl
        )
        self.kl_estimators: dict[str, str] = {}
        self._warned: set[str] = set()  # once per pair per ELBO object
        self._warnings_registry: dict = {}  # so that Python's "default" filter does not hide the next ELBO's

    # -- the batched path (pyro_worldmodel.infer.batched), where it computes exactly what the traces do

    def _batched(self, model, guide, args, kwargs) -> bool:
        if not self.batched:
            why = "batched=False"
        elif type(self).shape_kl not in _BATCHED_SHAPE_KL:
            why = f"{type(self).__name__} overrides shape_kl, which the batched path calls once for all sites"
        else:
            why = batched.supports(model, guide, args, kwargs, vectorize_particles=self.vectorize_particles)
        self.path = "batched" if why is None else f"pyro traces: {why}"
        if why is not None and self.compile_backend is not None and not self._said_idle:
            self._said_idle = True  # once per ELBO
            warnings.warn(
                f"{type(self).__name__}(compile={self.compile_backend!r}): compiling applies to the batched"
                f" path, and this call takes Pyro's traces ({why}): nothing is compiled",
                batched.CompileFallbackWarning,
                stacklevel=3,
            )
        return why is None

    def _batched_loss(self, model, guide, args, kwargs):
        args = (*args, kwargs["mask"]) if "mask" in kwargs else args
        targets = {k: kwargs[k] for k in ("rewards", "continues") if k in kwargs}
        loss = 0.0
        for _ in range(self.num_particles):
            loss = loss + batched.mean_field_loss(self, model, guide, *args, **targets) / self.num_particles
        return loss

    @property
    def compile_backend(self) -> str | None:
        """The ``torch.compile`` backend of ``compile`` (True: inductor), or None."""
        return "inductor" if self.compile is True else (self.compile or None)

    def recurrence(self):
        """What the batched path runs the guide's steps with: None (eagerly), or with
        ``compile`` a :class:`~pyro_worldmodel.infer.batched.CompiledRecurrence`."""
        if self.compile_backend is None:
            return None
        if self._steps is None:
            self._steps = batched.CompiledRecurrence(self.compile_backend, type(self).__name__)
        return self._steps

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling the guide's steps (their forward and backward), over all shapes."""
        return 0.0 if self._steps is None else self._steps.seconds

    @property
    def compile_error(self) -> str | None:
        """Why compiling the guide's steps failed (they run eagerly since), or None."""
        return None if self._steps is None else self._steps.error

    def loss(self, model, guide, *args, **kwargs):
        if self._batched(model, guide, args, kwargs):
            with torch.no_grad():
                loss = torch_item(self._batched_loss(model, guide, args, kwargs))
            warn_if_nan(loss, "loss")
            return loss
        return super().loss(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        if self._batched(model, guide, args, kwargs):
            loss = self._batched_loss(model, guide, args, kwargs)
            warn_if_nan(loss, "loss")
            return loss
        return super().differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        if self._batched(model, guide, args, kwargs):
            loss = self._batched_loss(model, guide, args, kwargs)
            if loss.requires_grad:  # not under no_grad, nor with every parameter frozen
                loss.backward(retain_graph=self.retain_graph)
            loss = torch_item(loss)  # the one host-device sync of a step
            warn_if_nan(loss, "loss")
            return loss
        return super().loss_and_grads(model, guide, *args, **kwargs)

    # -- Pyro's traces

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
            q, p = guide_site["fn"], model_site["fn"]
            kl_qp = analytic_kl(q, p)
            if kl_qp is not None:  # as Pyro's TraceMeanField_ELBO, but for the hook
                kl_qp = self.shape_kl(name, kl_qp, q, p, _site_mask(q, p, guide_site), ANALYTIC)
                kl_qp = scale_and_mask(kl_qp, scale=guide_site["scale"], mask=guide_site["mask"])
                if torch.is_tensor(kl_qp):
                    assert torch._C._get_tracing_state() or kl_qp.shape == guide_site["fn"].batch_shape
                    kl_qp_sum = kl_qp.sum()
                else:  # a number, e.g. 0.0 for a site masked out entirely
                    kl_qp_sum = kl_qp * torch.Size(guide_site["fn"].batch_shape).numel()
                self.kl_estimators[name] = ANALYTIC
            else:
                # log q(z) − log p(z) at the guide's sample, per element; both terms already
                # carry their site's scale and mask. The entropy term is log q with the
                # gradient through the reparameterised sample, as Pyro uses it.
                kl_qp = guide_site["score_parts"].entropy_term - model_site["log_prob"]
                kl_qp_sum = self.shape_kl(name, kl_qp, q, p, _site_mask(q, p, guide_site), MONTE_CARLO).sum()
                self.kl_estimators[name] = MONTE_CARLO
                fallbacks.setdefault(describe_pair(q, p), []).append(name)
            elbo_particle = elbo_particle - kl_qp_sum
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

    def shape_kl(self, name: str, kl, q, p, mask, estimator: str):
        """The KL term of latent site ``name`` as the objective uses it; here, unchanged.

        The one place where subclasses change the objective (annealing, free
        nats, balancing).

        :param kl: per element of the site's batch shape (summed over its event
            dims): KL(q ‖ p), or a number such as 0.0 for a site masked out
            entirely, when ``estimator`` is ``"analytic"``; the one-sample
            estimate log q(z) − log p(z) when it is ``"monte_carlo"``.
        :param q: the guide's distribution at the site; :param p: the model's.
        :param mask: the site's effective mask: the masks of ``q``, ``p`` and
            ``poutine.mask`` together, broadcastable to ``kl``; None if unmasked.
        :param estimator: ``"analytic"`` or ``"monte_carlo"``. An analytic KL
            is returned before the site's scale and ``poutine.mask`` are
            applied (as Pyro does, from the guide site); a Monte Carlo estimate
            already carries each side's scale and mask.
        :returns: a tensor (or number) of the same shape, whose sum is the
            site's KL term, subtracted from the objective.
        """
        return kl

    def combine_kl(self, kl, model, z, q, a_feat, mask):
        """The KL terms of all latent sites, ``(B, T)``, after :meth:`shape_kl`, as the batched
        path (:mod:`pyro_worldmodel.infer.batched`) sums them; here, unchanged. Objectives that add
        terms of their own across time steps (latent overshooting) override it.

        :param z: ``(B, T, Z)`` the guide's draws; :param q: its Normal, batch ``(B, T, Z)``.
        """
        return kl

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


def _check_compile(compile) -> None:
    """That ``compile`` is True, False or a ``torch.compile`` backend's name."""
    if isinstance(compile, bool):
        return
    if isinstance(compile, str):
        import torch._dynamo  # here, not at the top: about a second of every process's start

        if compile in torch._dynamo.list_backends(exclude_tags=()):
            return
        usual = sorted({*torch._dynamo.list_backends(), "aot_eager", "eager"})  # without the debug ones
        raise ValueError(
            f"compile: expected True, False or a torch.compile backend (e.g. {', '.join(usual)}), got {compile!r}"
        )
    raise ValueError(f"compile: expected True, False or a torch.compile backend's name, got {compile!r}")


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


def _site_mask(q, p, guide_site):
    """The effective mask of a latent site: those of q, p and ``poutine.mask`` together; None if none."""
    mask = None
    for m in (*_masks(q), *_masks(p), guide_site["mask"]):
        if m is None or m is True or m is mask:
            continue
        if m is False or mask is False:
            mask = False
        else:
            mask = m if mask is None else mask & m
    return mask


def _masks(d):
    """The ``_mask`` of every MaskedDistribution in ``d``'s chain of wrappers."""
    while isinstance(d, (dist.MaskedDistribution, torch.distributions.Independent)):
        if isinstance(d, dist.MaskedDistribution):
            yield d._mask
        d = d.base_dist


# ---------------------------------------------------------------- world-model objectives


class KLAnnealing_ELBO(TraceMeanField_ELBO):
    """log p(x | z) + log π(a | z) − β · KL(q ‖ p), with β warmed up over SVI steps.

    The β-weighted ELBO (β-VAE; KL annealing in Bowman et al., 2016): every
    latent site's KL term is multiplied by β. At step s (counted in
    ``loss_and_grads`` calls, so in ``SVI.step`` calls)

        β_s = beta_start + (beta − beta_start) · min(1, s / warmup_steps)

    when ``warmup_steps`` > 0, else ``beta``. ``loss`` and
    ``differentiable_loss`` use the current β and do not advance the count.

    Is it a bound on log p(x, a)? At β = 1 it is the ELBO. With β < 1 it is
    *not* a lower bound: the objective can exceed log p(x, a), so a reported
    loss below −log p(x, a) does not contradict anything. With β ≥ 1 it is a
    lower bound, looser than the ELBO (KL ≥ 0).

    Both sides are annealed alike (docs/pyro_pitfalls.md): an analytic KL is
    multiplied by β, which scales log p(z) and log q(z) together; at a Monte
    Carlo site (no analytic KL, allowed by ``monte_carlo_kl``) the estimate
    log q(z) − log p(z) is multiplied by β, so both log-densities are.

    :param beta: β after the warm-up, a number ≥ 0.
    :param warmup_steps: steps over which β goes linearly from ``beta_start``
        to ``beta``; 0 for ``beta`` from the start.
    :param beta_start: β at step 0 of a warm-up, a number ≥ 0.
    :ivar step: SVI steps taken so far; set it to resume a schedule.

    The other arguments are :class:`TraceMeanField_ELBO`'s.
    """

    def __init__(
        self,
        beta: float = 1.0,
        warmup_steps: int = 0,
        beta_start: float = 0.0,
        *,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        retain_graph: bool | None = None,
        monte_carlo_kl: str | list[str] = "warn",
        batched: bool = True,
        compile: bool | str = False,
    ):
        self.beta = check_real("beta", beta, low=0.0)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, low=0)
        self.beta_start = check_real("beta_start", beta_start, low=0.0)
        super().__init__(
            num_particles,
            max_plate_nesting,
            vectorize_particles,
            strict_enumeration_warning,
            ignore_jit_warnings,
            retain_graph,
            monte_carlo_kl=monte_carlo_kl,
            batched=batched,
            compile=compile,
        )
        self.step = 0

    @property
    def current_beta(self) -> float:
        """β at the current :attr:`step`."""
        if self.step >= self.warmup_steps:  # also warmup_steps == 0
            return self.beta
        return self.beta_start + (self.beta - self.beta_start) * self.step / self.warmup_steps

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = super().loss_and_grads(model, guide, *args, **kwargs)
        self.step += 1
        return loss

    def shape_kl(self, name, kl, q, p, mask, estimator):
        beta = self.current_beta
        return kl if beta == 1.0 else kl * beta


class FreeNats_ELBO(TraceMeanField_ELBO):
    """log p(x | z) + log π(a | z) − Σ_t max(KL_t, c): the ELBO with free nats (free bits).

    KL_t is one latent site's KL(q ‖ p) for one episode, summed over the
    latent dimensions; each observed step's is replaced by max(KL_t, c), so
    no gradient pushes a step's KL below c nats (Kingma et al., 2016; as in
    Dreamer). Masked (padded) steps still contribute 0, not c. With a
    ``poutine.scale`` on the site, the clamped KL is scaled.

    Is it a bound on log p(x, a)? Yes: max(KL_t, c) ≥ KL_t, so the objective
    is ≤ the ELBO ≤ log p(x, a). But it is not the ELBO's gradient: a step
    whose KL_t is below c gets zero gradient from its KL term. With c = 0 it
    is the ELBO.

    Needs the analytic KL at every latent site: max(·, c) of the one-sample
    estimate log q(z) − log p(z) is not a clamp of the KL (the estimate is
    often negative), so a site without one raises ``ValueError``.

    :param free_nats: c, in nats per latent site, episode and step; ≥ 0.

    The other arguments are :class:`TraceMeanField_ELBO`'s.
    """

    def __init__(
        self,
        free_nats: float = 1.0,
        *,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        retain_graph: bool | None = None,
        monte_carlo_kl: str | list[str] = "warn",
        batched: bool = True,
        compile: bool | str = False,
    ):
        self.free_nats = check_real("free_nats", free_nats, low=0.0)
        super().__init__(
            num_particles,
            max_plate_nesting,
            vectorize_particles,
            strict_enumeration_warning,
            ignore_jit_warnings,
            retain_graph,
            monte_carlo_kl=monte_carlo_kl,
            batched=batched,
            compile=compile,
        )

    def shape_kl(self, name, kl, q, p, mask, estimator):
        if estimator == MONTE_CARLO:
            _refuse_monte_carlo(
                self,
                name,
                q,
                p,
                "free nats clamp each step's KL, which a one-sample estimate log q − log p is not",
                "TraceMeanField_ELBO / KLAnnealing_ELBO",
            )
        if not torch.is_tensor(kl) or mask is False:  # masked out entirely: 0.0
            return kl
        clamped = kl.clamp(min=self.free_nats)
        return clamped if mask is None else torch.where(mask, clamped, kl)  # padded steps keep 0


class KLBalancing_ELBO(TraceMeanField_ELBO):
    """The ELBO with DreamerV2's KL balancing: α·KL(sg(q) ‖ p) + (1 − α)·KL(q ‖ sg(p)).

    sg is stop-gradient (Hafner et al., 2021). The value of each KL term is
    KL(q ‖ p) for every α; only its gradient changes: the gradient reaching
    the prior's parameters, and through them whatever the prior depends on
    (the transition's weights, z_{t-1}, h_t), is scaled by α, and that
    reaching q's parameters by 1 − α. With α > 0.5 the prior moves towards
    the posterior faster than the posterior is regularised towards the prior.

    It is implemented by rebuilding q and p with each parameter tensor x
    replaced by x̃ = sg(x) + w·(x − sg(x)): x̃ equals x, and its gradient
    is w times x's (w = α for p, 1 − α for q). Supports distributions built
    from ``MaskedDistribution``, ``Independent`` and ``Normal``, and the categorical
    state's :class:`~pyro_worldmodel.model.components.GroupedOneHot` (x its normalised
    logits, so that the unimix is applied once); any other
    pair raises ``ValueError``, as does a site without an analytic KL (a
    Monte Carlo estimate has no stop-gradient split of this kind).

    Is it a bound on log p(x, a)? Its value is the ELBO's, so the reported
    number is a lower bound. Its gradient is not the ELBO's: at α = 0.5 it is
    the gradient of log p(x | z) + log π(a | z) − ½·KL, and for any other α it
    is in general not the gradient of any single objective.

    :param alpha: α in [0, 1]; DreamerV2 uses 0.8.

    The other arguments are :class:`TraceMeanField_ELBO`'s.
    """

    def __init__(
        self,
        alpha: float = 0.8,
        *,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        retain_graph: bool | None = None,
        monte_carlo_kl: str | list[str] = "warn",
        batched: bool = True,
        compile: bool | str = False,
    ):
        self.alpha = check_real("alpha", alpha, low=0.0, high=1.0)
        super().__init__(
            num_particles,
            max_plate_nesting,
            vectorize_particles,
            strict_enumeration_warning,
            ignore_jit_warnings,
            retain_graph,
            monte_carlo_kl=monte_carlo_kl,
            batched=batched,
            compile=compile,
        )

    def shape_kl(self, name, kl, q, p, mask, estimator):
        if estimator == MONTE_CARLO:
            _refuse_monte_carlo(
                self,
                name,
                q,
                p,
                "KL balancing splits the gradient of an analytic KL between q and p",
                "TraceMeanField_ELBO",
            )
        if not torch.is_tensor(kl):  # masked out entirely: no gradient to split
            return kl
        where = (name, describe_pair(q, p))
        return kl_divergence(
            _weigh_gradient(q, 1.0 - self.alpha, where), _weigh_gradient(p, self.alpha, where)
        )


class LatentOvershooting_ELBO(TraceMeanField_ELBO):
    """PlaNet's latent overshooting (Hafner et al., 2019): besides the one-step KL, the KL of
    every step against the d-step priors p(z_t | z_{t-d}) for d = 2 … D.

        ELBO − (β / D) Σ_t Σ_{d=2}^{min(D, t)} KL(q(z_t | ·) ‖ p(z_t | z_{t-d}))

    weighted as PlaNet's reference implementations weigh it: the one-step KL at
    full weight, each longer distance at β / D. p(z_t | z_{t-d}) starts at the
    guide's draw of z_{t-d} and samples d − 1 transitions under the recorded
    actions (:func:`~pyro_worldmodel.infer.batched.multi_step_kl`). As in PlaNet,
    the overshooting terms train the transition only: q and the draw of z_{t-d}
    enter them without gradient. The transition is then trained to predict d
    steps ahead from a posterior state, which is what open-loop imagination
    asks of it.

    With D = 1, or β = 0, it is the ELBO, value and gradient. Otherwise it is the
    ELBO less non-negative terms: still a lower bound on log p(x, a), a looser one.

    It is computed on the batched path only (a :class:`~pyro_worldmodel.model.WorldModel`
    whose transition is Markov and gives diagonal Normals, with a filter, smoothing or
    mean-field guide); anything else raises ``ValueError`` naming why.

    :param distance: D ≥ 1, the longest distance (PlaNet: 50).
    :param beta: β ≥ 0, the weight of the overshooting terms (PlaNet: 1).

    The other arguments are :class:`TraceMeanField_ELBO`'s.
    """

    def __init__(
        self,
        distance: int = 3,
        beta: float = 1.0,
        *,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        retain_graph: bool | None = None,
        monte_carlo_kl: str | list[str] = "warn",
        batched: bool = True,
        compile: bool | str = False,
    ):
        self.distance = _check_int("distance", distance, low=1)
        self.beta = check_real("beta", beta, low=0.0)
        if not batched:
            raise ValueError(
                "batched: LatentOvershooting_ELBO is computed on the batched path only, got False"
            )
        super().__init__(
            num_particles,
            max_plate_nesting,
            vectorize_particles,
            strict_enumeration_warning,
            ignore_jit_warnings,
            retain_graph,
            monte_carlo_kl=monte_carlo_kl,
            batched=batched,
            compile=compile,
        )

    def _batched(self, model, guide, args, kwargs) -> bool:
        if super()._batched(model, guide, args, kwargs):
            model_ = model.__self__
            if not model_.deter_dim:
                return True
            self.path = "pyro traces: the transition is recurrent"
        raise ValueError(
            f"LatentOvershooting_ELBO: computed on the batched path only, and this call cannot take it"
            f" ({self.path.removeprefix('pyro traces: ')}); it needs WorldModel.model with a Markov transition"
            " of diagonal Normals (not rssm), a filter, smoothing or mean-field guide, and no Pyro handler"
        )

    def combine_kl(self, kl, model, z, q, a_feat, mask):
        T, D = z.shape[1], self.distance
        if D == 1 or T <= 2 or self.beta == 0:
            return kl
        z_sg, q_sg = z.detach(), Normal(q.loc.detach(), q.scale.detach())
        extra = torch.zeros_like(kl)
        for d in range(2, min(D, T - 1) + 1):
            extra[:, d:] = extra[:, d:] + batched.multi_step_kl(model, z_sg, q_sg, a_feat, mask, d)
        return kl + (self.beta / D) * extra


def _refuse_monte_carlo(elbo, name, q, p, why, instead):
    """The ValueError of an objective that is defined only for an analytic KL."""
    raise ValueError(
        f"{type(elbo).__name__}: no analytic {describe_pair(q, p)} at {name}; {why}."
        f" Use a pair with an analytic KL, or {instead}"
    )


def _weigh_gradient(d, w, where):
    """``d`` rebuilt so that its value is unchanged and the gradient of each parameter is scaled by ``w``."""
    if w == 1.0:
        return d
    if isinstance(d, dist.MaskedDistribution):
        return dist.MaskedDistribution(_weigh_gradient(d.base_dist, w, where), d._mask)
    if isinstance(d, torch.distributions.Independent):
        return dist.Independent(_weigh_gradient(d.base_dist, w, where), d.reinterpreted_batch_ndims)
    if type(d) in (dist.Normal, torch.distributions.Normal):
        return dist.Normal(_scale_grad(d.loc, w), _scale_grad(d.scale, w), validate_args=False)
    if type(d) is GroupedOneHot:  # its logits are normalised already: the unimix is not applied twice
        return GroupedOneHot(
            _scale_grad(d.logits, w), d.classes, 0.0, d.straight_through, validate_args=False
        )
    name, pair = where
    raise ValueError(
        f"KLBalancing_ELBO: cannot split the gradient of {pair} at {name}: {type(d).__name__} is not"
        " supported; expected MaskedDistribution and Independent around Normal, or GroupedOneHot"
    )


def _scale_grad(x, w):
    """x in value, w · ∂/∂x in gradient."""
    if w == 0.0:
        return x.detach()
    x_sg = x.detach()
    return x_sg + (x - x_sg) * w


def _check_int(name, value, *, low) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


def _check_pyro_args(num_particles, max_plate_nesting):
    _check_int("num_particles", num_particles, low=1)
    if max_plate_nesting != float("inf"):
        _check_int("max_plate_nesting", max_plate_nesting, low=0)


# ---------------------------------------------------------------- exact enumeration


class TraceEnum_ELBO(pyro.infer.TraceEnum_ELBO):
    """The exact log-likelihood −log p(x, a) of a world model whose z_t is one categorical of
    K states, by Pyro's ``TraceEnum_ELBO``: every z_t enumerated in parallel under
    ``pyro.markov``, no guide for z.

    The model is the world model's own Pyro program (:meth:`WorldModel.model
    <pyro_worldmodel.model.WorldModel.model>`), run inside :meth:`WorldModel.enumerated
    <pyro_worldmodel.model.WorldModel.enumerated>` so that each step's observed sites sit
    beside z_t in the chain, with every z_t configured for parallel enumeration. Pyro then
    sums the chain out by variable elimination, in O(T K²) per episode, and the loss is
    −log p(x_{1:T}, a_{1:T}) itself: no bound. The guide passed to the loss is not run (its
    parameters are not trained); with a categorical prior the exact posterior needs none.

    It applies to a model whose init and transition give one categorical (``latent_dim``
    equal to the init's ``classes``), whose transition is Markov (not the RSSM: its h_t
    carries every earlier z_t, so no dimension could be recycled) and has no global latents;
    anything else raises ``ValueError``. Its cost grows as K², so it is for up to a few
    hundred states.

    The arguments are Pyro's ``TraceEnum_ELBO``'s, with ``max_plate_nesting`` 2, the world
    model's two plates.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = 2,
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        retain_graph: bool | None = None,
    ):
        _check_pyro_args(num_particles, max_plate_nesting)
        if max_plate_nesting == float("inf") or max_plate_nesting < 2:
            raise ValueError(
                f"max_plate_nesting: expected an int >= 2 (the world model's two plates), got {max_plate_nesting}"
            )
        if num_particles != 1 or vectorize_particles:
            raise ValueError(
                "num_particles, vectorize_particles: expected 1 and False: the enumerated loss is exact,"
                f" so further particles repeat it, got {num_particles} and {vectorize_particles}"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            retain_graph=retain_graph,
        )

    def _programs(self, model_fn, kwargs):
        world_model = getattr(model_fn, "__self__", None)
        if (
            not isinstance(world_model, WorldModel)
            or getattr(model_fn, "__func__", None) is not WorldModel.model
        ):
            raise ValueError(f"TraceEnum_ELBO: expected a world model's .model, got {model_fn!r}")
        why = why_not_enumerable(world_model)
        if why is None and kwargs.get("horizon", 0) not in (0, None):
            why = (
                f"horizon: expected 0, got {kwargs['horizon']}: a horizon imagines steps past the data,"
                " which enumeration would sum out too"
            )
        if why is not None:
            raise ValueError(f"TraceEnum_ELBO: {why}")

        def model(*args, **kw):
            with world_model.enumerated():
                return model_fn(*args, **kw)

        return pyro.infer.config_enumerate(model, default="parallel"), _no_guide

    def loss(self, model, guide, *args, **kwargs):
        return super().loss(*self._programs(model, kwargs), *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return super().differentiable_loss(*self._programs(model, kwargs), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return super().loss_and_grads(*self._programs(model, kwargs), *args, **kwargs)

    def log_likelihood(self, model, obs, actions, mask=None, **targets) -> torch.Tensor:
        """log p(x_{1:T}, a_{1:T}) of each episode, exactly: ``(B,)`` nats, without gradient.

        :param model: the :class:`~pyro_worldmodel.model.WorldModel`; the other arguments
            are its :meth:`~pyro_worldmodel.model.WorldModel.model`'s (``rewards``,
            ``continues`` as keywords).
        """
        obs, actions, mask = model.check_inputs(obs, actions, mask)
        out = []
        for b in range(mask.shape[0]):  # the contraction sums the episodes: one at a time
            one = {k: v[b : b + 1] for k, v in targets.items() if v is not None}
            rows = (obs[b : b + 1], actions[b : b + 1], mask[b : b + 1])
            out.append(-self.loss(model.model, None, *rows, **one))
        return torch.tensor(out, dtype=obs.dtype)


def _no_guide(*args, **kwargs):
    """No guide: every latent site of the model is enumerated."""


def why_not_enumerable(model) -> str | None:
    """None if :class:`TraceEnum_ELBO` can sum ``model``'s chain out exactly; else why not."""
    K = model.latent_classes
    if K is None:
        return f"z_t is Gaussian ({type(model.init).__name__}); enumeration needs a categorical state"
    if model.latent_dim != K:
        return (
            f"z_t is {model.latent_dim // K} groups of {K} classes, {K}^{model.latent_dim // K} joint"
            f" states; enumeration takes one group (latent_dim = classes = {K})"
        )
    if model.deter_dim:
        return (
            f"the {type(model.transition).__name__} carries h_t, a function of every earlier z_t,"
            " so the chain is not Markov in z_t; use the categorical_mlp transition"
        )
    if model.has_global_latents:
        return "the transition has global latents (a Bayesian transition's weights)"
    return None


# ---------------------------------------------------------------- compiled


class JitTraceMeanField_ELBO(TraceMeanField_ELBO):
    """:class:`TraceMeanField_ELBO`, compiled once per input shape with :func:`pyro.ops.jit.trace`.

    The same bound and gradient, from a traced graph, so most of the Python
    cost of building traces is paid once. Pyro's own ``JitTraceMeanField_ELBO``
    (1.9.2) re-traces at every step, and keys its compiled function by the
    number of arguments only, so a loss compiled at T = 10 returns T = 10's
    answer at T = 50 (docs/pyro_pitfalls.md). Here each compiled function is keyed by
    the model, the guide, the shape, dtype and device of every positional
    tensor, and the keyword arguments: a new T compiles once more (1–9 s), a
    T seen before reuses its graph.

    Pyro's restrictions on jit apply: static structure for a given shape, tensor
    inputs passed positionally, other inputs as hashable keywords (each
    distinct value compiles again), and every parameter created at the first
    call. What the loss reads besides its inputs and the param store is
    frozen into the graph at compile time: :attr:`kl_estimators` and any
    :class:`MonteCarloKLWarning` come from compilation, and a subclass whose
    ``shape_kl`` reads changing state (the β of :class:`KLAnnealing_ELBO`)
    would keep the value it had then.

    :param ignore_jit_warnings: hide the tracer's warnings; True by default,
        since masked distributions raise many that are harmless here.
    :param jit_options: passed to :func:`torch.jit.trace`, e.g. ``{"check_trace": True}``.
    :ivar compilations: how many graphs have been compiled.

    The other arguments are :class:`TraceMeanField_ELBO`'s.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = True,
        retain_graph: bool | None = None,
        *,
        monte_carlo_kl: str | list[str] = "warn",
        jit_options: dict | None = None,
    ):
        super().__init__(
            num_particles,
            max_plate_nesting,
            vectorize_particles,
            strict_enumeration_warning,
            ignore_jit_warnings,
            retain_graph,
            monte_carlo_kl=monte_carlo_kl,
        )
        if jit_options is not None and not isinstance(jit_options, dict):
            raise ValueError(f"jit_options: expected a dict or None, got {jit_options!r}")
        self.jit_options = jit_options
        self._compiled: dict = {}  # (model, guide, shapes, kwargs) -> CompiledFunction

    @property
    def compilations(self) -> int:
        """How many graphs have been compiled: one per model, guide, input shape and keywords."""
        return len(self._compiled)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """−ELBO as a tensor whose gradient is the ELBO's, from the graph compiled for these inputs."""
        # The world model's targets come as keywords; the graph takes tensors positionally.
        moved = tuple(k for k in _TENSOR_KEYWORDS if torch.is_tensor(kwargs.get(k)))
        if moved:
            args = (*args, *(kwargs.pop(k) for k in moved))
            kwargs["_moved_keywords"] = moved
        key = _compile_key(model, guide, args, kwargs)
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled(*args, **kwargs)
        compiled = self._compile(model, guide)
        with warnings.catch_warnings():
            # torch 2.13 deprecates torch.jit.trace, which pyro.ops.jit calls: a
            # DeprecationWarning at every compilation, an error wherever warnings
            # are. This class is built on it knowingly, so exactly that message
            # is silenced, and only while compiling; every other warning passes.
            warnings.filterwarnings(
                "ignore",
                message=r"`torch\.jit\.trace` is (deprecated|not supported)",
                category=DeprecationWarning,
            )
            loss = compiled(*args, **kwargs)  # the first call captures params, then traces
        self._compiled[key] = compiled
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        """−ELBO as a number, from the compiled graph."""
        with torch.no_grad():
            loss = torch_item(self.differentiable_loss(model, guide, *args, **kwargs))
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """−ELBO as a number; its gradient is accumulated into the parameters' ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if getattr(loss, "requires_grad", False):
            loss.backward(retain_graph=self.retain_graph)
        loss = torch_item(loss)
        warn_if_nan(loss, "loss")
        return loss

    def _compile(self, model, guide):
        weakself = weakref.ref(self)  # the graph must not keep the ELBO alive

        def differentiable_loss(*args, **kwargs):
            moved = kwargs.pop("_moved_keywords", ())
            if moved:
                kwargs.update(zip(moved, args[len(args) - len(moved) :]))
                args = args[: len(args) - len(moved)]
            self = weakself()
            loss = 0.0
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                _, loss_particle = self._differentiable_loss_particle(model_trace, guide_trace)
                loss = loss + loss_particle / self.num_particles
            return loss

        # CompiledFunction edits its options; each graph gets a copy.
        return pyro.ops.jit.trace(
            differentiable_loss,
            ignore_warnings=self.ignore_jit_warnings,
            jit_options=dict(self.jit_options or {}),
        )


# Keywords of WorldModel.model that carry data: moved into the compiled graph's positional inputs.
_TENSOR_KEYWORDS = ("rewards", "continues")


def _compile_key(model, guide, args, kwargs):
    """What a traced graph depends on besides the param store: a hashable signature."""
    shapes = []
    for i, arg in enumerate(args):
        if not torch.is_tensor(arg):
            raise ValueError(
                f"JitTraceMeanField_ELBO: expected tensors as positional arguments, got"
                f" {type(arg).__name__} at position {i}; pass other inputs as keywords"
            )
        shapes.append((tuple(arg.shape), arg.dtype, arg.device))
    for name, value in kwargs.items():
        if torch.is_tensor(value):
            raise ValueError(
                f"JitTraceMeanField_ELBO: keyword {name!r} is a tensor, which the graph would keep"
                " as a constant; pass tensors positionally"
            )
    key = (_hashable(model), _hashable(guide), tuple(shapes), tuple(sorted(kwargs.items())))
    try:
        hash(key)
    except TypeError as e:
        raise ValueError(
            f"JitTraceMeanField_ELBO: expected hashable keyword arguments, got {sorted(kwargs)}: {e}"
        ) from None
    return key


def _hashable(fn):
    """``fn`` itself where hashable (a bound method hashes by its object), else its id."""
    try:
        hash(fn)
    except TypeError:
        return id(fn)
    return fn


# The shape_kl of these classes is element-wise, so the batched path may call it
# once on every site's KL at once, (B, T), instead of once per site, (B, 1).
_BATCHED_SHAPE_KL = {
    TraceMeanField_ELBO.shape_kl,
    KLAnnealing_ELBO.shape_kl,
    FreeNats_ELBO.shape_kl,
    KLBalancing_ELBO.shape_kl,
    LatentOvershooting_ELBO.shape_kl,
}
