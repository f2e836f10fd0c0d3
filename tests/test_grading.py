"""Mutation tests of companion.grading: every check passes a correct solution and names each classic mistake."""

from __future__ import annotations

import math
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from companion import grading
from companion.attention import (
    MultiHeadAttention,
    scaled_dot_product_attention,
    sinusoidal_position_encoding,
)
from companion.conv import conv2d, conv2d_naive, max_pool2d
from companion.models import EncoderBlock, SelfAttention2d
from companion.models.vit import attention_rollout


@pytest.fixture(autouse=True)
def _library_calls_allowed(request, monkeypatch):
    """The mutants are built from F.conv2d and friends, which the exercises forbid: allow them, except in the
    tests of that rule (named test_forbidden_*)."""
    if not request.node.name.startswith("test_forbidden"):
        monkeypatch.setattr(grading, "_forbidden", lambda check: [])


def _fails_with(check, fn, *fragments: str) -> str:
    """Run check(fn), expect an AssertionError whose message holds every fragment; return the message."""
    with pytest.raises(AssertionError) as info:
        check(fn)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"expected {fragment!r} in the diagnosis, got:\n{message}"
    return message


# --- Chapter 1 -----------------------------------------------------------------------------------------


def size_ok(n, kernel_size, stride=1, padding=0, dilation=1):
    return (n + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


SIZE_MUTANTS = {
    "dilation ignored": lambda n, kernel_size, stride=1, padding=0, dilation=1: (
        (n + 2 * padding - kernel_size) // stride + 1
    ),
    "padding counted once": lambda n, kernel_size, stride=1, padding=0, dilation=1: (
        (n + padding - dilation * (kernel_size - 1) - 1) // stride + 1
    ),
    "ceil instead of floor": lambda n, kernel_size, stride=1, padding=0, dilation=1: (
        math.ceil((n + 2 * padding - dilation * (kernel_size - 1) - 1) / stride) + 1
    ),
    "off by one": lambda n, kernel_size, stride=1, padding=0, dilation=1: (
        (n + 2 * padding - dilation * (kernel_size - 1) - 1) // stride
    ),
    "stride ignored": lambda n, kernel_size, stride=1, padding=0, dilation=1: (
        n + 2 * padding - dilation * (kernel_size - 1)
    ),
    "return an int": lambda n, kernel_size, stride=1, padding=0, dilation=1: float(
        size_ok(n, kernel_size, stride, padding, dilation)
    ),
    "ZeroDivisionError": lambda n, kernel_size, stride=1, padding=0, dilation=1: 1 // 0,
}


def test_conv_output_size_reference_passes(capsys):
    grading.check_conv_output_size(size_ok)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("diagnosis", SIZE_MUTANTS)
def test_conv_output_size_mutants(diagnosis):
    _fails_with(grading.check_conv_output_size, SIZE_MUTANTS[diagnosis], diagnosis)


def conv_flipped(input, weight, bias=None, stride=1, padding=0, dilation=1):
    return F.conv2d(input, weight.flip(-1, -2), bias, stride, padding, dilation)


def conv_no_bias(input, weight, bias=None, stride=1, padding=0, dilation=1):
    return F.conv2d(input, weight, None, stride, padding, dilation)


def conv_no_stride(input, weight, bias=None, stride=1, padding=0, dilation=1):
    return F.conv2d(input, weight, bias, 1, padding, dilation)


def conv_no_padding(input, weight, bias=None, stride=1, padding=0, dilation=1):
    return F.conv2d(input, weight, bias, stride, 0, dilation)


def conv_no_dilation(input, weight, bias=None, stride=1, padding=0, dilation=1):
    return F.conv2d(input, weight, bias, stride, padding, 1)


def conv_off_by_one(input, weight, bias=None, stride=1, padding=0, dilation=1):
    return F.conv2d(F.pad(input, (0, 1, 0, 1)), weight, bias, stride, padding, dilation)  # one row/column too many


def conv_numpy(input, weight, bias=None, stride=1, padding=0, dilation=1):
    return F.conv2d(input.detach(), weight.detach(), None if bias is None else bias.detach(), stride, padding, dilation)


def conv_not_done(input, weight, bias=None, stride=1, padding=0, dilation=1):
    raise NotImplementedError()


def conv_bad_index(input, weight, bias=None, stride=1, padding=0, dilation=1):
    return input[:, :, :, :, 0]  # IndexError


def conv_nan(input, weight, bias=None, stride=1, padding=0, dilation=1):
    return F.conv2d(input, weight, bias, stride, padding, dilation) * float("nan")


def conv_padding_one_side(input, weight, bias=None, stride=1, padding=0, dilation=1):
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return F.conv2d(F.pad(input, (2 * pw, 0, 2 * ph, 0)), weight, bias, stride, 0, dilation)


def conv_list(input, weight, bias=None, stride=1, padding=0, dilation=1):
    return F.conv2d(input, weight, bias, stride, padding, dilation).tolist()


CONV_MUTANTS = {
    conv_flipped: "flipped kernel",
    conv_no_bias: "bias ignored",
    conv_no_stride: "stride ignored",
    conv_no_padding: "padding ignored",
    conv_no_dilation: "dilation ignored",
    conv_off_by_one: "off by one",
    conv_numpy: "breaks the autograd graph",
    conv_not_done: "not done yet",
    conv_bad_index: "your code raised IndexError",
    conv_nan: "NaN",
    conv_list: "expected a torch.Tensor, got list",
    conv_padding_one_side: "the configurations before passed, so look at the padding",
}


@pytest.mark.parametrize("fn", [conv2d, conv2d_naive, F.conv2d], ids=["im2col", "naive", "torch"])
def test_conv2d_references_pass(fn):
    grading.check_conv2d(fn)


@pytest.mark.parametrize("mutant", CONV_MUTANTS, ids=lambda f: f.__name__)
def test_conv2d_mutants(mutant):
    message = _fails_with(grading.check_conv2d, mutant, CONV_MUTANTS[mutant])
    assert "stride=" in message or mutant is conv_not_done  # the failing configuration is named
    assert "Traceback" not in message


def pool_avg(input, kernel_size, stride=None, padding=0):
    return F.avg_pool2d(input, kernel_size, stride, padding)


def pool_stride_one(input, kernel_size, stride=None, padding=0):
    return F.max_pool2d(input, kernel_size, 1 if stride is None else stride, padding)


def pool_zero_pad(input, kernel_size, stride=None, padding=0):
    return F.max_pool2d(F.pad(input, (padding,) * 4), kernel_size, stride)


def pool_detached(input, kernel_size, stride=None, padding=0):
    return F.max_pool2d(input.detach(), kernel_size, stride, padding)


POOL_MUTANTS = {
    pool_avg: "average pooling",
    pool_stride_one: "stride defaults to kernel_size",
    pool_zero_pad: "padded with zeros",
    pool_detached: "breaks the autograd graph",
}


def test_max_pool2d_reference_passes():
    grading.check_max_pool2d(max_pool2d)
    grading.check_max_pool2d(F.max_pool2d)


@pytest.mark.parametrize("mutant", POOL_MUTANTS, ids=lambda f: f.__name__)
def test_max_pool2d_mutants(mutant):
    _fails_with(grading.check_max_pool2d, mutant, POOL_MUTANTS[mutant])


# --- Chapter 2 -----------------------------------------------------------------------------------------


def attention(q, k, v, mask=None, dim=-1, scale=None, fill=float("-inf"), invert=False, after=False, bias=None):
    """A correct attention by default; the keywords switch on the classic mistakes."""
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if bias is not None:
        scores = scores + bias
    if mask is not None and not after:
        scores = scores.masked_fill(mask if invert else ~mask, fill)
    weights = scores.softmax(dim)
    if mask is not None and after:
        weights = weights * mask
    return weights @ v


def distance_bias(slopes, n, m, signed=False, sign=-1, divide=1.0, flip=False):
    """ALiBi's bias -slopes[h] * |i - j|, (h, n, m), correct by default; the keywords switch on the mistakes."""
    d = torch.arange(n)[:, None] - torch.arange(m)[None, :]
    d = d if signed else d.abs()
    s = slopes.flip(0) if flip else slopes
    return sign * s[:, None, None] * d / divide


def alibi(q, k, v, slopes, mask=None, bias_kw=None, **mistake):
    """ALiBi attention, correct by default; ``bias_kw`` and ``mistake`` switch on the classic mistakes."""
    bias = distance_bias(slopes, q.shape[-2], k.shape[-2], **(bias_kw or {}))
    return attention(q, k, v, mask, bias=bias, **mistake)


def alibi_sdpa(q, k, v, slopes, mask=None):
    bias = distance_bias(slopes, q.shape[-2], k.shape[-2])
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias if mask is None else bias.masked_fill(~mask, -math.inf)
    )


