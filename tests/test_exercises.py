"""The chapters' exercises, the student release and the checker (companion.exercises and its command line)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from companion import grading
from companion.__main__ import main
from companion.exercises import BEGIN, END, check, release, release_notebook

CHAPTERS = sorted((Path(__file__).resolve().parents[1] / "chapters").glob("*.ipynb"))


def _nb(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _src(cell: dict) -> str:
    return "".join(cell["source"])


def _section(nb: dict) -> list[dict]:
    """The cells from the '## Exercises' heading on."""
    start = next(i for i, c in enumerate(nb["cells"]) if _src(c).startswith("## Exercises"))
    return nb["cells"][start:]


def _solution_lines(cell: dict) -> list[str]:
    """The non-trivial lines between the solution markers of a code cell."""
    inside, found = False, []
    for line in _src(cell).splitlines():
        if line.strip() in (BEGIN, END):
            inside = line.strip() == BEGIN
        elif inside and len(line.strip()) > 12:
            found.append(line.strip())
    return found


def test_chapters_end_with_summary_and_exercises():
    coding_total, used = 0, set()
    for path in CHAPTERS:
        nb = _nb(path)
        headings = [_src(c).split("\n")[0] for c in nb["cells"] if c["cell_type"] == "markdown"]
        assert "## Summary" in headings and "## Exercises" in headings, path.name
        assert headings.index("## Summary") + 1 == headings.index("## Exercises"), f"{path.name}: Summary first"
        cells = _section(nb)
        exercises = [c for c in cells if _src(c).startswith("### Exercise ")]
        solutions = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and BEGIN in _src(c)]
        answers = [
            c for c in cells if c["cell_type"] == "markdown" and c["metadata"].get("nbgrader", {}).get("solution")
        ]
        assert 5 <= len(exercises) <= 8, f"{path.name}: {len(exercises)} exercises"
        assert len(solutions) >= 2, f"{path.name}: {len(solutions)} coding exercises"
        assert len(solutions) + len(answers) == len(exercises), f"{path.name}: every exercise has a solution or answer"
        coding_total += len(solutions)
        for i in solutions:
            solution, grader = cells[i], cells[i + 1]
            assert solution["metadata"]["nbgrader"]["solution"] and "hide-input" in solution["metadata"]["tags"]
            assert grader["metadata"]["nbgrader"]["grade"] and grader["metadata"]["nbgrader"]["points"] > 0
            calls = re.findall(r"grading\.(check_\w+)\(", _src(grader))
            assert calls, f"{path.name}: the cell after a solution must call a grader"
            used.update(calls)
        for answer in answers:
            assert ":class: dropdown" in _src(answer), f"{path.name}: answers are collapsed in the book"
        ids = [c["metadata"]["nbgrader"]["grade_id"] for c in cells if "nbgrader" in c["metadata"]]
        assert len(ids) == len(set(ids)), f"{path.name}: nbgrader grade_ids must be unique"
    assert coding_total >= 14
    assert used == set(grading.__all__), f"checks no exercise uses: {set(grading.__all__) - used}"


def test_release_removes_solutions_and_keeps_the_rest(tmp_path):
    main(["exercises", "release", str(tmp_path)])
    for path in CHAPTERS:
        book, student = _nb(path), _nb(tmp_path / path.name)
        assert [c["id"] for c in student["cells"]] == [c["id"] for c in book["cells"]]
        released_text = "\n".join(_src(c) for c in _section(student))
        checked = 0
        for mine, theirs in zip(book["cells"], student["cells"]):
            if theirs["cell_type"] == "code":
                assert theirs["outputs"] == [] and theirs["execution_count"] is None
            nbgrader = mine["metadata"].get("nbgrader", {})
            if nbgrader.get("solution") and mine["cell_type"] == "code":
                assert BEGIN not in _src(theirs) and "raise NotImplementedError()" in _src(theirs)
                for line in _solution_lines(mine):
                    assert line not in released_text, f"{path.name}: solution text {line!r} left in the release"
                    checked += 1
            elif nbgrader.get("solution"):
                assert _src(theirs) == "YOUR ANSWER HERE"
                body = _src(mine).split(":class: dropdown", 1)[1].splitlines()
                for line in (line.strip() for line in body if len(line.strip()) > 12):
                    assert line not in released_text, f"{path.name}: answer text {line!r} left in the release"
                    checked += 1
            else:
                assert theirs["source"] == mine["source"] and theirs["metadata"] == mine["metadata"]
        assert checked > 20, f"{path.name}: only {checked} lines of solutions and answers found"


def test_release_notebook_stubs_each_region_at_its_indentation():
    cell = {
        "cell_type": "code",
        "metadata": {"nbgrader": {"solution": True}, "tags": ["hide-input"]},
        "outputs": [{"output_type": "stream", "text": "x"}],
        "execution_count": 3,
        "source": "class A:\n    def f(self):\n        ### BEGIN SOLUTION\n        return 1\n"
        "        ### END SOLUTION\n\ndef g():\n    ### BEGIN SOLUTION\n    return 2\n    ### END SOLUTION\n",
    }
    answer = {"cell_type": "markdown", "metadata": {"nbgrader": {"solution": True}}, "source": ["the answer"]}
    whole = {"cell_type": "code", "metadata": {"nbgrader": {"solution": True}}, "outputs": [], "source": ["x = 1"]}
    nb = release_notebook({"cells": [cell, answer, whole]})
    assert "".join(nb["cells"][0]["source"]) == (
        "class A:\n    def f(self):\n        # YOUR CODE HERE\n        raise NotImplementedError()\n\n"
        "def g():\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    )
    assert nb["cells"][0]["outputs"] == [] and nb["cells"][0]["execution_count"] is None
    assert "tags" not in nb["cells"][0]["metadata"]
    assert "".join(nb["cells"][1]["source"]) == "YOUR ANSWER HERE"
    assert "".join(nb["cells"][2]["source"]) == "# YOUR CODE HERE\nraise NotImplementedError()"
    assert cell["execution_count"] == 3  # the book's notebook is not modified
    unterminated = {"cell_type": "code", "metadata": {}, "outputs": [], "source": [BEGIN + "\n", "x = 1"]}
    with pytest.raises(ValueError, match="without its"):
        release_notebook({"cells": [unterminated]}, "nb.ipynb")


def test_cli_bad_arguments(tmp_path, capsys):
    assert main(["exercises", "check", str(tmp_path / "missing.ipynb")]) == 2
    assert "no notebook at" in capsys.readouterr().err
    (tmp_path / "plain.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert main(["exercises", "check", str(tmp_path / "plain.ipynb")]) == 2
    assert "cannot tell which chapter" in capsys.readouterr().err
    plain = str(tmp_path / "plain.ipynb")
    assert main(["exercises", "check", plain, "--release", plain]) == 2
    assert "no grader cells" in capsys.readouterr().err


def test_release_refuses_to_overwrite_the_book(tmp_path):
    with pytest.raises(ValueError, match="book's own notebook"):
        release(CHAPTERS[0].parent, [CHAPTERS[0]])
    with pytest.raises(FileNotFoundError, match="no notebook"):
        release(tmp_path, [tmp_path / "missing.ipynb"])


FAST = next(p for p in CHAPTERS if p.name.startswith("02_"))  # the quickest chapter in quick mode


def test_check_released_notebook_reports_every_exercise_not_done(tmp_path, capsys):
    release(tmp_path, [FAST])
    status = main(["exercises", "check", str(tmp_path / FAST.name), "--exercises-only", "--json"])
    report = json.loads(capsys.readouterr().out)
    coding = [e for e in report["exercises"] if e["kind"] == "auto"]
    assert status == 1 and report["score"] == 0 and report["max_score"] == len(coding) >= 2
    assert report["manual_points"] == len(report["exercises"]) - len(coding) >= 2  # written answers: by hand
    assert report["errors_outside_exercises"] == []
    for exercise in coding:
        assert not exercise["passed"] and "not done yet" in exercise["diagnosis"], exercise


def test_check_names_a_students_mistake(tmp_path, capsys):
    (released,) = release(tmp_path, [FAST])
    nb = _nb(released)
    cell = next(c for c in nb["cells"] if "def my_alibi_attention(" in _src(c))
    cell["source"] = _src(cell).replace(
        "    raise NotImplementedError()",
        "    bias = -slopes[:, None, None] * (torch.arange(q.shape[-2])[:, None] - torch.arange(k.shape[-2])).abs()\n"
        "    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias, dim=-2) @ v",
    )
    released.write_text(json.dumps(nb), encoding="utf-8")
    assert main(["exercises", "check", str(released), "--exercises-only"]) == 1
    table = capsys.readouterr().out
    assert re.search(r"ex2_\d-alibi\s+FAILED\s+check_alibi_attention: softmax over the wrong axis", table), table


def test_check_book_notebook_passes_every_exercise():
    results, elsewhere = check(FAST)  # the whole notebook, as a student's would run
    assert elsewhere == []
    coding = [r for r in results if r.kind == "auto"]
    assert len(coding) >= 2 and all(r.passed for r in coding), results


@pytest.mark.parametrize("path", [p for p in CHAPTERS if p != FAST], ids=lambda p: p.stem)
def test_check_every_chapters_solutions_pass_their_graders(path):
    """The book's own solutions call nothing their exercise forbids (the graders watch for it)."""
    results, elsewhere = check(path, exercises_only=True)
    assert elsewhere == [] and all(r.passed for r in results if r.kind == "auto"), results
