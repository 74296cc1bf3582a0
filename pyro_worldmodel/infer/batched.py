"""The mean-field ELBO of a world model, its model terms batched over time.

Run through Pyro's traces, a :class:`~pyro_worldmodel.model.WorldModel` pays
for every latent site twice (model and guide, about 150 µs a site) and calls
its transition once per step (docs/pyro_pitfalls.md). Yet once the guide has
drawn z_1 … z_T, nothing in a Markov model is sequential: p(z_t | z_{t-1},
a_{t-1}), KL(q_t ‖ p_t), p(x_t | z_t) and π(a_t | z_t) are functions of
tensors that are all known. :func:`mean_field_loss` computes the
:class:`~pyro_worldmodel.infer.TraceMeanField_ELBO` loss that way.

It calls the very methods the Pyro programs call, so that a change to a
factor changes both paths: the guide's :meth:`~FilterGuide.context` and
:meth:`~FilterGuide.step_params` step by step, with the same random draws in
the same order as under ``pyro.sample``; then the model's
:meth:`~WorldModel.priors` (a recurrent transition steps its h_t there) and
:meth:`~WorldModel.observation_sites`. The tests compare the two paths for
every registered component.

It applies where that equality holds (:func:`supports`): the Pyro programs
are the package's own (not overridden), the guide's steps are its diagonal
Normals, the init and the transition give diagonal Normals (so every KL is
analytic), and no component samples anything of its own. Anything else takes
Pyro's traces.
"""

from __future__ import annotations

import importlib
import time
import warnings
import weakref

import pyro
import torch
from pyro import poutine
from pyro.distributions import Independent, Normal
from pyro.poutine.runtime import _PYRO_STACK  # Pyro's handler stack: no public accessor
from pyro.poutine.trace_messenger import TraceMessenger
from torch.distributions import kl_divergence

from ..model.components.transition import WEIGHTS_SITE
from ..model.guides import FilterGuide, MeanFieldGuide
from ..model.naming import register_module
from ..model.world_model import WorldModel

# Guides whose Pyro program is step() on context(), and whose step() is the Normal of step_params().
_PROGRAMS = (FilterGuide, MeanFieldGuide)


def supports(model_fn, guide, args, kwargs, *, vectorize_particles: bool) -> str | None:
    """None if :func:`mean_field_loss` computes exactly what Pyro's traces would; else why not."""
    model = getattr(model_fn, "__self__", None)
    if isinstance(model, WorldModel) and type(model).model is not WorldModel.model:
        return f"{type(model).__name__} overrides WorldModel.model"
    if not isinstance(model, WorldModel) or getattr(model_fn, "__func__", None) is not WorldModel.model:
        return "the model is not WorldModel.model"
    program = next((base for base in _PROGRAMS if isinstance(guide, base)), None)
    if program is None:
        return f"the guide is a {type(guide).__name__}"
    if type(guide).forward is not program.forward:
        return f"{type(guide).__name__} overrides {program.__name__}.forward"
    if type(guide).step is not program.step:
        return f"{type(guide).__name__}'s steps are not the diagonal Normals of its step_params"
    if getattr(guide, "covariance", "diagonal") != "diagonal":
        return f"{type(guide).__name__}'s steps have a {guide.covariance} covariance"
    extra = {k: v for k, v in kwargs.items() if k not in ("mask", "rewards", "continues")}
    if (
        not 2 <= len(args) + ("mask" in kwargs) <= 3
        or len(args) < 2
        or extra.get("horizon", 0) not in (0, None)
        or extra.get("future_actions") is not None
        or set(extra) - {"horizon", "future_actions"}
    ):
        return "the model is called with a horizon or other arguments"
    if vectorize_particles:
        return "particles are vectorised"
    if not guide.draws_globals_of(model):
        return "the guide does not draw the weights of the model's Bayesian transition"
    # Only SVI's parameter capture may watch: any other handler (scale, mask,
    # condition, a trace of the sample sites) needs Pyro's sites.
    if not all(isinstance(m, TraceMessenger) and m.param_only for m in _PYRO_STACK):
        return "a Pyro handler is active"
    return _probe(model)


