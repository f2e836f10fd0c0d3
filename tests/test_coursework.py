"""A check a student cannot fool, grading a class, and the files an instructor writes (companion.exercises).

The submissions here are small synthetic notebooks graded against a small release with three coding exercises, three
copies of Chapter 4's effective-positions exercise (``effective_a``, ``effective_b``, ``effective_c``, each graded by
check_effective_positions, which runs in milliseconds), and a written answer: each scenario is one real run of
``check`` in its own process, as in a course.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from companion.__main__ import main
from companion.exercises import BEGIN, END, check, release, solutions

ROOT = Path(__file__).resolve().parents[1]
GOOD = "    return (-torch.special.xlogy(w, w).sum(-1)).exp()\n"
WRONG = "    return -torch.special.xlogy(w, w).sum(-1)\n"  # the entropy, not its exponential


def _cell(kind: str, source: str, **nbgrader) -> dict:
    cell = {"cell_type": kind, "id": f"c{abs(hash(source)) % 10**8}", "metadata": {}, "source": source}
    if nbgrader:
        cell["metadata"]["nbgrader"] = {"schema_version": 3, "locked": False, "task": False, **nbgrader}
    if kind == "code":
        cell.update(outputs=[], execution_count=None)
    return cell


def _solution(name: str, body: str) -> dict:
    source = f"def {name}(w):\n    {BEGIN}\n{body}    {END}\n"
    return _cell("code", source, grade=False, solution=True, grade_id=f"ex-{name}")


def _grader(name: str) -> dict:
    cell = _cell("code", f"grading.check_effective_positions({name})", grade=True, solution=False, points=1)
    cell["metadata"]["nbgrader"].update(grade_id=f"ex-{name}-check", locked=True)
    return cell


def _notebook(cells: list[dict]) -> dict:
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


NAMES = ("effective_a", "effective_b", "effective_c")


def _release(tmp_path: Path) -> Path:
    cells = [_cell("markdown", "## Exercises"), _cell("code", "import torch\n\nfrom companion import grading")]
    for name in NAMES:
        cells += [_solution(name, GOOD), _grader(name)]
    cells.append(_cell("markdown", "The answer.", grade=True, solution=True, grade_id="ex-written", points=2))
    path = tmp_path / "release.ipynb"
    path.write_text(json.dumps(_notebook(cells)), encoding="utf-8")
    return path


def _submission(release_path: Path, path: Path, edit=None) -> Path:
    nb = json.loads(release_path.read_text(encoding="utf-8"))
    if edit:
        edit(nb["cells"])
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


def _by_name(results):
    return {r.exercise: r for r in results}


def test_edited_patched_deleted_and_added_graders_and_points_come_from_the_release(tmp_path):
    rel = _release(tmp_path)
    marker = tmp_path / "sleeper.pid"

    def cheat(cells):
        cells[2]["source"] = cells[2]["source"].replace(GOOD, WRONG)  # effective_a wrong ...
        cells[3]["source"] = "pass"  # ... and its grader replaced
        cells[3]["metadata"]["nbgrader"]["points"] = 1000
        cells[4]["source"] = (  # effective_b wrong, and the graders monkeypatched
            "import companion.grading\n"
            "grading.check_effective_positions = lambda fn: print('passed')\n"
            "companion.grading.check_effective_positions = grading.check_effective_positions\n"
            "def effective_b(w):\n" + WRONG
        )
        del cells[7]  # effective_c's grader deleted
        bonus = _cell("code", "print('bonus')", grade=True, solution=False, grade_id="bonus", points=5000)
        flood = _cell("code", "print('x' * 50_000_000)")
        sleeper = _cell(
            "code",
            "import os, subprocess\n"
            "p = subprocess.Popen(['sleep', '300'])\n"
            f"open({str(marker)!r}, 'w').write(f'{{p.pid}}\\n{{os.getcwd()}}\\n' + ' '.join(sorted(os.environ)))",
        )
        cells += [bonus, flood, sleeper]

    sub = _submission(rel, tmp_path / "cheat.ipynb", cheat)
    os.environ["COURSEWORK_TEST_SECRET"] = "do not pass me on"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        results, notes = check(sub, release=rel)
    finally:
        del os.environ["COURSEWORK_TEST_SECRET"]
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    got = _by_name(results)
    assert list(got) == ["ex-effective_a", "ex-effective_b", "ex-effective_c", "ex-written"]
    assert [r.points for r in results] == [1, 1, 1, 2]  # the release's points, not 1000; no bonus row
    assert not got["ex-effective_a"].passed and "that is the entropy" in got["ex-effective_a"].diagnosis
    assert not got["ex-effective_b"].passed and "that is the entropy" in got["ex-effective_b"].diagnosis
    assert not got["ex-effective_c"].passed and "missing from the submission" in got["ex-effective_c"].diagnosis
    assert got["ex-written"].kind == "manual"
    assert any("was edited; the released version ran" in n for n in notes), notes
    assert any("not a grader cell of the release (bonus)" in n for n in notes), notes
    assert "Traceback" not in json.dumps([r.diagnosis for r in results])  # no grader stack frames
    assert grown_mb < 40, f"the checker grew by {grown_mb:.0f} MB for a 50 MB print"
    pid, cwd, env = marker.read_text().splitlines()
    assert not Path(cwd).exists() and Path(cwd).parent != tmp_path  # its own temporary folder, removed
    assert "COURSEWORK_TEST_SECRET" not in env.split() and "PATH" in env.split()
    assert all(
        k in {"PATH", "HOME", "TMPDIR", "LANG", "MPLBACKEND", "PYTHONDONTWRITEBYTECODE", "PYTHONPATH"}
        or k.startswith(("COMPANION_", "HF_", "TRANSFORMERS_", "OMP_", "LC_"))
        for k in env.split()
    ), env
    assert _gone(int(pid)), "a process started by the notebook outlived the check"


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_an_endless_loop_times_out_and_a_crash_is_a_report_row(tmp_path):
    rel = _release(tmp_path)

    def loop_then_crash(cells):
        cells[2]["source"] = "def effective_a(w):\n    while True:\n        pass\n"
        cells.insert(6, _cell("code", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"))  # before effective_c

    sub = _submission(rel, tmp_path / "loop.ipynb", loop_then_crash)
    start = time.monotonic()
    results, notes = check(sub, release=rel, timeout=3)
    got = _by_name(results)
    assert time.monotonic() - start < 60
    loop = got["ex-effective_a"]
    assert not loop.passed and "timed out: the cell ran for more than 3 s" in loop.diagnosis
    assert got["ex-effective_b"].passed  # the check went on after the loop
    assert not got["ex-effective_c"].passed and "killed by SIGKILL" in got["ex-effective_c"].diagnosis
    assert any("killed by SIGKILL" in n for n in notes)


def test_timeout_zero_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["exercises", "check", "x.ipynb", "--timeout", "0"])
    assert "more than 0 seconds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="positive"):
        check(_release(tmp_path), timeout=0)


@pytest.mark.parametrize(
    "content", [b"[]", b"{}", b"just some text", b"\x89PNG\r\n\x1a\n\x00\xff", b'{"cells": [1]}'], ids=str
)
def test_malformed_notebooks_get_one_line_naming_the_file(tmp_path, capsys, content):
    path = tmp_path / "broken.ipynb"
    path.write_bytes(content)
    assert main(["exercises", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "not" in err, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_check_and_its_process(tmp_path, signum):
    rel = _release(tmp_path)
    marker = tmp_path / "running.pid"
    sleep = _cell("code", f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\ntime.sleep(300)")
    sub = _submission(rel, tmp_path / "slow.ipynb", lambda cells: cells.insert(2, sleep))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "companion", "exercises", "check", str(sub), "--release", str(rel)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, (out, err)
    assert f"interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in err, err
    assert _gone(int(marker.read_text()))


def test_grade_a_class(tmp_path):
    rel = _release(tmp_path)
    folder = tmp_path / "submitted"
    folder.mkdir()
    blank = json.loads(rel.read_text(encoding="utf-8"))
    _submission(rel, folder / "right.ipynb")
    _submission(rel, folder / "wrong.ipynb", lambda cells: cells[2].update(source=_src(cells[2]).replace(GOOD, WRONG)))
    (folder / "blank").mkdir()
    released = release(folder / "blank", [rel])[0]  # a student who handed in the release untouched
    assert released.name == "release.ipynb" and blank
    (folder / "broken.ipynb").write_bytes(b"\x00\x01 not json")
    out = tmp_path / "grades.csv"
    assert main(["exercises", "grade", str(folder), "--out", str(out), "--release", str(rel)]) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    table = {(r["student"], r["exercise"]): r for r in rows}
    assert {r["student"] for r in rows} == {"right", "wrong", "blank", "broken"}
    assert [table["right", f"ex-{n}"]["status"] for n in NAMES] == ["passed"] * 3
    assert table["right", "ex-written"]["status"] == "manual" and table["right", "ex-written"]["points"] == ""
    assert (
        table["wrong", "ex-effective_a"]["status"] == "failed"
        and "that is the entropy" in table["wrong", "ex-effective_a"]["diagnosis"]
    )
    assert table["wrong", "ex-effective_b"]["points"] == "1.0"
    assert all(table["blank", f"ex-{n}"]["status"] == "failed" for n in NAMES)
    assert "not done yet" in table["blank", "ex-effective_a"]["diagnosis"]
    assert table["broken", ""]["status"] == "error" and "not a notebook" in table["broken", ""]["diagnosis"]
    assert main(["exercises", "grade", str(folder), "--out", str(out), "--release", str(rel)]) == 2  # exists


def _src(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_release_and_solutions_never_overwrite_without_force(tmp_path, capsys):
    rel = _release(tmp_path)
    out = tmp_path / "students"
    (written,) = release(out, [rel])
    written.write_text("a student's work", encoding="utf-8")
    assert main(["exercises", "release", str(out), str(rel)]) == 2
    assert "exists (a student's work?)" in capsys.readouterr().err
    assert written.read_text(encoding="utf-8") == "a student's work"
    assert main(["exercises", "release", str(out), str(rel), "--force"]) == 0
    assert "YOUR CODE HERE" in written.read_text(encoding="utf-8")
    (answers,) = solutions(tmp_path / "solutions", [rel])
    text = "\n".join(_src(c) for c in json.loads(answers.read_text(encoding="utf-8"))["cells"])
    assert GOOD in text and BEGIN not in text and END not in text
    with pytest.raises(FileExistsError):
        solutions(tmp_path / "solutions", [rel])


def test_otter_is_refused_with_the_reason(capsys):
    assert main(["exercises", "export", "--format", "otter"]) == 2
    err = capsys.readouterr().err
    assert "otter is not supported" in err and "every solution" in err
