"""Coursework: student copies and solutions of the chapter notebooks, and a check of a student's notebook.

The notebooks mark their exercises the way nbgrader does: solution code sits between ``### BEGIN SOLUTION``
and ``### END SOLUTION`` in cells whose metadata says ``"nbgrader": {"solution": true, ...}``, written answers
are markdown cells with the same flag, and each coding exercise is followed by a grader cell
(``"grade": true``) that calls a ``companion.grading`` check. ``release`` writes the student copies and
``solutions`` the worked ones. ``check`` grades a submission against its release: the exercises, points and
grader cells come from the release, and the notebook runs in a separate process (``companion._runner``) with
its own temporary folder, a minimal environment and limits on time, memory and output. ``grade`` checks a
folder of submissions and writes one row per student and exercise.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import csv
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Result",
    "check",
    "format_results",
    "grade",
    "main",
    "release",
    "release_notebook",
    "solution_notebook",
    "solutions",
    "stop_all",
]

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
    """A notebook's JSON, or a one-line error naming the file when it is missing or not a notebook."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook at {path}")
    try:
        nb = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a notebook: it is not UTF-8 text (a binary file?)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a notebook: invalid JSON at line {err.lineno} ({err.msg})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError(f"{path} is not a notebook: expected a JSON object with a list of 'cells'")
    for i, cell in enumerate(nb["cells"]):
        if not isinstance(cell, dict) or cell.get("cell_type") not in ("code", "markdown", "raw"):
            raise ValueError(f"{path} is not a valid notebook: cell {i} has no cell_type code, markdown or raw")
        if not isinstance(cell.get("metadata", {}), dict) or not isinstance(_nbgrader(cell), dict):
            raise ValueError(f"{path} is not a valid notebook: cell {i} has malformed metadata")
    return nb


