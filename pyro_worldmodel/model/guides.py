"""Guides q(z | x, a): Pyro programs over the same ``z_{t}`` sites as the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineAutoregressive
from pyro.distributions.transforms.utils import clamp_preserve_gradients
from pyro.nn import AutoRegressiveNN
from torch import nn

from ..spaces import ActionSpace, ChecksInputs
from .components import CategoricalCombiner, Combiner, IdentityEncoder
from .components.nets import ScaleMap, mlp
from .naming import register_module, unique_name


class DrawsGlobals:
    """A guide that also draws the model's global latents (a Bayesian transition's weights)
    from their posterior, before the z_t, at the model's sites."""

    _global_parts: tuple = ()

    def attach_globals(self, model) -> None:
        """Draw ``model``'s global latents in this guide. :func:`~pyro_worldmodel.build` and
        ``for_model`` call it; a guide made by hand for a model with a Bayesian transition
        needs it before training. The parts are referenced, not registered: their
        parameters stay the model's."""
        self._global_parts = tuple(p for p in (model.transition,) if hasattr(p, "guide_weights"))

    def draws_globals_of(self, model) -> bool:
        """Whether this guide draws every global latent of ``model``."""
        return not model.has_global_latents or any(p is model.transition for p in self._global_parts)

    def sample_globals(self, batch_size: int) -> None:
        for part in self._global_parts:
            part.guide_weights(batch_size)


