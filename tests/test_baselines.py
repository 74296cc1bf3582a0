"""Open-loop baselines against known answers: linear systems they must recover
exactly, noise variances they must estimate, and means computed by hand."""

import pytest
import torch

from pyro_worldmodel.evaluate import CopyLast, LinearLeastSquares
from pyro_worldmodel.spaces import ActionSpace

JUNK = 1e6


def linear_system(X=3, A=2, seed=0):
    """A stable x_{t+1} = F x_t + G a_t + c."""
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(X, X, generator=g, dtype=torch.float64)
    F = 0.8 * F / torch.linalg.eigvals(F).abs().max()
    G = torch.randn(X, A, generator=g, dtype=torch.float64)
    c = torch.randn(X, generator=g, dtype=torch.float64)
    return F, G, c


def roll_out(x_0, actions, F, G, c, noise_std=0.0, g=None):
    """``(B, X)`` and ``(B, T, A)`` → ``(B, T + 1, X)`` states, starting with x_0."""
    xs = [x_0]
    for t in range(actions.shape[1]):
        x = xs[-1] @ F.T + actions[:, t] @ G.T + c
        if noise_std:
            x = x + noise_std * torch.randn(x.shape, generator=g, dtype=torch.float64)
        xs.append(x)
    return torch.stack(xs, 1)


def episodes(lengths, F, G, c, *, noise_std=0.0, padding=JUNK, seed=1):
    """Episodes of the given lengths from the system, padded with ``padding``."""
    g = torch.Generator().manual_seed(seed)
    N, T, X, A = len(lengths), max(lengths), F.shape[0], G.shape[1]
    actions = torch.randn(N, T, A, generator=g, dtype=torch.float64)
    x_0 = torch.randn(N, X, generator=g, dtype=torch.float64)
    obs = roll_out(x_0, actions[:, :-1], F, G, c, noise_std, g)  # (N, T, X)
    mask = torch.arange(T) < torch.tensor(lengths).unsqueeze(1)  # (N, T)
    obs = torch.where(mask.unsqueeze(-1), obs, padding)
    actions = torch.where(mask.unsqueeze(-1), actions, padding)
    return obs, actions, mask


LENGTHS = [40, 23, 31, 17, 40, 28]


# The default ridge shrinks the weights by about 1e-6 relative; open loop over
# 15 steps of states near 10 that becomes about 1e-4.
@pytest.mark.parametrize("ridge, tol", [(None, 1e-4), (1e-13, 1e-9)])
def test_linear_recovers_noise_free_system(ridge, tol):
    F, G, c = linear_system()
    obs, actions, mask = episodes(LENGTHS, F, G, c)
    kwargs = {} if ridge is None else {"ridge": ridge}
    model = LinearLeastSquares(ActionSpace.box(2), **kwargs).fit(obs, actions, mask, horizon=15)

    X, A = 3, 2
    W = model.W
    assert W.shape == (X, X + A + 1)
    assert torch.allclose(W[:, :X], F, atol=tol / 10)
    assert torch.allclose(W[:, X : X + A], G, atol=tol / 10)
    assert torch.allclose(W[:, -1], c, atol=tol / 10)
    assert model.var.shape == (15, X)
    assert (model.var < 1e-8).all()

    # From fresh starts: 5 context steps, then 15 steps open loop.
    g = torch.Generator().manual_seed(7)
    B, C, H = 4, 5, 15
    all_actions = torch.randn(B, C + H - 1, A, generator=g, dtype=torch.float64)
    x_0 = torch.randn(B, X, generator=g, dtype=torch.float64)
    true = roll_out(x_0, all_actions, F, G, c)  # (B, C + H, X)
    pred = model.predict(true[:, :C], all_actions, H)
    assert pred.mean.shape == (B, H, X)
    assert pred.mean.dtype == torch.float64
    assert torch.allclose(pred.mean, true[:, C:], rtol=0, atol=2 * tol)
    assert pred.log_prob(true[:, C:]).sum(-1).shape == (B, H)


