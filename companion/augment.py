"""Batch augmentation on the device, for the GPU recipes: random image ops, mixup and cutmix (Chapter 5).

Everything works on whole (B, C, H, W) batches where they already live (the GPU), with no per-image
Python loop. The random numbers come from a CPU ``torch.Generator`` (as in ``DeviceLoader``), so a seed
gives the same augmentation on every device.

- :func:`apply_op` / :func:`random_ops`: TrivialAugment (Muller & Hutter, 2021; one op per image at a
  random strength) and RandAugment (Cubuk et al., 2020; ``num_ops`` ops at a fixed strength) on images in
  [0, 1]. Geometric ops share one ``grid_sample``; colour ops are computed for the batch and selected.
- :func:`mixup` (Zhang et al., 2018) and :func:`cutmix` (Yun et al., 2019) blend pairs of images and
  their labels. The labels become class probabilities (B, num_classes) that sum to 1;
  ``F.cross_entropy`` takes them as they are.
- :class:`AugmentLoader` wraps a ``DeviceLoader``: un-normalise, random ops, normalise, mix.
- :func:`tta_logits`: test-time augmentation, the logits averaged over mirrored and shifted copies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "OPS",
    "AugmentLoader",
    "ErasingLoader",
    "apply_op",
    "cutmix",
    "mixup",
    "one_hot",
    "random_ops",
    "translate",
    "tta_logits",
]

# name -> what magnitude 1 means; magnitudes are in [0, 1] (TrivialAugment's full range), with a random sign
# where the op has two directions.
OPS = (
    "identity",
    "brightness",  # multiply by 1 + 0.9 m
    "contrast",  # blend with the image's mean grey level, factor 1 + 0.9 m
    "color",  # blend with the grey image, factor 1 + 0.9 m
    "sharpness",  # blend with a 3x3 smoothed copy, factor 1 + 0.9 m
    "posterize",  # keep 8 - round(4 m) bits
    "solarize",  # invert the pixels above 1 - m
    "autocontrast",  # stretch each channel to [0, 1] (magnitude ignored)
    "rotate",  # rotate by 30 m degrees about the centre
    "shear_x",  # shear by 0.3 m
    "shear_y",
    "translate_x",  # shift by m / 3 of the width
    "translate_y",
)
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_SIGNED = ("brightness", "contrast", "color", "sharpness", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def _grey(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luminance (ITU-R 601 weights, as torchvision)."""
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True) if x.shape[1] == 3 else x.mean(1, keepdim=True)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """``other + factor * (x - other)`` per image (factor (B,)), clamped to [0, 1]."""
    return (other + factor.view(-1, 1, 1, 1) * (x - other)).clamp(0, 1)


def _affine(x: Tensor, name: str, m: Tensor) -> Tensor:
    """(2, 3) affine matrices (B, 2, 3) in ``affine_grid``'s normalised coordinates for a geometric op."""
    B = len(m)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    if name == "rotate":
        a = m * math.radians(30)
        theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
        theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
    elif name == "shear_x":
        theta[:, 0, 1] = 0.3 * m
    elif name == "shear_y":
        theta[:, 1, 0] = 0.3 * m
    elif name == "translate_x":
        theta[:, 0, 2] = -2 * m / 3  # the output at x samples the input at x - shift: the image moves right
    elif name == "translate_y":
        theta[:, 1, 2] = -2 * m / 3
    return theta


def _colour(x: Tensor, name: str, m: Tensor) -> Tensor:
    """The colour op ``name`` at per-image magnitudes ``m`` (B,) on images in [0, 1]."""
    if name == "identity":
        return x
    if name == "brightness":
        return _blend(x, torch.zeros_like(x), 1 + 0.9 * m)
    if name == "contrast":
        return _blend(x, _grey(x).mean((1, 2, 3), keepdim=True).expand_as(x), 1 + 0.9 * m)
    if name == "color":
        return _blend(x, _grey(x).expand_as(x), 1 + 0.9 * m)
    if name == "sharpness":
        kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device, dtype=x.dtype) / 13
        C = x.shape[1]
        smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(C, 1, 3, 3), groups=C)
        return _blend(x, smooth, 1 + 0.9 * m)
    if name == "posterize":
        step = (2.0 ** (4 * m).round()).view(-1, 1, 1, 1)  # 2 ** (bits dropped)
        return torch.floor((x * 255).round() / step) * step / 255  # on the 8-bit grid of the original pixels
    if name == "solarize":
        return torch.where(x >= (1 - m).view(-1, 1, 1, 1), 1 - x, x)
    if name == "autocontrast":
        lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)
    raise ValueError(f"unknown op {name!r}; choose from {OPS}")


