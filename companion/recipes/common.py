"""What the training recipes share: the runner that trains and evaluates a recipe's model, and its report."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from companion.data import DeviceLoader
from companion.runtime import device as best_device
from companion.train import Batches, evaluate, fit

__all__ = ["fit_recipe", "report", "whitening_batch"]


def whitening_batch(train: DeviceLoader, n: int = 5_000) -> torch.Tensor:
    """The first ``n`` training images, normalised, on the loader's device (for FastCNN's whitened stem)."""
    n = min(n, len(train.labels))
    return next(iter(DeviceLoader(train.images[:n], train.labels[:n], n, device=train.device)))[0]


def fit_recipe(
    model: nn.Module, train: Batches, test: DeviceLoader, recipe: Any, n_train: int, progress: bool = True
) -> dict[str, Any]:
    """Train ``model`` with the recipe's optimiser, schedule and epochs, evaluate with flip-TTA, return the figures.

    The dict holds ``test_acc``, ``test_acc_tta``, ``train_seconds``, ``device``, ``threads``, ``epochs``,
    ``n_train``, ``recipe`` (as a dict), and the trained ``model`` and its ``history``.
    """
    history = fit(
        model,
        train,
        test,
        epochs=recipe.epochs,
        optimizer=recipe.optimizer,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        schedule=recipe.schedule,
        warmup=recipe.warmup,
        label_smoothing=recipe.label_smoothing,
        grad_clip=getattr(recipe, "grad_clip", None),
        progress=progress,
    )
    _, acc_tta = evaluate(model, test, tta_flip=True)
    return {
        "test_acc": history.test_acc[-1],
        "test_acc_tta": acc_tta,
        "train_seconds": history.total_seconds,
        "device": history.device or str(best_device()),
        "threads": torch.get_num_threads(),
        "epochs": recipe.epochs,
        "n_train": n_train,
        "recipe": asdict(recipe),
        "model": model,
        "history": history,
    }


def report(title: str, result: dict[str, Any], quick: bool, save: str | os.PathLike | None = None) -> None:
    """Print one line: what ran, its accuracy, time and hardware (and where the weights were saved, if they were)."""
    print(
        f"{title} ({'quick' if quick else 'full'}, {result['epochs']} epochs, {result['n_train']:,} training images): "
        f"test accuracy {result['test_acc']:.4f}, with flip-TTA {result['test_acc_tta']:.4f} | "
        f"training {result['train_seconds']:.1f} s | device {result['device']} | torch threads {result['threads']}"
        + (f" | weights saved to {save}" if save is not None else "")
    )