def _write_new(target: Path, nb: dict, force: bool) -> None:
    """Write a notebook; an existing file (perhaps a student's work) is replaced only when ``force`` is set."""
    if target.exists() and not force:
        raise FileExistsError(
            f"{target} exists (a student's work?); choose an empty folder, or pass --force to replace it"
        )
    with open(target, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")


def _chapters(notebooks: Sequence[str | os.PathLike] | None) -> list[Path]:
    if notebooks:
        return [Path(p) for p in notebooks]
    found = sorted(CHAPTERS.glob("*.ipynb"))
    if not found:
        raise FileNotFoundError(
            f"no chapter notebooks in {CHAPTERS}; run from a clone of the book's repository or name the notebooks"
        )
    return found


def release(
    out_dir: str | os.PathLike, notebooks: Sequence[str | os.PathLike] | None = None, force: bool = False
) -> list[Path]:
    """Write student copies of ``notebooks`` (default: every chapter) into ``out_dir``; return their paths.

    An existing file in ``out_dir`` is never replaced unless ``force`` is set: it may be a student's work.
    """
    return _write_all(out_dir, notebooks, force, release_notebook)


def solution_notebook(nb: dict, name: str = "notebook") -> dict:
    """The worked solutions of a notebook (JSON dict): solution markers and hidden-input tags removed, no outputs."""
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        if _is_solution(cell) and cell["cell_type"] == "code":
            lines = [line for line in _source(cell).splitlines() if line.strip() not in (BEGIN, END)]
            cell["source"] = _lines("\n".join(lines))
            tags = cell.get("metadata", {}).get("tags")
            if tags and "hide-input" in tags:
                tags.remove("hide-input")
                if not tags:
                    del cell["metadata"]["tags"]
    return nb


def solutions(
    out_dir: str | os.PathLike, notebooks: Sequence[str | os.PathLike] | None = None, force: bool = False
) -> list[Path]:
    """Write the worked solutions of ``notebooks`` (default: every chapter) into ``out_dir``, to publish later."""
    return _write_all(out_dir, notebooks, force, solution_notebook)


def _write_all(
    out_dir: str | os.PathLike, notebooks: Sequence[str | os.PathLike] | None, force: bool, transform: Callable
) -> list[Path]:
    out = Path(out_dir)
    paths = _chapters(notebooks)
    converted = [(out / path.name, transform(_read(path), path.name), path) for path in paths]  # all read first
    for target, _, path in converted:
        if target.resolve() == path.resolve():
            raise ValueError(f"{target} is the book's own notebook; choose another output folder")
        if target.exists() and not force:
            raise FileExistsError(
                f"{target} exists (a student's work?); nothing was written. Choose an empty folder, or pass --force "
                "to replace the files"
            )
    out.mkdir(parents=True, exist_ok=True)
    for target, nb, _ in converted:
        _write_new(target, nb, force)
    return [target for target, _, _ in converted]


@dataclass
class Result:
    """One graded exercise of a checked notebook: ``kind`` is "auto" (run by its grader) or "manual" (written)."""

    exercise: str
    points: float
    passed: bool
    diagnosis: str
    kind: str = "auto"


DEFAULT_TIMEOUT = 300  # seconds per cell: a few minutes, ample for the exercises and for each quick-mode cell
DEFAULT_MEMORY_MB = 8192  # address space of the checked notebook's process (PyTorch alone maps about 1 GB)
OUTPUT_LIMIT = 100_000  # characters of printed output kept per cell; the rest is dropped
FILE_LIMIT = 256 << 20  # largest file the checked notebook may write
GRACE = 15  # seconds after a cell's timeout before its process is killed from outside
_ACTIVE: set[subprocess.Popen] = set()  # running checks, ended by an interrupt
_ACTIVE_LOCK = threading.Lock()


def _checks(source: str, where: str) -> list[tuple[str, str]]:
    """The (check, argument) pairs of a released grader cell, which must hold only ``grading.check_*(name)`` calls."""
    from companion import grading

    pairs = []
    for stmt in ast.parse(source).body:
        call = stmt.value if isinstance(stmt, ast.Expr) else None
        if not (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and isinstance(call.func.value, ast.Name)
            and call.func.value.id == "grading"
            and call.func.attr in grading.__all__
            and len(call.args) == 1
            and isinstance(call.args[0], ast.Name)
            and not call.keywords
        ):
            raise ValueError(f"{where}: a grader cell may hold only calls grading.check_*(name), one per line")
        pairs.append((call.func.attr, call.args[0].id))
    return pairs


def _release_for(path: Path, nb: dict) -> Path:
    """The book's chapter a submission was made from: same file name, else the chapter sharing its grade_ids."""
    if (CHAPTERS / path.name).is_file():
        return CHAPTERS / path.name
    ids = {_nbgrader(c).get("grade_id") for c in nb["cells"]} - {None}
    best, shared = None, 0
    for chapter in sorted(CHAPTERS.glob("*.ipynb")):
        common = len(ids & {_nbgrader(c).get("grade_id") for c in _read(chapter)["cells"]})
        if common > shared:
            best, shared = chapter, common
    if best is None:
        raise ValueError(f"cannot tell which chapter {path} was made from; name its release with --release NOTEBOOK")
    return best


def _environment(workdir: str, threads: int | None) -> dict[str, str]:
    """PATH, the book's own variables and a private HOME: nothing else of the grader's environment is passed on."""
    from companion.data import data_root

    env = {k: v for k, v in os.environ.items() if k.startswith(("COMPANION_", "HF_", "TRANSFORMERS_"))}
    env.update(
        PATH=os.environ.get("PATH", os.defpath),
        HOME=workdir,
        TMPDIR=workdir,
        LANG="C.UTF-8",
        MPLBACKEND="Agg",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),  # this companion package, the one whose graders run
        COMPANION_DATA=str(data_root()),
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _stop(proc: subprocess.Popen) -> None:
    """Kill the checked notebook's process and everything it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def stop_all() -> None:
    """Kill every running check (the handler of Ctrl-C and SIGTERM calls this)."""
    with _ACTIVE_LOCK:
        running = list(_ACTIVE)
    for proc in running:
        _stop(proc)


def _execute(plan: dict, timeout: float, threads: int | None) -> tuple[dict[int, str | None], int | None, str | None]:
    """Run a plan in a fresh process and temporary folder: (errors of the cells that finished, last cell, why it
    stopped early or None)."""
    with tempfile.TemporaryDirectory(prefix="companion-check-") as workdir, tempfile.TemporaryFile() as log:
        read, write = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, "-m", "companion._runner", str(write)],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=_environment(workdir, threads),
            pass_fds=(write,),
            start_new_session=True,
        )
        os.close(write)
        with _ACTIVE_LOCK:
            _ACTIVE.add(proc)
        done: dict[int, str | None] = {}
        current, stopped, buffer = None, None, b""
        try:
            proc.stdin.write(json.dumps(plan).encode())
            proc.stdin.close()
            deadline = time.monotonic() + timeout + 120  # starting up imports PyTorch
            while stopped is None:
                ready, _, _ = select.select([read], [], [], max(deadline - time.monotonic(), 0))
                if not ready:
                    stopped = f"cell {current} did not stop within {timeout:g} s; the checker killed its process"
                    break
                chunk = os.read(read, 1 << 16)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    event = json.loads(line)
                    current = event["cell"]
                    if event["event"] == "done":
                        done[current] = event["error"]
                    deadline = time.monotonic() + timeout + GRACE
                if len(buffer) > 1 << 20:
                    stopped = "the checked notebook wrote garbage on the checker's report channel"
            if stopped is None and len(done) < len(plan["cells"]):
                status = proc.wait()
                log.seek(max(log.seek(0, os.SEEK_END) - 2000, 0))
                tail = [line for line in log.read().decode("utf-8", "replace").splitlines() if line.strip()]
                why = f"killed by {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"
                if status == -signal.SIGKILL:
                    why += " (out of memory?)"
                stopped = f"the notebook's process ended during cell {current} ({why})" + (
                    f": {tail[-1][:300]}" if tail else ""
                )
        finally:
            os.close(read)
            _stop(proc)
            with _ACTIVE_LOCK:
                _ACTIVE.discard(proc)
    return done, current, stopped


def check(
    notebook: str | os.PathLike,
    exercises_only: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    release: str | os.PathLike | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
    threads: int | None = None,
) -> tuple[list[Result], list[str]]:
    """Execute a submitted notebook and grade it against its release: (one Result per exercise, other problems).

    The exercises, their points and their grader cells come from ``release`` (default: the book's chapter of the
    same name), never from the submission: an edited grader cell is restored, a deleted one fails its exercise,
    an added one does not count. The notebook runs in its own process and temporary folder, with a minimal
    environment, ``timeout`` seconds per cell, ``memory_mb`` of address space and capped output.
    """
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    path = Path(notebook)
    nb = _read(path)
    release_path = Path(release) if release else _release_for(path, nb)
    released = _read(release_path)
    graders = {
        _nbgrader(c)["grade_id"]: (i, c) for i, c in enumerate(released["cells"]) if _is_grader(c) and _nbgrader(c)
    }
    if not graders:
        raise ValueError(f"{release_path} has no grader cells (code cells with nbgrader metadata 'grade': true)")
    ids = {c.get("id"): gid for gid, (_, c) in graders.items() if c.get("id")}
    solution_ids = {_nbgrader(c).get("grade_id") for c in released["cells"] if _is_solution(c)} - {None}
    cells = nb["cells"]
    first = 0
    if exercises_only:
        starts = [
            i
            for i, c in enumerate(cells)
            if c["cell_type"] == "markdown" and _source(c).lstrip().startswith("## Exercises")
        ]
        if not starts:
            raise ValueError(f"{path} has no markdown cell starting with '## Exercises'; run without --exercises-only")
        first = starts[0]
    plan, notes, placed, kinds = [], [], {}, {}
    for i, cell in enumerate(cells[first:], start=first):
        if cell["cell_type"] != "code":
            continue
        meta = _nbgrader(cell)
        gid = meta.get("grade_id") if meta.get("grade_id") in graders else ids.get(cell.get("id"))
        if gid is not None and gid not in placed:
            j, original = graders[gid]
            where = f"{release_path}, cell {j}"
            plan.append({"index": i, "kind": "grader", "checks": _checks(_source(original), where)})
            placed[gid], kinds[i] = i, "grader"
            if _source(cell) != _source(original):
                notes.append(f"cell {i}: the grader cell {gid} was edited; the released version ran")
            continue
        if meta.get("grade"):
            notes.append(f"cell {i}: not a grader cell of the release ({meta.get('grade_id')}); it does not count")
        kinds[i] = "solution" if meta.get("grade_id") in solution_ids else "code"
        plan.append({"index": i, "kind": "code", "source": _source(cell)})
    done, current, stopped = _execute(
        {
            "cells": plan,
            "timeout": timeout,
            "memory_mb": memory_mb,
            "output_limit": OUTPUT_LIMIT,
            "file_limit": FILE_LIMIT,
        },
        timeout,
        threads,
    )
    by_cell, elsewhere, pending = {}, [], []
    for item in plan:
        i = item["index"]
        if i not in done:
            by_cell[i] = f"not run: {stopped}" if i != current else stopped
            continue
        error = done[i]
        if kinds[i] == "grader":
            if pending and error is not None:  # the solution itself failed to run: that is the first thing to fix
                error = f"your solution cell raised {pending[0]}"
            by_cell[i], pending = error, []
        elif error is not None and kinds[i] == "solution":
            pending.append(error)
        elif error is not None:
            elsewhere.append(f"cell {i}: {error}")
    if stopped and current is not None and kinds.get(current) != "grader":
        elsewhere.append(f"cell {current}: {stopped}")
    results = []
    for j, cell in enumerate(released["cells"]):
        meta = _nbgrader(cell)
        name, points = str(meta.get("grade_id", f"cell {j}")).removesuffix("-check"), float(meta.get("points", 0))
        if _is_grader(cell):
            if meta["grade_id"] not in placed:
                missing = "is missing from the submission (deleted?); copy it back from the released notebook"
                if exercises_only and any(_nbgrader(c).get("grade_id") == meta["grade_id"] for c in cells):
                    missing = "is outside the Exercises section; move it back after its exercise"
                results.append(Result(name, points, False, f"the grader cell {meta['grade_id']} {missing}"))
                continue
            error = by_cell[placed[meta["grade_id"]]]
            results.append(Result(name, points, error is None, error or ""))
        elif meta.get("grade") and meta.get("solution") and cell["cell_type"] == "markdown":
            results.append(Result(name, points, False, "written answer: graded by hand", kind="manual"))
    return results, notes + elsewhere


def _score(results: list[Result]) -> tuple[float, float, float]:
    auto = [r for r in results if r.kind == "auto"]
    manual = sum(r.points for r in results if r.kind == "manual")
    return sum(r.points for r in auto if r.passed), sum(r.points for r in auto), manual


def format_results(path: str | os.PathLike, results: list[Result], elsewhere: list[str], as_json: bool = False) -> str:
    """A plain-text table (exercise, result, diagnosis), or the same as JSON for a learning platform."""
    score, total, manual = _score(results)
    if as_json:
        report = {
            "notebook": str(path),
            "score": score,
            "max_score": total,
            "manual_points": manual,
            "exercises": [asdict(r) for r in results],
            "errors_outside_exercises": elsewhere,
        }
        return json.dumps(report, indent=1, ensure_ascii=False)
    width = max([len("exercise")] + [len(r.exercise) for r in results])
    rows = [f"{'exercise':<{width}}  result  diagnosis", f"{'-' * width}  ------  ---------"]
    for r in results:
        diagnosis = r.diagnosis.replace("\n", " ")
        status = "manual" if r.kind == "manual" else "passed" if r.passed else "FAILED"
        rows.append(f"{r.exercise:<{width}}  {status:<6}  {diagnosis}".rstrip())
    auto = [r for r in results if r.kind == "auto"]
    rows.append(
        f"\n{path}: {score:g} of {total:g} points, {sum(r.passed for r in auto)} of {len(auto)} passed"
        + (f"; {manual:g} more points for written answers, graded by hand" if manual else "")
    )
    rows += [f"note, {e}" for e in elsewhere]
    return "\n".join(rows)


GRADE_COLUMNS = ["student", "notebook", "exercise", "kind", "points", "max_points", "status", "diagnosis"]


def grade(
    submissions: str | os.PathLike,
    out: str | os.PathLike,
    workers: int | None = None,
    force: bool = False,
    **options: Any,
) -> list[dict]:
    """Check every notebook under ``submissions`` (in parallel) and write one row per student and exercise to
    ``out`` (.csv or .json); ``options`` go to ``check``. A notebook that cannot be checked gets an error row."""
    folder, out = Path(submissions), Path(out)
    if out.suffix not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json, got {out}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another name, or pass --force to replace it")
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}")
    notebooks = sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    if not notebooks:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {folder}")
    workers = workers or min(2, os.cpu_count() or 1)
    options.setdefault("threads", max(1, (os.cpu_count() or 1) // workers))

    def one(path: Path) -> list[dict]:
        relative = path.relative_to(folder)
        student = relative.parts[0] if len(relative.parts) > 1 else path.stem
        row = {"student": student, "notebook": str(relative)}
        try:
            results, _ = check(path, **options)
        except (FileNotFoundError, ValueError) as err:
            return [
                {
                    **row,
                    "exercise": "",
                    "kind": "",
                    "points": 0,
                    "max_points": 0,
                    "status": "error",
                    "diagnosis": str(err),
                }
            ]
        return [
            {
                **row,
                "exercise": r.exercise,
                "kind": r.kind,
                "points": "" if r.kind == "manual" else (r.points if r.passed else 0),
                "max_points": r.points,
                "status": "manual" if r.kind == "manual" else "passed" if r.passed else "failed",
                "diagnosis": r.diagnosis,
            }
            for r in results
        ]

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        rows = [row for rows in pool.map(one, notebooks) for row in rows]
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if out.suffix == ".json":
            json.dump(rows, f, indent=1, ensure_ascii=False)
        else:
            writer = csv.DictWriter(f, GRADE_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    os.replace(tmp, out)
    return rows


def positive_seconds(text: str) -> float:
    """argparse type: a timeout in seconds, more than 0 (there is no 'no timeout')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"more than 0 seconds and finite (there is no 'no timeout'), got {text}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, got {text!r}")
    return int(text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``exercises`` command (release, solutions, check, grade, export) to the command line's subparsers."""
    parser = sub.add_parser("exercises", help="coursework: write student notebooks, grade one or a class")
    action = parser.add_subparsers(dest="action", required=True)
    for name, text in (
        ("release", "write student copies (solutions stubbed, answers removed, no outputs)"),
        ("solutions", "write the worked solutions, to publish after the deadline"),
    ):
        p = action.add_parser(name, help=text)
        p.add_argument("out_dir", help="folder for the notebooks")
        p.add_argument("notebooks", nargs="*", help="notebooks (default: every chapter)")
        p.add_argument("--force", action="store_true", help="replace files that exist in out_dir (never by default)")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--exercises-only", action="store_true", help="execute only the Exercises section (it is self-contained)"
        )
        p.add_argument(
            "--timeout",
            type=positive_seconds,
            default=DEFAULT_TIMEOUT,
            help=f"seconds allowed per cell (default {DEFAULT_TIMEOUT}; must be more than 0)",
        )
        p.add_argument(
            "--memory",
            type=_positive_int,
            default=DEFAULT_MEMORY_MB,
            help=f"MB of address space (default {DEFAULT_MEMORY_MB})",
        )
        p.add_argument(
            "--release", default=None, help="the released notebook (default: the book's chapter of that name)"
        )

    chk = action.add_parser("check", help="execute a notebook and report every exercise: passed or the diagnosis")
    chk.add_argument("notebook")
    chk.add_argument("--json", action="store_true", help="print the report as JSON (for a learning platform)")
    common(chk)
    grd = action.add_parser("grade", help="check every notebook in a folder; one row per student and exercise")
    grd.add_argument("submissions", help="folder of submitted notebooks (student/NAME.ipynb or STUDENT.ipynb)")
    grd.add_argument("--out", required=True, help="grades file, .csv or .json")
    grd.add_argument(
        "--workers", type=_positive_int, default=None, help="notebooks checked at once (default min(2, CPUs))"
    )
    grd.add_argument("--force", action="store_true", help="replace the grades file if it exists")
    common(grd)
    exp = action.add_parser(
        "export", help="coursework for another grading tool (only nbgrader's own layout is supported)"
    )
    exp.add_argument("--format", required=True, choices=["otter"], help="otter: refused, see README")


