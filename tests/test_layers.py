"""The package's layers, read from its source: imports go down, private names stay home.

Each module belongs to a layer, named by its top-level module or folder. A
module may import from its own folder and from lower layers only, and never
uses a private name (one that starts with an underscore) defined in another
module of the package. The test reads every import, including those inside
functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_worldmodel"

# Bottom to top. Modules of one layer may import each other only within their folder.
LAYERS = [
    ("errors", "spaces"),
    ("io",),
    ("data",),
    ("model",),
    ("infer",),
    ("evaluate",),
    ("act",),
    ("config",),
    ("compare",),
    ("plots",),
    ("workflow",),
    ("loop",),
    ("cli",),
    ("__init__", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, Path]:
    """``{"infer.training": path, ...}`` for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer(module: str) -> str:
    return module.split(".")[0]


def imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, names)`` for each import of the package, resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.startswith("pyro_worldmodel"):
                target = node.module.removeprefix("pyro_worldmodel").lstrip(".")
            else:
                continue
            names = [a.name for a in node.names]
            if not node.module:  # from . import batched
                out += [(node.lineno, f"{target}.{name}".strip("."), []) for name in names]
            else:
                out.append((node.lineno, target, names))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pyro_worldmodel."):
                    out.append((node.lineno, a.name.removeprefix("pyro_worldmodel."), []))
    return out


def test_every_module_has_a_layer():
    missing = sorted({layer(m) for m in modules()} - set(RANK) - {""})
    assert not missing, f"add these to LAYERS: {missing}"


def test_imports_go_down_the_layers():
    wrong = []
    for module, path in modules().items():
        if not module:
            continue
        for line, target, _ in imports(module, path):
            if not target:
                continue
            same_folder = layer(target) == layer(module)
            if RANK[layer(target)] > RANK[layer(module)] or (
                RANK[layer(target)] == RANK[layer(module)] and not same_folder
            ):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} imports {target}")
    assert not wrong, "imports that go up (or across) the layers:\n" + "\n".join(wrong)


def private_definitions() -> dict[str, set[str]]:
    """The private names each module defines: functions, classes, constants, attributes
    set on ``self`` and methods."""
    out = {}
    for module, path in modules().items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        names.add(t.id)
                    elif isinstance(t, ast.Attribute):
                        names.add(t.attr)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
        out[module] = {n for n in names if n.startswith("_") and not n.startswith("__")}
    return out


def test_no_module_uses_another_modules_private_names():
    defined = private_definitions()
    owners: dict[str, set[str]] = {}
    for module, names in defined.items():
        for name in names:
            owners.setdefault(name, set()).add(module)
    wrong = []
    for module, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for line, target, names in imports(module, path):
            for name in names:
                if name.startswith("_") and not name.startswith("__") and target != module:
                    wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target}.{name}")
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            holders = owners.get(node.attr, set())
            if holders and module not in holders:
                wrong.append(
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}"
                    f" (private to {', '.join(sorted(holders))})"
                )
    assert not wrong, "private names used outside their module:\n" + "\n".join(wrong)


@pytest.mark.parametrize("bad", ["up", "private"])
def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch, bad):
    """A module that imports a higher layer, or reads another's private name, is caught."""
    global PACKAGE
    fake = tmp_path / "pyro_worldmodel"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "__init__.py").write_text("")
    (fake / "model.py").write_text("def _helper():\n    pass\n")
    if bad == "up":
        (fake / "data" / "episodes.py").write_text("from ..cli import main\n")
        (fake / "cli.py").write_text("def main():\n    pass\n")
        check = test_imports_go_down_the_layers
    else:
        (fake / "data" / "episodes.py").write_text("import x\nx._helper()\n")
        check = test_no_module_uses_another_modules_private_names
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    PACKAGE = fake
    try:
        with pytest.raises(AssertionError, match="data/episodes.py"):
            check()
    finally:
        PACKAGE = Path(__file__).resolve().parents[1] / "pyro_worldmodel"
