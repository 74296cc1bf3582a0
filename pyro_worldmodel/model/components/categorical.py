"""A categorical latent state: z_t is G groups of K classes, one-hot, as in DreamerV2.

z_t is kept flat, a vector of size Z = G·K holding G one-hot blocks, so that every
emission, policy, head and planner reads it as it reads a Gaussian z_t. Its
distribution is :class:`GroupedOneHot`: G independent categoricals, event ``(G·K,)``.

- **Straight-through gradients** (Bengio et al., 2013; DreamerV2): a sample is the
  one-hot vector of a drawn class plus p − sg(p), which equals the one-hot vector in
  value and has the gradient of p. Without them (``straight_through=False``) a sample
  carries no gradient, and only estimators that score it (``TraceGraph_ELBO``) train
  through it.
- **Unimix** (DreamerV3): the probabilities are mixed with the uniform,
  (1 − u)·softmax(logits) + u/K, so that no class has probability 0 and every KL is finite.
- **Analytic KL**: KL(q ‖ p) = Σ_g Σ_k q_gk (log q_gk − log p_gk), registered with
  ``torch.distributions.kl_divergence``, so ``TraceMeanField_ELBO`` uses it at every step.
- **Enumeration**: one group (G = 1) is one categorical of K states; its
  ``enumerate_support`` lists the K one-hot vectors, so that ``TraceEnum_ELBO`` can sum
  z_t out exactly (:class:`~pyro_worldmodel.infer.TraceEnum_ELBO`).

The classes K are a setting of the init (``classes``); :func:`~pyro_worldmodel.build`
gives the transition and the guide the same K (their ``latent_classes``), and the
world model checks that all three agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.distributions import register_kl

from .nets import cat_batched, check_dim, check_hidden, mlp
from .transition import RSSMTransition


def check_classes(latent_dim: int, classes, what: str = "classes") -> int:
    """K, checked: an int ≥ 2 that divides ``latent_dim`` (G = latent_dim / K groups)."""
    if classes is None and what == "latent_classes":
        raise ValueError(
            "latent_classes: expected the classes of a categorical state, from a categorical init"
            " (init: {name: categorical, classes: K}), got None: the init gives a Gaussian z_t"
        )
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        raise ValueError(f"{what}: expected an int >= 2 (classes per group), got {classes!r}")
    if latent_dim % classes:
        raise ValueError(
            f"{what}: expected a divisor of latent_dim={latent_dim} (latent_dim = groups × classes),"
            f" got {classes}"
        )
    return classes


def check_unimix(value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"unimix: expected a float in [0, 1), got {value!r}")
    return float(value)


def _check_flag(name, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


class GroupedOneHot(dist.TorchDistribution):
    """G independent one-hot categoricals of K classes, flattened: event ``(G·K,)``.

    :param logits: ``(..., G·K)``, unnormalised log-probabilities, K per group.
    :param classes: K.
    :param unimix: u in [0, 1): the probabilities are (1 − u)·softmax(logits) + u/K.
    :param straight_through: whether :meth:`rsample` gives straight-through gradients
        (one-hot + p − sg(p)); if False the distribution has no ``rsample``.
    """

    arg_constraints = {"logits": constraints.real}
    has_enumerate_support = True

    def __init__(
        self,
        logits: torch.Tensor,
        classes: int,
        unimix: float = 0.0,
        straight_through: bool = True,
        validate_args=None,
    ):
        Z = logits.shape[-1]
        self.classes = check_classes(Z, classes)
        self.groups = Z // classes
        self.unimix = check_unimix(unimix)
        self.straight_through = _check_flag("straight_through", straight_through)
        grouped = logits.reshape(*logits.shape[:-1], self.groups, classes)
        log_probs = grouped.log_softmax(-1)
        if self.unimix:
            mixed = (1 - self.unimix) * log_probs.exp() + self.unimix / classes
            log_probs = mixed.log()
        self.log_probs = log_probs  # (..., G, K), normalised
        self.logits = log_probs.reshape(logits.shape)
        super().__init__(logits.shape[:-1], torch.Size((Z,)), validate_args=validate_args)

    @property
    def has_rsample(self) -> bool:
        return self.straight_through

    @property
    def support(self):
        return _OneHotBlocks(self.classes)

    @property
    def probs(self) -> torch.Tensor:
        """``(..., G, K)``."""
        return self.log_probs.exp()

    @property
    def mean(self) -> torch.Tensor:
        return self.probs.reshape(self.logits.shape)

    @property
    def mode(self) -> torch.Tensor:
        """The most likely class of each group, one-hot, ``(..., G·K)``."""
        index = self.log_probs.argmax(-1)
        return nn.functional.one_hot(index, self.classes).to(self.logits.dtype).reshape(self.logits.shape)

    @property
    def variance(self) -> torch.Tensor:
        p = self.mean
        return p * (1 - p)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        logits = self.logits.expand(*batch_shape, self.logits.shape[-1])
        # The logits are mixed already: mixed again they would change; the setting is kept.
        new = GroupedOneHot(
            logits, self.classes, 0.0, self.straight_through, validate_args=self._validate_args
        )
        new.unimix = self.unimix
        return new

    def sample(self, sample_shape=()) -> torch.Tensor:
        with torch.no_grad():
            index = torch.distributions.Categorical(logits=self.log_probs).sample(sample_shape)
            one_hot = nn.functional.one_hot(index, self.classes).to(self.logits.dtype)
            return one_hot.reshape(*one_hot.shape[:-2], self.groups * self.classes)

    def rsample(self, sample_shape=()) -> torch.Tensor:
        """A one-hot sample whose gradient is that of the probabilities (straight-through)."""
        if not self.straight_through:
            raise NotImplementedError("GroupedOneHot(straight_through=False) has no rsample")
        one_hot = self.sample(sample_shape)
        p = self.mean.expand(one_hot.shape)
        return one_hot + (p - p.detach())

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Σ_g log p_g(class of value's g-th block); ``value`` one-hot blocks ``(..., G·K)``."""
        if self._validate_args:
            self._validate_sample(value)
        grouped = value.reshape(*value.shape[:-1], self.groups, self.classes)
        # Σ_k value_gk log p_gk, linear in the value, so that a straight-through sample's
        # gradient reaches every class; log p floored at the dtype's least, so that
        # 0 · log p = 0 where a unimix of 0 leaves a probability of 0.
        log_p = self.log_probs.clamp(min=torch.finfo(self.log_probs.dtype).min)
        return (grouped * log_p).sum((-2, -1))

    def entropy(self) -> torch.Tensor:
        return -(self.probs * self.log_probs).sum((-2, -1))

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        """The K one-hot vectors, ``(K, *batch, K)`` (``(K, 1, …, 1, K)`` without ``expand``);
        one group only: G groups would have K^G states."""
        if self.groups != 1:
            raise NotImplementedError(
                f"GroupedOneHot: enumerating {self.groups} groups of {self.classes} classes means"
                f" {self.classes}^{self.groups} joint states; enumeration takes one group"
                f" (latent_dim = classes = {self.classes})"
            )
        K = self.classes
        values = torch.eye(K, dtype=self.logits.dtype, device=self.logits.device)
        values = values.reshape(K, *(1,) * len(self.batch_shape), K)
        return values.expand(K, *self.batch_shape, K) if expand else values


