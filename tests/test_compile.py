"""TraceMeanField_ELBO(compile=...): the guide's steps through torch.compile.

Known answers: the eager batched path, itself equal to Pyro's traces (test_batched.py).
Compiled kernels may sum in another order, so gradients agree to float tolerance.
"""

import re

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_worldmodel import ActionSpace, CompileFallbackWarning, FilterGuide, WorldModel
from pyro_worldmodel.cli import main
from pyro_worldmodel.config import Spec, build
from pyro_worldmodel.infer import MAX_PLATE_NESTING, KLBalancing_ELBO, TraceMeanField_ELBO, default_optim


def small(seed=0):
    torch.manual_seed(seed)
    model = WorldModel.default(3, ActionSpace.box(1), latent_dim=4, hidden=(8,))
    guide = FilterGuide.for_model(model, rnn_dim=8, hidden=(8,))
    return model, guide


def data(B=3, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    obs, actions = torch.randn(B, T, 3, generator=g), torch.randn(B, T, 1, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T - 2 :] = False  # a shorter episode: the masked steps are compiled too
    return obs, actions, mask


def train(elbo, steps=3, device="cpu", **kw):
    """SVI steps from the same start and seed: the losses and the parameters after them."""
    pyro.clear_param_store()
    model, guide = (part.to(device) for part in small())
    obs, actions, mask = (x.to(device) for x in data(**kw))
    svi = SVI(model.model, guide, default_optim(lr=1e-2), elbo)
    pyro.set_rng_seed(5)
    losses = [svi.step(obs, actions, mask=mask) for _ in range(steps)]
    return losses, [p.detach().cpu() for p in [*model.parameters(), *guide.parameters()]]


def close(a, b, rtol):
    return (
        max(((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item() for x, y in zip(a, b, strict=True))
        < rtol
    )


def test_compiled_steps_train_as_eager_ones_with_inductor():
    # Short sequences: inductor's compile time grows with the steps it unrolls.
    eager_losses, eager_params = train(TraceMeanField_ELBO(max_plate_nesting=MAX_PLATE_NESTING), T=3)
    elbo = TraceMeanField_ELBO(max_plate_nesting=MAX_PLATE_NESTING, compile=True)
    losses, params = train(elbo, T=3)
    assert elbo.path == "batched" and elbo.compile_backend == "inductor" and elbo.compile_error is None
    assert elbo.compile_seconds > 0
    assert len(elbo.recurrence().keys) == 1  # one shape, compiled once for the three steps
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert close(params, eager_params, 1e-4)


def test_a_subclass_compiles_its_steps_and_a_new_length_compiles_again():
    def balancing(**kw):
        return KLBalancing_ELBO(0.8, max_plate_nesting=MAX_PLATE_NESTING, **kw)

    elbo = balancing(compile="aot_eager")  # compiles in a second: the graphs, not the kernels
    losses, params = train(elbo, steps=2)
    eager_losses, eager_params = train(balancing(), steps=2)
    assert losses == pytest.approx(eager_losses, rel=1e-6) and close(params, eager_params, 1e-6)

    # One model and guide at two lengths: T = 6 is compiled once, T = 9 once more.
    pyro.clear_param_store()
    model, guide = small()
    svi = SVI(model.model, guide, default_optim(lr=1e-2), elbo)
    for T in (6, 9, 6):
        svi.step(*data(T=T)[:2], mask=data(T=T)[2])
    assert len(elbo.recurrence().keys) == 3  # the first model's T = 6, then this one's 6 and 9


def test_without_a_compiler_the_steps_fall_back_to_eager(monkeypatch):
    # A real failure of the real toolchain: inductor's C++ compiler is missing. No cache may
    # answer instead of the compiler.
    import torch._functorch.config
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    elbo = TraceMeanField_ELBO(max_plate_nesting=MAX_PLATE_NESTING, compile=True)
    with pytest.warns(CompileFallbackWarning, match=r"compile='inductor'.*could not compile.*C\+\+ compiler"):
        losses, params = train(elbo, B=2, T=3)
    assert "compiler" in elbo.compile_error
    eager_losses, eager_params = train(TraceMeanField_ELBO(max_plate_nesting=MAX_PLATE_NESTING), B=2, T=3)
    assert losses == eager_losses  # the same draws: the failed compile drew nothing
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params, strict=True))


@pytest.mark.parametrize("bad", ["nope", 3, None, "Inductor"])
def test_compile_refuses_what_is_not_a_backend(bad):
    with pytest.raises(
        ValueError, match=rf"compile: expected True, False or a torch.compile backend.*got {bad!r}"
    ):
        TraceMeanField_ELBO(compile=bad)


def test_a_spec_turns_compilation_on():
    spec = Spec.preset("smoke").with_overrides({"elbo.compile": True})
    built = build(spec, 3, ActionSpace.box(1))
    assert built.elbo.compile_backend == "inductor"
    assert Spec.preset("smoke").with_overrides({"elbo.compile": "aot_eager"}).elbo["compile"] == "aot_eager"
    with pytest.raises(ValueError, match=r"compile: expected"):
        build(Spec.preset("smoke").with_overrides({"elbo.compile": "nope"}), 3, ActionSpace.box(1))


@pytest.mark.parametrize("device", ["cuda"])
def test_compiled_steps_on_cuda_train_as_eager_ones(device):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    eager_losses, eager_params = train(
        TraceMeanField_ELBO(max_plate_nesting=MAX_PLATE_NESTING), device=device
    )
    elbo = TraceMeanField_ELBO(max_plate_nesting=MAX_PLATE_NESTING, compile=True)
    losses, params = train(elbo, device=device)
    assert elbo.compile_error is None
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    assert close(params, eager_params, 1e-3)


def test_train_compiles_the_guide_steps_and_says_how_long(tmp_path, capsys):
    assert main(["collect", "--env", "Pendulum-v1", "--episodes", "4", "--max-episode-steps", "30",
                 "--out", str(tmp_path / "data")]) == 0  # fmt: skip
    capsys.readouterr()
    data, out = tmp_path / "data" / "episodes.npz", tmp_path / "run"
    common = [
        "train",
        "--data",
        str(data),
        "--steps",
        "5",
        "--window",
        "10",
        "--no-evaluate",
        "--out",
        str(out),
    ]
    assert main([*common, "--set", "elbo.compile=nope"]) == 2
    assert "compile: expected True, False or a torch.compile backend" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    assert main([*common, "--set", "elbo.compile=aot_eager"]) == 0
    stdout = capsys.readouterr().out
    assert "compiling the guide's steps with torch.compile (aot_eager)" in stdout
    assert re.search(r"trained 5 steps in \d+ s, \d+ s of which compiling the guide's steps", stdout)
    spec = torch.load(out / "model.ckpt", weights_only=True)["extra"]["run"]["architecture"]["spec"]
    assert spec["elbo"]["compile"] == "aot_eager"  # kept with the run, as every other setting


def test_compile_says_once_when_a_call_takes_pyros_traces():
    elbo = TraceMeanField_ELBO(max_plate_nesting=MAX_PLATE_NESTING, batched=False, compile="aot_eager")
    with pytest.warns(
        CompileFallbackWarning, match=r"takes Pyro's traces \(batched=False\): nothing is compiled"
    ) as said:
        losses, params = train(elbo, steps=2)
    assert sum(issubclass(w.category, CompileFallbackWarning) for w in said) == 1  # once, not per step
    assert elbo.path == "pyro traces: batched=False" and elbo.compile_seconds == 0
    eager = TraceMeanField_ELBO(max_plate_nesting=MAX_PLATE_NESTING, batched=False)
    eager_losses, eager_params = train(eager, steps=2)
    assert losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params, strict=True))
