"""The README stays true to the code."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.findall(r"^    (pip install .*)$", README, flags=re.M)
    test_command = [c for c in commands if "pytest" in c]
    assert len(test_command) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command[0] in ci


def python_block(containing: str) -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if containing in b]
    assert len(blocks) == 1, containing
    return blocks[0]


def test_readme_api_example_runs(capsys):
    namespace = {}
    exec(compile(python_block("history = fit("), "README.md", "exec"), namespace)
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("ELBO ")
    elbo, log_px, log_pa, kl = (float(v) for v in re.findall(r"-?\d+\.\d+", first))
    # The printed terms add up, to the printed rounding of 0.0005 each.
    assert elbo == pytest.approx(log_px + log_pa - kl, abs=2e-3)
    assert kl >= 0  # a KL between Gaussians, computed analytically
    # The data come from a linear-Gaussian system with an exact log-likelihood. An ELBO is
    # below its model's likelihood, and on average no model's likelihood is above that of the
    # system that drew the data: the ELBO per step lies below the exact value (a small model
    # trained for 200 steps on 2,560 steps does not overfit past it). Training closes most of
    # the gap it starts with, 4.6 nats per step.
    system, obs, actions = namespace["system"], namespace["obs"], namespace["actions"]
    exact = (system.log_prob(obs, actions).sum() / obs.shape[:2].numel()).item()
    history = namespace["history"]
    assert history.terms[0]["elbo"] < exact - 1.5 < elbo < exact
    # The last line: the last step's loss, −ELBO per timestep of one minibatch (so near the
    # ELBO of all the data, in the same units, and well below the first step's), and the
    # terms recorded at step 150, the last multiple of terms_every=50 below num_steps=200.
    loss_text, terms_text = second.split(" ", 1)
    loss, terms = float(loss_text), ast.literal_eval(terms_text)
    assert loss == history.loss[-1] and loss < history.loss[0] - 3.0
    assert loss == pytest.approx(-elbo, abs=0.25)
    assert terms == history.terms[-1] and terms["step"] == 150
    assert terms["elbo"] == pytest.approx(terms["log_px"] + terms["log_pa"] - terms["kl"])
    # The "swap a prior in one line" example runs on the same data.
    exec(compile(python_block("# the one line"), "README.md", "exec"), namespace)
    assert type(namespace["built"].model.transition).__name__ == "LinearGaussianTransition"


def test_readme_commands_parse():
    """Every `pyro-worldmodel ...` line in the README names real subcommands and flags."""
    from pyro_worldmodel.cli import build_parser

    lines = re.findall(r"^    (?:.*&& )?pyro-worldmodel (.*?)(?:\s+#.*)?$", README, flags=re.M)
    assert len(lines) >= 5
    for line in lines:
        build_parser().parse_args(line.split())  # exits 2 on an unknown flag


def test_readme_yaml_spec_builds():
    from pyro_worldmodel import ActionSpace
    from pyro_worldmodel.config import Spec, build

    block = re.search(r"```yaml\n(.*?)```", README, flags=re.S).group(1)
    built = build(Spec.from_yaml(block), 3, ActionSpace.box(1))
    assert type(built.model.transition).__name__ == "LinearGaussianTransition"


@pytest.mark.slow
def test_readme_workflow_example_runs(tmp_path, monkeypatch, capsys):
    """The notebook-sized workflow example: it warm starts, trains, and its model predicts
    one step ahead better than copying the last observation, on held-out episodes."""
    monkeypatch.chdir(tmp_path)  # it saves open_loop.png where it runs
    namespace = {}
    exec(compile(python_block("workflow.prepare("), "README.md", "exec"), namespace)
    start, _ = capsys.readouterr().out.splitlines()
    assert start == "linear"
    metrics = namespace["result"].metrics
    assert metrics["open_loop"]["mse"]["model"][0] < metrics["open_loop"]["mse"]["copy_last"][0]
    assert metrics["heldout"]["iwae"] >= metrics["heldout"]["elbo"] - 0.05  # IWAE-100 is the tighter bound
    assert (tmp_path / "open_loop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
