"""2-D convolution and pooling from scratch: the textbook formula, explicit loops, and im2col + one GEMM.

Every function mirrors the name, signature and semantics of its ``torch.nn.functional`` counterpart
(``conv2d``, ``max_pool2d``, ``avg_pool2d``, ``unfold``), so the tests can check them against PyTorch.
Like every deep-learning library, ``conv2d`` computes a *cross-correlation* (the kernel is not flipped);
``convolve2d`` and ``correlate2d`` are the single-channel textbook operations that tell the two apart.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "avg_pool2d",
    "conv2d",
    "conv2d_naive",
    "conv_output_size",
    "convolve2d",
    "correlate2d",
    "im2col",
    "max_pool2d",
]

IntPair = int | tuple[int, int]
Padding = int | tuple[int, int] | str


def _pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
    """Turn an int or a pair of ints into a pair, checking that both are >= minimum."""

    def whole(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not a size

    if whole(value):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(whole(v) for v in value):
        pair = (value[0], value[1])
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        rule = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return pair


def _check_fits(kernel: tuple[int, int], dilation: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Check that the dilated kernel fits in the (padded) input; return its extent (span_h, span_w)."""
    span_h, span_w = dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1
    if span_h > size[0] or span_w > size[1]:
        raise ValueError(
            f"the kernel ({kernel[0]}x{kernel[1]}, dilation {dilation[0]}x{dilation[1]}, spanning "
            f"{span_h}x{span_w}) is larger than the padded input ({size[0]}x{size[1]}); "
            "use a smaller kernel or dilation, or more padding"
        )
    return span_h, span_w


