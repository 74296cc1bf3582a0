"""Guides q(z | x, a): Pyro programs over the same ``z_{t}`` sites as the model."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import torch
from torch import nn

from ._naming import register, unique_name
from .components import Combiner
from .spaces import ActionSpace, ChecksInputs


class FilterGuide(ChecksInputs, nn.Module):
    """q(z_t | z_{t-1}, x_{≤t}, a_{<t}): the seed's Bayesian filter.

    A GRU summarises the past, h_t = GRU(h_{t-1}, [x_t, a_{t-1}]), and a
    :class:`~pyro_worldmodel.components.Combiner` turns ``z_{t-1}`` and
    ``[h_t, x_t, a_{t-1}]`` into q(z_t | ·). The current inputs reach the
    combiner directly as well as through the GRU, so that its linear path
    can read x_t at full precision. The GRU runs over the whole sequence in
    one call; only the z recurrence is a Python loop.

    :param obs_dim: X, the size of x_t.
    :param action_space: the actions a_t.
    :param latent_dim: Z, the size of z_t.
    :param rnn_dim: size of the GRU state h_t.
    :param hidden: hidden widths of the combiner MLP.
    :param name: prefix in Pyro's param store; unique by default.
    """

    def __init__(
        self,
        obs_dim: int,
        action_space: ActionSpace,
        latent_dim: int,
        rnn_dim: int = 64,
        hidden: Sequence[int] = (64,),
        *,
        name: str | None = None,
    ):
        super().__init__()
        self.obs_dim = obs_dim
        self.action_space = action_space
        self.latent_dim = latent_dim
        self.rnn_dim = rnn_dim
        self.hidden = tuple(hidden)
        self.rnn = nn.GRU(obs_dim + action_space.feature_dim, rnn_dim, batch_first=True)
        self.combiner = Combiner(latent_dim, rnn_dim + obs_dim + action_space.feature_dim, hidden)
        self.z_0 = nn.Parameter(torch.zeros(latent_dim))  # stands in for z_{t-1} at t = 0
        self.name = unique_name("filter_guide", name)

    @classmethod
    def for_model(cls, model, **kwargs) -> FilterGuide:
        """A filter whose sizes match ``model``'s."""
        return cls(model.obs_dim, model.action_space, model.latent_dim, **kwargs)

    def init_reading(self, obs_map: torch.Tensor, scale: torch.Tensor) -> None:
        """Start as q(z_t | ·) = N(obs_map x_t, diag scale²): the latent read off the observation.

        :param obs_map: ``(Z, X)``; :param scale: ``(Z,)``.
        """
        Z, R = self.latent_dim, self.rnn.hidden_size
        weight = torch.zeros(Z, Z + R + self.obs_dim + self.action_space.feature_dim)
        weight[:, Z + R : Z + R + self.obs_dim] = obs_map
        self.combiner.init_linear(weight, torch.zeros(Z), scale)

    def forward(self, obs, actions, mask=None, **_):
        """The Pyro guide; takes the model's arguments. :returns: ``(B, T, Z)``.

        Keyword arguments of the model (``horizon``, ``future_actions``) are
        ignored: steps past the data are left to the model's prior.
        """
        obs, actions, mask = self.check_inputs(obs, actions, mask)
        B, T = mask.shape
        register(self.name, self)
        a_feat = self.action_space.features(actions, obs.dtype)  # (B, T, A)
        a_prev = torch.cat([torch.zeros_like(a_feat[:, :1]), a_feat[:, :-1]], dim=1)  # a_{t-1}
        inputs = torch.cat([obs, a_prev], dim=-1)  # (B, T, X + A)
        h, _ = self.rnn(inputs)  # (B, T, H)
        h = torch.cat([h, inputs], dim=-1)  # (B, T, H + X + A)
        z = [self.z_0.expand(B, 1, self.latent_dim)]
        with pyro.plate("episodes", B, dim=-2):
            for t in pyro.markov(range(T)):
                q_t = self.combiner(z[-1], h[:, t : t + 1])  # (..., B, 1, Z)
                z.append(pyro.sample(f"z_{t}", q_t.mask(mask[:, t : t + 1])))
        return torch.cat(z[1:], dim=-2)  # (..., B, T, Z)
