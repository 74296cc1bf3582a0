"""Transition priors p(z_{t+1} | z_t, a_t)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .nets import (
    GainedParameter,
    LearnedDF,
    ScaleMap,
    cat_batched,
    check_dim,
    check_hidden,
    mlp,
    set_linear_gaussian,
)


class GaussianMLPTransition(nn.Module):
    """p(z_{t+1} | z_t, a_t) = N(z_t + W[z_t, a_t] + f(z_t, a_t), diag σ(z_t, a_t)²).

    The mean is residual with a linear path: random-policy data is close to
    linear, and an MLP alone, trained briefly, does not reach least squares.
    The linear path and the MLP's last layer start at zero, so an untrained
    transition is a random walk.

    :param min_scale: σ's floor: a float, or ``"learned"`` (the default) for one per latent
        dimension, started at 1e-3 and lowered by training where the bound gains
        (:class:`~pyro_worldmodel.model.components.nets.ScaleMap`).
    """

    def __init__(
        self,
        latent_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (64, 64),
        min_scale: float | Literal["learned"] = "learned",
    ):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.action_dim = check_dim("action_dim", action_dim)
        self.hidden = check_hidden(hidden)
        self.scale_map = ScaleMap(latent_dim, min_scale)
        self.min_scale = self.scale_map.min_scale
        self.linear = nn.Linear(latent_dim + action_dim, latent_dim)
        self.net = mlp(latent_dim + action_dim, self.hidden, 2 * latent_dim)
        for layer in (self.linear, self.net[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z_prev: torch.Tensor, a_prev: torch.Tensor) -> dist.Distribution:
        """:param z_prev: ``(..., Z)``; :param a_prev: ``(..., A)`` action features."""
        u = cat_batched(z_prev, a_prev)  # (..., Z + A)
        delta, raw_scale = self.net(u).chunk(2, dim=-1)  # (..., Z) each
        loc = z_prev + self.linear(u) + delta
        return dist.Normal(loc, self.scale_map(raw_scale)).to_event(1)

    def init_linear(self, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> None:
        """Start as the linear-Gaussian N(weight [z, a] + bias, diag scale²), the MLP at zero.

        :param weight: ``(Z, Z + A)``; :param bias: ``(Z,)``; :param scale: ``(Z,)``.
        """
        eye = torch.eye(self.latent_dim, self.latent_dim + self.action_dim)  # the residual z
        set_linear_gaussian(self.linear, self.net[-1], weight - eye, bias, scale, self.scale_map.start())


class EnsembleTransition(nn.Module):
    """A PETS-style ensemble of K Gaussian MLP transitions (Chua et al., 2018), one dynamics
    per imagined future.

    Member k gives p(z_{t+1} | z_t, a_t) for the rows k, k + K, k + 2K, … of the leading
    batch dimension of its input, whatever that dimension is:

    - in training, the episodes of a minibatch: each member learns from its share of
      every (random) minibatch, which keeps the members apart as bootstrapping does;
    - in imagination (:func:`~pyro_worldmodel.evaluate.imagine`, vectorised), the S
      futures: future s follows member s mod K from the context to the horizon, so the
      spread of the futures holds the members' disagreement, the model's epistemic
      uncertainty, beside each member's own noise (with ``parallel=False`` the leading
      dimension is the episodes, and all the futures of an episode follow one member);
    - in a planner, the candidates (:class:`~pyro_worldmodel.act.CEMPlanner` scores each
      under one member, or under every member with ``epistemic``).

    Each episode is thus modelled by one member, and the ELBO is that model's bound.
    Held-out terms (:func:`~pyro_worldmodel.elbo_terms`) score every episode under every
    member, and the IWAE's particle k takes member k mod K: both then concern the
    members' equal mixture, whatever the order of the episodes.
    The members start alike from a linear warm start (their MLPs' hidden layers are
    initialised apart) and differ by what they learn.

    :param members: K ≥ 1.
    The other arguments are :class:`GaussianMLPTransition`'s, for every member.
    """

    def __init__(
        self,
        latent_dim: int,
        action_dim: int,
        members: int = 5,
        hidden: Sequence[int] = (64, 64),
        min_scale: float | Literal["learned"] = "learned",
    ):
        super().__init__()
        self.members = check_dim("members", members)
        self.member = nn.ModuleList(
            GaussianMLPTransition(latent_dim, action_dim, hidden, min_scale) for _ in range(members)
        )
        self.latent_dim, self.action_dim = latent_dim, action_dim
        self.hidden, self.min_scale = self.member[0].hidden, self.member[0].min_scale

    def forward(self, z_prev: torch.Tensor, a_prev: torch.Tensor) -> dist.Distribution:
        """:param z_prev: ``(..., Z)``; :param a_prev: ``(..., A)`` action features."""
        shape = torch.broadcast_shapes(z_prev.shape[:-1], a_prev.shape[:-1])
        if not shape:  # one state: the first member
            return self.member[0](z_prev, a_prev)
        z = z_prev.expand(*shape, self.latent_dim)
        a = a_prev.expand(*shape, a_prev.shape[-1])
        K, n = self.members, shape[0]
        if n == 1 or K == 1:
            return self.member[0](z, a)
        loc, scale = z.new_empty(z.shape), z.new_empty(z.shape)
        for k in range(min(K, n)):
            d = self.member[k](z[k::K], a[k::K]).base_dist
            loc[k::K], scale[k::K] = d.loc, d.scale
        return dist.Normal(loc, scale).to_event(1)

    def init_linear(self, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> None:
        """Start every member as :meth:`GaussianMLPTransition.init_linear` starts one."""
        for member in self.member:
            member.init_linear(weight, bias, scale)


# The site of a Bayesian transition's weights, in the model (their prior) and in the guide
# (their posterior). Marked ``infer={"global": True}``: one draw serves every episode.
WEIGHTS_SITE = "transition_weights"


def is_global(site) -> bool:
    """Whether a trace's sample site is a global latent (a Bayesian transition's weights),
    drawn once for all the episodes rather than per episode and step."""
    return bool(site.get("infer", {}).get("global", False))


class BayesianMLPTransition(GaussianMLPTransition):
    """The Gaussian MLP transition whose output weights carry a prior and a posterior:
    a dynamics θ per imagined future (Bayes by backprop, Blundell et al., 2015).

    θ is the linear path and the last layer of the MLP (the mean's residual and the
    scale), the weights that map the MLP's features to the next state; the hidden
    layers stay point estimates, features learned by maximum likelihood, as in a
    Bayesian last layer. Then

        θ ~ N(0, prior_scale² I),   p(z_{t+1} | z_t, a_t, θ) as in :class:`GaussianMLPTransition`,

    and the guide's posterior over θ is the mean-field Normal q(θ) = N(μ, diag σ²), μ the
    layers' weights (a warm start sets them as for the MLP transition) and log σ a learned
    vector stored divided by a gain, as the emission's scale is.

    In the Pyro programs θ is the sample site ``transition_weights``: :meth:`sampled` draws it
    once per run of the model, from the prior (the guide's draw replayed), for every
    episode, and the guide draws it from q with :meth:`guide_weights`; the guides of
    :func:`~pyro_worldmodel.build` do so for a model that has this transition
    (:meth:`FilterGuide.attach_globals <pyro_worldmodel.model.guides.FilterGuide.attach_globals>`).
    Its KL enters the bound once per data set: scaled by B / N for a minibatch of B of
    ``num_episodes`` N episodes (:func:`~pyro_worldmodel.fit` sets N). Under vectorised
    imagination (:func:`~pyro_worldmodel.evaluate.imagine`) each of the S futures has its
    own θ; held-out bounds average over q(θ) without its KL (the posterior predictive).

    Outside the Pyro programs (the planners), the transition follows ``draws`` fixed draws
    θ_k = μ + σ ε_k from q, row k mod K of the leading batch dimension under draw k, as an
    :class:`EnsembleTransition`'s members do; ``members`` is K, so the planners' epistemic
    weights use these draws, and :meth:`resample` draws new ε_k.

    :param prior_scale: the prior's standard deviation of each weight.
    :param posterior_scale: σ at the start.
    :param draws: K, the fixed posterior draws the planners use.
    The other arguments are :class:`GaussianMLPTransition`'s.
    """

    def __init__(
        self,
        latent_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (64, 64),
        min_scale: float | Literal["learned"] = "learned",
        prior_scale: float = 1.0,
        posterior_scale: float = 1e-4,
        draws: int = 5,
        scale_gain: float = 30.0,
    ):
        super().__init__(latent_dim, action_dim, hidden, min_scale)
        for arg, value in (("prior_scale", prior_scale), ("posterior_scale", posterior_scale)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"{arg}: expected a finite float > 0, got {value!r}")
        self.prior_scale, self.posterior_scale = float(prior_scale), float(posterior_scale)
        self.members = check_dim("draws", draws)
        self.draws = self.members
        self._layers = (self.linear, self.net[-1])
        self.num_weights = sum(layer.weight.numel() + layer.bias.numel() for layer in self._layers)
        self.weight_log_scale = GainedParameter(self.num_weights, scale_gain)
        self.scale_gain = self.weight_log_scale.gain
        self.weight_log_scale.set(torch.full((self.num_weights,), float(torch.tensor(posterior_scale).log())))
        self.register_buffer("num_episodes", torch.tensor(0))  # N; 0: the KL unscaled
        self.register_buffer("noise", torch.randn(self.members, self.num_weights))  # ε_k
        self._theta = None

    # ------------------------------------------------------------- θ's distributions

    def weight_loc(self) -> torch.Tensor:
        """μ, ``(P,)``: the layers' weights and biases, flattened."""
        return torch.cat([t.reshape(-1) for layer in self._layers for t in (layer.weight, layer.bias)])

    def posterior(self) -> dist.Distribution:
        """q(θ) = N(μ, diag σ²), event ``(P,)``."""
        return dist.Normal(self.weight_loc(), self.weight_log_scale().exp()).to_event(1)

    def prior(self) -> dist.Distribution:
        """p(θ) = N(0, prior_scale² I), event ``(P,)``."""
        loc = self.weight_loc().detach().new_zeros(self.num_weights)
        return dist.Normal(loc, loc.new_full((self.num_weights,), self.prior_scale)).to_event(1)

    def kl_scale(self, batch_size: int) -> float:
        """B / N, the share of θ's KL a minibatch of B episodes carries (1 while N is unset)."""
        n = int(self.num_episodes)
        return batch_size / n if n else 1.0

    @contextmanager
    def sampled(self, batch_size: int):
        """In the model: draw θ at the site ``transition_weights`` from the prior (scaled by
        :meth:`kl_scale`), and step with it inside the block."""
        with poutine.scale(scale=self.kl_scale(batch_size)):
            theta = pyro.sample(WEIGHTS_SITE, self.prior(), infer={"global": True})
        with self.using(theta):
            yield theta

    def guide_weights(self, batch_size: int) -> torch.Tensor:
        """In the guide: draw θ ~ q(θ) at the site ``transition_weights``."""
        with poutine.scale(scale=self.kl_scale(batch_size)):
            return pyro.sample(WEIGHTS_SITE, self.posterior(), infer={"global": True})

    @contextmanager
    def using(self, theta: torch.Tensor):
        """Step with the weights ``theta``, ``(..., P)``, inside the block: leading dims
        broadcast against the inputs' batch dims (one θ per imagined future)."""
        previous, self._theta = self._theta, theta
        try:
            yield theta
        finally:
            self._theta = previous

    @torch.no_grad()
    def resample(self) -> None:
        """Draw new ε_k for the fixed draws the planners follow."""
        self.noise.normal_()

    # ------------------------------------------------------------- the dynamics

    def forward(self, z_prev: torch.Tensor, a_prev: torch.Tensor) -> dist.Distribution:
        """:param z_prev: ``(..., Z)``; :param a_prev: ``(..., A)`` action features."""
        u = cat_batched(z_prev, a_prev)  # (..., Z + A)
        theta = self._theta
        if theta is None:  # outside the programs: row r under the fixed draw r mod K
            draws = self.weight_loc() + self.weight_log_scale().exp() * self.noise.to(u.dtype)  # (K, P)
            if u.dim() == 1:
                theta = draws[0]
            else:
                rows = torch.arange(u.shape[0], device=u.device) % self.members
                theta = draws[rows].reshape(u.shape[0], *([1] * (u.dim() - 2)), self.num_weights)
        w_lin, b_lin, w_head, b_head = self._unflatten(theta)
        features = self.net[:-1](u)  # (..., hidden)
        lin = torch.einsum("...oi,...i->...o", w_lin, u) + b_lin
        out = torch.einsum("...oi,...i->...o", w_head, features) + b_head
        delta, raw_scale = out.chunk(2, dim=-1)  # (..., Z) each
        return dist.Normal(z_prev + lin + delta, self.scale_map(raw_scale)).to_event(1)

    def _unflatten(self, theta):
        """θ ``(..., P)`` as the layers' ``(weight (..., out, in), bias (..., out))``, in order."""
        out, start = [], 0
        for layer in self._layers:
            for t in (layer.weight, layer.bias):
                piece = theta[..., start : start + t.numel()]
                out.append(piece.reshape(*theta.shape[:-1], *t.shape))
                start += t.numel()
        return out


class LinearGaussianTransition(nn.Module):
    """p(z_{t+1} | z_t, a_t) = N(F z_t + G a_t + b, diag(σ²))."""

    def __init__(self, latent_dim: int, action_dim: int):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.action_dim = check_dim("action_dim", action_dim)
        self.F = nn.Parameter(torch.eye(latent_dim))
        self.G = nn.Parameter(torch.zeros(latent_dim, action_dim))
        self.bias = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, z_prev: torch.Tensor, a_prev: torch.Tensor) -> dist.Distribution:
        """:param z_prev: ``(..., Z)``; :param a_prev: ``(..., A)`` action features."""
        loc = z_prev @ self.F.T + a_prev @ self.G.T + self.bias  # (..., Z)
        return dist.Normal(loc, self.log_scale.exp().expand(loc.shape)).to_event(1)


