"""Checks over the built book (the HTML a reader opens): readable offline, nothing missing, nothing left raw.

Run after a build with ``COMPANION_BOOK_HTML=_build/html python -m pytest tests/test_book_html.py`` (``.ci/run``
does). Without ``COMPANION_BOOK_HTML`` every test here is skipped, so the ordinary test run needs no build.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from bs4 import BeautifulSoup

pytestmark = pytest.mark.skipif(
    not os.environ.get("COMPANION_BOOK_HTML"), reason="no built book: set COMPANION_BOOK_HTML=_build/html"
)

CHAPTERS = [
    "01_convolution",
    "02_self_attention",
    "03_cnn",
    "04_sagan_attention",
    "05_vit",
    "06_llm_classification",
]
EXTERNAL = re.compile(r"^(https?:)?//", re.IGNORECASE)


@pytest.fixture(scope="module")
def root() -> Path:
    path = Path(os.environ["COMPANION_BOOK_HTML"])
    if not (path / "index.html").is_file():
        pytest.fail(f"COMPANION_BOOK_HTML={path} holds no index.html: build the book first (see README)")
    return path


@cache
def soup(path: Path) -> BeautifulSoup:
    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def pages(root: Path) -> list[Path]:
    found = sorted(p for p in root.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)
    assert len(found) >= len(CHAPTERS) + 3, f"only {len(found)} pages in {root}"
    return found


def test_every_chapter_and_the_results_page_are_built(root: Path) -> None:
    for name in CHAPTERS:
        assert (root / "chapters" / f"{name}.html").is_file(), name
    assert (root / "book" / "results.html").is_file()
    assert (root / "book" / "bibliography.html").is_file()


def test_no_outside_host_needed_to_read_a_page(root: Path) -> None:
    bad = []
    for page in pages(root):
        doc = soup(page)
        for tag, attr in [("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src"), ("source", "src")]:
            for node in doc.find_all(tag):
                if tag == "link" and "canonical" in (node.get("rel") or []):
                    continue
                if EXTERNAL.match(node.get(attr) or ""):
                    bad.append(f"{page.relative_to(root)}: <{tag} {attr}={node.get(attr)}>")
        for style in doc.find_all("style"):
            if re.search(r"(@import|url\()\s*['\"]?(https?:)?//", style.get_text()):
                bad.append(f"{page.relative_to(root)}: <style> loads from outside")
    for css in (root / "_static").rglob("*.css"):
        if re.search(r"(@import|url\()\s*['\"]?(https?:)?//", css.read_text(encoding="utf-8", errors="replace")):
            bad.append(f"{css.relative_to(root)} loads from outside")
    assert not bad, "\n".join(bad)


def test_math_renderer_ships_with_the_book(root: Path) -> None:
    with_math = 0
    for page in pages(root):
        doc = soup(page)
        if not doc.select(".math"):
            continue
        with_math += 1
        scripts = [s["src"] for s in doc.find_all("script", src=True) if "mathjax" in s["src"].lower()]
        assert scripts, f"{page.relative_to(root)} has formulas but loads no MathJax"
        for src in scripts:
            assert not EXTERNAL.match(src), src
            assert (page.parent / urlsplit(src).path).resolve().is_file(), f"{page.relative_to(root)}: {src} missing"
    assert with_math >= 4, "the chapters' formulas were not found"
    fonts = list((root / "_static" / "mathjax" / "output" / "chtml" / "fonts").rglob("*.woff"))
    assert fonts, "MathJax's fonts are not in _static/mathjax"


def test_every_image_is_present(root: Path) -> None:
    count, missing = 0, []
    for page in pages(root):
        for img in soup(page).find_all("img"):
            src = img.get("src", "")
            alt = (img.get("alt") or "").strip()
            if not alt or re.search(r"\.(png|jpe?g|svg|gif)$", alt, re.IGNORECASE):
                missing.append(f"{page.relative_to(root)}: {src} has no description (alt text {alt!r})")
            if src.startswith("data:"):
                count += 1
                continue
            count += 1
            if not (page.parent / unquote(urlsplit(src).path)).is_file():
                missing.append(f"{page.relative_to(root)}: {src}")
    assert not missing, "\n".join(missing)
    assert count >= 30, f"only {count} images in the book: were the notebooks executed?"


@cache
def anchors(path: Path) -> frozenset[str]:
    doc = soup(path)
    return frozenset(
        [n["id"] for n in doc.find_all(id=True)] + [n["name"] for n in doc.find_all("a", attrs={"name": True})]
    )


def test_every_internal_link_and_anchor_resolves(root: Path) -> None:
    count, broken = 0, []
    for page in pages(root):
        for a in soup(page).find_all("a", href=True):
            href = a["href"]
            parts = urlsplit(href)
            if parts.scheme or href.startswith("//") or href in {"", "#"}:
                continue
            count += 1
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(root)}: {href} (no such file)")
            elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in anchors(target):
                broken.append(f"{page.relative_to(root)}: {href} (no such anchor)")
    assert not broken, f"{len(broken)} broken of {count}:\n" + "\n".join(broken[:50])
    assert count >= 200, f"only {count} internal links"


def mode_of(text: str) -> str:
    quick, full = "quick mode (COMPANION_QUICK=1)" in text, "full mode" in text
    assert quick != full, "the page does not say (exactly) one mode"
    return "quick" if quick else "full"


def test_each_chapter_says_the_mode_it_was_built_in(root: Path) -> None:
    modes = set()
    for name in CHAPTERS:
        outputs = soup(root / "chapters" / f"{name}.html").select("div.cell_output")
        assert outputs, f"{name}: no outputs (not executed?)"
        first = outputs[0].get_text()
        assert "This run:" in first and "torch" in first and "device" in first, f"{name}: {first[:200]!r}"
        modes.add(mode_of(first))
    assert len(modes) == 1, f"chapters built in different modes: {modes}"


def test_results_page_first_line_says_the_mode(root: Path) -> None:
    doc = soup(root / "book" / "results.html")
    article = doc.select_one("article") or doc
    first = article.find("h1").find_next("p").get_text()
    assert "This page was built in" in first, first
    chapter = soup(root / "chapters" / "03_cnn.html").select("div.cell_output")[0].get_text()
    assert mode_of(first.replace("quick mode", "quick mode (COMPANION_QUICK=1)", 1)) == mode_of(chapter)
    assert "External anchors" in article.get_text() and "external" in article.get_text().lower()
    runs = article.find(id="this-book-s-runs").find_next("table")  # the records the chapters wrote in this build
    rows = [[td.get_text().strip() for td in tr.find_all("td")] for tr in runs.find("tbody").find_all("tr")]
    assert len(rows) >= 7, rows
    header = [th.get_text().strip() for th in runs.find("thead").find_all("th")]
    assert header[:3] == ["chapter", "model", "mode"], header
    models = " | ".join(row[1] for row in rows)
    for model in ("TinyCNN", "FastCNN", "AttentionCNN", "ViT", "cosine head"):  # Chapters 1, 3, 4, 5 and 6
        assert model in models, f"no row for {model}: {models}"
    assert {row[0] for row in rows} >= {"1", "3", "4", "5", "6"}, "rows without the chapter that ran them"
    assert {row[2] for row in rows} == {mode_of(chapter)}, rows
    assert "skipped" not in article.get_text(), "a record file of this build could not be read"


def test_api_reference_documents_what_a_student_imports(root: Path) -> None:
    ids = anchors(root / "book" / "api.html")
    for name in [
        "companion.train.fit",
        "companion.train.evaluate",
        "companion.data.load_cifar10",
        "companion.viz.show_table",
        "companion.models.vit.ViT",
        "companion.recipes.vit.VitRecipe",
    ]:
        assert name in ids, f"the API page does not document {name}"
    text = soup(root / "book" / "api.html").select_one("article").get_text()
    assert "Train model on train_data" in text, "fit's docstring is not on the API page"


def test_landing_page_links_every_chapter(root: Path) -> None:
    article = soup(root / "book" / "intro.html").select_one("article")
    targets = {urlsplit(a["href"]).path for a in article.find_all("a", href=True)}
    for name in CHAPTERS:
        assert f"../chapters/{name}.html" in targets, f"the landing page's text does not link {name}"
    assert "results.html" in targets


def test_no_stray_python_reprs_in_outputs(root: Path) -> None:
    stray = re.compile(r"^(Text\(|<Figure size|\[<matplotlib|<matplotlib)", re.MULTILINE)
    for name in CHAPTERS:
        for out in soup(root / "chapters" / f"{name}.html").select("div.cell_output pre"):
            assert not stray.search(out.get_text()), f"{name}: {out.get_text()[:120]!r}"


def test_one_output_box_per_stream(root: Path) -> None:
    for name in CHAPTERS:
        for out in soup(root / "chapters" / f"{name}.html").select("div.cell_output"):
            streams = out.select(":scope > div.output.stream")
            assert len(streams) <= 1, f"{name}: one cell's printout split into {len(streams)} boxes"


def test_no_empty_table_header_rows(root: Path) -> None:
    for page in pages(root):
        for thead in soup(page).find_all("thead"):
            assert thead.get_text().strip(), f"{page.relative_to(root)}: a table starts with an empty header row"


def test_bibliography_author_year_with_links(root: Path) -> None:
    doc = soup(root / "book" / "bibliography.html")
    labels = [n.get_text().strip("[] \n") for n in doc.select("span.label")]
    assert len(labels) >= 20, labels
    for label in labels:
        assert re.fullmatch(r"[^\[\]]+, (\d{4}|n\.d\.)[a-z]?", label), f"not an author-year label: {label!r}"
    text = doc.get_text()
    assert "$" not in text and "\\" not in text, "raw LaTeX in the bibliography"
    arxiv = [a["href"] for a in doc.find_all("a", href=True) if "arxiv.org/abs/" in a["href"]]
    assert "https://arxiv.org/abs/2404.00498" in arxiv, arxiv
    for number in doc.find_all(string=re.compile(r"arXiv:\d{4}\.\d{4,5}")):
        assert number.find_parent("a"), f"an arXiv number that is not a link: {number!r}"


def test_no_placeholder_repository_or_live_code_leftovers(root: Path) -> None:
    for page in pages(root):
        html = page.read_text(encoding="utf-8")
        for leftover in ["binder-examples", "executablebooks/jupyter-book", "thebe"]:
            assert leftover not in html, f"{page.relative_to(root)} still names {leftover!r}"
