"""The process in which ``exercises check`` runs one submission (started by companion.exercises, not by hand).

It reads its plan (cells to execute, graders to call, limits) as JSON on stdin and reports on the file
descriptor named on its command line, one JSON line per event: ``{"cell": i, "event": "start"}`` and
``{"cell": i, "event": "done", "error": null or "message"}``. Before any of the student's code runs it loads
its own copy of ``companion.grading`` from the installed package, so that a notebook that reassigns
``grading.check_*`` (or anything else in that module) does not change the graders that run. It sets its own
limits on memory and file size, stops each cell after the plan's timeout and keeps at most the plan's
``output_limit`` characters of what the cells print. This is not a sandbox: the student's code runs with the
grader's user rights; see the instructors' guide.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import signal
import sys
from typing import Any


class CellTimeout(BaseException):
    """Raised in the student's code when a cell runs past its time (a BaseException: ``except Exception`` misses it)."""


class _Sink:
    """A stand-in for stdout and stderr that keeps the first ``limit`` characters and counts the rest."""

    encoding = "utf-8"

    def __init__(self, limit: int) -> None:
        self.limit, self.kept, self.dropped = limit, [], 0

    def write(self, text: str) -> int:
        room = self.limit - sum(map(len, self.kept))
        self.kept.append(text[: max(room, 0)])
        self.dropped += max(len(text) - max(room, 0), 0)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _private_grading() -> Any:
    """A copy of companion.grading that is not in sys.modules: reassigning its attributes from a notebook fails."""
    spec = importlib.util.find_spec("companion.grading")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_grading", spec.origin))
    module.__spec__.loader.exec_module(module)
    return module


def _on_alarm(signum: int, frame: Any) -> None:
    raise CellTimeout()


def _message(err: BaseException, limit: int = 2000) -> str:
    """The diagnosis of an error, without a traceback: the grader's message, or 'Name: message' (shortened)."""
    if isinstance(err, AssertionError) and str(err):
        text = str(err)
    elif isinstance(err, SyntaxError):
        text = f"SyntaxError: {err.msg} (line {err.lineno})"
    else:
        text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[:limit] + " [...]"


def main() -> None:
    """Run the plan read from stdin; report on the descriptor given as the first argument."""
    report = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    plan = json.load(sys.stdin)
    memory = plan["memory_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (plan["file_limit"], plan["file_limit"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file over the limit is an error in the cell, not a kill
    grading = _private_grading()
    sys.stdin = open(os.devnull)
    signal.signal(signal.SIGALRM, _on_alarm)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for cell in plan["cells"]:
        report.write(json.dumps({"cell": cell["index"], "event": "start"}) + "\n")
        sys.stdout = sys.stderr = _Sink(plan["output_limit"])
        error = None
        try:
            signal.setitimer(signal.ITIMER_REAL, plan["timeout"])
            try:
                if cell["kind"] == "code":
                    exec(compile(cell["source"], f"<cell {cell['index']}>", "exec"), namespace)
                for check, name in cell.get("checks", []):
                    if name not in namespace:
                        raise NameError(f"{name} is not defined: run (or restore) the cell that defines it")
                    getattr(grading, check)(namespace[name])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except CellTimeout:
            error = f"timed out: the cell ran for more than {plan['timeout']:g} s (an endless loop?); it was stopped"
        except BaseException as err:  # noqa: BLE001 (the student's error, whatever it is, goes into the report)
            error = _message(err)
        report.write(json.dumps({"cell": cell["index"], "event": "done", "error": error}) + "\n")
    report.close()


if __name__ == "__main__":
    main()
