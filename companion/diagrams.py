"""Architecture diagrams of the book's chapters, drawn with Matplotlib so that they are tested like the code.

One function per diagram; each returns a ``matplotlib.figure.Figure`` as wide as the book's text column
(``companion.viz.MAX_WIDTH``) whose labels are text artists: ``tests/test_diagrams.py`` checks that the expected
labels are present and that every label lies inside the figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle

from companion.viz import MAX_WIDTH

__all__ = [
    "attention_diagram",
    "cnn_stages_diagram",
    "contrastive_matrix_diagram",
    "sagan_block_diagram",
    "sliding_window_diagram",
    "two_towers_diagram",
    "vit_diagram",
]

FONT = 9.0  # points: about 12.5 pixels tall in the book, where a figure is shown at 100 dpi
COLOURS = {"data": "#dbe9f6", "layer": "#fde0c5", "attention": "#d9f0d3", "frozen": "#e5e5e5", "output": "#f6d5e5"}


def _canvas(xlim: float, ylim: float) -> tuple[Figure, Axes]:
    """A column-wide figure with one axis-free axes whose data coordinates run over [0, xlim] x [0, ylim]."""
    fig, ax = plt.subplots(figsize=(MAX_WIDTH, MAX_WIDTH * ylim / xlim))
    ax.set(xlim=(0, xlim), ylim=(0, ylim))
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def _box(ax: Axes, x: float, y: float, w: float, h: float, text: str, kind: str = "layer", size: float = FONT) -> None:
    """A rounded box with its lower-left corner at (x, y) and a centred label."""
    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=COLOURS[kind], ec="0.3", lw=1)
    )
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], text: str = "", side: str = "top") -> None:
    """An arrow from start to end, optionally labelled beside its middle."""
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "color": "0.2", "lw": 1.2})
    if text:
        mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
        offset = {"top": (0, 0.12, "center", "bottom"), "right": (0.08, 0, "left", "center")}[side]
        ax.text(mx + offset[0], my + offset[1], text, ha=offset[2], va=offset[3], fontsize=FONT - 1)


def _grid(ax: Axes, x: float, y: float, n_rows: int, n_cols: int, cell: float, **style) -> None:
    """An n_rows x n_cols grid of square cells with its lower-left corner at (x, y)."""
    for r in range(n_rows):
        for c in range(n_cols):
            ax.add_patch(Rectangle((x + c * cell, y + (n_rows - 1 - r) * cell), cell, cell, **style))


def sliding_window_diagram() -> Figure:
    """Chapter 1: a 3x3 kernel over a zero-padded 5x5 input with stride 2, channels in and out."""
    fig, ax = _canvas(16, 7.2)
    cell, x0, y0 = 0.8, 0.6, 0.9
    # the padded input: 7x7 cells, the border (padding) dashed
    for r in range(7):
        for c in range(7):
            pad = r in (0, 6) or c in (0, 6)
            style = {"fc": "white", "ec": "0.6", "ls": "--"} if pad else {"fc": COLOURS["data"], "ec": "0.3"}
            ax.add_patch(Rectangle((x0 + c * cell, y0 + (6 - r) * cell), cell, cell, lw=0.8, **style))
    for shift in (0.12, 0.24):  # more input channels behind the first
        ax.add_patch(Rectangle((x0 + shift, y0 + shift), 7 * cell, 7 * cell, fill=False, ec="0.6", lw=0.8, zorder=0))
    # the window of output position (0, 1): rows 0-2, columns 2-4 of the padded input; dotted: output (0, 0)
    ax.add_patch(Rectangle((x0 + 2 * cell, y0 + 4 * cell), 3 * cell, 3 * cell, fill=False, ec="red", lw=2.5))
    ax.add_patch(Rectangle((x0, y0 + 4 * cell), 3 * cell, 3 * cell, fill=False, ec="red", lw=1.2, ls=":"))
    _arrow(ax, (x0 + 1.5 * cell, y0 + 7.3 * cell), (x0 + 3.5 * cell, y0 + 7.3 * cell), "stride s = 2")
    ax.text(
        x0 + 3.5 * cell,
        y0 - 0.3,
        "input: C_in x 5 x 5,\nzero padding p = 1 (dashed)",
        ha="center",
        va="top",
        fontsize=FONT,
    )
    # the kernel
    kx, ky, kcell = 7.3, 3.2, 0.64
    _grid(ax, kx, ky, 3, 3, kcell, fc=COLOURS["layer"], ec="0.3", lw=0.8)
    ax.text(
        kx + 1.5 * kcell,
        ky - 0.3,
        "kernel: C_in x 3 x 3\n(one per output channel)",
        ha="center",
        va="top",
        fontsize=FONT,
    )
    _arrow(ax, (x0 + 5 * cell + 0.1, y0 + 5.5 * cell), (kx - 0.1, ky + 1.5 * kcell), "x")
    # the output: 3x3, the position the window produces marked
    ox, oy = 12.5, 2.8
    _grid(ax, ox, oy, 3, 3, cell, fc=COLOURS["output"], ec="0.3", lw=0.8)
    ax.add_patch(Rectangle((ox + cell, oy + 2 * cell), cell, cell, fill=False, ec="red", lw=2.5))
    for shift in (0.12, 0.24):
        ax.add_patch(Rectangle((ox + shift, oy + shift), 3 * cell, 3 * cell, fill=False, ec="0.6", lw=0.8, zorder=0))
    ax.text(
        ox + 1.2 * cell,
        oy - 0.3,
        "output: C_out x 3 x 3\n(5 + 2*1 - 3) // 2 + 1 = 3",
        ha="center",
        va="top",
        fontsize=FONT,
    )
    _arrow(ax, (kx + 3 * kcell + 0.1, ky + 1.5 * kcell), (ox + 1.5 * cell, oy + 2.5 * cell), "sum")
    return fig


def attention_diagram(n: int = 4) -> Figure:
    """Chapter 2: tokens to queries, keys and values, the n x n weight matrix softmax(Q K^T / sqrt(d_k)), and V."""
    fig, ax = _canvas(16, 8.8)
    cell = 0.42
    tall = n * cell
    # the tokens X
    _grid(ax, 0.4, 3.6, n, 3, cell, fc=COLOURS["data"], ec="0.3", lw=0.8)
    ax.text(0.4 + 1.5 * cell, 3.4, f"tokens X\n{n} x d", ha="center", va="top", fontsize=FONT)
    # Q, K, V
    rows = {"Q = X W_q": 6.4, "K = X W_k": 3.6, "V = X W_v": 0.8}
    for name, y in rows.items():
        _grid(ax, 3.8, y, n, 2, cell, fc=COLOURS["layer"], ec="0.3", lw=0.8)
        ax.text(3.8 + cell, y + tall + 0.12, name, ha="center", va="bottom", fontsize=FONT)
        _arrow(ax, (0.5 + 3 * cell, 3.6 + tall / 2), (3.7, y + tall / 2))
    # the weight matrix: a fixed example of weights, each row summing to one
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(n, n)) + 2 * np.eye(n)
    weights = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    mx, my, mcell = 7.6, 3.6, 0.75
    for i in range(n):
        for j in range(n):
            colour = plt.cm.Greens(weights[i, j])
            ax.add_patch(Rectangle((mx + j * mcell, my + (n - 1 - i) * mcell), mcell, mcell, fc=colour, ec="0.3"))
            ax.text(
                mx + (j + 0.5) * mcell,
                my + (n - 0.5 - i) * mcell,
                f"{weights[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=FONT - 2,
            )
    ax.text(mx - 0.12, my + n * mcell / 2, "queries", rotation=90, ha="right", va="center", fontsize=FONT - 1)
    ax.text(mx + n * mcell / 2, my + n * mcell + 0.12, "keys", ha="center", va="bottom", fontsize=FONT - 1)
    ax.text(
        mx + n * mcell / 2,
        my - 0.2,
        "A = softmax(Q K^T / sqrt(d_k))\nrow i: query i over the keys,\nsums to 1",
        ha="center",
        va="top",
        fontsize=FONT - 1,
    )
    _arrow(ax, (3.9 + 2 * cell, 6.4 + tall / 2), (mx - 0.45, my + n * mcell - 0.4))
    _arrow(ax, (3.9 + 2 * cell, 3.6 + tall / 2), (mx - 0.45, my + 0.8))
    # the output
    ox = 13.2
    _grid(ax, ox, 3.6, n, 2, cell, fc=COLOURS["output"], ec="0.3", lw=0.8)
    ax.text(ox + cell, 3.4, f"output A V\n{n} x d_v", ha="center", va="top", fontsize=FONT)
    _arrow(ax, (mx + n * mcell + 0.1, my + n * mcell / 2), (ox - 0.1, 3.6 + tall / 2 + 0.3), "A x V")
    _arrow(ax, (3.9 + 2 * cell, 0.8 + tall / 2), (ox - 0.1, 3.8))
    return fig


def cnn_stages_diagram(widths: tuple[int, int, int] = (32, 64, 128), stem_width: int = 24) -> Figure:
    """Chapter 3: FastCNN's whitening stem, three conv-pool stages and the global max pooling head."""
    fig, ax = _canvas(16, 7.2)
    sides = [32, 31, 15, 7, 3]
    steps = [
        ("image", f"3 x {sides[0]} x {sides[0]}", "data"),
        ("stem:\n2x2 conv\n(whitening,\nfrozen)\n+ GELU", f"{stem_width} x {sides[1]} x {sides[1]}", "frozen"),
        ("stage 1", f"{widths[0]} x {sides[2]} x {sides[2]}", "layer"),
        ("stage 2", f"{widths[1]} x {sides[3]} x {sides[3]}", "layer"),
        ("stage 3", f"{widths[2]} x {sides[4]} x {sides[4]}", "layer"),
        ("global\nmax pool\n+ linear", "10 logits", "output"),
    ]
    x, w, middle = 0.2, 2.25, 3.4
    for k, (name, shape, kind) in enumerate(steps):
        h = max(1.7, 4.2 * sides[k] / 32) if k < 5 else 1.7
        _box(ax, x, middle - h / 2, w, h, name, kind, size=FONT - 1)
        ax.text(x + w / 2, middle - h / 2 - 0.2, shape, ha="center", va="top", fontsize=FONT - 1)
        if k:
            _arrow(ax, (x - 0.38, middle), (x - 0.04, middle))
        x += w + 0.38
    ax.text(
        8.0, 7.0, "each stage: 3x3 conv -> 2x2 max pool -> batch-norm -> GELU", ha="center", va="top", fontsize=FONT
    )
    ax.text(8.0, 6.3, "-> 3x3 conv -> batch-norm -> GELU", ha="center", va="top", fontsize=FONT)
    return fig


