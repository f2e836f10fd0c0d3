"""The chapters' prose: every reference to an exercise or a project names one that exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

CHAPTERS = sorted((Path(__file__).resolve().parents[1] / "chapters").glob("0*.ipynb"))
EXERCISE_HEADING = re.compile(r"^### Exercise (\d+\.\d+)\b", re.MULTILINE)
PROJECT_ITEM = re.compile(r"^(\d+)\. ", re.MULTILINE)
SPACE = r"(?:[ \t]+\n?|\n)[ \t]*"  # spaces, or one line break: a sentence may wrap, a heading is not a reference
EXERCISE_REF = re.compile(rf"\bExercises?{SPACE}(\d+(?:\.\d+)?)\b")
PROJECT_REF = re.compile(rf"\bProjects?{SPACE}(\d+)\b")
ORDINAL_REF = re.compile(
    rf"\bthe{SPACE}(?:first|second|third|fourth|fifth|sixth|last){SPACE}(?:exercise|project)\b", re.IGNORECASE
)


def cells(path: Path) -> list[tuple[str, str]]:
    """(cell type, source) of every cell of a notebook."""
    return [(c["cell_type"], "".join(c["source"])) for c in json.loads(path.read_text())["cells"]]


def exercises_and_projects(path: Path) -> tuple[set[str], int]:
    """The exercise numbers ("4.1", ...) a chapter defines, and how many projects its Projects list has."""
    markdown = [src for kind, src in cells(path) if kind == "markdown"]
    exercises = {m for src in markdown for m in EXERCISE_HEADING.findall(src)}
    projects = 0
    for src in markdown:
        if src.startswith("### Projects"):
            projects = max(int(n) for n in PROJECT_ITEM.findall(src))
    return exercises, projects


def references(path: Path) -> list[tuple[str, str]]:
    """("exercise" | "project" | "ordinal", the number or phrase) for every reference in a chapter's text."""
    found = []
    for _, src in cells(path):
        text = EXERCISE_HEADING.sub("", src)  # a heading defines an exercise; it does not refer to one
        found += [("exercise", n) for n in EXERCISE_REF.findall(text)]
        found += [("project", n) for n in PROJECT_REF.findall(text)]
        found += [("ordinal", phrase) for phrase in ORDINAL_REF.findall(text)]
    return found


def test_the_chapters_are_found() -> None:
    assert len(CHAPTERS) == 6


def test_every_chapter_defines_exercises_and_projects() -> None:
    for number, path in enumerate(CHAPTERS, start=1):
        exercises, projects = exercises_and_projects(path)
        assert exercises and all(e.startswith(f"{number}.") for e in exercises), path.name
        assert projects >= 1, path.name


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_exercise_and_project_reference_exists(path: Path) -> None:
    all_exercises = set().union(*(exercises_and_projects(p)[0] for p in CHAPTERS))
    _, projects = exercises_and_projects(path)
    for kind, ref in references(path):
        if kind == "exercise":
            assert ref in all_exercises, f"{path.name} refers to Exercise {ref}, which no chapter has (N.M)"
        elif kind == "project":
            assert 1 <= int(ref) <= projects, f"{path.name} refers to Project {ref}; it has Projects 1 to {projects}"
        else:
            raise AssertionError(f"{path.name} says {ref!r}: name the exercise or project by its number")


def test_the_check_catches_a_wrong_reference(tmp_path: Path) -> None:
    notebook = {
        "cells": [
            {"cell_type": "markdown", "source": ["see Exercise 5 and Project 7; the first exercise asks"]},
            {"cell_type": "markdown", "source": ["### Exercise 1.1: x\n"]},
            {"cell_type": "markdown", "source": ["### Projects\n\n1. one\n2. two\n"]},
        ]
    }
    path = tmp_path / "01_x.ipynb"
    path.write_text(json.dumps(notebook))
    assert references(path) == [("exercise", "5"), ("project", "7"), ("ordinal", "the first exercise")]
    assert exercises_and_projects(path) == ({"1.1"}, 2)


def test_every_figure_cell_has_alt_text() -> None:
    """A cell that shows a figure says what it shows (myst-nb's image alt), or the book gets a file path as alt text."""
    missing = []
    for path in sorted(Path(__file__).resolve().parents[1].glob("chapters/*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            drawn = ("plt.show()", "show_images(", "plt.subplots(", "plt.figure(", "_diagram(")
            shows = cell["cell_type"] == "code" and any(d in source for d in drawn)
            alt = cell.get("metadata", {}).get("mystnb", {}).get("image", {}).get("alt", "")
            if shows and len(alt) < 20:
                missing.append(f"{path.name} cell {cell.get('id')}")
    assert not missing, f"figure cells without alt text: {missing}"


GRADER_CALL = re.compile(r"\bgrading\.(check_\w+)\(")
CODE_SPAN = re.compile(r"`([^`]+)`")


def forbidden_but_unnamed(path: Path) -> list[str]:
    """The calls each coding exercise's grader forbids that the exercise's text does not name (in backticks)."""
    from companion.grading import _forbidden

    missing, text = [], ""
    for kind, src in cells(path):
        if kind == "markdown" and src.startswith("### Exercise"):
            text = src
        for check in GRADER_CALL.findall(src) if kind == "code" else ():
            spans = CODE_SPAN.findall(text)
            for _, name in _forbidden(check):
                token = name.split()[0]  # "F.conv2d (nn.Conv2d calls it)" -> "F.conv2d"
                names = {token}
                if token.startswith("companion."):  # the book's own, as imported at the top, or in full
                    names |= {token.rsplit(".", 1)[-1], token.removeprefix("companion.")}
                if not any(s.split("(")[0] in names for s in spans):  # `F.cross_entropy(x, y)` names F.cross_entropy
                    missing.append(f"{path.name} {check}: {name}")
    return missing


def test_every_exercise_names_what_its_grader_forbids() -> None:
    """A student who calls a function the grader refuses was told not to, in the exercise's own text."""
    missing = [m for path in CHAPTERS for m in forbidden_but_unnamed(path)]
    assert not missing, f"exercises whose text does not name a call their grader forbids: {missing}"


def test_the_forbidden_check_catches_an_unnamed_call(tmp_path: Path) -> None:
    cell = {"metadata": {}, "source": []}
    exercise = {**cell, "cell_type": "markdown", "source": ["### Exercise 9.1\n", "Do not call `F.max_pool2d`."]}
    grader = {**cell, "cell_type": "code", "source": ["grading.check_max_pool2d(my_max_pool2d)"]}
    path = tmp_path / "09_test.ipynb"
    path.write_text(json.dumps({"cells": [exercise, grader]}))
    assert forbidden_but_unnamed(path) == [
        "09_test.ipynb check_max_pool2d: F.max_pool2d_with_indices",
        "09_test.ipynb check_max_pool2d: companion.conv.max_pool2d",
    ]
