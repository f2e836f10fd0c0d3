"""Result records: each recipe run writes a small JSON file; the book's results page reads them all.

The folder is ``COMPANION_RECORDS`` if set, else ``_build/records/`` in the source checkout the package is
imported from (git-ignored, and wiped with the rest of ``_build`` by a clean rebuild), else (an installed
package) ``~/.cache/companion/records``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from companion.files import atomic_write
from companion.runtime import quick

__all__ = ["make_record", "read_records", "record_fit", "record_name", "records_dir", "write_record"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def records_dir() -> Path:
    """Return the records folder: ``$COMPANION_RECORDS``, ``<checkout>/_build/records`` or the user's cache."""
    if os.environ.get("COMPANION_RECORDS"):
        return Path(os.environ["COMPANION_RECORDS"]).expanduser()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return checkout / "_build" / "records"
    return Path.home() / ".cache" / "companion" / "records"


def record_name(record: dict[str, Any]) -> str:
    """A file name that is the same for every run of one configuration and seed: model, mode, seed, settings hash.

    Runs with other seeds or settings get names of their own; a rerun of the same one replaces its record. The
    title's parenthesised tail (learned values such as a temperature) is left out of the name.
    """
    model = str(record.get("model", "run")).split(" (")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:60] or "run"
    key = [record.get("settings"), record.get("epochs"), record.get("n_train"), record.get("seed")]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    seed = f"-seed{record['seed']}" if record.get("seed") is not None else ""
    return f"{slug}-{record.get('mode', 'unknown')}{seed}-{digest}"


def write_record(record: dict[str, Any], name: str) -> Path:
    """Write ``record`` (JSON-serialisable) as ``<records folder>/<name>.json``, replacing an older one of that name."""
    if not _NAME.match(name):
        raise ValueError(f"record name {name!r} must be letters, digits, '_', '-' or '.' (it becomes a file name)")
    payload = {"name": name, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
    if os.environ.get("COMPANION_CHAPTER"):  # set by the book's build for the notebook it executes
        payload.setdefault("chapter", os.environ["COMPANION_CHAPTER"])
    try:
        text = json.dumps(payload, indent=1, sort_keys=True, allow_nan=False)  # fails here, not when read back
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"record {name!r} holds a value JSON cannot store ({err}): use plain numbers and text"
        ) from err
    folder = records_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # atomic (a reader never sees half a record), with the mode the umask gives (a class can share the folder)
    return atomic_write(folder / f"{name}.json", lambda f: f.write((text + "\n").encode()))


def read_records() -> list[dict[str, Any]]:
    """Return every record in the records folder, sorted by name (an empty list if there is none yet).

    A file that is not a JSON object, or has no finite ``test_acc``, is skipped with a warning that names it.
    """
    folder = records_dir()
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            warnings.warn(
                f"skipped result record {path}: not readable JSON ({err}); delete it and rerun its chapter",
                stacklevel=2,
            )
            continue
        acc = record.get("test_acc") if isinstance(record, dict) else None
        if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not math.isfinite(acc):
            warnings.warn(
                f"skipped result record {path}: it holds no test accuracy; delete it and rerun its chapter",
                stacklevel=2,
            )
            continue
        records.append(record)
    return records


def make_record(
    model: str,
    recipe: str,
    quick: bool,
    settings: dict[str, Any],
    history: Any,
    n_train: int,
    test_acc: float,
    test_acc_tta: float | None = None,
    seed: int | None = None,
    processes: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    """The one schema of a result record: what ran, in which mode, with which settings and seed, figures, hardware."""
    return {
        "model": model,
        "recipe": recipe,
        "mode": "quick" if quick else "full",
        "settings": settings,
        "seed": seed,
        "test_acc": float(test_acc),
        "test_acc_tta": None if test_acc_tta is None else float(test_acc_tta),
        "train_seconds": history.total_seconds,
        "epochs": len(history.seconds),
        "n_train": n_train,
        "device": history.device,
        "precision": history.precision or None,
        "threads": torch.get_num_threads(),
        "processes": processes,
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def record_fit(
    model: str,
    history: Any,
    n_train: int,
    settings: dict[str, Any],
    test_acc: float | None = None,
    seed: int | None = None,
) -> Path:
    """Write the record of a chapter's own ``fit`` run (one without a recipe) for the Results page.

    ``history`` is what ``fit`` returned; ``test_acc`` defaults to its last test accuracy (give it when the model was
    evaluated after ``fit`` instead). The record has the fields of a recipe's record, with no TTA accuracy.
    """
    if test_acc is None:
        if not history.test_acc:
            raise ValueError("this fit run has no test accuracy: pass test_acc=, the accuracy of the trained model")
        test_acc = history.test_acc[-1]
    record = make_record(model, "fit", quick(), settings, history, n_train, test_acc, seed=seed)
    return write_record(record, record_name(record))