def sagan_block_diagram() -> Figure:
    """Chapter 4: the SAGAN block, y = gamma * softmax(Q K^T) V + x, with the shapes of every tensor."""
    fig, ax = _canvas(16, 8.8)
    small = FONT - 1
    _box(ax, 0.2, 4.0, 2.0, 1.2, "x\nC x H x W", "data", size=small)
    rows = [("query: 1x1 conv", "N x C/8", 6.6), ("key: 1x1 conv", "N x C/8", 4.1), ("value: 1x1 conv", "N x C", 1.9)]
    for name, shape, y in rows:
        _box(ax, 3.0, y, 3.0, 1.0, f"{name}\n{shape}", size=small)
        _arrow(ax, (2.25, 4.6), (2.95, y + 0.5))
    _box(ax, 6.7, 5.0, 3.6, 1.9, "Q K^T: N x N\nsoftmax over keys\n(rows sum to 1)", "attention", size=small)
    _arrow(ax, (6.05, 7.1), (6.65, 6.4))
    _arrow(ax, (6.05, 4.6), (6.65, 5.4))
    _box(ax, 6.8, 1.8, 3.4, 1.2, "o = weights x V\nC x H x W", "attention", size=small)
    _arrow(ax, (8.5, 4.95), (8.5, 3.05))
    _arrow(ax, (6.05, 2.4), (6.75, 2.4))
    _box(ax, 10.9, 1.8, 2.0, 1.2, "x gamma\n(starts at 0)", "layer", size=small)
    _arrow(ax, (10.25, 2.4), (10.85, 2.4))
    ax.add_patch(plt.Circle((13.55, 2.4), 0.3, fc="white", ec="0.3"))
    ax.text(13.55, 2.4, "+", ha="center", va="center", fontsize=FONT + 2)
    _arrow(ax, (12.95, 2.4), (13.23, 2.4))
    ax.plot([1.2, 1.2, 13.55], [3.95, 0.9, 0.9], color="0.2", lw=1.2)  # the residual path, under everything
    _arrow(ax, (13.55, 0.9), (13.55, 2.08))
    ax.text(7.4, 0.75, "residual: x goes straight to the sum", ha="center", va="top", fontsize=small)
    _box(ax, 14.2, 1.8, 1.7, 1.2, "y\nC x H x W", "output", size=small)
    _arrow(ax, (13.87, 2.4), (14.15, 2.4))
    ax.text(0.2, 8.6, "N = H W positions,\neach a token of C features", va="top", fontsize=small)
    return fig


