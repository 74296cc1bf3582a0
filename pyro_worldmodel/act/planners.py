"""Acting from imagination: planners that choose actions with the world model alone.

A planner starts from the agent's belief about the present, a
:class:`LatentState` the guide filters out of the episode so far
(:func:`belief`), and imagines futures with the model's own transition,
reward head p(r_t | z_t, a_t) and continue head p(c_t | z_t). It never
touches the environment. The value of an imagined future is

    Σ_{k<H} γ^k · Π_{j<k} P(c_j = 1) · E[r_k]

in real reward units (a constant reward, as CartPole's, then counts the
steps the episode is expected to survive). Everything is in model units:
observations, box actions (the box mapped by the normaliser) and latents.

Planners, by name (``planner:`` in a spec, ``--planner`` on the command line):

- ``cem``: :class:`CEMPlanner`, the cross-entropy method over action
  sequences in latent space, model-predictive as in PlaNet;
- ``actor_critic``: :class:`ActorCriticPlanner`, an actor and a critic
  trained on imagined rollouts with λ-returns, as in Dreamer;
- ``policy``: :class:`PolicyPlanner`, the model's own π(a_t | z_t) learned
  by the ELBO (behaviour cloning), the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch import nn

from ..model.components.nets import cat_batched, check_dim, check_hidden, mlp
from ..model.components.policy import TanhToBox
from ..spaces import ActionSpace, check_real


@dataclass
class LatentState:
    """What the agent believes about the present: z_t ``(B, Z)`` and, with a
    recurrent transition, h_t ``(B, D)``."""

    z: torch.Tensor
    h: torch.Tensor | None = None

    @property
    def features(self) -> torch.Tensor:
        """``(B, D + Z)`` [h_t, z_t], or z_t: what the heads and the policy read."""
        return self.z if self.h is None else cat_batched(self.h, self.z)

    def expand(self, n: int) -> LatentState:
        """``n`` copies in front: ``(n, B, ·)``."""
        return LatentState(
            self.z.expand(n, *self.z.shape), None if self.h is None else self.h.expand(n, *self.h.shape)
        )


@torch.no_grad()
def belief(model, guide, obs, actions) -> LatentState:
    """The latent state at the last step of a context, filtered by the guide.

    :param obs: ``(B, C, X)`` observations x_1 … x_C in model units, all observed.
    :param actions: ``(B, C, A)`` (or ``(B, C)``) the actions; the last, a_C, is not
        taken yet and is only a placeholder for guides that read it (a filter reads a_{<t}).
    :returns: z_C drawn from q, and h_C recomputed by the model's recurrence from the
        drawn z_1 … z_{C-1} with a recurrent transition.
    """
    if getattr(guide, "_action_blocks", 1) > 1:
        raise ValueError(
            f"guide: {type(guide).__name__} reads a_t and the future, which an agent that has yet to"
            " act does not have; act with a filter (filter, iaf_filter, categorical_filter) or the"
            " mean-field guide"
        )
    z = guide(obs, actions)  # (B, C, Z)
    h = _deterministic_states(model, z, actions)
    return LatentState(z[:, -1], None if h is None else h[:, -1])


@torch.no_grad()
def posterior_states(model, guide, obs, actions, mask) -> LatentState:
    """Every observed step's latent state, z_t drawn from the guide (and h_t rebuilt):
    ``(n, ·)`` for the n observed steps, starts for imagined rollouts (:meth:`ActorCriticPlanner.update`)."""
    ref = next(model.parameters())
    obs, actions, mask = obs.to(ref), actions.to(ref.device), mask.to(ref.device)
    z = guide(obs, actions, mask)  # (N, T, Z)
    h = _deterministic_states(model, z, actions)
    return LatentState(z[mask], None if h is None else h[mask])


def _deterministic_states(model, z, actions):
    """``(B, T, D)`` h_1 … h_T of a recurrent transition over z_1 … z_{T-1} and a_1 … a_{T-1}
    (None for a Markov one): the model's own recurrence on the guide's draws."""
    if not model.deter_dim:
        return None
    a_feat = model.action_space.features(torch.as_tensor(actions).to(z.device), z.dtype)
    hs = [model.transition.initial_deter((z.shape[0],), z)]  # (B, D) each
    for t in range(1, z.shape[1]):
        hs.append(model.transition(z[:, t - 1], a_feat[:, t - 1], hs[-1])[1])
    return torch.stack(hs, 1)


def _check_heads(model, who: str) -> None:
    if getattr(model, "reward", None) is None:
        raise ValueError(
            f"model: the {who} planner needs a reward head p(r_t | z_t, a_t) to value imagined futures,"
            " and this model has none; give the spec a reward part, e.g. reward: {name: gaussian}"
        )


def imagined_returns(
    model,
    state: LatentState,
    actions: torch.Tensor,
    *,
    discount: float,
    reward_scale=1.0,
    reward_loc=0.0,
    sample: bool = False,
    value=None,
    latents: list | None = None,
):
    """The value of each action sequence from ``state``, imagined with the model alone.

    :param state: batch ``(..., B)``.
    :param actions: ``(..., B, H, A)`` box actions or ``(..., B, H)`` integers, in model units.
    :param discount: γ.
    :param reward_scale, reward_loc: the reward head's units to real ones: r = loc + scale · r̂.
    :param sample: draw z_{t+1} from p(z_{t+1} | ·) instead of taking its mean.
    :param value: optional ``v(features) -> (...)``, the value after the last step.
    :param latents: a list to append z_1 … z_H to, each ``(..., B, Z)``.
    :returns: ``(..., B)`` returns.
    """
    H = actions.shape[-1] if model.action_space.kind == "discrete" else actions.shape[-2]
    a_feat = model.action_space.features(actions, state.z.dtype)  # (..., B, H, A)
    z, h = state.z, state.h
    total = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
    weight = torch.ones_like(total)
    for k in range(H):
        f = model.features(z, h)
        a_k = a_feat[..., k, :]
        r = model.reward(f, a_k).mean * reward_scale + reward_loc
        total = total + weight * r
        if model.continuation is not None:
            weight = weight * model.continuation(f).mean
        weight = weight * discount
        prior, h = model.step(z, a_k, h)
        z = _next_state(prior, sample)
        if latents is not None:
            latents.append(z)
    if value is not None:
        total = total + weight * value(model.features(z, h))
    return total


def resample_dynamics(model) -> None:
    """New posterior draws for a Bayesian transition's rows (:meth:`BayesianMLPTransition.resample
    <pyro_worldmodel.model.components.BayesianMLPTransition.resample>`); nothing for another."""
    resample = getattr(model.transition, "resample", None)
    if resample is not None:
        resample()


def _box_bounds(space: ActionSpace, like: torch.Tensor):
    """``(low, high)`` as tensors like ``like``; None for a side without bounds."""
    low = None if space.low is None else torch.tensor(space.low, dtype=like.dtype, device=like.device)
    high = None if space.high is None else torch.tensor(space.high, dtype=like.dtype, device=like.device)
    return low, high


def box_centre(space: ActionSpace, like: torch.Tensor) -> torch.Tensor:
    """``(A,)``: the middle of the box where both bounds of a dimension are finite, else 0."""
    low, high = _box_bounds(space, like)
    if low is None or high is None:
        return torch.zeros(space.dim, dtype=like.dtype, device=like.device)
    finite = torch.isfinite(low) & torch.isfinite(high)
    return torch.where(finite, (torch.where(finite, low, 0) + torch.where(finite, high, 0)) / 2, 0.0)


def _finite_box(space: ActionSpace, like: torch.Tensor):
    """``(low, high)`` if every bound is finite, else None."""
    low, high = _box_bounds(space, like)
    if low is None or high is None or not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        return None
    return low, high


def clip_to_space(actions: torch.Tensor, space: ActionSpace) -> torch.Tensor:
    """Box actions clamped into the box's finite bounds; discrete ones unchanged."""
    if space.kind != "box":
        return actions
    low, high = _box_bounds(space, actions)
    if low is not None:
        actions = torch.maximum(actions, low)
    if high is not None:
        actions = torch.minimum(actions, high)
    return actions


class CEMPlanner:
    """Model-predictive control by the cross-entropy method in latent space (PlaNet).

    At each step it searches action sequences a_{t:t+H}: it draws ``candidates``
    of them from a diagonal Normal (box actions, clipped into the box) or from
    independent categoricals (discrete actions), imagines each with the model,
    refits the distribution to the ``top_k`` best, and after ``iterations``
    takes the first action of the plan: the refitted mean (box), or the most
    likely first action (discrete). All candidates of all B agents are imagined
    in one batch, on the model's device.

    :param horizon: H, imagined steps per candidate.
    :param candidates: sequences drawn per iteration.
    :param top_k: the elite refitted to.
    :param iterations: rounds of drawing and refitting.
    :param discount: γ of the imagined return.
    :param init_std: the Normal's first standard deviation (box actions, model units).
    :param min_std: its floor.
    :param sample_latents: draw imagined latents instead of following the transition's mean.
    :param terminal_value: add a learned value of the state after the horizon,
        γ^H · Π P(c) · v(z_H), as TD-MPC does: the critic of an
        :class:`ActorCriticPlanner` that :meth:`update` trains in imagination.
        Without it the search sees nothing past H steps.
    :param value_updates: that critic's gradient steps per :meth:`update`.
    :param epistemic: κ, how the model's epistemic uncertainty enters the score, with an
        ensemble transition (:class:`~pyro_worldmodel.model.components.EnsembleTransition`)
        or a Bayesian one (:class:`~pyro_worldmodel.model.components.BayesianMLPTransition`,
        whose K posterior draws, drawn anew at every plan, act as the members):
        0 imagines each candidate under one member (candidate n under member n mod K,
        PETS's sampling of one dynamics per candidate); otherwise under every member, and
        the score is the members' mean return + κ · their standard deviation: κ > 0 is
        optimism (explore where the members disagree), κ < 0 pessimism (avoid it).
    :param explore: β ≥ 0, a bonus for imagined states the members disagree on, with an
        ensemble: β · Σ_k γ^k · d_k, d_k the members' standard deviation of z_k averaged
        over latent dimensions (model units), Plan2Explore's disagreement as an intrinsic
        reward. It drives the agent to what its model does not know yet, where a sparse
        reward (−1 per step until a goal the data never reached) gives no signal.
    :param latent_dim, action_space: filled in by :func:`~pyro_worldmodel.config.build`;
        needed only with ``terminal_value``.
    """

    name = "cem"

    def __init__(
        self,
        horizon: int = 12,
        candidates: int = 500,
        top_k: int = 50,
        iterations: int = 5,
        discount: float = 0.99,
        init_std: float = 1.0,
        min_std: float = 0.05,
        sample_latents: bool = False,
        terminal_value: bool = False,
        value_updates: int = 100,
        epistemic: float = 0.0,
        explore: float = 0.0,
        latent_dim: int | None = None,
        action_space: ActionSpace | None = None,
    ):
        self.epistemic = check_real("epistemic", epistemic)
        self.explore = check_real("explore", explore, low=0.0)
        for arg, v in (
            ("horizon", horizon),
            ("candidates", candidates),
            ("top_k", top_k),
            ("iterations", iterations),
        ):
            check_dim(arg, v)
        if top_k > candidates:
            raise ValueError(f"top_k: expected at most candidates={candidates}, got {top_k}")
        if not 0 < discount <= 1:
            raise ValueError(f"discount: expected a number in (0, 1], got {discount!r}")
        for arg, v in (("init_std", init_std), ("min_std", min_std)):
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{arg}: expected a positive float, got {v!r}")
        self.horizon, self.candidates, self.top_k, self.iterations = horizon, candidates, top_k, iterations
        self.discount, self.init_std, self.min_std = float(discount), float(init_std), float(min_std)
        self.sample_latents = bool(sample_latents)
        self.terminal_value, self.value_updates = bool(terminal_value), value_updates
        self.critic = None
        if self.terminal_value:
            if latent_dim is None or action_space is None:
                raise ValueError(
                    "terminal_value: expected latent_dim and action_space (build() supplies them), got None"
                )
            self.critic = ActorCriticPlanner(latent_dim, action_space, updates=value_updates)

    def training_state(self) -> dict | None:
        """The terminal value's critic and its optimisers (None without ``terminal_value``)."""
        return None if self.critic is None else self.critic.training_state()

    def load_training_state(self, state: dict | None) -> None:
        """Restore what :meth:`training_state` returned."""
        if (state is None) != (self.critic is None):
            raise ValueError(
                f"state: expected {'no' if self.critic is None else 'a'} terminal-value critic's state,"
                f" got {'none' if state is None else 'one'}"
            )
        if self.critic is not None:
            self.critic.load_training_state(state)

    def update(self, model, starts: LatentState, *, reward_scale=1.0, reward_loc=0.0) -> dict | None:
        """Train the terminal value's critic in imagination (nothing without ``terminal_value``)."""
        if self.critic is None:
            return None
        return self.critic.update(model, starts, reward_scale=reward_scale, reward_loc=reward_loc)

    @torch.no_grad()
    def plan(self, model, state: LatentState, *, reward_scale=1.0, reward_loc=0.0) -> torch.Tensor:
        """The next action for each of B states: ``(B, A)`` box or ``(B,)`` integers, model units."""
        _check_heads(model, "'cem'")
        space = model.action_space
        B, N, K, H = state.z.shape[0], self.candidates, self.top_k, self.horizon
        members = 1
        for arg, weight in (("epistemic", self.epistemic), ("explore", self.explore)):
            if weight:
                members = getattr(model.transition, "members", 1)
                if members < 2:
                    raise ValueError(
                        f"{arg}: {weight} weighs the disagreement of an ensemble's members, and the"
                        f" transition is a {type(model.transition).__name__}; use transition:"
                        f" {{name: ensemble}} or {{name: bayesian}}, or {arg}: 0"
                    )
        resample_dynamics(model)
        many = state.expand(N)  # (N, B, ·): candidate n under member n mod K
        if members > 1:
            many = many.expand(members)  # (M, N, B, ·): every candidate under every member
        ref = state.z

        def score(seqs):
            zs = [] if self.explore else None
            returns = imagined_returns(
                model,
                many,
                seqs if members == 1 else seqs.expand(members, *seqs.shape),
                discount=self.discount,
                reward_scale=reward_scale,
                reward_loc=reward_loc,
                sample=self.sample_latents,
                value=None if self.critic is None else self.critic.value,
                latents=zs,
            )  # (N, B), or (M, N, B)
            if members == 1:
                return returns
            out = returns.mean(0) + self.epistemic * returns.std(0, unbiased=False)
            if self.explore:
                for k, z in enumerate(zs):  # (M, N, B, Z) each
                    out = out + self.explore * self.discount**k * z.std(0, unbiased=False).mean(-1)
            return out

        if space.kind == "discrete":
            probs = torch.full((B, H, space.dim), 1.0 / space.dim, dtype=ref.dtype, device=ref.device)
            for _ in range(self.iterations):
                seqs = torch.distributions.Categorical(probs=probs).sample((N,))  # (N, B, H)
                elite = seqs.gather(0, score(seqs).topk(K, dim=0).indices[..., None].expand(K, B, H))
                counts = nn.functional.one_hot(elite, space.dim).to(ref.dtype).mean(0)  # (B, H, n)
                probs = 0.9 * counts + 0.1 / space.dim  # keep every action possible
            return probs[:, 0].argmax(-1)
        mean = box_centre(space, ref).expand(B, H, space.dim)
        std = torch.full_like(mean, self.init_std)
        for _ in range(self.iterations):
            seqs = clip_to_space(
                mean + std * torch.randn(N, *mean.shape, dtype=ref.dtype, device=ref.device), space
            )
            top = score(seqs).topk(K, dim=0).indices  # (K, B)
            elite = seqs.gather(0, top[..., None, None].expand(K, B, H, space.dim))
            mean, std = elite.mean(0), elite.std(0, unbiased=False).clamp(min=self.min_std)
        return clip_to_space(mean[:, 0], space)


class PolicyPlanner:
    """The model's π(a_t | z_t), learned by the ELBO: behaviour cloning of the data's actions.

    :param mode: act with π's most likely action (the mean of the Normal, its
        squashed mean for the tanh policy, the likeliest category); else draw one.
    """

    name = "policy"

    def __init__(self, mode: bool = True):
        self.mode = bool(mode)

    @torch.no_grad()
    def plan(self, model, state: LatentState, **_) -> torch.Tensor:
        pi = model.policy(state.features)
        if not self.mode:
            return clip_to_space(pi.sample(), model.action_space)
        return clip_to_space(_mode(pi), model.action_space)


def _next_state(prior, sample: bool) -> torch.Tensor:
    """z_{t+1} of an imagined step: a draw (reparameterised where the prior can be, so that
    gradients reach the dynamics), or the most likely state: the mean of a Gaussian, the
    likeliest class of each group of a categorical state (its mean, the probabilities, is
    no state the model was trained on)."""
    if sample:
        return prior.rsample() if prior.has_rsample else prior.sample()
    return prior.mode


def _mode(d):
    """The most likely action of a policy's distribution (the squashed base mean for a tanh policy)."""
    while isinstance(d, dist.Independent):
        d = d.base_dist
    if isinstance(d, torch.distributions.Categorical):
        return d.probs.argmax(-1)
    if isinstance(d, torch.distributions.TransformedDistribution):
        x = _mode(d.base_dist)
        for t in d.transforms:
            x = t(x)
        return x
    return d.mean


class ActorCriticPlanner(nn.Module):
    """Policy learning in imagination, as in Dreamer: an actor π_φ(a | s) and a critic v_ψ(s)
    trained on rollouts imagined by the model from posterior latents.

    From each start state the actor acts for ``horizon`` steps in the model; with
    rewards r_k, continue probabilities c_k and values v_k the λ-returns are

        R_k = r_k + γ c_k ((1 − λ) v_{k+1} + λ R_{k+1}),   R_H = v_H.

    The critic regresses v_k on R_k (held fixed); the actor maximises the
    weighted Σ_k R_k, by gradients through the model's dynamics for box actions
    (Dreamer) and by REINFORCE with the critic as baseline for discrete ones
    (DreamerV2), plus an entropy bonus. The model is not changed. With an ensemble
    transition each imagined rollout follows one member (start state n under member
    n mod K), so the actor learns against the members' disagreement; with a Bayesian
    one, one of its K posterior draws, drawn anew at every update step.

    :param latent_dim: what the actor and critic read, Z (or D + Z); filled in by :func:`~pyro_worldmodel.config.build`.
    :param action_space: the actions in model units; filled in likewise.
    :param horizon: imagined steps per update.
    :param discount: γ.
    :param lam: λ.
    :param hidden: widths of the actor's and critic's hidden layers.
    :param lr: Adam's learning rate for both.
    :param entropy: weight of the actor's entropy bonus.
    :param updates: gradient steps per call of :meth:`update`.
    :param batch_size: start states per gradient step.
    """

    name = "actor_critic"

    def __init__(
        self,
        latent_dim: int,
        action_space: ActionSpace,
        horizon: int = 15,
        discount: float = 0.99,
        lam: float = 0.95,
        hidden: Sequence[int] = (64, 64),
        lr: float = 3e-4,
        entropy: float = 1e-3,
        updates: int = 100,
        batch_size: int = 256,
    ):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.action_space = action_space
        for arg, v in (("horizon", horizon), ("updates", updates), ("batch_size", batch_size)):
            check_dim(arg, v)
        for arg, v in (("discount", discount), ("lam", lam)):
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{arg}: expected a number in [0, 1], got {v!r}")
        self.horizon, self.discount, self.lam = horizon, float(discount), float(lam)
        self.hidden = check_hidden(hidden)
        self.lr, self.entropy, self.updates, self.batch_size = float(lr), float(entropy), updates, batch_size
        out = action_space.dim if action_space.kind == "discrete" else 2 * action_space.dim
        self.actor = mlp(latent_dim, self.hidden, out)
        self.critic = mlp(latent_dim, self.hidden, 1)
        self._actor_optim = torch.optim.Adam(self.actor.parameters(), lr=self.lr)
        self._critic_optim = torch.optim.Adam(self.critic.parameters(), lr=self.lr)

    def policy(self, f: torch.Tensor) -> torch.distributions.Distribution:
        """π_φ before squashing: a Categorical, or the Normal of u, with a = mid + half · tanh(u)
        in a box with finite bounds (a = u otherwise)."""
        out = self.actor(f)
        if self.action_space.kind == "discrete":
            return torch.distributions.Categorical(logits=out)
        loc, raw = out.chunk(2, -1)
        return dist.Normal(loc, nn.functional.softplus(raw) + 1e-2)

    def _squash(self, u: torch.Tensor):
        """``(a, log |da/du|)`` summed over action dimensions."""
        box = _finite_box(self.action_space, u)
        if box is None:
            return u, torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        low, high = box
        mid, half = (low + high) / 2, (high - low) / 2
        a = mid + half * u.tanh()  # unclamped, so a gradient reaches u everywhere
        log_det = TanhToBox(mid, half, low, high).log_abs_det_jacobian(u, a)  # as the tanh policy's
        return a, log_det.sum(-1)

    def sample(self, f: torch.Tensor):
        """An action for each state, with log π(a | f) and an entropy (estimate, for a box)."""
        pi = self.policy(f)
        if self.action_space.kind == "discrete":
            a = pi.sample()
            return a, pi.log_prob(a), pi.entropy()
        u = pi.rsample()
        a, log_det = self._squash(u)
        log_p = pi.log_prob(u).sum(-1) - log_det
        return a, log_p, -log_p

    def value(self, f: torch.Tensor) -> torch.Tensor:
        return self.critic(f).squeeze(-1)

    def training_state(self) -> dict:
        """Weights and both optimisers' state: all that a resumed loop needs to go on exactly."""
        return {
            "weights": self.state_dict(),
            "actor_optim": self._actor_optim.state_dict(),
            "critic_optim": self._critic_optim.state_dict(),
        }

    def load_training_state(self, state: dict) -> None:
        """Restore what :meth:`training_state` returned."""
        try:
            self.load_state_dict(state["weights"])
            self._actor_optim.load_state_dict(state["actor_optim"])
            self._critic_optim.load_state_dict(state["critic_optim"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"state: the planner's saved state does not fit this planner: {first}") from None

    @torch.no_grad()
    def plan(self, model, state: LatentState, **_) -> torch.Tensor:
        _check_heads(model, "'actor_critic'")
        pi = self.policy(state.features)
        if self.action_space.kind == "discrete":
            return pi.probs.argmax(-1)
        return clip_to_space(self._squash(pi.mean)[0], model.action_space)

    def update(self, model, starts: LatentState, *, reward_scale=1.0, reward_loc=0.0) -> dict:
        """Train the actor and critic for :attr:`updates` steps on futures imagined from ``starts``
        (a batch of posterior states, e.g. every step of the replayed windows).

        :returns: the last step's mean λ-return, actor loss and critic loss.
        """
        _check_heads(model, "'actor_critic'")
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # the model is held fixed; gradients still flow through it
            p.requires_grad_(False)
        try:
            for _ in range(self.updates):
                resample_dynamics(model)  # a Bayesian transition: new posterior draws per step
                idx = torch.randint(starts.z.shape[0], (min(self.batch_size, starts.z.shape[0]),))
                stats = self._step(
                    model,
                    starts.z[idx],
                    None if starts.h is None else starts.h[idx],
                    reward_scale,
                    reward_loc,
                )
        finally:
            for p in params:
                p.requires_grad_(True)
        return stats

    def _step(self, model, z, h, reward_scale, reward_loc):
        discrete = self.action_space.kind == "discrete"
        feats, rewards, conts, logps, ents = [], [], [], [], []
        for _ in range(self.horizon):
            f = model.features(z, h)
            a, log_p, entropy = self.sample(f.detach() if discrete else f)
            a_feat = model.action_space.features(a, f.dtype)
            feats.append(f)
            rewards.append(model.reward(f, a_feat).mean * reward_scale + reward_loc)
            conts.append(
                model.continuation(f).mean if model.continuation is not None else torch.ones_like(rewards[-1])
            )
            logps.append(log_p)
            ents.append(entropy)
            prior, h = model.step(z, a_feat, h)
            z = _next_state(prior, sample=True)
            if discrete:
                z = z.detach()
                h = None if h is None else h.detach()
        feats.append(model.features(z, h))
        values = torch.stack([self.value(f) for f in feats])  # (H + 1, n)
        cont = torch.stack(conts)  # (H, n)
        returns = lambda_returns(torch.stack(rewards), cont, values, self.discount, self.lam)  # (H, n)
        # Weight of step k: the chance of getting there, discounted.
        weight = torch.cumprod(torch.cat([torch.ones_like(cont[:1]), self.discount * cont[:-1]]), 0).detach()
        ent = torch.stack(ents)
        if discrete:
            baseline = values[:-1].detach()
            actor_loss = -(
                weight * (torch.stack(logps) * (returns.detach() - baseline) + self.entropy * ent)
            ).mean()
        else:
            actor_loss = -(weight * (returns + self.entropy * ent)).mean()
        v = torch.stack([self.value(f.detach()) for f in feats[:-1]])
        critic_loss = 0.5 * (weight * (v - returns.detach()) ** 2).mean()
        # Each loss trains its own network: the actor's gradient reaches the critic's
        # inputs (the imagined states) but must not move the critic.
        self._actor_optim.zero_grad()
        self._critic_optim.zero_grad()
        actor_loss.backward(inputs=list(self.actor.parameters()))
        critic_loss.backward(inputs=list(self.critic.parameters()))
        nn.utils.clip_grad_norm_(self.actor.parameters(), 10.0)
        nn.utils.clip_grad_norm_(self.critic.parameters(), 10.0)
        self._actor_optim.step()
        self._critic_optim.step()
        return {
            "return": float(returns[0].detach().mean()),
            "actor_loss": float(actor_loss.detach()),
            "critic_loss": float(critic_loss.detach()),
        }


def lambda_returns(rewards, continues, values, discount: float, lam: float) -> torch.Tensor:
    """λ-returns R_k = r_k + γ c_k ((1 − λ) v_{k+1} + λ R_{k+1}) for k < H, with R_H = v_H.

    :param rewards: ``(H, ...)`` r_k; :param continues: ``(H, ...)`` c_k, the chance
        the episode goes on after step k; :param values: ``(H + 1, ...)`` v_k.
    :returns: ``(H, ...)``. λ = 1 gives the discounted sum of rewards bootstrapped
        with v_H; λ = 0 the one-step targets r_k + γ c_k v_{k+1}.
    """
    H = rewards.shape[0]
    if continues.shape[0] != H or values.shape[0] != H + 1:
        raise ValueError(
            f"values: expected H + 1 = {H + 1} steps and continues H = {H}, got"
            f" {values.shape[0]} and {continues.shape[0]}"
        )
    ret = values[-1]
    out = []
    for k in reversed(range(H)):
        ret = rewards[k] + discount * continues[k] * ((1 - lam) * values[k + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1])


PLANNERS = {"cem": CEMPlanner, "actor_critic": ActorCriticPlanner, "policy": PolicyPlanner}
