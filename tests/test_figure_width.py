"""No figure is drawn wider than the book's text column, so the browser never shrinks its text.

The book's figures are PNGs drawn at ``book/matplotlibrc``'s 100 dpi and shown at their drawn size unless they are
wider than the text column, which then scales them down: a 13-inch figure in the column loses almost half its
size, and its 10-point titles and tick labels end up about 7 pixels tall. ``companion.viz.MAX_WIDTH`` is the
widest figure that fits (see its comment); these tests hold every figure to it:

- the chapters' cells, read without running them: every ``figsize=(width, height)`` gives a number for the width,
  at most ``MAX_WIDTH`` (a computed width could grow with a recipe's settings unseen);
- the package's drawing functions (``companion.diagrams``, ``companion.viz``), run: the figure and what the
  notebook's inline backend saves of it (its tight bounding box, labels included) fit in ``MAX_WIDTH``.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from companion import diagrams, viz  # noqa: E402
from companion.data import CIFAR10_CLASSES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb")) + sorted((ROOT / "book").glob("*.ipynb"))
MAGIC = re.compile(r"^\s*[%!]", re.MULTILINE)


def figsize_widths(source: str) -> list[tuple[int, str, float | None]]:
    """(line, code, width in inches or None where it is not a number) of every ``figsize=`` in Python code."""
    tree = ast.parse(MAGIC.sub("#", source))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            if keyword.arg != "figsize":
                continue
            width = None
            if isinstance(keyword.value, ast.Tuple | ast.List) and keyword.value.elts:
                try:
                    width = float(ast.literal_eval(keyword.value.elts[0]))
                except ValueError:
                    pass
            found.append((keyword.lineno, ast.get_source_segment(source, keyword) or "figsize", width))
    return found


def too_wide(path: Path) -> list[str]:
    """Every figsize in a notebook's code cells whose width is not a number at most ``MAX_WIDTH``."""
    problems = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        for line, code, width in figsize_widths("".join(cell["source"])):
            if width is None or width > viz.MAX_WIDTH:
                problems.append(f"{path.name} cell {cell.get('id')} line {line}: {code}")
    return problems


def test_the_notebooks_are_found() -> None:
    assert len(NOTEBOOKS) >= 7


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_chapter_figure_is_wider_than_the_column(path: Path) -> None:
    problems = too_wide(path)
    assert not problems, (
        f"figures wider than the book's column ({viz.MAX_WIDTH} in, companion.viz.MAX_WIDTH), or of a width that is "
        f"not a number: {problems}"
    )


def test_the_static_check_reads_widths() -> None:
    source = (
        "%matplotlib inline\n"
        "fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))\n"
        "fig = plt.figure(figsize=[7, 2])\n"
        "fig, ax = plt.subplots(figsize=(2 * n, 3))\n"
    )
    assert [(line, width) for line, _, width in figsize_widths(source)] == [(2, 13.0), (3, 7.0), (4, None)]


def saved_width(fig: Figure) -> float:
    """The width in inches of what Jupyter's inline backend saves: the tight bounding box, padded 0.1 inch."""
    fig.canvas.draw()
    return fig.get_tightbbox(fig.canvas.get_renderer()).width + 2 * 0.1


def history() -> SimpleNamespace:
    """What plot_history reads of a ``companion.train.History``: three epochs of losses and accuracies."""
    return SimpleNamespace(
        train_loss=[2.0, 1.6, 1.2], train_acc=[0.3, 0.4, 0.5], test_loss=[2.1, 1.7, 1.4], test_acc=[0.28, 0.38, 0.45]
    )


DRAWINGS = {
    **{name: getattr(diagrams, name) for name in diagrams.__all__},
    "show_images, 24 in 12 columns": lambda: viz.show_images(
        torch.zeros(24, 3, 32, 32, dtype=torch.uint8), labels=torch.arange(24) % 10, classes=CIFAR10_CLASSES, ncols=12
    ),
    "show_images, 16 in 4 columns": lambda: viz.show_images(
        torch.zeros(16, 3, 32, 32, dtype=torch.uint8),
        titles=["a caption of a few words\n(true: automobile)"] * 16,
        ncols=4,
        size=2.6,
    ),
    "plot_history": lambda: viz.plot_history(history(), "a model"),
    "plot_confusion_matrix": lambda: viz.plot_confusion_matrix(
        torch.arange(100) % 10, torch.arange(100) % 7, CIFAR10_CLASSES
    ),
}


@pytest.mark.parametrize("name", sorted(DRAWINGS))
def test_no_package_figure_is_wider_than_the_column(name: str) -> None:
    fig = DRAWINGS[name]()
    try:
        width, saved = fig.get_size_inches()[0], saved_width(fig)
    finally:
        plt.close(fig)
    assert width <= viz.MAX_WIDTH + 1e-9, f"{name}: drawn {width:.2f} in wide, the column holds {viz.MAX_WIDTH}"
    assert saved <= viz.MAX_WIDTH + 0.05, f"{name}: saved {saved:.2f} in wide (labels outside the figure?)"


def test_every_drawing_function_is_checked() -> None:
    checked = {name.split(",")[0] for name in DRAWINGS}
    public = set(diagrams.__all__) | {n for n in viz.__all__ if n.startswith(("plot_", "show_images"))}
    assert public <= checked, public - checked
