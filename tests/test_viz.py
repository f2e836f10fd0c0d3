"""companion.viz: figure sizes that fit the book's column, tables and highlighted source for the chapters."""

from __future__ import annotations

import inspect

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from markdown_it import MarkdownIt  # noqa: E402
from mdit_py_plugins.dollarmath import dollarmath_plugin  # noqa: E402

from companion.viz import MAX_WIDTH, Source, Table, markdown_escape, show_images, show_source, show_table  # noqa: E402


def test_image_grid_fits_the_text_column() -> None:
    fig = show_images(torch.rand(10, 3, 8, 8), ncols=10)
    assert fig.get_size_inches()[0] <= MAX_WIDTH + 1e-6
    plt.close(fig)


def test_table_plain_text_is_aligned_and_numbers_right_aligned() -> None:
    text = repr(Table([["FastCNN", 5, 0.81234], ["ViT", 12, float("nan")]], ["model", "epochs", "accuracy"]))
    lines = text.splitlines()
    assert lines[0].split() == ["model", "epochs", "accuracy"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].endswith("0.8123") and lines[3].endswith("–")  # NaN is not shown as a number
    assert lines[2].index("5") == lines[3].index("12") + 1  # right-aligned under each other
    assert len({len(line) for line in lines[:2]}) == 1


def test_table_rejects_a_row_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="row 1 has 1 cells, the header 2"):
        Table([["a", 1], ["b"]], ["name", "n"])


@pytest.mark.parametrize("text", ["a|b", "$x$ and $y$", "*bold* _it_", "[link](http://x)", "<b>tag</b>", "a\\b `c`"])
def test_markdown_escape_keeps_the_text_literal(text: str) -> None:
    table = Table([[text, 1]], ["name", "n"])._repr_markdown_()
    parser = MarkdownIt("commonmark").enable("table").use(dollarmath_plugin)  # as the book parses it (MyST)
    tokens = parser.parse(table)
    cells = [t for t in tokens if t.type == "inline"]
    assert len(cells) == 4, table  # a "|" in the text did not add a column
    assert [c.type for c in cells[2].children] == ["text"], cells[2].children  # no emphasis, link, html or code
    assert cells[2].children[0].content == text
    assert markdown_escape("two\nlines") == "two lines"


def test_show_table_prints_plain_text_outside_jupyter(capsys: pytest.CaptureFixture[str]) -> None:
    show_table([["a", 1]], ["name", "n"])
    assert capsys.readouterr().out == "name  n\n----  -\na     1\n"


def test_show_source_is_a_python_code_block() -> None:
    def example(x):
        return f"``{x}```"  # backticks in the source must not end the code block

    md = Source(inspect.getsource(example))._repr_markdown_()
    fence = md.split("python")[0]
    assert fence == "````" and md.endswith("\n" + fence)
    tokens = MarkdownIt("commonmark").parse(md)
    assert [t.type for t in tokens] == ["fence"] and tokens[0].info == "python"
    assert 'return f"``{x}```"' in tokens[0].content


def test_show_source_prints_dedented_source(capsys: pytest.CaptureFixture[str]) -> None:
    show_source(Table.__repr__)
    out = capsys.readouterr().out
    assert out.startswith("def __repr__(self) -> str:")
