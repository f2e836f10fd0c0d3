"""Companion package of *Attention for vision, from convolution to language models*.

The submodules are imported on demand, e.g. ``from companion.conv import conv2d``.
"""

from companion.runtime import device, mode_line, quick, seed_everything

__all__ = ["device", "mode_line", "quick", "seed_everything"]
__version__ = "0.1.0"