_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probe(model: WorldModel) -> str | None:
    """Whether the model's chain gives diagonal Normals and its factors sample nothing,
    found by calling them once on zeros (no random draw), and remembered per set of parts."""
    key = tuple(id(part) for part in model.children())
    cached = _PROBED.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    ref = next(model.parameters())
    Z, A = model.latent_dim, model.action_space.feature_dim
    z, a = ref.new_zeros(1, 2, Z), ref.new_zeros(1, 2, A)
    why = None
    with torch.no_grad(), pyro.validation_enabled(False), poutine.trace() as tape:
        priors, features = model.priors(z, a)
        for i, prior in enumerate(priors):
            if _normal(prior) is None:
                part = type(model.init if i == 0 else model.transition).__name__
                why = f"the {part} gives a {_family(prior)}, not a diagonal Normal"
                break
        values = {"obs": ref.new_zeros(1, 2, model.obs_dim), "actions": _some_actions(model, ref)}
        targets = model.targets(ref.new_zeros(1, 2), ref.new_ones(1, 2))  # for the heads it has
        model.observation_sites(features, a, **values, **targets)
    if why is None and tape.trace.nodes:
        why = f"a component samples or registers sites of its own ({', '.join(tape.trace.nodes)})"
    _PROBED[model] = (key, why)
    return why


def _some_actions(model, ref):
    space = model.action_space
    if space.kind == "discrete":
        return torch.zeros(1, 2, dtype=torch.long, device=ref.device)
    return ref.new_zeros(1, 2, space.dim)


def _family(d) -> str:
    while type(d).__name__ in ("MaskedDistribution", "Independent"):
        d = d.base_dist
    return type(d).__name__


def _normal(d) -> Normal | None:
    """The diagonal Normal inside ``Independent(Normal, 1)`` (masked or not), else None."""
    while type(d).__name__ == "MaskedDistribution":
        d = d.base_dist
    if isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1 and type(d.base_dist) is Normal:
        return d.base_dist
    return None


def mean_field_loss(
    elbo, model_fn, guide, obs, actions, mask=None, rewards=None, continues=None
) -> torch.Tensor:
    """One particle of −ELBO, differentiable: the guide step by step, the model batched over time.

    :param elbo: the :class:`~pyro_worldmodel.infer.TraceMeanField_ELBO` (or
        subclass) whose ``shape_kl`` shapes the KL terms, as on Pyro's path.
    """
    model: WorldModel = model_fn.__self__
    # Values are checked while Pyro's validation is on, as on Pyro's path (each
    # check is a host-device sync on a GPU: train with validation off there).
    # The distributions below are built from checked inputs, without validation.
    obs, actions, mask = model.check_inputs(obs, actions, mask)
    rewards, continues = model.check_targets(rewards, continues, mask, obs.dtype)
    guide.check_inputs(obs, actions, mask, check_values=False)
    register_module(model.name, model)
    register_module(guide.name, guide)
    with pyro.validation_enabled(False):
        return _loss(elbo, model, guide, obs, actions, mask, rewards, continues)


def heldout_loss(model, guide, obs, actions, mask) -> torch.Tensor:
    """One particle of −ELBO of the observations and actions, the bound :func:`~pyro_worldmodel.elbo_terms`
    estimates, without a global latent's KL (θ ~ q(θ) is drawn, its KL paid by the training
    set): for data not trained on. Needs :func:`supports` (with ``kwargs={}``) to hold."""
    from .elbos import TraceMeanField_ELBO  # the plain bound, whatever the training objective

    obs, actions, mask = model.check_inputs(obs, actions, mask)
    guide.check_inputs(obs, actions, mask, check_values=False)
    register_module(model.name, model)
    register_module(guide.name, guide)
    with pyro.validation_enabled(False):
        return _loss(TraceMeanField_ELBO(), model, guide, obs, actions, mask, global_kl=False)


def _loss(elbo, model, guide, obs, actions, mask, rewards=None, continues=None, *, global_kl=True):
    if not model.has_global_latents:
        return _chain_loss(elbo, model, guide, obs, actions, mask, rewards, continues)
    # A Bayesian transition: θ ~ q(θ) first, as the guide draws it, then the chain under θ.
    transition = model.transition
    q_theta, p_theta = transition.posterior(), transition.prior()
    theta = q_theta.rsample()
    kl = elbo.shape_kl(WEIGHTS_SITE, kl_divergence(q_theta, p_theta), q_theta, p_theta, None, "analytic")
    with transition.using(theta):
        loss = _chain_loss(elbo, model, guide, obs, actions, mask, rewards, continues)
    if not global_kl:
        return loss
    elbo.kl_estimators[WEIGHTS_SITE] = "analytic"
    return loss + kl * transition.kl_scale(mask.shape[0])