class StudentTMLPTransition(LearnedDF, GaussianMLPTransition):
    """p(z_{t+1} | z_t, a_t) = StudentT(ν, z_t + W[z_t, a_t] + f(z_t, a_t), diag σ(z_t, a_t)), per dimension.

    The Gaussian MLP transition with heavy tails, for dynamics with rare
    large jumps (contacts, resets). Same mean and scale networks.

    No distribution pair with a Normal guide has an analytic KL here, so
    ``TraceMeanField_ELBO`` estimates these KL terms by Monte Carlo, and says so
    (:class:`~pyro_worldmodel.infer.elbos.MonteCarloKLWarning`).

    :param df: ``"learned"`` for a learned ν > 2 per dimension, or a fixed float > 0.
    """

    def __init__(
        self,
        latent_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (64, 64),
        min_scale: float | Literal["learned"] = "learned",
        df: float | str = "learned",
    ):
        super().__init__(latent_dim, action_dim, hidden, min_scale)
        self._init_df(df, latent_dim)

    def forward(self, z_prev: torch.Tensor, a_prev: torch.Tensor) -> dist.Distribution:
        """:param z_prev: ``(..., Z)``; :param a_prev: ``(..., A)`` action features."""
        normal = super().forward(z_prev, a_prev).base_dist
        df = self.degrees_of_freedom().to(normal.loc.dtype).expand(normal.loc.shape)
        return dist.StudentT(df, normal.loc, normal.scale).to_event(1)


