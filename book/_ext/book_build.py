"""Sphinx extension for this book's build: an honest execution cache, the results page last, no empty header rows.

- The notebooks are executed through jupyter-cache (``execute_notebooks: cache``), which matches a notebook by
  its code cells only. So that a cached output is never shown for a different mode or a different ``companion``
  package, each mode (quick/full) and each version of the package's source gets its own cache folder under
  ``_build/.jupyter_cache/``: a rebuild with nothing changed executes nothing, a change of mode or of the
  package executes every chapter again.
- The results page is built from the JSON records the chapters write while they execute, so it is read (and
  executed, its notebook metadata asks for ``force``) after every other page, and on every build.
- Markdown tables written without a header (``| | |`` then ``|---|---|``) lose their empty, shaded header row.
- The notebooks draw their figures in the book's style: ``MATPLOTLIBRC`` points at ``book/matplotlibrc`` (sizes and
  fonts for the text column), which is also part of the cache key.
- The repository, issue and launch (Binder, Colab) buttons are turned on only when the build is told the
  repository's URL: ``BOOK_REPOSITORY_URL``, or ``GITHUB_SERVER_URL``/``GITHUB_REPOSITORY`` (set by GitHub
  Actions). Without it they stay off: the sources never name a URL of their own.
- Each notebook is executed with ``COMPANION_CHAPTER`` set to its page (``chapters/03_cnn``), so the result records
  it writes name their chapter on the Results page.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.environment import BuildEnvironment
from sphinx.errors import ExtensionError

RESULTS_PAGE = "book/results"
MATPLOTLIBRC = "book/matplotlibrc"
BINDER = "https://mybinder.org"
COLAB = "https://colab.research.google.com"


def source_key(srcdir: Path) -> str:
    """Return ``quick-<hash>`` or ``full-<hash>``: the mode and a hash of the package, requirements and figure style."""
    digest = hashlib.sha256()
    files = sorted((srcdir / "companion").rglob("*.py")) + [srcdir / "requirements.txt", srcdir / MATPLOTLIBRC]
    for path in files:
        if path.is_file():
            digest.update(path.relative_to(srcdir).as_posix().encode())
            digest.update(path.read_bytes())
    quick = os.environ.get("COMPANION_QUICK", "0").strip().lower() in {"1", "true", "yes", "on"}
    return f"{'quick' if quick else 'full'}-{digest.hexdigest()[:12]}"


def set_cache_path(app: Sphinx, config: Config) -> None:
    """Give each mode and package version its own jupyter-cache folder (unless the config names one)."""
    if not config.nb_execution_cache_path:
        folder = Path(app.outdir).parent / ".jupyter_cache" / source_key(Path(app.srcdir))
        config.nb_execution_cache_path = str(folder)


def use_book_figure_style(app: Sphinx, config: Config) -> None:
    """Point the kernels the build starts at the book's matplotlibrc (unless MATPLOTLIBRC is set already)."""
    os.environ.setdefault("MATPLOTLIBRC", str(Path(app.srcdir) / MATPLOTLIBRC))


def repository_url() -> str | None:
    """The repository's URL from the environment: ``BOOK_REPOSITORY_URL``, else GitHub Actions' variables, else None."""
    url = os.environ.get("BOOK_REPOSITORY_URL", "").strip()
    if not url and os.environ.get("GITHUB_REPOSITORY"):
        server = os.environ.get("GITHUB_SERVER_URL", "https://github.com").strip().rstrip("/")
        url = f"{server}/{os.environ['GITHUB_REPOSITORY'].strip()}"
    if url and not re.fullmatch(r"https?://[^\s/]+/\S+", url):
        raise ExtensionError(f"repository URL {url!r} is not an http(s) URL such as https://github.com/OWNER/REPO")
    return url.rstrip("/") or None


def repository_buttons(app: Sphinx, config: Config) -> None:
    """Turn on the repository, issue and launch buttons when the environment names the repository."""
    url = repository_url()
    if url is None:
        return
    options = config.html_theme_options
    options.update(
        repository_url=url,
        repository_branch=os.environ.get("BOOK_REPOSITORY_BRANCH", "main"),
        path_to_docs="",
        use_repository_button=True,
        use_issues_button=True,
    )
    launch = dict(options.get("launch_buttons") or {})
    launch.update(binderhub_url=BINDER, colab_url=COLAB, notebook_interface="jupyterlab", thebe=False)
    options["launch_buttons"] = launch


def results_outdated(app: Sphinx, env: BuildEnvironment, added: set, changed: set, removed: set) -> list[str]:
    """Re-read the results page on every build: the records it shows may have changed."""
    return [RESULTS_PAGE] if RESULTS_PAGE in env.found_docs else []


def results_last(app: Sphinx, env: BuildEnvironment, docnames: list[str]) -> None:
    """Read the results page after the chapters, whose execution writes the records it shows."""
    if RESULTS_PAGE in docnames:
        docnames.remove(RESULTS_PAGE)
        docnames.append(RESULTS_PAGE)


def name_the_chapter(app: Sphinx, docname: str, source: list[str]) -> None:
    """Tell the kernel about to execute ``docname`` which page it is: records written by its code name the chapter."""
    os.environ["COMPANION_CHAPTER"] = docname


def drop_empty_table_headers(app: Sphinx, doctree: nodes.document) -> None:
    """Remove a table's header row when every cell of it is empty."""
    for thead in list(doctree.findall(nodes.thead)):
        if not thead.astext().strip():
            thead.parent.remove(thead)


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", set_cache_path, priority=400)
    app.connect("config-inited", use_book_figure_style)
    app.connect("config-inited", repository_buttons)
    app.connect("env-get-outdated", results_outdated)
    app.connect("env-before-read-docs", results_last)
    app.connect("source-read", name_the_chapter)
    app.connect("doctree-read", drop_empty_table_headers)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