def apply_op(x: Tensor, name: str, magnitude: Tensor | float) -> Tensor:
    """Apply one op to every image of (B, C, H, W) ``x`` in [0, 1] at ``magnitude`` (a number or (B,))."""
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images (B, C, H, W) in [0, 1], got shape {tuple(x.shape)}")
    m = torch.as_tensor(magnitude, device=x.device, dtype=x.dtype).expand(len(x))  # (B,)
    if name in _GEOMETRIC:
        grid = F.affine_grid(_affine(x, name, m), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _colour(x, name, m)


def random_ops(
    x: Tensor,
    generator: torch.Generator,
    ops: Sequence[str] = OPS,
    num_ops: int = 1,
    magnitude: float | None = None,
) -> Tensor:
    """Random ops per image: ``num_ops`` ops drawn uniformly from ``ops`` for each image of (B, C, H, W) ``x``.

    ``magnitude=None`` draws each strength uniformly from [0, 1] (TrivialAugment with ``num_ops=1``);
    a number fixes it (RandAugment). Two-directional ops get a random sign.
    """
    unknown = [name for name in ops if name not in OPS]
    if unknown or not ops:
        raise ValueError(f"unknown ops {unknown}; choose a non-empty subset of {OPS}")
    if magnitude is not None and not 0 <= magnitude <= 1:
        raise ValueError(f"magnitude must be in [0, 1] (or None for a random one per image), got {magnitude}")
    B = len(x)
    for _ in range(num_ops):
        choice = torch.randint(len(ops), (B,), generator=generator)
        m = torch.rand(B, generator=generator) if magnitude is None else torch.full((B,), float(magnitude))
        sign = torch.where(torch.rand(B, generator=generator) < 0.5, -1.0, 1.0)
        drawn = set(choice.tolist())  # on the CPU: which ops to compute, with no wait for the GPU
        choice, m, sign = choice.to(x.device), m.to(x.device, x.dtype), sign.to(x.device, x.dtype)
        out = x
        for i, name in enumerate(ops):
            if name == "identity" or i not in drawn:
                continue
            signed = m * sign if name in _SIGNED else m
            out = torch.where((choice == i).view(B, 1, 1, 1), apply_op(x, name, signed), out)
        x = out
    return x


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B,) class indices -> (B, num_classes) probabilities; (B, num_classes) probabilities pass through."""
    if labels.ndim == 2:
        return labels.to(dtype)
    return F.one_hot(labels, num_classes).to(dtype)


def mixup(x: Tensor, y: Tensor, lam: float, perm: Tensor) -> tuple[Tensor, Tensor]:
    """``lam * x + (1 - lam) * x[perm]``, and the same blend of the (B, num_classes) label probabilities ``y``."""
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def cutmix(x: Tensor, y: Tensor, box: tuple[int, int, int, int], perm: Tensor) -> tuple[Tensor, Tensor]:
    """Paste the rectangle ``box = (top, left, height, width)`` of ``x[perm]`` into ``x``; mix ``y`` by area."""
    top, left, h, w = box
    H, W = x.shape[-2:]
    out = x.clone()
    out[..., top : top + h, left : left + w] = x[perm][..., top : top + h, left : left + w]
    lam = 1 - h * w / (H * W)  # the share of each image that is still its own
    return out, lam * y + (1 - lam) * y[perm]


def _cutmix_box(lam: float, H: int, W: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A rectangle of about ``(1 - lam)`` of the image, centred uniformly at random and clipped to the image."""
    cut = math.sqrt(1 - lam)
    cy = int(torch.randint(0, H, (1,), generator=generator))
    cx = int(torch.randint(0, W, (1,), generator=generator))
    h, w = round(H * cut), round(W * cut)
    top, bottom = max(cy - h // 2, 0), min(cy - h // 2 + h, H)
    left, right = max(cx - w // 2, 0), min(cx - w // 2 + w, W)
    return top, left, bottom - top, right - left


class _Wrapper:
    """A loader that wraps another and draws from a random generator of its own: length, labels and a checkpointable
    random state (its own and the wrapped loader's) are the wrapped loader's plus this generator."""

    def __init__(self, loader, seed: int) -> None:
        self.loader = loader
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def labels(self) -> Tensor:
        """The wrapped loader's labels (one per training image)."""
        return self.loader.labels

    def state_dict(self) -> dict:
        """The random state of the next epoch (this loader's and the wrapped one's), for a checkpoint."""
        inner = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        return {"generator": self.generator.get_state(), "loader": inner}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict``."""
        self.generator.set_state(state["generator"])
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])


class AugmentLoader(_Wrapper):
    """Wrap a ``DeviceLoader``: random image ops, then mixup or cutmix, on the device; yields soft labels.

    Each batch is un-normalised with the loader's ``mean``/``std``, passed through :func:`random_ops`
    (if ``ops``), normalised again, and then, with probability ``mix_prob``, mixed: cutmix or mixup
    (chosen with equal odds when both alphas are positive), with ``lam ~ Beta(alpha, alpha)`` and a random
    pairing of the batch. Labels come out as (B, num_classes) probabilities that sum to 1.
    """

    def __init__(
        self,
        loader,
        num_classes: int = 10,
        ops: Sequence[str] = OPS,
        num_ops: int = 1,
        magnitude: float | None = None,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        mix_prob: float = 1.0,
        seed: int = 0,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= mix_prob <= 1:
            raise ValueError(
                f"alphas must be >= 0 (0 = off) and mix_prob in [0, 1]; got mixup_alpha={mixup_alpha}, "
                f"cutmix_alpha={cutmix_alpha}, mix_prob={mix_prob}"
            )
        super().__init__(loader, seed)
        self.num_classes = num_classes
        self.ops, self.num_ops, self.magnitude = tuple(ops), num_ops, magnitude
        self.mixup_alpha, self.cutmix_alpha, self.mix_prob = mixup_alpha, cutmix_alpha, mix_prob

    def _beta(self, alpha: float) -> float:
        """A draw from Beta(alpha, alpha), seeded from this loader's generator (torch's Beta takes no generator)."""
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        return float(np.random.default_rng(seed).beta(alpha, alpha))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            if self.ops and self.num_ops > 0:
                mean, std = self.loader.mean, self.loader.std
                x = random_ops((x * std + mean).clamp(0, 1), self.generator, self.ops, self.num_ops, self.magnitude)
                x = (x - mean) / std
            y = one_hot(y, self.num_classes)
            yield self.mix(x, y)

    def mix(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mixup or cutmix one normalised batch with (B, num_classes) labels, as the loader's settings say."""
        alphas = [a for a in (self.mixup_alpha, self.cutmix_alpha) if a > 0]
        if not alphas or float(torch.rand(1, generator=self.generator)) >= self.mix_prob:
            return x, y
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha == 0 or float(torch.rand(1, generator=self.generator)) < 0.5
        )
        perm = torch.randperm(len(x), generator=self.generator).to(x.device)
        if use_cutmix:
            lam = self._beta(self.cutmix_alpha)
            return cutmix(x, y, _cutmix_box(lam, *x.shape[-2:], self.generator), perm)
        return mixup(x, y, self._beta(self.mixup_alpha), perm)


