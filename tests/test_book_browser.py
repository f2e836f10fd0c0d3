"""The built book read in a real browser (headless Chromium through Playwright), as a reader would read it.

Every page is served from ``127.0.0.1`` with every other host blocked, and opened at 1280 px (a desktop) and at
375 px (a phone). The checks: formulas rendered by MathJax (no raw TeX, no MathJax error), every image loaded and
described by an alt text that is not a file name, every internal link and anchor present in the rendered page,
no page wider than a phone's screen, no printed output line wrapped, no console error, no request to another
host; at 375 px the menu (chapter list) and the "Contents" button open their panels and close them again. Figures:
at 1280 px none is scaled down (it fits the text column, so its text is shown at its drawn size), and in the dark
theme each lies on a light, padded card whose colour contrasts with the page (measured on a screenshot).

Run after a build, with Debian's ``chromium`` and the ``playwright`` package installed (``.ci/run`` does both)::

    COMPANION_BOOK_HTML=_build/html python -m pytest tests/test_book_browser.py

Without ``COMPANION_BOOK_HTML`` every test here is skipped. The browser is ``/usr/bin/chromium`` or the one named by
``COMPANION_CHROMIUM``; Playwright's own browser download is never used.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytestmark = pytest.mark.skipif(
    not os.environ.get("COMPANION_BOOK_HTML"), reason="no built book: set COMPANION_BOOK_HTML=_build/html"
)

WIDTHS = (1280, 375)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IMAGE_FILE = re.compile(r"(^|/)[^ ]*\.(png|jpe?g|svg|gif|webp)$", re.IGNORECASE)


@dataclass
class Page:
    """What one page showed at one width."""

    path: str
    width: int
    unrendered_math: list[str] = field(default_factory=list)
    math_errors: list[str] = field(default_factory=list)
    formulas: int = 0
    bad_images: list[str] = field(default_factory=list)
    shrunk_figures: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    page_width: int = 0
    wrapped_outputs: list[str] = field(default_factory=list)
    cut_equations: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # no line per request in the test output
        pass


@pytest.fixture(scope="module")
def root() -> Path:
    path = Path(os.environ["COMPANION_BOOK_HTML"]).resolve()
    if not (path / "index.html").is_file():
        pytest.fail(f"COMPANION_BOOK_HTML={path} holds no index.html: build the book first (see README)")
    return path


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def browser(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, list[str]]]:
    """A Chromium context (fresh profile) that may reach only the local server; also the blocked requests."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (see .ci/run)")
    executable = os.environ.get("COMPANION_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).is_file():
        pytest.fail(f"no Chromium at {executable}: apt-get install chromium, or set COMPANION_CHROMIUM")
    profile = tmp_path_factory.mktemp("chromium-profile")
    blocked: list[str] = []
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=executable, headless=True, args=CHROMIUM_FLAGS
        )

        def only_local(route) -> None:
            if route.request.url.startswith(server + "/") or route.request.url.startswith("data:"):
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort()

        context.route("**/*", only_local)
        yield context, blocked
        context.close()


REDIRECT = re.compile(r"<meta http-equiv=\"refresh\"", re.IGNORECASE)


def book_pages(root: Path) -> list[str]:
    """Every HTML page of the book except the redirects (index.html sends the reader to the first page)."""
    found = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.html")
        if "_static" not in p.parts and "_sources" not in p.parts and not REDIRECT.search(p.read_text())
    )
    assert len(found) >= 9, f"only {len(found)} pages in {root}"
    return found


def test_the_front_door_leads_to_the_first_page(server: str, browser: tuple[object, list[str]]) -> None:
    context, _ = browser
    page = context.new_page()
    page.goto(f"{server}/index.html")
    page.wait_for_url("**/book/intro.html")
    assert page.locator("article h1").first.is_visible()
    page.close()