def vit_diagram(grid: int = 3) -> Figure:
    """Chapter 5: patches -> tokens (+ class token, + positions) -> L encoder blocks -> class token -> head."""
    fig, ax = _canvas(16, 7.2)
    small, cell, middle = FONT - 1, 0.6, 3.8
    _grid(ax, 0.3, middle - grid * cell / 2, grid, grid, cell, fc=COLOURS["data"], ec="white", lw=2)
    ax.text(
        0.3 + grid * cell / 2,
        middle - grid * cell / 2 - 0.2,
        "image cut\ninto p x p\npatches",
        ha="center",
        va="top",
        fontsize=small,
    )
    _arrow(ax, (0.4 + grid * cell, middle), (3.3, middle), "x E")
    tx, tw, n = 3.4, 0.4, grid * grid
    ax.add_patch(Rectangle((tx, middle - 0.8), tw, 1.6, fc=COLOURS["output"], ec="0.3"))
    for k in range(n):
        ax.add_patch(Rectangle((tx + (k + 1) * tw, middle - 0.8), tw, 1.6, fc=COLOURS["layer"], ec="0.3"))
    ax.text(tx + tw / 2, middle - 0.95, "class", ha="center", va="top", fontsize=small - 1)
    centre = tx + (n + 1) * tw / 2
    ax.text(centre + 0.3, middle - 0.95, f"+ {n} patch tokens,\neach of width D", ha="center", va="top", fontsize=small)
    ax.text(centre, middle + 1.75, "+ position embeddings E_pos", ha="center", va="bottom", fontsize=small)
    _arrow(ax, (centre, middle + 1.7), (centre, middle + 0.85))
    ex = tx + (n + 1) * tw + 0.6
    _box(
        ax,
        ex,
        middle - 1.7,
        3.7,
        3.4,
        "encoder block, x L:\n\nz' = z + MHA(LN(z))\n\nz' + MLP(LN(z'))",
        "attention",
        size=small,
    )
    _arrow(ax, (ex - 0.55, middle), (ex - 0.05, middle))
    hx = ex + 4.3
    _box(ax, hx, middle - 0.7, 3.2, 1.4, "class token\n-> LN -> linear", "output", size=small)
    _arrow(ax, (ex + 3.75, middle), (hx - 0.05, middle))
    ax.text(hx + 1.6, middle - 0.9, "10 logits", ha="center", va="top", fontsize=small)
    return fig


