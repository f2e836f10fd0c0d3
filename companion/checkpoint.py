"""Checkpoints of a ``fit`` run: everything needed to continue it as if it had never stopped.

A checkpoint holds the model, the optimiser and schedule, the callbacks' state (e.g. an EMA), the history so far,
the epoch and step reached, the running sums of that epoch, the training data's random state at the start of that
epoch and PyTorch's random number generators. ``fit(..., resume_from=path)`` loads it, replays the data of the
epoch up to the step reached (without training on it) and goes on: on the CPU, with the same seed and thread
count, a resumed run ends with the same figures as one that was never interrupted.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from companion import distributed
from companion.callbacks import Callback
from companion.files import atomic_write

if TYPE_CHECKING:
    from companion.train import FitState

__all__ = ["Checkpoint", "ResumeError", "restore", "save_checkpoint"]

FORMAT = "companion-checkpoint-1"


class ResumeError(ValueError):
    """A checkpoint cannot continue this run (missing, damaged, or made with other settings or another model)."""


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _state(state: FitState) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(state.config).items() if k != "progress"}
    return {
        "format": FORMAT,
        "config": settings,
        "epoch": state.epoch,
        "step": state.step,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "callbacks": [cb.state_dict() for cb in state.callbacks],
        "history": asdict(state.history),
        "sums": None if state.sums is None else [t.cpu() for t in state.sums],
        "epoch_seconds": state.epoch_seconds,
        "loader": state.loader_state,
        "rng": _rng_state(),
    }


def save_checkpoint(state: FitState, path: str | os.PathLike) -> Path:
    """Write the run's checkpoint to ``path`` atomically (a reader never sees half a file); only rank 0 writes."""
    path = Path(path)
    if distributed.is_main():
        atomic_write(path, lambda f: torch.save(_state(state), f))
    return path


def restore(state: FitState, path: str | os.PathLike) -> None:
    """Load the checkpoint at ``path`` into a freshly set-up ``state`` (same model, data and settings)."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"cannot resume: no checkpoint at {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ResumeError(f"cannot resume from {path}: not a readable checkpoint ({err})") from err
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ResumeError(f"cannot resume from {path}: not a checkpoint written by companion's fit")
    now = {k: v for k, v in asdict(state.config).items() if k != "progress"}
    changed = {k: (saved["config"].get(k), v) for k, v in now.items() if saved["config"].get(k) != v}
    if changed:
        diff = ", ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in changed.items())
        raise ResumeError(f"cannot resume from {path}: it was made with other settings ({diff}); use the same ones")
    if len(saved["callbacks"]) != len(state.callbacks):
        raise ResumeError(
            f"cannot resume from {path}: it was made with {len(saved['callbacks'])} callbacks, this run has "
            f"{len(state.callbacks)}; pass the same callbacks"
        )
    try:
        state.model.load_state_dict(saved["model"])
    except RuntimeError as err:
        raise ResumeError(f"cannot resume from {path}: its weights do not fit this model ({err})") from err
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    for cb, cb_state in zip(state.callbacks, saved["callbacks"]):
        cb.load_state_dict(cb_state)
    device = state.history.device
    history = {f.name: saved["history"][f.name] for f in fields(state.history)}
    state.history.__dict__.update(history | {"device": device})
    state.epoch, state.step, state.epoch_seconds = saved["epoch"], saved["step"], saved["epoch_seconds"]
    state.sums = None if saved["sums"] is None else [t.to(device) for t in saved["sums"]]
    state.loader_state = saved["loader"]
    if saved["loader"] is not None and hasattr(state.train_data, "load_state_dict"):
        state.train_data.load_state_dict(saved["loader"])  # the data of this epoch comes again, in the same order
    if distributed.is_main():
        print(f"resumed from {path}: epoch {state.epoch + 1} of {state.config.epochs}, after step {state.step}")
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])


class Checkpoint(Callback):
    """Write a checkpoint to ``path`` after every ``every`` epochs, and when a signal stops the run.

    ``fit(..., callbacks=[Checkpoint("run.ckpt")])``; continue with ``fit(..., resume_from="run.ckpt")`` and the same
    model, data, settings and callbacks. The file is replaced each time (it is this run's own).
    """

    def __init__(self, path: str | os.PathLike, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a whole number of epochs >= 1, got {every!r}")
        self.path, self.every = Path(path), every
        if not self.path.parent.is_dir():
            raise FileNotFoundError(
                f"cannot write checkpoints to {self.path}: the folder {self.path.parent} is missing"
            )

    def on_epoch_end(self, state: FitState) -> None:
        """Save after every ``every``-th epoch and after the last."""
        if state.epoch % self.every == 0 or state.epoch == state.config.epochs:
            save_checkpoint(state, self.path)

    def on_stop(self, state: FitState) -> None:
        """Save where the signal stopped the run."""
        save_checkpoint(state, self.path)
