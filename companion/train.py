"""The training loop every chapter uses: ``TrainConfig``, ``fit``, ``evaluate`` and ``predict``.

``fit`` is the loop Chapter 1 writes by hand (forward, loss, backward, optimiser step) plus bookkeeping: a
learning-rate schedule, per-epoch figures and a progress bar, a clean stop at the end of a step on Ctrl-C or
SIGTERM, and hooks (``Callback``) for extras such as checkpoints or an average of the weights. Everything that is
decided once (device, optimiser, schedule, ``torch.compile``, the data-parallel wrapper) is set up before the loop.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from companion import distributed
from companion.augment import tta_logits
from companion.callbacks import Callback
from companion.checkpoint import restore
from companion.optim import make_optimizer
from companion.runtime import autocast_dtype, device, precision_name, seed_everything

__all__ = [
    "Callback",
    "FitState",
    "History",
    "TrainConfig",
    "TrainingInterrupted",
    "device",
    "evaluate",
    "fit",
    "hold_signals",
    "predict",
    "seed_everything",
]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimiser, learning-rate schedule, regularisation, epochs and precision, passed to ``fit`` whole.

    Every value is checked when the config is made; a wrong one raises a ``ValueError`` that says what is allowed.
    """

    epochs: int = 10
    optimizer: str = "sgd"  # "sgd" (Nesterov), "adamw"; "muon"/"muon-adamw": Muon, SGD/AdamW for the rest
    lr: float | None = None  # None: 0.05 for SGD (and Muon's SGD part), 1e-3 for AdamW (and Muon's AdamW part)
    momentum: float = 0.9  # SGD's momentum (Nesterov); 0: plain SGD
    weight_decay: float = 5e-4  # on weight matrices and kernels only (companion.optim.param_groups)
    schedule: str = "onecycle"  # warm-up, then linear ("onecycle") or half-cosine ("cosine") decay to 0, or "constant"
    warmup: float = 0.2  # fraction of all steps spent warming up, in [0, 1)
    label_smoothing: float = 0.0  # in [0, 1)
    grad_clip: float | None = None  # largest gradient norm; None: no clipping
    ignore_index: int = -100  # targets with this value (padding) count in neither the loss nor the accuracy
    precision: str = "auto"  # "auto": bfloat16 autocast on CUDA and native-bf16 CPUs (runtime.autocast_dtype)
    compile: bool = False  # torch.compile the model for training on CUDA (ignored on other devices)
    sync_batch_norm: bool = False  # under torchrun on GPUs: batch-norm statistics over the global batch
    vector_lr_scale: float = 1.0  # learning-rate multiplier for biases and norm parameters (airbench)
    muon_lr: float = 0.24  # with Muon: the hidden layers' step size (their updates are orthogonalised) ...
    muon_momentum: float = 0.6  # ... and their Nesterov momentum (airbench94_muon's values) ...
    muon_steps: int = 3  # ... and Newton-Schulz steps per update (airbench94_muon: 3; Muon for transformers: 5)
    decay_embeddings: bool = True  # False: no weight decay for what model.no_weight_decay() names (timm)
    progress: bool = True  # a progress bar (on rank 0 only under torchrun)

    def __post_init__(self) -> None:
        _check_config(self)
        if self.lr is None:  # the optimiser's usual starting point
            object.__setattr__(self, "lr", 1e-3 if self.optimizer in {"adamw", "muon-adamw"} else 0.05)
        for name in (
            "lr",
            "momentum",
            "weight_decay",
            "warmup",
            "label_smoothing",
            "vector_lr_scale",
            "muon_lr",
            "muon_momentum",
        ):
            object.__setattr__(self, name, float(getattr(self, name)))  # numpy floats become plain (JSON-able)
        if self.grad_clip is not None:
            object.__setattr__(self, "grad_clip", float(self.grad_clip))


