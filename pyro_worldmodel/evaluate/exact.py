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
        if mask is None:
            lengths = torch.full((B,), T)
        else:
            mask = torch.as_tensor(mask, dtype=torch.bool)
            lengths = mask.sum(1)
            if not torch.equal(mask, torch.arange(T) < lengths[:, None]):
                raise ValueError("mask: expected each row to be a prefix of True values")
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