class _OneHotBlocks(constraints.Constraint):
    """Vectors of G one-hot blocks of K values: each value 0 or 1, each block summing to 1."""

    event_dim = 1

    def __init__(self, classes: int):
        self.classes = classes
        super().__init__()

    def check(self, value):
        blocks = value.reshape(*value.shape[:-1], -1, self.classes)
        binary = ((blocks == 0) | (blocks == 1)).all(-1)
        return (binary & (blocks.sum(-1) == 1)).all(-1)


@register_kl(GroupedOneHot, GroupedOneHot)
def _kl_grouped(q: GroupedOneHot, p: GroupedOneHot) -> torch.Tensor:
    """Σ_g Σ_k q_gk (log q_gk − log p_gk)."""
    if (q.groups, q.classes) != (p.groups, p.classes):
        raise ValueError(
            f"KL(q ‖ p): expected q and p of the same groups and classes, got q of {q.groups}×{q.classes}"
            f" and p of {p.groups}×{p.classes}"
        )
    return (q.probs * (q.log_probs - p.log_probs)).sum((-2, -1))


class CategoricalInit(nn.Module):
    """p(z_1): G groups of K classes, with learned logits (uniform at the start).

    :param classes: K, the classes per group; ``latent_dim`` = G·K.
    :param unimix: u of p(z_1)'s uniform mix (DreamerV3 uses 0.01); the transition and the
        guide have their own.
    """

    def __init__(self, latent_dim: int, classes: int = 8, unimix: float = 0.01):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.classes = check_classes(latent_dim, classes)
        self.unimix = check_unimix(unimix)
        self.logits = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, batch_shape) -> GroupedOneHot:
        """:returns: batch ``batch_shape``, event ``(Z,)``."""
        return GroupedOneHot(self.logits.expand(*batch_shape, self.latent_dim), self.classes, self.unimix)


class _CategoricalOutput:
    """A part whose output is logits of G categoricals of K classes: its settings, checked
    once, and the distribution it gives."""

    def _categorical(self, latent_dim: int, latent_classes: int, unimix: float, straight_through: bool):
        self.latent_classes = check_classes(latent_dim, latent_classes, "latent_classes")
        self.unimix = check_unimix(unimix)
        self.straight_through = _check_flag("straight_through", straight_through)

    def latent(self, logits: torch.Tensor) -> GroupedOneHot:
        return GroupedOneHot(logits, self.latent_classes, self.unimix, self.straight_through)


