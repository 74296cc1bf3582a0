"""An agent that acts in a real environment from its world model's imagination."""

from __future__ import annotations

import numpy as np
import torch

from ..data import Normalizer
from ..spaces import ActionSpace
from .planners import LatentState, belief, box_centre, clip_to_space


class Agent:
    """Acts in real units with a planner: filters the episode so far into a
    :class:`~pyro_worldmodel.act.LatentState`, plans in model units, and maps back.

    :param model: a :class:`~pyro_worldmodel.model.WorldModel` with a reward head
        (for the planners that value futures).
    :param guide: its guide, used as the filter.
    :param planner: has ``plan(model, state, reward_scale=, reward_loc=)``.
    :param normalizer: real ↔ model units; None if the model trains in real units.
    :param action_space: the environment's action space (real units); planned
        actions are clipped into it.
    :param context: the guide filters the last this many steps.
    :param explore: box: the standard deviation of Gaussian noise added to each
        action (model units); discrete: the chance of a uniformly random action.
    """

    def __init__(
        self,
        model,
        guide,
        planner,
        normalizer: Normalizer | None,
        action_space: ActionSpace,
        *,
        context: int = 16,
        explore: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        if not isinstance(context, int) or isinstance(context, bool) or context < 1:
            raise ValueError(f"context: expected a positive int, got {context!r}")
        if not isinstance(explore, (int, float)) or explore < 0:
            raise ValueError(f"explore: expected a number >= 0, got {explore!r}")
        self.model, self.guide, self.planner, self.normalizer = model, guide, planner, normalizer
        self.action_space, self.context, self.explore = action_space, context, float(explore)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._ref = next(model.parameters())
        self._reward_units = reward_units(normalizer, model)
        self.reset(None)

    def reset(self, obs) -> None:
        """Start new episodes (``obs`` is shown again to :meth:`act`)."""
        self._obs: list[torch.Tensor] = []
        self._actions: list[torch.Tensor] = []

    def state(self) -> LatentState:
        """The belief about the present from the steps seen so far."""
        obs = torch.stack(self._obs[-self.context :], 1)  # (B, C, X)
        B, C = obs.shape[:2]
        space = self.model.action_space
        if space.kind == "discrete":
            placeholder = torch.zeros(B, dtype=torch.long, device=obs.device)
        else:  # the box's centre: inside any bounded policy's box
            placeholder = box_centre(space, obs).expand(B, space.dim)
        past = self._actions[-(C - 1) :] if C > 1 else []
        actions = torch.stack([*past, placeholder], 1)
        return belief(self.model, self.guide, obs, actions)

    @torch.no_grad()
    def act(self, obs) -> np.ndarray:
        """Actions ``(B, A)`` (or ``(B,)`` integers) in real units for observations ``(B, X)``."""
        x = torch.as_tensor(np.array(obs)).to(self._ref)  # a copy: the caller may reuse its array
        if self.normalizer is not None:
            x = self.normalizer.obs(x)
        self._obs.append(x)
        a = self.planner.plan(self.model, self.state(), **self._reward_units)
        space = self.model.action_space
        if self.explore:
            if space.kind == "discrete":
                flip = torch.rand(a.shape, generator=self.generator) < self.explore
                rand = torch.randint(space.dim, a.shape, generator=self.generator)
                a = torch.where(flip.to(a.device), rand.to(a.device), a)
            else:
                noise = torch.randn(a.shape, generator=self.generator).to(a)
                a = clip_to_space(a + self.explore * noise, space)
        self._actions.append(a)
        if space.kind == "discrete":
            return a.cpu().numpy().astype(np.int64)
        real = a if self.normalizer is None else self.normalizer.actions_inverse(a)
        real = clip_to_space(real.double(), self.action_space)  # in the env's own box, despite rounding
        return real.cpu().numpy().astype(np.float32)


def reward_units(normalizer, model) -> dict:
    """The planners' keywords that map the reward head's units to real ones."""
    ref = next(model.parameters())
    if normalizer is None or normalizer.reward_loc is None:
        return {"reward_scale": 1.0, "reward_loc": 0.0}
    return {"reward_scale": normalizer.reward_scale.to(ref), "reward_loc": normalizer.reward_loc.to(ref)}
