"""The chapters' architecture diagrams: the expected labels are drawn, legibly, and nothing overlaps or spills."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from companion import diagrams  # noqa: E402

EXPECTED = {  # labels (substrings of text artists) each diagram must show
    "sliding_window_diagram": [
        "input: C_in x 5 x 5",
        "zero padding p = 1",
        "stride s = 2",
        "kernel: C_in x 3 x 3",
        "output: C_out x 3 x 3",
    ],
    "attention_diagram": [
        "tokens X",
        "Q = X W_q",
        "K = X W_k",
        "V = X W_v",
        "softmax(Q K^T / sqrt(d_k))",
        "keys",
        "queries",
        "output A V",
    ],
    "cnn_stages_diagram": ["image", "stem", "stage 1", "stage 2", "stage 3", "global", "32 x 15 x 15", "10 logits"],
    "sagan_block_diagram": [
        "query: 1x1 conv",
        "key: 1x1 conv",
        "value: 1x1 conv",
        "softmax over keys",
        "x gamma",
        "residual",
        "C x H x W",
    ],
    "vit_diagram": [
        "patches",
        "x E",
        "class",
        "position embeddings",
        "encoder block, x L",
        "MHA(LN(z))",
        "MLP(LN(z'))",
        "10 logits",
    ],
    "two_towers_diagram": [
        "FastCNN",
        "projection W",
        "sentence encoder",
        "22M",
        "class embeddings",
        "cos(z, w_c)",
        "frozen",
        "trained",
    ],
    "contrastive_matrix_diagram": ["image 1", "text 1", "image -> text", "text -> image", "diagonal"],
}
COLUMN_PIXELS = 700  # the book's text column


def texts(fig: Figure) -> list:
    """Every non-empty text artist of a figure (axes texts, tick labels, titles, figure texts)."""
    found = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip() and t.get_visible()]
    return found


@pytest.fixture(params=sorted(EXPECTED), ids=str)
def drawn(request):
    fig = getattr(diagrams, request.param)()
    fig.canvas.draw()
    yield request.param, fig
    plt.close(fig)


def test_every_diagram_is_tested() -> None:
    assert set(diagrams.__all__) == set(EXPECTED)


def test_the_expected_labels_are_drawn(drawn) -> None:
    name, fig = drawn
    assert isinstance(fig, Figure)
    shown = " | ".join(t.get_text() for t in texts(fig))
    for label in EXPECTED[name]:
        assert label in shown, f"{name}: no label {label!r} among {shown!r}"


def test_legible_in_the_book_column(drawn) -> None:
    name, fig = drawn
    width_inches = fig.get_size_inches()[0]
    scale = COLUMN_PIXELS / width_inches  # pixels per inch once the figure is fitted to the column
    smallest = min(t.get_fontsize() for t in texts(fig)) / 72 * scale
    assert smallest >= 9, f"{name}: its smallest text is {smallest:.1f} px tall in a {COLUMN_PIXELS}-px column"


def test_labels_stay_inside_the_figure_and_apart(drawn) -> None:
    name, fig = drawn
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox.padded(1)
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts(fig)]
    for text, box in boxes:
        assert frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1), f"{name}: {text!r} spills out"
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.padded(-1).overlaps(box_b.padded(-1)), f"{name}: {a!r} overlaps {b!r}"


def test_box_labels_fit_their_boxes(drawn) -> None:
    name, fig = drawn
    renderer = fig.canvas.get_renderer()
    patches = [p for p in fig.findobj(FancyBboxPatch) if p.axes is not None]
    for text in texts(fig):
        box = text.get_window_extent(renderer)
        centre = ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)
        for patch in patches:
            outline = patch.get_window_extent(renderer)
            if outline.contains(*centre):
                assert outline.contains(box.x0, box.y0) and outline.contains(box.x1, box.y1), (
                    f"{name}: {text.get_text()!r} is wider or taller than its box"
                )


def test_the_overlap_check_catches_overlapping_labels() -> None:
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.text(0.5, 0.5, "one label")
    ax.text(0.52, 0.5, "another label")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    a, b = (t.get_window_extent(renderer) for t in ax.texts)
    assert a.padded(-1).overlaps(b.padded(-1))
    plt.close(fig)
