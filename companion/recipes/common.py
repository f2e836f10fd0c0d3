"""What the training recipes share: the ``Recipe`` settings, the CIFAR-10 loaders, and ``run``, the one runner.

A recipe is settings only: its ``TrainConfig`` (how ``fit`` trains) with the data and model settings beside it.
``run`` turns any recipe into a trained model: data -> model -> ``fit`` -> evaluation -> weights -> result line
and record. ``train_cnn``, ``train_vit`` and ``train_llm`` are ``run`` with their recipe's data and model.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from companion import distributed
from companion.checkpoint import Checkpoint, save_checkpoint
from companion.data import CIFAR10_CLASSES, DeviceLoader, load_cifar10
from companion.models.common import count_parameters, save_weights
from companion.optim import EMA
from companion.records import make_record, record_name, write_record
from companion.runtime import device as best_device
from companion.runtime import seed_everything
from companion.train import Batches, History, TrainConfig, TrainingInterrupted, evaluate, fit, hold_signals

__all__ = ["Recipe", "RunResult", "cifar10_loaders", "run", "weights_path", "whitening_batch"]

R = TypeVar("R", bound="Recipe")


@dataclass(frozen=True)
class Recipe:
    """A training run's settings: its ``TrainConfig`` (``train``), data sizes and batches, and its quick mode.

    ``for_mode(quick)`` gives the recipe that runs: in quick mode the ``quick_*`` sizes take the place of
    ``n_train``, ``n_test``, ``epochs`` and ``batch_size``, so the object a caller holds and prints is what trains.
    ``replace(**changes)`` changes fields of the recipe or of its ``TrainConfig`` by name.
    """

    train: TrainConfig = TrainConfig()  # optimiser, schedule, regularisation, epochs: how fit trains
    batch_size: int = 128
    augment: bool = True  # random flips and translations (DeviceLoader)
    translate: int = 4  # with augment: each image shifted by up to this many pixels ...
    padding_mode: str = "zeros"  # ... the uncovered border filled with zeros or by reflection ("reflect")
    classes: tuple[str, ...] = CIFAR10_CLASSES  # train and test on the images of these classes only
    n_train: int | None = None  # None: all 50,000 training images (of ``classes``)
    n_test: int | None = None  # None: all 10,000 test images
    eval_batch_size: int = 1000  # test batches (no effect on the figures beyond rounding)
    quick_n_train: int = 2_000  # quick mode (COMPANION_QUICK=1 or --quick): a class-balanced subset ...
    quick_n_test: int = 1_000
    quick_epochs: int = 4  # ... a few epochs ...
    quick_batch_size: int | None = None  # ... and this batch size (None: batch_size, the same in both modes)
    quick: bool = False  # True in the recipe for_mode(True) returns: the quick sizes are in place
    # Under torchrun with N processes the batch sizes above are per process, so the global batch is N times
    # larger and the learning rate is scaled with it: 'linear' (lr * N, Goyal et al. 2017), 'sqrt' or 'none'.
    lr_scaling: str = "linear"
    # The GPU recipes' extras, all off by default (run turns each into a fit callback or an evaluation option):
    ema_decay: float | None = None  # None: no weight average; else evaluate and keep an EMA of the weights
    lookahead_every: int = 0  # with ema_decay: average every k steps and restart the weights from the average
    ema_ramp: float = 0.0  # with ema_decay: the decay grows as ema_decay * progress ** ema_ramp (0: constant)
    tta_translate: int = 0  # test-time augmentation also over copies shifted by this many pixels (0: flips only)

    def __post_init__(self) -> None:
        def whole(x: object, least: int) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= least

        problems = [
            (not isinstance(self.train, TrainConfig), "train", "a TrainConfig"),
            (not whole(self.batch_size, 1), "batch_size", "a whole number >= 1"),
            (self.n_train is not None and not whole(self.n_train, 1), "n_train", "None or a whole number >= 1"),
            (self.n_test is not None and not whole(self.n_test, 1), "n_test", "None or a whole number >= 1"),
            (not whole(self.eval_batch_size, 1), "eval_batch_size", "a whole number >= 1"),
            (self.lr_scaling not in {"linear", "sqrt", "none"}, "lr_scaling", "'linear', 'sqrt' or 'none'"),
            (
                self.ema_decay is not None and not 0 <= self.ema_decay < 1,
                "ema_decay",
                "None or a number in [0, 1)",
            ),
            (not whole(self.lookahead_every, 0), "lookahead_every", "a whole number >= 0 (0: no lookahead)"),
            (
                not (isinstance(self.ema_ramp, (int, float)) and 0 <= self.ema_ramp < math.inf),
                "ema_ramp",
                "a number >= 0",
            ),
            (not whole(self.tta_translate, 0), "tta_translate", "a whole number of pixels >= 0"),
            (not whole(self.translate, 0), "translate", "a whole number of pixels >= 0"),
            (self.padding_mode not in {"zeros", "reflect"}, "padding_mode", "'zeros' or 'reflect'"),
            (
                not self.classes
                or len(set(self.classes)) != len(self.classes)
                or set(self.classes) - {*CIFAR10_CLASSES},
                "classes",
                f"distinct CIFAR-10 class names from {CIFAR10_CLASSES}",
            ),
        ]
        for bad, name, allowed in problems:
            if bad:
                raise ValueError(f"{type(self).__name__}.{name} must be {allowed}, got {getattr(self, name)!r}")

    def __getattr__(self, name: str) -> Any:
        """Read a ``TrainConfig`` setting through the recipe: ``recipe.lr`` is ``recipe.train.lr``."""
        if name != "train" and name in TrainConfig.__dataclass_fields__:
            return getattr(self.train, name)
        raise AttributeError(f"{type(self).__name__} has no setting {name!r}")

    def replace(self: R, **changes: Any) -> R:
        """This recipe with ``changes``: each name is a field of the recipe or of its ``TrainConfig``."""
        train_fields = {f.name for f in fields(TrainConfig)}
        own = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - train_fields - own)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no settings {unknown}")
        train_changes = {k: v for k, v in changes.items() if k in train_fields and k not in own}
        own_changes = {k: v for k, v in changes.items() if k in own}
        if train_changes:
            own_changes["train"] = replace(own_changes.get("train", self.train), **train_changes)
        return replace(self, **own_changes)

    def for_mode(self: R, quick: bool, epochs: int | None = None) -> R:
        """This recipe in quick mode (its quick sizes as n_train, n_test, epochs, batch_size) or unchanged,
        with ``epochs`` in place of its own if given."""
        recipe = self
        if quick and not self.quick:
            recipe = self.replace(
                n_train=self.quick_n_train,
                n_test=self.quick_n_test,
                epochs=self.quick_epochs,
                batch_size=self.quick_batch_size or self.batch_size,
                quick=True,
            )
        return recipe if epochs is None else recipe.replace(epochs=epochs)

    def settings(self) -> dict[str, Any]:
        """Every setting in one flat dict: the recipe's own fields and its ``TrainConfig``'s (progress left out)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "train"}
        train = {k: v for k, v in asdict(self.train).items() if k != "progress"}
        return own | train


