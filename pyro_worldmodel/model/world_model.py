"""The generative world model as a Pyro program."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from ..spaces import INT_DTYPES, ActionSpace, ChecksInputs
from .components import GaussianMLPEmission, GaussianMLPTransition, StandardNormalInit, auto_policy
from .components.categorical import describe_state, latent_classes_of
from .components.nets import cat_batched
from .naming import register_module, unique_name


class WorldModel(ChecksInputs, nn.Module):
    """p(z_1) · Π_t p(x_t | z_t) · π(a_t | z_t) · Π_{t<T} p(z_{t+1} | z_t, a_t).

    Composes four components, each a module returning one factor's
    distribution. The Pyro program is :meth:`model`; it holds no layers.

    A recurrent transition (``deter_dim`` > 0, e.g. the RSSM) also carries a
    deterministic state: p(z_{t+1} | h_{t+1}) with h_{t+1} = f(h_t, z_t, a_t),
    so z_{t+1}'s prior depends on the whole past, and the emission and the
    policy read the features [h_t, z_t] instead of z_t.

    :param init: p(z_1), called with a batch shape.
    :param transition: p(z_{t+1} | z_t, a_t), called with ``(z_t, a_t)``; a
        recurrent one with ``(z_t, a_t, h_t)``, returning ``(p(z_{t+1} | ·), h_{t+1})``.
    :param emission: p(x_t | z_t), called with ``z_t`` (or [h_t, z_t]).
    :param policy: π(a_t | z_t), called with ``z_t`` (or [h_t, z_t]); carries the action space.
    :param reward: optional p(r_t | z_t, a_t), called with ``(z_t, a_t features)`` (or
        ``([h_t, z_t], ·)``); needed by the planners (:mod:`pyro_worldmodel.act`).
    :param continuation: optional p(c_t | z_t), c_t = 0 where the episode terminated
        after step t; planners weigh later rewards by the chance of getting there.
    :param name: prefix of the parameters in Pyro's param store; unique by
        default, so two models in one process never share parameters.
    """

    def __init__(
        self,
        init: nn.Module,
        transition: nn.Module,
        emission: nn.Module,
        policy: nn.Module,
        reward: nn.Module | None = None,
        continuation: nn.Module | None = None,
        *,
        name: str | None = None,
    ):
        super().__init__()
        latent_dim = init.latent_dim
        # A recurrent transition (RSSM) adds a deterministic state h_t, which the
        # emission and the policy read beside z_t.
        feature_dim = latent_dim + getattr(transition, "deter_dim", 0)
        parts = [(transition, latent_dim), (emission, feature_dim), (policy, feature_dim)]
        parts += [(head, feature_dim) for head in (reward, continuation) if head is not None]
        for part, expected in parts:
            if part.latent_dim != expected:
                why = f"as in {type(init).__name__}"
                if expected != latent_dim:
                    why = f"= latent_dim + {type(transition).__name__}.deter_dim, the features [h_t, z_t] it reads"
                raise ValueError(
                    f"{type(part).__name__}: expected latent_dim={expected} {why}, got {part.latent_dim}"
                )
        init_classes, transition_classes = latent_classes_of(init), latent_classes_of(transition)
        if init_classes != transition_classes:
            raise ValueError(
                f"transition: expected {describe_state(init_classes)} as {type(init).__name__} gives,"
                f" got {type(transition).__name__} with {describe_state(transition_classes)}"
            )
        if transition.action_dim != policy.action_space.feature_dim:
            raise ValueError(
                f"transition: expected action_dim={policy.action_space.feature_dim} to match"
                f" the policy's {policy.action_space}, got {transition.action_dim}"
            )
        self.init = init
        self.transition = transition
        self.emission = emission
        self.policy = policy
        if reward is not None and reward.action_space.feature_dim != policy.action_space.feature_dim:
            raise ValueError(
                f"reward: expected the policy's {policy.action_space}, got {reward.action_space}"
            )
        self.reward = reward
        self.continuation = continuation
        self.name = unique_name("world_model", name)

    @classmethod
    def default(
        cls,
        obs_dim: int,
        action_space: ActionSpace,
        latent_dim: int = 8,
        hidden: Sequence[int] = (64, 64),
        *,
        name: str | None = None,
    ) -> WorldModel:
        """Gaussian MLP transition and emission, policy chosen by the space: with the
        defaults, the parts of ``Spec()``, the package's one default (``build(Spec(), ...)``
        makes the same model), for use without a spec."""
        return cls(
            StandardNormalInit(latent_dim),
            GaussianMLPTransition(latent_dim, action_space.feature_dim, hidden),
            GaussianMLPEmission(latent_dim, obs_dim, hidden),
            auto_policy(latent_dim, action_space),
            name=name,
        )

    def check_inputs(self, obs, actions, mask=None, *, check_values: bool | None = None):
        """As :meth:`ChecksInputs.check_inputs`; when values are checked, a policy
        with ``check_actions`` (the bounded tanh policy) also checks the observed actions,
        and an emission with ``check_obs`` (the Bernoulli emission) the observations."""
        obs, actions, mask = super().check_inputs(obs, actions, mask, check_values=check_values)
        if is_validation_enabled() if check_values is None else check_values:
            if hasattr(self.policy, "check_actions"):
                self.policy.check_actions(actions, mask)
            if hasattr(self.emission, "check_obs"):
                self.emission.check_obs(obs, mask)
        return obs, actions, mask

    @property
    def latent_dim(self) -> int:
        return self.init.latent_dim

    @property
    def latent_classes(self) -> int | None:
        """K, the classes per group of a categorical state (z_t is latent_dim / K one-hot
        groups); None for a Gaussian state."""
        return latent_classes_of(self.init)

    @property
    def deter_dim(self) -> int:
        """D, the size of a recurrent transition's deterministic state h_t; 0 for a Markov one."""
        return getattr(self.transition, "deter_dim", 0)

    @property
    def obs_dim(self) -> int:
        return self.emission.obs_dim

    @property
    def action_space(self) -> ActionSpace:
        return self.policy.action_space

    def model(
        self, obs, actions, mask=None, *, rewards=None, continues=None, horizon: int = 0, future_actions=None
    ):
        """The Pyro model.

        :param obs: ``(B, T, X)`` observations x_t.
        :param actions: ``(B, T, A)`` reals, or ``(B, T)`` integers for a
            discrete space: a_t, the action taken after seeing x_t.
        :param mask: ``(B, T)`` bool, True where a step was observed.
        :param rewards: ``(B, T)`` r_t, the reward after a_t; observed at the site
            ``r`` when the model has a reward head (refused when it has none).
        :param continues: ``(B, T)`` c_t in {0, 1}, 0 where the episode terminated
            after step t (:attr:`Episodes.continues <pyro_worldmodel.data.Episodes.continues>`);
            observed at the site ``c`` when the model has a continue head.
        :param horizon: H, further steps to sample after the last one given;
            run under :class:`pyro.infer.Predictive` with a guide, these are
            the posterior predictive (see :func:`~pyro_worldmodel.evaluate`).
            Needs every step of the context observed.
        :param future_actions: the actions of those steps: None samples them
            from π(a_t | z_t); a ``(B, H, A)`` (or ``(B, H)``) tensor sets them;
            a callable ``f(z_t) -> a_t`` maps what the policy reads, each
            ``(..., B, 1, Z)`` latent (``(..., B, 1, D + Z)`` features [h_t, z_t]
            with a recurrent transition), to an action of shape
            ``(..., B, 1, A)`` (or ``(..., B, 1)``), the same leading dims.
            Both are checked (:meth:`check_future_actions`,
            :meth:`check_future_action`). Set actions are
            interventions: they are not scored by π.
        :returns: the latents ``(B, T, Z)``; None inside :meth:`enumerated`.

        Sites: ``z_{t}`` for each t, then ``x`` and ``a`` (and ``r``, ``c`` when given)
        over a time plate.
        With a horizon, also ``z_{t}`` (and ``a_{t}`` when sampled from π)
        for t = T … T+H-1, then over a ``future`` plate the deterministic
        ``z_future``, ``a_future``, ``x_future_mean`` and the sampled ``x_future``
        (and ``features_future``, [h_t, z_t], with a recurrent transition; and
        ``r_future_mean``, ``c_future_prob`` with the heads).
        """
        obs, actions, mask = self.check_inputs(obs, actions, mask)
        rewards, continues = self.check_targets(rewards, continues, mask, obs.dtype)
        B, T = mask.shape
        _check_horizon(horizon, mask)
        register_module(self.name, self)
        a_feat = self.action_space.features(actions, obs.dtype)  # (B, T, A)
        z, feats = [], []
        # A Bayesian transition draws its weights once, for every episode, before the chain.
        with self.global_latents(B):
            h = self.transition.initial_deter((B, 1), obs) if self.deter_dim else None  # h_1: (B, 1, D)
            # Inside the loop the rightmost batch dim is one time slice, so the
            # latent sites share the episodes plate with the likelihood sites.
            with pyro.plate("episodes", B, dim=-2):
                # pyro.markov declares a first-order chain; with a recurrent transition
                # z_t also depends on z_{<t-1} through h_t, which only matters to enumeration,
                # and no latent here is enumerated.
                for t in pyro.markov(range(T)):
                    if t == 0:
                        prior = self.init((B, 1))
                    else:
                        prior, h = self.step(z[-1], a_feat[:, t - 1 : t], h)  # a_{t-1}: (B, 1, A)
                    if self._per_step:
                        # Summed out by enumeration: unmasked, as a padded step's prior sums to 1
                        # over its states (masked, each state would count 1, the sum K).
                        z.append(pyro.sample(f"z_{t}", prior))
                    else:
                        z.append(pyro.sample(f"z_{t}", prior.mask(mask[:, t : t + 1])))  # (..., B, 1, Z)
                    feats.append(self.features(z[-1], h))
                    if self._per_step:  # x_t etc. beside z_t, in the chain that enumeration contracts
                        step = slice(t, t + 1)
                        targets = [None if v is None else v[:, step] for v in (rewards, continues)]
                        for site, (d, value) in self.observation_sites(
                            feats[-1], a_feat[:, step], obs[:, step], actions[:, step], *targets
                        ).items():
                            pyro.sample(f"{site}_{t}", d.mask(mask[:, step]), obs=value)
                if self._per_step:
                    # Each z_t carries its own enumeration dimension: stacked over time they
                    # would broadcast to K^2 · B · T · Z values, and nothing reads them.
                    return None
                z = _cat_time(z)  # (..., B, T, Z)
                features = _cat_time(feats)  # (..., B, T, D + Z)
                with pyro.plate("time", T, dim=-1):
                    for site, (d, value) in self.observation_sites(
                        features, a_feat, obs, actions, rewards, continues
                    ).items():
                        pyro.sample(site, d.mask(mask), obs=value)
                if horizon:
                    self._dream(z[..., -1:, :], h, a_feat[:, -1:], T, horizon, future_actions)
        return z

    _per_step = False

    @contextmanager
    def enumerated(self):
        """Inside the block, :meth:`model` is the same program arranged for exact enumeration
        (:class:`~pyro_worldmodel.infer.TraceEnum_ELBO`): each step's observed sites,
        ``x_{t}``, ``a_{t}`` (and ``r_{t}``, ``c_{t}``), are sampled beside z_t inside the
        Markov chain instead of over a time plate after it, so that ``pyro.markov`` can
        recycle each z_t's enumeration dimension; and the z_t sites are not masked, so that
        a padded step's prior sums to 1. The factors are the same
        (:meth:`observation_sites`)."""
        previous, self._per_step = self._per_step, True
        try:
            yield self
        finally:
            self._per_step = previous

    def targets(self, rewards, continues) -> dict:
        """``{"rewards": ..., "continues": ...}`` for the heads this model has: the keywords
        of :meth:`model` (and :func:`~pyro_worldmodel.fit`) from data that has both."""
        out = {}
        if self.reward is not None:
            out["rewards"] = rewards
        if self.continuation is not None:
            out["continues"] = continues
        return out

    def check_targets(self, rewards, continues, mask, dtype):
        """``rewards`` and ``continues`` as ``(B, T)`` tensors of ``dtype`` (or None),
        zero outside ``mask``; refused where the model has no head to score them."""
        out = []
        for arg, value, head, what in (
            ("rewards", rewards, self.reward, "reward head"),
            ("continues", continues, self.continuation, "continue head"),
        ):
            if value is None:
                out.append(None)
                continue
            if head is None:
                raise ValueError(
                    f"{arg}: this model has no {what} to score them; give the spec a"
                    f" {'reward' if arg == 'rewards' else 'continuation'} part, or pass {arg}=None"
                )
            value = torch.as_tensor(value).to(mask.device, dtype)
            if tuple(value.shape) != tuple(mask.shape):
                raise ValueError(
                    f"{arg}: expected shape {tuple(mask.shape)} like the mask, got {tuple(value.shape)}"
                )
            if is_validation_enabled():
                bad = ~torch.isfinite(value) & mask
                if arg == "continues":
                    bad |= (value != 0) & (value != 1) & mask
                if bad.any():
                    b, t = bad.nonzero()[0].tolist()
                    expected = "0 or 1" if arg == "continues" else "finite values"
                    raise ValueError(
                        f"{arg}: expected {expected}, got {value[b, t].item()} at episode {b}, step {t}"
                    )
            out.append(torch.where(mask, value, torch.zeros((), dtype=dtype, device=mask.device)))
        return tuple(out)

    def step(self, z_prev, a_prev, h_prev=None):
        """One step of the chain: ``(p(z_t | z_{t-1}, a_{t-1}), h_t)``, h_t None for a Markov
        transition. Every rollout (the model, its dream, the planners, the batched ELBO) steps
        the transition through here.

        :param z_prev: ``(..., Z)``; :param a_prev: ``(..., A)`` action features;
        :param h_prev: ``(..., D)`` for a recurrent transition, else None.
        """
        if h_prev is None:
            return self.transition(z_prev, a_prev), None
        return self.transition(z_prev, a_prev, h_prev)

    def global_latents(self, batch_size: int):
        """A context in which :meth:`model` samples its global latents and steps with them:
        a Bayesian transition's weights (:meth:`BayesianMLPTransition.sampled
        <pyro_worldmodel.model.components.BayesianMLPTransition.sampled>`), or nothing.

        :param batch_size: B, the episodes of this run, which carry a share B / N of their KL.
        """
        sampled = getattr(self.transition, "sampled", None)
        return nullcontext() if sampled is None else sampled(batch_size)

    @property
    def has_global_latents(self) -> bool:
        """Whether :meth:`model` samples latents shared by every episode (a Bayesian transition's weights)."""
        return hasattr(self.transition, "sampled")

    @staticmethod
    def features(z_t, h_t=None):
        """What the emission, the policy and the heads read: z_t, or [h_t, z_t] with a recurrent transition."""
        return z_t if h_t is None else cat_batched(h_t, z_t)

    def priors(self, z: torch.Tensor, a_feat: torch.Tensor) -> tuple[list, torch.Tensor]:
        """The chain of :meth:`model` evaluated at known latents, as the batched ELBO needs it.

        :param z: ``(B, T, Z)`` latents; :param a_feat: ``(B, T, A)`` action features.
        :returns: the priors of z_1 … z_T as a list of distributions over consecutive steps
            (batch ``(B, n)``; a Markov transition is called once for all of t ≥ 2, a
            recurrent one step by step, as its h_t needs), and the features ``(B, T, D + Z)``.
        """
        B, T = z.shape[:2]
        priors = [self.init((B, 1))]
        if not self.deter_dim:
            if T > 1:
                priors.append(self.step(z[:, :-1], a_feat[:, :-1])[0])
            return priors, z
        h = self.transition.initial_deter((B, 1), z)  # h_1: (B, 1, D)
        hs = [h]
        for t in range(1, T):
            prior, h = self.step(z[:, t - 1 : t], a_feat[:, t - 1 : t], h)
            priors.append(prior)
            hs.append(h)
        return priors, self.features(z, torch.cat(hs, dim=1))

    def observation_sites(self, features, a_feat, obs, actions, rewards=None, continues=None) -> dict:
        """The observed factors of :meth:`model`, by site: ``{"x": (p(x_t | ·), obs), "a":
        (π(a_t | ·), actions)}``, and ``"r"`` / ``"c"`` with their heads when the targets are
        given. The Pyro program samples each one in the time plate; the batched ELBO sums
        their log-densities. A site added here is scored by both.

        :param features: ``(..., B, T, D + Z)``; :param a_feat: ``(B, T, A)``.
        """
        sites = {"x": (self.emission(features), obs), "a": (self.policy(features), actions)}
        if rewards is not None:
            sites["r"] = (self.reward(features, a_feat), rewards)
        if continues is not None:
            sites["c"] = (self.continuation(features), continues)
        return sites

    def _dream(self, z_last, h_last, a_feat_last, T, horizon, future_actions):
        """Sample ``horizon`` steps after ``z_last``, inside the episodes plate."""
        B = a_feat_last.shape[0]
        if future_actions is not None and not callable(future_actions):
            future_actions = self.check_future_actions(future_actions, B, horizon)
        z_prev, h, a_prev = z_last, h_last, a_feat_last
        zs, feats, acts = [], [], []
        for step in pyro.markov(range(horizon)):
            t = T + step
            prior, h = self.step(z_prev, a_prev, h)
            z_t = pyro.sample(f"z_{t}", prior)  # (..., B, 1, Z)
            f_t = self.features(z_t, h)
            if future_actions is None:
                a_t = pyro.sample(f"a_{t}", self.policy(f_t))
            elif callable(future_actions):
                a_t = self.check_future_action(future_actions(f_t), f_t, step)
            else:
                a_t = future_actions[:, step : step + 1]
            zs.append(z_t)
            feats.append(f_t)
            acts.append(a_t)
            z_prev, a_prev = z_t, self.action_space.features(a_t, z_t.dtype)
        shape = torch.broadcast_shapes(*(f.shape[:-1] for f in feats))  # (..., B, 1)
        event = () if self.action_space.kind == "discrete" else (self.action_space.dim,)
        a_future = torch.cat([a.expand(*shape, *event) for a in acts], dim=len(shape) - 1)
        with pyro.plate("future", horizon, dim=-1):
            pyro.deterministic("z_future", _cat_time(zs), event_dim=1)
            if self.deter_dim:
                pyro.deterministic("features_future", _cat_time(feats), event_dim=1)
            pyro.deterministic("a_future", a_future, event_dim=len(event))
            emission = self.emission(_cat_time(feats))
            pyro.deterministic("x_future_mean", emission.mean, event_dim=1)
            pyro.sample("x_future", emission)
            if self.reward is not None:
                a_feats = self.action_space.features(a_future, emission.mean.dtype)
                pyro.deterministic("r_future_mean", self.reward(_cat_time(feats), a_feats).mean)
            if self.continuation is not None:
                pyro.deterministic("c_future_prob", self.continuation(_cat_time(feats)).mean)

    def check_future_actions(self, future_actions, batch_size: int, horizon: int) -> torch.Tensor:
        """Set actions for the ``horizon`` imagined steps of :meth:`model`, checked.

        Values are checked whether or not Pyro validation is on: there are few,
        and a bad one fails deep inside the dream (an out-of-range index in
        ``one_hot``) or turns every later step to NaN.

        :param future_actions: ``(B, H, A)`` reals (integers are converted), or
            ``(B, H)`` integers in ``[0, n)`` for a discrete space.
        :returns: ``(B, H, A)`` of the parameters' dtype, or ``(B, H)`` long, on their device.
        """
        space = self.action_space
        ref = next(self.parameters())
        a = _as_actions(future_actions, "a tensor or array", "")
        expected = (batch_size, horizon) if space.kind == "discrete" else (batch_size, horizon, space.dim)
        if tuple(a.shape) != expected:
            raise ValueError(f"future_actions: expected shape {expected} for {space}, got {tuple(a.shape)}")
        a = self._action_dtype(a.to(ref.device), ref.dtype, "", "")
        bad, what = self._bad_actions(a)  # (B, H)
        if bad.any():
            b, t = bad.nonzero()[0].tolist()
            raise ValueError(
                f"future_actions: expected {what}, got {_value(a[b, t])} at episode {b}, step {t}"
            )
        return a

    def check_future_action(
        self, action, features: torch.Tensor, step: int | None = None, *, check_values: bool = True
    ) -> torch.Tensor:
        """The action a callable ``future_actions`` returned for one imagined step, checked.

        The model needs one action per particle and episode, for that step alone:
        shape ``features.shape[:-1]`` (then ``(A,)`` for a box space). An output
        of another shape would be broadcast silently, against the wrong episodes
        or particles. Values are checked as in :meth:`check_future_actions`.

        :param action: what the callable returned.
        :param features: ``(..., B, 1, F)``, what it was given.
        :param step: the imagined step, 0 for the first, named in the messages.
        :param check_values: False to check only the shape and dtype, e.g. before a map
            to other units that keeps NaN and inf, where the model checks the values after.
        :returns: ``(..., B, 1, A)`` of ``features``' dtype, or ``(..., B, 1)`` long, on its device.
        """
        space = self.action_space
        at = "" if step is None else f" at imagined step {step}"
        a = _as_actions(action, "the callable to return a tensor", at)
        expected = tuple(features.shape[:-1]) + (() if space.kind == "discrete" else (space.dim,))
        if tuple(a.shape) != expected:
            raise ValueError(
                f"future_actions: expected the callable to return shape {expected} for its input of"
                f" shape {tuple(features.shape)}{at}, got {tuple(a.shape)}"
            )
        a = self._action_dtype(a.to(features.device), features.dtype, "the callable to return ", at)
        if check_values:
            bad, what = self._bad_actions(a)  # (..., B, 1)
            if bad.any():
                index = tuple(bad.nonzero()[0].tolist())
                raise ValueError(
                    f"future_actions: expected the callable to return {what}{at}, got"
                    f" {_value(a[index])} for episode {index[-2]}"
                )
        return a

    def _action_dtype(self, a, dtype, who, at):
        """``a`` as long (discrete) or ``dtype`` (box); a dtype that is no action is refused."""
        space = self.action_space
        if space.kind == "discrete":
            if a.dtype not in INT_DTYPES:
                raise ValueError(
                    f"future_actions: expected {who}integers for {space}{at}, got dtype {a.dtype}"
                )
            return a.long()
        # Integers are real numbers and are converted; casting complex or bool would
        # drop the imaginary part or read flags as actions.
        if not (a.is_floating_point() or a.dtype in INT_DTYPES):
            raise ValueError(
                f"future_actions: expected {who}real numbers for {space}{at}, got dtype {a.dtype}"
            )
        return a.to(dtype)

    def _bad_actions(self, a):
        """Where ``a`` is no action of the space, over all but a box's last dim, and what was expected."""
        space = self.action_space
        if space.kind == "discrete":
            return (a < 0) | (a >= space.dim), f"integers in [0, {space.dim})"
        return ~torch.isfinite(a).all(-1), "finite values"

    def forward(self, obs, actions, mask=None, **kwargs):
        """Same as :meth:`model`."""
        return self.model(obs, actions, mask, **kwargs)


def _cat_time(steps):
    """``[(..., B, 1, n)] * T`` → ``(..., B, T, n)``, broadcasting particle dims."""
    shape = torch.broadcast_shapes(*(s.shape[:-1] for s in steps))
    return torch.cat([s.expand(*shape, s.shape[-1]) for s in steps], dim=-2)


def _check_horizon(horizon, mask):
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 0:
        raise ValueError(f"horizon: expected an int >= 0, got {horizon!r}")
    if horizon and not bool(mask.all()):
        raise ValueError(
            "mask: expected every context step observed to imagine past it, got"
            f" {int((~mask).sum())} unobserved steps; pass the context without padding"
        )


def _as_actions(value, expected, at):
    """``value`` as a tensor; ``expected`` and ``at`` complete the message if it is none."""
    if torch.is_tensor(value):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"future_actions: expected {expected}{at}, got {type(value).__name__}") from e


def _value(a):
    """One action for a message: a number (discrete) or a list (box)."""
    return a.item() if a.dim() == 0 else a.tolist()