class GatedTransition(nn.Module):
    """p(z_{t+1} | z_t, a_t): the gated transition of the Deep Markov Model (Krishnan et al., 2017).

    With u = [z_t, a_t], a gate g(u) ∈ (0, 1)^Z mixes a linear map of u, which
    starts as the identity on z_t, with a nonlinear proposal m(u):

        loc = (1 − g(u)) ⊙ W u + g(u) ⊙ m(u),   scale = softplus(V relu(m(u))) + min_scale.

    As in Pyro's DMM example, the scale is read off the proposal. Actions
    enter both the gate and the proposal, and the linear path.
    """

    def __init__(
        self,
        latent_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (64,),
        min_scale: float | Literal["learned"] = 1e-3,
    ):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.action_dim = check_dim("action_dim", action_dim)
        self.hidden = check_hidden(hidden)
        self.scale_map = ScaleMap(latent_dim, min_scale)
        self.min_scale = self.scale_map.min_scale
        U = latent_dim + action_dim
        self.gate = mlp(U, self.hidden, latent_dim)
        self.proposed_mean = mlp(U, self.hidden, latent_dim)
        self.linear = nn.Linear(U, latent_dim)
        self.scale = nn.Linear(latent_dim, latent_dim)
        with torch.no_grad():  # the linear path starts as z_t, as in the DMM
            self.linear.weight.copy_(torch.eye(latent_dim, U))
            self.linear.bias.zero_()

    def forward(self, z_prev: torch.Tensor, a_prev: torch.Tensor) -> dist.Distribution:
        """:param z_prev: ``(..., Z)``; :param a_prev: ``(..., A)`` action features."""
        u = cat_batched(z_prev, a_prev)  # (..., Z + A)
        gate = torch.sigmoid(self.gate(u))  # (..., Z)
        proposed_mean = self.proposed_mean(u)  # (..., Z)
        loc = (1 - gate) * self.linear(u) + gate * proposed_mean
        scale = self.scale_map(self.scale(torch.relu(proposed_mean)))
        return dist.Normal(loc, scale).to_event(1)


