"""The layout rules, read from the sources (ast), so that a change that breaks them fails here, not in review.

* Layers: ``utils`` (shared helpers) <- engines (pruning, quantization, export, measurement, report, pipeline,
  ...) <- the Lightning face (``module``, ``cli``, ``callbacks``, ``datamodules``) <- the apps (``apps``).
  Engines import neither Lightning nor the Lightning face; nothing below the apps imports them.
* No import circle (imports inside functions count; ``if TYPE_CHECKING:`` blocks do not).
* No module imports another module's ``_private`` name, and a ``_private`` module is imported only from inside
  its own package.
* Every package folder is in ``pyproject.toml``'s package list (a wheel would lose it otherwise).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Source folder -> the dotted package it is installed as.
ROOTS = {
    "pqv_lightning": "pqv_lightning",
    "callbacks": "pqv_lightning.callbacks",
    "datamodules": "pqv_lightning.datamodules",
}
LIGHTNING_FACE = (
    "pqv_lightning.module",
    "pqv_lightning.cli",
    "pqv_lightning.safe_loading",
    "pqv_lightning.callbacks",
    "pqv_lightning.datamodules",
)
APPS = ("pqv_lightning.apps",)


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import statement of module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    skip = _type_checking_lines(tree)
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:  # `from pkg import module`
                    out.append((submodule, None, node.lineno))
                else:
                    out.append((base, alias.name, node.lineno))
    return out


def _internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _, _ in _imports(name):
            if target in MODULES and target != name:
                edges[name].add(target)
    return edges


def test_engines_import_neither_lightning_nor_the_lightning_face():
    engines = [n for n in MODULES if n != "pqv_lightning" and not _within(n, LIGHTNING_FACE + APPS)]
    assert "pqv_lightning.pipeline" in engines and "pqv_lightning.export.exporter" in engines
    bad = [
        f"{name}:{line} imports {target}"
        for name in engines
        for target, _, line in _imports(name)
        if _within(target, ("lightning", "pytorch_lightning", *LIGHTNING_FACE, *APPS)) or target == "pqv_lightning"
    ]
    assert not bad, "engines must stay Lightning-free:\n" + "\n".join(bad)


def test_utils_import_nothing_of_pqv_but_utils():
    bad = [
        f"{name}:{line} imports {target}"
        for name in MODULES
        if _within(name, ("pqv_lightning.utils",))
        for target, _, line in _imports(name)
        if _within(target, ("pqv_lightning",)) and not _within(target, ("pqv_lightning.utils",))
    ]
    assert not bad, "\n".join(bad)


def test_only_the_apps_import_the_apps():
    bad = [
        f"{name}:{line} imports {target}"
        for name in MODULES
        if not _within(name, APPS)
        for target, _, line in _imports(name)
        if _within(target, APPS)
    ]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    edges = _internal_edges()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                circles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_no_private_name_crosses_a_module_boundary():
    bad = []
    for name in MODULES:
        for target, imported, line in _imports(name):
            if not target.startswith("pqv_lightning"):
                continue
            if imported is not None and imported.startswith("_") and not imported.startswith("__"):
                bad.append(f"{name}:{line} imports the private name {target}.{imported}")
            parts = target.split(".")
            for depth, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:depth])
                    if not _within(name, (owner,)):
                        bad.append(f"{name}:{line} imports {target}, private to {owner}")
                    break
    assert not bad, "\n".join(bad)


def test_every_package_folder_is_installed():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    # data-only packages (the recipes: a folder of YAML files mapped by package-dir, no __init__.py) hold no module
    data = {
        name
        for name, folder in setuptools.get("package-dir", {}).items()
        if not (REPO / folder / "__init__.py").exists()
    }
    listed = set(setuptools["packages"]) - data
    packages = {name for name in MODULES if _is_package(name)}
    assert packages == listed, (
        f"missing from pyproject: {sorted(packages - listed)}; stale: {sorted(listed - packages)}"
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("from pqv_lightning.report import _figure\n", "private name"),
        ("import lightning.pytorch as pl\n", "Lightning-free"),
    ],
)
def test_the_rules_catch_what_they_forbid(source, message, monkeypatch, tmp_path):
    """The checks above are not vacuous: a forbidden import in an engine module makes them fail."""
    fake = tmp_path / "fake_engine.py"
    fake.write_text(source)
    monkeypatch.setitem(MODULES, "pqv_lightning.fake_engine", fake)
    check = (
        test_no_private_name_crosses_a_module_boundary
        if message == "private name"
        else test_engines_import_neither_lightning_nor_the_lightning_face
    )
    with pytest.raises(AssertionError, match=message):
        check()
