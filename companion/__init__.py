"""Companion package of *Attention for vision, from convolution to language models*.

``import companion`` is light: it loads the runtime helpers only. The names a student uses most are available from
the package root and load their module on first use (``companion.fit`` is ``companion.train.fit``); every
submodule is an attribute too (``companion.train``, ``companion.viz``, ...), imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from companion.runtime import device, mode_line, quick, seed_everything

# name -> the module that defines it; loaded on first access (PEP 562), so `import companion` stays fast.
_EXPORTS = {
    "fit": "companion.train",
    "evaluate": "companion.train",
    "predict": "companion.train",
    "TrainConfig": "companion.train",
    "History": "companion.train",
    "load_cifar10": "companion.data",
    "CIFAR10_CLASSES": "companion.data",
    "count_parameters": "companion.models",
    "save_weights": "companion.models",
    "load_weights": "companion.models",
    "show_images": "companion.viz",
    "plot_history": "companion.viz",
    "show_table": "companion.viz",
    "show_source": "companion.viz",
}
_SUBMODULES = (
    "ablation",
    "attention",
    "augment",
    "bench",
    "callbacks",
    "checkpoint",
    "conv",
    "data",
    "diagrams",
    "distributed",
    "exercises",
    "files",
    "grading",
    "llm",
    "models",
    "optim",
    "recipes",
    "records",
    "runtime",
    "train",
    "validation",
    "viz",
    "vocab",
)

__all__ = ["device", "mode_line", "quick", "seed_everything", *_EXPORTS]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Load a root-level name or a submodule on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"companion.{name}")
    raise AttributeError(f"module 'companion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
