"""Input validation shared across the package, so that every model says the same clear thing about a wrong input."""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["validate_divides", "validate_images", "validate_int", "validate_positive"]


def validate_int(value: object, name: str, minimum: int | None = 1) -> int:
    """Return ``value`` as an int, or raise a clear error unless it is a whole number (not a bool) >= ``minimum``.

    ``minimum=None`` checks the type only (the caller then says which range it needs).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a whole number (an int), got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def validate_positive(value: object, name: str, what: str = "") -> float:
    """Return ``value`` as a float, or raise a clear error unless it is a finite number > 0; ``what`` says why."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number{what}, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number{what}, got {value}")
    return float(value)


def validate_divides(total: int, part: int, total_name: str, part_name: str, why: str) -> None:
    """Raise a clear ValueError unless ``part`` is a positive divisor of ``total``, listing the divisors to choose."""
    validate_int(total, total_name), validate_int(part, part_name, minimum=None)
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