class FilterGuide(DrawsGlobals, ChecksInputs, nn.Module):
    """q(z_t | z_{t-1}, x_{≤t}, a_{<t}): the seed's Bayesian filter.

    A GRU summarises the past, h_t = GRU(h_{t-1}, [x_t, a_{t-1}]), and a
    :class:`~pyro_worldmodel.model.components.Combiner` turns ``z_{t-1}`` and
    ``[h_t, x_t, a_{t-1}]`` into q(z_t | ·). The current inputs reach the
    combiner directly as well as through the GRU, so that its linear path
    can read x_t at full precision. The GRU runs over the whole sequence in
    one call; only the z recurrence is a Python loop.

    Each step of the Pyro program is :meth:`step` (q(z_t | z_{t-1}, ·)), fed by
    :meth:`context` (what the step reads besides z_{t-1}, for every t at once):
    the batched evaluation of the ELBO (:mod:`pyro_worldmodel.infer.batched`)
    calls the same two methods.

    :param obs_dim: X, the size of x_t.
    :param action_space: the actions a_t.
    :param latent_dim: Z, the size of z_t.
    :param rnn_dim: size of the GRU state h_t.
    :param hidden: hidden widths of the combiner MLP.
    :param min_scale: the floor of q(z_t | ·)'s scale: a float, or ``"learned"`` (the
        default) for a floor per latent dimension that training lowers where the bound gains
        (:class:`~pyro_worldmodel.model.components.nets.ScaleMap`).
    :param covariance: ``"diagonal"`` (the default) or ``"full"``: q(z_t | ·) with a
        covariance that correlates the dimensions of z_t
        (:class:`~pyro_worldmodel.model.components.Combiner`). A full one is trained on
        Pyro's traces, not the batched path, with its KL to the model's diagonal prior
        in closed form.
    :param input_noise: σ of Gaussian noise added to what the guide reads of each x_t
        while it is in training mode (``fit`` trains in it, and leaves the guide in
        evaluation mode, where nothing is added): a regulariser against recognising
        the training sequences (docs/generalisation.md).
    :param encoder: what the guide reads of each x_t, with an ``out_dim``;
        :class:`~pyro_worldmodel.model.components.IdentityEncoder` by default.
    :param name: prefix in Pyro's param store; unique by default.
    """

    _prefix = "filter_guide"
    _action_blocks = 1  # a_{t-1}

    def __init__(
        self,
        obs_dim: int,
        action_space: ActionSpace,
        latent_dim: int,
        rnn_dim: int = 64,
        hidden: Sequence[int] = (64,),
        *,
        encoder: nn.Module | None = None,
        name: str | None = None,
        min_scale: float | Literal["learned"] = "learned",
        covariance: Literal["diagonal", "full"] = "diagonal",
        input_noise: float = 0.0,
    ):
        super().__init__()
        if (
            not isinstance(input_noise, (int, float))
            or isinstance(input_noise, bool)
            or not 0 <= input_noise < float("inf")
        ):
            raise ValueError(f"input_noise: expected a finite float >= 0, got {input_noise!r}")
        self.input_noise = float(input_noise)
        self.obs_dim = obs_dim
        self.action_space = action_space
        self.latent_dim = latent_dim
        self.rnn_dim = rnn_dim
        self.hidden = tuple(hidden)
        self.encoder = _encoder(encoder, obs_dim)
        E = self.encoder.out_dim
        self.rnn = nn.GRU(E + action_space.feature_dim, rnn_dim, batch_first=True)
        # The combiner reads [h_t, e(x_t)] and this many action features.
        summary = rnn_dim + E + self._action_blocks * action_space.feature_dim
        self.combiner = Combiner(latent_dim, summary, hidden, min_scale, covariance)
        self.min_scale = self.combiner.min_scale
        self.covariance = covariance
        self.z_0 = nn.Parameter(torch.zeros(latent_dim))  # stands in for z_{t-1} at t = 0
        self.name = unique_name(self._prefix, name)

    @classmethod
    def for_model(cls, model, **kwargs) -> FilterGuide:
        """A filter whose sizes match ``model``'s, drawing its global latents (:meth:`attach_globals`)."""
        guide = cls(model.obs_dim, model.action_space, model.latent_dim, **kwargs)
        guide.attach_globals(model)
        return guide

    def init_reading(self, obs_map: torch.Tensor, scale: torch.Tensor) -> None:
        """Start as q(z_t | ·) = N(obs_map x_t, diag scale²): the latent read off the observation.

        Needs the identity encoder, whose output is x_t itself.

        :param obs_map: ``(Z, X)``; :param scale: ``(Z,)``.
        """
        if not isinstance(self.encoder, IdentityEncoder):
            raise ValueError(
                f"encoder: reading z_t off x_t needs the identity encoder, got {type(self.encoder).__name__}"
            )
        Z, R = self.latent_dim, self.rnn.hidden_size
        weight = torch.zeros(Z, self.combiner.linear.in_features)  # [z_{t-1}, h_t, x_t, ...]
        weight[:, Z + R : Z + R + self.obs_dim] = obs_map
        self.combiner.init_linear(weight, torch.zeros(Z), scale)

    def forward(self, obs, actions, mask=None, **_):
        """The Pyro guide; takes the model's arguments. :returns: ``(B, T, Z)``.

        Keyword arguments of the model (``horizon``, ``future_actions``) are
        ignored: steps past the data are left to the model's prior.
        """
        obs, actions, mask = self.check_inputs(obs, actions, mask)
        B, T = mask.shape
        register_module(self.name, self)
        self.sample_globals(B)
        a_feat = self.action_space.features(actions, obs.dtype)  # (B, T, A)
        # unbind, not c[:, t : t + 1]: the backward of each slice would zero a gradient of all of c.
        context = self.context(obs, a_feat, mask).unsqueeze(2).unbind(1)  # T × (B, 1, C)
        weights = self.step_weights()
        z = [self.initial_latent(B).unsqueeze(1)]  # (B, 1, Z)
        with pyro.plate("episodes", B, dim=-2):
            for t in pyro.markov(range(T)):
                q_t = self.step(z[-1], context[t], weights)  # batch (..., B, 1), event (Z,)
                z.append(pyro.sample(f"z_{t}", q_t.mask(mask[:, t : t + 1])))
        return torch.cat(z[1:], dim=-2)  # (..., B, T, Z)

    def initial_latent(self, batch_size: int) -> torch.Tensor:
        """``(B, Z)``, what stands in for z_{t-1} at the first step: a learned z_0."""
        return self.z_0.expand(batch_size, self.latent_dim)

    def context(self, obs, a_feat, mask) -> torch.Tensor:
        """``(B, T, C)``: what q(z_t | ·) reads besides z_{t-1}, for every t in one call
        (the summaries' part of the combiner's first layers, :meth:`Combiner.project`)."""
        return self.combiner.project(self.summaries(obs, a_feat, mask))

    def step_weights(self) -> tuple[torch.Tensor, ...]:
        """What each :meth:`step` needs of the parameters, cut once per sequence."""
        return self.combiner.step_weights()

    def step_params(self, z_prev, context_t, weights) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(z_t | z_{t-1}, ·), each of z_prev's shape."""
        return self.combiner.loc_scale(z_prev, context_t, weights)

    def step(self, z_prev, context_t, weights) -> dist.TorchDistribution:
        """q(z_t | z_{t-1}, ·): the Normal of :meth:`step_params`, event ``(Z,)``, diagonal
        unless ``covariance="full"``. A full one, or a subclass that returns another
        distribution (the IAF guide), is evaluated by Pyro's traces, not by the batched path."""
        return self.combiner.distribution(*self.step_params(z_prev, context_t, weights), weights)

    def read(self, obs) -> torch.Tensor:
        """e(x_t) for every t, ``(B, T, E)``, with ``input_noise`` added in training mode."""
        e = self.encoder(obs)
        if self.training and self.input_noise:
            e = e + self.input_noise * torch.randn_like(e)
        return e

    def summaries(self, obs, a_feat, mask) -> torch.Tensor:
        """h_t = [GRU(e(x_{≤t}), a_{<t}), e(x_t), a_{t-1}]: ``(B, T, H + E + A)``."""
        a_prev = torch.cat([torch.zeros_like(a_feat[:, :1]), a_feat[:, :-1]], dim=1)  # a_{t-1}
        inputs = torch.cat([self.read(obs), a_prev], dim=-1)  # (B, T, E + A)
        h, _ = self.rnn(inputs)  # (B, T, H)
        return torch.cat([h, inputs], dim=-1)  # (B, T, H + E + A)


