"""The package's layers: a module imports only modules below it (models never import the training code)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "companion"

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    {"runtime", "validation", "files", "distributed", "callbacks", "checkpoint", "vocab"},
    {"conv", "attention", "data", "augment", "viz", "records", "diagrams"},
    {"models", "llm", "optim"},
    {"train"},
    {"recipes"},
    {"ablation", "bench"},  # bench times the recipes' models
    {"grading", "exercises", "_runner"},
    {"__main__", "__init__"},
]


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"companion.{module} is in no layer: add it to LAYERS in {__file__}")


def imports(path: Path) -> list[str]:
    """The companion modules ``path`` imports at run time (``companion.`` stripped; type-checking imports left out)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks import for annotations only
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("companion"):
            names = [node.module] if node.module != "companion" else [f"companion.{a.name}" for a in node.names]
            found += [n.removeprefix("companion.") for n in names]
        elif isinstance(node, ast.Import):
            found += [a.name.removeprefix("companion.") for a in node.names if a.name.startswith("companion.")]
    return [m for m in found if m not in {"", "companion"}]


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_above_it(path: Path) -> None:
    name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    if name in {"runtime", "__init__"}:  # the package root re-exports; runtime is the bottom
        return
    mine = layer_of(name)
    above = [m for m in imports(path) if layer_of(m) > mine]
    assert not above, f"companion.{name} (layer {mine}) imports {above}, which sit above it"


def test_models_never_import_training_code() -> None:
    for path in (PACKAGE / "models").glob("*.py"):
        assert not {m.split(".")[0] for m in imports(path)} & {"train", "recipes", "optim", "checkpoint"}, path
