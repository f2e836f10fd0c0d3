"""The chapters work in nbgrader as they are: metadata valid against nbgrader's schema, and a real course run.

The course test runs nbgrader's own command line on a temporary course folder with the book's example
``book/nbgrader_config.py``: ``generate_assignment`` for Chapters 1 and 2, then ``autograde`` of the book's
notebooks (every automatic point) and of a wrong Chapter 2 submission whose grader cell was also replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import nbformat
import pytest

nbgrader = pytest.importorskip("nbgrader", reason="nbgrader is in requirements.txt; install it to run this test")
from nbgrader.nbgraderformat import MetadataValidator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
SCHEMA = json.loads((Path(nbgrader.__file__).parent / "nbgraderformat" / "v3.json").read_text())


def _src(cell: dict) -> str:
    return "".join(cell["source"])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_exercise_cell_matches_nbgraders_schema(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "nbgrader" in c["metadata"]]
    assert len(cells) >= 5, path.name
    for cell in cells:
        jsonschema.validate(cell["metadata"]["nbgrader"], SCHEMA)  # the grade_id pattern, types, required keys
    MetadataValidator().validate_nb(nbformat.read(path, as_version=4))  # nbgrader's own checks: ids, points


def test_a_dotted_grade_id_is_what_nbgrader_refuses():
    """The schema check above can fail: the ids the chapters had before (ex2.1-...) do not match the pattern."""
    meta = {"grade": True, "grade_id": "ex2.1-softmax-axis", "locked": False, "points": 1, "schema_version": 3}
    with pytest.raises(jsonschema.ValidationError, match="does not match"):
        jsonschema.validate({**meta, "solution": True}, SCHEMA)


def _solution_lines(nb: dict) -> list[str]:
    """Every substantial line of the book's solutions and worked answers."""
    lines = []
    for cell in nb["cells"]:
        meta = cell["metadata"].get("nbgrader", {})
        if not meta.get("solution"):
            continue
        if cell["cell_type"] == "markdown":
            lines += [line.strip() for line in _src(cell).split(":class: dropdown", 1)[1].splitlines()]
            continue
        inside = False
        for line in _src(cell).splitlines():
            if line.strip() in ("### BEGIN SOLUTION", "### END SOLUTION"):
                inside = line.strip() == "### BEGIN SOLUTION"
            elif inside:
                lines.append(line.strip())
    return [line for line in lines if len(line) > 15]


def _nbgrader(course: Path, *args: str) -> None:
    env = {**os.environ, "COMPANION_QUICK": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "nbgrader", *args], cwd=course, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_nbgrader_generates_and_autogrades_chapters_1_and_2(tmp_path):
    from nbgrader.api import Gradebook

    course = tmp_path / "course"
    shutil.copy(ROOT / "book" / "nbgrader_config.py", course.mkdir() or course / "nbgrader_config.py")
    ch1, ch2 = (next(p for p in CHAPTERS if p.name.startswith(n)) for n in ("01_", "02_"))
    for assignment, path in (("ch01", ch1), ("ch02", ch2)):
        (course / "source" / assignment).mkdir(parents=True)
        shutil.copy(path, course / "source" / assignment)
        _nbgrader(course, "generate_assignment", assignment)
        released = json.loads((course / "release" / assignment / path.name).read_text(encoding="utf-8"))
        text = "\n".join(_src(c) for c in released["cells"])
        lines = _solution_lines(json.loads(path.read_text(encoding="utf-8")))
        assert len(lines) > 20 and not [line for line in lines if line in text], "solution text in the release"
        assert text.count("raise NotImplementedError()") >= 2 and text.count("YOUR ANSWER HERE") >= 4

    def submit(student: str, assignment: str, path: Path, nb: dict) -> None:
        (course / "submitted" / student / assignment).mkdir(parents=True)
        (course / "submitted" / student / assignment / path.name).write_text(json.dumps(nb), encoding="utf-8")

    for assignment, path in (("ch01", ch1), ("ch02", ch2)):  # the book's notebooks: every automatic point
        submit("solution", assignment, path, json.loads(path.read_text(encoding="utf-8")))
    wrong = json.loads(ch2.read_text(encoding="utf-8"))
    for cell in wrong["cells"]:
        if "def my_alibi_attention(" in _src(cell):  # softmax over the queries: the classic mistake
            cell["source"] = (
                "def my_alibi_attention(q, k, v, slopes, attn_mask=None):\n"
                "    i, j = torch.arange(q.shape[-2]), torch.arange(k.shape[-2])\n"
                "    bias = -slopes[:, None, None] * (i[:, None] - j).abs()\n"
                "    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias, dim=-2) @ v\n"
            )
        elif _src(cell).startswith("grading.check_split_heads"):  # an edited grader: nbgrader restores it
            cell["source"] = "pass"
    submit("wrong", "ch02", ch2, wrong)
    _nbgrader(course, "autograde", "ch01")
    _nbgrader(course, "autograde", "ch02")

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        scores = {}
        for assignment, student in (("ch01", "solution"), ("ch02", "solution"), ("ch02", "wrong")):
            (notebook,) = gradebook.find_submission(assignment, student).notebooks
            scores[assignment, student] = (notebook.code_score, notebook.max_code_score, notebook.max_written_score)
    assert scores["ch01", "solution"] == (3, 3, 4)  # the written answers wait for manual grading
    assert scores["ch02", "solution"] == (3, 3, 4)
    assert scores["ch02", "wrong"] == (2, 3, 4)  # attention wrong; the restored heads grader passes
    graded = json.loads((course / "autograded" / "wrong" / "ch02" / ch2.name).read_text(encoding="utf-8"))
    errors = [o.get("evalue", "") for c in graded["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    assert any("softmax over the wrong axis" in e for e in errors), errors
    assert any(_src(c).startswith("grading.check_split_heads") for c in graded["cells"]), "grader not restored"
