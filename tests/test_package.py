"""The package as a student installs and imports it: root-level names, lazy submodules, declared dependencies."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import companion

tomllib = pytest.importorskip("tomllib", reason="Python 3.11 or newer reads pyproject.toml")
ROOT = Path(__file__).resolve().parents[1]


def test_import_companion_loads_no_training_code() -> None:
    code = "import sys, companion; print(sorted(m for m in sys.modules if m.startswith('companion.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "companion.train" not in out and "companion.data" not in out, out


@pytest.mark.parametrize("name", sorted(companion._EXPORTS))
def test_root_names_are_the_modules_own(name: str) -> None:
    module = importlib.import_module(companion._EXPORTS[name])
    assert getattr(companion, name) is getattr(module, name)
    assert name in dir(companion)


def test_every_submodule_is_an_attribute() -> None:
    found = {m.name for m in pkgutil.iter_modules(companion.__path__) if not m.name.startswith("_")}
    assert found == set(companion._SUBMODULES)
    for name in found:
        assert getattr(companion, name) is importlib.import_module(f"companion.{name}")


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        companion.fitt  # noqa: B018


ONLY_WHEN_LOADED = {"IPython"}  # companion.viz uses IPython's display only inside a running IPython


def imported_modules(sources: list[tuple[str, str]]) -> dict[str, set[str]]:
    """Top-level third-party module name -> the files that import it."""
    found: dict[str, set[str]] = {}
    for name, text in sources:
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for module in names:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in {"companion", "__future__"}:
                    found.setdefault(top, set()).add(name)
    return found


def canonical(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> dict[str, set[str]]:
    """Distribution names declared in pyproject.toml: "core" and each extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": {canonical(r) for r in project["dependencies"]}}
    for extra, requirements in project["optional-dependencies"].items():
        groups[extra] = {canonical(r) for r in requirements}
    return groups


def distribution_of(module: str) -> str:
    dists = importlib.metadata.packages_distributions().get(module)
    assert dists, f"module {module!r} is imported but no installed distribution provides it"
    return canonical(dists[0])


def test_every_module_the_package_imports_is_declared() -> None:
    sources = [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted((ROOT / "companion").rglob("*.py"))]
    everything = set().union(*declared().values())
    missing = [
        f"{module} ({distribution_of(module)}), imported in {', '.join(sorted(files))}"
        for module, files in imported_modules(sources).items()
        if module not in ONLY_WHEN_LOADED and distribution_of(module) not in everything
    ]
    assert not missing, "not declared in pyproject.toml (dependencies or an extra):\n" + "\n".join(missing)


def test_the_notebooks_need_only_the_core_and_the_notebooks_extra() -> None:
    sources = []
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                code = "".join(cell["source"])
                if not code.lstrip().startswith(("%", "!")):
                    sources.append((path.name, code))
    groups = declared()
    self_name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert f"{self_name}" in groups["notebooks"], "the notebooks extra should pull in the text extra"
    available = groups["core"] | groups["notebooks"] | groups["text"]
    missing = [
        f"{module} ({distribution_of(module)}) in {', '.join(sorted(files))}"
        for module, files in imported_modules(sources).items()
        if distribution_of(module) not in available
    ]
    assert not missing, "the chapters import what `pip install .[notebooks]` does not install:\n" + "\n".join(missing)


def test_the_check_catches_an_undeclared_import() -> None:
    found = imported_modules([("x.py", "import yaml\nfrom PIL import Image\nimport os\nfrom . import y\n")])
    assert set(found) == {"yaml", "PIL"}
    assert distribution_of("yaml") not in set().union(*declared().values())  # would be reported
    assert distribution_of("PIL") == "pillow" and "pillow" in declared()["core"]


def test_every_extra_installs_from_the_built_metadata(tmp_path: Path) -> None:
    """``pip install ".[all]"`` resolves offline here: the metadata setuptools builds declares every extra, and each
    extra's requirements (the self-references ``[text]`` and ``[notebooks]`` included) are met by what is installed.

    ``pip install --dry-run --no-index`` builds the package's metadata from a copy of the sources and resolves
    against the installed distributions only: no download, nothing installed. What it tests is the extras' spelling
    and resolution; that the index serves the same names is not tested here.
    """
    source = tmp_path / "src"
    (source / "companion").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    for path in (ROOT / "companion").rglob("*.py"):
        (source / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        (source / path.relative_to(ROOT)).write_bytes(path.read_bytes())
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation"]
    command += ["--disable-pip-version-check", "--quiet", "--report", str(report), f"{source}[all]"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, f"pip could not resolve .[all] offline:\n{done.stderr[-2000:]}"
    installs = json.loads(report.read_text())["install"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [i["metadata"]["name"] for i in installs] == [project["name"]], "pip would install more than the package"
    metadata = installs[0]["metadata"]
    assert set(metadata["provides_extra"]) == set(project["optional-dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        in_metadata = {canonical(r.split(";")[0]) for r in metadata["requires_dist"] if f'extra == "{extra}"' in r}
        assert in_metadata == {canonical(r) for r in requirements}, extra
