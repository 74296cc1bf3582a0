"""JitTraceMeanField_ELBO: compiled once per input shape, and the eager bound at every shape."""

import contextlib
import warnings

import pyro
import pytest
import torch
from worlds import X, world
from worlds_with_heads import small_world

from pyro_worldmodel import fit
from pyro_worldmodel.infer import minibatch_indices
from pyro_worldmodel.infer.elbos import JitTraceMeanField_ELBO, TraceMeanField_ELBO


def data(lengths=(6, 6, 4, 2), T=6):
    g = torch.Generator().manual_seed(3)
    mask = torch.arange(T) < torch.tensor(lengths)[:, None]
    B = len(lengths)
    return torch.randn(B, T, X, generator=g), torch.randn(B, T, 2, generator=g), mask


def first(T, args):
    return tuple(a[:, :T] for a in args)


@contextlib.contextmanager
def pyro_jit_deprecation_ignored():
    """Pyro's own Jit ELBOs call torch.jit.trace, deprecated in torch 2.13, and say nothing about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.trace` is deprecated", category=DeprecationWarning
        )
        yield


def test_it_compiles_once_per_shape_and_gives_the_eager_value_at_each():
    """Pyro 1.9.2 keys a compiled loss by the number of arguments: compiled at T=6, it
    would return T=6's answer at T=4 (docs/pyro_pitfalls.md, "Jit ELBOs")."""
    model, guide = world()
    args = data()
    jit = JitTraceMeanField_ELBO(max_plate_nesting=2)
    eager = TraceMeanField_ELBO(max_plate_nesting=2)
    for _ in range(3):
        jit.loss_and_grads(model.model, guide, *args)
    assert jit.compilations == 1
    jit.loss(model.model, guide, *first(4, args))  # compiling consumes random numbers: compile first
    assert jit.compilations == 2
    for T in (6, 4, 6, 4):
        for seed in (11, 12):
            pyro.set_rng_seed(seed)
            got = jit.loss(model.model, guide, *first(T, args))
            pyro.set_rng_seed(seed)
            assert got == pytest.approx(eager.loss(model.model, guide, *first(T, args)), rel=1e-5), T
    assert jit.compilations == 2  # going back to T=6 did not recompile
    assert set(jit.kl_estimators.values()) == {"analytic"}


def grads_on_the_same_noise(elbo, model, guide, args, seed, model_fn=None):
    params = {**dict(model.named_parameters()), **{f"guide.{n}": p for n, p in guide.named_parameters()}}
    for p in params.values():
        p.grad = None
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(model.model if model_fn is None else model_fn, guide, *args)
    return loss, {n: p.grad.clone() for n, p in params.items() if p.grad is not None}, len(params)


@pytest.mark.parametrize(
    "jit_cls, eager_cls",
    [
        (pyro.infer.JitTrace_ELBO, pyro.infer.Trace_ELBO),
        (pyro.infer.JitTraceGraph_ELBO, pyro.infer.TraceGraph_ELBO),
        (JitTraceMeanField_ELBO, TraceMeanField_ELBO),
    ],
)
def test_the_jit_variants_match_their_eager_twins_in_value_and_gradient(jit_cls, eager_cls):
    model, guide = world()
    args = data()
    jit = jit_cls(max_plate_nesting=2, ignore_jit_warnings=True)
    eager = eager_cls(max_plate_nesting=2)
    ours = jit_cls is JitTraceMeanField_ELBO
    quiet = contextlib.nullcontext() if ours else pyro_jit_deprecation_ignored()  # ours needs no help
    # Pyro keys its graphs by id(model): a fresh bound method model.model at each
    # call would compile (and draw) anew each time, so it gets one object.
    model_fn = model.model
    with quiet:
        jit.loss_and_grads(model_fn, guide, *args)  # compile
        got, got_grads, num_params = grads_on_the_same_noise(jit, model, guide, args, 7, model_fn)
    want, want_grads, _ = grads_on_the_same_noise(eager, model, guide, args, seed=7)
    assert got == pytest.approx(want, rel=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) == num_params
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-5, atol=1e-6), name


