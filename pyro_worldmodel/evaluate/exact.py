"""Linear-Gaussian state-space models with an exact log-likelihood.

They anchor the tests: at the true parameters every ELBO must lie below
:meth:`LinearGaussianSSM.log_prob`, and IWAE must approach it as K grows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pyro.distributions as dist
import torch

from ..infer.training import check_positive
from ..model.components import (
    LearnedGaussianInit,
    LinearGaussianEmission,
    LinearGaussianPolicy,
    LinearGaussianTransition,
)
from ..model.world_model import WorldModel
from ..spaces import ActionSpace, check_int


@dataclass
class LinearGaussianSSM:
    """A linear-Gaussian world model with actions, in float64::

    z_1     ~ N(init_loc, diag init_scale²)
    x_t     ~ N(H z_t + obs_bias, diag obs_scale²)
    a_t     ~ N(K z_t + act_bias, diag act_scale²)
    z_{t+1} ~ N(F z_t + G a_t + bias, diag trans_scale²)
    """

    init_loc: torch.Tensor  # (Z,)
    init_scale: torch.Tensor  # (Z,)
    F: torch.Tensor  # (Z, Z)
    G: torch.Tensor  # (Z, A)
    bias: torch.Tensor  # (Z,)
    trans_scale: torch.Tensor  # (Z,)
    H: torch.Tensor  # (X, Z)
    obs_bias: torch.Tensor  # (X,)
    obs_scale: torch.Tensor  # (X,)
    K: torch.Tensor  # (A, Z)
    act_bias: torch.Tensor  # (A,)
    act_scale: torch.Tensor  # (A,)

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, torch.as_tensor(getattr(self, f.name), dtype=torch.float64))

    @classmethod
    def random(
        cls,
        latent_dim: int = 4,
        obs_dim: int = 6,
        action_dim: int = 2,
        *,
        seed: int = 0,
        spectral_radius: float = 0.9,
        trans_scale: float = 0.3,
        obs_scale: float = 0.3,
        act_scale: float = 0.5,
    ) -> LinearGaussianSSM:
        """A random stable system: F is a scaled random rotation-like matrix."""
        g = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        Z, X, A = latent_dim, obs_dim, action_dim
        F = randn(Z, Z)
        F = spectral_radius * F / torch.linalg.eigvals(F).abs().max()
        return cls(
            init_loc=torch.zeros(Z),
            init_scale=torch.ones(Z),
            F=F,
            G=0.5 * randn(Z, A),
            bias=0.1 * randn(Z),
            trans_scale=torch.full((Z,), trans_scale),
            H=randn(X, Z) / Z**0.5,
            obs_bias=0.1 * randn(X),
            obs_scale=torch.full((X,), obs_scale),
            K=0.5 * randn(A, Z) / Z**0.5,
            act_bias=torch.zeros(A),
            act_scale=torch.full((A,), act_scale),
        )

    @property
    def latent_dim(self) -> int:
        return self.F.shape[0]

    @property
    def obs_dim(self) -> int:
        return self.H.shape[0]

    @property
    def action_dim(self) -> int:
        return self.K.shape[0]

    def sample(self, num_episodes: int, T: int, *, seed: int = 0):
        """Simulate episodes. :returns: ``obs (B, T, X)``, ``actions (B, T, A)``, ``z (B, T, Z)``."""
        g = torch.Generator().manual_seed(seed)

        def noise(scale):
            return scale * torch.randn(num_episodes, scale.shape[0], generator=g, dtype=torch.float64)

        obs, actions, zs = [], [], []
        z = self.init_loc + noise(self.init_scale)  # (B, Z)
        for _ in range(T):
            x = z @ self.H.T + self.obs_bias + noise(self.obs_scale)
            a = z @ self.K.T + self.act_bias + noise(self.act_scale)
            obs.append(x)
            actions.append(a)
            zs.append(z)
            z = z @ self.F.T + a @ self.G.T + self.bias + noise(self.trans_scale)
        return torch.stack(obs, 1), torch.stack(actions, 1), torch.stack(zs, 1)

    def log_prob(self, obs, actions, mask=None) -> torch.Tensor:
        """Exact log p(x_{1:T}, a_{1:T}) per episode, by Kalman filtering in float64.

        (x_t, a_t) is one joint emission of z_t; a_{t-1} enters the transition
        as a known offset. Pyro's :class:`~pyro.distributions.GaussianHMM` does
        not emit its initial state, so its first transition draws z_1 from the
        initial prior.

        :param mask: ``(B, T)`` bool, each row a prefix of True values.
        :returns: ``(B,)``.
        """
        obs = torch.as_tensor(obs, dtype=torch.float64)
        actions = torch.as_tensor(actions, dtype=torch.float64)
        B, T = obs.shape[:2]
        lengths = _prefix_lengths(mask, B, T)
        out = torch.zeros(B, dtype=torch.float64)  # an empty episode has log p = 0
        for L in lengths.unique().tolist():
            if L == 0:
                continue
            rows = lengths == L
            y = torch.cat([obs[rows, :L], actions[rows, :L]], dim=-1)  # (b, L, X + A)
            out[rows] = self._hmm(actions[rows, :L], L).log_prob(y)
        return out

    def filter(self, obs, actions) -> dist.MultivariateNormal:
        """The Kalman filter's p(z_C | x_{1:C}, a_{1:C}) for the last step C, batch ``(B,)``."""
        obs = torch.as_tensor(obs, dtype=torch.float64)
        actions = torch.as_tensor(actions, dtype=torch.float64)
        y = torch.cat([obs, actions], dim=-1)  # (B, C, X + A)
        return self._hmm(actions, obs.shape[1]).filter(y)

    def forecast(self, obs, actions, future_actions) -> dist.MultivariateNormal:
        """The exact open-loop predictive p(x_{C+h} | x_{1:C}, a_{1:C+h-1}), h = 1 … H.

        :param obs: ``(B, C, X)`` context; :param actions: ``(B, C, A)``.
        :param future_actions: ``(B, H, A)``, the actions at the predicted
            steps; the last one does not affect any prediction.
        :returns: batch ``(B, H)``, event ``(X,)``: each step's marginal.
        """
        future_actions = torch.as_tensor(future_actions, dtype=torch.float64)
        posterior = self.filter(obs, actions)
        m, P = posterior.loc, posterior.covariance_matrix  # (B, Z), (B, Z, Z)
        a_prev = torch.as_tensor(actions, dtype=torch.float64)[:, -1]
        Q, R = torch.diag(self.trans_scale**2), torch.diag(self.obs_scale**2)
        locs, covs = [], []
        for h in range(future_actions.shape[1]):
            m = m @ self.F.T + a_prev @ self.G.T + self.bias
            P = self.F @ P @ self.F.T + Q
            locs.append(m @ self.H.T + self.obs_bias)
            covs.append(self.H @ P @ self.H.T + R)
            a_prev = future_actions[:, h]
        return dist.MultivariateNormal(torch.stack(locs, 1), torch.stack(covs, 1))

    def diagonal_guide_gap(self, T: int) -> float:
        """The least gap log p(x, a) − ELBO, in nats per sequence of ``T`` observed steps, that a
        guide q(z_t | z_{t-1}, x_{1:T}, a_{1:T}) whose factors are diagonal Normals can reach.

        By the chain rule, KL(q ‖ p(z | x, a)) = Σ_t E_q[KL(q(z_t | z_{t-1}) ‖ p(z_t | z_{t-1}, x, a))].
        The exact conditional is a Normal whose precision P_t = Q⁻¹ + Λ_t (the initial
        precision at t = 1) does not depend on the data: Λ_t is the information that
        x_{t:T} and a_{t:T} carry about z_t, from the backward information filter. The best
        diagonal factor has the exact mean and variances 1 / (P_t)_ii, and misses by
        ½ (Σ_i log (P_t)_ii − log det P_t) at every step, whatever z_{t-1}. A guide with a full
        covariance (``covariance="full"``) can reach zero.
        """
        Z = self.latent_dim
        q_inv = torch.diag(self.trans_scale**-2)
        # What x_t and a_t, both emitted by z_t, say about it.
        seen = (
            self.H.T @ torch.diag(self.obs_scale**-2) @ self.H
            + self.K.T @ torch.diag(self.act_scale**-2) @ self.K
        )
        future = torch.zeros(Z, Z, dtype=torch.float64)  # what x_{t+1:T}, a_{t+1:T} say about z_t
        gap = 0.0
        for t in reversed(range(T)):
            info = seen + future
            prior = torch.diag(self.init_scale**-2) if t == 0 else q_inv
            P = prior + info
            gap += 0.5 * float(P.diagonal().log().sum() - torch.logdet(P))
            future = self.F.T @ (q_inv - q_inv @ torch.linalg.solve(q_inv + info, q_inv)) @ self.F
        return gap

    def _hmm(self, actions, L):
        Z = self.latent_dim
        eye = torch.eye(Z, dtype=torch.float64)
        initial = dist.MultivariateNormal(torch.zeros(Z, dtype=torch.float64), eye)  # z_0, unused
        trans_matrix = torch.stack([torch.zeros_like(eye)] + [self.F.T] * (L - 1))  # (L, Z, Z)
        trans_loc = torch.cat(
            [
                self.init_loc.expand(actions.shape[0], 1, Z),
                actions[:, :-1] @ self.G.T + self.bias,  # G a_{t-1} + b
            ],
            dim=1,
        )  # (B, L, Z)
        trans_scale = torch.stack([self.init_scale] + [self.trans_scale] * (L - 1))  # (L, Z)
        trans = dist.MultivariateNormal(trans_loc, scale_tril=torch.diag_embed(trans_scale))
        emit = dist.MultivariateNormal(
            torch.cat([self.obs_bias, self.act_bias]),
            scale_tril=torch.diag(torch.cat([self.obs_scale, self.act_scale])),
        )
        emit_matrix = torch.cat([self.H, self.K]).T  # (Z, X + A), row-vector convention
        return dist.GaussianHMM(initial, trans_matrix, trans, emit_matrix, emit, duration=L)

    @classmethod
    def from_world_model(cls, model: WorldModel) -> LinearGaussianSSM:
        """The system a linear-Gaussian :class:`WorldModel` (as :meth:`world_model` builds it:
        a learned Gaussian init, linear-Gaussian transition, emission and policy) defines,
        e.g. after training, so that its exact log-likelihood can be computed. The
        parameters are the model's (in float64): :meth:`log_prob` is differentiable in them,
        so exact maximum likelihood can optimise it directly.
        """
        from ..model.components import (
            LearnedGaussianInit,
            LinearGaussianEmission,
            LinearGaussianPolicy,
            LinearGaussianTransition,
        )

        for part, expected in (
            (model.init, LearnedGaussianInit),
            (model.transition, LinearGaussianTransition),
            (model.emission, LinearGaussianEmission),
            (model.policy, LinearGaussianPolicy),
        ):
            if not isinstance(part, expected):
                raise ValueError(
                    f"model: expected the linear-Gaussian parts of LinearGaussianSSM.world_model(), got a"
                    f" {type(part).__name__} where a {expected.__name__} belongs"
                )
        i, t, e, p = model.init, model.transition, model.emission, model.policy
        # .double() is the parameter itself in float64, a differentiable copy otherwise
        values = (
            i.loc, i.log_scale.exp(), t.F, t.G, t.bias, t.log_scale.exp(),
            e.H, e.bias, e.log_scale.exp(), p.K, p.bias, p.log_scale.exp(),
        )  # fmt: skip
        return cls(*(v.double() for v in values))

    @property
    def spectral_radius(self) -> float:
        """The largest |eigenvalue| of F: below 1 for stable dynamics."""
        return float(torch.linalg.eigvals(self.F.detach()).abs().max())

    def world_model(self, *, name: str | None = None) -> WorldModel:
        """A float64 :class:`WorldModel` with linear-Gaussian components at these parameters."""
        Z, X, A = self.latent_dim, self.obs_dim, self.action_dim
        model = WorldModel(
            LearnedGaussianInit(Z),
            LinearGaussianTransition(Z, A),
            LinearGaussianEmission(Z, X),
            LinearGaussianPolicy(Z, ActionSpace.box(A)),
            name=name,
        ).double()
        with torch.no_grad():
            model.init.loc.copy_(self.init_loc)
            model.init.log_scale.copy_(self.init_scale.log())
            model.transition.F.copy_(self.F)
            model.transition.G.copy_(self.G)
            model.transition.bias.copy_(self.bias)
            model.transition.log_scale.copy_(self.trans_scale.log())
            model.emission.H.copy_(self.H)
            model.emission.bias.copy_(self.obs_bias)
            model.emission.log_scale.copy_(self.obs_scale.log())
            model.policy.K.copy_(self.K)
            model.policy.bias.copy_(self.act_bias)
            model.policy.log_scale.copy_(self.act_scale.log())
        return model