def two_towers_diagram() -> Figure:
    """Chapter 6: the image tower (trained) and the text tower (frozen) meeting in cosine similarities."""
    fig, ax = _canvas(16, 7.6)
    small = FONT - 1
    _box(ax, 0.2, 4.6, 2.4, 1.2, "image\n3 x 32 x 32", "data", size=small)
    _box(ax, 3.3, 4.6, 3.0, 1.2, "FastCNN\n(trained)", "layer", size=small)
    _box(ax, 7.0, 4.6, 3.2, 1.2, "projection W\n128 -> 384, unit z", "layer", size=small)
    _arrow(ax, (2.65, 5.2), (3.25, 5.2))
    _arrow(ax, (6.35, 5.2), (6.95, 5.2))
    _box(ax, 0.2, 1.2, 2.4, 1.4, '"a photo of\na {class}."', "data", size=small)
    _box(ax, 3.3, 1.2, 3.0, 1.4, "sentence encoder\nMiniLM, 22M\nparams, frozen", "frozen", size=small)
    _box(ax, 7.0, 1.2, 3.2, 1.4, "class embeddings\nw_c, unit, 384", "frozen", size=small)
    _arrow(ax, (2.65, 1.9), (3.25, 1.9))
    _arrow(ax, (6.35, 1.9), (6.95, 1.9))
    _box(ax, 10.8, 2.8, 3.0, 1.8, "logits\ns * cos(z, w_c)\nfor each class c", "attention", size=small)
    _arrow(ax, (10.25, 5.2), (10.75, 4.3))
    _arrow(ax, (10.25, 1.9), (10.75, 3.1))
    _box(ax, 14.25, 2.9, 1.65, 1.6, "softmax,\ncross-\nentropy", "output", size=small)
    _arrow(ax, (13.85, 3.7), (14.2, 3.7))
    ax.text(5.2, 7.3, "image tower: trained", ha="center", va="top", fontsize=FONT)
    ax.text(5.2, 0.8, "text tower: frozen, one vector per class name", ha="center", va="top", fontsize=FONT)
    return fig