class SmoothingGuide(FilterGuide):
    """q(z_t | z_{t-1}, a_{t-1}, x_{t:T}, a_{t:T}): the structured inference of the Deep Markov Model.

    A GRU runs backwards from each episode's last observed step, so h_t sums up
    the present and the future, x_{t:T} and a_{t:T}; the combiner joins it with
    z_{t-1}, which carries the past. Unlike the filter it sees a_t, which π
    emits from z_t, and everything after. Same arguments as
    :class:`FilterGuide`.
    """

    _prefix = "smoothing_guide"
    _action_blocks = 2  # a_t and a_{t-1}

    def summaries(self, obs, a_feat, mask) -> torch.Tensor:
        """h_t = [GRU backwards over (e(x_s), a_s) for s = T_b … t, e(x_t), a_t, a_{t-1}].

        With z_{t-1}, these are the Markov blanket of z_t: a_{t-1} moves z_t's
        prior mean, so the exact posterior depends on it.
        """
        inputs = torch.cat([self.read(obs), a_feat], dim=-1)  # (B, T, E + A)
        reverse = reverse_within(mask)  # (B, T) index of t's mirror inside its episode
        rows = torch.arange(inputs.shape[0], device=inputs.device)[:, None]
        h, _ = self.rnn(inputs[rows, reverse])  # the GRU reads each episode from its end
        a_prev = torch.cat([torch.zeros_like(a_feat[:, :1]), a_feat[:, :-1]], dim=1)
        return torch.cat([h[rows, reverse], inputs, a_prev], dim=-1)  # (B, T, H + X + 2A)