ALIBI_MUTANTS = {
    "no position bias": lambda q, k, v, s, mask=None: attention(q, k, v, mask),  # the chapter's attention
    "wrong sign": lambda q, k, v, s, mask=None: alibi(q, k, v, s, mask, {"sign": 1}),
    "bias divided by sqrt(d_k) too": lambda q, k, v, s, mask=None: alibi(
        q, k, v, s, mask, {"divide": math.sqrt(q.shape[-1])}
    ),
    "slopes in the wrong order": lambda q, k, v, s, mask=None: alibi(q, k, v, s, mask, {"flip": True}),
    "signed distance i - j": lambda q, k, v, s, mask=None: alibi(q, k, v, s, mask, {"signed": True}),
    "softmax over the wrong axis": lambda q, k, v, s, mask=None: alibi(q, k, v, s, mask, dim=-2),
    "missing 1/sqrt(d_k) scale": lambda q, k, v, s, mask=None: alibi(q, k, v, s, mask, scale=1.0),
    "scaled by 1/d_k": lambda q, k, v, s, mask=None: alibi(q, k, v, s, mask, scale=1 / q.shape[-1]),
    "inverted mask": lambda q, k, v, s, mask=None: alibi(q, k, v, s, mask, invert=True),
    "mask ignored": lambda q, k, v, s, mask=None: alibi(q, k, v, s),
    "masked scores set to 0": lambda q, k, v, s, mask=None: alibi(q, k, v, s, mask, fill=0.0),
    "weights zeroed after the softmax": lambda q, k, v, s, mask=None: alibi(q, k, v, s, mask, after=True),
    "one row per key": lambda q, k, v, s, mask=None: torch.zeros(*k.shape[:-1], v.shape[-1]),
    "your code raised RuntimeError": lambda q, k, v, s, mask=None: attention(  # slopes broadcast over the batch
        q,
        k,
        v,
        mask,
        bias=-s.view(-1, 1, 1, 1) * (torch.arange(q.shape[-2])[:, None] - torch.arange(k.shape[-2])).abs(),
    ),
}


