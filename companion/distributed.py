"""Data parallelism with PyTorch's own engine: the process group of a ``torchrun`` launch, and who is who in it.

``torchrun --nproc_per_node N -m companion train cnn`` starts N copies of the same program. Each copy (a *rank*)
holds the whole model, trains on its own slice of every epoch (``DeviceLoader`` shards shuffled data by rank), and
``DistributedDataParallel`` averages the gradients over all ranks after every backward pass (an all-reduce), so
all copies take the same optimiser step and stay identical. Without ``torchrun`` nothing here does anything:
``rank()`` is 0, ``world_size()`` is 1, and every call in the book runs as a single process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "all_reduce",
    "is_main",
    "launched",
    "main_first",
    "process_group",
    "rank",
    "scale_lr",
    "setup",
    "sync_buffers",
    "teardown",
    "world_size",
    "wrap",
]


def launched() -> bool:
    """True if this process was started by ``torchrun`` (which sets ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's index among all processes of the job (0 when not distributed)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """How many processes train together (1 when not distributed)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0, the process that prints, reports and saves (always true when not distributed)."""
    return rank() == 0


def setup() -> bool:
    """Join the process group described by torchrun's environment; return True if a group is (now) up.

    NCCL on CUDA, each rank on its own GPU ``cuda:LOCAL_RANK``; gloo on the CPU. Not launched by torchrun:
    nothing happens and False is returned.
    """
    if _active():
        return True
    if not launched():
        return False
    if torch.cuda.is_available():
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if local.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"this is local rank {local.index}, but only {torch.cuda.device_count()} GPUs are visible: start at "
                "most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local)  # "cuda" now means this rank's GPU, for DeviceLoader and the model alike
        dist.init_process_group("nccl", device_id=local)
    else:
        dist.init_process_group("gloo")
    return True


def teardown() -> None:
    """Leave the process group (no-op when none is up)."""
    if _active():
        dist.destroy_process_group()


@contextmanager
def process_group() -> Iterator[bool]:
    """``with process_group():`` runs the block in torchrun's process group (if launched by torchrun), then leaves it.

    An exception is not caught: it ends this process with its error, and torchrun then stops the other ranks.
    """
    started = not _active() and setup()
    yield _active()
    if started:  # not reached on an exception: tearing down a group whose peers are gone could block
        teardown()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks after it (e.g. so that only rank 0 writes a data cache)."""
    if not is_main():
        dist.barrier()
    yield
    if is_main() and world_size() > 1:
        dist.barrier()


def scale_lr(lr: float, rule: str = "linear") -> float:
    """The learning rate for ``world_size()`` processes, each with the recipe's batch: the global batch is N times it.

    ``'linear'``: ``lr * N`` (Goyal et al., 2017, for SGD); ``'sqrt'``: ``lr * sqrt(N)`` (for Adam-type
    optimisers); ``'none'``: ``lr`` unchanged. With one process every rule returns ``lr``.
    """
    factors = {"linear": world_size(), "sqrt": math.sqrt(world_size()), "none": 1}
    if rule not in factors:
        raise ValueError(f"rule (a recipe's lr_scaling) must be 'linear', 'sqrt' or 'none', got {rule!r}")
    return lr * factors[rule]


def wrap(model: nn.Module, sync_batch_norm: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` when a process group is up, else ``model`` itself.

    Call it after moving the model to its device. ``sync_batch_norm`` turns batch-norm layers into
    ``SyncBatchNorm`` (statistics over the global batch, CUDA only); the parameters stay the same objects.
    """
    if not _active():
        return model
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    if dev.type not in {"cuda", "cpu"}:
        raise ValueError(f"training in several processes needs CUDA (nccl) or the CPU (gloo), not {dev.type}")
    if sync_batch_norm:
        if dev.type != "cuda":
            raise ValueError("sync_batch_norm needs CUDA (SyncBatchNorm has no CPU kernel); set it to False on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm statistics) to every rank, so that all ranks hold the same model."""
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``values`` reduced element-wise over all processes, ``op`` 'sum', 'min' or 'max' (``values`` when alone)."""
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op must be 'sum', 'min' or 'max', got {op!r}")
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, ops[op])
    return values