@dataclass(frozen=True, eq=False)
class RunResult:
    """What ``run`` gives back: accuracies, time, hardware, the recipe that ran, the trained model and its history."""

    title: str  # what was trained, as the result line names it
    test_acc: float
    test_acc_tta: float  # with test-time augmentation: flips (and shifts if recipe.tta_translate)
    train_seconds: float
    device: str
    threads: int  # torch's CPU threads
    processes: int  # how many processes trained together (torchrun), 1 without torchrun
    seed: int
    n_train: int
    params: int  # trainable parameters
    recipe: Recipe
    model: nn.Module
    history: History
    test: Batches  # the test images, as the run evaluated them
    train_labels: torch.Tensor  # the label of every training image (in the order of recipe.classes)
    date: str  # when training finished, ISO 8601 in UTC
    notes: dict[str, Any] = field(default_factory=dict)  # learned values worth recording (e.g. a temperature)

    @property
    def epochs(self) -> int:
        """The epochs the run trained for (the recipe's)."""
        return self.recipe.train.epochs

    def line(self) -> str:
        """One line: what ran, in which mode, its accuracy, time and hardware."""
        mode = "quick" if self.recipe.quick else "full"
        tta = "flip-TTA" if not self.recipe.tta_translate else f"flip+{self.recipe.tta_translate}px-shift TTA"
        return (
            f"{self.title} ({mode}, {self.epochs} epochs, {self.n_train:,} training images): "
            f"test accuracy {self.test_acc:.4f}, with {tta} {self.test_acc_tta:.4f} | "
            f"training {self.train_seconds:.1f} s | device {self.device}, {self.history.precision} | "
            f"torch threads {self.threads}" + (f" | {self.processes} processes" if self.processes > 1 else "")
        )

    def record(self) -> dict[str, Any]:
        """A JSON-able summary of the run for the book's Results page (``companion.records``)."""
        return make_record(
            model=self.title,
            recipe=type(self.recipe).__name__,
            quick=self.recipe.quick,
            settings=self.recipe.settings(),
            history=self.history,
            n_train=self.n_train,
            test_acc=self.test_acc,
            test_acc_tta=self.test_acc_tta,
            seed=self.seed,
            processes=self.processes,
            params=self.params,
            **self.notes,
        )