def _check_config(c: TrainConfig) -> None:
    """Raise a ValueError naming the first setting of ``c`` that has no meaning, and what is allowed."""

    def real(x: object) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))

    problems = [
        (not isinstance(c.epochs, int) or isinstance(c.epochs, bool) or c.epochs < 1, "epochs", "a whole number >= 1"),
        (
            c.optimizer not in {"sgd", "adamw", "muon", "muon-adamw"},
            "optimizer",
            "'sgd', 'adamw', 'muon' or 'muon-adamw'",
        ),
        (c.lr is not None and not (real(c.lr) and c.lr > 0), "lr", "a positive finite number, or None"),
        (not (real(c.momentum) and 0 <= c.momentum < 1), "momentum", "a number in [0, 1)"),
        (not (real(c.weight_decay) and c.weight_decay >= 0), "weight_decay", "a finite number >= 0"),
        (c.schedule not in {"onecycle", "cosine", "constant"}, "schedule", "'onecycle', 'cosine' or 'constant'"),
        (not (real(c.warmup) and 0 <= c.warmup < 1), "warmup", "a fraction of all steps in [0, 1)"),
        (not (real(c.label_smoothing) and 0 <= c.label_smoothing < 1), "label_smoothing", "a number in [0, 1)"),
        (
            c.grad_clip is not None and not (real(c.grad_clip) and c.grad_clip > 0),
            "grad_clip",
            "a positive finite gradient norm, or None for no clipping",
        ),
        (not isinstance(c.ignore_index, int) or isinstance(c.ignore_index, bool), "ignore_index", "a whole number"),
        (c.precision not in {"auto", "bf16", "fp32"}, "precision", "'auto', 'bf16' or 'fp32'"),
        (not (real(c.vector_lr_scale) and c.vector_lr_scale > 0), "vector_lr_scale", "a positive finite number"),
        (not (real(c.muon_lr) and c.muon_lr > 0), "muon_lr", "a positive finite number"),
        (not (real(c.muon_momentum) and 0 < c.muon_momentum < 1), "muon_momentum", "a number in (0, 1)"),
        (
            isinstance(c.muon_steps, bool) or not isinstance(c.muon_steps, int) or c.muon_steps < 1,
            "muon_steps",
            "a whole number >= 1",
        ),
    ]
    for flag in ("compile", "sync_batch_norm", "decay_embeddings", "progress"):
        problems.append((not isinstance(getattr(c, flag), bool), flag, "True or False"))
    for bad, name, allowed in problems:
        if bad:
            raise ValueError(f"TrainConfig.{name} must be {allowed}, got {getattr(c, name)!r}")


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
    precision: str = ""  # what the run computed in: "bfloat16 autocast" or "float32"

    @property
    def total_seconds(self) -> float:
        """Training time of all epochs together (evaluation excluded)."""
        return sum(self.seconds)


@dataclass
class FitState:
    """What a ``Callback`` sees: the run's model, optimiser, config and progress, as the loop goes."""

    model: nn.Module  # the model being trained (its own parameters, never a wrapper)
    net: nn.Module  # what the batches go through: the model, or its compiled / data-parallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    train_data: Batches
    history: History
    callbacks: Sequence[Callback]
    epoch: int = 0  # the epoch under way (0-based)
    step: int = 0  # batches done in that epoch
    eval_model: nn.Module | None = None  # evaluated after each epoch (None: ``model``); an EMA puts its average here
    stopped_by: str | None = None  # the signal's name once SIGINT or SIGTERM asked the run to stop
    sums: list[torch.Tensor] | None = None  # this epoch so far: loss * targets, correct, targets, first bad step
    epoch_seconds: float = 0.0  # training time of this epoch before the last resume
    loader_state: object = None  # the training data's random state at the start of this epoch


class TrainingInterrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM stopped ``fit`` at the end of a step; the model holds the weights trained so far."""

    def __init__(self, state: FitState) -> None:
        self.state = state  # everything a checkpoint needs (companion.checkpoint.save_checkpoint)
        self.signal_name, self.epoch, self.step, self.history = state.stopped_by, state.epoch, state.step, state.history
        self.exit_code = 128 + getattr(signal, str(self.signal_name), signal.SIGINT)
        super().__init__(
            f"training stopped by {self.signal_name} in epoch {self.epoch + 1}, after step {self.step}; the model "
            "holds the weights trained so far"
        )


def _autocast(dev: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast where ``precision`` asks for it (``runtime.autocast_dtype``); float32 everywhere else."""
    dtype = autocast_dtype(dev, precision)
    return torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _schedule(kind: str, total_steps: int, warmup: float):
    """Learning-rate multiplier per step: linear warm-up, then linear ('onecycle') or cosine decay to 0, or none."""
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


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def predict(
    model: nn.Module, data: Batches, tta_flip: bool = False, tta_translate: int = 0, precision: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole data set, on the CPU; ``tta_flip`` averages with the mirrored images.

    ``tta_translate`` > 0 also averages over copies shifted by that many pixels (``companion.augment.tta_logits``).
    The batches are moved to the model's device; results stay there until one copy to the CPU at the end.
    """
    was_training = model.training
    model.eval()
    dev = _device_of(model)
    all_logits, all_labels = [], []
    for x, y in data:
        if not isinstance(x, torch.Tensor) or y.ndim != 1:
            raise ValueError(
                "predict and evaluate (and fit's test_data) take batches of images x (B, ...) with class labels y "
                f"(B,), got x {type(x).__name__} and y of shape {tuple(y.shape)}; for a model fed tuples or trained "
                "on sequences, pass test_data=None to fit and evaluate with your own loop"
            )
        x = x.to(dev)
        with _autocast(dev, precision):
            logits = tta_logits(model, x, flip=tta_flip, translate_by=tta_translate)  # (B, C) float
        all_logits.append(logits)
        all_labels.append(y)
    model.train(was_training)
    if not all_logits:
        raise ValueError("the data yields no batches (an empty data set?); nothing to predict or evaluate")
    return torch.cat(all_logits).cpu(), torch.cat([y.to(dev) for y in all_labels]).cpu()


def evaluate(
    model: nn.Module, data: Batches, tta_flip: bool = False, tta_translate: int = 0, precision: str = "auto"
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (in [0, 1]) of ``model`` on ``data`` (test-time augmentation as ``predict``)."""
    logits, labels = predict(model, data, tta_flip, tta_translate, precision)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def fit(
    model: nn.Module,
    train_data: Batches,
    test_data: Batches | None = None,
    config: TrainConfig | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    resume_from: str | PathLike | None = None,
    **overrides,
) -> History:
    """Train ``model`` on ``train_data`` as ``config`` says (with ``overrides`` of its fields) and return its history.

    ``fit(model, train, test, epochs=3, lr=0.1)`` is ``fit(model, train, test, TrainConfig(epochs=3, lr=0.1))``.
    Training runs on the device of the training data (a ``DeviceLoader``'s ``device``), else the model's. Batches
    are ``(x, y)``: ``x`` a tensor, or a tuple of tensors passed as ``model(*x)``; ``y`` class labels (B,) for
    logits (B, C), targets (B, ...) for logits (B, ..., C) such as next tokens, or class probabilities (B, C)
    (soft labels from mixup or cutmix). The test set is evaluated after each epoch. A loss that stops being finite
    raises ``FloatingPointError`` at the end of that epoch. SIGINT or SIGTERM stops the run at the end of the
    current step: the callbacks' ``on_stop`` runs (a ``Checkpoint`` writes one), then ``TrainingInterrupted`` is
    raised. ``resume_from`` continues the run saved in a checkpoint file (see ``companion.checkpoint``).
    Under torchrun the model trains as ``DistributedDataParallel``; figures are summed over all processes.
    """
    if test_data is not None and hasattr(test_data, "__len__") and len(test_data) == 0:
        raise ValueError("test_data yields no batches (an empty test set?); pass test_data=None to train without it")
    state = _setup(model, train_data, _config(config, overrides), callbacks)
    if resume_from is not None:
        restore(state, resume_from)
    cfg, dev, history = state.config, torch.device(state.history.device), state.history
    steps_per_epoch = len(train_data)  # type: ignore[arg-type]
    for cb in callbacks:
        cb.on_fit_start(state)
    done = state.epoch * steps_per_epoch + state.step  # more than 0 when resumed
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch,
        initial=done,
        desc="training",
        disable=not cfg.progress or not distributed.is_main(),
    )
    with _stop_on_signals(state):
        while state.epoch < cfg.epochs:
            state.model.train()
            start, skip = time.perf_counter(), state.step
            if state.sums is None:  # a new epoch (not one resumed part-way): note where the data's randomness starts
                state.loader_state = _loader_state(train_data)
            sums = state.sums if state.sums is not None else _zero_sums(dev)
            state.sums = sums  # loss * targets, correct, targets, first bad step: on the device, no sync per step
            for i, (x, y) in enumerate(train_data):
                if i < skip:  # resumed part-way through this epoch: these batches are done
                    continue
                x = tuple(t.to(dev) for t in x) if isinstance(x, tuple) else x.to(dev)
                y = y.to(dev)
                with _autocast(dev, cfg.precision):
                    logits = state.net(*x) if isinstance(x, tuple) else state.net(x)  # (B, C) or (B, ..., C)
                    loss = _loss(logits, y, cfg)
                state.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
                state.optimizer.step()
                state.scheduler.step()
                _count(sums, loss, logits, y, i, cfg.ignore_index)
                state.step = i + 1
                for cb in callbacks:
                    cb.on_step_end(state)
                bar.update(1)
                if _stop_requested(state):
                    break
            state.epoch_seconds += _elapsed(start, dev)
            if state.step == 0:
                raise ValueError(f"train_data yielded no batches in epoch {state.epoch + 1}")
            if state.stopped_by is not None:
                bar.close()
                for cb in callbacks:
                    cb.on_stop(state)
                raise TrainingInterrupted(state)
            _end_epoch(state, test_data, bar)
    bar.close()
    for cb in callbacks:
        cb.on_fit_end(state)
    return history