def maximum_likelihood(
    model: WorldModel,
    obs,
    actions,
    mask=None,
    *,
    num_steps: int = 2000,
    lr: float = 1e-2,
    method: str = "adam",
) -> list[float]:
    """Exact maximum likelihood: Adam on the mean exact −log p(x, a) per sequence of a
    linear-Gaussian :class:`WorldModel` (:meth:`LinearGaussianSSM.from_world_model`), with no
    guide and no bound. On finite data it is the floor a variational recipe is measured
    against: what the data allow, not what the truth scores.

    :param method: ``"adam"``: ``num_steps`` Adam steps at ``lr``; ``"lbfgs"``: one L-BFGS run
        of at most ``num_steps`` iterations with a strong-Wolfe line search (``lr`` its first
        step), usually converged within a few hundred (3 s on a 64 × 40 anchor).
    :returns: the loss (nats per sequence) at each step, or at each L-BFGS evaluation; the
        model's parameters are updated.
    """
    check_int("num_steps", num_steps, 1)
    check_positive("lr", lr)
    if method not in ("adam", "lbfgs"):
        raise ValueError(f"method: expected 'adam' or 'lbfgs', got {method!r}")
    LinearGaussianSSM.from_world_model(model)  # refuses other parts before any step
    losses = []

    def closure():
        optim.zero_grad()
        loss = -LinearGaussianSSM.from_world_model(model).log_prob(obs, actions, mask).mean()
        loss.backward()
        losses.append(loss.item())
        return loss

    if method == "lbfgs":
        optim = torch.optim.LBFGS(
            model.parameters(), lr=lr, max_iter=num_steps, line_search_fn="strong_wolfe"
        )
        optim.step(closure)
    else:
        optim = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(num_steps):
            optim.step(closure)
    return losses


