"""Optimiser helpers for the training recipes: which parameters get weight decay (and at which learning rate),
and an exponential moving average of the weights with airbench's "lookahead" reset."""

from __future__ import annotations

import copy
from collections.abc import Collection

import torch
from torch import nn

__all__ = ["EMA", "param_groups"]


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: Collection[str] = (), vector_lr: float | None = None
) -> list[dict]:
    """Optimiser groups: weight matrices and kernels with ``weight_decay``; vectors, and matrices named in
    ``no_decay``, without.

    A trainable parameter is decayed if it has two or more dimensions and neither its full name nor its
    last name component (e.g. ``"cls_token"``, ``"pos_embedding"``) is in ``no_decay``; biases and norm
    parameters (vectors) never are. Decaying a class token or position embedding pulls them towards zero
    for no gain, which hurts a small-data ViT (Beyer et al., 2022; timm's ``no_weight_decay``).
    ``vector_lr`` gives the vectors their own learning rate (airbench trains the BatchNorm biases much
    faster than the kernels). Groups: ``[matrices, vectors]``, plus ``[named matrices]`` if ``no_decay``.
    """
    names = {name for name, _ in model.named_parameters()}
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    unknown = [n for n in no_decay if n not in names and n not in leaves]
    if unknown:
        raise ValueError(f"no_decay names {unknown} match no parameter of {type(model).__name__}")
    decay, vectors, skipped = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            vectors.append(p)
        elif name in no_decay or name.rsplit(".", 1)[-1] in no_decay:
            skipped.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    if vector_lr is not None:
        groups[1]["lr"] = vector_lr
    if no_decay:
        groups.append({"params": skipped, "weight_decay": 0.0})
    return groups


class EMA:
    """An exponential moving average of a model's weights: ``avg <- decay * avg + (1 - decay) * weights``.

    ``update(model)`` after each optimiser step averages every ``every``-th call; with ``lookahead`` the
    model's weights are then set to the average (the "lookahead" of Zhang et al., 2019, in airbench's form:
    the fast weights restart from the slow ones). Floating-point buffers (BatchNorm statistics) are averaged
    too, others (step counters) copied. ``module`` is the averaged model, in eval mode, for evaluation;
    ``copy_to(model)`` puts the average into the model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99, every: int = 1, lookahead: bool = False) -> None:
        if not 0.0 <= decay < 1.0 or every < 1:
            raise ValueError(f"decay must be in [0, 1) and every >= 1, got decay={decay}, every={every}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.every, self.lookahead = decay, every, lookahead
        self.calls = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Count one optimiser step; every ``every`` steps, average the weights (and with lookahead, reset them)."""
        self.calls += 1
        if self.calls % self.every:
            return
        live, avg = model.state_dict(), self.module.state_dict()
        floats = [k for k, v in avg.items() if v.is_floating_point()]
        torch._foreach_lerp_([avg[k] for k in floats], [live[k] for k in floats], 1.0 - self.decay)
        for k, v in avg.items():
            if not v.is_floating_point():
                v.copy_(live[k])
        if self.lookahead:
            torch._foreach_copy_([live[k] for k in floats], [avg[k] for k in floats])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Set ``model``'s weights and buffers to the average."""
        model.load_state_dict(self.module.state_dict())
