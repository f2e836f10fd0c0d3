"""Pictures the chapters share: image grids, training curves, confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from companion.data import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["plot_confusion_matrix", "plot_history", "show_images", "to_image"]


def to_image(x: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> np.ndarray:
    """One image (C, H, W) as an (H, W, C) array in [0, 1]: uint8 is scaled, float is un-normalised."""
    x = x.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.min() < 0 or x.max() > 1:  # normalised by (x - mean) / std
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def show_images(
    images: torch.Tensor,
    labels: Sequence[int] | torch.Tensor | None = None,
    classes: Sequence[str] | None = None,
    ncols: int = 8,
    titles: Sequence[str] | None = None,
    size: float = 1.4,
) -> plt.Figure:
    """A grid of images (N, C, H, W), titled by class name, by label, or by the given titles."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n = len(images)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(to_image(images[i]), interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
        elif labels is not None:
            label = int(labels[i])
            ax.set_title(classes[label] if classes is not None else str(label), fontsize=8)
    fig.tight_layout()
    return fig


def plot_history(history, title: str | None = None) -> plt.Figure:
    """Loss and accuracy per epoch of a ``companion.train.History`` (train and, if present, test)."""
    epochs = np.arange(1, len(history.train_loss) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(epochs, history.train_loss, "o-", label="train")
    ax_acc.plot(epochs, np.array(history.train_acc) * 100, "o-", label="train")
    if history.test_loss:
        ax_loss.plot(epochs, history.test_loss, "s-", label="test")
        ax_acc.plot(epochs, np.array(history.test_acc) * 100, "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(
    y_true: Sequence[int] | torch.Tensor, y_pred: Sequence[int] | torch.Tensor, classes: Sequence[str]
) -> plt.Figure:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), in percent."""
    y_true, y_pred = torch.as_tensor(y_true).long().cpu(), torch.as_tensor(y_pred).long().cpu()  # CUDA ones too
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {tuple(y_true.shape)} vs {tuple(y_pred.shape)}")
    k = len(classes)
    counts = torch.bincount(y_true * k + y_pred, minlength=k * k).view(k, k).float()
    percent = (100 * counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig, ax = plt.subplots(figsize=(0.55 * k + 2, 0.55 * k + 1.5))
    im = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{percent[i, j]:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if percent[i, j] > 50 else "black",
            )
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true")
    fig.colorbar(im, ax=ax, label="% of the true class")
    fig.tight_layout()
    return fig
