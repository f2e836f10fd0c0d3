"""Optimisers for ``fit``: which parameters get weight decay (and at which learning rate), the optimiser a
``TrainConfig`` asks for (SGD, AdamW, or Muon for the hidden layers with SGD or AdamW for the rest), and an
exponential moving average of the weights with airbench's "lookahead" reset (a ``fit`` callback)."""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import TYPE_CHECKING

import torch
from torch import nn

from companion.callbacks import Callback

if TYPE_CHECKING:
    from companion.train import FitState, TrainConfig

__all__ = ["EMA", "Muon", "hidden_weights", "make_optimizer", "orthogonalize", "param_groups"]


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


def hidden_weights(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weights of ``model``'s hidden layers, the ones Muon orthogonalises: every ``nn.Linear`` and
    ``nn.Conv2d`` weight except the output layer's (``head``) and a ViT's patch embedding (``patch_embed``).

    Muon's rule (Jordan et al., 2024): the input and output layers, embeddings and vectors take the other
    optimiser's steps. (FastCNN's 2x2 stem counts as hidden; the recipes whiten and freeze it.)
    """
    return [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and m.weight.requires_grad
        and name.split(".")[0] not in {"head", "patch_embed"}
    ]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser ``config`` asks for: SGD with Nesterov momentum, AdamW, or Muon, over ``param_groups``.

    With ``config.decay_embeddings=False`` the parameters the model names in ``no_weight_decay()`` (timm's
    convention, e.g. the ViT's class token and position embedding) get no weight decay; ``config.vector_lr_scale``
    multiplies the learning rate of biases and norm parameters. ``"muon"`` and ``"muon-adamw"`` move the hidden
    layers' weights (``hidden_weights``) into a group of their own with ``config.muon_lr`` and
    ``config.muon_momentum``, no weight decay, orthogonalised steps; the rest take ``"sgd"``'s steps with
    ``"muon"`` (as in airbench94_muon) and ``"adamw"``'s with ``"muon-adamw"`` (as in Muon's transformer recipes).
    """
    no_decay = () if config.decay_embeddings else tuple(getattr(model, "no_weight_decay", lambda: ())())
    vector_lr = config.lr * config.vector_lr_scale if config.vector_lr_scale != 1.0 else None
    groups = param_groups(model, config.weight_decay, no_decay, vector_lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    if config.optimizer in {"muon", "muon-adamw"}:
        hidden = {id(p) for p in hidden_weights(model)}
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in hidden]  # group 0 keeps config.lr
        groups.append(
            {
                "params": [p for p in model.parameters() if id(p) in hidden],  # in the model's order
                "lr": config.muon_lr,
                "momentum": config.muon_momentum,
                "orthogonalize": True,
                "adamw": False,
                "steps": config.muon_steps,
            }
        )
        adamw = config.optimizer == "muon-adamw"
        return Muon(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, adamw=adamw)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))


def orthogonalize(update: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Roughly ``U @ V.T`` for ``update = U S V.T``: most singular values moved into about [0.5, 1.5].

    ``update`` is a matrix (m, n) or a stack of them (..., m, n). Muon's quintic Newton-Schulz iteration (Jordan et
    al., 2024), in bfloat16: each step maps every singular value s to a s + b s^3 + c s^5, coefficients chosen to
    pull small values up fast rather than to converge.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.bfloat16()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # the largest singular value <= 1
    wide = x.shape[-2] <= x.shape[-1]
    x = x if wide else x.mT  # (rows <= columns): the Gram matrix x @ x.T is the smaller one
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose step for a weight is orthogonalised: Muon (Jordan et al., 2024).

    In a group with ``orthogonalize=True`` (hidden layers' weights; a convolution kernel viewed as
    (out, in * k * k)) the Nesterov momentum of the gradient goes through ``orthogonalize`` before the step, so
    every direction of the update moves by about ``lr`` (times sqrt(out / in) for a tall matrix), however small its
    gradient (``steps`` Newton-Schulz steps). The other groups take plain Nesterov SGD steps with ``weight_decay``
    (the same step as ``torch.optim.SGD(..., nesterov=True)``), or with ``adamw=True`` AdamW's steps (the same as
    ``torch.optim.AdamW(..., betas=(0.9, 0.999))``).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        orthogonalize: bool = False,
        adamw: bool = False,
        steps: int = 3,
    ) -> None:
        if not lr > 0 or not 0 <= momentum < 1 or not weight_decay >= 0:
            raise ValueError(
                f"Muon needs lr > 0, momentum in [0, 1), weight_decay >= 0; got {lr}, {momentum}, {weight_decay}"
            )
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "orthogonalize": orthogonalize}
        super().__init__(params, {**defaults, "adamw": adamw, "steps": steps})

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: ANN001 (torch's signature)
        """One step for every parameter with a gradient."""
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            momentum, orthogonal = group["momentum"], group["orthogonalize"]
            updates: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # matrix shape -> (weight, step)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["adamw"] and not orthogonal:
                    self._adamw_step(p, group)
                    continue
                grad = p.grad
                if group["weight_decay"] and not orthogonal:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()  # as torch.optim.SGD: the first buffer is the gradient
                else:
                    state["momentum_buffer"].mul_(momentum).add_(grad)
                update = grad.add(state["momentum_buffer"], alpha=momentum)  # Nesterov
                if orthogonal:  # later, all matrices of one shape at once: (out, in*k*k)
                    updates.setdefault(update.flatten(1).shape, []).append((p, update.flatten(1)))
                else:
                    p.add_(update, alpha=-group["lr"])
            for (rows, cols), pairs in updates.items():
                steps = orthogonalize(torch.stack([u for _, u in pairs]), group["steps"])
                scale = max(1.0, rows / cols) ** 0.5  # a tall matrix's rows are not unit length: Muon scales it up
                for (p, _), step in zip(pairs, steps):
                    p.add_(step.view_as(p), alpha=-group["lr"] * scale)

    def _adamw_step(self, p: torch.Tensor, group: dict) -> None:
        """AdamW's step for one parameter (betas 0.9, 0.999; eps 1e-8; decoupled weight decay)."""
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        t, lr = state["step"], group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 0.1)  # m <- 0.9 m + 0.1 g
        state["exp_avg_sq"].mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)  # v <- 0.999 v + 0.001 g^2
        denom = (state["exp_avg_sq"].sqrt() / (1 - 0.999**t) ** 0.5).add_(1e-8)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - 0.9**t))


