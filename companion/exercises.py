"""Coursework: release student copies of the chapter notebooks and check a student's notebook.

The notebooks mark their exercises the way nbgrader does: solution code sits between ``### BEGIN SOLUTION``
and ``### END SOLUTION`` in cells whose metadata says ``"nbgrader": {"solution": true, ...}``, written answers
are markdown cells with the same flag, and each coding exercise is followed by a grader cell
(``"grade": true``) that calls a ``companion.grading`` check. ``release`` writes the student copies,
``check`` executes a notebook and reports, for every grader cell, whether it passed and the grader's diagnosis.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Result", "check", "format_results", "main", "release", "release_notebook"]

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")  # nbgrader's stub
ANSWER_STUB = "YOUR ANSWER HERE"
CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _lines(text: str) -> list[str]:
    """A notebook cell's source list: every line ends in a newline except the last."""
    return text.splitlines(keepends=True)


def _nbgrader(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _is_solution(cell: dict) -> bool:
    return bool(_nbgrader(cell).get("solution")) or BEGIN in _source(cell)


def _is_grader(cell: dict) -> bool:
    return cell["cell_type"] == "code" and bool(_nbgrader(cell).get("grade")) and not _nbgrader(cell).get("solution")


def _strip_solution(source: str, where: str) -> str:
    """Replace every BEGIN/END SOLUTION region by nbgrader's stub, indented like the BEGIN marker."""
    if BEGIN not in source:  # a whole-cell solution
        return "\n".join(STUB)
    out, inside = [], False
    for line in source.splitlines():
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise ValueError(f"{where}: '{BEGIN}' inside another solution region; close it with '{END}'")
            indent = line[: len(line) - len(line.lstrip())]
            out += [indent + s for s in STUB]
            inside = True
        elif marker == END:
            if not inside:
                raise ValueError(f"{where}: '{END}' without a '{BEGIN}' before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: '{BEGIN}' without its '{END}'")
    return "\n".join(out)


def release_notebook(nb: dict, name: str = "notebook") -> dict:
    """The student copy of a notebook (JSON dict): solutions stubbed, answers removed, outputs cleared."""
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        if not _is_solution(cell):
            continue
        if cell["cell_type"] == "code":
            cell["source"] = _lines(_strip_solution(_source(cell), f"{name}, cell {i}"))
        else:
            cell["source"] = _lines(ANSWER_STUB)
        tags = cell.get("metadata", {}).get("tags")
        if tags and "hide-input" in tags:  # the book hides its solutions; the student's own code stays visible
            tags.remove("hide-input")
            if not tags:
                del cell["metadata"]["tags"]
    return nb


def _read(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook at {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def release(out_dir: str | os.PathLike, notebooks: list[str | os.PathLike] | None = None) -> list[Path]:
    """Write student copies of ``notebooks`` (default: every chapter) into ``out_dir``; return their paths."""
    if not notebooks:
        notebooks = sorted(CHAPTERS.glob("*.ipynb"))
        if not notebooks:
            raise FileNotFoundError(
                f"no chapter notebooks in {CHAPTERS}; run from a clone of the book's repository or name the notebooks"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in map(Path, notebooks):
        nb = release_notebook(_read(path), path.name)
        target = out / path.name
        if target.resolve() == path.resolve():
            raise ValueError(f"{target} is the book's own notebook; choose another output folder")
        with open(target, "w", encoding="utf-8") as f:
            json.dump(nb, f, indent=1, ensure_ascii=False)
            f.write("\n")
        written.append(target)
    return written


@dataclass
class Result:
    """One graded exercise of a checked notebook."""

    exercise: str
    points: float
    passed: bool
    diagnosis: str


def _error(cell: dict) -> str | None:
    """The error a cell raised when executed, as 'Name: message', or None."""
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            name, value = output.get("ename", "Error"), output.get("evalue", "")
            return value if name == "AssertionError" and value else f"{name}: {value}"
    return None


def _exercise_section(nb: dict) -> dict:
    """The notebook from its '## Exercises' heading on (the section imports what it needs)."""
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown" and _source(cell).lstrip().startswith("## Exercises"):
            nb = copy.deepcopy(nb)
            nb["cells"] = nb["cells"][i:]
            return nb
    raise ValueError("the notebook has no markdown cell starting with '## Exercises'; run without --exercises-only")


def check(
    notebook: str | os.PathLike, exercises_only: bool = False, timeout: int = 1800
) -> tuple[list[Result], list[str]]:
    """Execute a notebook and grade it: one Result per grader cell, and the errors of cells outside the exercises."""
    import nbclient
    import nbformat

    path = Path(notebook)
    nb = _read(path)
    if exercises_only:
        nb = _exercise_section(nb)
    if not any(_is_grader(c) for c in nb["cells"]):
        raise ValueError(f"{path} has no grader cells (code cells with nbgrader metadata 'grade': true)")
    node = nbformat.reads(json.dumps(nb), as_version=4)  # joins the source lines, as nbclient expects
    client = nbclient.NotebookClient(
        node,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    cells = json.loads(nbformat.writes(node))["cells"]
    results, elsewhere, pending = [], [], []
    for i, cell in enumerate(cells):
        error = _error(cell) if cell["cell_type"] == "code" else None
        if _is_grader(cell):
            if pending:  # the solution itself failed to run: that is the first thing to fix
                error = f"your solution cell raised {pending[0]}"
            meta = _nbgrader(cell)
            name, points = meta.get("grade_id", f"cell {i}").removesuffix("-check"), float(meta.get("points", 1))
            results.append(Result(name, points, error is None, error or ""))
            pending = []
        elif error is not None:
            (pending if _is_solution(cell) else elsewhere).append(error if _is_solution(cell) else f"cell {i}: {error}")
    return results, elsewhere


def format_results(path: str | os.PathLike, results: list[Result], elsewhere: list[str], as_json: bool = False) -> str:
    """A plain-text table (exercise, result, diagnosis), or the same as JSON for a learning platform."""
    score = sum(r.points for r in results if r.passed)
    total = sum(r.points for r in results)
    if as_json:
        report = {
            "notebook": str(path),
            "score": score,
            "max_score": total,
            "exercises": [asdict(r) for r in results],
            "errors_outside_exercises": elsewhere,
        }
        return json.dumps(report, indent=1, ensure_ascii=False)
    width = max([len("exercise")] + [len(r.exercise) for r in results])
    rows = [f"{'exercise':<{width}}  result  diagnosis", f"{'-' * width}  ------  ---------"]
    for r in results:
        diagnosis = r.diagnosis.replace("\n", " ")
        rows.append(f"{r.exercise:<{width}}  {'passed' if r.passed else 'FAILED':<6}  {diagnosis}".rstrip())
    rows.append(f"\n{path}: {score:g} of {total:g} points, {sum(r.passed for r in results)} of {len(results)} passed")
    rows += [f"error outside the exercises, {e}" for e in elsewhere]
    return "\n".join(rows)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``exercises`` command (release, check) to the command line's subparsers."""
    parser = sub.add_parser("exercises", help="coursework: write student notebooks, or grade one")
    action = parser.add_subparsers(dest="action", required=True)
    rel = action.add_parser("release", help="write student copies (solutions stubbed, answers removed, no outputs)")
    rel.add_argument("out_dir", help="folder for the student notebooks")
    rel.add_argument("notebooks", nargs="*", help="notebooks to release (default: every chapter)")
    chk = action.add_parser("check", help="execute a notebook and report every exercise: passed or the diagnosis")
    chk.add_argument("notebook")
    chk.add_argument("--json", action="store_true", help="print the report as JSON (for a learning platform)")
    chk.add_argument(
        "--exercises-only",
        action="store_true",
        help="execute only the Exercises section (faster; it is self-contained)",
    )
    chk.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell (default 1800)")


def main(args: argparse.Namespace) -> int:
    """Run ``exercises release`` or ``exercises check``; exit status 1 when an exercise failed, 2 on a bad argument."""
    try:
        if args.action == "release":
            for path in release(args.out_dir, args.notebooks):
                print(f"wrote {path}")
            return 0
        results, elsewhere = check(args.notebook, exercises_only=args.exercises_only, timeout=args.timeout)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_results(args.notebook, results, elsewhere, as_json=args.json))
    return 0 if all(r.passed for r in results) else 1