def test_alibi_attention_reference_passes():
    grading.check_alibi_attention(alibi)
    grading.check_alibi_attention(alibi_sdpa)  # the mask goes in as the fifth positional argument


@pytest.mark.parametrize("diagnosis", ALIBI_MUTANTS)
def test_alibi_attention_mutants(diagnosis):
    _fails_with(grading.check_alibi_attention, ALIBI_MUTANTS[diagnosis], diagnosis)


def test_alibi_attention_fails_the_chapters_own_attention():
    """The old exercise's answer, plain masked attention (the chapter shows it), does not pass the variant."""
    chapters_answer = lambda q, k, v, attn_mask=None: attention(q, k, v, attn_mask)  # noqa: E731
    _fails_with(grading.check_alibi_attention, chapters_answer)
    _fails_with(
        grading.check_alibi_attention, lambda q, k, v, s, mask=None: scaled_dot_product_attention(q, k, v, mask)
    )


def pe(n, dim, swap=False, concat=False, exponent=2, sign=-1, start=0):
    """Sinusoidal encodings, correct by default; the keywords switch on the classic mistakes."""
    pos = torch.arange(start, start + n, dtype=torch.float64)[:, None]
    i = torch.arange(dim // 2, dtype=torch.float64)
    angle = pos * 10000.0 ** (sign * exponent * i / dim)
    first, second = (angle.cos(), angle.sin()) if swap else (angle.sin(), angle.cos())
    if concat:
        return torch.cat([first, second], -1)
    return torch.stack([first, second], -1).reshape(n, dim)


PE_MUTANTS = {
    "sin and cos swapped": lambda n, dim: pe(n, dim, swap=True),
    "not interleaved": lambda n, dim: pe(n, dim, concat=True),
    "wrong frequencies": lambda n, dim: pe(n, dim, exponent=1),
    "frequencies grow": lambda n, dim: pe(n, dim, sign=1),
    "positions start at 1": lambda n, dim: pe(n, dim, start=1),
    "wrong output shape": lambda n, dim: pe(n, dim).T,
}


def test_positional_encoding_reference_passes():
    grading.check_positional_encoding(pe)
    grading.check_positional_encoding(sinusoidal_position_encoding)


@pytest.mark.parametrize("diagnosis", PE_MUTANTS)
def test_positional_encoding_mutants(diagnosis):
    _fails_with(grading.check_positional_encoding, PE_MUTANTS[diagnosis], diagnosis)


def test_split_and_merge_heads():
    grading.check_split_heads(lambda x, h: x.view(*x.shape[:2], h, -1).transpose(1, 2))
    grading.check_merge_heads(lambda x: x.transpose(1, 2).flatten(2))
    _fails_with(
        grading.check_split_heads, lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1), "without the transpose"
    )
    _fails_with(grading.check_split_heads, lambda x, h: x.view(*x.shape[:2], -1, h).permute(0, 3, 1, 2), "round-robin")
    _fails_with(grading.check_split_heads, lambda x, h: x.view(*x.shape[:2], h, -1), "wrong output shape")
    _fails_with(grading.check_merge_heads, lambda x: x.reshape(x.shape[0], x.shape[2], -1), "without the transpose")
    _fails_with(grading.check_merge_heads, lambda x: x.permute(0, 2, 3, 1).flatten(2), "interleaved")


def test_split_merge_match_multi_head_attention():
    # The graded split/merge are the ones MultiHeadAttention uses: split, attend, merge, project reproduce it.
    torch.manual_seed(0)
    mha = MultiHeadAttention(12, 3).eval()
    x = torch.randn(2, 5, 12)
    split = lambda t: t.view(2, 5, 3, 4).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(mha.q_proj(x)), split(mha.k_proj(x)), split(mha.v_proj(x)))
    torch.testing.assert_close(mha.out_proj(out.transpose(1, 2).reshape(2, 5, 12)), mha(x))


