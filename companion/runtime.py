"""Run-time settings shared by every chapter: quick mode, the device, seeding, and the line that says which."""

from __future__ import annotations

import functools
import os
import random

import numpy as np
import torch

__all__ = [
    "autocast_dtype",
    "cpu_bf16",
    "device",
    "env_flag",
    "mode_line",
    "precision_name",
    "quick",
    "seed_everything",
]

_YES, _NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name: str, default: bool = False) -> bool:
    """Read a yes/no environment variable: 1/true/yes/on or 0/false/no/off (any case); unset or empty: ``default``.

    Any other value (``2``, ``y``, a typo) is refused with a ValueError naming the variable and the value, so a
    mistyped flag never silently means the opposite.
    """
    raw = os.environ.get(name)
    value = "" if raw is None else raw.strip().lower()
    if value == "":
        return default
    if value in _YES:
        return True
    if value in _NO:
        return False
    raise ValueError(
        f"{name}={raw!r} is not a yes/no value: use {', '.join(_YES)} for yes, {', '.join(_NO)} for no "
        f"(any case), or leave it empty or unset for {'yes' if default else 'no'}"
    )


def quick() -> bool:
    """Return True in quick mode (environment variable ``COMPANION_QUICK``, read by ``env_flag``; default no)."""
    return env_flag("COMPANION_QUICK", default=False)


def device() -> torch.device:
    """Pick the best available device: CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def cpu_bf16() -> str | None:
    """The CPU feature that makes bfloat16 matrix arithmetic native here (``amx_bf16``, ``avx512_bf16`` or Arm's
    ``bf16``, read from /proc/cpuinfo on Linux), or None: elsewhere bfloat16 is emulated and slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:  # not Linux: no way to tell without extra packages, so assume none
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    return next((flag for flag in ("amx_bf16", "avx512_bf16", "bf16") if flag in words), None)


def autocast_dtype(dev: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bfloat16 where ``precision`` asks for it, else None (float32): 'bf16' anywhere, 'fp32' nowhere, 'auto' what
    the environment variable ``COMPANION_PRECISION`` says (bf16, fp32 or auto), by default on CUDA and on CPUs
    with native bfloat16 (``cpu_bf16``)."""
    if precision == "auto":
        precision = os.environ.get("COMPANION_PRECISION", "").strip().lower() or "auto"
        if precision not in {"auto", "bf16", "fp32"}:
            raise ValueError(
                f"COMPANION_PRECISION={os.environ['COMPANION_PRECISION']!r} is not a precision: use bf16, fp32 or auto"
            )
    if precision == "bf16" or (precision == "auto" and (dev.type == "cuda" or (dev.type == "cpu" and cpu_bf16()))):
        return torch.bfloat16
    return None


def precision_name(dev: torch.device, precision: str = "auto") -> str:
    """What ``fit`` computes in on ``dev`` for ``precision``: 'bfloat16 autocast' or 'float32'."""
    return "float32" if autocast_dtype(dev, precision) is None else "bfloat16 autocast"


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch (all devices) so a rerun gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA and MPS generators


def mode_line() -> str:
    """One line saying how this run was made: the mode, the device, the torch version and its CPU threads."""
    if quick():
        mode = "quick mode (COMPANION_QUICK=1), small subsets and few epochs"
    else:
        mode = "full mode, the whole data set and the full training budgets"
    threads = f"{torch.get_num_threads()} CPU thread{'' if torch.get_num_threads() == 1 else 's'}"
    dev = device()
    precision = precision_name(dev)
    if dev.type == "cpu" and os.environ.get("COMPANION_PRECISION", "auto").strip().lower() in {"", "auto"}:
        precision += f" (the CPU has {cpu_bf16()})" if cpu_bf16() else " (this CPU has no native bfloat16)"
    return f"This run: {mode} | device {dev} | {precision} | torch {torch.__version__}, {threads}"
