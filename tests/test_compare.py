"""Comparing estimators: against the exact linear-Gaussian log-likelihood, allocations of
known size, the numbers a figure is given, and the command run as a user runs it.

Real SVI throughout; every comparison is small (few draws, few training steps).
"""

import json
import math
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from matplotlib.container import BarContainer

from pyro_worldmodel import ActionSpace, FilterGuide, LinearGaussianSSM, Spec, compare_estimators, fit
from pyro_worldmodel.cli import main
from pyro_worldmodel.compare import (
    EstimatorComparison,
    EstimatorResult,
    default_estimators,
    estimator_label,
    make_estimator,
)
from pyro_worldmodel.config import REGISTRY
from pyro_worldmodel.evaluate.profiling import PeakMemory, peak_memory
from pyro_worldmodel.plots import moving_average, plot_estimator_comparison, plot_learning_curves

# Pyro's JitTrace_ELBO and JitTraceGraph_ELBO call torch.jit.trace, deprecated in torch 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")

T = 25
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Every estimator whose value is a lower bound on log p(x, a) (KL annealing only at β = 1).
BOUNDS = [
    "Trace_ELBO",
    "TraceMeanField_ELBO",
    "TraceGraph_ELBO",
    {"name": "RenyiELBO", "alpha": 0, "num_particles": 8},
    {"name": "RenyiELBO", "alpha": 0.5, "num_particles": 8},
    {"name": "KLAnnealing_ELBO", "beta": 1.0, "label": "KLAnnealing_ELBO(beta=1)"},
    "FreeNats_ELBO",
    "KLBalancing_ELBO",
]
NOT_BOUNDS = [
    {"name": "TraceTailAdaptive_ELBO", "num_particles": 8},
    {"name": "KLAnnealing_ELBO", "warmup_steps": 10},  # β rises from 0
]


@pytest.fixture(scope="module")
def anchor():
    """The true model (d=4, X=6, A=2) as tests/test_evaluate.py has it; 64 training and 16 held-out episodes of T=25."""
    pyro.clear_param_store()
    ssm = LinearGaussianSSM.random(4, 6, 2, seed=0)
    obs, actions, _ = ssm.sample(64, T, seed=1)
    heldout = ssm.sample(16, T, seed=2)[:2]
    return ssm, obs, actions, heldout


@pytest.fixture(scope="module")
def trained_guide(anchor):
    """A filter trained for 100 steps with the model held at its true parameters."""
    ssm, obs, actions, _ = anchor
    model = ssm.world_model()
    pyro.set_rng_seed(0)
    guide = FilterGuide.for_model(model).double()
    fit(model, guide, obs, actions, num_steps=100, lr=3e-3, train="guide", seed=0, progress=False)
    return model, guide


def exact_per_step(ssm, obs, actions) -> float:
    return ssm.log_prob(obs, actions).sum().item() / (obs.shape[0] * obs.shape[1])


def on_anchor(anchor, model, guide, estimators, **settings):
    _, obs, actions, heldout = anchor
    kwargs = {"repeats": 10, "num_steps": 3, "iwae_particles": 4, "num_checkpoints": 1, "progress": False}
    kwargs.update(settings)
    return compare_estimators(
        obs,
        actions,
        heldout=heldout,
        model=model,
        guide=guide,
        train="guide",
        estimators=estimators,
        **kwargs,
    )


@pytest.fixture(scope="module")
def comparison(anchor, trained_guide):
    """Every estimator that has a value, and two that have no bound, at the trained filter."""
    model, guide = trained_guide
    return on_anchor(anchor, model, guide, BOUNDS + NOT_BOUNDS, eval_batch_size=32)


# ---------------------------------------------------------------- against the exact log-likelihood


