"""The book build's own pieces: the mode line, the execution-cache key, author-year labels, empty table headers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from docutils.core import publish_doctree
from pybtex.database import parse_string
from sphinx.errors import ExtensionError

import companion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "book" / "_ext"))
import book_bibstyle  # noqa: E402
import book_build  # noqa: E402


def test_mode_line_names_the_mode_device_and_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPANION_QUICK", "1")
    line = companion.mode_line()
    assert "quick mode (COMPANION_QUICK=1)" in line and "full mode" not in line
    assert torch.__version__ in line and f"device {companion.device()}" in line
    monkeypatch.setenv("COMPANION_QUICK", "0")
    line = companion.mode_line()
    assert "full mode" in line and "quick mode" not in line


def test_cache_key_changes_with_mode_and_package_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "companion").mkdir()
    (tmp_path / "companion" / "a.py").write_text("x = 1\n")
    (tmp_path / "requirements.txt").write_text("torch\n")
    monkeypatch.setenv("COMPANION_QUICK", "1")
    quick = book_build.source_key(tmp_path)
    assert quick.startswith("quick-") and book_build.source_key(tmp_path) == quick  # stable
    monkeypatch.setenv("COMPANION_QUICK", "0")
    full = book_build.source_key(tmp_path)
    assert full.startswith("full-") and full[5:] == quick[6:]
    (tmp_path / "companion" / "a.py").write_text("x = 2\n")
    assert book_build.source_key(tmp_path) != full
    (tmp_path / "companion" / "a.py").write_text("x = 1\n")
    (tmp_path / "requirements.txt").write_text("torch==2.14.1\n")
    assert book_build.source_key(tmp_path) != full


def test_results_page_read_last() -> None:
    docnames = ["book/bibliography", "book/intro", "book/results", "chapters/01_convolution"]
    book_build.results_last(None, None, docnames)
    assert docnames == ["book/bibliography", "book/intro", "chapters/01_convolution", "book/results"]


BIB = """
@article{a1, author = {Paszke, Adam and Gross, Sam and Massa, Francisco}, title = {T}, journal = {J}, year = {2019}}
@article{a2, author = {Xu, Kelvin and Ba, Jimmy}, title = {T2}, journal = {J}, year = {2015}}
@article{a3, author = {Xu, Kelvin and Ba, Jimmy}, title = {T3}, journal = {J}, year = {2015}}
@misc{a4, author = {Jordan, Keller}, title = {T4}, year = {2024}}
@misc{a5, author = {{LeCun}, Yann and Bottou, L{\\'e}on and Bengio, Yoshua}, title = {T5}, year = {1998}}
@misc{a6, author = {M{\\"u}ller, Samuel G. and Hutter, Frank}, title = {T6}, year = {2021}}
"""


def test_author_year_labels_are_unique() -> None:
    entries = list(parse_string(BIB, "bibtex").entries.values())
    labels = list(book_bibstyle.AuthorYearLabels().format_labels(entries))
    assert labels == [
        "Paszke et al., 2019",
        "Xu and Ba, 2015a",
        "Xu and Ba, 2015b",
        "Jordan, 2024",
        "LeCun et al., 1998",
        "Müller and Hutter, 2021",  # the name's LaTeX accent decoded, not shown raw
    ]


def test_empty_table_header_row_dropped() -> None:
    empty_header = "+---+---+\n|   |   |\n+===+===+\n| a | b |\n+---+---+\n"
    real_header = "+---+---+\n| h | i |\n+===+===+\n| c | d |\n+---+---+\n"
    doctree = publish_doctree(empty_header + "\n" + real_header)
    book_build.drop_empty_table_headers(None, doctree)
    tables = list(doctree.findall(lambda n: n.tagname == "table"))
    assert len(tables) == 2
    assert [len(list(t.findall(lambda n: n.tagname == "thead"))) for t in tables] == [0, 1]
    assert "a" in tables[0].astext() and "h" in tables[1].astext()


def test_mode_line_counts_the_threads_in_words(one_thread: None) -> None:
    assert companion.mode_line().endswith(", 1 CPU thread")  # not "1 CPU threads"


def run_results_page(records: Path) -> list[str]:
    """Execute the Results page's notebook over the records in ``records``; return its Markdown outputs."""
    nbclient, nbformat = pytest.importorskip("nbclient"), pytest.importorskip("nbformat")
    book = Path(__file__).resolve().parents[1] / "book"
    nb = nbformat.read(book / "results.ipynb", as_version=4)
    env = {"COMPANION_RECORDS": str(records), "COMPANION_QUICK": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        nbclient.NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(book)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], outputs
    return [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the first table in ``markdown``, each cell's text as a reader sees it."""
    from markdown_it import MarkdownIt
    from mdit_py_plugins.dollarmath import dollarmath_plugin

    tokens = MarkdownIt("commonmark").enable("table").use(dollarmath_plugin).parse(markdown)
    rows, row, body = [], None, False
    for token in tokens:
        body = body or token.type == "tbody_open"
        if body and token.type == "tr_open":
            row = []
        elif body and token.type == "inline":
            row.append("".join(child.content for child in token.children if child.type == "text"))
        elif body and token.type == "tr_close":
            rows.append(row)
    return rows


GOOD = {
    "model": "FastCNN(32, 64, 128)",
    "mode": "quick",
    "chapter": "chapters/03_cnn",
    "test_acc": 0.5,
    "epochs": 2,
    "n_train": 2000,
    "train_seconds": 12.0,
    "device": "cpu",
    "threads": 2,
    "torch": "2.14.1",
    "date": "2026-12-01T10:00:00+00:00",
}


def test_results_page_labels_rows_skips_bad_records_and_escapes_text(tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    (records / "a-good.json").write_text(json.dumps(GOOD))
    odd = {**GOOD, "model": "Net|$x$ *b* <i>", "chapter": None, "date": "2026-12-01T11:00:00+00:00"}
    (records / "b-odd-title.json").write_text(json.dumps(odd))
    (records / "c-broken.json").write_text('{"model": "half a reco')
    (records / "d-empty.json").write_text("{}")
    (records / "e-nan.json").write_text(json.dumps({**GOOD, "test_acc": float("nan")}))
    (records / "f-list.json").write_text("[1, 2]")
    shown = "\n\n".join(run_results_page(records))
    rows = table_rows(shown)
    assert [row[:3] for row in rows] == [["3", "FastCNN(32, 64, 128)", "quick"], ["–", "Net|$x$ *b* <i>", "quick"]]
    assert rows[0][3].startswith("50.00%")
    for name in ["c-broken.json", "d-empty.json", "e-nan.json", "f-list.json"]:
        assert f"{name}" in shown.replace("\\", ""), f"{name} skipped without a word"
    assert "a-good.json" not in shown and "b-odd-title.json" not in shown


def test_records_written_during_a_build_name_their_chapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from companion.records import read_records, write_record

    monkeypatch.setenv("COMPANION_RECORDS", str(tmp_path))
    monkeypatch.delenv("COMPANION_CHAPTER", raising=False)
    write_record({"model": "cli run", "test_acc": 0.5}, "cli")
    book_build.name_the_chapter(None, "chapters/03_cnn", [""])  # what the build does before executing a page
    write_record({"model": "chapter run", "test_acc": 0.5}, "chapter")
    assert {r["name"]: r.get("chapter") for r in read_records()} == {"chapter": "chapters/03_cnn", "cli": None}


def config_with_buttons_off() -> SimpleNamespace:
    """The theme options Jupyter Book derives from book/_config.yml (buttons off, no URL)."""
    options = {"launch_buttons": {"thebe": False, "binderhub_url": "", "colab_url": ""}, "repository_url": ""}
    options.update(use_repository_button=False, use_issues_button=False, use_edit_page_button=False)
    return SimpleNamespace(html_theme_options=options)


@pytest.fixture
def no_repository(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ["BOOK_REPOSITORY_URL", "BOOK_REPOSITORY_BRANCH", "GITHUB_REPOSITORY", "GITHUB_SERVER_URL"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_a_repository_url_the_buttons_stay_off(no_repository: pytest.MonkeyPatch) -> None:
    config = config_with_buttons_off()
    before = json.dumps(config.html_theme_options, sort_keys=True)
    book_build.repository_buttons(None, config)
    assert json.dumps(config.html_theme_options, sort_keys=True) == before
    yml = (Path(__file__).resolve().parents[1] / "book" / "_config.yml").read_text()
    assert "github.com/" not in yml and 'binderhub_url: ""' in yml  # the sources name no URL


def test_github_actions_variables_turn_the_buttons_on(no_repository: pytest.MonkeyPatch) -> None:
    no_repository.setenv("GITHUB_SERVER_URL", "https://github.com")
    no_repository.setenv("GITHUB_REPOSITORY", "someone/attention-book")
    config = config_with_buttons_off()
    book_build.repository_buttons(None, config)
    options = config.html_theme_options
    assert options["repository_url"] == "https://github.com/someone/attention-book"
    assert options["repository_branch"] == "main" and options["path_to_docs"] == ""
    assert options["use_repository_button"] and options["use_issues_button"]
    assert not options["use_edit_page_button"]
    assert options["launch_buttons"]["binderhub_url"] == "https://mybinder.org"
    assert options["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert options["launch_buttons"]["thebe"] is False


def test_book_repository_url_wins_and_a_bad_one_is_refused(no_repository: pytest.MonkeyPatch) -> None:
    no_repository.setenv("GITHUB_REPOSITORY", "someone/attention-book")
    no_repository.setenv("BOOK_REPOSITORY_URL", "https://gitlab.example.org/group/book/")
    no_repository.setenv("BOOK_REPOSITORY_BRANCH", "release")
    config = config_with_buttons_off()
    book_build.repository_buttons(None, config)
    assert config.html_theme_options["repository_url"] == "https://gitlab.example.org/group/book"
    assert config.html_theme_options["repository_branch"] == "release"
    no_repository.setenv("BOOK_REPOSITORY_URL", "github.com/someone/book")
    with pytest.raises(ExtensionError, match="not an http"):
        book_build.repository_buttons(None, config_with_buttons_off())


def test_the_build_draws_figures_in_the_book_style(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MATPLOTLIBRC", raising=False)
    root = Path(__file__).resolve().parents[1]
    book_build.use_book_figure_style(SimpleNamespace(srcdir=str(root)), None)
    rc = os.environ["MATPLOTLIBRC"]
    assert Path(rc) == root / "book" / "matplotlibrc"
    code = "import matplotlib; print(matplotlib.matplotlib_fname(), matplotlib.rcParams['figure.figsize'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == rc and "[7.0, 3.6]" in out
    from companion.viz import MAX_WIDTH

    assert 7.0 <= MAX_WIDTH  # a default figure is no wider than the helpers' widest
    (tmp_path / "companion").mkdir()
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "matplotlibrc").write_text("font.size: 11\n")
    key = book_build.source_key(tmp_path)
    (tmp_path / "book" / "matplotlibrc").write_text("font.size: 12\n")
    assert book_build.source_key(tmp_path) != key  # a new style draws the figures again


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx2 avx512f avx512_bf16 amx_bf16", "amx_bf16"),
        ("fpu avx2 avx512_bf16", "avx512_bf16"),
        ("fp asimd bf16 i8mm", "bf16"),
        ("fpu avx2 avx512f avx512bw", None),
    ],
)
def test_cpu_bf16_reads_the_native_bfloat16_flag(
    flags: str, expected: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    from companion import runtime

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))
    runtime.cpu_bf16.cache_clear()
    try:
        assert runtime.cpu_bf16() == expected
        cpu = torch.device("cpu")
        assert runtime.autocast_dtype(cpu) == (torch.bfloat16 if expected else None)  # "auto" follows the CPU
        assert runtime.autocast_dtype(cpu, "bf16") == torch.bfloat16 and runtime.autocast_dtype(cpu, "fp32") is None
        line = companion.mode_line() if companion.device().type == "cpu" else ""
        assert not line or ("bfloat16 autocast" in line) == bool(expected)
    finally:
        runtime.cpu_bf16.cache_clear()
