"""The README stays true to the code."""

import re
from pathlib import Path

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
    out = capsys.readouterr().out
    assert out.startswith("ELBO ")
    elbo, log_px, log_pa, kl = (float(v) for v in re.findall(r"-?\d+\.\d+", out.splitlines()[0]))
    assert kl > 0 and log_px < 0 and elbo < 0
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