def test_linear_noise_variance_matches_true_noise():
    F, G, c = linear_system(seed=3)
    noise_std = 0.1
    obs, actions, mask = episodes([120] * 30 + [60] * 20, F, G, c, noise_std=noise_std, seed=4)
    n = int((mask[:, 1:] & mask[:, :-1]).sum())
    model = LinearLeastSquares(ActionSpace.box(2)).fit(obs, actions, mask, horizon=3)

    # The mean of n squared N(0, σ²) draws has relative sd sqrt(2 / n) ≈ 0.02.
    tol = 4 * (2 / n) ** 0.5
    assert torch.allclose(model.var[0], torch.full((3,), noise_std**2, dtype=torch.float64), rtol=tol)
    # Open loop, noise accumulates: var_2 = σ² (I + F Fᵀ) on the diagonal.
    var_2 = noise_std**2 * (1 + (F**2).sum(1))
    assert torch.allclose(model.var[1], var_2, rtol=2 * tol)
    assert (model.var[2] > model.var[1]).all()


def test_copy_last_predicts_last_context_obs():
    F, G, c = linear_system()
    obs, actions, mask = episodes(LENGTHS, F, G, c, noise_std=0.3)
    model = CopyLast(ActionSpace.box(2)).fit(obs, actions, mask, horizon=4)

    context = obs[:3, :5].float()
    pred = model.predict(context, actions[:3, :8].float(), 4)
    assert pred.mean.dtype == torch.float32
    assert torch.equal(pred.mean, context[:, -1:].expand(3, 4, 3))
    assert torch.allclose(pred.stddev, model.var.sqrt().float().expand(3, 4, 3))


def test_copy_last_variance_is_mean_squared_change():
    F, G, c = linear_system()
    obs, actions, mask = episodes(LENGTHS, F, G, c, noise_std=0.3)
    H = 4
    model = CopyLast(ActionSpace.box(2)).fit(obs, actions, mask, horizon=H)

    for h in range(1, H + 1):
        total, count = torch.zeros(3, dtype=torch.float64), 0
        for n, length in enumerate(LENGTHS):
            for t in range(length - h):
                total += (obs[n, t + h] - obs[n, t]) ** 2
                count += 1
        assert torch.allclose(model.var[h - 1], total / count, rtol=1e-12)


def test_linear_recovers_discrete_action_effects():
    # x_{t+1} = F x_t + b[a_t]: the one-hot columns and the constant column are
    # collinear, so only the predictions are identified, not W itself.
    g = torch.Generator().manual_seed(5)
    F, _, _ = linear_system(X=2, seed=5)
    b = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -2.0]], dtype=torch.float64)  # (n_actions, X)
    N, T = 8, 30
    actions = torch.randint(0, 3, (N, T), generator=g)
    xs = [torch.randn(N, 2, generator=g, dtype=torch.float64)]
    for t in range(T - 1):
        xs.append(xs[-1] @ F.T + b[actions[:, t]])
    obs = torch.stack(xs, 1)
    mask = torch.arange(T) < torch.randint(10, T + 1, (N, 1), generator=g)
    obs = torch.where(mask.unsqueeze(-1), obs, JUNK)
    actions = torch.where(mask, actions, 99)  # out of range, but outside the mask

    model = LinearLeastSquares(ActionSpace.discrete(3)).fit(obs, actions, mask, horizon=2)
    x = torch.randn(5, 1, 2, generator=g, dtype=torch.float64)
    for k in range(3):
        pred = model.predict(x, torch.full((5, 1), k), 1).mean[:, 0]
        assert torch.allclose(pred, x[:, 0] @ F.T + b[k], atol=1e-4)
    assert (model.var < 1e-8).all()


@pytest.mark.parametrize("cls", [CopyLast, LinearLeastSquares])
@pytest.mark.parametrize("kind", ["box", "discrete"])
def test_padding_never_changes_the_fit(cls, kind):
    F, G, c = linear_system()
    obs, actions, mask = episodes(LENGTHS, F, G, c, noise_std=0.1, padding=0.0)
    space = ActionSpace.box(2)
    if kind == "discrete":
        space = ActionSpace.discrete(3)
        actions = torch.where(mask, (actions[..., 0] > 0).long() + (actions[..., 1] > 0).long(), 0)
    pad = ~mask
    junk_obs = obs.masked_fill(pad.unsqueeze(-1), JUNK)
    assert pad[3, -1]
    junk_obs[3, -1] = torch.nan
    if kind == "discrete":
        junk_actions = actions.masked_fill(pad, 7)
    else:
        junk_actions = actions.masked_fill(pad.unsqueeze(-1), -JUNK)

    clean = cls(space).fit(obs, actions, mask, horizon=5)
    dirty = cls(space).fit(junk_obs, junk_actions, mask, horizon=5)
    assert torch.equal(clean.var, dirty.var)
    if cls is LinearLeastSquares:
        assert torch.equal(clean.W, dirty.W)


