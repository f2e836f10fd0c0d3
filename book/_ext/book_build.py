"""Sphinx extension for this book's build: an honest execution cache, the results page last, no empty header rows.

- The notebooks are executed through jupyter-cache (``execute_notebooks: cache``), which matches a notebook by
  its code cells only. So that a cached output is never shown for a different mode or a different ``companion``
  package, each mode (quick/full) and each version of the package's source gets its own cache folder under
  ``_build/.jupyter_cache/``: a rebuild with nothing changed executes nothing, a change of mode or of the
  package executes every chapter again.
- The results page is built from the JSON records the chapters write while they execute, so it is read (and
  executed, its notebook metadata asks for ``force``) after every other page, and on every build.
- Markdown tables written without a header (``| | |`` then ``|---|---|``) lose their empty, shaded header row.
- Each notebook is executed with ``COMPANION_CHAPTER`` set to its page (``chapters/03_cnn``), so the result records
  it writes name their chapter on the Results page.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.environment import BuildEnvironment

RESULTS_PAGE = "book/results"


def source_key(srcdir: Path) -> str:
    """Return ``quick-<hash>`` or ``full-<hash>``: the mode and a hash of the package and requirements."""
    digest = hashlib.sha256()
    files = sorted((srcdir / "companion").rglob("*.py")) + [srcdir / "requirements.txt"]
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
    app.connect("env-get-outdated", results_outdated)
    app.connect("env-before-read-docs", results_last)
    app.connect("source-read", name_the_chapter)
    app.connect("doctree-read", drop_empty_table_headers)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
