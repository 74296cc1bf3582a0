"""Input checks: every bad input gets a ValueError naming argument, expected and actual."""

import math

import numpy as np
import pyro
import pytest
import torch

from pyro_worldmodel import ActionSpace, FilterGuide, WorldModel, fit
from pyro_worldmodel.spaces import check_device


def box_model():
    model = WorldModel.default(3, ActionSpace.box(2), latent_dim=2, hidden=(8,))
    return model, FilterGuide.for_model(model, rnn_dim=8, hidden=(8,))


def discrete_model():
    model = WorldModel.default(3, ActionSpace.discrete(4), latent_dim=2, hidden=(8,))
    return model, FilterGuide.for_model(model, rnn_dim=8, hidden=(8,))


def good_box(B=2, T=5):
    return torch.randn(B, T, 3), torch.randn(B, T, 2)


def junk(value, b, t):
    def f(x):
        x = x.clone()
        x[b, t] = value
        return x

    return f


BAD_BOX = [
    ("obs_rank", lambda o, a, m: (o[0], a, m), r"obs: expected shape \(B, T, 3\), got \(5, 3\)"),
    ("obs_dim", lambda o, a, m: (o[..., :2], a, m), r"obs: expected shape \(B, T, 3\), got \(2, 5, 2\)"),
    ("actions_rank", lambda o, a, m: (o, a[..., 0], m), r"actions: expected shape \(B, T, 2\), got \(2, 5\)"),
    (
        "B_disagree",
        lambda o, a, m: (o, a[:1], m),
        r"actions: expected \(B, T\) = \(2, 5\) as in obs, got \(1, 5\)",
    ),
    (
        "T_disagree",
        lambda o, a, m: (o, a[:, :4], m),
        r"actions: expected \(B, T\) = \(2, 5\) as in obs, got \(2, 4\)",
    ),
    (
        "obs_nan",
        lambda o, a, m: (junk(math.nan, 1, 3)(o), a, m),
        r"obs: expected finite values where mask is True, got 1 steps with NaN or inf \(first at episode 1, step 3\)",
    ),
    (
        "obs_inf",
        lambda o, a, m: (junk(math.inf, 0, 0)(o), a, m),
        r"obs: expected finite values .* \(first at episode 0, step 0\)",
    ),
    (
        "actions_nan",
        lambda o, a, m: (o, junk(math.nan, 0, 2)(a), m),
        r"actions: expected finite values .* \(first at episode 0, step 2\)",
    ),
    (
        "mask_shape",
        lambda o, a, m: (o, a, torch.ones(2, 4, dtype=torch.bool)),
        r"mask: expected shape \(B, T\) = \(2, 5\), got \(2, 4\)",
    ),
    (
        "mask_dtype",
        lambda o, a, m: (o, a, torch.ones(2, 5)),
        r"mask: expected dtype torch.bool, got torch.float32",
    ),
    (
        "mask_hole",
        lambda o, a, m: (o, a, torch.tensor([[True] * 5, [True, False, True, True, False]])),
        r"mask: expected each row to be a prefix of True values .* got True after False at episode 1, step 2",
    ),
    (
        "mask_left_padded",
        lambda o, a, m: (o, a, torch.tensor([[False, True, True, True, True]] * 2)),
        r"mask: expected each row to be a prefix .* at episode 0, step 1",
    ),
    (
        "mask_empty_episode",
        lambda o, a, m: (o, a, torch.tensor([[True] * 5, [False] * 5])),
        r"mask: expected at least one observed step per episode, got none in episodes \[1\]",
    ),
    (
        "actions_int_for_box",
        lambda o, a, m: (o, a.long(), m),
        r"actions: expected a floating dtype for a box space, got torch.int64",
    ),
]


@pytest.mark.parametrize("name,corrupt,message", BAD_BOX, ids=[b[0] for b in BAD_BOX])
def test_bad_box_input_raises_before_any_svi_step(name, corrupt, message):
    model, guide = box_model()
    before = [p.detach().clone() for p in (*model.parameters(), *guide.parameters())]
    obs, actions, mask = corrupt(*good_box(), None)
    with pytest.raises(ValueError, match=message):
        fit(model, guide, obs, actions, mask, num_steps=3, progress=False)
    assert len(pyro.get_param_store()) == 0  # neither program ever ran
    after = [p.detach() for p in (*model.parameters(), *guide.parameters())]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


