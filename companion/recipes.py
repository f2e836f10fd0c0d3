"""Training recipes: the settings of each chapter's headline run, in one place, and the function that runs it.

``python -m companion train cnn`` calls :func:`train_cnn`; Chapter 3 reuses :data:`CNN_RECIPE` and the same
function, so the book's numbers and the command line come from one code path.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from companion.data import DeviceLoader, load_cifar10
from companion.models.cnn import FastCNN
from companion.models.common import save_weights
from companion.runtime import device as best_device
from companion.runtime import seed_everything
from companion.train import Batches, evaluate, fit

__all__ = ["CNN_RECIPE", "CNNRecipe", "cnn_data", "fit_recipe", "make_cnn", "report", "train_cnn", "whitening_batch"]


@dataclass(frozen=True)
class CNNRecipe:
    """Everything that defines the fast CIFAR-10 CNN run: model size, data, optimiser and schedule."""

    widths: tuple[int, ...] = (32, 64, 128)
    depth_per_stage: int = 2
    batch_norm: bool = True
    whiten: bool = True  # initialise the 2x2 stem as a PCA whitening of image patches (then frozen)
    augment: bool = True  # random flips and 4-pixel translations
    batch_size: int = 512
    epochs: int = 12
    optimizer: str = "sgd"  # Nesterov momentum 0.9
    lr: float = 0.4
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # linear warm-up, then linear decay to zero
    warmup: float = 0.2
    label_smoothing: float = 0.2
    n_train: int | None = None  # None: all 50,000 training images
    n_test: int | None = None  # None: all 10,000 test images
    quick_n_train: int = 2_000  # quick mode (COMPANION_QUICK=1 or --quick): a class-balanced subset ...
    quick_n_test: int = 1_000
    quick_epochs: int = 5  # ... a few epochs ...
    quick_batch_size: int = 64  # ... and smaller batches, for enough steps


CNN_RECIPE = CNNRecipe()


def make_cnn(
    recipe: CNNRecipe = CNN_RECIPE, whiten_images: torch.Tensor | None = None, num_classes: int = 10
) -> FastCNN:
    """Build the recipe's FastCNN; with ``recipe.whiten``, set its stem from ``whiten_images`` (normalised)."""
    model = FastCNN(recipe.widths, recipe.depth_per_stage, num_classes=num_classes, batch_norm=recipe.batch_norm)
    if recipe.whiten:
        if whiten_images is None:
            raise ValueError("recipe.whiten=True needs whiten_images: a normalised batch of training images")
        model.whiten(whiten_images)
    return model.to(memory_format=torch.channels_last)


def cnn_data(
    recipe: CNNRecipe = CNN_RECIPE, quick: bool = False, root: str | os.PathLike | None = None, seed: int = 0
) -> tuple[DeviceLoader, DeviceLoader]:
    """Training loader (shuffled, augmented as the recipe says) and test loader of CIFAR-10 on the best device."""
    n_train = recipe.quick_n_train if quick else recipe.n_train
    n_test = recipe.quick_n_test if quick else recipe.n_test
    x, y = load_cifar10(train=True, root=root, subset=n_train)
    xt, yt = load_cifar10(train=False, root=root, subset=n_test)
    batch_size = min(recipe.quick_batch_size if quick else recipe.batch_size, len(y))
    train = DeviceLoader(x, y, batch_size, shuffle=True, augment=recipe.augment, drop_last=True, seed=seed)
    test = DeviceLoader(xt, yt, batch_size=1000)
    return train, test


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


def train_cnn(
    quick: bool = False,
    epochs: int | None = None,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    save: str | os.PathLike | None = None,
    recipe: CNNRecipe = CNN_RECIPE,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train the recipe's FastCNN on CIFAR-10 and report test accuracy (plain and with flip-TTA) and time.

    Returns :func:`fit_recipe`'s dict; ``save`` writes the weights to a ``.safetensors`` file.
    """
    if epochs is None:
        epochs = recipe.quick_epochs if quick else recipe.epochs
    recipe = replace(recipe, epochs=epochs)
    seed_everything(seed)
    train, test = cnn_data(recipe, quick=quick, root=root, seed=seed)
    model = make_cnn(recipe, whitening_batch(train)).to(train.device)
    result = fit_recipe(model, train, test, recipe, len(train.labels), progress)
    if save is not None:
        save_weights(model, save)
    if verbose:
        report(f"FastCNN{recipe.widths}", result, quick, save)
    return result
