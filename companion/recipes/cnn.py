"""Chapter 3's recipe: the fast CIFAR-10 CNN's settings in one place, and the function that trains it.

``python -m companion train cnn`` calls :func:`train_cnn`; Chapter 3 reuses :data:`CNN_RECIPE` and the same
function, so the book's numbers and the command line come from one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from companion.data import DeviceLoader
from companion.models.cnn import FastCNN
from companion.recipes.common import (
    Recipe,
    Result,
    cifar10_loaders,
    finish_run,
    fit_recipe,
    weights_path,
    whitening_batch,
)
from companion.runtime import device as best_device
from companion.runtime import seed_everything

__all__ = ["CNN_RECIPE", "CNN_RECIPE_GPU", "CNNRecipe", "cnn_data", "make_cnn", "train_cnn"]


@dataclass(frozen=True)
class CNNRecipe(Recipe):
    """Everything that defines the fast CIFAR-10 CNN run: model size, data, optimiser and schedule."""

    widths: tuple[int, ...] = (32, 64, 128)
    depth_per_stage: int = 2
    batch_norm: bool = True
    bn_scale: bool = True  # False: BatchNorm scales frozen at 1, only the shifts learn (airbench)
    whiten: bool = True  # initialise the 2x2 stem as a PCA whitening of image patches (then frozen)
    augment: bool = True  # random flips and 4-pixel translations
    batch_size: int = 128  # on a CPU, small batches cost no more per image and give more steps per epoch
    epochs: int = 5  # sized so that Chapter 3 runs in under 10 minutes on a 2-core CPU (see CNN_RECIPE below)
    optimizer: str = "sgd"  # Nesterov momentum 0.9
    lr: float = 0.1
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # linear warm-up, then linear decay to zero
    warmup: float = 0.2
    label_smoothing: float = 0.2
    quick_epochs: int = 5  # quick mode: 2,000 training images for 5 epochs ...
    quick_batch_size: int | None = 64  # ... in smaller batches, for enough steps


# Measured on an idle 2-core CPU (2 torch threads), full CIFAR-10 (JPEG copy):
# - 6 epochs at batch 128 (Chapter 3 full mode, 2026-11-26): 0.8211, 0.8331 with flip-TTA, 229 s;
# - 7 epochs at batch 128 (Chapter 5's comparison run, 2026-11-26): 0.8353, 0.8482 with flip-TTA, 263 s;
# - 12 epochs at batch 512, lr 0.4 (the recipe until 2026-11-26): 0.8474, 0.8585 with flip-TTA, 531 s.
# The 5 epochs here keep Chapter 3 under 10 minutes; its opening table has the measured run of this recipe.
CNN_RECIPE = CNNRecipe()
# The GPU recipe: airbench's ingredients (Jordan, 2024) in this package's code. `train_cnn` picks it on CUDA.
# Not measured yet (no GPU has been lent to the book's development): the settings are a starting point from the
# issue's H200 run of widths 64/256/256 for 16 epochs (88.95%, 90.04% with flip-TTA, 8.1 s) plus the ingredients
# below; the target is 94% (TTA allowed, mean of 3 seeds) in 10 s of training on one H100/H200.
CNN_RECIPE_GPU = CNNRecipe(
    widths=(64, 256, 256),  # wider stages: nearly free on a GPU
    bn_scale=False,  # BatchNorm without a learned scale
    vector_lr_scale=4.0,  # the BatchNorm shifts learn 4x faster than the kernels
    batch_size=1024,
    epochs=16,
    lr=0.8,  # scaled linearly with the batch size from the CPU recipe's 0.1 at 128
    ema_decay=0.8,  # lookahead: every 5 steps the weights move into the average and restart from it
    lookahead_every=5,
    tta_translate=1,  # flip + 1-pixel shift test-time augmentation
    compile=True,  # torch.compile on CUDA
)


def make_cnn(
    recipe: CNNRecipe = CNN_RECIPE, whiten_images: torch.Tensor | None = None, num_classes: int = 10
) -> FastCNN:
    """Build the recipe's FastCNN; with ``recipe.whiten``, set its stem from ``whiten_images`` (normalised)."""
    model = FastCNN(
        recipe.widths,
        recipe.depth_per_stage,
        num_classes=num_classes,
        batch_norm=recipe.batch_norm,
        bn_scale=recipe.bn_scale,
    )
    if recipe.whiten:
        if whiten_images is None:
            raise ValueError("recipe.whiten=True needs whiten_images: a normalised batch of training images")
        model.whiten(whiten_images)
    return model.to(memory_format=torch.channels_last)


def cnn_data(
    recipe: CNNRecipe = CNN_RECIPE, root: str | os.PathLike | None = None, seed: int = 0
) -> tuple[DeviceLoader, DeviceLoader]:
    """Training loader (``recipe.n_train`` images, shuffled, augmented as the recipe says) and test loader."""
    return cifar10_loaders(recipe, root, seed, test_batch_size=1000)


def train_cnn(
    quick: bool = False,
    epochs: int | None = None,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    save: str | os.PathLike | None = None,
    recipe: CNNRecipe | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> Result:
    """Train the recipe's FastCNN on CIFAR-10 and report test accuracy (plain and with flip-TTA) and time.

    Without ``recipe``, :data:`CNN_RECIPE_GPU` on CUDA, else :data:`CNN_RECIPE`. Runs ``recipe.for_mode(quick)``,
    with ``epochs`` in place of the recipe's if given; ``save`` writes the weights to a ``.safetensors`` file
    (checked before training; if writing fails, a file in the working directory).
    """
    path = weights_path(save) if save is not None else None
    if recipe is None:
        recipe = CNN_RECIPE_GPU if best_device().type == "cuda" else CNN_RECIPE
    recipe = recipe.for_mode(quick, epochs)
    seed_everything(seed)
    train, test = cnn_data(recipe, root=root, seed=seed)
    model = make_cnn(recipe, whitening_batch(train)).to(train.device)
    result = fit_recipe(model, train, test, recipe, len(train.labels), f"FastCNN{recipe.widths}", progress)
    return finish_run(result, path, verbose)