def test_every_bound_lies_below_the_exact_log_likelihood(anchor, comparison):
    ssm, obs, actions, _ = anchor
    exact = exact_per_step(ssm, obs[:32], actions[:32])  # -4.883 nats per step on the evaluation batch
    for spec in BOUNDS:
        row = comparison[estimator_label(make_spec(spec))]
        assert row.bound <= exact + 3 * row.bound_se, row.label
        assert exact - row.bound < 1.0, row.label  # measured 0.47 (IWAE-8) to 0.75 nats per step
    # More particles, tighter: IWAE-8 above the one-particle ELBO, by far more than their errors.
    iwae8, elbo = comparison["RenyiELBO(alpha=0, K=8)"], comparison["Trace_ELBO"]
    assert iwae8.bound - elbo.bound > 10 * math.hypot(iwae8.bound_se, elbo.bound_se)


def make_spec(spec):
    return {"name": spec} if isinstance(spec, str) else spec


def test_iwae_tightens_as_K_grows(anchor, trained_guide):
    ssm, obs, actions, _ = anchor
    model, guide = trained_guide
    Ks = (1, 10, 100)
    result = on_anchor(
        anchor,
        model,
        guide,
        [{"name": "RenyiELBO", "alpha": 0, "num_particles": K} for K in Ks],
        repeats=6,
        num_steps=2,
        eval_batch_size=16,
    )
    rows = [result.results[i] for i in range(len(Ks))]
    # measured: -5.62 ± 0.03, -5.37 ± 0.02, -5.22 ± 0.01 against exact -4.91 nats per step
    for lower, upper in zip(rows, rows[1:], strict=False):
        assert upper.bound - lower.bound > 3 * math.hypot(lower.bound_se, upper.bound_se), (lower, upper)
    assert rows[-1].bound <= exact_per_step(ssm, obs[:16], actions[:16]) + 3 * rows[-1].bound_se


def test_analytic_kl_halves_the_gradient_variance_and_lowers_the_loss_variance_of_a_poor_guide(
    anchor, trained_guide
):
    """With the same guide and the same draws of z, TraceMeanField_ELBO against Trace_ELBO.

    The analytic KL pays in the gradient at any guide. In the loss value it pays
    only while the guide is poor: log p(x, z) − log q(z) has zero variance at the
    exact posterior, while log p(x | z) alone does not, so as the guide improves
    Trace_ELBO's loss variance falls below TraceMeanField_ELBO's.
    """
    ssm, *_ = anchor
    trained_model, trained = trained_guide
    pyro.set_rng_seed(0)
    untrained = FilterGuide.for_model(trained_model).double()
    ratios = {}
    # The untrained guide's difference is smaller: it takes 64 sequences to see it clearly.
    for name, guide, batch in (("untrained", untrained, 64), ("trained", trained, 32)):
        result = on_anchor(
            anchor,
            trained_model,
            guide,
            ["Trace_ELBO", "TraceMeanField_ELBO"],
            repeats=30,
            num_steps=2,
            eval_batch_size=batch,
        )
        mc, tmf = result["Trace_ELBO"], result["TraceMeanField_ELBO"]
        ratios[name] = (
            tmf.loss_variance / mc.loss_variance,
            tmf.grad_variance["guide"] / mc.grad_variance["guide"],
            tmf.grad_snr["guide"] / mc.grad_snr["guide"],
        )
        assert mc.grad_variance["model"] is None and mc.grad_snr["model"] is None  # the model is held fixed
    # Measured, loss-variance ratio TMF / Trace: untrained 0.82 here (0.68-0.82 over seeds 0-4 at
    # R = 30, 64 sequences; 0.73 at R = 50), 1.80 here after 100 guide steps (1.7-1.9 at R = 50,
    # 64 sequences; 2.4-2.6 after 300 steps). Gradient-variance ratio 0.61 and 0.57 here, 0.51-0.63
    # at every guide tried (untrained, 10, 30, 100, 300 steps); gradient SNR 1.35 and 1.53 times Trace's.
    loss_ratio, grad_ratio, snr_ratio = ratios["untrained"]
    assert loss_ratio < 0.95
    assert grad_ratio < 0.8 and snr_ratio > 1.2
    loss_ratio, grad_ratio, snr_ratio = ratios["trained"]
    assert loss_ratio > 1.3
    assert grad_ratio < 0.8 and snr_ratio > 1.2