READ_PAGE = """() => {
  const out = {unrendered: [], errors: [], images: [], links: [], ids: [], wrapped: [],
               formulas: document.querySelectorAll('.math').length};
  for (const el of document.querySelectorAll('.math')) {
    if (!el.querySelector('mjx-container')) out.unrendered.push(el.textContent.trim().slice(0, 80));
  }
  for (const el of document.querySelectorAll('mjx-merror, [data-mjx-error]')) {
    out.errors.push((el.getAttribute('data-mjx-error') || el.textContent).slice(0, 80));
  }
  for (const img of document.querySelectorAll('article img, main img')) {
    const box = img.getBoundingClientRect();
    out.images.push({src: img.getAttribute('src'), alt: img.getAttribute('alt'),
                     figure: !!img.closest('div.cell_output'), loaded: img.complete && img.naturalWidth > 0,
                     shown: box.width, drawn: img.naturalWidth});
  }
  for (const a of document.querySelectorAll('a[href]')) out.links.push(a.href);
  for (const el of document.querySelectorAll('[id]')) out.ids.push(el.id);
  for (const el of document.querySelectorAll('a[name]')) out.ids.push(el.getAttribute('name'));
  for (const pre of document.querySelectorAll('div.cell_output pre')) {
    const before = pre.getBoundingClientRect().height;
    const saved = pre.style.whiteSpace;
    pre.style.whiteSpace = 'pre';
    const unwrapped = pre.getBoundingClientRect().height;
    pre.style.whiteSpace = saved;
    if (before > unwrapped + 1) out.wrapped.push(pre.textContent.split('\\n').find(l => l.length > 40) || '');
  }
  out.cut = [];
  for (const el of document.querySelectorAll('mjx-container[display="true"]')) {
    if (el.scrollWidth <= el.clientWidth + 1) continue;  // fits
    const style = getComputedStyle(el);
    const scrolls = ['auto', 'scroll'].includes(style.overflowX);
    const hint = style.backgroundImage.includes('gradient');
    if (!scrolls || !hint) out.cut.push((el.getAttribute('aria-label') || el.textContent).slice(0, 60));
  }
  out.width = Math.max(document.documentElement.scrollWidth, document.body.scrollWidth);
  return out;
}"""


def open_page(context: object, url: str, width: int, errors: list[str]) -> object:
    page = context.new_page()
    page.set_viewport_size({"width": width, "height": 900})
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url, wait_until="load")
    # MathJax typesets after load: wait for it (a page without formulas may not load MathJax at all).
    page.evaluate("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
    return page


@pytest.fixture(scope="module")
def rendered(root: Path, server: str, browser: tuple[object, list[str]]) -> list[Page]:
    """Every page at every width, read once; the tests below check what was read."""
    context, _ = browser
    results = []
    for path in book_pages(root):
        for width in WIDTHS:
            shown = Page(path, width)
            page = open_page(context, f"{server}/{path}", width, shown.console_errors)
            data = page.evaluate(READ_PAGE)
            page.close()
            shown.unrendered_math = data["unrendered"]
            shown.math_errors = data["errors"]
            shown.formulas = data["formulas"]
            for img in data["images"]:
                alt, src = (img["alt"] or "").strip(), img["src"] or ""
                if not img["loaded"]:
                    shown.bad_images.append(f"{src}: not loaded")
                elif not alt:
                    shown.bad_images.append(f"{src}: no alt text")
                elif IMAGE_FILE.search(alt) or alt == Path(unquote(src)).name:
                    shown.bad_images.append(f"{src}: alt text is a file name ({alt!r})")
                # at 85% of its drawn width a figure's 9.5-pt labels stay at about 11 px (the were ~6 px at
                # under 60%); the dark theme's card padding alone takes 16 px of the 704-px column at 1280 px
                if img["figure"] and img["loaded"] and img["shown"] < 0.85 * img["drawn"]:
                    shown.shrunk_figures.append(f"{src}: drawn {img['drawn']} px wide, shown at {img['shown']:.0f} px")
            shown.links = data["links"]
            shown.ids = set(data["ids"])
            shown.page_width = data["width"]
            shown.wrapped_outputs = data["wrapped"]
            shown.cut_equations = data["cut"]
            results.append(shown)
    return results


def report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s):\n" + "\n".join(problems[:60])


def test_formulas_are_rendered(rendered: list[Page]) -> None:
    problems = [f"{p.path} @{p.width}: raw TeX {m!r}" for p in rendered for m in p.unrendered_math]
    problems += [f"{p.path} @{p.width}: MathJax error {m!r}" for p in rendered for m in p.math_errors]
    assert not problems, report(problems)
    formulas = sum(p.formulas for p in rendered if p.width == 1280)
    assert formulas >= 200, f"only {formulas} formulas in the book"


def test_every_image_loads_with_a_description(rendered: list[Page]) -> None:
    problems = [f"{p.path} @{p.width}: {b}" for p in rendered for b in p.bad_images]
    assert not problems, report(problems)


def test_no_figure_is_shrunk_on_a_desktop(rendered: list[Page]) -> None:
    """At 1280 px every figure fits the text column (companion.viz.MAX_WIDTH): shown at >= 85% of its drawn size."""
    problems = [f"{p.path}: {f}" for p in rendered if p.width == 1280 for f in p.shrunk_figures]
    assert not problems, report(problems)


