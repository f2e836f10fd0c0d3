"""One training loop for every chapter: ``fit``, ``evaluate`` and ``predict``."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from companion import distributed
from companion.augment import tta_logits
from companion.optim import EMA, param_groups
from companion.runtime import device, seed_everything

__all__ = ["History", "device", "evaluate", "fit", "predict", "seed_everything"]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class History:
    """Per-epoch figures of a ``fit`` run (accuracies in [0, 1], seconds of training per epoch)."""

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    device: str = ""

    @property
    def total_seconds(self) -> float:
        """Training time of all epochs together (evaluation excluded)."""
        return sum(self.seconds)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _autocast(dev: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when asked for; full precision everywhere else."""
    if amp and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _schedule(kind: str, total_steps: int, warmup: float):
    """Learning-rate multiplier per step: linear warm-up, then linear ('onecycle') or cosine decay to 0."""
    if kind not in {"onecycle", "cosine", "constant"}:
        raise ValueError(f"schedule must be 'onecycle', 'cosine' or 'constant', got {kind!r}")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup is a fraction of all steps in [0, 1), got {warmup}")
    warm = max(1, round(warmup * total_steps)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        return 1 - progress if kind == "onecycle" else 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _optimizer(
    model: nn.Module,
    kind: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    no_decay: Collection[str] = (),
    vector_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; weight decay on weight matrices and kernels only (see ``param_groups``)."""
    vector_lr = lr * vector_lr_scale if vector_lr_scale != 1.0 else None
    groups = param_groups(model, weight_decay, no_decay, vector_lr)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {kind!r}")


@torch.inference_mode()
def predict(
    model: nn.Module, data: Batches, tta_flip: bool = False, amp: bool = True, tta_translate: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole data set, on the CPU; ``tta_flip`` averages with the mirrored images.

    ``tta_translate`` > 0 also averages over copies shifted by that many pixels (``companion.augment.tta_logits``).

    The batches are moved to the model's device; results stay there until one copy to the CPU at the end.
    """
    was_training = model.training
    model.eval()
    dev = _model_device(model)
    all_logits, all_labels = [], []
    for x, y in data:
        x = x.to(dev)
        with _autocast(dev, amp):
            logits = tta_logits(model, x, flip=tta_flip, translate_by=tta_translate)  # (B, C) float
        all_logits.append(logits)
        all_labels.append(y)
    model.train(was_training)
    if not all_logits:
        raise ValueError("the data yields no batches (an empty data set?); nothing to predict or evaluate")
    return torch.cat(all_logits).cpu(), torch.cat([y.to(dev) for y in all_labels]).cpu()


def evaluate(
    model: nn.Module, data: Batches, tta_flip: bool = False, amp: bool = True, tta_translate: int = 0
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (in [0, 1]) of ``model`` on ``data`` (test-time augmentation as ``predict``)."""
    logits, labels = predict(model, data, tta_flip=tta_flip, amp=amp, tta_translate=tta_translate)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def _diverged(epoch: int, step: int, lr: float) -> FloatingPointError:
    """The error ``fit`` raises when the training loss stops being a finite number."""
    return FloatingPointError(
        f"training diverged: the loss became NaN or infinite in epoch {epoch}, step {step} (lr={lr:g}). "
        "Usual causes: a learning rate too high for this model and batch size (try a 3-10x smaller lr, or "
        "gradient clipping with grad_clip=1.0), or bad inputs (NaN or infinite pixel values, wrong labels); "
        "check the data with torch.isfinite(images).all()."
    )


def fit(
    model: nn.Module,
    train_data: Batches,
    test_data: Batches | None = None,
    epochs: int = 10,
    *,
    optimizer: str = "sgd",
    lr: float | None = None,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    schedule: str = "onecycle",
    warmup: float = 0.2,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    grad_clip: float | None = None,
    amp: bool = True,
    tta_flip: bool = False,
    progress: bool = True,
    sync_batch_norm: bool = False,
    no_decay: Collection[str] = (),
    vector_lr_scale: float = 1.0,
    ema_decay: float | None = None,
    lookahead_every: int = 0,
    tta_translate: int = 0,
) -> History:
    """Train ``model`` on ``train_data`` for ``epochs`` epochs and return its ``History``.

    SGD with Nesterov momentum (default lr 0.05) or AdamW (default lr 1e-3); the learning rate warms
    up linearly over the first ``warmup`` fraction of steps, then decays to zero ('onecycle': linearly,
    'cosine': along a half cosine). Mixed precision (bfloat16) is used on CUDA only, when ``amp``.
    The model is moved to the device of the data's first batch. A loss that stops being finite (NaN or
    infinite) raises ``FloatingPointError`` at the end of that epoch, naming the first bad step.

    Batches are ``(x, y)``: ``x`` a tensor, or a tuple of tensors passed as ``model(*x)``; ``y`` class labels
    (B,) for logits (B, C), or targets (B, ...) for logits (B, ..., C) such as next tokens. Targets equal to
    ``ignore_index`` (e.g. padding) count in neither the loss nor the accuracy. Floating-point ``y`` of shape
    (B, C) are class probabilities (soft labels, e.g. from mixup or cutmix); accuracy then counts their argmax.

    Options of the GPU recipes, all off by default: ``no_decay`` names parameters kept out of weight decay and
    ``vector_lr_scale`` multiplies the learning rate of biases and norm parameters (``companion.optim.param_groups``);
    ``ema_decay`` keeps an exponential moving average of the weights (``companion.optim.EMA``), evaluates it
    after each epoch and leaves it in ``model`` at the end; with ``lookahead_every`` = k > 0 the average is
    taken every k steps and the weights restart from it. ``tta_translate`` is passed to ``evaluate``.

    Under ``torchrun`` the model is wrapped in ``DistributedDataParallel`` (``sync_batch_norm``: with
    ``SyncBatchNorm``, CUDA only), the training figures are summed over all processes, every rank
    evaluates on the whole test set with rank 0's batch-norm statistics, and only rank 0 shows progress.
    ``lr`` is used as given (``companion.distributed.scale_lr`` scales it for the global batch).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    steps_per_epoch = len(train_data)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise ValueError("train_data yields no batches (empty data set, or batch_size larger than it with drop_last)")
    if test_data is not None and hasattr(test_data, "__len__") and len(test_data) == 0:
        raise ValueError("test_data yields no batches (an empty test set?); pass test_data=None to train without it")
    if lr is None:
        lr = 0.05 if optimizer == "sgd" else 1e-3
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    opt = _optimizer(model, optimizer, lr, weight_decay, momentum, no_decay, vector_lr_scale)
    ema = None  # the average of the weights, made with the model on its device
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(schedule, epochs * steps_per_epoch, warmup))

    history = History()
    bar = tqdm(total=epochs * steps_per_epoch, desc="training", disable=not progress or not distributed.is_main())
    net = model  # what the batches go through: the model, or its DistributedDataParallel wrapper
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        # Per-epoch sums, kept on the batches' device (made at the first batch): no host sync per step.
        loss_sum = correct = scored = first_bad = None
        for step, (x, y) in enumerate(train_data):
            if loss_sum is None:
                if epoch == 0:
                    model.to(y.device)
                    history.device = str(y.device)
                    net = distributed.wrap(model, sync_batch_norm)
                    if ema_decay is not None:
                        every = max(1, lookahead_every)
                        ema = EMA(getattr(model, "_orig_mod", model), ema_decay, every, lookahead_every > 0)
                loss_sum = torch.zeros((), device=y.device)
                correct = torch.zeros((), dtype=torch.long, device=y.device)
                scored = torch.zeros((), dtype=torch.long, device=y.device)  # targets that count: not ignore_index
                first_bad = torch.full((), -1, dtype=torch.long, device=y.device)  # first step with a bad loss
            with _autocast(y.device, amp):
                logits = net(*x) if isinstance(x, tuple) else net(x)  # (B, C) or (B, ..., C)
                if y.is_floating_point():  # soft labels (B, C): class probabilities
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
                else:
                    loss = F.cross_entropy(
                        logits.float().flatten(0, -2),
                        y.flatten(),
                        label_smoothing=label_smoothing,
                        ignore_index=ignore_index,
                    )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(getattr(model, "_orig_mod", model))
            if y.is_floating_point():
                y = y.argmax(-1)  # (B,): the class with the largest share counts for the accuracy
            keep = y != ignore_index  # (B, ...)
            n = keep.sum()
            loss_sum += loss.detach() * n
            correct += ((logits.argmax(-1) == y) & keep).sum()
            scored += n
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            bar.update(1)
        if loss_sum is None:
            raise ValueError(f"train_data yielded no batches in epoch {epoch + 1}")
        if loss_sum.device.type == "cuda":
            torch.cuda.synchronize()
        history.seconds.append(time.perf_counter() - start)
        # Sums over all processes (this one alone if only one); the host syncs once per epoch, not per step.
        totals = distributed.all_reduce(torch.stack([loss_sum.double(), correct.double(), scored.double()]))
        loss_total, correct_total, scored_total = totals.tolist()
        train_loss = loss_total / scored_total
        if not math.isfinite(train_loss):  # the same on every rank: all of them stop together
            bar.close()
            first = distributed.all_reduce(torch.where(first_bad < 0, steps_per_epoch, first_bad), "min")
            raise _diverged(epoch + 1, int(first.item()) + 1, lr)
        history.train_loss.append(train_loss)
        history.train_acc.append(correct_total / scored_total)
        history.lr.append(opt.param_groups[0]["lr"])
        postfix = {"epoch": epoch + 1, "loss": f"{history.train_loss[-1]:.3f}", "acc": f"{history.train_acc[-1]:.3f}"}
        distributed.sync_buffers(model)  # every rank now holds rank 0's model
        if test_data is not None:
            evaluated = ema.module if ema is not None else model
            test_loss, test_acc = evaluate(
                evaluated, test_data, tta_flip=tta_flip, amp=amp, tta_translate=tta_translate
            )
            history.test_loss.append(test_loss)
            history.test_acc.append(test_acc)
            postfix["test_acc"] = f"{test_acc:.3f}"
        bar.set_postfix(postfix)
    bar.close()
    if ema is not None:
        ema.copy_to(getattr(model, "_orig_mod", model))  # the averaged weights are the result
    return history
