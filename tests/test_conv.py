"""companion.conv against torch.nn.functional (and scipy.signal) over many seeded random configurations."""

from __future__ import annotations

import random

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F

from companion.conv import (
    avg_pool2d,
    conv2d,
    conv2d_naive,
    conv_output_size,
    convolve2d,
    correlate2d,
    im2col,
    max_pool2d,
)

ATOL = 1e-5  # float32
# F.conv2d warns that padding='same' with an even kernel copies the input: expected, not our concern here.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def _pair_or_int(rng: random.Random, low: int, high: int) -> int | tuple[int, int]:
    """An int, or (half the time) a pair of possibly different ints, in [low, high]."""
    return rng.randint(low, high) if rng.random() < 0.5 else (rng.randint(low, high), rng.randint(low, high))


def _as_pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


def random_conv_config(seed: int, tiny: bool = False) -> dict:
    """A random, valid conv2d configuration: tensors plus keyword arguments."""
    rng = random.Random(seed)
    groups = rng.choice([1, 1, 2, 3])
    c_in = groups * rng.randint(1, 2 if tiny else 4)
    c_out = groups * rng.randint(1, 2 if tiny else 3)
    kernel = (rng.randint(1, 3), rng.randint(1, 4))  # rectangular kernels too
    stride, dilation = _pair_or_int(rng, 1, 3), _pair_or_int(rng, 1, 2)
    padding = rng.choice(["int", "pair", "valid", "same"])
    if padding == "same":
        stride = 1  # F.conv2d allows 'same' only with stride 1
    else:
        padding = {"int": rng.randint(0, 2), "pair": (rng.randint(0, 2), rng.randint(0, 2)), "valid": "valid"}[padding]
    span = [d * (k - 1) + 1 for k, d in zip(kernel, _as_pair(dilation))]  # the input must hold one window
    size = (rng.randint(span[0], span[0] + (3 if tiny else 9)), rng.randint(span[1], span[1] + (3 if tiny else 9)))
    gen = torch.Generator().manual_seed(seed)
    return dict(
        input=torch.randn(rng.randint(1, 2 if tiny else 3), c_in, *size, generator=gen),
        weight=torch.randn(c_out, c_in // groups, *kernel, generator=gen),
        bias=torch.randn(c_out, generator=gen) if rng.random() < 0.5 else None,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )


@pytest.mark.parametrize("seed", range(150))
def test_conv2d_matches_torch(seed: int) -> None:
    cfg = random_conv_config(seed)
    expected = F.conv2d(**cfg)
    got = conv2d(**cfg)
    assert got.shape == expected.shape, cfg
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed", range(40))
def test_conv2d_naive_matches_torch(seed: int) -> None:
    cfg = random_conv_config(1000 + seed, tiny=True)
    torch.testing.assert_close(conv2d_naive(**cfg), F.conv2d(**cfg), atol=ATOL, rtol=0)


def test_conv2d_gradients_match_torch() -> None:
    cfg = random_conv_config(7)
    leaves = [cfg["input"], cfg["weight"]] + ([cfg["bias"]] if cfg["bias"] is not None else [])
    grads = []
    for fn in (conv2d, F.conv2d):
        for t in leaves:
            t.requires_grad_(True).grad = None
        fn(**cfg).square().sum().backward()
        grads.append([t.grad.clone() for t in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


def test_conv2d_float64_is_exact_to_1e12() -> None:
    cfg = random_conv_config(3)
    cfg = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in cfg.items()}
    torch.testing.assert_close(conv2d(**cfg), F.conv2d(**cfg), atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", range(30))
def test_im2col_matches_unfold(seed: int) -> None:
    rng = random.Random(seed)
    kernel, stride, dilation = _pair_or_int(rng, 1, 3), _pair_or_int(rng, 1, 3), _pair_or_int(rng, 1, 2)
    x = torch.randn(2, rng.randint(1, 4), rng.randint(5, 12), rng.randint(5, 12))
    torch.testing.assert_close(
        im2col(x, kernel, stride, dilation), F.unfold(x, kernel, dilation=dilation, stride=stride), atol=0, rtol=0
    )


@pytest.mark.parametrize("seed", range(40))
def test_conv_output_size_matches_actual_shape(seed: int) -> None:
    cfg = random_conv_config(2000 + seed)
    if isinstance(cfg["padding"], str):
        cfg["padding"] = 0 if cfg["padding"] == "valid" else cfg["padding"]
    if cfg["padding"] == "same":  # stride 1; 'same' pads d(k-1) in all per axis (one more on one side if odd)
        size, k, d = tuple(cfg["input"].shape[2:]), tuple(cfg["weight"].shape[2:]), _as_pair(cfg["dilation"])
        assert tuple(F.conv2d(**cfg).shape[2:]) == size
        padded = tuple(size[i] + d[i] * (k[i] - 1) for i in range(2))  # the padding folded into the input
        assert conv_output_size(padded, k, 1, 0, cfg["dilation"]) == size
        return
    kernel = tuple(cfg["weight"].shape[2:])
    expected = tuple(F.conv2d(**cfg).shape[2:])
    size = tuple(cfg["input"].shape[2:])
    assert conv_output_size(size, kernel, cfg["stride"], cfg["padding"], cfg["dilation"]) == expected
    # Per axis with plain ints the formula returns an int.
    for axis in range(2):
        s, p, d = (_as_pair(cfg[k])[axis] for k in ("stride", "padding", "dilation"))
        assert conv_output_size(size[axis], kernel[axis], s, p, d) == expected[axis]


def test_conv_output_size_known_values() -> None:
    assert conv_output_size(32, 3, padding=1) == 32  # 'same' 3x3
    assert conv_output_size(32, 2, stride=2) == 16  # 2x2 pooling
    assert conv_output_size(7, 3, stride=2) == 3
    assert conv_output_size(5, 3, dilation=2) == 1  # a dilated 3x3 spans 5 pixels
    assert conv_output_size((224, 224), 7, stride=2, padding=3) == (112, 112)  # ResNet stem


@pytest.mark.parametrize("seed", range(40))
def test_pooling_matches_torch(seed: int) -> None:
    rng = random.Random(seed)
    kernel = _pair_or_int(rng, 1, 4)
    k = _as_pair(kernel)
    stride = None if rng.random() < 0.3 else _pair_or_int(rng, 1, 3)
    padding = (rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2))
    x = torch.randn(rng.randint(1, 3), rng.randint(1, 4), rng.randint(k[0], 13), rng.randint(k[1], 13))
    torch.testing.assert_close(max_pool2d(x, kernel, stride, padding), F.max_pool2d(x, kernel, stride, padding))
    torch.testing.assert_close(
        avg_pool2d(x, kernel, stride, padding), F.avg_pool2d(x, kernel, stride, padding), atol=ATOL, rtol=0
    )


def test_pooling_default_stride_is_kernel() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert max_pool2d(x, 2).tolist() == [[[[5.0, 7.0], [13.0, 15.0]]]]
    assert avg_pool2d(x, 2).tolist() == [[[[2.5, 4.5], [10.5, 12.5]]]]


@pytest.mark.parametrize("mode", ["full", "valid"])
@pytest.mark.parametrize("seed", range(10))
def test_convolve_and_correlate_match_scipy(mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((rng.integers(4, 10), rng.integers(4, 10)))
    kernel = rng.standard_normal((rng.integers(1, 4), rng.integers(1, 4)))  # not symmetric
    np.testing.assert_allclose(convolve2d(image, kernel, mode).numpy(), scipy.signal.convolve2d(image, kernel, mode))
    np.testing.assert_allclose(correlate2d(image, kernel, mode).numpy(), scipy.signal.correlate2d(image, kernel, mode))


def test_convolution_flips_the_kernel() -> None:
    image = torch.rand(6, 7, dtype=torch.float64)
    kernel = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]], dtype=torch.float64)
    assert not torch.allclose(convolve2d(image, kernel, "valid"), correlate2d(image, kernel, "valid"))
    torch.testing.assert_close(convolve2d(image, kernel, "valid"), correlate2d(image, kernel.flip(0, 1), "valid"))
    # What deep-learning libraries call convolution is the cross-correlation.
    library = F.conv2d(image[None, None], kernel[None, None])[0, 0]
    torch.testing.assert_close(correlate2d(image, kernel, "valid"), library)


