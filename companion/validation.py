"""Input validation shared across the package, so that every model says the same clear thing about a wrong input."""

from __future__ import annotations

import torch

__all__ = ["validate_divides", "validate_images"]


def validate_divides(total: int, part: int, total_name: str, part_name: str, why: str) -> None:
    """Raise a clear ValueError unless ``part`` is a positive divisor of ``total``, listing the divisors to choose."""
    if part < 1 or total % part != 0:
        divisors = [d for d in range(1, total + 1) if total % d == 0]
        raise ValueError(
            f"{part_name}={part} does not divide {total_name}={total}: {why}; choose {part_name} from {divisors}"
        )


def validate_images(
    x: torch.Tensor,
    name: str,
    channels: int | None = None,
    size: int | None = None,
    min_size: int | None = None,
    hint: str = "",
) -> None:
    """Raise a clear ValueError unless ``x`` is a (B, channels, size, size) batch with sides of at least ``min_size``.

    ``channels`` or ``size`` None: any. ``hint`` ends the message when only the image size is wrong.
    """
    wrong_channels = x.ndim != 4 or (channels is not None and x.shape[1] != channels)
    if wrong_channels or (size is not None and tuple(x.shape[2:]) != (size, size)):
        c = "C" if channels is None else channels
        want = f"(B, {c}, H, W)" if size is None else f"(B, {c}, {size}, {size})"
        unsqueeze = "; add a batch dimension with x.unsqueeze(0)" if x.ndim == 3 else ""
        raise ValueError(
            f"{name} expects images of shape {want}, got {tuple(x.shape)}{unsqueeze}{'' if wrong_channels else hint}"
        )
    if min_size is not None and min(x.shape[2:]) < min_size:
        raise ValueError(f"{name} needs images of at least {min_size}x{min_size}, got {tuple(x.shape[2:])}")