# --- Chapter 3 -----------------------------------------------------------------------------------------


def bn(x, weight, bias, eps=1e-5, dims=(0, 2, 3), correction=0, inside=True):
    mean, var = x.mean(dims, keepdim=True), x.var(dims, keepdim=True, correction=correction)
    std = (var + eps).sqrt() if inside else var.sqrt() + eps
    return (x - mean) / std * weight[:, None, None] + bias[:, None, None]


BN_MUTANTS = {
    "(that is layer norm)": lambda x, w, b, eps=1e-5: bn(x, w, b, eps, dims=(1, 2, 3)),
    "instance norm": lambda x, w, b, eps=1e-5: bn(x, w, b, eps, dims=(2, 3)),
    "over the batch only": lambda x, w, b, eps=1e-5: bn(x, w, b, eps, dims=(0,)),
    "unbiased variance": lambda x, w, b, eps=1e-5: bn(x, w, b, eps, correction=1),
    "eps outside the square root": lambda x, w, b, eps=1e-5: bn(x, w, b, eps, inside=False),
    "weight and bias ignored": lambda x, w, b, eps=1e-5: bn(x, torch.ones_like(w), torch.zeros_like(b), eps),
    "weight and bias swapped": lambda x, w, b, eps=1e-5: bn(x, b, w, eps),
}


def test_batch_norm_reference_passes():
    grading.check_batch_norm(bn)


@pytest.mark.parametrize("diagnosis", BN_MUTANTS)
def test_batch_norm_mutants(diagnosis):
    _fails_with(grading.check_batch_norm, BN_MUTANTS[diagnosis], diagnosis)


def smooth(logits, target, eps, others=False, use_logits=False, reduce="mean"):
    C = logits.shape[-1]
    onehot = F.one_hot(target, C).to(logits.dtype)
    q = onehot * (1 - eps) + (1 - onehot) * eps / (C - 1) if others else onehot * (1 - eps) + eps / C
    loss = -(q * (logits if use_logits else logits.log_softmax(-1))).sum(-1)
    return loss.mean() if reduce == "mean" else loss.sum() if reduce == "sum" else loss


LS_MUTANTS = {
    "smoothing ignored": lambda z, t, eps: smooth(z, t, 0.0),
    "C - 1 other classes": lambda z, t, eps: smooth(z, t, eps, others=True),
    "log_softmax missing": lambda z, t, eps: smooth(z, t, eps, use_logits=True),
    "summed over the batch": lambda z, t, eps: smooth(z, t, eps, reduce="sum"),
    "expected the mean loss": lambda z, t, eps: smooth(z, t, eps, reduce="none"),
}


def test_label_smoothing_reference_passes():
    grading.check_label_smoothing(smooth)


@pytest.mark.parametrize("diagnosis", LS_MUTANTS)
def test_label_smoothing_mutants(diagnosis):
    _fails_with(grading.check_label_smoothing, LS_MUTANTS[diagnosis], diagnosis)


# --- Chapter 4 -----------------------------------------------------------------------------------------