class RSSMTransition(nn.Module):
    """The recurrent state-space transition of PlaNet (Hafner et al., 2019).

    The state has a deterministic part h_t and a stochastic part z_t:

        h_t = GRU(h_{t-1}, e([z_{t-1}, a_{t-1}])),   p(z_t | h_t) = N(μ(h_t), diag σ(h_t)²),

    with h_1 = 0. The deterministic path carries information over many steps
    without sampling noise, so z_t's prior depends on the whole past, not on
    z_{t-1} alone. The emission and the policy read the features [h_t, z_t]
    (size ``deter_dim + latent_dim``); :class:`~pyro_worldmodel.model.WorldModel`
    runs the recurrence. The guide infers z_t only: h_t is a function of the
    z's and a's before it.

    :param deter_dim: D, the size of h_t.
    :param hidden: widths of the input embedding e (its last width is the
        GRU's input) and of the prior's MLP.
    """

    def __init__(
        self,
        latent_dim: int,
        action_dim: int,
        deter_dim: int = 64,
        hidden: Sequence[int] = (64,),
        min_scale: float | Literal["learned"] = 1e-3,
    ):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.action_dim = check_dim("action_dim", action_dim)
        self.deter_dim = check_dim("deter_dim", deter_dim)
        self.hidden = check_hidden(hidden)
        if not self.hidden:
            raise ValueError(f"hidden: expected at least one width for the GRU's input, got {hidden!r}")
        self.scale_map = ScaleMap(latent_dim, min_scale)
        self.min_scale = self.scale_map.min_scale
        self.embed = nn.Sequential(mlp(latent_dim + action_dim, self.hidden[:-1], self.hidden[-1]), nn.ELU())
        self.cell = nn.GRUCell(self.hidden[-1], deter_dim)
        self.prior = mlp(deter_dim, self.hidden, 2 * latent_dim)

    def initial_deter(self, batch_shape, like: torch.Tensor) -> torch.Tensor:
        """h_1 = 0, ``(*batch_shape, D)``."""
        return like.new_zeros(*batch_shape, self.deter_dim)

    def forward(self, z_prev: torch.Tensor, a_prev: torch.Tensor, h_prev: torch.Tensor):
        """One step: ``(p(z_t | h_t), h_t)``.

        :param z_prev: ``(..., Z)``; :param a_prev: ``(..., A)``; :param h_prev: ``(..., D)``.
        """
        e = self.embed(cat_batched(z_prev, a_prev))  # (..., E)
        shape = torch.broadcast_shapes(e.shape[:-1], h_prev.shape[:-1])
        e = e.expand(*shape, e.shape[-1]).reshape(-1, e.shape[-1])  # GRUCell takes (N, ·)
        h_prev = h_prev.expand(*shape, self.deter_dim).reshape(-1, self.deter_dim)
        h = self.cell(e, h_prev).reshape(*shape, self.deter_dim)  # (..., D)
        return self.latent(self.prior(h)), h

    def latent(self, out: torch.Tensor) -> dist.Distribution:
        """p(z_t | h_t) from the prior MLP's output: a diagonal Normal of loc and raw scale."""
        loc, raw_scale = out.chunk(2, dim=-1)  # (..., Z) each
        return dist.Normal(loc, self.scale_map(raw_scale)).to_event(1)