class CategoricalFilterGuide(FilterGuide):
    """q(z_t | z_{t-1}, x_{≤t}, a_{<t}) for a categorical state: G groups of K classes.

    The filter of :class:`FilterGuide` (the same GRU over the encoded observations and the
    actions), whose step is a :class:`~pyro_worldmodel.model.components.CategoricalCombiner`:
    logits = MLP([z_{t-1}, h_t]), straight-through samples, the uniform mix ``unimix``.
    Its KL to the model's categorical prior is analytic at every step. It is trained on
    Pyro's traces (its steps are not Normals).

    :param latent_classes: K, supplied by :func:`~pyro_worldmodel.build` from the init's ``classes``.
    :param unimix: u of the uniform mix; :param straight_through: as
        :class:`~pyro_worldmodel.model.components.GroupedOneHot`'s.
    The other arguments are :class:`FilterGuide`'s.
    """

    _prefix = "categorical_filter_guide"

    def __init__(
        self,
        obs_dim: int,
        action_space: ActionSpace,
        latent_dim: int,
        latent_classes: int,
        rnn_dim: int = 64,
        hidden: Sequence[int] = (64,),
        *,
        encoder: nn.Module | None = None,
        name: str | None = None,
        unimix: float = 0.01,
        straight_through: bool = True,
        input_noise: float = 0.0,
    ):
        super().__init__(
            obs_dim,
            action_space,
            latent_dim,
            rnn_dim,
            hidden,
            encoder=encoder,
            name=name,
            input_noise=input_noise,
        )
        summary = self.combiner.summary_dim
        self.combiner = CategoricalCombiner(
            latent_dim, summary, latent_classes, hidden, unimix, straight_through
        )
        self.latent_classes = self.combiner.latent_classes
        self.unimix, self.straight_through = self.combiner.unimix, self.combiner.straight_through
        del self.min_scale, self.covariance

    @classmethod
    def for_model(cls, model, **kwargs) -> CategoricalFilterGuide:
        """A filter whose sizes and classes match ``model``'s."""
        guide = cls(model.obs_dim, model.action_space, model.latent_dim, model.latent_classes, **kwargs)
        guide.attach_globals(model)
        return guide

    def init_reading(self, obs_map, scale) -> None:
        raise ValueError("init_reading: a categorical state is not read off x_t by a linear map")

    def step_params(self, z_prev, context_t, weights):
        raise NotImplementedError("a categorical step has logits, not a loc and a scale: use step()")

    def step(self, z_prev, context_t, weights) -> dist.TorchDistribution:
        """q(z_t | z_{t-1}, ·): :class:`~pyro_worldmodel.model.components.GroupedOneHot`, event ``(Z,)``."""
        return self.combiner.step(z_prev, context_t, weights)