def test_estimators_without_a_bound_still_get_gradients_time_and_training(comparison):
    tail = comparison["TraceTailAdaptive_ELBO(K=8)"]
    assert tail.bound is None and tail.bound_se is None and tail.loss_variance is None
    assert any("TraceTailAdaptive_ELBO.loss" in note for note in tail.notes)
    assert tail.grad_variance["guide"] > 0 and tail.grad_snr["guide"] > 0
    assert tail.step_time > 0 and tail.peak_memory > 0
    assert len(tail.train_loss) == 3 and all(math.isfinite(x) for x in tail.train_loss)
    assert math.isfinite(tail.heldout_iwae)

    annealed = comparison["KLAnnealing_ELBO(warmup_steps=10)"]
    assert any("not a bound" in note and "β = 0" in note for note in annealed.notes)
    # At β = 0 the value is E[log p(x, a | z)], above every bound.
    assert annealed.bound > max(comparison[estimator_label(make_spec(s))].bound for s in BOUNDS)


def test_every_estimator_starts_from_the_same_parameters_and_draws(anchor, trained_guide, comparison):
    """TraceGraph_ELBO is Trace_ELBO when every site is reparameterised: the same seed gives the same numbers."""
    mc, graph = comparison["Trace_ELBO"], comparison["TraceGraph_ELBO"]
    for field in (
        "bound",
        "bound_se",
        "loss_variance",
        "grad_variance",
        "grad_snr",
        "train_loss",
        "checkpoints",
    ):
        assert getattr(mc, field) == getattr(graph, field), field
    first = {row.checkpoints[0]["heldout_elbo"] for row in comparison.results}
    assert len(first) == 1  # step 0: the same initial parameters, evaluated on the same random numbers
    assert all(
        row.checkpoints[0]["step"] == 0 and row.checkpoints[-1]["step"] == 3 for row in comparison.results
    )


def test_the_model_and_guide_are_left_as_they_were(anchor, trained_guide):
    model, guide = trained_guide
    before = {k: v.clone() for m in (model, guide) for k, v in m.state_dict().items()}
    on_anchor(anchor, model, guide, ["Trace_ELBO"], repeats=2, num_steps=3)
    after = {k: v for m in (model, guide) for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for m in (model, guide) for p in m.parameters())


# ---------------------------------------------------------------- memory against known sizes


def test_peak_memory_of_known_allocations_on_the_cpu():
    never_profiled = torch.empty(5_000_000, dtype=torch.uint8)
    probe = PeakMemory("cpu")
    probe.start()
    del never_profiled  # made before: not this stretch's
    x = torch.empty(10_000_000, dtype=torch.uint8)
    del x
    kept = [torch.empty(4_000_000, dtype=torch.uint8), torch.empty(3_000_000, dtype=torch.uint8)]
    assert probe.stop() == 10_000_000  # the freed 10 MB, not the 7 MB still held
    probe.start()
    kept.pop()  # made in an earlier stretch, which the profiler remembers: still not this one's
    a = torch.ones(1000, 1000, dtype=torch.float64)
    b = a * 2
    assert probe.stop() == pytest.approx(16_000_000, abs=64)  # a and b, and a scalar or two
    del a, b