def _chain_loss(elbo, model, guide, obs, actions, mask, rewards=None, continues=None):
    B, T = mask.shape
    a_feat = model.action_space.features(actions, obs.dtype)  # (B, T, A)
    z, q = guide_draws(guide, obs, a_feat, mask, elbo.recurrence())  # (B, T, Z); Normal, batch (B, T, Z)
    priors, features = model.priors(z, a_feat)  # p(z_1), then p(z_t | ·) for t ≥ 2
    normals = [_normal(p) for p in priors]
    p = Normal(torch.cat([n.loc for n in normals], 1), torch.cat([n.scale for n in normals], 1))
    q, p = Independent(q, 1).mask(mask), Independent(p, 1).mask(mask)  # as the z_t sites are masked
    kl = elbo.shape_kl(f"z_0 … z_{T - 1}", kl_divergence(q, p), q, p, mask, "analytic")  # (B, T)
    kl = elbo.combine_kl(kl, model, z, q.base_dist.base_dist, a_feat, mask)
    sites = model.observation_sites(features, a_feat, obs, actions, rewards, continues)
    log_px, *others = (d.mask(mask).log_prob(value).sum() for d, value in sites.values())
    log_pa = others[0]  # log π(a|z), then the heads', in the order of the sites
    for term in others[1:]:
        log_pa = log_pa + term
    elbo.kl_estimators = {f"z_{t}": "analytic" for t in range(T)}
    return -(log_px + log_pa - kl.sum())


def guide_draws(guide, obs, a_feat, mask, steps=None) -> tuple[torch.Tensor, Normal]:
    """z_t ~ q(z_t | ·) for t = 0 … T-1, drawn in the order, and with the calls, of the
    guide's ``pyro.sample``: ``(z (B, T, Z), q as one Normal of batch (B, T, Z))``.

    :param steps: what runs the steps: :func:`recurrence` (None), or a compiled copy of it
        (:class:`CompiledRecurrence`).
    """
    B, T = mask.shape
    context = guide.context(obs, a_feat, mask)  # (B, T, C)
    weights = guide.step_weights()
    z_0 = guide.initial_latent(B)  # (B, Z)
    # ε_t of every step first: nothing between the steps draws, so these are the numbers that
    # Normal(loc_t, scale_t).rsample() draws step by step (empty(B, Z).normal_()), in order.
    noise = [_standard_normal(z_0) for _ in range(T)]  # T of (B, Z): no stacked copy in the eager loop
    z, loc, scale = (steps or recurrence)(guide, z_0, context, weights, noise)
    return z, Normal(loc, scale)


def recurrence(guide, z_prev, context, weights, noise) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The guide's steps, z_t = loc_t + ε_t ⊙ scale_t with (loc_t, scale_t) =
    ``guide.step_params(z_{t-1}, context_t, weights)``: ``(z, loc, scale)``, each ``(B, T, Z)``.

    :param z_prev: ``(B, Z)``, z_0; :param context: ``(B, T, C)``; :param noise: ε, T of
        ``(B, Z)``: a list, or a ``(T, B, Z)`` tensor.
    """
    # Steps of shape (B, ·), not (B, 1, ·): fewer views, one fused matmul. unbind, not c[:, t]:
    # the backward of each slice would zero a gradient the size of all of the context.
    zs, locs, scales = [], [], []
    for c_t, eps in zip(context.unbind(1), noise, strict=True):  # (B, C), (B, Z)
        loc, scale = guide.step_params(z_prev, c_t, weights)  # (B, Z) each
        z_prev = torch.addcmul(loc, eps, scale)  # Normal(loc, scale).rsample() with that ε
        zs.append(z_prev)
        locs.append(loc)
        scales.append(scale)
    return torch.stack(zs, 1), torch.stack(locs, 1), torch.stack(scales, 1)


def _standard_normal(like):
    """The draw ``Normal.rsample`` makes for a loc like ``like`` (``empty(...).normal_()``): the same numbers."""
    return torch.randn(like.shape, dtype=like.dtype, device=like.device)


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` could not compile the guide's steps, or an ELBO asked to compile them
    takes Pyro's traces, where nothing is compiled: they run eagerly."""