def test_every_internal_link_and_anchor_resolves(rendered: list[Page], server: str) -> None:
    ids = {p.path: p.ids for p in rendered if p.width == 1280}
    problems, count = [], 0
    for p in (p for p in rendered if p.width == 1280):
        for href in p.links:
            if not href.startswith(server + "/"):
                continue
            parts = urlsplit(href)
            target = unquote(parts.path).lstrip("/") or "index.html"
            if target.endswith("/"):
                target += "index.html"
            count += 1
            if target not in ids:
                if not (Path(os.environ["COMPANION_BOOK_HTML"]) / target).is_file():
                    problems.append(f"{p.path}: {href} (no such page)")
            elif parts.fragment and unquote(parts.fragment) not in ids[target]:
                problems.append(f"{p.path}: {href} (no such anchor in the rendered page)")
    assert not problems, report(problems)
    assert count >= 200, f"only {count} internal links"


def test_no_page_wider_than_a_phone(rendered: list[Page]) -> None:
    problems = [
        f"{p.path}: {p.page_width} px wide at 375 px" for p in rendered if p.width == 375 and p.page_width > 375
    ]
    assert not problems, report(problems)


def test_wide_equations_scroll_with_a_hint(rendered: list[Page]) -> None:
    """A display equation wider than the column scrolls sideways and shows a shadow at the edge that has more."""
    problems = [f"{p.path} @{p.width}: cut without a hint {m!r}" for p in rendered for m in p.cut_equations]
    assert not problems, report(problems)


def test_printed_outputs_are_not_wrapped(rendered: list[Page]) -> None:
    problems = [
        f"{p.path} @{p.width}: a wrapped output line {line[:70]!r}" for p in rendered for line in p.wrapped_outputs
    ]
    assert not problems, report(problems)


def test_no_console_errors(rendered: list[Page]) -> None:
    problems = [f"{p.path} @{p.width}: {e[:200]}" for p in rendered for e in p.console_errors]
    assert not problems, report(problems)


def test_no_request_leaves_the_machine(rendered: list[Page], browser: tuple[object, list[str]]) -> None:
    _, blocked = browser
    assert not blocked, report(sorted(set(blocked)))


def visible(page: object, selector: str) -> bool:
    return page.locator(selector).first.is_visible()


@pytest.mark.parametrize(
    "toggle, panel, link, beside",
    [  # the chapter list slides in from the left, the contents from the right: a tap on the other side closes
        ("primary-toggle", "#pst-primary-sidebar-modal", "a[href*='02_self_attention']", 365),
        ("secondary-toggle", "#pst-secondary-sidebar-modal", "a[href^='#']", 10),
    ],
)
def test_phone_menu_and_contents_open_and_close(
    server: str, browser: tuple[object, list[str]], toggle: str, panel: str, link: str, beside: int
) -> None:
    context, _ = browser
    errors: list[str] = []
    page = open_page(context, f"{server}/chapters/03_cnn.html", 375, errors)
    buttons = [b for b in page.locator(f"button.{toggle}").all() if b.is_visible()]
    assert len(buttons) == 1, f"{len(buttons)} visible .{toggle} buttons at 375 px"
    assert not visible(page, f"{panel} {link}"), f"{panel} shown before the button was pressed"
    buttons[0].click()
    page.wait_for_timeout(300)
    assert visible(page, f"{panel} {link}"), f"pressing .{toggle} at 375 px did not open {panel}"
    page.keyboard.press("Escape")
    page.wait_for_timeout(300)
    assert not visible(page, f"{panel} {link}"), f"Escape did not close {panel}"
    buttons[0].click()
    page.wait_for_timeout(300)
    assert visible(page, f"{panel} {link}"), f"{panel} did not open a second time"
    page.mouse.click(beside, 450)  # the backdrop, beside the panel
    page.wait_for_timeout(300)
    assert not visible(page, f"{panel} {link}"), f"a tap beside {panel} did not close it"
    page.close()
    assert not errors, errors


@pytest.mark.parametrize("width", WIDTHS)
def test_one_search_control(server: str, browser: tuple[object, list[str]], width: int) -> None:
    context, _ = browser
    errors: list[str] = []
    page = open_page(context, f"{server}/chapters/02_self_attention.html", width, errors)
    shown = [b for b in page.locator(".search-button, .search-button-field, form.bd-search").all() if b.is_visible()]
    assert len(shown) == 1, f"{len(shown)} search boxes or buttons shown at {width} px"
    shown[0].click()
    page.wait_for_timeout(300)
    assert page.locator("#pst-search-dialog input[name=q]").is_visible(), "the search button opens no search field"
    page.close()
    assert not errors, errors


