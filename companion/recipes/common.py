"""What the training recipes share: the ``Recipe`` settings and quick mode, the data, the runner and its ``Result``."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from companion import distributed
from companion.data import DeviceLoader, load_cifar10
from companion.models.common import save_weights
from companion.records import record_name, write_record
from companion.runtime import device as best_device
from companion.train import Batches, History, evaluate, fit

__all__ = [
    "Recipe",
    "Result",
    "cifar10_loaders",
    "finish_run",
    "fit_recipe",
    "maybe_compile",
    "report",
    "save_trained",
    "weights_path",
    "whitening_batch",
]

R = TypeVar("R", bound="Recipe")
RunResult = TypeVar("RunResult", bound="Result")


@dataclass(frozen=True)
class Recipe:
    """The settings every training run has: data sizes, optimiser, schedule, regularisation, and its quick mode.

    ``for_mode(quick)`` gives the recipe that runs: in quick mode the ``quick_*`` sizes take the place of
    ``n_train``, ``n_test``, ``epochs`` and ``batch_size``, so the object a caller holds and prints is what trains.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum 0.9) or "adamw"
    lr: float = 0.05
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # linear warm-up, then linear ("onecycle") or half-cosine ("cosine") decay to zero
    warmup: float = 0.2  # fraction of all steps
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # maximum gradient norm; None: no clipping
    # The GPU recipes' optimiser and evaluation options (all off by default; see fit):
    no_decay: tuple[str, ...] = ()  # parameters kept out of weight decay by name (e.g. the ViT's class token)
    vector_lr_scale: float = 1.0  # learning-rate multiplier for biases and norm parameters
    ema_decay: float | None = None  # None: no weight average; else evaluate and keep an EMA of the weights
    lookahead_every: int = 0  # with ema_decay: average every k steps and restart the weights from the average
    tta_translate: int = 0  # test-time augmentation also over copies shifted by this many pixels (0: flips only)
    compile: bool = False  # torch.compile the model for training on CUDA (ignored elsewhere)
    augment: bool = True  # random flips and 4-pixel translations (DeviceLoader)
    n_train: int | None = None  # None: all 50,000 training images
    n_test: int | None = None  # None: all 10,000 test images
    quick_n_train: int = 2_000  # quick mode (COMPANION_QUICK=1 or --quick): a class-balanced subset ...
    quick_n_test: int = 1_000
    quick_epochs: int = 4  # ... a few epochs ...
    quick_batch_size: int | None = None  # ... and this batch size (None: batch_size, the same in both modes)
    quick: bool = False  # True in the recipe for_mode(True) returns: the quick sizes are in place
    # Under torchrun with N processes the batch sizes above are per process, so the global batch is N times
    # larger and the learning rate is scaled with it: 'linear' (lr * N, Goyal et al. 2017), 'sqrt' or 'none'.
    lr_scaling: str = "linear"
    sync_batch_norm: bool = False  # under torchrun on GPUs: batch-norm statistics over the global batch

    def for_mode(self: R, quick: bool, epochs: int | None = None) -> R:
        """This recipe in quick mode (its quick sizes as n_train, n_test, epochs, batch_size) or unchanged,
        with ``epochs`` in place of its own if given."""
        recipe = self
        if quick and not self.quick:
            recipe = replace(
                self,
                n_train=self.quick_n_train,
                n_test=self.quick_n_test,
                epochs=self.quick_epochs,
                batch_size=self.quick_batch_size or self.batch_size,
                quick=True,
            )
        recipe = recipe if epochs is None else replace(recipe, epochs=epochs)
        if isinstance(recipe.epochs, bool) or not isinstance(recipe.epochs, int) or recipe.epochs < 1:
            raise ValueError(f"epochs must be a positive whole number, got {recipe.epochs!r}")
        return recipe


@dataclass(frozen=True, eq=False)
class Result:
    """What a recipe run gives back: accuracies, time and hardware, the recipe that ran, the model and its history."""

    title: str  # what was trained, as the result line names it
    test_acc: float
    test_acc_tta: float  # with test-time augmentation: flips (and shifts if recipe.tta_translate)
    train_seconds: float
    device: str
    threads: int  # torch's CPU threads
    processes: int  # how many processes trained together (torchrun), 1 without torchrun
    epochs: int
    n_train: int
    recipe: Recipe
    model: nn.Module
    history: History
    date: str  # when training finished, ISO 8601 in UTC

    def line(self) -> str:
        """One line: what ran, in which mode, its accuracy, time and hardware."""
        mode = "quick" if self.recipe.quick else "full"
        tta = "flip-TTA" if not self.recipe.tta_translate else f"flip+{self.recipe.tta_translate}px-shift TTA"
        return (
            f"{self.title} ({mode}, {self.epochs} epochs, {self.n_train:,} training images): "
            f"test accuracy {self.test_acc:.4f}, with {tta} {self.test_acc_tta:.4f} | "
            f"training {self.train_seconds:.1f} s | device {self.device} | torch threads {self.threads}"
            + (f" | {self.processes} processes" if self.processes > 1 else "")
        )

    def record(self) -> dict[str, Any]:
        """A JSON-able summary of the run: what ran, in which mode, with which settings, its figures and hardware."""
        return {
            "model": self.title,
            "recipe": type(self.recipe).__name__,
            "mode": "quick" if self.recipe.quick else "full",
            "settings": asdict(self.recipe),
            "test_acc": self.test_acc,
            "test_acc_tta": self.test_acc_tta,
            "train_seconds": self.train_seconds,
            "epochs": self.epochs,
            "n_train": self.n_train,
            "device": self.device,
            "threads": self.threads,
            "processes": self.processes,
            "torch": torch.__version__,
            "date": self.date,
        }