OTTER_REFUSAL = (
    "otter is not supported: otter assign recognises '# BEGIN SOLUTION' and its own test cells, not nbgrader's "
    "'### BEGIN SOLUTION' and grader cells, so it would release these notebooks with every solution in them. "
    "Use nbgrader (book/nbgrader_config.py) or 'python -m companion exercises release'."
)


def main(args: argparse.Namespace) -> int:
    """Run an ``exercises`` action; exit status 1 when an exercise failed, 2 on a bad argument, 130/143 on a signal."""
    received = []

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        return _main(args)
    except KeyboardInterrupt:
        stop_all()
        name = signal.Signals(received[0]).name if received else "SIGINT"
        what = getattr(args, "notebook", None) or getattr(args, "submissions", "")
        print(
            f"interrupted by {name}: the check of {what} stopped and its process was ended; no grade", file=sys.stderr
        )
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    options = {}
    if args.action in ("check", "grade"):
        options = dict(
            exercises_only=args.exercises_only, timeout=args.timeout, release=args.release, memory_mb=args.memory
        )
    try:
        if args.action == "export":
            raise ValueError(OTTER_REFUSAL)
        if args.action in ("release", "solutions"):
            write = release if args.action == "release" else solutions
            for path in write(args.out_dir, args.notebooks, force=args.force):
                print(f"wrote {path}")
            return 0
        if args.action == "grade":
            rows = grade(args.submissions, args.out, workers=args.workers, force=args.force, **options)
            students = sorted({r["student"] for r in rows})
            errors = sum(r["status"] == "error" for r in rows)
            print(
                f"wrote {args.out}: {len(rows)} rows for {len(students)} students"
                + (f", {errors} notebooks could not be checked" if errors else "")
            )
            return 0
        results, elsewhere = check(args.notebook, **options)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_results(args.notebook, results, elsewhere, as_json=args.json))
    return 0 if all(r.passed for r in results if r.kind == "auto") else 1