@dataclass
class CategoricalHMM:
    """A hidden Markov model with actions: one categorical state of K values, action-dependent
    transitions, Gaussian observations and a Gaussian policy, in float64::

        z_1     ~ Categorical(mix(softmax(init_logits)))
        x_t     ~ N(H[:, z_t] + obs_bias, diag obs_scale²)
        a_t     ~ N(P[:, z_t] + act_bias, diag act_scale²)
        z_{t+1} ~ Categorical(mix(softmax(W[:, z_t] + V a_t + bias)))

    mix(p) = (1 − unimix)·p + unimix / K. It is the world model that
    :meth:`world_model` builds (a categorical init, a categorical MLP transition without
    hidden layers, linear-Gaussian emission and policy), and :meth:`log_prob` is its exact
    log p(x, a), from Pyro's :class:`~pyro.distributions.DiscreteHMM` with time-varying
    transition logits from the recorded actions: the anchor of the categorical state
    and of :class:`~pyro_worldmodel.infer.TraceEnum_ELBO`.
    """

    init_logits: torch.Tensor  # (K,)
    W: torch.Tensor  # (K, K): W[j, i] the logit of j after i
    V: torch.Tensor  # (K, A)
    bias: torch.Tensor  # (K,)
    H: torch.Tensor  # (X, K)
    obs_bias: torch.Tensor  # (X,)
    obs_scale: torch.Tensor  # (X,)
    P: torch.Tensor  # (A, K)
    act_bias: torch.Tensor  # (A,)
    act_scale: torch.Tensor  # (A,)
    unimix: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            if f.name != "unimix":
                setattr(self, f.name, torch.as_tensor(getattr(self, f.name), dtype=torch.float64))

    @classmethod
    def random(
        cls,
        states: int = 5,
        obs_dim: int = 2,
        action_dim: int = 1,
        *,
        seed: int = 0,
        stay: float = 2.0,
        spread: float = 1.0,
        obs_scale: float = 0.5,
        act_scale: float = 0.5,
        unimix: float = 0.0,
    ) -> CategoricalHMM:
        """Random parameters: each state's observation mean drawn N(0, spread² I), transitions
        that favour staying (``stay`` added to the diagonal's logits) and depend on the action."""
        g = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        K, X, A = states, obs_dim, action_dim
        return cls(
            init_logits=0.5 * randn(K),
            W=randn(K, K) + stay * torch.eye(K, dtype=torch.float64),
            V=randn(K, A),
            bias=0.1 * randn(K),
            H=spread * randn(X, K),
            obs_bias=torch.zeros(X),
            obs_scale=torch.full((X,), obs_scale),
            P=randn(A, K),
            act_bias=torch.zeros(A),
            act_scale=torch.full((A,), act_scale),
            unimix=unimix,
        )

    @classmethod
    def initial_guess(
        cls, obs, actions, states: int, mask=None, *, seed: int = 0, restarts: int = 10, unimix: float = 0.0
    ) -> CategoricalHMM:
        """A start for fitting an HMM to data, as EM is commonly started: the states' means
        (x, a) are the centres of k-means on the steps of the data, every scale the data's
        standard deviation, the initial and transition probabilities uniform (V = 0).

        k-means, in standard units: k-means++ seeds (the first centre a step drawn uniformly,
        each next one drawn with probability proportional to its squared distance from the
        nearest centre so far), Lloyd's iterations, the best of ``restarts`` runs by the sum of
        squared distances. Centres drawn at random, even by k-means++ alone, often start two
        states in one cluster of the data and none in another: a local optimum that gradient
        ascent on the likelihood does not leave (docs/pyro_pitfalls.md).

        :param obs: ``(N, T, X)``; :param actions: ``(N, T, A)``; :param states: K.
        :param mask: ``(N, T)`` bool, True on observed steps (padding is not clustered); all if None.
        :param seed: seeds the k-means draws.
        """
        obs = torch.as_tensor(obs, dtype=torch.float64)
        actions = torch.as_tensor(actions, dtype=torch.float64)
        X, A = obs.shape[-1], actions.shape[-1]
        steps = torch.cat([obs, actions], -1)
        steps = steps.reshape(-1, X + A) if mask is None else steps[torch.as_tensor(mask, dtype=torch.bool)]
        check_int("states", states, 2)
        check_int("restarts", restarts, 1)
        distinct = len(torch.unique(steps, dim=0))
        if states > distinct:
            raise ValueError(
                f"states: expected at most the {distinct} distinct observed steps of the data, got {states}"
            )
        sd = steps.std(0).clamp(min=1e-6)
        means = _k_means(steps / sd, states, restarts, torch.Generator().manual_seed(seed)) * sd  # (K, X + A)
        zeros = torch.zeros
        return cls(
            zeros(states), zeros(states, states), zeros(states, A), zeros(states),
            means[:, :X].T, zeros(X), sd[:X], means[:, X:].T, zeros(A), sd[X:], unimix,
        )  # fmt: skip

    @property
    def states(self) -> int:
        return self.W.shape[0]

    def _log_probs(self, logits):
        """log mix(softmax(logits)) over the last dim."""
        log_p = logits.log_softmax(-1)
        if self.unimix:
            log_p = ((1 - self.unimix) * log_p.exp() + self.unimix / self.states).log()
        return log_p

    def sample(self, num_episodes: int, T: int, *, seed: int = 0):
        """Simulate episodes. :returns: ``obs (B, T, X)``, ``actions (B, T, A)``, ``z (B, T)`` integers."""
        g = torch.Generator().manual_seed(seed)

        def noise(scale):
            return scale * torch.randn(num_episodes, scale.shape[0], generator=g, dtype=torch.float64)

        def draw(log_p):
            return torch.multinomial(log_p.exp(), 1, generator=g).squeeze(-1)

        obs, actions, zs = [], [], []
        z = draw(self._log_probs(self.init_logits).expand(num_episodes, -1))  # (B,)
        for _ in range(T):
            x = self.H.T[z] + self.obs_bias + noise(self.obs_scale)
            a = self.P.T[z] + self.act_bias + noise(self.act_scale)
            obs.append(x)
            actions.append(a)
            zs.append(z)
            z = draw(self._log_probs(self.W.T[z] + a @ self.V.T + self.bias))
        return torch.stack(obs, 1), torch.stack(actions, 1), torch.stack(zs, 1)

    def log_prob(self, obs, actions, mask=None) -> torch.Tensor:
        """Exact log p(x_{1:T}, a_{1:T}) per episode, by the forward algorithm of
        :class:`~pyro.distributions.DiscreteHMM`, in float64.

        (x_t, a_t) is one joint Gaussian emission of z_t. The DiscreteHMM's first
        transition draws z_1: its logits are the init's, from every state.

        :param mask: ``(B, T)`` bool, each row a prefix of True values.
        :returns: ``(B,)``.
        """
        obs = torch.as_tensor(obs, dtype=torch.float64)
        actions = torch.as_tensor(actions, dtype=torch.float64)
        lengths = _prefix_lengths(mask, *obs.shape[:2])
        out = torch.zeros(obs.shape[0], dtype=torch.float64)  # an empty episode has log p = 0
        K = self.states
        emit = dist.Normal(
            torch.cat([self.H.T + self.obs_bias, self.P.T + self.act_bias], -1),  # (K, X + A)
            torch.cat([self.obs_scale, self.act_scale]),
        ).to_event(1)
        for L in lengths.unique().tolist():
            if L == 0:
                continue
            rows = lengths == L
            a = actions[rows, :L]
            first = self._log_probs(self.init_logits).expand(a.shape[0], 1, K, K)
            # from state i after a_{t-1}: logits W[:, i] + V a_{t-1} + bias, (b, L - 1, K, K)
            later = self._log_probs(self.W.T + (a[:, :-1] @ self.V.T + self.bias)[:, :, None, :])
            trans = torch.cat([first, later], dim=1)  # (b, L, K, K)
            hmm = dist.DiscreteHMM(torch.zeros(K, dtype=torch.float64), trans, emit, duration=L)
            out[rows] = hmm.log_prob(torch.cat([obs[rows, :L], a], -1))
        return out

    @classmethod
    def from_world_model(cls, model: WorldModel) -> CategoricalHMM:
        """The HMM a :class:`WorldModel` with :meth:`world_model`'s parts defines, e.g. after
        training, so that its exact log-likelihood can be computed (differentiably in
        the model's parameters)."""
        from ..model.components import CategoricalInit, CategoricalMLPTransition

        if model.reward is not None or model.continuation is not None:
            raise ValueError(
                "model: expected no reward or continue head: the HMM's log p(x, a) has no r_t or c_t, got"
                f" {', '.join(type(h).__name__ for h in (model.reward, model.continuation) if h is not None)}"
            )
        for part, expected in (
            (model.init, CategoricalInit),
            (model.transition, CategoricalMLPTransition),
            (model.emission, LinearGaussianEmission),
            (model.policy, LinearGaussianPolicy),
        ):
            if not isinstance(part, expected):
                raise ValueError(
                    f"model: expected the parts of CategoricalHMM.world_model(), got a"
                    f" {type(part).__name__} where a {expected.__name__} belongs"
                )
        i, t, e, p = model.init, model.transition, model.emission, model.policy
        K = model.latent_dim
        if i.classes != K or t.hidden or i.unimix != t.unimix:
            raise ValueError(
                "model: expected one categorical (latent_dim = classes), a transition without hidden"
                f" layers and one unimix, got latent_dim {K}, classes {i.classes}, hidden {list(t.hidden)},"
                f" unimix {i.unimix} and {t.unimix}"
            )
        layer = t.net[0]
        return cls(
            i.logits.double(), layer.weight[:, :K].double(), layer.weight[:, K:].double(),
            layer.bias.double(), e.H.double(), e.bias.double(), e.log_scale.exp().double(),
            p.K.double(), p.bias.double(), p.log_scale.exp().double(), i.unimix,
        )  # fmt: skip

    def world_model(self, *, name: str | None = None) -> WorldModel:
        """A float64 :class:`WorldModel` at these parameters."""
        from ..model.components import CategoricalInit, CategoricalMLPTransition

        K, X, A = self.states, self.H.shape[0], self.P.shape[0]
        model = WorldModel(
            CategoricalInit(K, classes=K, unimix=self.unimix),
            CategoricalMLPTransition(K, A, K, hidden=(), unimix=self.unimix),
            LinearGaussianEmission(K, X),
            LinearGaussianPolicy(K, ActionSpace.box(A)),
            name=name,
        ).double()
        with torch.no_grad():
            model.init.logits.copy_(self.init_logits)
            layer = model.transition.net[0]
            layer.weight.copy_(torch.cat([self.W, self.V], 1))
            layer.bias.copy_(self.bias)
            model.emission.H.copy_(self.H)
            model.emission.bias.copy_(self.obs_bias)
            model.emission.log_scale.copy_(self.obs_scale.log())
            model.policy.K.copy_(self.P)
            model.policy.bias.copy_(self.act_bias)
            model.policy.log_scale.copy_(self.act_scale.log())
        return model