class IAFFilterGuide(FilterGuide):
    """q(z_t | z_{t-1}, x_{≤t}, a_{<t}): the filter with normalising-flow (IAF) layers on top.

    z_t = f_K ∘ … ∘ f_1(ε), ε ~ N(loc_t, diag scale_t²): the
    :class:`FilterGuide`'s combiner gives the diagonal Normal base, and K
    affine autoregressive transforms f_k(x) = μ_k(x) + σ_k(x) ⊙ x (inverse
    autoregressive flow, Kingma et al. 2016), shared across time, map its
    samples, so q(z_t | ·) can correlate the dimensions of z_t; as in Pyro's
    Deep Markov Model example. Sampling is reparameterised, and log q of a
    sampled z_t is read from the transforms' caches: each step gets
    transforms of its own that share the networks, and so the parameters.
    Successive IAFs read the dimensions in reversed orders.

    Each IAF starts as the identity: the last layer of its
    :class:`~pyro.nn.AutoRegressiveNN` is zero, so μ = 0 and log σ = 0.
    Untrained, this guide is then exactly the filter with the same GRU and
    combiner, whose parameter names it keeps, adding ``iafs.k.*``.

    There is no analytic KL(q ‖ p) for a flow: ``TraceMeanField_ELBO``
    estimates every KL term by Monte Carlo and warns
    (:class:`~pyro_worldmodel.infer.elbos.MonteCarloKLWarning`; pass
    ``monte_carlo_kl="allow"`` to declare it), which is then ``Trace_ELBO``'s bound.

    Arguments as in :class:`FilterGuide`, with ``latent_dim`` at least 2 (on
    one dimension an IAF is an affine map, which the combiner already is), and:

    :param num_iafs: K, the number of IAF layers.
    :param iaf_hidden: hidden widths of each IAF's autoregressive network,
        each at least ``latent_dim``.
    """

    _prefix = "iaf_filter_guide"

    def __init__(
        self,
        obs_dim: int,
        action_space: ActionSpace,
        latent_dim: int,
        rnn_dim: int = 64,
        hidden: Sequence[int] = (64,),
        num_iafs: int = 2,
        iaf_hidden: Sequence[int] = (64,),
        *,
        encoder: nn.Module | None = None,
        name: str | None = None,
    ):
        if not isinstance(num_iafs, int) or isinstance(num_iafs, bool) or num_iafs < 1:
            raise ValueError(f"num_iafs: expected an int >= 1, got {num_iafs!r}")
        if not isinstance(latent_dim, int) or isinstance(latent_dim, bool) or latent_dim < 2:
            raise ValueError(f"latent_dim: expected an int >= 2 for an IAF guide, got {latent_dim!r}")
        iaf_hidden = tuple(iaf_hidden)
        if not iaf_hidden or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= latent_dim for h in iaf_hidden
        ):
            raise ValueError(
                f"iaf_hidden: expected a non-empty sequence of ints >= latent_dim={latent_dim}, got {iaf_hidden!r}"
            )
        super().__init__(obs_dim, action_space, latent_dim, rnn_dim, hidden, encoder=encoder, name=name)
        self.num_iafs = num_iafs
        self.iaf_hidden = iaf_hidden
        order = torch.arange(latent_dim)
        self.iafs = nn.ModuleList(
            _IAF(
                AutoRegressiveNN(
                    latent_dim, list(iaf_hidden), permutation=order if k % 2 == 0 else order.flip(0)
                )
            )
            for k in range(num_iafs)
        )
        with torch.no_grad():
            for iaf in self.iafs:
                iaf.arn.layers[-1].weight.zero_()  # mean = 0, log-scale = 0: y = x
                iaf.arn.layers[-1].bias.zero_()

    def step(self, z_prev, context_t, weights) -> dist.TorchDistribution:
        """The combiner's Normal pushed through the IAFs; event ``(Z,)`` already, so no ``to_event``."""
        base = super().step(z_prev, context_t, weights)
        return dist.TransformedDistribution(base, [iaf.fresh() for iaf in self.iafs])


class _IAF(AffineAutoregressive):
    """Pyro's affine autoregressive transform y = μ(x) + σ(x) ⊙ x, for a guide that reuses it at every step."""

    def fresh(self) -> _IAF:
        """This transform's network, so its parameters, with a cache of its own.

        Shared across time, one transform would cache only the last step's
        sample, and log q of every earlier z_t would need an inversion of
        Z sequential network calls.
        """
        return _IAF(self.arn, self.log_scale_min_clip, self.log_scale_max_clip)

    def _inverse(self, y):
        """x from y, one dimension at a time in the network's order.

        As Pyro's, but started from zeros of y's dtype: Pyro 1.9.2 starts from
        float32 zeros, which a float64 network refuses.
        """
        x = [y.new_zeros(y.shape[:-1])] * y.shape[-1]
        for idx in self.arn.permutation.tolist():
            mean, log_scale = self.arn(torch.stack(x, dim=-1))  # (..., Z) each
            log_scale = clamp_preserve_gradients(log_scale, self.log_scale_min_clip, self.log_scale_max_clip)
            x[idx] = (y[..., idx] - mean[..., idx]) * torch.exp(-log_scale[..., idx])
        # The last dimension in order feeds no output, so this log-scale is final.
        self._cached_log_scale = log_scale
        return torch.stack(x, dim=-1)


def reverse_within(mask) -> torch.Tensor:
    """For each row, t ↦ L - 1 - t inside the episode (length L) and t ↦ t in the padding."""
    T = mask.shape[1]
    t = torch.arange(T, device=mask.device)
    L = mask.sum(1, keepdim=True)
    return torch.where(t < L, L - 1 - t, t)