def contrastive_matrix_diagram(similarity: np.ndarray | None = None) -> Figure:
    """Chapter 6: the B x B similarity matrix of CLIP's symmetric contrastive loss, positives on the diagonal."""
    if similarity is None:  # an example: cosines of five matching image-text pairs, the matches highest
        rng = np.random.default_rng(0)
        similarity = np.clip(0.1 * rng.normal(size=(5, 5)) + 0.5 * np.eye(5) + 0.2, -1, 1)
    b = len(similarity)
    fig, ax = plt.subplots(figsize=(MAX_WIDTH, 3.7))
    ax.imshow(similarity, cmap="Greens", vmin=-0.2, vmax=1)
    for i in range(b):
        for j in range(b):
            weight = "bold" if i == j else "normal"
            ax.text(j, i, f"{similarity[i, j]:.2f}", ha="center", va="center", fontsize=FONT - 1, fontweight=weight)
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_xticks(range(b), [f"text {j + 1}" for j in range(b)], fontsize=FONT - 1)
    ax.set_yticks(range(b), [f"image {i + 1}" for i in range(b)], fontsize=FONT - 1)
    ax.set_title("cosines z_i . t_j of a batch of image-text pairs", fontsize=FONT)
    notes = [
        (0.75, "image -> text: softmax of each\nrow (times the scale s), cross-\nentropy with the diagonal (red)"),
        (0.3, "text -> image: the same for\neach column; the loss is the\nmean of the two directions"),
    ]
    for y, note in notes:
        fig.text(0.6, y, note, ha="left", va="center", fontsize=FONT - 1)
    fig.subplots_adjust(left=0.1, right=0.55, bottom=0.1, top=0.9)
    return fig