def cifar10_loaders(
    recipe: Recipe, root: str | os.PathLike | None = None, seed: int = 0, test_batch_size: int = 1000
) -> tuple[DeviceLoader, DeviceLoader]:
    """The recipe's CIFAR-10 training loader (shuffled, augmented as it says) and test loader, on the best device."""
    with distributed.main_first():  # under torchrun rank 0 decodes and caches the data set, the others read the cache
        x, y = load_cifar10(train=True, root=root, subset=recipe.n_train)
        xt, yt = load_cifar10(train=False, root=root, subset=recipe.n_test)
    batch_size = min(recipe.batch_size, len(y))
    train = DeviceLoader(x, y, batch_size, shuffle=True, augment=recipe.augment, drop_last=True, seed=seed)
    return train, DeviceLoader(xt, yt, batch_size=test_batch_size)


def whitening_batch(train: DeviceLoader, n: int = 5_000, seed: int = 0) -> torch.Tensor:
    """A seeded random sample of ``n`` training images, normalised, on the loader's device (for FastCNN's stem).

    A random sample, not the first ``n``, so that the stem does not depend on the order the images are stored in
    (a class-folder copy of CIFAR-10 is sorted by class on disk).
    """
    n = min(n, len(train.labels))
    pick = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(seed))[:n].to(train.device)
    return next(iter(DeviceLoader(train.images[pick], train.labels[pick], n, device=train.device)))[0]


def fit_recipe(
    model: nn.Module,
    train: Batches,
    test: DeviceLoader,
    recipe: Recipe,
    n_train: int,
    title: str,
    progress: bool = True,
) -> Result:
    """Train ``model`` with the recipe's optimiser, schedule and epochs; evaluate it, also with test-time augmentation.

    Under torchrun the learning rate is scaled by the recipe's ``lr_scaling`` rule for the global batch.
    With ``recipe.compile`` a CUDA model trains through ``torch.compile`` (see :func:`maybe_compile`); the
    returned ``Result.model`` is ``model`` itself, holding the trained weights.
    """
    net = maybe_compile(model, recipe.compile, _device_of(model))
    history = fit(
        net,
        train,
        test,
        epochs=recipe.epochs,
        optimizer=recipe.optimizer,
        lr=distributed.scale_lr(recipe.lr, recipe.lr_scaling),
        weight_decay=recipe.weight_decay,
        schedule=recipe.schedule,
        warmup=recipe.warmup,
        label_smoothing=recipe.label_smoothing,
        grad_clip=recipe.grad_clip,
        progress=progress,
        sync_batch_norm=recipe.sync_batch_norm,
        no_decay=recipe.no_decay,
        vector_lr_scale=recipe.vector_lr_scale,
        ema_decay=recipe.ema_decay,
        lookahead_every=recipe.lookahead_every,
        tta_translate=recipe.tta_translate,
    )
    _, acc_tta = evaluate(net, test, tta_flip=True, tta_translate=recipe.tta_translate)
    return Result(
        title=title,
        test_acc=history.test_acc[-1],
        test_acc_tta=acc_tta,
        train_seconds=history.total_seconds,
        device=history.device or str(best_device()),
        threads=torch.get_num_threads(),
        processes=distributed.world_size(),
        epochs=recipe.epochs,
        n_train=n_train,
        recipe=recipe,
        model=model,
        history=history,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def maybe_compile(model: nn.Module, enabled: bool, device: torch.device) -> nn.Module:
    """``torch.compile(model)`` if ``enabled`` and ``device`` is CUDA, else ``model`` itself.

    On CUDA compiling fuses the small kernels of normalisation and activation and pays back its compile time
    (counted in the first epoch) within a run; on the CPU a short run spends longer compiling than it saves.
    The compiled module shares ``model``'s parameters, so training it trains ``model``.
    """
    return torch.compile(model) if enabled and device.type == "cuda" else model


def report(result: Result) -> None:
    """Print the run's result line and write its record for the book's Results page (see ``companion.records``).

    Under torchrun only rank 0 does either, so the job prints one line and writes one record.
    """
    if not distributed.is_main():
        return
    print(result.line())
    record = result.record()
    try:
        write_record(record, record_name(record))
    except OSError as err:  # the run and its result stand; only the Results page will miss this row
        msg = f"could not write the result record ({err}); set COMPANION_RECORDS to a writable folder"
        warnings.warn(msg, stacklevel=2)


def weights_path(save: str | os.PathLike) -> Path:
    """Where ``save`` will write weights (``.safetensors`` added if missing); a clear error now if it cannot."""
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
    return path


def save_trained(model: nn.Module, path: Path) -> Path:
    """Save trained weights to ``path``; if that fails, to a new file in the working directory. Returns where.

    Under torchrun only rank 0 writes (every rank holds the same model).
    """
    if not distributed.is_main():
        return path
    try:
        save_weights(model, path)
    except Exception as err:  # whatever went wrong, the trained weights are not thrown away
        fallback, i = Path.cwd() / path.name, 0
        while fallback.exists():  # never overwrite a file there
            i += 1
            fallback = Path.cwd() / f"{path.stem}-{i}{path.suffix}"
        try:
            save_weights(model, fallback)
        except Exception as again:
            raise OSError(f"could not save the weights to {path} ({err}), nor to {fallback} ({again})") from again
        print(f"could not save the weights to {path} ({err}); saved them to {fallback} instead", file=sys.stderr)
        return fallback
    print(f"weights saved to {path}")
    return path


def finish_run(result: RunResult, save_to: Path | None, verbose: bool) -> RunResult:
    """How every recipe run ends: its line and record if ``verbose``, then its weights if ``save_to`` is a path."""
    if verbose:
        report(result)
    if save_to is not None:
        save_trained(result.model, save_to)
    return result
