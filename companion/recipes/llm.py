"""Chapter 6 recipe: the CNN image tower with a cosine head over locked language-model class embeddings.

``python -m companion train llm`` calls :func:`train_llm`; Chapter 6 reuses :data:`LLM_RECIPE`, the same
data and the same seed for its linear-head baseline, so the book's numbers and the command line agree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from companion.data import CIFAR10_CLASSES, DeviceLoader, load_cifar10
from companion.llm import TEMPLATES, TextEncoder, class_embeddings
from companion.models import ImageTextClassifier
from companion.models.common import count_parameters, save_weights
from companion.recipes.cnn import CNNRecipe, make_cnn
from companion.recipes.common import fit_recipe, report, whitening_batch
from companion.runtime import seed_everything

__all__ = ["LLM_RECIPE", "LLMRecipe", "llm_data", "train_linear_baseline", "train_llm"]


@dataclass(frozen=True)
class LLMRecipe(CNNRecipe):
    """The CNN recipe of Chapter 3 plus the text side; fewer epochs so that the chapter's three runs fit a CPU."""

    epochs: int = 5
    batch_size: int = 128  # more, smaller steps than Chapter 3's 512: the temperature needs them to settle
    lr: float = 0.2
    quick_epochs: int = 3  # quick mode: 2,000 images (Chapter 3's subset) for 3 epochs, fixed here for this chapter
    quick_batch_size: int = 128  # the same batches in both modes (llm_data uses batch_size)
    text_model: str | None = None  # None: the bundled all-MiniLM-L6-v2
    templates: tuple[str, ...] = TEMPLATES
    init_temperature: float = 0.07  # CLIP's initial temperature: logit scale 1 / 0.07 = 14.3


LLM_RECIPE = LLMRecipe()


def llm_data(
    recipe: LLMRecipe = LLM_RECIPE,
    quick: bool = False,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    classes: Sequence[str] = CIFAR10_CLASSES,
) -> tuple[DeviceLoader, DeviceLoader, torch.Tensor]:
    """Train and test loaders holding only the images of ``classes``, relabelled 0..len(classes)-1.

    Also returns the original CIFAR-10 labels of the training images, so a caller can check which classes
    the model saw.
    """
    unknown = [c for c in classes if c not in CIFAR10_CLASSES]
    if unknown or len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct CIFAR-10 class names from {CIFAR10_CLASSES}, got {list(classes)}")
    keep = torch.tensor([CIFAR10_CLASSES.index(c) for c in classes])
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[keep] = torch.arange(len(keep))
    loaders = []
    for train in (True, False):
        n = (
            (recipe.quick_n_train if quick else recipe.n_train)
            if train
            else (recipe.quick_n_test if quick else recipe.n_test)
        )
        x, y = load_cifar10(train=train, root=root, subset=n)
        mask = torch.isin(y, keep)
        x, y_orig = x[mask], y[mask]
        if train:
            seen = y_orig
            loaders.append(
                DeviceLoader(
                    x,
                    relabel[y_orig],
                    min(recipe.batch_size, len(y_orig)),
                    shuffle=True,
                    augment=recipe.augment,
                    drop_last=True,
                    seed=seed,
                )
            )
        else:
            loaders.append(DeviceLoader(x, relabel[y_orig], batch_size=1000))
    return loaders[0], loaders[1], seen


def _train(
    head: str,
    quick: bool,
    epochs: int | None,
    root: str | os.PathLike | None,
    seed: int,
    recipe: LLMRecipe,
    encoder: TextEncoder | None,
    classes: Sequence[str],
    progress: bool,
) -> dict[str, Any]:
    """Train the recipe's CNN with a ``'text'`` (cosine over class embeddings) or ``'linear'`` head; return "
    "the figures."""
    if epochs is None:
        epochs = recipe.quick_epochs if quick else recipe.epochs
    recipe = replace(recipe, epochs=epochs)
    seed_everything(seed)
    train, test, seen = llm_data(recipe, quick=quick, root=root, seed=seed, classes=classes)
    whiten = whitening_batch(train)
    seed_everything(seed)  # the same initial CNN body for both heads
    if head == "text":
        encoder = encoder if encoder is not None else TextEncoder(recipe.text_model)
        model = ImageTextClassifier(
            make_cnn(recipe, whiten), class_embeddings(encoder, classes, recipe.templates), recipe.init_temperature
        )
    else:
        model = make_cnn(recipe, whiten, num_classes=len(classes))
    model = model.to(train.device)
    result = fit_recipe(model, train, test, recipe, len(train.labels), progress)
    result.update(
        params=count_parameters(model, trainable_only=True),
        classes=list(classes),
        train_labels_cifar10=seen.cpu(),
        test=test,
    )
    return result


def train_llm(
    quick: bool = False,
    epochs: int | None = None,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    save: str | os.PathLike | None = None,
    recipe: LLMRecipe = LLM_RECIPE,
    encoder: TextEncoder | None = None,
    classes: Sequence[str] = CIFAR10_CLASSES,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train approach 1 (CNN + projection into the text space + cosine logits) on CIFAR-10 and report test accuracy.

    ``classes`` restricts training and testing to those classes (the zero-shot experiment). Returns a dict with
    ``test_acc``, ``test_acc_tta``, ``train_seconds``, ``device``, ``threads``, ``epochs``, ``n_train``, ``params``
    (trainable), ``temperature``, ``classes``, ``train_labels_cifar10`` (original labels of every training image),
    ``recipe`` (as a dict), the trained ``model``, its ``history`` and the ``test`` loader.
    """
    result = _train("text", quick, epochs, root, seed, recipe, encoder, classes, progress)
    model = result["model"]
    result["temperature"] = 1 / model.head.logit_scale.exp().clamp(max=model.head.max_scale).item()
    if save is not None:
        save_weights(model, save)
    if verbose:
        title = (
            f"FastCNN{recipe.widths} + cosine head over {len(classes)} class-text embeddings "
            f"(temperature {result['temperature']:.4f})"
        )
        report(title, result, quick, save)
    return result


def train_linear_baseline(
    quick: bool = False,
    epochs: int | None = None,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    recipe: LLMRecipe = LLM_RECIPE,
    classes: Sequence[str] = CIFAR10_CLASSES,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """The same CNN, data, seed and budget as :func:`train_llm`, with FastCNN's ordinary linear head."""
    result = _train("linear", quick, epochs, root, seed, recipe, None, classes, progress)
    if verbose:
        report(f"FastCNN{recipe.widths} + linear head", result, quick)
    return result