def cifar10_loaders(
    recipe: Recipe, root: str | os.PathLike | None = None, seed: int = 0, device: torch.device | None = None
) -> tuple[DeviceLoader, DeviceLoader]:
    """The recipe's CIFAR-10 training loader (shuffled, augmented as it says) and test loader, on ``device``.

    With ``recipe.classes`` other than all ten, only the images of those classes, labelled 0..len(classes)-1.
    """
    with distributed.main_first():  # under torchrun rank 0 decodes and caches the data set, the others read the cache
        x, y = load_cifar10(train=True, root=root, subset=recipe.n_train)
        xt, yt = load_cifar10(train=False, root=root, subset=recipe.n_test)
    if recipe.classes != CIFAR10_CLASSES:
        keep = torch.tensor([CIFAR10_CLASSES.index(c) for c in recipe.classes])
        relabel = torch.full((10,), -1, dtype=torch.long)
        relabel[keep] = torch.arange(len(keep))
        x, y = x[torch.isin(y, keep)], relabel[y[torch.isin(y, keep)]]
        xt, yt = xt[torch.isin(yt, keep)], relabel[yt[torch.isin(yt, keep)]]
    batch_size = min(recipe.batch_size, len(y))
    train = DeviceLoader(
        x,
        y,
        batch_size,
        shuffle=True,
        augment=recipe.augment,
        device=device,
        pad=recipe.translate,
        padding_mode=recipe.padding_mode,
        drop_last=True,
        seed=seed,
    )
    return train, DeviceLoader(xt, yt, batch_size=recipe.eval_batch_size, device=device)


def whitening_batch(train: DeviceLoader, n: int = 5_000, seed: int = 0) -> torch.Tensor:
    """A seeded random sample of ``n`` training images, normalised, on the loader's device (for FastCNN's stem).

    A random sample, not the first ``n``, so that the stem does not depend on the order the images are stored in
    (a class-folder copy of CIFAR-10 is sorted by class on disk).
    """
    n = min(n, len(train.labels))
    pick = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(seed))[:n].to(train.device)
    return next(iter(DeviceLoader(train.images[pick], train.labels[pick], n, device=train.device)))[0]


def weights_path(save: str | os.PathLike, overwrite: bool = False) -> Path:
    """Where ``save`` will write weights (``.safetensors`` added if missing); a clear error now if it cannot.

    An existing file is never replaced unless ``overwrite``.
    """
    path = Path(save).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"cannot save the weights to {path}: it is a folder; give a file name in it")
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"cannot save the weights to {path}: the folder {folder} does not exist; create it or choose another path"
        )
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot save the weights to {path}: no permission to write there; choose another path")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists: pass --overwrite (overwrite=True) to replace it, or choose another file name"
        )
    return path


@contextmanager
def _reserved(paths: list[Path]) -> Iterator[None]:
    """Hold a lock file beside each output path for the run, so that a second run writing there fails at once."""
    held: list[Path] = []
    try:
        for path in paths if distributed.is_main() else []:
            lock = path.with_name(path.name + ".lock")
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise FileExistsError(
                    f"another run is writing {path} (its lock file {lock} exists); wait for it to finish, or choose "
                    "another path. If no run is active (one was killed), delete the lock file."
                ) from None
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
            held.append(lock)
        yield
    finally:
        for lock in held:
            lock.unlink(missing_ok=True)


def _free_path(path: Path) -> Path:
    """``path``, or ``stem-1``, ``stem-2``... beside it: the first name no file has yet."""
    candidate, i = path, 0
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
    return candidate


def _save(model: nn.Module, path: Path, what: str) -> Path:
    """Save weights to ``path``; if that fails, to a new file in the working directory. Returns where."""
    try:
        save_weights(model, path)
    except Exception as err:  # whatever went wrong, the trained weights are not thrown away
        fallback = _free_path(Path.cwd() / path.name)
        try:
            save_weights(model, fallback)
        except Exception as again:
            raise OSError(f"could not save the {what} to {path} ({err}), nor to {fallback} ({again})") from again
        print(f"could not save the {what} to {path} ({err}); saved them to {fallback} instead", file=sys.stderr)
        return fallback
    print(f"{what} saved to {path}")
    return path


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be a whole number from 0 to 2**32 - 1, got {seed!r}")


