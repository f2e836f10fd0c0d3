"""Result records: each recipe run writes a small JSON file; the book's results page reads them all.

The folder is ``COMPANION_RECORDS`` if set, else ``_build/records/`` in the source checkout the package is
imported from (git-ignored, and wiped with the rest of ``_build`` by a clean rebuild), else (an installed
package) ``~/.cache/companion/records``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from companion.runtime import quick

__all__ = ["read_records", "record_fit", "record_name", "records_dir", "write_record"]

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
    """A file name that is the same for every run of one configuration: model, mode and a hash of the settings.

    The title's parenthesised tail (learned values such as a temperature) is left out, so a rerun replaces its
    record instead of adding one.
    """
    model = str(record.get("model", "run")).split(" (")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:60] or "run"
    settings = json.dumps([record.get("settings"), record.get("epochs"), record.get("n_train")], sort_keys=True)
    return f"{slug}-{record.get('mode', 'unknown')}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


def write_record(record: dict[str, Any], name: str) -> Path:
    """Write ``record`` (JSON-serialisable) as ``<records folder>/<name>.json``, replacing an older one."""
    if not _NAME.match(name):
        raise ValueError(f"record name {name!r} must be letters, digits, '_', '-' or '.' (it becomes a file name)")
    payload = {"name": name, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
    if os.environ.get("COMPANION_CHAPTER"):  # set by the book's build for the notebook it executes
        payload.setdefault("chapter", os.environ["COMPANION_CHAPTER"])
    text = json.dumps(payload, indent=1, sort_keys=True, allow_nan=False)  # fails here, not when read back
    folder = records_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as tmp:
        tmp.write(text + "\n")
    path = folder / f"{name}.json"
    os.replace(tmp.name, path)  # atomic: a reader never sees half a record
    return path


def read_records() -> list[dict[str, Any]]:
    """Return every record in the records folder, sorted by name (an empty list if there is none yet)."""
    folder = records_dir()
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            records.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            msg = f"result record {path} is not valid JSON ({err}): delete it and rerun its chapter"
            raise ValueError(msg) from err
    return records


def record_fit(model: str, history: Any, n_train: int, settings: dict[str, Any], test_acc: float | None = None) -> Path:
    """Write the record of a chapter's own ``fit`` run (one without a recipe) for the Results page.

    ``history`` is what ``fit`` returned; ``test_acc`` defaults to its last test accuracy (give it when the model was
    evaluated after ``fit`` instead). The record has the fields of a recipe's record, with no TTA accuracy.
    """
    if test_acc is None:
        if not history.test_acc:
            raise ValueError("this fit run has no test accuracy: pass test_acc=, the accuracy of the trained model")
        test_acc = history.test_acc[-1]
    record = {
        "model": model,
        "recipe": "fit",
        "mode": "quick" if quick() else "full",
        "settings": settings,
        "test_acc": float(test_acc),
        "test_acc_tta": None,
        "train_seconds": history.total_seconds,
        "epochs": len(history.seconds),
        "n_train": n_train,
        "device": history.device,
        "threads": torch.get_num_threads(),
        "processes": 1,
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return write_record(record, record_name(record))