class CompiledRecurrence:
    """:func:`recurrence` through ``torch.compile``, ``chunk`` steps at a time.

    Each run of ``chunk`` steps is unrolled into one graph for the forward pass and one for
    the backward, compiled once per guide, chunk shape, dtype, device and grad mode
    (``dynamic=False``). Every T reuses the graph of a full chunk and compiles at most one
    more, for its remainder, so compile time does not grow with T; a whole T of 200 unrolled
    into one graph took about 4 minutes to compile on a CPU where 25 steps take seconds.

    At a new key it first compiles both graphs, on detached copies of the inputs (so no
    gradient reaches a parameter), and times that. If compiling fails it warns
    (:class:`CompileFallbackWarning`) and runs :func:`recurrence` eagerly from then on: the
    noise being an input, the eager steps draw nothing, and compute what the compiled ones would.

    :param backend: ``torch.compile``'s backend, e.g. ``"inductor"``; :param owner: who asked,
        for the warning; :param chunk: steps per compiled graph.
    :ivar seconds: time spent compiling (with one chunk's forward and backward), over all keys.
    :ivar error: why compiling failed, or None.
    """

    def __init__(self, backend: str, owner: str = "the ELBO", chunk: int = 25):
        self.backend, self.owner, self.chunk = backend, owner, chunk
        if backend == "inductor":
            # Inductor's first import reaches torch.utils.mkldnn, whose torch.jit.script_method
            # raises torch's own DeprecationWarning (torch 2.13): an error where warnings are.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                importlib.import_module("torch._inductor.compile_fx")
        self.fn = torch.compile(recurrence, backend=backend, dynamic=False)
        self.keys: set = set()
        self.seconds = 0.0
        self.error: str | None = None

    def __call__(self, guide, z_prev, context, weights, noise):
        outputs = []
        # Contiguous chunks and z_prev, so that every full chunk of every T meets the same
        # guards (a view's strides would depend on T); split, not slices, for one backward copy.
        for i, c in enumerate(context.split(self.chunk, 1)):
            c, z_prev = c.contiguous(), z_prev.contiguous()
            eps = torch.stack(noise[i * self.chunk : (i + 1) * self.chunk])  # (K, B, Z): one input
            if self.error is None:
                key = (
                    id(guide),
                    guide.training,
                    torch.is_grad_enabled(),
                    tuple(c.shape),
                    tuple(z_prev.shape),
                )
                key += (c.dtype, str(c.device))
                if key not in self.keys:
                    self._compile(guide, z_prev, c, weights, eps)
                    self.keys.add(key)
            run = recurrence if self.error is not None else self.fn
            outputs.append(run(guide, z_prev, c, weights, eps))
            z_prev = outputs[-1][0][:, -1]
        if len(outputs) == 1:
            return outputs[0]
        return tuple(torch.cat(parts, 1) for parts in zip(*outputs, strict=True))

    def _compile(self, guide, *inputs) -> None:
        # Copies with the inputs' requires_grad, so that the real call meets the same guards.
        copies = [_detached(x) for x in inputs]
        start = time.perf_counter()
        try:
            outputs = self.fn(guide, *copies)
            wrt = [x for x in _leaves(copies) if x.requires_grad]
            if torch.is_grad_enabled() and wrt and outputs[0].requires_grad:
                grads = [torch.ones_like(out) for out in outputs]
                torch.autograd.grad(outputs, wrt, grads, allow_unused=True)  # compiles the backward
        except Exception as e:
            # What torch.compile raises when it cannot compile; torch._dynamo is imported by now
            # (at the top of the module it would add about a second to every process's start).
            from torch._dynamo.exc import TorchDynamoException

            if not isinstance(e, TorchDynamoException):
                raise
            why = str(e).strip().splitlines()
            self.error = f"{type(e).__name__}: {why[0] if why else ''}"
            warnings.warn(
                f"{self.owner}(compile={self.backend!r}): torch.compile could not compile the guide's"
                f" steps ({self.error}); they run eagerly from now on",
                CompileFallbackWarning,
                stacklevel=6,
            )
        finally:
            self.seconds += time.perf_counter() - start


def _detached(x):
    if isinstance(x, tuple):
        return tuple(_detached(v) for v in x)
    return x.detach().requires_grad_(x.requires_grad)


def _leaves(xs):
    for x in xs:
        yield from (_leaves(x) if isinstance(x, tuple) else (x,))


def multi_step_kl(model, z, q: Normal, a_feat, mask, distance: int) -> torch.Tensor:
    """KL(q(z_t | ·) ‖ p(z_t | z_{t-d})) for t ≥ d, per element: ``(B, T - d)``, zero outside ``mask``.

    p(z_t | z_{t-d}) is the model's d-step prior from the guide's draw of z_{t-d}:
    d − 1 transitions sampled (reparameterised) under the recorded actions, then
    the last transition's Normal, so the KL is a one-sample estimate of
    E_{p(z_{t-1} | z_{t-d})}[KL(q_t ‖ p(z_t | z_{t-1}))] for a Markov transition.
    Computed for every t at once, through :meth:`WorldModel.step <pyro_worldmodel.model.WorldModel.step>`.

    :param z: ``(B, T, Z)`` the guide's draws; :param q: the guide's Normal, batch ``(B, T, Z)``.
    :param distance: d ≥ 1.
    """
    T = z.shape[1]
    s = z[:, : T - distance]  # z_{t-d} for t = d … T-1
    for k in range(distance):
        prior = _normal(model.step(s, a_feat[:, k : k + T - distance])[0])
        if k < distance - 1:
            s = torch.addcmul(prior.loc, torch.randn_like(prior.loc), prior.scale)
    q_t = Normal(q.loc[:, distance:], q.scale[:, distance:])
    kl = kl_divergence(q_t, prior).sum(-1)  # (B, T - d)
    return torch.where(mask[:, distance:], kl, 0.0)
