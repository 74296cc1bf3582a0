"""The benchmark scripts run as a user runs them, at tiny sizes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args, timeout: int = 300) -> str:
    """``python benchmarks/<script> args...`` as a user runs it; its standard output, once it exits 0."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("pixels", [[], ["--pixels", "--frame-size", "16"]], ids=["vectors", "frames"])
def test_svi_step_benchmark_checks_the_reference_and_prints_its_table(pixels):
    out = run_benchmark("svi_step.py", "--tiny", *pixels)
    assert ("frames 3×16×16 (pixels preset)" in out) == bool(pixels)
    # the library and the hand-written reference compute the same ELBO before anything is timed
    loss_rel, grad_rel = map(
        float, re.search(r"relative difference (\S+) \(loss\), (\S+) \(gradients\)", out).groups()
    )
    assert loss_rel <= 1e-5 and grad_rel <= 1e-5
    rows = [line for line in out.splitlines() if re.match(r"\| 4 \| (5|10) \|", line)]
    assert len(rows) == 2  # B=4 at T=5 and T=10
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[2:])  # times, ratios, sequences/s, memory
    assert "per timestep" in out and "least squares in B·T" in out


def test_model_based_loop_benchmark_prints_a_row_per_environment(tmp_path):
    out = run_benchmark("model_based_loop.py", "--tiny", "--out", str(tmp_path), timeout=600)
    envs = ["Pendulum-v1", "CartPole-v1", "MountainCar-v0"]
    rows = [
        line for line in out.splitlines() if re.match(r"\| (Pendulum-v1|CartPole-v1|MountainCar-v0) \|", line)
    ]
    assert [r.split("|")[1].strip() for r in rows] == envs
    import json

    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["env"] for r in saved] == envs
    assert all(r["final_env_steps"] > 0 and r["seconds"] > 0 for r in saved)
    assert (tmp_path / "CartPole-v1" / "loop.png").exists()


def test_fit_checks_benchmark_prints_both_paths_and_their_ratio():
    out = run_benchmark("fit_checks.py", "--tiny")
    times = dict(re.findall(r"\| (fit|SVI\.step)\S* .*?\| ([\d.]+) \|", out))
    assert set(times) == {"fit", "SVI.step"} and all(float(t) > 0 for t in times.values())
    ratio = float(re.search(r"fit / SVI\.step: ([\d.]+)", out).group(1))
    assert abs(ratio - float(times["fit"]) / float(times["SVI.step"])) < 0.01


def test_imagination_benchmark_prints_every_score_and_the_targets(tmp_path):
    out = run_benchmark("imagination.py", "--tiny", "--envs", "CartPole-v1", "--out", str(tmp_path))
    # one row per horizon (the tiny run predicts 5) and predictor, every score a number
    rows = [
        line
        for line in out.splitlines()
        if re.match(r"\| [1-5] \| (model|calibrated|copy_last|linear) \|", line)
    ]
    assert len(rows) == 20
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][2:]
        assert len(cells) == 8 and all(float(c) == float(c) for c in cells)
    for predictor in ("model", "calibrated"):  # the targets for each
        block = out.split(f"- {predictor}:\n")[1]
        for target in ("best MSE", "best log-lik (Gaussian)", "best CRPS", "90% coverage in [0.85, 0.95]"):
            assert f"  - {target}" in block.split("\n- ")[0]
    assert (tmp_path / "imagination.md").read_text().strip() in out
    import json

    ol = json.loads((tmp_path / "CartPole-v1" / "seed0" / "metrics.json").read_text())["open_loop"]
    # the spread factors fitted on all held-out windows, per horizon and dimension; a horizon
    # that no window reaches keeps factor 1
    factor = torch.tensor(ol["calibration"]["factor"])
    assert factor.shape == (5, 4) and (factor > 0).all() and ol["calibration"]["num_windows"] == ol["count"]
    assert ol["mse"]["calibrated"] == ol["mse"]["model"]