def test_it_compiles_without_a_warning_and_loss_works_first():
    """torch.jit.trace's deprecation is silenced inside the class; nothing else is.
    A graph compiled by loss(), under no_grad, still gives the eager gradient."""
    model, guide = world()
    args = data()
    jit = JitTraceMeanField_ELBO(max_plate_nesting=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(torch.tensor(jit.loss(model.model, guide, *args)))
    assert jit.compilations == 1
    got, got_grads, _ = grads_on_the_same_noise(jit, model, guide, args, seed=3)
    want, want_grads, _ = grads_on_the_same_noise(
        TraceMeanField_ELBO(max_plate_nesting=2), model, guide, args, 3
    )
    assert got == pytest.approx(want, rel=1e-5)
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-5, atol=1e-6), name
    # the deprecation is torch's, not ours to hide from anyone else
    with pytest.warns(DeprecationWarning, match=r"`torch\.jit\.trace` is deprecated"):
        torch.jit.trace(lambda x: 2 * x, (torch.ones(1),))


def test_inputs_the_graph_cannot_key_are_refused():
    model, guide = world()
    obs, actions, mask = data()
    jit = JitTraceMeanField_ELBO(max_plate_nesting=2)
    with pytest.raises(
        ValueError, match=r"expected tensors as positional arguments, got NoneType at position 2"
    ):
        jit.loss(model.model, guide, obs, actions, None)
    with pytest.raises(ValueError, match=r"keyword 'mask' is a tensor"):
        jit.loss(model.model, guide, obs, actions, mask=mask)
    with pytest.raises(ValueError, match=r"jit_options: expected a dict or None, got \[1\]"):
        JitTraceMeanField_ELBO(jit_options=[1])


def test_fit_trains_on_batches_of_varying_length_compiling_once_per_length():
    lengths = (8, 3, 5, 8, 2, 6, 4, 7)
    model, guide = world()
    obs, actions, mask = data(lengths, T=8)
    num_steps, batch_size, seed = 8, 2, 0
    # fit truncates each minibatch to its longest episode
    distinct = {
        max(lengths[i] for i in minibatch_indices(step, len(lengths), batch_size, seed).tolist())
        for step in range(num_steps)
    }
    assert len(distinct) >= 3

    def named():
        return {**dict(model.named_parameters()), **{f"guide.{n}": p for n, p in guide.named_parameters()}}

    before = {n: p.detach().clone() for n, p in named().items()}
    elbo = JitTraceMeanField_ELBO(max_plate_nesting=2)
    history = fit(
        model,
        guide,
        obs,
        actions,
        mask,
        num_steps=num_steps,
        batch_size=batch_size,
        seed=seed,
        elbo=elbo,
        progress=False,
    )
    assert len(history.loss) == num_steps and all(torch.isfinite(torch.tensor(history.loss)))
    assert elbo.compilations == len(distinct)
    unchanged = [n for n, p in named().items() if torch.equal(p, before[n])]
    assert unchanged == []  # every parameter was trained


def test_targets_reach_the_jit_elbo_as_graph_inputs():
    built = small_world()
    obs, actions, mask = torch.randn(4, 5, 2), torch.rand(4, 5, 1) * 4 - 2, torch.ones(4, 5, dtype=torch.bool)
    rewards, continues = torch.randn(4, 5), torch.ones(4, 5)
    jit, eager = JitTraceMeanField_ELBO(max_plate_nesting=2), TraceMeanField_ELBO(max_plate_nesting=2)
    args = (built.model.model, built.guide, obs, actions, mask)
    jit.loss(*args, rewards=rewards, continues=continues)  # compiles
    for r in (rewards, rewards + 3.0):  # a new value is an input, not a constant kept from the first call
        pyro.set_rng_seed(2)
        got = jit.loss(*args, rewards=r, continues=continues)
        pyro.set_rng_seed(2)
        assert got == pytest.approx(eager.loss(*args, rewards=r, continues=continues), rel=1e-5)
    assert jit.compilations == 1
    fit(
        built.model,
        built.guide,
        obs,
        actions,
        mask,
        rewards=rewards,
        continues=continues,
        num_steps=2,
        elbo=jit,
        progress=False,
    )
