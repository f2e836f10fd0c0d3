"""Optimiser helpers for the training recipes: which parameters get weight decay."""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

__all__ = ["param_groups"]


def param_groups(model: nn.Module, weight_decay: float, no_decay: Collection[str] = ()) -> list[dict]:
    """Two optimiser groups: weight matrices and kernels with ``weight_decay``, everything else without.

    A trainable parameter is decayed if it has two or more dimensions and neither its full name nor its
    last name component (e.g. ``"cls_token"``, ``"pos_embedding"``) is in ``no_decay``; biases, norm
    scales and other vectors never are. Decaying a class token or position embedding pulls them towards
    zero for no gain, which hurts a small-data ViT (Beyer et al., 2022; timm's ``no_weight_decay``).
    """
    names = {name for name, _ in model.named_parameters()}
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    unknown = [n for n in no_decay if n not in names and n not in leaves]
    if unknown:
        raise ValueError(f"no_decay names {unknown} match no parameter of {type(model).__name__}")
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skipped = name in no_decay or name.rsplit(".", 1)[-1] in no_decay
        (decay if p.ndim >= 2 and not skipped else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