def conv_output_size(
    size: IntPair, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1
) -> int | tuple[int, int]:
    """Output length floor((n + 2p - d(k-1) - 1) / s) + 1; a pair when any argument is a pair."""
    if all(isinstance(v, int) for v in (size, kernel_size, stride, padding, dilation)):
        return conv_output_size((size, size), kernel_size, stride, padding, dilation)[0]
    n, k = _pair(size, "size", 1), _pair(kernel_size, "kernel_size", 1)
    s, p, d = _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
    _check_fits(k, d, (n[0] + 2 * p[0], n[1] + 2 * p[1]))
    return tuple((n[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


def _check_4d(input: torch.Tensor, what: str) -> None:
    """Reject anything but a batch of images (B, C, H, W)."""
    if input.ndim != 4:
        hint = "; add a batch dimension with input.unsqueeze(0)" if input.ndim == 3 else ""
        raise ValueError(f"{what} expects input of shape (B, C, H, W), got shape {tuple(input.shape)}{hint}")


def _resolve_padding(
    padding: Padding, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Padding as (left, right, top, bottom), the order F.pad wants; handles "valid" and "same"."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in F.conv2d), got stride={stride}")
        # Total padding d(k-1) keeps the size; when it is odd the extra row/column goes right/bottom.
        total_h, total_w = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
        return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    ph, pw = _pair(padding, "padding", 0)
    return (pw, pw, ph, ph)


def im2col(input: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1, dilation: IntPair = 1) -> torch.Tensor:
    """Unfold every kernel-sized patch into a column: (B, C, H, W) -> (B, C*kH*kW, L), like F.unfold (no padding)."""
    _check_4d(input, "im2col")
    (kH, kW), (sH, sW) = _pair(kernel_size, "kernel_size", 1), _pair(stride, "stride", 1)
    dH, dW = _pair(dilation, "dilation", 1)
    B, C, H, W = input.shape
    span_h, span_w = _check_fits((kH, kW), (dH, dW), (H, W))  # extent of the dilated kernel
    windows = input.unfold(2, span_h, sH).unfold(3, span_w, sW)  # (B, C, H_out, W_out, span_h, span_w), a view
    patches = windows[..., ::dH, ::dW]  # (B, C, H_out, W_out, kH, kW), still a view
    H_out, W_out = patches.shape[2], patches.shape[3]
    # The copy happens here: every input pixel is duplicated into up to kH*kW columns.
    return patches.permute(0, 1, 4, 5, 2, 3).reshape(B, C * kH * kW, H_out * W_out)


def _check_conv(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> None:
    """Check the shapes of a conv2d call against each other and against groups."""
    _check_4d(input, "conv2d")
    if weight.ndim != 4:
        raise ValueError(f"weight must have shape (C_out, C_in/groups, kH, kW), got shape {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    C_in, C_out = input.shape[1], weight.shape[0]
    if C_in % groups or C_out % groups:
        raise ValueError(
            f"input channels ({C_in}) and output channels ({C_out}) must both be divisible by groups ({groups})"
        )
    if weight.shape[1] * groups != C_in:
        raise ValueError(
            f"channel mismatch: input has C_in={C_in} channels but weight.shape[1] * groups = "
            f"{weight.shape[1]} * {groups} = {weight.shape[1] * groups}; weight must be (C_out, C_in/groups, kH, kW)"
        )
    if bias is not None and tuple(bias.shape) != (C_out,):
        raise ValueError(f"bias must have shape (C_out,) = ({C_out},), got {tuple(bias.shape)}")
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        got = f"input {input.dtype}, weight {weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}")
        raise TypeError(f"input, weight and bias must have one dtype (as in F.conv2d), got {got}; convert with .to()")


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """2-D convolution (cross-correlation, as F.conv2d) as im2col followed by one batched matrix product."""
    _check_conv(input, weight, bias, groups)
    stride, dilation = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
    B, C_in, H, W = input.shape
    C_out, C_g, kH, kW = weight.shape
    x = F.pad(input, _resolve_padding(padding, (kH, kW), stride, dilation))  # (B, C_in, H+pt+pb, W+pl+pr)
    H_out = (x.shape[2] - dilation[0] * (kH - 1) - 1) // stride[0] + 1
    W_out = (x.shape[3] - dilation[1] * (kW - 1) - 1) // stride[1] + 1
    cols = im2col(x, (kH, kW), stride, dilation)  # (B, C_in*kH*kW, L), L = H_out*W_out
    cols = cols.view(B, groups, C_g * kH * kW, H_out * W_out)  # (B, G, K, L): channels are the slowest axis
    w = weight.reshape(groups, C_out // groups, C_g * kH * kW)  # (G, O, K)
    out = w @ cols  # (B, G, O, L): one GEMM per (image, group), batched into one call
    out = out.reshape(B, C_out, H_out, W_out)
    if bias is not None:
        out = out + bias.view(1, C_out, 1, 1)
    return out


def conv2d_naive(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """2-D convolution written as the formula, one Python loop per output index (slow: for teaching)."""
    _check_conv(input, weight, bias, groups)
    (sH, sW), (dH, dW) = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
    B, C_in, H, W = input.shape
    C_out, C_g, kH, kW = weight.shape
    x = F.pad(input, _resolve_padding(padding, (kH, kW), (sH, sW), (dH, dW)))
    span_h, span_w = _check_fits((kH, kW), (dH, dW), (x.shape[2], x.shape[3]))
    H_out, W_out = (x.shape[2] - span_h) // sH + 1, (x.shape[3] - span_w) // sW + 1
    out = input.new_zeros(B, C_out, H_out, W_out)
    for b in range(B):
        for o in range(C_out):
            g = o // (C_out // groups)  # the group of output channel o sees input channels g*C_g ... (g+1)*C_g - 1
            for i in range(H_out):
                for j in range(W_out):
                    patch = x[b, g * C_g : (g + 1) * C_g, i * sH : i * sH + span_h : dH, j * sW : j * sW + span_w : dW]
                    out[b, o, i, j] = (patch * weight[o]).sum()  # sum over c, kH, kW
    if bias is not None:
        out = out + bias.view(1, C_out, 1, 1)
    return out


def _pool_windows(
    input: torch.Tensor, kernel_size: IntPair, stride: IntPair | None, padding: IntPair, fill: float | int, what: str
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad with ``fill`` and unfold: returns windows (B, C, kH*kW, L) and the output size (H_out, W_out)."""
    _check_4d(input, what)
    kH, kW = _pair(kernel_size, "kernel_size", 1)
    sH, sW = (kH, kW) if stride is None else _pair(stride, "stride", 1)
    pH, pW = _pair(padding, "padding", 0)
    if 2 * pH > kH or 2 * pW > kW:
        raise ValueError(f"padding ({pH}, {pW}) must be at most half the kernel size ({kH}, {kW}), as in F.{what}")
    B, C, H, W = input.shape
    x = F.pad(input, (pW, pW, pH, pH), value=fill)  # (B, C, H+2pH, W+2pW)
    cols = im2col(x, (kH, kW), (sH, sW))  # (B, C*kH*kW, L)
    H_out, W_out = conv_output_size((H, W), (kH, kW), (sH, sW), (pH, pW))
    return cols.view(B, C, kH * kW, H_out * W_out), (H_out, W_out)


def max_pool2d(
    input: torch.Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0
) -> torch.Tensor:
    """Max pooling as F.max_pool2d: the largest value of each window (padding counts as -inf)."""
    lowest = float("-inf") if input.is_floating_point() else torch.iinfo(input.dtype).min  # integers have no -inf
    windows, (H_out, W_out) = _pool_windows(input, kernel_size, stride, padding, lowest, "max_pool2d")
    return windows.amax(dim=2).view(*input.shape[:2], H_out, W_out)  # (B, C, H_out, W_out)


def avg_pool2d(
    input: torch.Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0
) -> torch.Tensor:
    """Average pooling as F.avg_pool2d (count_include_pad=True): each window's sum divided by kH*kW.

    Integer input gives the quotient rounded towards zero, as F.avg_pool2d does for int64.
    """
    windows, (H_out, W_out) = _pool_windows(input, kernel_size, stride, padding, 0, "avg_pool2d")
    if input.is_floating_point():
        out = windows.mean(dim=2)
    else:
        out = windows.sum(dim=2).div(windows.shape[2], rounding_mode="trunc")
    return out.view(*input.shape[:2], H_out, W_out)  # (B, C, H_out, W_out)


def _as_2d(array: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """A 2-D array as a floating-point tensor (integers become float64)."""
    tensor = torch.as_tensor(array)
    if tensor.ndim != 2 or not tensor.numel():
        raise ValueError(f"{name} must be a 2-D array (H, W), not empty, got shape {tuple(tensor.shape)}")
    return tensor if tensor.is_floating_point() else tensor.double()


def convolve2d(image: torch.Tensor | np.ndarray, kernel: torch.Tensor | np.ndarray, mode: str = "full") -> torch.Tensor:
    """True convolution (I*K)(x,y) = sum_{i,j} I(i,j) K(x-i, y-j), as scipy.signal.convolve2d ('full' or 'valid')."""
    I, K = _as_2d(image, "image"), _as_2d(kernel, "kernel")
    (H, W), (kh, kw) = I.shape, K.shape
    if mode not in ("full", "valid"):
        raise ValueError(f"mode must be 'full' or 'valid', got {mode!r}")
    # Substituting m = x-i, n = y-j: (I*K)(x,y) = sum_{m,n} K(m,n) I(x-m, y-n), so every kernel tap
    # adds a copy of the image shifted by (m, n): the kernel ends up applied flipped.
    out = I.new_zeros(H + kh - 1, W + kw - 1)
    for m in range(kh):
        for n in range(kw):
            out[m : m + H, n : n + W] += K[m, n] * I
    if mode == "valid":
        if kh > H or kw > W:
            raise ValueError(f"mode='valid' needs a kernel no larger than the image, got {kh}x{kw} > {H}x{W}")
        out = out[kh - 1 : H, kw - 1 : W]  # only positions where the kernel lies fully inside the image
    return out


def correlate2d(
    image: torch.Tensor | np.ndarray, kernel: torch.Tensor | np.ndarray, mode: str = "full"
) -> torch.Tensor:
    """Cross-correlation (I⋆K)(x,y) = sum_{i,j} I(x+i, y+j) K(i,j), as scipy.signal.correlate2d ('full'/'valid')."""
    I, K = _as_2d(image, "image"), _as_2d(kernel, "kernel")
    kh, kw = K.shape
    if mode not in ("full", "valid"):
        raise ValueError(f"mode must be 'full' or 'valid', got {mode!r}")
    if mode == "full":
        I = F.pad(I, (kw - 1, kw - 1, kh - 1, kh - 1))  # zeros all round, so every overlap counts
    H, W = I.shape
    if kh > H or kw > W:
        raise ValueError(f"mode='valid' needs a kernel no larger than the image, got {kh}x{kw} > {H}x{W}")
    out = I.new_zeros(H - kh + 1, W - kw + 1)
    for i in range(kh):
        for j in range(kw):
            out += K[i, j] * I[i : i + H - kh + 1, j : j + W - kw + 1]  # the kernel slides unflipped
    return out