# ---- bad input -> clear ValueError -----------------------------------------------------------------


@pytest.mark.parametrize("fn", [conv2d, conv2d_naive])
def test_conv_errors(fn) -> None:
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 2, 3, 3)
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\).*unsqueeze\(0\)"):
        fn(x[0], w, groups=2)
    with pytest.raises(ValueError, match=r"weight must have shape \(C_out, C_in/groups, kH, kW\)"):
        fn(x, w[0], groups=2)
    with pytest.raises(ValueError, match=r"channel mismatch: input has C_in=4 .* 2 \* 1 = 2"):
        fn(x, w)
    with pytest.raises(ValueError, match=r"divisible by groups \(3\)"):
        fn(x, torch.randn(6, 1, 3, 3), groups=3)
    with pytest.raises(ValueError, match=r"groups must be a positive int"):
        fn(x, w, groups=0)
    with pytest.raises(ValueError, match=r"larger than the padded input \(8x8\)"):
        fn(x, torch.randn(6, 2, 9, 3), groups=2)
    with pytest.raises(ValueError, match=r"spanning 9x9\) is larger than the padded input \(8x8\)"):
        fn(x, w, groups=2, dilation=4)
    with pytest.raises(ValueError, match=r"stride must be positive"):
        fn(x, w, groups=2, stride=0)
    with pytest.raises(ValueError, match=r"stride must be positive"):
        fn(x, w, groups=2, stride=(1, -1))
    with pytest.raises(ValueError, match=r"padding must be non-negative"):
        fn(x, w, groups=2, padding=-1)
    with pytest.raises(ValueError, match=r"padding must be an int, a pair of ints, 'valid' or 'same'"):
        fn(x, w, groups=2, padding="full")
    with pytest.raises(ValueError, match=r"padding='same' needs stride 1"):
        fn(x, w, groups=2, padding="same", stride=2)
    with pytest.raises(ValueError, match=r"bias must have shape \(C_out,\) = \(6,\)"):
        fn(x, w, torch.randn(5), groups=2)


