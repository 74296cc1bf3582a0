"""Open-loop prediction baselines that a world model is compared against.

Given the observations x_{0:C} of a context and the actions a_{C-1:C+H-1}, each
baseline predicts x_{C+h} for h = 1 … H as a diagonal Gaussian whose mean is a
deterministic rollout from the last context observation and whose variance
per horizon and dimension is the mean squared error of that rollout on the
training data. Everything is in model units; the caller converts units.

* :class:`CopyLast`: x_{C+h} = x_{C-1} for every h.
* :class:`LinearLeastSquares`: x_{t+1} = W [x_t, feat(a_t), 1], W by ridge
  regression, rolled out open loop.
"""

from __future__ import annotations

import torch
from torch.distributions import Normal

from ..spaces import ActionSpace, check_inputs

# Parameters and rollouts are computed in float64: the best baselines reach
# MSEs near 1e-7, where float32 normal equations lose every digit.
_DTYPE = torch.float64


class OpenLoopBaseline:
    """An open-loop predictor with a Gaussian noise model fitted per horizon.

    Subclasses define one deterministic step x_{t+1} = f(x_t, feat(a_t)) and
    how to fit it.

    :param action_space: the actions' :class:`~pyro_worldmodel.spaces.ActionSpace`.
    :param min_var: floor on the fitted variances, so that a perfect fit still
        gives a proper distribution.
    :ivar var: ``(H, X)`` mean squared error of the rollout at each horizon,
        after :meth:`fit`.
    :ivar horizon: H, the longest horizon :meth:`predict` accepts.
    :ivar obs_dim: X.
    """

    def __init__(self, action_space: ActionSpace, *, min_var: float = 1e-12):
        if not isinstance(action_space, ActionSpace):
            raise ValueError(f"action_space: expected an ActionSpace, got {type(action_space).__name__}")
        if not min_var > 0:
            raise ValueError(f"min_var: expected a positive number, got {min_var!r}")
        self.action_space = action_space
        self.min_var = float(min_var)
        self.var: torch.Tensor | None = None
        self.horizon: int | None = None
        self.obs_dim: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.action_space}, horizon={self.horizon})"

    # -- what subclasses define ---------------------------------------------------

    def _fit_step(self, x_t: torch.Tensor, feat_t: torch.Tensor, x_next: torch.Tensor) -> None:
        """Fit the step to ``(n, X)``, ``(n, A)`` → ``(n, X)`` valid transitions."""

    def _step(self, x_t: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        """x_{t+1} from ``(..., X)`` and ``(..., A)``."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------

    def fit(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        horizon: int,
    ) -> OpenLoopBaseline:
        """Fit the step on every valid transition, then the variance at each horizon.

        The variance at horizon h is the mean over every start t with t and
        t + h inside the mask of (x_{t+h} − x̂_{t+h})², where x̂ is the rollout
        from x_t under the true actions a_t … a_{t+h-1}.

        :param obs: ``(N, T, X)`` reals.
        :param actions: ``(N, T, A)`` reals, or ``(N, T)`` integers for discrete spaces.
        :param mask: ``(N, T)`` bool, each row True then False; None for all True.
            Values outside it are never read.
        :param horizon: H, the longest horizon to fit a variance for.
        :returns: ``self``.
        """
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(f"horizon: expected a positive int, got {horizon!r}")
        if not (torch.is_tensor(obs) and obs.dim() == 3):
            shape = tuple(obs.shape) if torch.is_tensor(obs) else type(obs).__name__
            raise ValueError(f"obs: expected a tensor of shape (N, T, X), got {shape}")
        obs, actions, mask = check_inputs(
            obs,
            actions,
            mask,
            obs_dim=obs.shape[-1],
            action_space=self.action_space,
            dtype=_DTYPE,
            device=obs.device,
        )  # zeros outside the mask
        T = mask.shape[1]
        longest = int(mask.sum(1).max())
        if longest < horizon + 1:
            raise ValueError(
                f"horizon: {horizon} needs an episode of at least {horizon + 1} steps, got at most {longest}"
            )
        feats = self.action_space.features(actions, _DTYPE)  # (N, T, A)

        valid = mask[:, :-1] & mask[:, 1:]  # (N, T-1) both ends of x_t → x_{t+1} observed
        self._fit_step(obs[:, :-1][valid], feats[:, :-1][valid], obs[:, 1:][valid])

        # Roll out from every start at once; after h steps, x_hat[:, s] predicts x_{s+h}.
        x_hat = obs  # (N, T, X)
        var = []
        for h in range(1, horizon + 1):
            x_hat = self._step(x_hat[:, : T - h], feats[:, h - 1 : T - 1])  # (N, T-h, X)
            in_mask = mask[:, h:].unsqueeze(-1)  # (N, T-h, 1); mask[s+h] implies mask[s]
            sq_err = torch.where(in_mask, (obs[:, h:] - x_hat) ** 2, 0.0)
            var.append(sq_err.sum((0, 1)) / in_mask.sum())  # (X,)
        self.var = torch.stack(var).clamp(min=self.min_var)  # (H, X)
        self.horizon = horizon
        self.obs_dim = obs.shape[-1]
        return self

    @torch.no_grad()
    def predict(self, context_obs: torch.Tensor, actions: torch.Tensor, horizon: int) -> Normal:
        """p(x_{C+h} | x_{C-1}, a_{C-1:C+h}) for h = 1 … ``horizon``, open loop.

        :param context_obs: ``(B, C, X)``; only the last step x_{C-1} is used.
        :param actions: ``(B, C + horizon - 1, A)`` reals, or ``(B, C + horizon - 1)``
            integers: the context's actions, then the future ones. a_{C-1}
            drives the first prediction.
        :param horizon: at most the horizon given to :meth:`fit`.
        :returns: a ``Normal`` with batch shape ``(B, horizon, X)``, in the dtype
            of ``context_obs``.
        """
        context_obs, feats = self._check_predict(context_obs, actions, horizon)
        C = context_obs.shape[1]
        x_hat = context_obs[:, -1].to(_DTYPE)  # (B, X)
        locs = []
        for h in range(horizon):
            x_hat = self._step(x_hat, feats[:, C - 1 + h])  # (B, X)
            locs.append(x_hat)
        loc = torch.stack(locs, 1)  # (B, H, X)
        scale = self.var[:horizon].to(loc.device).sqrt().expand_as(loc)
        dtype = context_obs.dtype
        return Normal(loc.to(dtype), scale.to(dtype))

    def _check_predict(self, context_obs, actions, horizon):
        """Checked ``context_obs`` ``(B, C, X)`` and action features ``(B, C+H-1, A)``."""
        if self.var is None:
            raise ValueError(f"{type(self).__name__}: call fit(...) before predict(...)")
        if not isinstance(horizon, int) or isinstance(horizon, bool) or not 1 <= horizon <= self.horizon:
            raise ValueError(
                f"horizon: expected an int in [1, {self.horizon}] (the fitted horizon), got {horizon!r}"
            )
        X = self.obs_dim
        if not torch.is_tensor(context_obs) or context_obs.dim() != 3 or context_obs.shape[-1] != X:
            shape = tuple(context_obs.shape) if torch.is_tensor(context_obs) else type(context_obs).__name__
            raise ValueError(f"context_obs: expected shape (B, C, {X}), got {shape}")
        if not context_obs.is_floating_point():
            raise ValueError(f"context_obs: expected a floating dtype, got {context_obs.dtype}")
        B, C = context_obs.shape[:2]
        if C < 1:
            raise ValueError(
                f"context_obs: expected C >= 1 context steps, got shape {tuple(context_obs.shape)}"
            )
        L = C + horizon - 1
        space = self.action_space
        if not torch.is_tensor(actions):
            raise ValueError(f"actions: expected a tensor, got {type(actions).__name__}")
        if space.kind == "discrete":
            expected = (B, L)
            if actions.dtype.is_floating_point or actions.dtype == torch.bool or actions.is_complex():
                raise ValueError(
                    f"actions: expected an integer dtype for discrete actions, got {actions.dtype}"
                )
        else:
            expected = (B, L, space.dim)
            if not actions.is_floating_point():
                raise ValueError(f"actions: expected a floating dtype for box actions, got {actions.dtype}")
        if tuple(actions.shape) != expected:
            raise ValueError(
                f"actions: expected shape (B, C + horizon - 1{', A' if space.kind == 'box' else ''})"
                f" = {expected}, got {tuple(actions.shape)}"
            )
        if space.kind == "discrete":
            bad = (actions < 0) | (actions >= space.dim)
            if bad.any():
                raise ValueError(
                    f"actions: expected integers in [0, {space.dim}), got {actions[bad][0].item()}"
                )
            actions = actions.long()
        return context_obs, space.features(actions, _DTYPE)


class CopyLast(OpenLoopBaseline):
    """x_{C+h} = x_{C-1}: nothing changes after the context."""

    def _step(self, x_t: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        return x_t


class LinearLeastSquares(OpenLoopBaseline):
    """x_{t+1} = W [x_t, feat(a_t), 1], fitted by ridge regression, rolled out open loop.

    :param action_space: the actions' :class:`~pyro_worldmodel.spaces.ActionSpace`.
    :param ridge: the ridge penalty on the weights of x_t and feat(a_t), relative
        to their mean variance, to keep the solve well-posed: one-hot features of
        discrete actions always sum to one. The constant is not penalised.
    :param min_var: floor on the fitted variances.
    :ivar W: ``(X, X + A + 1)`` float64, the columns acting on x_t, feat(a_t), then 1.
    """

    def __init__(self, action_space: ActionSpace, *, ridge: float = 1e-6, min_var: float = 1e-12):
        super().__init__(action_space, min_var=min_var)
        if not ridge > 0:
            raise ValueError(f"ridge: expected a positive number, got {ridge!r}")
        self.ridge = float(ridge)
        self.W: torch.Tensor | None = None

    def _fit_step(self, x_t, feat_t, x_next):
        # Centred, so that the ridge never shrinks the constant column.
        u = torch.cat([x_t, feat_t], -1)  # (n, X + A)
        u_mean, x_next_mean = u.mean(0), x_next.mean(0)
        u = u - u_mean
        gram = u.T @ u  # (X + A, X + A)
        lam = self.ridge * gram.diagonal().mean()
        if lam == 0:  # every regressor constant: W_u = 0
            lam = self.ridge
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        W_u = torch.linalg.solve(gram + lam * eye, u.T @ (x_next - x_next_mean)).T  # (X, X + A)
        self.W = torch.cat([W_u, (x_next_mean - W_u @ u_mean).unsqueeze(-1)], -1)  # (X, X + A + 1)

    def _step(self, x_t, feat_t):
        return _regressors(x_t, feat_t) @ self.W.to(x_t.device).T


def _regressors(x_t: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """[x_t, feat(a_t), 1] along the last dimension."""
    return torch.cat([x_t, feat_t, x_t.new_ones(*x_t.shape[:-1], 1)], -1)
