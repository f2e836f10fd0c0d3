"""Helpers shared by every model of the book: parameter and FLOP counts, a layer summary, saving weights."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from companion.files import atomic_write

__all__ = ["count_flops", "count_parameters", "format_table", "load_weights", "save_weights", "summary"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _example_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    if len(input_shape) < 2 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be a batch shape such as (1, 3, 32, 32), got {tuple(input_shape)}")
    p = next(model.parameters(), None)
    return torch.randn(*input_shape, device=p.device if p is not None else "cpu")


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: Sequence[int] = (1, 3, 32, 32)) -> int:
    """Floating-point operations of one forward pass *per example* (a multiply-add counts as 2 FLOPs).

    Attention runs on PyTorch's plain (math) path while counting: the counter cannot see inside the fused CPU kernel.
    """
    x = _example_input(model, input_shape)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // input_shape[0]


@torch.no_grad()
def summary(
    model: nn.Module, input_shape: Sequence[int] = (1, 3, 32, 32)
) -> list[tuple[str, str, tuple[int, ...], int]]:
    """Rows ``(layer name, layer type, output shape, parameters)`` of every leaf-module call of one forward pass.

    A module called twice (e.g. a shared pooling layer) gets a row per call; its parameters count once,
    so the last column sums to ``count_parameters(model)`` (for models whose parameters all sit in leaves).
    """
    names = {module: name for name, module in model.named_modules()}
    rows: list[tuple[str, str, tuple[int, ...], int]] = []
    seen: set[nn.Module] = set()

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        params = 0 if module in seen else sum(p.numel() for p in module.parameters(recurse=False))
        seen.add(module)
        rows.append((names[module], type(module).__name__, tuple(output.shape), params))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        model(_example_input(model, input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return rows


def format_table(rows: Sequence[Sequence], headers: Sequence[str] | None = None) -> str:
    """A plain-text table with left-aligned text columns and right-aligned numbers (ints get thousands commas)."""
    headers = list(headers) if headers is not None else ["layer", "type", "output shape", "params"]
    if any(len(r) != len(headers) for r in rows):
        raise ValueError(f"every row needs {len(headers)} cells, one per header {headers}")

    def cell(v: object) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return str(v)
        return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"

    text = [[cell(v) for v in r] for r in rows]
    numeric = [
        all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows) for i in range(len(headers))
    ]
    width = [max([len(h)] + [len(t[i]) for t in text]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, width, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in width])] + [line(t) for t in text])


def _tied_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names in ``state`` that are one tensor (tied weights, e.g. an LM head sharing the token embedding)."""
    by_tensor: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if t.numel():  # empty tensors all sit at address 0 without being one tensor
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            by_tensor.setdefault(key, []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def save_weights(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write ``model.state_dict()`` (parameters and buffers) to a ``.safetensors`` file and return its path.

    Tied weights (one tensor under several names) are stored once, under the first name; ``load_weights`` ties
    them again from the model. The file is written whole or not at all, with a mode that follows the umask
    (``companion.files.atomic_write``); ``overwrite=False`` refuses to replace an existing file (FileExistsError).
    """
    import safetensors.torch

    state = model.state_dict()
    copies = {name for names in _tied_groups(state) for name in names[1:]}
    tensors, storages = {}, set()
    for name, t in state.items():
        if name in copies:
            continue
        t = t.detach().cpu().contiguous()  # channels_last -> dense
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # a view of another entry (not the same tensor): safetensors stores no overlaps
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return atomic_write(path, lambda f: f.write(safetensors.torch.save(tensors)), overwrite=overwrite)


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights written by ``save_weights`` into ``model`` (same architecture, strict) and return it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a weights file; give the .safetensors file's path")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path}; write one with save_weights(model, path)")
    p = next(model.parameters(), None)
    try:
        state = load_file(os.fspath(path), device=str(p.device) if p is not None else "cpu")
    except SafetensorError as err:
        size = os.path.getsize(path)
        raise ValueError(
            f"{path} ({size:,} bytes) is not a readable .safetensors file ({err}): it is empty, truncated (an "
            "interrupted copy or save?) or another format (torch.save's .pt?); save the weights again with "
            "save_weights(model, path)"
        ) from err
    want = model.state_dict()
    for names in _tied_groups(want):  # tied weights are stored once: every name of the tensor gets that value
        stored = [n for n in names if n in state]
        for name in names:
            if stored:
                state.setdefault(name, state[stored[0]])
    problems = _mismatch(state, want)
    if problems:
        raise ValueError(
            f"the weights in {path} do not fit this model ({type(model).__name__}; another architecture or size?): "
            f"{problems}; load them into the model they were saved from, built with the same settings"
        )
    model.load_state_dict(state)
    return model


def _mismatch(state: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into a model whose state dict is ``want``, in one line ('' if nothing)."""

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(want[k].shape)} in the model"
        for k in want
        if k in state and state[k].shape != want[k].shape
    ]
    parts = [f"{len(missing)} missing ({some(missing)})"] if missing else []
    parts += [f"{len(unexpected)} not in the model ({some(unexpected)})"] if unexpected else []
    parts += [f"{len(shapes)} of another shape ({some(shapes)})"] if shapes else []
    return "; ".join(parts)
