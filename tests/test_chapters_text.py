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