def _k_means(points, k: int, restarts: int, generator, iterations: int = 100) -> torch.Tensor:
    """The centres ``(k, D)`` of the best of ``restarts`` runs of k-means (k-means++ seeds, then
    Lloyd's iterations) on ``points`` ``(n, D)``, by the sum of squared distances."""
    best, best_cost = None, float("inf")
    for _ in range(restarts):
        centres = points[torch.randint(len(points), (1,), generator=generator)]
        nearest = ((points - centres[0]) ** 2).sum(-1)
        for _ in range(k - 1):
            pick = torch.multinomial(nearest / nearest.sum(), 1, generator=generator)
            centres = torch.cat([centres, points[pick]])
            nearest = torch.minimum(nearest, ((points - points[pick]) ** 2).sum(-1))
        for _ in range(iterations):
            label = torch.cdist(points, centres).argmin(-1)
            moved = torch.stack(
                [points[label == j].mean(0) if (label == j).any() else centres[j] for j in range(k)]
            )
            if torch.equal(moved, centres):
                break
            centres = moved
        cost = float(torch.cdist(points, centres).min(-1).values.pow(2).sum())
        if cost < best_cost:
            best, best_cost = centres, cost
    return best


def _prefix_lengths(mask, B: int, T: int) -> torch.Tensor:
    """Each row's length, ``(B,)``, from a mask whose rows are prefixes of True values."""
    if mask is None:
        return torch.full((B,), T)
    mask = torch.as_tensor(mask, dtype=torch.bool)
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(T) < lengths[:, None]):
        raise ValueError("mask: expected each row to be a prefix of True values")
    return lengths