def test_desktop_menu_button_hides_and_shows_the_chapter_list(server: str, browser: tuple[object, list[str]]) -> None:
    context, _ = browser
    errors: list[str] = []
    page = open_page(context, f"{server}/chapters/03_cnn.html", 1280, errors)
    sidebar = "#pst-primary-sidebar a[href*='02_self_attention']"
    assert visible(page, sidebar), "the chapter list is not shown on a desktop"
    buttons = [b for b in page.locator("button.primary-toggle").all() if b.is_visible()]
    assert len(buttons) == 1, f"{len(buttons)} visible menu buttons at 1280 px"
    buttons[0].click()
    page.wait_for_timeout(400)
    assert not visible(page, sidebar), "the menu button did not hide the chapter list"
    assert not visible(page, "#pst-primary-sidebar-modal a"), "the menu button opened a pop-up on a desktop"
    buttons[0].click()
    page.wait_for_timeout(400)
    assert visible(page, sidebar), "the menu button did not show the chapter list again"
    page.close()
    assert not errors, errors


def luminance(rgb: tuple[int, ...]) -> float:
    """The relative luminance of an sRGB colour (0 black, 1 white), as WCAG defines it."""
    linear = [c / 255 / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: float, b: float) -> float:
    """WCAG's contrast ratio of two luminances (1 to 21; 4.5 is the minimum for body text)."""
    return (max(a, b) + 0.05) / (min(a, b) + 0.05)


READ_FIGURES = """() => {
  const colour = s => (s.match(/[\\d.]+/g) || []).slice(0, 3).map(Number);
  const page = colour(getComputedStyle(document.body).backgroundColor);
  return {theme: document.documentElement.dataset.theme, page,
          figures: [...document.querySelectorAll('div.cell_output img')].map((img, i) => {
            img.dataset.figureIndex = i;
            const style = getComputedStyle(img);
            return {src: img.getAttribute('src'), padding: Math.min(...['Top', 'Right', 'Bottom', 'Left'].map(
              side => parseFloat(style['padding' + side])))};
          })};
}"""


def test_figures_are_legible_in_the_dark_theme(root: Path, server: str, browser: tuple[object, list[str]]) -> None:
    """In the dark theme every figure (drawn for a light page) lies on a light card with padding around it.

    What is measured, on a screenshot of each figure as shown: the colour of the card around it (the most common
    colour one pixel inside its edge, in the padding; a heatmap may fill the figure itself with a dark colour) is
    light and contrasts with the dark page, and the card has padding, so that no label touches the dark page.
    """
    image = pytest.importorskip("PIL.Image", reason="Pillow (a Matplotlib dependency) reads the screenshots")
    context, _ = browser
    problems, count = [], 0
    for path in book_pages(root):
        page = context.new_page()
        page.add_init_script("localStorage.setItem('mode', 'dark'); localStorage.setItem('theme', 'dark');")
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(f"{server}/{path}", wait_until="load")
        data = page.evaluate(READ_FIGURES)
        assert data["theme"] == "dark", f"{path}: the dark theme did not take ({data['theme']!r})"
        page_luminance = luminance(tuple(int(c) for c in data["page"]))
        assert page_luminance < 0.1, f"{path}: the page is not dark in the dark theme ({data['page']})"
        for i, figure in enumerate(data["figures"]):
            count += 1
            shot = image.open(BytesIO(page.locator(f"img[data-figure-index='{i}']").screenshot())).convert("RGB")
            w, h = shot.size
            edge = [shot.getpixel((x, y)) for x in range(1, w - 1, 5) for y in (1, h - 2)]
            edge += [shot.getpixel((x, y)) for y in range(1, h - 1, 5) for x in (1, w - 2)]
            background = max(set(edge), key=edge.count)
            light = luminance(background)
            if light < 0.5 or contrast(light, page_luminance) < 4.5:
                problems.append(f"{path}: {figure['src']} lies on {background} (luminance {light:.2f}) on the page")
            if figure["padding"] < 4:
                problems.append(f"{path}: {figure['src']} has {figure['padding']:.0f} px of card around it")
        page.evaluate("localStorage.removeItem('mode'); localStorage.removeItem('theme')")
        page.close()
    assert count >= 30, f"only {count} figures in the book"
    assert not problems, report(problems)
