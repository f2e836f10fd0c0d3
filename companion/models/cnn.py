"""Convolutional networks for CIFAR-10: the classic LeNet-style baseline and a fast modern CNN.

``SimpleCNN`` is the small network of the classic tutorials (LeCun et al., 1998, adapted to colour
32x32 images). ``FastCNN`` follows the CIFAR-10 speed-run networks (Page's ResNet-9, Jordan's
airbench): a wide three-stage body of conv-pool-batchnorm-activation blocks, max pooling, no
bottleneck, and a linear classifier on globally max-pooled features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from companion.validation import validate_images, validate_int, validate_positive

__all__ = ["ConvGroup", "FastCNN", "SimpleCNN", "patch_whitening"]


class SimpleCNN(nn.Module):
    """The classic LeNet-style CNN: conv(3,6,5)-pool-conv(6,16,5)-pool-fc(400,120)-fc(120,84)-fc(84,10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        validate_int(num_classes, "num_classes")
        self.conv1 = nn.Conv2d(3, 6, kernel_size=5)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        validate_images(x, "SimpleCNN", 3, 32)  # the 400 inputs of fc1 are 16 maps of 5x5: only 32x32 fits
        x = self.pool(F.relu(self.conv1(x)))  # (B, 6, 14, 14)
        x = self.pool(F.relu(self.conv2(x)))  # (B, 16, 5, 5)
        x = x.flatten(1)  # (B, 400)
        x = F.relu(self.fc1(x))  # (B, 120)
        x = F.relu(self.fc2(x))  # (B, 84)
        return self.fc3(x)  # (B, num_classes)


class ConvGroup(nn.Module):
    """One stage of FastCNN: conv3x3 -> maxpool 2 -> BN -> act, then ``depth - 1`` x (conv3x3 -> BN -> act).

    ``bn_scale=False`` freezes the BatchNorm scales at 1 (only the shifts learn), as airbench does.
    ``identity_init=True`` starts each conv as an identity on its first ``in`` channels (``nn.init.dirac_``) plus
    the usual random init elsewhere: an implicit residual connection at the start of training (airbench).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        depth: int = 2,
        batch_norm: bool = True,
        bn_scale: bool = True,
        identity_init: bool = False,
    ) -> None:
        super().__init__()
        validate_int(in_channels, "in_channels"), validate_int(out_channels, "out_channels")
        if validate_int(depth, "depth", minimum=None) < 1:
            raise ValueError(f"depth must be at least 1 convolution per stage, got {depth}")
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=not batch_norm)
            for i in range(depth)
        )  # with batch-norm a conv bias would be cancelled by the mean subtraction
        if identity_init:
            for conv in self.convs:
                with torch.no_grad():
                    nn.init.dirac_(conv.weight[: min(conv.in_channels, conv.out_channels)])
        norm = nn.BatchNorm2d if batch_norm else lambda _: nn.Identity()
        self.norms = nn.ModuleList(norm(out_channels) for _ in range(depth))
        if batch_norm and not bn_scale:
            for bn in self.norms:
                bn.weight.requires_grad_(False)  # a fixed scale of 1: the next conv can scale instead
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = conv(x)  # (B, C_out, H, W)
            if i == 0:
                x = self.pool(x)  # (B, C_out, H/2, W/2): pooling before BN and activation is cheaper
            x = F.gelu(norm(x))
        return x


class FastCNN(nn.Module):
    """A fast CIFAR-10 CNN in the spirit of ResNet-9 / airbench: stem, len(widths) conv groups, max-pool, linear.

    ``bn_scale=False`` freezes every BatchNorm scale at 1 (airbench's BatchNorm without an affine scale);
    ``identity_init=True`` starts every stage's convs as identities on their first channels (see ``ConvGroup``).
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128),
        depth_per_stage: int = 2,
        num_classes: int = 10,
        stem_width: int = 24,
        batch_norm: bool = True,
        logit_scale: float = 1 / 9,
        bn_scale: bool = True,
        identity_init: bool = False,
    ) -> None:
        super().__init__()
        ok = isinstance(widths, (tuple, list)) and widths
        if not ok or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty tuple of positive channel counts (ints), got {widths!r}")
        validate_int(num_classes, "num_classes"), validate_int(stem_width, "stem_width")
        validate_positive(logit_scale, "logit_scale", " (the logits are the head's outputs times it)")
        self.stem = nn.Conv2d(3, stem_width, kernel_size=2, bias=True)  # 2x2 patches: 32x32 -> 31x31
        chans = (stem_width, *widths)
        self.stages = nn.ModuleList(
            ConvGroup(chans[i], chans[i + 1], depth_per_stage, batch_norm, bn_scale, identity_init)
            for i in range(len(widths))
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale
        self.min_size = 2 ** len(widths) + 1  # each stage halves the size; the stem takes one pixel off

    @torch.no_grad()
    def whiten(self, images: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
        """Set the stem from the data (PCA whitening of 2x2 patches), freeze its weights; return the eigenvalues."""
        eigenvalues = patch_whitening(self.stem, images, eps)
        self.stem.weight.requires_grad_(False)
        return eigenvalues

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images, checked -> (B, stem_width, H-1, W-1) activations of the stem."""
        validate_images(x, type(self).__name__, 3, min_size=self.min_size)
        x = x.contiguous(memory_format=torch.channels_last)  # NHWC: several times faster convolutions on CPU
        return F.gelu(self.stem(x))  # (B, stem_width, 31, 31)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, widths[-1], h, w) features of the last stage."""
        x = self.forward_stem(x)  # (B, stem_width, 31, 31)
        for stage in self.stages:
            x = stage(x)  # (B, width, H/2, W/2)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, widths[-1], h, w) features -> (B, num_classes) logits."""
        x = self.pool(features).flatten(1)  # (B, widths[-1]): global max pooling
        return self.head(x) * self.logit_scale  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes) logits."""
        return self.forward_head(self.forward_features(x))


@torch.no_grad()
def patch_whitening(stem: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """Set a k x k ``stem`` conv to whiten the k x k patches of ``images`` (PCA), as in airbench.

    The filters are the rows of (Lambda + eps)^(-1/2) V^T for the eigen-decomposition V Lambda V^T of the patch
    covariance, and their negatives. Returns the eigenvalues Lambda, largest first.
    """
    k = stem.kernel_size[0]
    if stem.out_channels != 2 * stem.in_channels * k * k:
        raise ValueError(
            f"patch whitening needs out_channels = 2 * in_channels * k * k = {2 * stem.in_channels * k * k}, "
            f"got {stem.out_channels}"
        )
    patches = images.unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H-k+1, W-k+1, k, k)
    patches = patches.transpose(1, 3).reshape(-1, stem.in_channels * k * k).double()  # (N*P, C*k*k)
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / len(patches)  # float64: the smallest eigenvalues are ~1e-5 times the largest
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    filters = (eigenvectors.T / torch.sqrt(eigenvalues.view(-1, 1) + eps)).flip(0)  # (C*k*k, C*k*k)
    filters = filters.view(-1, stem.in_channels, k, k)  # (C*k*k, C, k, k)
    stem.weight.copy_(torch.cat([filters, -filters]))
    stem.bias.zero_()
    return eigenvalues.flip(0).float()