class SAGAN(nn.Module):
    """The old Exercise 4.1's answer: SAGAN's block as the chapter shows it (all positions, a C -> C value)."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels // reduction, 1)
        self.key = nn.Conv2d(channels, channels // reduction, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = (m(x).flatten(2).transpose(1, 2) for m in (self.query, self.key, self.value))
        o = (q @ k.transpose(1, 2)).softmax(-1) @ v
        return self.gamma * o.transpose(1, 2).reshape(B, C, H, W) + x


class Pooled(nn.Module):
    """BigGAN's pooled block, correct by default; the class attributes switch on the classic mistakes."""

    gamma_init, residual, softmax_dim, scaled, transpose = 0.0, True, -1, False, True
    pool, pool_first, pool_queries = "max", False, False

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.key = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.value = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.out = nn.Conv2d(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.full((), self.gamma_init))

    def forward(self, x):
        B, C, H, W = x.shape
        pool = {"max": lambda t: F.max_pool2d(t, 2), "avg": lambda t: F.avg_pool2d(t, 2), None: lambda t: t}[self.pool]
        q = self.query(pool(x) if self.pool_queries else x).flatten(2).transpose(1, 2)
        if self.pool_first:
            k, v = self.key(pool(x)), self.value(pool(x))
        else:
            k, v = pool(self.key(x)), pool(self.value(x))
        k, v = k.flatten(2).transpose(1, 2), v.flatten(2).transpose(1, 2)
        scores = q @ k.transpose(1, 2) / (math.sqrt(q.shape[-1]) if self.scaled else 1.0)
        o = scores.softmax(self.softmax_dim) @ v  # (B, HW, C/2)
        h, w = (H // 2, W // 2) if self.pool_queries else (H, W)
        o = o.transpose(1, 2).reshape(B, C // 2, h, w) if self.transpose else o.reshape(B, C // 2, h, w)
        o = self.gamma * self.out(o)
        return o + (F.max_pool2d(x, 2) if self.pool_queries else x) if self.residual else o


def pooled(**mistake):
    return type("Mutant", (Pooled,), mistake)


class PooledFixedGamma(Pooled):
    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__(channels, reduction)
        del self.gamma
        self.register_buffer("gamma", torch.zeros(()))


class PooledWithBias(Pooled):
    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__(channels, reduction)
        self.value = nn.Conv2d(channels, channels // 2, 1)


POOLED_MUTANTS = {
    "gamma must start at zero": pooled(gamma_init=1.0),
    "missing residual": pooled(residual=False),
    "softmax over the wrong axis": pooled(softmax_dim=1),
    "scaled by 1/sqrt(C/r)": pooled(scaled=True),
    "reshaped without the transpose": pooled(transpose=False),
    "average-pooled": pooled(pool="avg"),
    "keys and values not pooled": pooled(pool=None),
    "pooled before the 1x1 convolutions": pooled(pool_first=True),
    "the queries were pooled too": pooled(pool_queries=True),
    "gamma must be a learned nn.Parameter": PooledFixedGamma,
    "do not have the exercise's shapes": PooledWithBias,
}


def test_pooled_self_attention_2d_reference_passes():
    grading.check_pooled_self_attention_2d(Pooled)


@pytest.mark.parametrize("diagnosis", POOLED_MUTANTS)
def test_pooled_self_attention_2d_mutants(diagnosis):
    _fails_with(grading.check_pooled_self_attention_2d, POOLED_MUTANTS[diagnosis], diagnosis)


def test_pooled_self_attention_2d_fails_the_chapters_block():
    """The old exercise's answer, SAGAN's block as the chapter shows it, does not pass the variant."""
    for block in (SAGAN, SelfAttention2d):
        _fails_with(grading.check_pooled_self_attention_2d, block, "missing ['out']")
    _fails_with(grading.check_pooled_self_attention_2d, lambda c, r: nn.Identity(), "missing ['query', 'key'")


def effective(weights):
    return (-torch.special.xlogy(weights, weights).sum(-1)).exp()


EFFECTIVE_MUTANTS = {
    "that is the entropy": lambda w: -torch.special.xlogy(w, w).sum(-1),
    "exp of the entropy in bits": lambda w: (-torch.special.xlogy(w, w).sum(-1) / math.log(2)).exp(),
    "2 ** the entropy in nats": lambda w: 2 ** (-torch.special.xlogy(w, w).sum(-1)),
    "inverse participation ratio": lambda w: 1 / (w**2).sum(-1),
    "0 * log(0)": lambda w: (-(w * w.log()).sum(-1)).exp(),
    "one number per query": lambda w: (-torch.special.xlogy(w, w).sum(-2)).exp(),
}


def test_effective_positions_reference_passes():
    grading.check_effective_positions(effective)


@pytest.mark.parametrize("diagnosis", EFFECTIVE_MUTANTS)
def test_effective_positions_mutants(diagnosis):
    _fails_with(grading.check_effective_positions, EFFECTIVE_MUTANTS[diagnosis], diagnosis)


# --- Chapter 5 -----------------------------------------------------------------------------------------


def patchify(x, p, order=(0, 2, 4, 1, 3, 5)):
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(*order).reshape(B, (H // p) * (W // p), C * p * p)


PATCH_MUTANTS = {
    "wrong order: (row, column, channel)": lambda x, p: patchify(x, p, (0, 2, 4, 3, 5, 1)),
    "without the permute": lambda x, p: x.reshape(x.shape[0], -1, x.shape[1] * p * p),
    "column-major order": lambda x, p: patchify(x, p, (0, 4, 2, 1, 3, 5)),
    "wrong output shape": lambda x, p: F.unfold(x, p, stride=p),
}


def test_patchify_reference_passes():
    grading.check_patchify(patchify)
    grading.check_patchify(lambda x, p: F.unfold(x, p, stride=p).transpose(1, 2))


@pytest.mark.parametrize("diagnosis", PATCH_MUTANTS)
def test_patchify_mutants(diagnosis):
    _fails_with(grading.check_patchify, PATCH_MUTANTS[diagnosis], diagnosis)


def to_conv(proj, C, p, order="cpp", stride=None, bias=True):
    dim = proj.out_features
    conv = nn.Conv2d(C, dim, p, stride=p if stride is None else stride, bias=bias)
    w = proj.weight.view(dim, p, p, C).permute(0, 3, 1, 2) if order == "ppc" else proj.weight.view(dim, C, p, p)
    with torch.no_grad():
        conv.weight.copy_(w.transpose(-1, -2) if order == "transposed" else w)
        if bias:
            conv.bias.copy_(proj.bias)
    return conv


CONV_EMBED_MUTANTS = {
    "weight reshaped in the wrong order": lambda proj, C, p: to_conv(proj, C, p, order="ppc"),
    "stride 1 gives overlapping patches": lambda proj, C, p: to_conv(proj, C, p, stride=1),
    "bias missing": lambda proj, C, p: to_conv(proj, C, p, bias=False),
    "kernel transposed": lambda proj, C, p: to_conv(proj, C, p, order="transposed"),
    "expected an nn.Module": lambda proj, C, p: proj.weight,
}


def test_patch_embedding_conv_reference_passes():
    grading.check_patch_embedding_conv(to_conv)


@pytest.mark.parametrize("diagnosis", CONV_EMBED_MUTANTS)
def test_patch_embedding_conv_mutants(diagnosis):
    _fails_with(grading.check_patch_embedding_conv, CONV_EMBED_MUTANTS[diagnosis], diagnosis)


class Block(nn.Module):
    """The exercise's stub layers with a forward that is right by default, wrong when ``mistake`` is set."""

    mistake = None

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        m = self.mistake
        if m == "post-norm":
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        if m == "parallel":
            return x + self.attn(self.norm1(x)) + self.mlp(self.norm2(x))
        if m == "output norm":
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        x = (0 if m == "no attention residual" else x) + self.attn(self.norm1(x))
        norm = self.norm1 if m == "norm1 twice" else self.norm2
        return (0 if m == "no mlp residual" else x) + self.mlp(norm(x))


def block(mistake):
    return type("Mutant", (Block,), {"mistake": mistake})


ENCODER_MUTANTS = {
    "post-norm": block("post-norm"),
    "missing residual around the attention": block("no attention residual"),
    "missing residual around the MLP": block("no mlp residual"),
    "both branches read the block's input": block("parallel"),
    "norm1 used twice": block("norm1 twice"),
    "LayerNorm on the branch's output": block("output norm"),
}


def test_encoder_block_reference_passes():
    grading.check_encoder_block(Block)
    grading.check_encoder_block(EncoderBlock)


@pytest.mark.parametrize("diagnosis", ENCODER_MUTANTS)
def test_encoder_block_mutants(diagnosis):
    _fails_with(grading.check_encoder_block, ENCODER_MUTANTS[diagnosis], diagnosis)


def test_encoder_block_other_layers():
    _fails_with(grading.check_encoder_block, lambda d, h, m: nn.Linear(d, d), "must be those of the stub")


def rollout(attentions, combine="mean", residual=True, reverse=False):
    result = None
    for w in attentions:
        a = {"mean": w.mean(1), "max": w.amax(1), "sum": w.sum(1)}[combine]
        if residual:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype)
            a = a / a.sum(-1, keepdim=True)
        result = a if result is None else (result @ a if reverse else a @ result)
    return result


def mean_pool_rollout(attentions, **mistake):
    return rollout(attentions, **mistake).mean(1)


MEAN_POOL_MUTANTS = {
    "row 0 of the rollout": lambda ws: rollout(ws)[:, 0],  # the class token's row, as the chapter reads it
    "that is the whole rollout matrix": lambda ws: rollout(ws),  # the old exercise's answer
    "as if it were a class token": lambda ws: rollout(ws)[:, 0, 1:],  # the chapter's picture, patches only
    "averaged within each row": lambda ws: rollout(ws).mean(-1),
    "summed over the output tokens": lambda ws: rollout(ws).sum(1),
    "the diagonal of R": lambda ws: rollout(ws).diagonal(dim1=-2, dim2=-1),
    "wrong order": lambda ws: mean_pool_rollout(ws, reverse=True),
    "residual missing": lambda ws: mean_pool_rollout(ws, residual=False),
    "by their maximum": lambda ws: mean_pool_rollout(ws, combine="max"),
}


def test_mean_pool_rollout_reference_passes():
    grading.check_mean_pool_rollout(mean_pool_rollout)
    grading.check_mean_pool_rollout(lambda ws: attention_rollout(ws).mean(1))


@pytest.mark.parametrize("diagnosis", MEAN_POOL_MUTANTS)
def test_mean_pool_rollout_mutants(diagnosis):
    _fails_with(grading.check_mean_pool_rollout, MEAN_POOL_MUTANTS[diagnosis], diagnosis)


# --- Chapter 6 -----------------------------------------------------------------------------------------


def cosine(f, t, temperature, norm_f=True, norm_t=True, op="divide", softmax=False):
    f = F.normalize(f, dim=-1) if norm_f else f
    t = F.normalize(t, dim=-1) if norm_t else t
    cos = f @ t.T
    logits = {"divide": cos / temperature, "multiply": cos * temperature, "none": cos}[op]
    return logits.softmax(-1) if softmax else logits


COSINE_MUTANTS = {
    "image features not normalised": lambda f, t, tau: cosine(f, t, tau, norm_f=False),
    "class embeddings not normalised": lambda f, t, tau: cosine(f, t, tau, norm_t=False),
    "neither side normalised": lambda f, t, tau: cosine(f, t, tau, norm_f=False, norm_t=False),
    "multiplied by the temperature": lambda f, t, tau: cosine(f, t, tau, op="multiply"),
    "temperature missing": lambda f, t, tau: cosine(f, t, tau, op="none"),
    "softmax applied": lambda f, t, tau: cosine(f, t, tau, softmax=True),
}


def test_cosine_head_reference_passes():
    grading.check_cosine_head(cosine)


@pytest.mark.parametrize("diagnosis", COSINE_MUTANTS)
def test_cosine_head_mutants(diagnosis):
    _fails_with(grading.check_cosine_head, COSINE_MUTANTS[diagnosis], diagnosis)


def test_cosine_head_matches_companion_classifier():
    # The graded formula is what companion.llm.CosineClassifier computes (exp(logit_scale) = 1 / temperature).
    from companion.models import CosineClassifier

    torch.manual_seed(0)
    head = CosineClassifier(6, torch.randn(5, 8), init_temperature=0.07)
    f = torch.randn(4, 6)
    torch.testing.assert_close(head(f), cosine(head.proj(f), head.text, 0.07))


ENSEMBLE_MUTANTS = {
    "not re-normalised": lambda e: F.normalize(e, dim=-1).mean(1),
    "averaged before normalising": lambda e: F.normalize(e.mean(1), dim=-1),
    "no normalisation at all": lambda e: e.mean(1),
    "averaged over the classes": lambda e: F.normalize(F.normalize(e, dim=-1).mean(0), dim=-1),
}


def test_prompt_ensemble_reference_passes():
    from companion.llm import ensemble

    grading.check_prompt_ensemble(ensemble)


@pytest.mark.parametrize("diagnosis", ENSEMBLE_MUTANTS)
def test_prompt_ensemble_mutants(diagnosis):
    _fails_with(grading.check_prompt_ensemble, ENSEMBLE_MUTANTS[diagnosis], diagnosis)


def caption_scores(logits, captions, pad, reduce="mean", shift=1, log=True, count="targets"):
    """Mean log-probability per real target token, correct by default; the keywords switch on the mistakes."""
    targets = captions[:, shift : captions.shape[1] - 1 + shift]
    logp = logits.log_softmax(-1) if log else logits
    picked = logp.gather(-1, targets.expand(logits.shape[0], -1, -1)[..., None])[..., 0]  # (N, K, L - 1)
    real = targets != pad
    total = (picked * real).sum(-1)
    if reduce == "sum":
        return total
    if reduce == "all":
        return picked.mean(-1)
    n = {"targets": real.sum(-1), "padded": targets.shape[-1], "with start": (captions != pad).sum(-1)}[count]
    return total / n


def caption_scores_by_loss(logits, captions, pad):
    """The same score with F.cross_entropy's ignore_index: minus the mean loss over the real targets."""
    N, K, T, V = logits.shape
    targets = captions[:, 1:].expand(N, -1, -1)
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=pad, reduction="none")
    return -loss.view(N, K, T).sum(-1) / (targets != pad).sum(-1)


CAPTION_MUTANTS = {
    "summed log-probabilities": lambda z, c, pad: caption_scores(z, c, pad, reduce="sum"),  # the chapter's score
    "padding counted": lambda z, c, pad: caption_scores(z, c, pad, reduce="all"),
    "divided by L - 1": lambda z, c, pad: caption_scores(z, c, pad, count="padded"),
    "the start token counted": lambda z, c, pad: caption_scores(z, c, pad, count="with start"),
    "targets not shifted": lambda z, c, pad: caption_scores(z, c, pad, shift=0),
    "log_softmax missing": lambda z, c, pad: caption_scores(z, c, pad, log=False),
    "one score per (image, caption)": lambda z, c, pad: caption_scores(z, c, pad)[0],
}


def test_caption_scores_reference_passes():
    grading.check_caption_scores(caption_scores)
    grading.check_caption_scores(caption_scores_by_loss)


@pytest.mark.parametrize("diagnosis", CAPTION_MUTANTS)
def test_caption_scores_mutants(diagnosis):
    _fails_with(grading.check_caption_scores, CAPTION_MUTANTS[diagnosis], diagnosis)


def test_caption_scores_fail_the_old_exercise():
    """The old Exercise 6.3's answer (the causal mask the chapter shows) is not a scoring function at all."""
    _fails_with(grading.check_caption_scores, lambda n: torch.ones(n, n, dtype=torch.bool).tril(), "your code raised")


# --- All checks ----------------------------------------------------------------------------------------

REFERENCES = {
    grading.check_conv_output_size: size_ok,
    grading.check_conv2d: conv2d_naive,
    grading.check_max_pool2d: max_pool2d,
    grading.check_alibi_attention: alibi,
    grading.check_positional_encoding: pe,
    grading.check_split_heads: lambda x, h: x.view(*x.shape[:2], h, -1).transpose(1, 2),
    grading.check_merge_heads: lambda x: x.transpose(1, 2).flatten(2),
    grading.check_batch_norm: bn,
    grading.check_label_smoothing: smooth,
    grading.check_pooled_self_attention_2d: Pooled,
    grading.check_effective_positions: effective,
    grading.check_patchify: patchify,
    grading.check_patch_embedding_conv: to_conv,
    grading.check_encoder_block: Block,
    grading.check_mean_pool_rollout: mean_pool_rollout,
    grading.check_cosine_head: cosine,
    grading.check_prompt_ensemble: lambda e: F.normalize(F.normalize(e, dim=-1).mean(1), dim=-1),
    grading.check_caption_scores: caption_scores,
}


def test_every_check_is_covered():
    assert {c.__name__ for c in REFERENCES} == set(grading.__all__)


@pytest.mark.parametrize("check", REFERENCES, ids=lambda c: c.__name__)
def test_not_implemented_and_raising(check):
    def not_done(*args, **kwargs):
        raise NotImplementedError()

    def raises(*args, **kwargs):
        raise RuntimeError("boom")

    def returns_none(*args, **kwargs):
        return None

    _fails_with(check, not_done, check.__name__, "not done yet")
    _fails_with(check, torch.zeros(3), "expected a function or a class, got Tensor")
    _fails_with(check, raises, "your code raised RuntimeError: boom")
    assert "got NoneType" in _fails_with(check, returns_none) or "expected an int" in _fails_with(check, returns_none)


@pytest.mark.parametrize("check", REFERENCES, ids=lambda c: c.__name__)
def test_checks_are_fast(check):
    start = time.perf_counter()
    check(REFERENCES[check])
    assert time.perf_counter() - start < 1.0


# --- Forbidden calls: the exercises that say "do not call F.xxx" fail a solution that calls it ----------


def _sdpa_alias():
    from torch.nn.functional import scaled_dot_product_attention as sdpa  # bound before the check starts

    return lambda q, k, v, s, mask=None: sdpa(
        q,
        k,
        v,
        attn_mask=distance_bias(s, q.shape[-2], k.shape[-2]).masked_fill(~mask, -math.inf)
        if mask is not None
        else distance_bias(s, q.shape[-2], k.shape[-2]),
    )


FORBIDDEN = {
    "F.scaled_dot_product_attention": (grading.check_alibi_attention, alibi_sdpa),
    "F.scaled_dot_product_attention ": (grading.check_alibi_attention, _sdpa_alias()),
    "companion.attention.scaled_dot_product_attention": (
        grading.check_alibi_attention,
        lambda q, k, v, s, mask=None: scaled_dot_product_attention(
            q,
            k,
            v,
            distance_bias(s, q.shape[-2], k.shape[-2]).masked_fill(~mask, -math.inf)
            if mask is not None
            else distance_bias(s, q.shape[-2], k.shape[-2]),
        ),
    ),
    "F.conv2d": (grading.check_conv2d, F.conv2d),
    "companion.conv.conv2d_naive": (grading.check_conv2d, conv2d_naive),
    "F.max_pool2d": (
        grading.check_max_pool2d,
        lambda x, k, stride=None, padding=0: nn.MaxPool2d(k, stride, padding)(x),
    ),
    "F.batch_norm": (grading.check_batch_norm, lambda x, w, b, eps=1e-5: F.batch_norm(x, None, None, w, b, True)),
    "F.cross_entropy": (grading.check_label_smoothing, lambda z, y, e: F.cross_entropy(z, y, label_smoothing=e)),
    "F.unfold": (grading.check_patchify, lambda x, p: F.unfold(x, p, stride=p).transpose(1, 2)),
    "companion.models.SelfAttention2d": (
        grading.check_pooled_self_attention_2d,
        type("Sub", (Pooled,), {"forward": lambda self, x: SelfAttention2d.forward(self, x)}),
    ),
    "companion.models.EncoderBlock": (grading.check_encoder_block, type("Sub", (EncoderBlock,), {})),
    "companion.models.vit.attention_rollout": (
        grading.check_mean_pool_rollout,
        lambda ws: attention_rollout(ws).mean(1),
    ),
}


@pytest.mark.parametrize("name", FORBIDDEN)
def test_forbidden_call_fails_however_it_is_imported(name):
    check, fn = FORBIDDEN[name]
    _fails_with(check, fn, f"your code calls {name.strip()}", "asks you not to use")


def test_forbidden_calls_leave_allowed_code_alone():
    grading.check_alibi_attention(alibi)  # softmax and matmul: allowed
    grading.check_max_pool2d(lambda x, k, stride=None, padding=0: _unfold_pool(x, k, stride, padding))
    assert sys.getprofile() is None  # the watch ends with the check
    with pytest.raises(AssertionError):
        grading.check_conv2d(F.conv2d)
    assert sys.getprofile() is None


def _unfold_pool(x, k, stride, padding):
    k, s = (k, k) if isinstance(k, int) else k, stride or k
    s = (s, s) if isinstance(s, int) else s
    x = F.pad(x, (padding,) * 4, value=float("-inf"))
    return x.unfold(2, k[0], s[0]).unfold(3, k[1], s[1]).amax((-1, -2))
