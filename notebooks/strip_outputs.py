"""Strip outputs and execution counts from the notebooks, so that diffs stay readable.

    python notebooks/strip_outputs.py            # every notebook here, in place
    python notebooks/strip_outputs.py --check    # exit 1 if any has outputs

The test suite runs the check (tests/test_notebooks.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def strip(nb) -> bool:
    """Remove outputs, execution counts and execution metadata; :returns: whether anything changed."""
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            cell.outputs, cell.execution_count = [], None
            changed = True
        if "execution" in cell.metadata:
            del cell.metadata["execution"]
            changed = True
    return changed


def main(argv=None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    dirty = []
    for path in sorted(HERE.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path.name)
            if not check:
                nbformat.write(nb, path)
    if check and dirty:
        print("notebooks with outputs: " + ", ".join(dirty) + "; run python notebooks/strip_outputs.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