def _config(config: TrainConfig | None, overrides: dict) -> TrainConfig:
    """``config`` (default ``TrainConfig()``) with ``overrides`` in place; an unknown name is a clear TypeError."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"fit() got unknown settings {unknown}; TrainConfig has {sorted(known)}")
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig (or None), got {type(config).__name__}")
    return replace(config or TrainConfig(), **overrides)


def _setup(model: nn.Module, train_data: Batches, config: TrainConfig, callbacks: Sequence[Callback]) -> FitState:
    """Everything decided once, before the loop: device, data-parallel wrapper, compile, optimiser and schedule."""
    steps_per_epoch = len(train_data)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise ValueError("train_data yields no batches (empty data set, or batch_size larger than it with drop_last)")
    dev = getattr(train_data, "device", None) or _device_of(model)  # where the data lives decides
    model.to(dev)
    net = distributed.wrap(model, config.sync_batch_norm)  # DistributedDataParallel under torchrun
    if config.compile and torch.device(dev).type == "cuda":
        net = torch.compile(net)  # compile after the DDP wrap (PyTorch's recommended order)
    optimizer = make_optimizer(model, config)
    factor = _schedule(config.schedule, config.epochs * steps_per_epoch, config.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    history = History(device=str(dev), precision=precision_name(torch.device(dev), config.precision))
    return FitState(model, net, optimizer, scheduler, config, train_data, history, tuple(callbacks))


def _loss(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Cross-entropy in float32: soft labels (B, C) as they are, class targets with smoothing and ``ignore_index``."""
    if y.is_floating_point():  # soft labels (B, C): class probabilities
        return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    flat_logits, flat_y = logits.float().flatten(0, -2), y.flatten()
    return F.cross_entropy(flat_logits, flat_y, label_smoothing=cfg.label_smoothing, ignore_index=cfg.ignore_index)


def _zero_sums(dev: torch.device) -> list[torch.Tensor]:
    """The epoch's running sums: loss * targets (float), correct, targets that count, first bad step (-1: none)."""
    long = {"dtype": torch.long, "device": dev}
    return [torch.zeros((), device=dev), torch.zeros((), **long), torch.zeros((), **long), torch.full((), -1, **long)]


def _count(sums: list[torch.Tensor], loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, step: int, ignore: int):
    """Add one step's loss and correct predictions to the epoch's sums (on the device: no host sync)."""
    if y.is_floating_point():
        y = y.argmax(-1)  # (B,): the class with the largest share counts for the accuracy
    keep = y != ignore  # (B, ...)
    n = keep.sum()
    sums[0] += loss.detach() * n
    sums[1] += ((logits.argmax(-1) == y) & keep).sum()
    sums[2] += n
    sums[3].copy_(torch.where((sums[3] < 0) & ~torch.isfinite(loss.detach()), step, sums[3]))