def test_peak_memory_of_a_function():
    def work():
        a = torch.zeros(2_000_000, dtype=torch.uint8)
        b = torch.zeros(3_000_000, dtype=torch.uint8)
        del a, b

    assert peak_memory(work, "cpu") == 5_000_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_peak_memory_of_known_allocations_on_cuda():
    block = 512 * 20_000  # a multiple of the caching allocator's 512-byte rounding
    probe = PeakMemory("cuda")
    probe.start()
    x = torch.empty(block, dtype=torch.uint8, device="cuda")
    del x
    kept = [torch.empty(block // 2, dtype=torch.uint8, device="cuda") for _ in range(3)]
    assert probe.stop() == 3 * block // 2  # 15 MB held beat the 10 MB freed
    probe.start()
    kept.pop()  # on CUDA a free of an older tensor lowers the rise
    y = torch.empty(block, dtype=torch.uint8, device="cuda")
    assert probe.stop() == block // 2
    del y, kept


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_step_memory_grows_by_a_tensor_of_known_size_made_in_the_step(anchor, device):
    """A model that allocates 8 MB on each call and keeps it: the step's peak grows by exactly 8 MB."""
    ssm, *_ = anchor
    size = 1_000_000  # float64: 8,000,000 bytes, a multiple of 512
    peaks = {}
    for ballast in (False, True):
        pyro.clear_param_store()
        model = ssm.world_model().to(device)
        pyro.set_rng_seed(0)
        guide = FilterGuide.for_model(model).double().to(device)
        held = []
        if ballast:

            def model_with_ballast(*args, inner=model.model, held=held, **kwargs):
                held.append(torch.ones(size, dtype=torch.float64, device=device))
                return inner(*args, **kwargs)

            model.model = model_with_ballast
        result = on_anchor(anchor, model, guide, ["Trace_ELBO"], repeats=2, num_steps=3, device=device)
        peaks[ballast] = result.results[0].peak_memory
        held.clear()
    assert peaks[False] > 1e6  # measured 5.5 MB for 32 sequences of 25 steps on the CPU
    assert peaks[True] - peaks[False] == 8 * size


# ---------------------------------------------------------------- the smoke setting, output


@pytest.fixture(scope="module")
def smoke(anchor):
    """The smoke setting on a model built from a spec, with the default estimators."""
    _, obs, actions, (h_obs, h_actions) = anchor
    spec = Spec(
        latent_dim=3,
        transition={"name": "gaussian_mlp", "hidden": [16]},
        guide={"name": "filter", "rnn_dim": 16},
    )
    f32 = (obs[:16, :10].float(), actions[:16, :10].float())
    return compare_estimators(
        *f32,
        heldout=(h_obs[:2, :10].float(), h_actions[:2, :10].float()),
        spec=spec,
        action_space=ActionSpace.box(2),
        smoke=True,
        progress=False,
    )


def test_smoke_runs_the_default_estimators_and_every_defined_figure_is_finite(smoke):
    assert all(name in REGISTRY["elbo"] for name in (s["name"] for s in default_estimators()))
    assert smoke.labels == [estimator_label(s) for s in default_estimators(2, 8)]
    assert smoke.settings["num_steps"] == 8 and smoke.settings["repeats"] == 3 and smoke.settings["smoke"]
    for row in smoke.results:
        figures = [row.step_time, row.peak_memory, row.heldout_elbo, row.heldout_iwae, *row.train_loss]
        figures += [*row.grad_variance.values(), *row.grad_snr.values()]  # both parts are trained
        if row.bound is not None:
            figures += [row.bound, row.bound_se, row.loss_variance]
        assert all(math.isfinite(x) for x in figures), row
        assert row.step_time > 0 and row.peak_memory > 0 and row.grad_variance["model"] > 0
    assert [r.label for r in smoke.results if r.bound is None] == ["TraceTailAdaptive_ELBO(K=2)"]


def test_table_and_json_round_trip(comparison):
    text = comparison.to_json()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    data = json.loads(text, parse_constant=refuse)
    assert [row["label"] for row in data["estimators"]] == comparison.labels
    tail = data["estimators"][comparison.labels.index("TraceTailAdaptive_ELBO(K=8)")]
    assert tail["bound"] is None and tail["loss_variance"] is None
    for row, result in zip(data["estimators"], comparison.results, strict=True):
        assert row["step_time"] == result.step_time and row["train_loss"] == result.train_loss
    assert data["settings"]["repeats"] == 10 and data["settings"]["train"] == "guide"

    table = comparison.table().splitlines()
    assert len(table) == 2 + len(comparison.results)
    for line, row in zip(table[2:], comparison.results, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row.label and len(cells) == 11
        if row.bound is None:
            assert cells[1] == "n/a"
        else:
            assert cells[1] == f"{row.bound:.3f} ± {row.bound_se:.3f}"
        assert cells[7] == f"{row.step_time * 1e3:.3g}"
    assert comparison.table() in comparison.markdown()


def test_estimator_specs_are_checked_by_the_registry():
    with pytest.raises(ValueError, match=r"unknown 'Trace_ELB'.*did you mean 'Trace_ELBO'.*registered"):
        make_estimator({"name": "Trace_ELB"})
    with pytest.raises(ValueError, match="takes no keyword 'alpah'"):
        make_estimator({"name": "RenyiELBO", "alpah": 0})
    with pytest.raises(ValueError, match="num_particles > 1"):
        make_estimator({"name": "TraceTailAdaptive_ELBO"})
    elbo = make_estimator({"name": "RenyiELBO", "alpha": 0, "num_particles": 8})
    assert elbo.vectorize_particles and elbo.max_plate_nesting == 3  # ours, and Pyro's particle dim
    assert estimator_label({"name": "RenyiELBO", "alpha": 0, "num_particles": 8}) == "RenyiELBO(alpha=0, K=8)"
    assert (
        estimator_label({"name": "RenyiELBO", "alpha": 0.5}) == "RenyiELBO(alpha=0.5, K=2)"
    )  # Pyro's default K


def test_what_jit_estimators_cannot_do_is_refused_before_anything_runs(anchor, trained_guide):
    model, guide = trained_guide
    with pytest.raises(ValueError, match=r"\['JitTrace_ELBO'\] compile the parameters.*train='guide'"):
        on_anchor(anchor, model, guide, ["Trace_ELBO", "JitTrace_ELBO"])
    _, obs, actions, heldout = anchor
    mask = torch.arange(T) < torch.randint(
        1, T + 1, (obs.shape[0], 1), generator=torch.Generator().manual_seed(0)
    )
    with pytest.raises(ValueError, match="JitTrace_ELBO.*different lengths"):
        compare_estimators(
            obs,
            actions,
            mask,
            heldout=heldout,
            model=model,
            guide=guide,
            estimators=["JitTrace_ELBO"],
            progress=False,
        )


# ---------------------------------------------------------------- figures draw their numbers


@pytest.fixture
def hand_made():
    rows = [
        EstimatorResult(
            label="A",
            spec={"name": "Trace_ELBO"},
            bound=-2.0,
            bound_se=0.1,
            loss_variance=0.5,
            grad_variance={"model": 1.0, "guide": 2.0},
            grad_snr={"model": 3.0, "guide": 4.0},
            step_time=0.02,
            step_time_quartiles=(0.018, 0.025),
            train_loss=[3.0, 1.0, 2.0, 6.0],
            checkpoints=[{"step": 0, "heldout_elbo": -3.0}, {"step": 4, "heldout_elbo": -1.5}],
        ),
        EstimatorResult(
            label="B",
            spec={"name": "TraceTailAdaptive_ELBO", "num_particles": 2},
            loss_variance=None,
            grad_variance={"model": None, "guide": 0.5},
            grad_snr={"model": None, "guide": 5.0},
            step_time=0.04,
            step_time_quartiles=(0.03, 0.05),
            train_loss=[4.0, 2.0, 0.0, 1.0],
            checkpoints=[{"step": 0, "heldout_elbo": -3.0}, {"step": 4, "heldout_elbo": -2.5}],
        ),
    ]
    return EstimatorComparison(rows, {"repeats": 4, "eval_timesteps": 40, "iwae_particles": 8})


def bars(ax, gid):
    return [p for p in ax.patches if p.get_gid() == gid]


def test_comparison_bars_are_the_table_values(hand_made, tmp_path):
    path = tmp_path / "estimators.png"
    fig = plot_estimator_comparison(hand_made, path)
    ax_bound, ax_var, ax_snr, ax_time = fig.axes
    np.testing.assert_array_equal([b.get_width() for b in bars(ax_bound, "bound")], [-2.0, np.nan])
    np.testing.assert_array_equal([b.get_width() for b in bars(ax_var, "loss_variance")], [0.5, np.nan])
    np.testing.assert_array_equal([b.get_width() for b in bars(ax_snr, "snr_model")], [3.0, np.nan])
    np.testing.assert_array_equal([b.get_width() for b in bars(ax_snr, "snr_guide")], [4.0, 5.0])
    np.testing.assert_allclose([b.get_width() for b in bars(ax_time, "step_time")], [20.0, 40.0])
    assert ax_var.get_xscale() == "log"
    # Error bars: bound ± se, and the time's quartiles.
    (bound_bars,) = [c for c in ax_bound.containers if isinstance(c, BarContainer)]
    segments = bound_bars.errorbar.lines[2][0].get_segments()
    np.testing.assert_allclose(segments[0][:, 0], [-2.1, -1.9])
    (time_bars,) = [c for c in ax_time.containers if isinstance(c, BarContainer)]
    segments = time_bars.errorbar.lines[2][0].get_segments()
    np.testing.assert_allclose([s[:, 0] for s in segments], [[18.0, 25.0], [30.0, 50.0]])
    # The estimator with no value is marked, in the bound and variance panels.
    for ax in (ax_bound, ax_var):
        assert [t.get_text() for t in ax.texts if t.get_gid() == "missing"] == ["n/a"]
    assert [t.get_text() for t in ax_bound.get_yticklabels()] == ["A", "B"]
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_learning_curves_are_the_losses_and_checkpoints(hand_made, tmp_path):
    path = tmp_path / "curves.png"
    fig = plot_learning_curves(hand_made, path, window=2)
    ax_loss, ax_held = fig.axes
    for row in hand_made.results:
        (loss,) = [line for line in ax_loss.get_lines() if line.get_gid() == f"loss:{row.label}"]
        np.testing.assert_array_equal(loss.get_xdata(), np.arange(4))
        np.testing.assert_allclose(loss.get_ydata(), moving_average(np.array(row.train_loss), 2))
        (held,) = [line for line in ax_held.get_lines() if line.get_gid() == f"heldout:{row.label}"]
        np.testing.assert_array_equal(held.get_xdata(), [0, 4])
        np.testing.assert_array_equal(held.get_ydata(), [c["heldout_elbo"] for c in row.checkpoints])
    np.testing.assert_allclose(ax_loss.get_lines()[0].get_ydata(), [3.0, 2.0, 1.5, 4.0])  # by hand
    assert path.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def pendulum_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pendulum_data")
    argv = [
        "collect",
        "--env",
        "Pendulum-v1",
        "--episodes",
        "6",
        "--max-episode-steps",
        "50",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    return out / "episodes.npz"


@pytest.mark.slow  # 14 s: the default list's three Jit estimators compile twice each
def test_compare_smoke_on_pendulum_writes_the_report(pendulum_data, tmp_path, capsys):
    out = tmp_path / "compare"
    rc = main(["compare", "--smoke", "--data", str(pendulum_data), "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    data = json.loads((out / "compare.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    labels = [row["label"] for row in data["estimators"]]
    assert labels == [estimator_label(s) for s in default_estimators(2, 8)]
    assert data["settings"]["env_id"] == "Pendulum-v1" and data["settings"]["smoke"]
    report = (out / "compare.md").read_text()
    for label in labels:
        assert f"| {label} |" in report and f"| {label} |" in stdout
    for name in ("estimators.png", "learning_curves.png"):
        assert (out / "figures" / name).read_bytes()[:8] == PNG_MAGIC
    assert str(out / "compare.md") in stdout


def test_compare_rejects_an_unknown_estimator_and_writes_nothing(pendulum_data, tmp_path, capsys):
    out = tmp_path / "compare"
    rc = main(
        [
            "compare",
            "--smoke",
            "--data",
            str(pendulum_data),
            "--out",
            str(out),
            "--estimators",
            "[Trace_ELBO, Renyi]",
        ]
    )
    _, err = capsys.readouterr()
    assert rc == 2
    assert "pyro-worldmodel compare: error: elbo.name: unknown 'Renyi'" in err
    assert "registered: [" in err and "'RenyiELBO'" in err and "'KLBalancing_ELBO'" in err
    assert not out.exists()

    rc = main(["compare", "--data", str(pendulum_data), "--out", str(out), "--estimators", "{name: [oops"])
    assert rc == 2 and "estimators: expected valid YAML, got" in capsys.readouterr().err
    rc = main(["compare", "--data", str(pendulum_data), "--out", str(out), "--estimators", "3"])
    assert rc == 2 and "estimators: expected a YAML list" in capsys.readouterr().err
    assert not out.exists()


def test_each_seed_trains_from_the_same_start_and_the_held_out_columns_are_their_mean_and_sd(
    anchor, trained_guide
):
    """With seeds = 3, the first seed's held-out figures are a one-seed comparison's, and the
    others train from the same start on other minibatches and draws (every seed is evaluated
    on the same draws); the table shows their mean ± sd, and the notes say which estimators'
    differences from TraceMeanField_ELBO exceed twice the standard error of the difference."""
    model, guide = trained_guide
    estimators = ["TraceMeanField_ELBO", "Trace_ELBO"]
    three = on_anchor(anchor, model, guide, estimators, seeds=3, num_steps=4)
    for row in three.results:
        assert [r["seed"] for r in row.heldout_by_seed] == [0, 1, 2]
        one = on_anchor(anchor, model, guide, [row.spec], seeds=1, num_steps=4).results[0]
        first = row.heldout_by_seed[0]
        assert one.heldout_elbo == pytest.approx(first["heldout_elbo"], rel=1e-9)
        assert one.heldout_iwae == pytest.approx(first["heldout_iwae"], rel=1e-9)
        assert len({r["heldout_elbo"] for r in row.heldout_by_seed}) == 3  # other minibatches, other results
        values = torch.tensor([r["heldout_elbo"] for r in row.heldout_by_seed], dtype=torch.float64)
        assert row.heldout_elbo == pytest.approx(values.mean().item())
        assert row.heldout_elbo_sd == pytest.approx(values.std().item())
        assert f"{row.heldout_elbo:.3f} ± {row.heldout_elbo_sd:.2g}" in three.table()
        assert row.loss_variance_se == pytest.approx(row.loss_variance * (2 / 9) ** 0.5)  # R = 10
        assert row.grad_snr_se["guide"] > 0 and row.grad_variance_se["model"] is None  # train="guide"
    # With the model held fixed, the mean-field estimator's loss stays on the batched path.
    assert three["TraceMeanField_ELBO"].path == "batched"
    assert three["Trace_ELBO"].path == ""
    ref, other = three["TraceMeanField_ELBO"], three["Trace_ELBO"]
    diff = other.heldout_elbo - ref.heldout_elbo
    se = ((other.heldout_elbo_sd**2 + ref.heldout_elbo_sd**2) / 3) ** 0.5
    word = "beyond" if abs(diff) > 2 * se else "within"
    assert three.spread_notes() == [
        f"held-out ELBO {word} the spread over 3 seeds of TraceMeanField_ELBO's: Trace_ELBO ({diff:+.3f} ± {se:.3f})"
    ]