class EMA(Callback):
    """An exponential moving average of a model's weights: ``avg <- decay * avg + (1 - decay) * weights``.

    ``update(model)`` after each optimiser step averages every ``every``-th call; with ``lookahead`` the
    model's weights are then set to the average (the "lookahead" of Zhang et al., 2019, in airbench's form:
    the fast weights restart from the slow ones). Floating-point buffers (BatchNorm statistics) are averaged
    too, others (step counters) copied. ``module`` is the averaged model, in eval mode, for evaluation;
    ``copy_to(model)`` puts the average into the model.

    As a ``fit`` callback (``fit(..., callbacks=[EMA(model, 0.999)])``) it updates after every step, is what
    ``fit`` evaluates after each epoch, and is copied into the model at the end: the average is the result.
    There, ``ramp > 0`` grows the decay with training, ``decay * progress ** ramp`` (progress: the fraction of
    all steps done), so early on the average follows the weights and a lookahead does not slow the first
    epochs (airbench's schedule, with ramp 3).
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.99, every: int = 1, lookahead: bool = False, ramp: float = 0.0
    ) -> None:
        if not 0.0 <= decay < 1.0 or every < 1 or not ramp >= 0:
            raise ValueError(f"need decay in [0, 1), every >= 1, ramp >= 0; got {decay=}, {every=}, {ramp=}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.every, self.lookahead, self.ramp = decay, every, lookahead, ramp
        self.calls = 0

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """Count one optimiser step; every ``every`` steps, average the weights (and with lookahead, reset them).

        ``decay`` replaces ``self.decay`` for this step (``fit`` passes the ramped one)."""
        self.calls += 1
        if self.calls % self.every:
            return
        decay = self.decay if decay is None else decay
        live, avg = model.state_dict(), self.module.state_dict()
        floats = [k for k, v in avg.items() if v.is_floating_point()]
        torch._foreach_lerp_([avg[k] for k in floats], [live[k] for k in floats], 1.0 - decay)
        for k, v in avg.items():
            if not v.is_floating_point():
                v.copy_(live[k])
        if self.lookahead:
            torch._foreach_copy_([live[k] for k in floats], [avg[k] for k in floats])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Set ``model``'s weights and buffers to the average."""
        model.load_state_dict(self.module.state_dict())

    def on_fit_start(self, state: FitState) -> None:
        """Evaluate the average after each epoch."""
        state.eval_model = self.module

    def on_step_end(self, state: FitState) -> None:
        """Average after every optimiser step (with the decay ramped by training progress if ``ramp``)."""
        if not self.ramp:
            return self.update(state.model)
        steps = len(state.train_data)  # type: ignore[arg-type]
        progress = (state.epoch * steps + state.step) / (state.config.epochs * steps)
        self.update(state.model, self.decay * progress**self.ramp)

    def on_fit_end(self, state: FitState) -> None:
        """The averaged weights are the result."""
        self.copy_to(state.model)

    def state_dict(self) -> dict:
        """The average and the step count, for a checkpoint."""
        return {"module": self.module.state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        """Continue the average saved in a checkpoint."""
        self.module.load_state_dict(state["module"])
        self.calls = state["calls"]
