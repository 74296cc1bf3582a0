"""Every notebook runs top to bottom in a fresh kernel, in smoke mode, as committed."""

import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "notebooks"))

from strip_outputs import strip  # noqa: E402


def test_there_are_the_seven_notebooks():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_quickstart",
        "02_swap_priors_and_guides",
        "03_compare_elbo_estimators",
        "04_dreaming",
        "05_exact_linear_gaussian",
        "06_act_from_imagination",
        "07_dreaming_in_pixels",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebook_is_committed_without_outputs(path):
    assert not strip(nbformat.read(path, as_version=4)), (
        f"run python notebooks/strip_outputs.py on {path.name}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    """Any error in any cell fails; files it writes go to a temporary directory."""
    monkeypatch.setenv("CI", "1")  # the notebooks' smoke settings
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    # One more cell, run last in the same kernel: the notebook's own switch, as the kernel set it.
    nb.cells.append(nbformat.v4.new_code_cell("print(SMOKE)"))
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    print(f"{path.stem}: {elapsed:.1f} s in smoke mode")
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # it shows its figures as images
    # The kernel saw CI, so the notebook took its smoke settings, not its full ones.
    assert [o.get("text") for o in nb.cells[-1].outputs] == ["True\n"]