def run(
    recipe: Recipe,
    make_model: Callable[[Any, DeviceLoader, int], nn.Module],
    make_data: Callable[..., tuple[Batches, DeviceLoader]] = cifar10_loaders,
    title: Callable[[Any, nn.Module], str] = lambda recipe, model: type(model).__name__,
    notes: Callable[[nn.Module], dict[str, Any]] = lambda model: {},
    *,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    save: str | os.PathLike | None = None,
    overwrite: bool = False,
    checkpoint: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    progress: bool = True,
    verbose: bool = True,
    record: bool = True,
) -> RunResult:
    """Run ``recipe``: data -> model -> ``fit`` -> evaluation -> weights (``save``) -> result line and record.

    ``make_data(recipe, root, seed, device)`` gives the training and test batches, ``make_model(recipe, train,
    seed)`` the model, ``title(recipe, model)`` and ``notes(model)`` what the line and record say of the trained
    model. The device is chosen once (``companion.device()``). ``save`` writes the weights to a ``.safetensors``
    file (checked before anything loads; an existing file only with ``overwrite``). ``checkpoint`` writes a
    checkpoint after every epoch; ``resume_from`` continues a checkpointed run (with the same recipe and seed).
    SIGINT or SIGTERM stops training at the end of a step: the weights so far and a checkpoint are saved and
    ``TrainingInterrupted`` is raised. ``verbose`` prints the result line, ``record`` writes the result record.
    """
    _check_seed(seed)
    target = weights_path(save, overwrite) if save is not None else None
    ckpt = None if checkpoint is None else Path(checkpoint).expanduser()
    if ckpt is not None and ckpt.exists() and not overwrite and ckpt != Path(resume_from or "").expanduser():
        raise FileExistsError(f"checkpoint {ckpt} exists: resume from it (--resume), pass --overwrite, or rename it")
    dev = best_device()
    with _reserved([p for p in (target, ckpt) if p is not None]):
        seed_everything(seed)
        train, test = make_data(recipe, root, seed, dev)
        model = make_model(recipe, train, seed).to(dev)
        callbacks: list = []
        if recipe.ema_decay is not None:
            every, lookahead = max(1, recipe.lookahead_every), recipe.lookahead_every > 0
            callbacks.append(EMA(model, recipe.ema_decay, every, lookahead, recipe.ema_ramp))
        if ckpt is not None:
            callbacks.append(Checkpoint(ckpt))
        config = replace(recipe.train, lr=distributed.scale_lr(recipe.train.lr, recipe.lr_scaling), progress=progress)
        try:
            history = fit(model, train, test, config, callbacks=callbacks, resume_from=resume_from)
        except TrainingInterrupted as stop:
            with hold_signals():
                _keep_interrupted(stop, model, target, ckpt, recipe, seed)
            raise
        with hold_signals():  # finished training: a Ctrl-C now acts once the weights and record are written
            _, acc_tta = evaluate(model, test, True, recipe.tta_translate, recipe.train.precision)  # as fit's
            result = RunResult(
                title=title(recipe, model),
                test_acc=history.test_acc[-1],
                test_acc_tta=acc_tta,
                train_seconds=history.total_seconds,
                device=history.device,
                threads=torch.get_num_threads(),
                processes=distributed.world_size(),
                seed=seed,
                n_train=len(train.labels),
                params=count_parameters(model, trainable_only=True),
                recipe=recipe,
                model=model,
                history=history,
                test=test,
                train_labels=train.labels.cpu(),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                notes=notes(model),
            )
            _finish(result, target, verbose, record)
    return result


def _finish(result: RunResult, target: Path | None, verbose: bool, record: bool) -> None:
    """Save the weights, print the result line, write the record: rank 0 only, in that order."""
    if distributed.is_main():  # under torchrun one line, one record and one file, from rank 0
        if target is not None:
            _save(result.model, target, "weights")  # first the weights: nothing after this can lose them
        if verbose:
            print(result.line())
        if record:
            _write(result)


def _keep_interrupted(
    stop: TrainingInterrupted, model: nn.Module, target: Path | None, ckpt: Path | None, recipe: Recipe, seed: int
) -> None:
    """After a signal: save the weights trained so far and a checkpoint, and say where and how to continue."""
    if not distributed.is_main():
        return
    if target is not None:  # run.v1.safetensors -> run.v1 (with_suffix would drop ".v1" too)
        stem = target.with_name(target.name.removesuffix(".safetensors"))
    else:
        stem = Path.cwd() / f"interrupted-{type(recipe).__name__}-{seed}"
    partial = _save(model, _free_path(stem.with_name(stem.name + ".partial.safetensors")), "weights trained so far")
    ckpt = ckpt if ckpt is not None else _free_path(stem.with_name(stem.name + ".ckpt"))
    save_checkpoint(stop.state, ckpt)
    print(
        f"{stop} (epoch {stop.epoch + 1} of {recipe.train.epochs}). Weights so far: {partial}; checkpoint: {ckpt}. "
        f"To continue, run the same command with --resume {ckpt} (Python: resume_from=...).",
        file=sys.stderr,
    )


def _write(result: RunResult) -> None:
    """Write the run's record; a failure costs only the Results page's row, and says so."""
    try:
        rec = result.record()
        write_record(rec, record_name(rec))
    except (OSError, ValueError, TypeError) as err:  # the run, its line and its weights stand
        msg = f"could not write the result record ({err}); set COMPANION_RECORDS to a writable folder"
        warnings.warn(msg, stacklevel=3)