BAD_DISCRETE = [
    (
        "float_actions",
        lambda a: a.float(),
        r"actions: expected an integer dtype for a discrete action space, got torch.float32",
    ),
    ("out_of_range", junk(4, 1, 2), r"actions: expected integers in \[0, 4\), got 4 at episode 1, step 2"),
    ("negative", junk(-1, 0, 0), r"actions: expected integers in \[0, 4\), got -1 at episode 0, step 0"),
    (
        "box_shaped",
        lambda a: a[..., None],
        r"actions: expected shape \(B, T\) for 4 discrete actions, got \(2, 5, 1\)",
    ),
]


@pytest.mark.parametrize("name,corrupt,message", BAD_DISCRETE, ids=[b[0] for b in BAD_DISCRETE])
def test_bad_discrete_actions_raise_before_any_svi_step(name, corrupt, message):
    model, guide = discrete_model()
    obs, actions = torch.randn(2, 5, 3), torch.randint(4, (2, 5))
    with pytest.raises(ValueError, match=message):
        fit(model, guide, obs, corrupt(actions), num_steps=3, progress=False)
    assert len(pyro.get_param_store()) == 0


def test_the_model_itself_checks_its_inputs():
    model, guide = box_model()
    obs, actions = good_box()
    with pytest.raises(ValueError, match="obs: expected finite values"):
        model.model(junk(math.nan, 0, 0)(obs), actions)
    with pytest.raises(ValueError, match=r"mask: expected shape"):
        guide(obs, actions, torch.ones(5, 2, dtype=torch.bool))


def test_nan_outside_the_mask_is_allowed_and_zeroed():
    model, _ = box_model()
    obs, actions = good_box()
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    obs[1, 3] = math.nan
    actions[1, 4] = math.inf
    clean_obs, clean_actions, _ = model.check_inputs(obs, actions, mask)
    assert torch.isfinite(clean_obs).all() and torch.isfinite(clean_actions).all()
    assert torch.equal(clean_obs[1, 2:], torch.zeros(3, 3))