def fitted(kind="box", horizon=3):
    F, G, c = linear_system()
    obs, actions, mask = episodes(LENGTHS, F, G, c, noise_std=0.1)
    if kind == "discrete":
        return LinearLeastSquares(ActionSpace.discrete(3)).fit(
            obs, (actions[..., 0] > 0).long(), mask, horizon=horizon
        )
    return LinearLeastSquares(ActionSpace.box(2)).fit(obs, actions, mask, horizon=horizon)


BAD_PREDICT = [
    ("horizon_too_long", (2, 5, 3), (2, 8, 2), 4, r"horizon: expected an int in \[1, 3\].*got 4"),
    ("horizon_zero", (2, 5, 3), (2, 4, 2), 0, r"horizon: .*got 0"),
    ("obs_dim", (2, 5, 4), (2, 7, 2), 3, r"context_obs: expected shape \(B, C, 3\), got \(2, 5, 4\)"),
    ("obs_rank", (5, 3), (2, 7, 2), 3, r"context_obs: expected shape \(B, C, 3\), got \(5, 3\)"),
    ("no_context", (2, 0, 3), (2, 2, 2), 3, r"context_obs: expected C >= 1"),
    ("actions_length", (2, 5, 3), (2, 8, 2), 3, r"actions: expected shape .* = \(2, 7, 2\), got \(2, 8, 2\)"),
    ("actions_batch", (2, 5, 3), (3, 7, 2), 3, r"actions: expected shape .* = \(2, 7, 2\), got \(3, 7, 2\)"),
    ("actions_dim", (2, 5, 3), (2, 7, 1), 3, r"actions: expected shape .* = \(2, 7, 2\), got \(2, 7, 1\)"),
]


@pytest.mark.parametrize(
    "obs_shape, actions_shape, horizon, match", [b[1:] for b in BAD_PREDICT], ids=[b[0] for b in BAD_PREDICT]
)
def test_predict_rejects_bad_input(obs_shape, actions_shape, horizon, match):
    model = fitted()
    with pytest.raises(ValueError, match=match):
        model.predict(torch.zeros(obs_shape), torch.zeros(actions_shape), horizon)


def test_predict_rejects_bad_discrete_actions():
    model = fitted("discrete")
    obs = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match=r"actions: expected an integer dtype"):
        model.predict(obs, torch.zeros(2, 7), 3)
    with pytest.raises(ValueError, match=r"actions: expected integers in \[0, 3\), got 3"):
        model.predict(obs, torch.full((2, 7), 3), 3)
    with pytest.raises(ValueError, match=r"actions: expected shape \(B, C \+ horizon - 1\) = \(2, 7\)"):
        model.predict(obs, torch.zeros(2, 7, 3, dtype=torch.long), 3)
    assert model.predict(obs, torch.full((2, 7), 2), 3).mean.shape == (2, 3, 3)


@pytest.mark.parametrize("cls", [CopyLast, LinearLeastSquares])
def test_predict_before_fit(cls):
    with pytest.raises(ValueError, match=r"call fit\(\.\.\.\) before predict"):
        cls(ActionSpace.box(2)).predict(torch.zeros(1, 1, 3), torch.zeros(1, 1, 2), 1)


def test_fit_rejects_bad_input():
    F, G, c = linear_system()
    obs, actions, mask = episodes(LENGTHS, F, G, c)
    model = LinearLeastSquares(ActionSpace.box(2))
    with pytest.raises(ValueError, match=r"horizon: expected a positive int, got 0"):
        model.fit(obs, actions, mask, horizon=0)
    with pytest.raises(
        ValueError, match=r"horizon: 40 needs an episode of at least 41 steps, got at most 40"
    ):
        model.fit(obs, actions, mask, horizon=40)
    with pytest.raises(ValueError, match=r"obs: expected a tensor of shape \(N, T, X\), got \(40, 3\)"):
        model.fit(obs[0], actions, mask, horizon=2)
    with pytest.raises(ValueError, match=r"actions: expected shape \(B, T, 2\), got \(6, 40\)"):
        model.fit(obs, actions[..., 0], mask, horizon=2)
    holes = mask.clone()
    holes[0, 3] = False
    with pytest.raises(ValueError, match=r"mask: expected each row to be a prefix of True"):
        model.fit(obs, actions, holes, horizon=2)
    for ridge in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"ridge: expected a positive number"):
            LinearLeastSquares(ActionSpace.box(2), ridge=ridge)