def test_amortisation_benchmark_prints_the_gaps_on_both_sets():
    out = run_benchmark(
        "amortisation.py",
        "--seeds",
        "0",
        "--steps",
        "200",
        "--settings",
        "default",
        "rnn_dim 16",
        "--iwae",
        "10",
    )
    rows = [line for line in out.splitlines() if line.startswith("| filter |")]
    assert [row.split("|")[2].strip() for row in rows] == ["default", "rnn_dim 16"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][2:]
        gaps = [float(c.split(" (")[0]) for c in (cells[0], cells[1], cells[3], cells[4])]
        # a bound is below the exact log-likelihood: every gap is positive (16 draws, 200 steps)
        assert all(g > 0 for g in gaps), row
        assert float(cells[2]) == pytest.approx(gaps[1] / gaps[0], abs=0.02)
        # IWAE-10 is tighter than the ELBO at the same parameters, on both sets
        iwae = [float(c.split(" (")[0]) for c in cells[7:9]]
        assert 0 < iwae[0] < gaps[2] and 0 < iwae[1] < gaps[3], row
    # the anchor's least gap for diagonal factors, LinearGaussianSSM.diagonal_guide_gap
    assert "the least gap a guide with diagonal factors can reach: 7.09 nats per sequence" in out


def test_variational_bias_benchmark_scores_every_recipe_against_the_truth():
    out = run_benchmark("variational_bias.py", "--tiny")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "recipe" not in line]
    assert [row.split("|")[1].strip() for row in rows] == [
        "ELBO, filter", "ELBO, smoothing", "ELBO, smoothing, full covariance", "IWAE-8, smoothing", "exact ML"
    ]  # fmt: skip
    shortfall = {row.split("|")[1].strip(): float(row.split("|")[2].split("(")[0]) for row in rows}
    # from a random start, 20 steps leave every bound-trained model far below the truth, and
    # exact maximum likelihood, 10 L-BFGS iterations on the same data, far closer
    assert shortfall["exact ML"] < min(v for k, v in shortfall.items() if k != "exact ML")


def test_video_benchmark_prints_the_scores_and_the_targets(tmp_path):
    out = run_benchmark("video.py", "--tiny", "--envs", "CartPole-v1", "--out", str(tmp_path))
    rows = [
        line for line in out.splitlines() if re.match(r"\| (1|5) \| (model|copy_last|mean_frame) \|", line)
    ]
    assert len(rows) == 6  # h = 1 and 5, three predictors
    assert "state probe R², held out: filtered" in out
    assert "the model beats both baselines in MSE" in out and "filtered R² ≥ 0.9" in out
    report = __import__("json").loads((tmp_path / "video.json").read_text())
    (video,) = report["CartPole-v1"]["video"]
    # the table's copy-last MSE at h = 1 is the run's own
    assert f"| 1 | copy_last | {video['mse']['copy_last'][0]:.3g} |" in out


def test_hmm_anchor_benchmark_prints_every_figure_of_the_readme():
    out = run_benchmark("hmm_anchor.py", "--tiny", "--seeds", "0")
    rows = dict(re.findall(r"^\| (.+?) \| (\S+) \| \S+ \|$", out, re.M))
    assert float(rows["max |enumerated − exact|"]) < 1e-6  # enumeration is exact, even here
    for key in ("ELBO, untrained guide", "IWAE-1, untrained guide", "IWAE-100, untrained guide"):
        assert float(rows[key]) < 0  # every bound below the exact value
    assert 0 <= float(rows["share of the gap closed"]) <= 1
    assert "held-out gap, fitted by enumeration" in rows and "held-out gap, fitted by ELBO" in rows


def test_categorical_benchmark_prints_both_states_with_the_loop(tmp_path):
    out = run_benchmark(
        "categorical.py", "--tiny", "--envs", "CartPole-v1", "--out", str(tmp_path), timeout=600
    )
    rows = [line for line in out.splitlines() if line.startswith("| CartPole-v1 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["gaussian", "categorical"]
    assert all(" ± " in r.split("|")[-2] for r in rows)  # the loop's return
    import json

    saved = json.loads((tmp_path / "categorical.json").read_text())
    assert set(saved["CartPole-v1"]) == {"gaussian", "categorical"}


def test_scale_benchmark_prints_one_and_two_ranks():
    out = run_benchmark("scale.py", "--tiny")
    rows = re.findall(r"^\| (\d) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"]
    assert rows[0][2:] == ("1.00", "1.00") and all(float(r[1]) > 0 for r in rows)