def test_bad_fit_arguments():
    model, guide = box_model()
    obs, actions = good_box()
    cases = [
        (dict(num_steps=0), r"num_steps: expected an int >= 1, got 0"),
        (dict(batch_size=-1), r"batch_size: expected an int >= 1, got -1"),
        (dict(train="both"), r"train: expected 'all', 'model' or 'guide', got 'both'"),
        (dict(elbo="TraceMeanField_ELBO"), r"elbo: expected a pyro.infer.ELBO instance, got str"),
        (dict(resume=True), r"resume: expected a checkpoint path"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            fit(model, guide, obs, actions, progress=False, **kwargs)


def test_action_space_from_gymnasium_spaces():
    import gymnasium as gym

    assert ActionSpace.from_gym(gym.spaces.Discrete(3)) == ActionSpace.discrete(3)
    box = ActionSpace.from_gym(gym.spaces.Box(-2.0, 2.0, shape=(1,)))
    assert box == ActionSpace.box(1, -2.0, 2.0)
    with pytest.raises(ValueError, match=r"space: expected a rank-1 Box or a Discrete space"):
        ActionSpace.from_gym(gym.spaces.Box(0, 1, shape=(2, 2)))


def test_discrete_action_features_are_one_hot():
    space = ActionSpace.discrete(3)
    feats = space.features(torch.tensor([[0, 2]]), torch.float32)
    assert torch.equal(feats, torch.tensor([[[1.0, 0, 0], [0, 0, 1]]]))


BAD_ACTION_SPACES = [
    (
        "low_above_high",
        lambda: ActionSpace.box(1, (1.0,), (-1.0,)),
        r"low: expected low <= high in every dimension, got low 1.0 > high -1.0 in dimension 0",
    ),
    (
        "low_above_high_in_dim_1",
        lambda: ActionSpace.box(2, (0.0, 3.0), 2.0),
        r"low: expected low <= high .* got low 3.0 > high 2.0 in dimension 1",
    ),
    (
        "nan_low",
        lambda: ActionSpace.box(2, math.nan),
        r"low: expected numbers or ±inf, got NaN in dimension 0",
    ),
    (
        "nan_high",
        lambda: ActionSpace.box(2, None, (1.0, math.nan)),
        r"high: expected numbers or ±inf, got NaN in dimension 1",
    ),
    (
        "string_bound",
        lambda: ActionSpace.box(2, "-1"),
        r"low: expected real numbers, got '-1' in dimension 0",
    ),
    (
        "complex_bound",
        lambda: ActionSpace.box(2, (0.0, 1j)),
        r"low: expected real numbers, got 1j in dimension 1",
    ),
    (
        "bool_bound",
        lambda: ActionSpace.box(2, None, (True, 1.0)),
        r"high: expected real numbers, got True in dimension 0",
    ),
    ("short_bound", lambda: ActionSpace.box(2, (0.0,)), r"low: expected 2 values, got 1"),
    ("scalar_bound", lambda: ActionSpace("box", 2, 1.0), r"low: expected a sequence of 2 numbers, got 1.0"),
    ("bool_dim", lambda: ActionSpace.box(True), r"dim: expected a positive int, got True"),
    ("float_dim", lambda: ActionSpace.discrete(2.0), r"dim: expected a positive int, got 2.0"),
    ("str_dim", lambda: ActionSpace("box", "2"), r"dim: expected a positive int, got '2'"),
    ("zero_dim", lambda: ActionSpace.discrete(0), r"dim: expected a positive int, got 0"),
    ("kind", lambda: ActionSpace("continuous", 2), r"kind: expected 'box' or 'discrete', got 'continuous'"),
    ("kind_not_str", lambda: ActionSpace(["box"], 2), r"kind: expected 'box' or 'discrete', got \['box'\]"),
    (
        "discrete_bounds",
        lambda: ActionSpace("discrete", 2, (0.0, 0.0)),
        r"low: discrete spaces take no bounds",
    ),
]


@pytest.mark.parametrize("name,make,message", BAD_ACTION_SPACES, ids=[b[0] for b in BAD_ACTION_SPACES])
def test_bad_action_spaces_are_refused_by_name(name, make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_action_space_bounds_may_be_infinite_or_arrays():
    unbounded = ActionSpace.box(2, -math.inf, math.inf)
    assert unbounded.low == (-math.inf, -math.inf) and unbounded.high == (math.inf, math.inf)
    assert ActionSpace.box(1, (2.0,), (2.0,)).low == (2.0,)  # a single point is a valid box
    from_arrays = ActionSpace.box(np.int64(2), np.array([-1.0, 0.0]), torch.tensor([1.0, 0.5]))
    assert from_arrays == ActionSpace.box(2, (-1.0, 0.0), (1.0, 0.5))
    assert type(from_arrays.dim) is int and all(type(v) is float for v in from_arrays.high)
    assert ActionSpace(np.str_("discrete"), 3).kind.__class__ is str


def test_check_device_parses_and_leaves_none_alone():
    assert check_device(None) is None
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")
    cases = [
        ("gpu", r"device: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu'"),
        ("", r"device: expected a torch device such as .* got ''"),
        ("cuda:x", r"device: expected a torch device such as .* got 'cuda:x'"),
        (0, r"device: expected a str or torch.device such as 'cpu' or 'cuda:0', got int"),
        ("meta", r"device: expected 'cpu', 'cuda', 'mps' or 'xpu', optionally with an index .* got 'meta'"),
    ]
    for device, message in cases:
        with pytest.raises(ValueError, match=message):
            check_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_check_device_refuses_cuda_without_a_cuda_device():
    with pytest.raises(
        ValueError,
        match=r"^device: expected a device this machine has, got 'cuda' \(no CUDA device is available\)$",
    ):
        check_device("cuda")
    with pytest.raises(ValueError, match=r"got 'cuda:0' \(no CUDA device is available\)"):
        check_device(torch.device("cuda", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_check_device_refuses_a_cuda_index_past_the_last_device():
    n = torch.cuda.device_count()
    assert check_device(f"cuda:{n - 1}") == torch.device("cuda", n - 1)
    with pytest.raises(ValueError, match=rf"got 'cuda:{n}' \(this machine has {n} CUDA device"):
        check_device(f"cuda:{n}")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_check_device_refuses_mps_without_it():
    with pytest.raises(ValueError, match=r"got 'mps' \(no MPS device is available\)"):
        check_device("mps")