def _elapsed(start: float, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _end_epoch(state: FitState, test_data: Batches | None, bar: tqdm) -> None:
    """Turn the epoch's sums into figures (one host sync), evaluate, run the callbacks, start the next epoch."""
    history, sums = state.history, state.sums
    totals = distributed.all_reduce(torch.stack([sums[0].double(), sums[1].double(), sums[2].double()]))
    loss_total, correct_total, scored_total = totals.tolist()
    train_loss = loss_total / scored_total
    if not math.isfinite(train_loss):  # the same on every rank: all of them stop together
        bar.close()
        first = distributed.all_reduce(torch.where(sums[3] < 0, len(state.train_data), sums[3]), "min")  # type: ignore[arg-type]
        raise _diverged(state.epoch + 1, int(first.item()) + 1, state.config.lr)
    history.seconds.append(state.epoch_seconds)
    history.train_loss.append(train_loss)
    history.train_acc.append(correct_total / scored_total)
    history.lr.append(state.optimizer.param_groups[0]["lr"])
    postfix = {"epoch": state.epoch + 1, "loss": f"{train_loss:.3f}", "acc": f"{history.train_acc[-1]:.3f}"}
    distributed.sync_buffers(state.model)  # every rank now holds rank 0's model
    if test_data is not None:
        test_loss, test_acc = evaluate(state.eval_model or state.model, test_data, precision=state.config.precision)
        history.test_loss.append(test_loss)
        history.test_acc.append(test_acc)
        postfix["test_acc"] = f"{test_acc:.3f}"
    bar.set_postfix(postfix)
    state.epoch, state.step, state.sums, state.epoch_seconds = state.epoch + 1, 0, None, 0.0
    state.loader_state = _loader_state(state.train_data)  # where the next epoch's data starts
    for cb in state.callbacks:
        cb.on_epoch_end(state)


def _diverged(epoch: int, step: int, lr: float) -> FloatingPointError:
    """The error ``fit`` raises when the training loss stops being a finite number."""
    return FloatingPointError(
        f"training diverged: the loss became NaN or infinite in epoch {epoch}, step {step} (lr={lr:g}). "
        "Usual causes: a learning rate too high for this model and batch size (try a 3-10x smaller lr, or "
        "gradient clipping with grad_clip=1.0), or bad inputs (NaN or infinite pixel values, wrong labels); "
        "check the data with torch.isfinite(images).all()."
    )


def _loader_state(data: Batches) -> object:
    """The training data's random state (``state_dict()`` of a loader that has one), or None."""
    return data.state_dict() if hasattr(data, "state_dict") else None


@contextlib.contextmanager
def _stop_on_signals(state: FitState) -> Iterator[None]:
    """While training: SIGINT and SIGTERM ask the loop to stop at the end of the step; a second Ctrl-C stops at once.

    Only in the main thread (where Python delivers signals); elsewhere the default handling stays.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def ask_to_stop(signum: int, frame: object) -> None:
        state.stopped_by = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
        if distributed.is_main():
            print(f"\n{state.stopped_by}: stopping at the end of this step (Ctrl-C again to stop at once)", flush=True)

    for s in previous:
        signal.signal(s, ask_to_stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def hold_signals() -> Iterator[None]:
    """Let a block finish (e.g. writing a file) before SIGINT or SIGTERM take effect: they act when it ends.

    After the block, a held SIGINT raises ``KeyboardInterrupt`` and a held SIGTERM ends the process as SIGTERM
    would have. Only in the main thread; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signal.SIGTERM in held:
        os.kill(os.getpid(), signal.SIGTERM)
    if signal.SIGINT in held:
        raise KeyboardInterrupt


def _stop_requested(state: FitState) -> bool:
    """True once a signal asked to stop; under torchrun, when any rank was asked (all ranks stop at the same step)."""
    if distributed.world_size() == 1:
        return state.stopped_by is not None
    dev = torch.device(state.history.device)
    flag = distributed.all_reduce(torch.tensor(float(state.stopped_by is not None), device=dev), "max")
    if flag.item() and state.stopped_by is None:
        state.stopped_by = "SIGTERM"  # another rank was signalled
    return state.stopped_by is not None