class MeanFieldGuide(DrawsGlobals, ChecksInputs, nn.Module):
    """q(z_t | x_t), independent across time: an encoder of each observation alone.

    The weakest guide here: it ignores the dynamics, actions and every other
    step. Useful as a baseline for the filter and the smoother. Its steps are
    :meth:`step` on :meth:`context`, as the filter's.

    :param hidden: widths of the MLP on e(x_t).
    :param min_scale: the floor of q(z_t | x_t)'s scale: a float or ``"learned"``, as the filter's.
    :param encoder: what the guide reads of each x_t; the identity by default.
    """

    def __init__(
        self,
        obs_dim: int,
        action_space: ActionSpace,
        latent_dim: int,
        hidden: Sequence[int] = (64,),
        *,
        encoder: nn.Module | None = None,
        name: str | None = None,
        min_scale: float | Literal["learned"] = 1e-3,
    ):
        super().__init__()
        self.obs_dim = obs_dim
        self.action_space = action_space
        self.latent_dim = latent_dim
        self.hidden = tuple(hidden)
        self.encoder = _encoder(encoder, obs_dim)
        self.net = mlp(self.encoder.out_dim, self.hidden, 2 * latent_dim)
        self.scale_map = ScaleMap(latent_dim, min_scale)
        self.min_scale = self.scale_map.min_scale
        self.name = unique_name("mean_field_guide", name)

    @classmethod
    def for_model(cls, model, **kwargs) -> MeanFieldGuide:
        guide = cls(model.obs_dim, model.action_space, model.latent_dim, **kwargs)
        guide.attach_globals(model)
        return guide

    def forward(self, obs, actions, mask=None, **_):
        """The Pyro guide; takes the model's arguments. :returns: ``(B, T, Z)``."""
        obs, actions, mask = self.check_inputs(obs, actions, mask)
        B, T = mask.shape
        register_module(self.name, self)
        self.sample_globals(B)
        a_feat = self.action_space.features(actions, obs.dtype)
        context = self.context(obs, a_feat, mask).unsqueeze(2).unbind(1)  # T × (B, 1, 2Z)
        weights = self.step_weights()
        z = [self.initial_latent(B).unsqueeze(1)]
        with pyro.plate("episodes", B, dim=-2):
            for t in pyro.markov(range(T)):
                q_t = self.step(z[-1], context[t], weights)
                z.append(pyro.sample(f"z_{t}", q_t.mask(mask[:, t : t + 1])))
        shape = torch.broadcast_shapes(*(zt.shape for zt in z[1:]))
        return torch.cat([zt.expand(shape) for zt in z[1:]], dim=-2)

    def initial_latent(self, batch_size: int) -> torch.Tensor:
        """``(B, Z)`` zeros: q(z_t | x_t) reads no z_{t-1}."""
        return self.net[-1].bias.new_zeros(batch_size, self.latent_dim)

    def context(self, obs, a_feat, mask) -> torch.Tensor:
        """``(B, T, 2Z)``: the raw loc and scale of every q(z_t | x_t), in one call."""
        return self.net(self.encoder(obs))

    def step_weights(self) -> tuple:
        return ()

    def step_params(self, z_prev, context_t, weights) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(z_t | x_t); ``z_prev`` is not read."""
        loc, raw_scale = context_t.chunk(2, dim=-1)
        return loc, self.scale_map(raw_scale)

    def step(self, z_prev, context_t, weights) -> dist.TorchDistribution:
        return dist.Normal(*self.step_params(z_prev, context_t, weights)).to_event(1)


def _encoder(encoder, obs_dim: int) -> nn.Module:
    if encoder is None:
        return IdentityEncoder(obs_dim)
    if not isinstance(encoder, nn.Module) or not isinstance(getattr(encoder, "out_dim", None), int):
        raise ValueError(f"encoder: expected an nn.Module with an int out_dim, got {type(encoder).__name__}")
    if getattr(encoder, "obs_dim", obs_dim) != obs_dim:
        raise ValueError(f"encoder: expected one for obs_dim={obs_dim}, got obs_dim={encoder.obs_dim}")
    return encoder