class CategoricalMLPTransition(_CategoricalOutput, nn.Module):
    """p(z_{t+1} | z_t, a_t): G categoricals of K classes, logits = MLP([z_t, a_t]).

    With ``hidden=[]`` the logits are linear in [z_t, a_t]: with one group, an HMM whose
    transition matrix from state i under action a has logits W_{·i} + V a + b.

    :param latent_classes: K, supplied by :func:`~pyro_worldmodel.build` from the init's ``classes``.
    :param unimix: u of the uniform mix; :param straight_through: as :class:`GroupedOneHot`'s.
    """

    def __init__(
        self,
        latent_dim: int,
        action_dim: int,
        latent_classes: int,
        hidden: Sequence[int] = (64, 64),
        unimix: float = 0.01,
        straight_through: bool = True,
    ):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.action_dim = check_dim("action_dim", action_dim)
        self._categorical(latent_dim, latent_classes, unimix, straight_through)
        self.hidden = check_hidden(hidden)
        self.net = mlp(latent_dim + action_dim, self.hidden, latent_dim)

    def forward(self, z_prev: torch.Tensor, a_prev: torch.Tensor) -> GroupedOneHot:
        """:param z_prev: ``(..., Z)``; :param a_prev: ``(..., A)`` action features."""
        return self.latent(self.net(cat_batched(z_prev, a_prev)))


class CategoricalRSSMTransition(_CategoricalOutput, RSSMTransition):
    """DreamerV2's RSSM: PlaNet's recurrent state-space transition with a categorical z_t.

        h_t = GRU(h_{t-1}, e([z_{t-1}, a_{t-1}])),   p(z_t | h_t) = G categoricals, logits = MLP(h_t).

    :param latent_classes: K, supplied by :func:`~pyro_worldmodel.build` from the init's ``classes``.
    The other arguments are :class:`RSSMTransition`'s and :class:`CategoricalMLPTransition`'s.
    """

    def __init__(
        self,
        latent_dim: int,
        action_dim: int,
        latent_classes: int,
        deter_dim: int = 64,
        hidden: Sequence[int] = (64,),
        unimix: float = 0.01,
        straight_through: bool = True,
    ):
        super().__init__(latent_dim, action_dim, deter_dim, hidden)
        self._categorical(latent_dim, latent_classes, unimix, straight_through)
        self.prior = mlp(deter_dim, self.hidden, latent_dim)  # logits, not loc and scale
        del self.scale_map, self.min_scale


def latent_classes_of(part) -> int | None:
    """K of a categorical part (an init's ``classes``, a transition's or guide's
    ``latent_classes``), None for a Gaussian one."""
    return getattr(part, "classes", getattr(part, "latent_classes", None))


def describe_state(classes: int | None) -> str:
    """``a Gaussian state`` or ``a categorical state of K classes``."""
    return "a Gaussian state" if classes is None else f"a categorical state of {classes} classes"


def check_guide_state(model, guide) -> None:
    """Refuse a guide whose q(z_t | ·) is of another kind than the model's z_t (a Normal
    guide for a categorical state, or the reverse): its KL terms would be Monte Carlo
    estimates between unrelated distributions. A guide that is a plain function is not checked."""
    if not isinstance(guide, nn.Module) or not hasattr(guide, "latent_dim"):
        return
    expected, got = model.latent_classes, latent_classes_of(guide)
    if expected != got:
        hint = " (guide: {name: categorical_filter})" if expected is not None else ""
        raise ValueError(
            f"guide: expected one for {describe_state(expected)} as the model's {type(model.init).__name__}"
            f" gives{hint}, got {type(guide).__name__} for {describe_state(got)}"
        )


class CategoricalCombiner(_CategoricalOutput, nn.Module):
    """q(z_t | z_{t-1}, h_t): G categoricals of K classes, logits = MLP([z_{t-1}, h_t]).

    The categorical counterpart of :class:`~pyro_worldmodel.model.components.Combiner`, with
    its interface: :meth:`project` is h_t's part of the first layer for every t at once,
    :meth:`step` adds z_{t-1}'s part and runs the rest.
    """

    def __init__(
        self,
        latent_dim: int,
        summary_dim: int,
        latent_classes: int,
        hidden: Sequence[int] = (64,),
        unimix: float = 0.01,
        straight_through: bool = True,
    ):
        super().__init__()
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.summary_dim = check_dim("summary_dim", summary_dim)
        self._categorical(latent_dim, latent_classes, unimix, straight_through)
        self.net = mlp(latent_dim + summary_dim, check_hidden(hidden), latent_dim)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """h_t's part of the first layer, with its bias: ``(..., H)`` → ``(..., W)``."""
        first = self.net[0]
        return nn.functional.linear(h, first.weight[:, self.latent_dim :], first.bias)

    def step_weights(self) -> tuple[torch.Tensor, ...]:
        return (self.net[0].weight[:, : self.latent_dim],)

    def step(self, z_prev: torch.Tensor, projected: torch.Tensor, weights: tuple) -> GroupedOneHot:
        """q(z_t | ·) from z_{t-1} ``(..., Z)`` and ``project(h_t)`` ``(..., W)``."""
        out = nn.functional.linear(z_prev, weights[0]) + projected
        for layer in tuple(self.net)[1:]:
            out = layer(out)
        return self.latent(out)