class ErasingLoader(_Wrapper):
    """Wrap a loader and erase one random rectangle (to 0, the mean after normalisation) in a fraction ``p`` of images.

    Random erasing (Zhong et al., 2020) keeps the label valid, so the training loop needs no change.
    The rectangle covers 2% to 25% of the image, with aspect ratio between 0.3 and 3.3.
    """

    def __init__(self, loader, p: float = 0.25, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p is a probability in [0, 1], got {p}")
        super().__init__(loader, seed)
        self.p = p

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            yield self.erase(x), y

    def erase(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> the same batch with one rectangle zeroed in about a fraction p of the images."""
        B, _, H, W = x.shape
        g = self.generator
        area = (0.02 + 0.23 * torch.rand(B, generator=g)) * H * W
        ratio = torch.exp(torch.empty(B).uniform_(-1.2, 1.2, generator=g))  # log-uniform in [0.3, 3.3]
        h = (area * ratio).sqrt().round().clamp(1, H).long()
        w = (area / ratio).sqrt().round().clamp(1, W).long()
        top = (torch.rand(B, generator=g) * (H - h + 1)).long()
        left = (torch.rand(B, generator=g) * (W - w + 1)).long()
        on = torch.rand(B, generator=g) < self.p
        rows = torch.arange(H).view(1, H, 1)
        cols = torch.arange(W).view(1, 1, W)
        inside_rows = (rows >= top.view(B, 1, 1)) & (rows < (top + h).view(B, 1, 1))  # (B, H, 1)
        inside_cols = (cols >= left.view(B, 1, 1)) & (cols < (left + w).view(B, 1, 1))  # (B, 1, W)
        box = inside_rows & inside_cols & on.view(B, 1, 1)  # (B, H, W)
        return x.masked_fill(box.to(x.device).unsqueeze(1), 0.0)


def translate(x: Tensor, dy: int, dx: int) -> Tensor:
    """(B, C, H, W) images moved ``dy`` pixels down and ``dx`` right, the uncovered border filled by reflection."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return x
    H, W = x.shape[-2:]
    padded = F.pad(x, (p, p, p, p), mode="reflect")  # (B, C, H + 2p, W + 2p)
    return padded[..., p - dy : p - dy + H, p - dx : p - dx + W]


def tta_logits(model: torch.nn.Module, x: Tensor, flip: bool = True, translate_by: int = 0) -> Tensor:
    """Test-time augmentation: the model's float logits averaged over views of the (B, C, H, W) batch ``x``.

    The views are the images and (``flip``) their mirrors; with ``translate_by`` > 0 also copies moved
    diagonally by that many pixels both ways (reflect-padded), as airbench does: the unshifted views weigh
    1/2, each shifted direction 1/4.
    """

    def views(images: Tensor) -> Tensor:
        logits = model(images).float()
        return 0.5 * (logits + model(images.flip(3)).float()) if flip else logits

    if translate_by <= 0:
        return views(x)
    t = translate_by
    return 0.5 * views(x) + 0.25 * views(translate(x, t, t)) + 0.25 * views(translate(x, -t, -t))