def test_conv_kernel_fits_once_padded() -> None:
    x, w = torch.randn(1, 1, 3, 3), torch.randn(1, 1, 5, 5)
    with pytest.raises(ValueError, match=r"larger than the padded input \(3x3\)"):
        conv2d(x, w)
    torch.testing.assert_close(conv2d(x, w, padding=1), F.conv2d(x, w, padding=1))  # 5x5 fits in 5x5


def test_pool_and_size_errors() -> None:
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)"):
        max_pool2d(x[0, 0], 2)
    with pytest.raises(ValueError, match=r"at most half the kernel size"):
        avg_pool2d(x, 2, padding=2)
    with pytest.raises(ValueError, match=r"stride must be positive"):
        max_pool2d(x, 2, stride=0)
    with pytest.raises(ValueError, match=r"larger than the padded input \(8x8\)"):
        max_pool2d(x, 9)
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a pair of ints"):
        max_pool2d(x, (2, 2, 2))
    with pytest.raises(ValueError, match=r"larger than the padded input \(4x4\)"):
        conv_output_size(4, 5)
    with pytest.raises(ValueError, match=r"stride must be positive"):
        conv_output_size(8, 3, stride=0)
    with pytest.raises(ValueError, match=r"image must be a 2-D array"):
        convolve2d(np.zeros((1, 4, 4)), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"mode must be 'full' or 'valid'"):
        correlate2d(np.zeros((4, 4)), np.ones((2, 2)), mode="same")
    with pytest.raises(ValueError, match=r"kernel no larger than the image"):
        correlate2d(np.zeros((2, 2)), np.ones((3, 1)), mode="valid")
