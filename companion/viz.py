"""Pictures and displays the chapters share: image grids, training curves, confusion matrices, tables, source code.

``show_table`` and ``show_source`` display rich output in Jupyter (and in the built book: a real table, highlighted
code) and plain text anywhere else (a script, a terminal).
"""

from __future__ import annotations

import inspect
import math
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from companion.data import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["Table", "plot_confusion_matrix", "plot_history", "show_images", "show_source", "show_table", "to_image"]

MAX_WIDTH = 7.0  # inches: at the default 100 dpi a figure this wide (700 px) fits the book's 704-px text column


def to_image(x: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> np.ndarray:
    """One image (C, H, W) as an (H, W, C) array in [0, 1]: uint8 is scaled, float is un-normalised."""
    x = x.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.min() < 0 or x.max() > 1:  # normalised by (x - mean) / std
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def show_images(
    images: torch.Tensor,
    labels: Sequence[int] | torch.Tensor | None = None,
    classes: Sequence[str] | None = None,
    ncols: int = 8,
    titles: Sequence[str] | None = None,
    size: float = 1.4,
) -> plt.Figure:
    """A grid of images (N, C, H, W), titled by class name, by label, or by the given titles.

    Each image is ``size`` inches wide, less when the row would be wider than the book's text column.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n = len(images)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    size = min(size, MAX_WIDTH / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(to_image(images[i]), interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
        elif labels is not None:
            label = int(labels[i])
            ax.set_title(classes[label] if classes is not None else str(label), fontsize=8)
    fig.tight_layout()
    return fig


def plot_history(history, title: str | None = None) -> plt.Figure:
    """Loss and accuracy per epoch of a ``companion.train.History`` (train and, if present, test)."""
    epochs = np.arange(1, len(history.train_loss) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(MAX_WIDTH, 3))
    ax_loss.plot(epochs, history.train_loss, "o-", label="train")
    ax_acc.plot(epochs, np.array(history.train_acc) * 100, "o-", label="train")
    if history.test_loss:
        ax_loss.plot(epochs, history.test_loss, "s-", label="test")
        ax_acc.plot(epochs, np.array(history.test_acc) * 100, "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(
    y_true: Sequence[int] | torch.Tensor, y_pred: Sequence[int] | torch.Tensor, classes: Sequence[str]
) -> plt.Figure:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), in percent."""
    y_true, y_pred = torch.as_tensor(y_true).long().cpu(), torch.as_tensor(y_pred).long().cpu()  # CUDA ones too
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {tuple(y_true.shape)} vs {tuple(y_pred.shape)}")
    k = len(classes)
    counts = torch.bincount(y_true * k + y_pred, minlength=k * k).view(k, k).float()
    percent = (100 * counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig, ax = plt.subplots(figsize=(min(0.55 * k + 2, MAX_WIDTH), min(0.55 * k + 1.5, MAX_WIDTH)))
    im = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{percent[i, j]:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if percent[i, j] > 50 else "black",
            )
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true")
    fig.colorbar(im, ax=ax, label="% of the true class")
    fig.tight_layout()
    return fig


def _in_ipython() -> bool:
    """True inside a Jupyter kernel or IPython shell (where rich output is shown), without importing IPython."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and ipython.get_ipython() is not None


def _display(obj: Any) -> None:
    if _in_ipython():
        from IPython.display import display

        display(obj)
    else:
        print(repr(obj))


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|$~&#{}^!])")


def markdown_escape(text: str) -> str:
    """``text`` as literal Markdown (MyST) text: every character Markdown, tables or ``$math$`` read is escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _cell(value: Any, floatfmt: str) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        return "–" if math.isnan(value) else format(value, floatfmt)
    return "–" if value is None else str(value)


class Table:
    """Rows of cells with a header: a Markdown table in Jupyter and in the book, aligned plain text elsewhere.

    Numbers are right-aligned; floats are formatted with ``floatfmt``; ``None`` and NaN show as "–".
    """

    def __init__(self, rows: Sequence[Sequence[Any]], header: Sequence[str], floatfmt: str = ".4g") -> None:
        self.header = [str(h) for h in header]
        rows = [list(row) for row in rows]
        for i, row in enumerate(rows):
            if len(row) != len(self.header):
                raise ValueError(f"row {i} has {len(row)} cells, the header {len(self.header)}: {row!r}")
        self.numeric = [
            bool(rows) and all(isinstance(r[j], int | float) and not isinstance(r[j], bool) for r in rows)
            for j in range(len(self.header))
        ]
        self.cells = [[_cell(v, floatfmt) for v in row] for row in rows]

    def __repr__(self) -> str:
        widths = [max([len(h)] + [len(r[j]) for r in self.cells]) for j, h in enumerate(self.header)]

        def line(cells: Sequence[str]) -> str:
            parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, self.numeric)]
            return "  ".join(parts).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(self.header), rule] + [line(r) for r in self.cells])

    def _repr_markdown_(self) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(markdown_escape(c) for c in cells) + " |"

        rule = "|" + "|".join("---:" if num else "---" for num in self.numeric) + "|"
        return "\n".join([line(self.header), rule] + [line(r) for r in self.cells])


def show_table(rows: Sequence[Sequence[Any]], header: Sequence[str], floatfmt: str = ".4g") -> None:
    """Display ``rows`` under ``header`` as a table (Jupyter, the book) or as aligned plain text (a terminal)."""
    _display(Table(rows, header, floatfmt))


class Source:
    """Python source code: highlighted in Jupyter and in the book, plain text elsewhere."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __repr__(self) -> str:
        return self.code

    def _repr_markdown_(self) -> str:
        longest = max((len(run) for run in re.findall(r"`+", self.code)), default=0)
        fence = "`" * max(3, longest + 1)
        return f"{fence}python\n{self.code.rstrip()}\n{fence}"


def show_source(obj: Callable | type) -> None:
    """Display the source code of a function, method or class, highlighted where the front end can."""
    _display(Source(textwrap.dedent(inspect.getsource(obj))))
