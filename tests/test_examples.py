"""Every example runs with tiny arguments, as a user would run it."""

import subprocess
import sys
from pathlib import Path

from pyro_worldmodel import ActionSpace, FilterGuide, WorldModel, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "q.ckpt"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "ELBO" in result.stdout and "exact" in result.stdout
    lines = {
        line.split()[0]: float(line.split()[1])
        for line in result.stdout.splitlines()
        if line.strip().startswith(("ELBO", "IWAE-100", "exact"))
    }
    assert lines["ELBO"] < lines["exact"] + 0.05  # a bound, even after 20 steps
    model = WorldModel.default(3, ActionSpace.box(1), latent_dim=4, hidden=(32, 32))
    assert load_checkpoint(out, model, FilterGuide.for_model(model, rnn_dim=32))["step"] == 20
