"""Graders for the book's coding exercises: each ``check_*`` runs a student's code and diagnoses mistakes.

A check compares the student's function (or class) with PyTorch or the companion's tested reference over
many seeded random configurations, gradients included where it matters. It prints one line when all
match and raises ``AssertionError`` otherwise, with a diagnosis: the configuration that failed and, when
the result equals what a classic mistake computes (a flipped kernel, softmax over the wrong axis, a
missing ``1/sqrt(d)``, an inverted mask, heads split without the transpose, ...), that mistake by name
and where to look. Garbage (a function that raises, a wrong shape, NaN) gets a message too, never a
traceback from inside the grader. An exercise that forbids a library call (``F.conv2d`` for a convolution
written by hand, the book's own reference) fails when the student's code calls it, however it was imported.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "check_alibi_attention",
    "check_batch_norm",
    "check_caption_scores",
    "check_conv2d",
    "check_conv_output_size",
    "check_cosine_head",
    "check_effective_positions",
    "check_encoder_block",
    "check_label_smoothing",
    "check_max_pool2d",
    "check_mean_pool_rollout",
    "check_merge_heads",
    "check_patch_embedding_conv",
    "check_patchify",
    "check_pooled_self_attention_2d",
    "check_positional_encoding",
    "check_prompt_ensemble",
    "check_split_heads",
]

Mistakes = Sequence[tuple[Any, str]]  # (what the mistake computes, its diagnosis)


def _forbidden(check: str) -> list[tuple[Any, str]]:
    """The calls exercise ``check`` forbids, as (function, name): PyTorch's implementation and the book's references."""
    from companion import attention, conv
    from companion.models import EncoderBlock, SelfAttention2d
    from companion.models.vit import attention_rollout

    nn_c = torch._C._nn
    table: dict[str, list[tuple[Any, str]]] = {
        "check_conv_output_size": [(conv.conv_output_size, "companion.conv.conv_output_size")],
        "check_conv2d": [
            (torch.conv2d, "F.conv2d (nn.Conv2d calls it)"),
            (torch.convolution, "torch.convolution"),
            (nn_c.im2col, "F.unfold"),
            (conv.conv2d, "companion.conv.conv2d"),
            (conv.conv2d_naive, "companion.conv.conv2d_naive"),
            (conv.im2col, "companion.conv.im2col"),
            (conv.correlate2d, "companion.conv.correlate2d"),
        ],
        "check_max_pool2d": [
            (torch.max_pool2d, "F.max_pool2d (nn.MaxPool2d calls it)"),
            (nn_c.max_pool2d_with_indices, "F.max_pool2d_with_indices"),
            (conv.max_pool2d, "companion.conv.max_pool2d"),
        ],
        "check_alibi_attention": [
            (nn_c.scaled_dot_product_attention, "F.scaled_dot_product_attention"),
            (attention.scaled_dot_product_attention, "companion.attention.scaled_dot_product_attention"),
            (attention.attention_weights, "companion.attention.attention_weights"),
        ],
        "check_positional_encoding": [
            (attention.sinusoidal_position_encoding, "companion.attention.sinusoidal_position_encoding")
        ],
        "check_batch_norm": [(torch.batch_norm, "F.batch_norm (nn.BatchNorm2d calls it)")],
        "check_label_smoothing": [(nn_c.cross_entropy_loss, "F.cross_entropy")],
        "check_pooled_self_attention_2d": [(SelfAttention2d.forward, "companion.models.SelfAttention2d")],
        "check_patchify": [(nn_c.im2col, "F.unfold")],
        "check_encoder_block": [(EncoderBlock.forward, "companion.models.EncoderBlock")],
        "check_mean_pool_rollout": [(attention_rollout, "companion.models.vit.attention_rollout")],
    }
    return table.get(check, [])


def _key(fn: Any) -> tuple[int, str]:
    """Identify a built-in function by its owner and name (a bound built-in is a new object at every access)."""
    return id(getattr(fn, "__self__", None)), getattr(fn, "__name__", "")


@contextmanager
def _watching(forbid: list[tuple[Any, str]], seen: list[str]) -> Iterator[None]:
    """Record in ``seen`` each forbidden function called inside the block, however the caller got hold of it."""
    codes = {fn.__code__: name for fn, name in forbid if hasattr(fn, "__code__")}
    builtins = {_key(fn): name for fn, name in forbid if not hasattr(fn, "__code__")}

    def profile(frame: Any, event: str, arg: Any) -> None:
        name = builtins.get(_key(arg)) if event == "c_call" else codes.get(frame.f_code) if event == "call" else None
        if name is not None and name not in seen:
            seen.append(name)

    previous = sys.getprofile()
    sys.setprofile(profile if forbid else previous)
    try:
        yield
    finally:
        sys.setprofile(previous)


class _Grader:
    """Runs a student's code for one check and turns every way it can go wrong into a clear AssertionError."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.forbid = _forbidden(name)

    def fail(self, message: str) -> NoReturn:
        raise AssertionError(f"{self.name}: {message}")

    def call(self, fn: Callable, *args: Any, where: str, **kwargs: Any) -> Any:
        """Call the student's code; an exception becomes a failure that says where and how it was called."""
        if not callable(fn):
            self.fail(
                f"expected a function or a class, got {type(fn).__name__}: pass it without calling it, "
                f"{self.name}(my_function)"
            )
        seen: list[str] = []
        try:
            with _watching(self.forbid, seen):
                out = fn(*args, **kwargs)
        except NotImplementedError:
            self.fail("not done yet: the code still raises NotImplementedError; write your solution in its place")
        except Exception as err:  # the student's bug, reported, not re-raised from inside the grader
            self.fail(f"your code raised {type(err).__name__}: {err}\n  (while running: {where})")
        finally:
            if seen:  # checked first: a forbidden call that also raised is still a forbidden call
                self.fail(f"your code calls {seen[0]}, which this exercise asks you not to use; write it yourself")
        return out

    def tensor(self, out: Any, shape: tuple[int, ...] | None, where: str, hint: str = "") -> Tensor:
        """Check that ``out`` is a finite tensor of the expected shape."""
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor):
            self.fail(f"expected one tensor, got a pair (output, weights?); return only the output\n  ({where})")
        if not isinstance(out, Tensor):
            self.fail(f"expected a torch.Tensor, got {type(out).__name__}\n  ({where})")
        if shape is not None and tuple(out.shape) != tuple(shape):
            self.fail(f"wrong output shape {tuple(out.shape)}, expected {tuple(shape)}{hint}\n  ({where})")
        if out.is_floating_point() and not torch.isfinite(out).all():
            self.fail(
                f"the output holds NaN or inf ({int((~torch.isfinite(out)).sum())} entries)\n  ({where}); "
                "look for a division by zero, log(0), or a softmax over a row of -inf"
            )
        return out

    def compare(
        self, got: Tensor, expected: Tensor, where: str, mistakes: Mistakes = (), atol: float = 1e-6, hint: str = ""
    ) -> None:
        """Fail unless got == expected; name the first catalogued mistake whose result equals got."""
        if _close(got, expected, atol):
            return
        for wrong, diagnosis in mistakes:
            if isinstance(wrong, Tensor) and _close(got, wrong, atol):
                self.fail(f"{diagnosis}\n  ({where})")
        err = (got.double() - expected.double()).abs().max().item()
        self.fail(f"wrong values: largest difference {err:.3g} from the reference{hint}\n  ({where})")


def _close(a: Tensor, b: Tensor, atol: float) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=atol, rtol=1e-5)


def _passed(name: str, what: str) -> None:
    print(f"{name}: passed ({what})")


# --- Chapter 1: convolution and pooling ---------------------------------------------------------------


def _out_len(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def check_conv_output_size(fn: Callable[..., int]) -> None:
    """Check ``fn(n, kernel_size, stride=1, padding=0, dilation=1) -> int`` against the output-size formula."""
    g = _Grader("check_conv_output_size")
    configs = [
        (n, k, s, p, d)
        for n in (5, 8, 11, 32)
        for k in (1, 2, 3, 5)
        for s in (1, 2, 3)
        for p in (0, 1, 2)
        for d in (1, 2)
        if n + 2 * p >= d * (k - 1) + 1
    ]
    formulas = [
        (lambda n, k, s, p, d: _out_len(n, k, s, p, 1), "dilation ignored: a dilated kernel spans d(k-1)+1 pixels"),
        (lambda n, k, s, p, d: (n + p - d * (k - 1) - 1) // s + 1, "padding counted once: it adds p on each side, 2p"),
        (
            lambda n, k, s, p, d: -(-(n + 2 * p - d * (k - 1) - 1) // s) + 1,
            "ceil instead of floor: a window that does not fit entirely is dropped, so round down",
        ),
        (
            lambda n, k, s, p, d: (n + 2 * p - d * (k - 1) - 1) // s,
            "off by one: the first window also counts, floor((n + 2p - d(k-1) - 1) / s) + 1",
        ),
        (
            lambda n, k, s, p, d: (n + 2 * p - d * (k - 1)) // s + 1,
            "off by one: the kernel's extent is d(k-1)+1, so subtract d(k-1) + 1, not d(k-1)",
        ),
        (lambda n, k, s, p, d: _out_len(n, k, 1, p, d), "stride ignored: divide by s before adding 1"),
    ]
    got = {}
    for n, k, s, p, d in configs:
        where = f"fn({n}, kernel_size={k}, stride={s}, padding={p}, dilation={d})"
        out = g.call(fn, n, kernel_size=k, stride=s, padding=p, dilation=d, where=where)
        if isinstance(out, bool) or not isinstance(out, int):
            if isinstance(out, float) and out == int(out):
                g.fail(f"returned the float {out}; return an int (use // for the division)\n  ({where})")
            g.fail(f"expected an int, got {out!r}\n  ({where})")
        got[(n, k, s, p, d)] = out
    wrong = [c for c in configs if got[c] != _out_len(*c)]
    if not wrong:
        return _passed(g.name, f"{len(configs)} configurations")
    for formula, diagnosis in formulas:
        if all(got[c] == formula(*c) for c in configs):
            g.fail(diagnosis)
    n, k, s, p, d = wrong[0]
    g.fail(
        f"fn({n}, kernel_size={k}, stride={s}, padding={p}, dilation={d}) returned {got[wrong[0]]}, expected "
        f"{_out_len(n, k, s, p, d)} (and {len(wrong)} of {len(configs)} configurations are wrong)"
    )


def _conv_configs() -> list[dict]:
    """Seeded conv2d configurations, in stages: plain, bias, stride, padding, dilation, all together."""
    gen = torch.Generator().manual_seed(0)

    def r(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    configs = []
    for stage in ("plain", "bias", "stride", "padding", "dilation", "all"):
        for _ in range(4):
            kh, kw = r(1, 3), r(2, 3)
            c = {"stage": stage, "B": r(1, 2), "C_in": r(1, 3), "C_out": r(1, 3), "H": r(5, 9), "W": r(5, 9)}
            c["kernel"] = (kh, kw)
            c["bias"] = stage in ("bias", "all")
            c["stride"] = (r(2, 3), r(1, 3)) if stage in ("stride", "all") else 1
            c["padding"] = (r(1, 2), r(0, 2)) if stage in ("padding", "all") else 0
            c["dilation"] = (2, r(1, 2)) if stage in ("dilation", "all") else 1
            configs.append(c)
    return configs


def check_conv2d(fn: Callable[..., Tensor]) -> None:
    """Check ``fn(input, weight, bias=None, stride=1, padding=0, dilation=1)`` against ``F.conv2d``, gradients too."""
    g = _Grader("check_conv2d")
    gen = torch.Generator().manual_seed(1)
    configs = _conv_configs()
    for c in configs:
        x = torch.randn(c["B"], c["C_in"], c["H"], c["W"], generator=gen, dtype=torch.float64)
        w = torch.randn(c["C_out"], c["C_in"], *c["kernel"], generator=gen, dtype=torch.float64)
        b = torch.randn(c["C_out"], generator=gen, dtype=torch.float64) if c["bias"] else None
        s, p, d = c["stride"], c["padding"], c["dilation"]
        where = (
            f"input {tuple(x.shape)}, weight {tuple(w.shape)}, bias {'given' if b is not None else 'None'}, "
            f"stride={s}, padding={p}, dilation={d}"
        )
        expected = F.conv2d(x, w, b, s, p, d)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        bg = b.clone().requires_grad_() if b is not None else None
        out = g.call(fn, xg, wg, bg, stride=s, padding=p, dilation=d, where=where)
        shape_hint = _conv_shape_hint(out, expected, x, w, s, p, d)
        out = g.tensor(out, tuple(expected.shape), where, shape_hint)
        mistakes = [
            (
                F.conv2d(x, w.flip(-1, -2), b, s, p, d),
                "flipped kernel: that is a true convolution; deep-learning "
                "libraries compute the cross-correlation, sum x[i + m, j + n] * w[m, n], with the kernel unflipped",
            ),
            (
                F.conv2d(x, w.transpose(-1, -2), b, s, p, d) if w.shape[-1] == w.shape[-2] else None,
                "kernel transposed: index the weight as w[c_out, c_in, m (rows), n (columns)]",
            ),
            (
                F.conv2d(x, w, None, s, p, d) if b is not None else None,
                "bias ignored: add bias[c_out] to every position of output channel c_out",
            ),
        ]
        stage = c["stage"]
        hint = "" if stage in ("plain", "all") else f"; the configurations before passed, so look at the {stage}"
        g.compare(out.detach(), expected, where, mistakes, hint=hint)
        grad_out = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
        if not out.requires_grad:
            g.fail(
                f"the output does not require grad: your function breaks the autograd graph (numpy, .item(), "
                f".detach() or torch.no_grad()); use tensor operations only\n  ({where})"
            )
        out.backward(grad_out)
        ref = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
        F.conv2d(ref[0], ref[1], ref[2] if b is not None else None, s, p, d).backward(grad_out)
        for name, mine, theirs in zip(("input", "weight", "bias"), (xg, wg, bg), ref):
            if mine.grad is None:
                g.fail(f"no gradient reaches the {name}: is it used through a copy or .data?\n  ({where})")
            g.compare(mine.grad, theirs.grad, f"gradient of the {name}; {where}")
    _passed(g.name, f"{len(configs)} configurations with stride, padding, dilation and bias, gradients included")


def _conv_shape_hint(out: Any, expected: Tensor, x: Tensor, w: Tensor, s: Any, p: Any, d: Any) -> str:
    """Name the mistake behind a wrong conv output shape (stride, padding or dilation ignored, off by one)."""
    if not isinstance(out, Tensor) or out.ndim != 4 or out.shape == expected.shape:
        return ""
    got, want = tuple(out.shape[2:]), tuple(expected.shape[2:])
    for alt, what in (
        (F.conv2d(x, w, None, 1, p, d), "stride ignored: step the window by the stride"),
        (F.conv2d(x, w, None, s, 0, d), "padding ignored: pad the input with zeros (F.pad) first"),
        (F.conv2d(x, w, None, s, p, 1), "dilation ignored: a dilated kernel takes every d-th pixel"),
    ):
        if got == tuple(alt.shape[2:]) and got != want:
            return f": {what}"
    if all(abs(a - b) <= 1 for a, b in zip(got, want)):
        return ": output size off by one; it is floor((H + 2p - d(k-1) - 1) / s) + 1"
    return ""


def check_max_pool2d(fn: Callable[..., Tensor]) -> None:
    """Check ``fn(input, kernel_size, stride=None, padding=0)`` against ``F.max_pool2d``, gradient included."""
    g = _Grader("check_max_pool2d")
    gen = torch.Generator().manual_seed(2)
    configs = [(2, None, 0), (3, None, 0), (2, 1, 0), (3, 2, 0), ((2, 3), (1, 2), 0), (3, 2, 1), (2, 2, 1), (3, 1, 1)]
    for k, s, p in configs:
        x = torch.randn(2, 3, 7, 8, generator=gen, dtype=torch.float64)
        if p:
            x = -x.abs() - 0.1  # all negative: padding must never win
        where = f"input {tuple(x.shape)}, kernel_size={k}, stride={s}, padding={p}"
        expected = F.max_pool2d(x, k, s, p)
        xg = x.clone().requires_grad_()
        out = g.call(fn, xg, k, stride=s, padding=p, where=where) if s is not None else g.call(fn, xg, k, where=where)
        hint = ""
        if isinstance(out, Tensor) and out.ndim == 4 and out.shape != expected.shape:
            if s is None and out.shape[2:] == F.max_pool2d(x, k, 1, p).shape[2:]:
                hint = ": stride defaults to kernel_size in F.max_pool2d (non-overlapping windows), not to 1"
            else:
                hint = ": output size is floor((H + 2p - k) / s) + 1"
        out = g.tensor(out, tuple(expected.shape), where, hint)
        pad = F.pad(x, (p, p, p, p))  # zero padding
        mistakes = [
            (F.avg_pool2d(x, k, s, p), "that is average pooling: take the maximum of each window (amax)"),
            (F.max_pool2d(pad, k, s, 0), "padded with zeros: on negative inputs a zero then wins; pad with -inf"),
        ]
        g.compare(out.detach(), expected, where, mistakes)
        if not out.requires_grad:
            g.fail(f"the output does not require grad: your function breaks the autograd graph\n  ({where})")
        grad_out = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
        out.backward(grad_out)
        ref = x.clone().requires_grad_()
        F.max_pool2d(ref, k, s, p).backward(grad_out)
        g.compare(
            xg.grad,
            ref.grad,
            f"gradient of the input; {where}",
            [(torch.zeros_like(x), "the gradient is zero: the output does not depend on the input through autograd")],
        )
    _passed(g.name, f"{len(configs)} configurations with stride and -inf padding, gradients included")


# --- Chapter 2: self-attention -----------------------------------------------------------------------


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    dim: int = -1,
    fill: float = float("-inf"),
    bias: Tensor | None = None,
) -> Tensor:
    """Attention with knobs for the catalogued mistakes (softmax axis, scale, fill value of the mask, a bias)."""
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, fill)
    return torch.softmax(scores, dim=dim) @ v


def _alibi_bias(slopes: Tensor, n: int, m: int, signed: bool = False) -> Tensor:
    """(h, n, m): -slopes[h] * |i - j| (or * (i - j) if ``signed``), query i and key j counted from 0."""
    i, j = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(m, dtype=torch.float64)[None, :]
    distance = i - j if signed else (i - j).abs()
    return -slopes.double()[:, None, None] * distance


def check_alibi_attention(fn: Callable[..., Tensor]) -> None:
    """Check ``fn(q, k, v, slopes, attn_mask=None)``: attention with linear biases (ALiBi), against PyTorch's.

    q (B, h, N, d_k), k (B, h, M, d_k), v (B, h, M, d_v), slopes (h,); the score of query i and key j in head h
    is ``q_i . k_j / sqrt(d_k) - slopes[h] * abs(i - j)``. The mask (bool, True = attend) is passed as the fifth
    positional argument, so the function may name it as it likes.
    """
    g = _Grader("check_alibi_attention")
    gen = torch.Generator().manual_seed(3)
    cases = [  # (B, h, N, M, d_k, d_v, masking); B != h, so that slopes broadcast over the batch fail loudly
        (2, 3, 5, 7, 4, 6, None),
        (3, 2, 6, 6, 8, 8, None),
        (1, 4, 6, 4, 16, 3, None),
        (2, 3, 5, 7, 4, 6, "mask"),
        (2, 3, 6, 6, 8, 4, "causal"),
    ]
    for B, h, N, M, d_k, d_v, masking in cases:
        q = torch.randn(B, h, N, d_k, generator=gen, dtype=torch.float64) * 2
        k = torch.randn(B, h, M, d_k, generator=gen, dtype=torch.float64) * 2
        v = torch.randn(B, h, M, d_v, generator=gen, dtype=torch.float64)
        slopes = 2.0 ** (-torch.arange(1, h + 1, dtype=torch.float64) * 4 / h)  # ALiBi's geometric slopes, 4 bits
        mask = None
        if masking == "mask":
            mask = torch.rand(N, M, generator=gen) < 0.6
            mask[:, 0], mask[:, 1] = True, False  # every query keeps a key and loses one
        elif masking == "causal":
            mask = torch.ones(N, M, dtype=torch.bool).tril()
        where = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, slopes {slopes.tolist()}, mask " + (
            "None"
            if mask is None
            else f"bool {tuple(mask.shape)}, True = attend" + (" (causal)" * (masking == "causal"))
        )
        bias = _alibi_bias(slopes, N, M)
        float_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        args = (qg, kg, vg, slopes.clone()) + ((mask,) if mask is not None else ())
        out = g.call(fn, *args, where=where)
        hint = ""
        if isinstance(out, Tensor) and out.ndim == 4 and out.shape[-2] == M != N:
            hint = ": one row per key; the output has one row per query, weights (N, M) @ v (M, d_v)"
        out = g.tensor(out, tuple(expected.shape), where, hint)

        alibi = partial(_attention, q, k, v, mask, bias=bias)  # a keyword given to alibi(...) replaces its default

        mistakes = [
            (
                _attention(q, k, v, mask),
                "no position bias: that is the chapter's attention; subtract slopes[h] * |i - j| from the "
                "scores of head h before the softmax",
            ),
            (alibi(bias=-bias), "bias with the wrong sign: distant keys must lose score, subtract slopes[h] * |i - j|"),
            (
                alibi(bias=bias / math.sqrt(d_k)),
                "bias divided by sqrt(d_k) too: scale q k^T by 1/sqrt(d_k) first, then subtract the bias",
            ),
            (
                alibi(bias=bias.flip(0)),
                "slopes in the wrong order: head h uses slopes[h] (broadcast as slopes[:, None, None] over (h, N, M))",
            ),
            (
                alibi(bias=_alibi_bias(slopes, N, M, signed=True)),
                "signed distance i - j: keys after the query then gain score; the distance is |i - j|",
            ),
            (
                alibi(dim=-2),
                "softmax over the wrong axis: each query's weights must sum to 1 over the keys, "
                "softmax(scores, dim=-1)",
            ),
            (alibi(scale=1.0), "missing 1/sqrt(d_k) scale: divide the scores q k^T by sqrt(d_k)"),
            (alibi(scale=1 / d_k), "scaled by 1/d_k: the scale is 1/sqrt(d_k)"),
        ]
        if mask is not None:
            mistakes += [
                (
                    _attention(q, k, v, ~mask, bias=bias),
                    "inverted mask: True means attend (as F.scaled_dot_product_attention); fill the scores where the "
                    "mask is False with -inf",
                ),
                (
                    _attention(q, k, v, bias=bias),
                    "mask ignored: set the scores of blocked keys to -inf before the softmax",
                ),
                (
                    alibi(fill=0.0),
                    "masked scores set to 0, which still gets weight exp(0); use -inf so blocked keys get weight 0",
                ),
                (
                    (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d_k) + bias, -1) * mask) @ v,
                    "weights zeroed after "
                    "the softmax, so rows no longer sum to 1; mask the scores with -inf before the softmax instead",
                ),
            ]
        g.compare(out.detach(), expected, where, mistakes)
        if not out.requires_grad:
            g.fail(f"the output does not require grad: your function breaks the autograd graph\n  ({where})")
        out.sum().backward()
        ref = [t.clone().requires_grad_() for t in (q, k, v)]
        F.scaled_dot_product_attention(*ref, attn_mask=float_mask).sum().backward()
        for name, mine, theirs in zip("qkv", (qg, kg, vg), ref):
            g.compare(mine.grad, theirs.grad, f"gradient of {name}; {where}")
    _passed(g.name, f"{len(cases)} cases: several heads, N != M, masked and causal; gradients included")


def _sincos(position: Tensor, freq: Tensor, swap: bool = False) -> Tensor:
    """(n, 1) positions and (dim / 2,) frequencies -> (n, dim), sin and cos interleaved (cos first if ``swap``)."""
    angle = position * freq  # (n, dim / 2)
    pair = [angle.cos(), angle.sin()] if swap else [angle.sin(), angle.cos()]
    return torch.stack(pair, -1).flatten(1)


def check_positional_encoding(fn: Callable[[int, int], Tensor]) -> None:
    """Check ``fn(n, dim) -> (n, dim)``: PE[p, 2i] = sin(p w_i), PE[p, 2i+1] = cos(p w_i), w_i = 10000^(-2i/dim)."""
    from companion.attention import sinusoidal_position_encoding

    g = _Grader("check_positional_encoding")
    for n, dim in ((10, 8), (50, 16), (7, 64)):
        where = f"fn(n={n}, dim={dim})"
        out = g.tensor(g.call(fn, n, dim, where=where), (n, dim), where, ": one row per position, dim columns")
        expected = sinusoidal_position_encoding(n, dim)
        pos = torch.arange(n, dtype=torch.float64)[:, None]  # (n, 1)
        freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angle = pos * freq
        mistakes = [
            (
                _sincos(pos, freq, swap=True),
                "sin and cos swapped: even columns 2i hold the sine, odd columns 2i+1 the cosine",
            ),
            (
                torch.cat([angle.sin(), angle.cos()], -1),
                "not interleaved: all sines then all cosines; the book's "
                "convention puts sin in column 2i and cos in column 2i+1",
            ),
            (
                _sincos(pos, 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / dim)),
                "wrong frequencies: w_i = "
                "10000^(-2i/dim) for column pair i (the exponent uses 2i, the even column's index)",
            ),
            (
                _sincos(pos, 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)),
                "frequencies grow: the exponent must be negative, w_i = 10000^(-2i/dim), from 1 down to about 1/10000",
            ),
            (_sincos(pos + 1, freq), "positions start at 1: the first position is p = 0 (sin 0 = 0, cos 0 = 1)"),
        ]
        g.compare(out.detach(), expected, where, mistakes, atol=1e-5)
    _passed(g.name, "three sizes")


def check_split_heads(fn: Callable[[Tensor, int], Tensor]) -> None:
    """Check ``fn(x (B, N, D), num_heads) -> (B, num_heads, N, D // num_heads)``, head h the h-th block of channels."""
    g = _Grader("check_split_heads")
    for B, N, H, hd in ((2, 5, 3, 4), (1, 7, 2, 6), (3, 4, 4, 2)):
        x = torch.randn(B, N, H * hd, generator=torch.Generator().manual_seed(N))
        where = f"x {tuple(x.shape)}, num_heads={H}"
        out = g.tensor(g.call(fn, x, H, where=where), (B, H, N, hd), where, ": (batch, heads, tokens, head_dim)")
        mistakes = [
            (
                x.reshape(B, H, N, hd),
                "reshape without the transpose: x.reshape(B, H, N, hd) mixes tokens into heads; "
                "view as (B, N, H, hd), then transpose(1, 2)",
            ),
            (
                x.view(B, N, hd, H).permute(0, 3, 1, 2),
                "channels dealt round-robin to the heads: head h must get the "
                "contiguous block of channels h*hd ... (h+1)*hd - 1, view(B, N, H, hd)",
            ),
        ]
        g.compare(out, x.view(B, N, H, hd).transpose(1, 2), where, mistakes, atol=0)
    _passed(g.name, "three shapes")


def check_merge_heads(fn: Callable[[Tensor], Tensor]) -> None:
    """Check ``fn(x (B, H, N, hd)) -> (B, N, H * hd)``, the inverse of splitting the heads."""
    g = _Grader("check_merge_heads")
    for B, H, N, hd in ((2, 3, 5, 4), (1, 2, 7, 6), (3, 4, 4, 2)):
        x = torch.randn(B, H, N, hd, generator=torch.Generator().manual_seed(N))
        where = f"x {tuple(x.shape)}"
        out = g.tensor(g.call(fn, x, where=where), (B, N, H * hd), where, ": (batch, tokens, heads * head_dim)")
        mistakes = [
            (
                x.reshape(B, N, H * hd),
                "reshape without the transpose: x.reshape(B, N, H * hd) mixes heads into "
                "tokens; transpose(1, 2) to (B, N, H, hd) first, then reshape",
            ),
            (
                x.permute(0, 2, 3, 1).reshape(B, N, H * hd),
                "heads interleaved channel by channel: the channels of "
                "head h must stay together, (B, N, H, hd) -> (B, N, H * hd)",
            ),
        ]
        g.compare(out, x.transpose(1, 2).reshape(B, N, H * hd), where, mistakes, atol=0)
    _passed(g.name, "three shapes")


# --- Chapter 3: the CNN's ingredients ------------------------------------------------------------------


def _norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, dims: tuple[int, ...], correction: int, inside: bool
) -> Tensor:
    """Normalise x over ``dims`` (variance with ``correction``, eps inside or outside the root), then scale, shift."""
    mean, var = x.mean(dims, keepdim=True), x.var(dims, keepdim=True, correction=correction)
    std = (var + eps).sqrt() if inside else var.sqrt() + eps
    return (x - mean) / std * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def check_batch_norm(fn: Callable[..., Tensor]) -> None:
    """Check ``fn(x (B, C, H, W), weight, bias, eps=1e-5)``, batch norm in training mode, against ``F.batch_norm``."""
    g = _Grader("check_batch_norm")
    gen = torch.Generator().manual_seed(4)
    for B, C, H, W in ((4, 3, 5, 6), (2, 5, 3, 3)):
        x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64) * 2 + 1
        x[:, 0] *= 1e-3  # a channel with a tiny variance tells eps inside the root from eps outside
        weight = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
        bias = torch.randn(C, generator=gen, dtype=torch.float64)
        eps = 1e-5
        where = f"x {tuple(x.shape)}, weight and bias ({C},), eps={eps}"
        out = g.tensor(g.call(fn, x, weight, bias, eps=eps, where=where), tuple(x.shape), where)
        expected = F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)

        args = (x, weight, bias, eps)
        mistakes = [
            (
                _norm(*args, (1, 2, 3), 0, True),
                "statistics over the wrong axes: per image (that is layer norm); batch norm averages "
                "each channel over the batch and the positions, dims (0, 2, 3)",
            ),
            (
                _norm(*args, (2, 3), 0, True),
                "statistics per image and channel (that is instance norm); batch norm also averages over "
                "the batch: dims (0, 2, 3)",
            ),
            (
                _norm(*args, (0,), 0, True),
                "statistics over the batch only; a convolution's batch norm also averages over the "
                "positions: dims (0, 2, 3)",
            ),
            (
                _norm(*args, (0, 2, 3), 1, True),
                "unbiased variance (divides by n - 1): batch norm normalises with the "
                "biased one, x.var(dims, unbiased=False)",
            ),
            (_norm(*args, (0, 2, 3), 0, False), "eps outside the square root: (x - mean) / sqrt(var + eps)"),
            (
                F.batch_norm(x, None, None, training=True, eps=eps),
                "weight and bias ignored: scale by weight[c] and shift by bias[c] after normalising",
            ),
            (
                F.batch_norm(x, None, None, bias, weight, training=True, eps=eps),
                "weight and bias swapped: out = x_hat * weight + bias",
            ),
        ]
        g.compare(out, expected, where, mistakes, atol=1e-6)
    _passed(g.name, "two shapes, one with a near-constant channel")


def check_label_smoothing(fn: Callable[..., Tensor]) -> None:
    """Check ``fn(logits (B, C), target (B,), smoothing) -> scalar`` against ``F.cross_entropy(label_smoothing=)``."""
    g = _Grader("check_label_smoothing")
    gen = torch.Generator().manual_seed(5)
    for B, C, eps in ((6, 10, 0.1), (4, 3, 0.2), (5, 7, 0.0)):
        logits = torch.randn(B, C, generator=gen, dtype=torch.float64) * 3
        target = torch.randint(0, C, (B,), generator=gen)
        where = f"logits {tuple(logits.shape)}, target {tuple(target.shape)}, smoothing={eps}"
        out = g.call(fn, logits, target, eps, where=where)
        out = g.tensor(out, None, where)
        if out.numel() != 1:
            g.fail(
                f"expected the mean loss, a single number; got shape {tuple(out.shape)} (average over the "
                f"batch)\n  ({where})"
            )
        out = out.reshape(())
        expected = F.cross_entropy(logits, target, label_smoothing=eps)
        logp = logits.log_softmax(-1)
        onehot = F.one_hot(target, C).double()
        other = onehot * (1 - eps) + (1 - onehot) * eps / (C - 1)
        mistakes = [
            (
                F.cross_entropy(logits, target),
                "smoothing ignored: the target is (1 - eps) on the true class plus eps / C on every class",
            ),
            (
                -(other * logp).sum(-1).mean(),
                "eps spread over the C - 1 other classes; PyTorch (and Szegedy et al.) "
                "spread eps / C over all C classes, the true one included",
            ),
            (
                -(((1 - eps) * onehot + eps / C) * logits).sum(-1).mean(),
                "log_softmax missing: the loss uses the log-probabilities, logits.log_softmax(-1), not the logits",
            ),
            (
                F.cross_entropy(logits, target, label_smoothing=eps, reduction="sum"),
                "summed over the batch: return the mean",
            ),
        ]
        g.compare(out, expected, where, [(m, d) for m, d in mistakes if eps > 0 or "smoothing" not in d])
    _passed(g.name, "three cases")


# --- Chapter 4: SAGAN's block ------------------------------------------------------------------------


class _PooledSelfAttention2d(nn.Module):
    """The reference of Exercise 4.1: SAGAN's block with BigGAN's pooled keys and values and value bottleneck."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.key = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.value = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.out = nn.Conv2d(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def parts(self, x: Tensor, pool: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, HW, C/r) at every position; keys (B, M, C/r) and values (B, M, C/2), M = HW / 4."""
        pool = pool or (lambda t: F.max_pool2d(t, 2))
        q = self.query(x).flatten(2).transpose(1, 2)
        k = pool(self.key(x)).flatten(2).transpose(1, 2)
        v = pool(self.value(x)).flatten(2).transpose(1, 2)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.parts(x)
        o = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v  # (B, HW, C/2)
        return self.gamma * self.out(o.transpose(1, 2).reshape(B, C // 2, H, W)) + x


def check_pooled_self_attention_2d(cls: type[nn.Module]) -> None:
    """Check ``cls(channels, reduction)``: SAGAN's block with keys and values max-pooled 2x2 and a C/2 value path.

    Layers: 1x1 convolutions without bias ``query``, ``key`` (C -> C/r), ``value`` (C -> C/2), ``out`` (C/2 -> C)
    and a scalar ``gamma``; forward ``gamma * out(softmax(Q K^T) V) + x``, Q at every position, K and V
    max-pooled 2x2, as BigGAN's attention block.
    """
    g = _Grader("check_pooled_self_attention_2d")
    torch.manual_seed(0)
    C, r = 16, 4
    block = g.call(cls, C, r, where=f"cls({C}, {r})")
    if not isinstance(block, nn.Module):
        g.fail(f"cls({C}, {r}) must build an nn.Module, got {type(block).__name__}")
    missing = [n for n in ("query", "key", "value", "out", "gamma") if not hasattr(block, n)]
    if missing:
        g.fail(f"the block needs attributes query, key, value, out (1x1 Conv2d) and gamma; missing {missing}")
    if not isinstance(block.gamma, nn.Parameter):
        g.fail("gamma must be a learned nn.Parameter, e.g. nn.Parameter(torch.zeros(()))")
    if block.gamma.detach().abs().max() != 0:
        g.fail(
            f"gamma must start at zero (got {block.gamma.detach().flatten().tolist()}): the block then begins as "
            "the identity"
        )
    ref = _PooledSelfAttention2d(C, r)
    try:
        ref.load_state_dict(block.state_dict())
    except RuntimeError as err:
        g.fail(
            f"the parameters do not have the exercise's shapes (1x1 convolutions without bias: query and key "
            f"{C} -> {C // r} channels, value {C} -> {C // 2}, out {C // 2} -> {C}; gamma a scalar): {err}"
        )
    x = torch.randn(2, C, 6, 8, generator=torch.Generator().manual_seed(6))
    where = f"x {tuple(x.shape)}, gamma = 0"
    out = g.call(block, x, where=where)
    hint = ""
    if isinstance(out, Tensor) and out.shape == (2, C, 3, 4):
        hint = ": the queries were pooled too; only keys and values are pooled, every position keeps its query"
    out = g.tensor(out, tuple(x.shape), where, hint)
    if not torch.allclose(out, x, atol=1e-6):
        if torch.allclose(out, torch.zeros_like(x)):
            g.fail(
                f"missing residual: at gamma = 0 the block returns zeros; it returns gamma * out(o) + x\n  ({where})"
            )
        g.fail(f"with gamma = 0 the block must return its input unchanged: gamma * out(o) + x\n  ({where})")
    with torch.no_grad():
        block.gamma.fill_(0.7)
        ref.gamma.fill_(0.7)
    where = f"x {tuple(x.shape)}, gamma = 0.7"
    out = g.call(block, x, where=where)
    hint = ""
    if isinstance(out, Tensor) and out.shape == (2, C, 3, 4):
        hint = ": the queries were pooled too; only keys and values are pooled, every position keeps its query"
    out = g.tensor(out, tuple(x.shape), where, hint)
    B, _, H, W = x.shape
    with torch.no_grad():
        expected = ref(x)

        def block_out(
            parts: tuple[Tensor, Tensor, Tensor] | None = None,
            dim: int = -1,
            scale: float = 1.0,
            residual: bool = True,
            transpose: bool = True,
        ) -> Tensor:
            q, k, v = parts or ref.parts(x)
            o = torch.softmax(q @ k.transpose(1, 2) * scale, dim=dim) @ v
            o = o.transpose(1, 2).reshape(B, C // 2, H, W) if transpose else o.reshape(B, C // 2, H, W)
            o = 0.7 * ref.out(o)
            return o + x if residual else o

        pooled_first = (
            ref.query(x).flatten(2).transpose(1, 2),
            ref.key(F.max_pool2d(x, 2)).flatten(2).transpose(1, 2),
            ref.value(F.max_pool2d(x, 2)).flatten(2).transpose(1, 2),
        )
        mistakes = [
            (
                block_out(ref.parts(x, lambda t: F.avg_pool2d(t, 2))),
                "keys and values average-pooled: BigGAN max-pools them, F.max_pool2d(t, 2)",
            ),
            (
                block_out(ref.parts(x, lambda t: t)),
                "keys and values not pooled: every position then reads all HW positions; max-pool the keys and "
                "the values 2x2 so that it reads HW / 4",
            ),
            (
                block_out(pooled_first),
                "pooled before the 1x1 convolutions: max-pooling does not commute with them; compute the keys and "
                "values at every position, then pool them",
            ),
            (block_out(residual=False), "missing residual: the block returns gamma * out(o) + x"),
            (
                block_out(dim=-2),
                "softmax over the wrong axis: each query's weights must sum to 1 over the (pooled) keys, the "
                "last axis of Q K^T",
            ),
            (block_out(scale=1 / math.sqrt(C // r)), "scaled by 1/sqrt(C/r): SAGAN's block uses the plain dot product"),
            (
                block_out(transpose=False),
                "output reshaped without the transpose: (B, HW, C/2) -> transpose(1, 2) -> (B, C/2, H, W), then out",
            ),
        ]
    g.compare(out.detach(), expected.detach(), where, mistakes, atol=1e-5)
    out.sum().backward()
    if block.gamma.grad is None or block.gamma.grad.abs().max() == 0:
        g.fail("gamma gets no gradient: multiply the output of out(...) by self.gamma in forward")
    _passed(g.name, "identity at gamma = 0, equal to the reference at gamma = 0.7 on a 6x8 map")


def check_effective_positions(fn: Callable[[Tensor], Tensor]) -> None:
    """Check ``fn(weights (..., N, M)) -> (..., N)``: exp of the entropy of each query's weights over the keys."""
    g = _Grader("check_effective_positions")
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(2, 6, 9, generator=gen, dtype=torch.float64) * 2
    scores[0, 0, 3:] = float("-inf")  # a query reads 3 keys only: zero weights must count as 0 * log 0 = 0
    weights = scores.softmax(-1)
    where = f"weights {tuple(weights.shape)}, some of them exactly 0"
    out = g.call(fn, weights, where=where)
    if isinstance(out, Tensor) and out.shape == weights.shape[:-1] and torch.isnan(out).any():
        g.fail(
            f"NaN where some weights are 0: 0 * log(0) must count as 0; use torch.special.xlogy(p, p) or "
            f"clamp p before the log\n  ({where})"
        )
    out = g.tensor(out, tuple(weights.shape[:-1]), where, ": one number per query")
    entropy = -torch.special.xlogy(weights, weights).sum(-1)
    expected = entropy.exp()
    mistakes = [
        (entropy, "that is the entropy; the effective number of positions is its exponential, exp(H)"),
        ((entropy / math.log(2)).exp(), "exp of the entropy in bits: use the natural log with exp, or log2 with 2**"),
        (2**entropy, "2 ** the entropy in nats: use exp with the natural log, or 2 ** with log2"),
        (
            1 / (weights**2).sum(-1),
            "that is the inverse participation ratio 1 / sum p^2, another measure; this "
            "exercise asks for exp(-sum p log p)",
        ),
    ]
    g.compare(out, expected, where, mistakes)
    uniform = torch.full((1, 4, 8), 1 / 8, dtype=torch.float64)
    g.compare(
        g.call(fn, uniform, where="uniform weights over 8 keys"),
        torch.full((1, 4), 8.0, dtype=torch.float64),
        "uniform weights over 8 keys should give 8 effective positions",
    )
    _passed(g.name, "random and uniform weights, with zeros")


# --- Chapter 5: the Vision Transformer ----------------------------------------------------------------


def check_patchify(fn: Callable[[Tensor, int], Tensor]) -> None:
    """Check ``fn(x (B, C, H, W), patch_size) -> (B, N, C * p * p)``: patches row-major, flattened as F.unfold does."""
    g = _Grader("check_patchify")
    for B, C, H, W, p in ((2, 3, 8, 8, 4), (1, 2, 6, 9, 3), (2, 1, 4, 4, 2)):
        x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(H * W))
        gh, gw = H // p, W // p
        where = f"x {tuple(x.shape)}, patch_size={p}"
        out = g.tensor(
            g.call(fn, x, p, where=where), (B, gh * gw, C * p * p), where, ": (batch, number of patches, C * p * p)"
        )
        expected = F.unfold(x, p, stride=p).transpose(1, 2)
        grid = x.reshape(B, C, gh, p, gw, p)  # (B, C, row, i, col, j)
        mistakes = [
            (
                grid.permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, -1),
                "patch flattened in the wrong order: (row, "
                "column, channel); flatten channel first, then row, then column, as F.unfold and a Conv2d kernel do",
            ),
            (
                x.reshape(B, gh * gw, C * p * p),
                "reshape without the permute: the image memory is not laid out patch "
                "by patch; reshape to (B, C, H/p, p, W/p, p), permute, then flatten",
            ),
            (
                grid.permute(0, 4, 2, 1, 3, 5).reshape(B, gh * gw, -1),
                "patches in column-major order: number them row by row, patch index = row * (W/p) + column",
            ),
        ]
        g.compare(out, expected, where, mistakes, atol=0)
    _passed(g.name, "three shapes, non-square included")


def check_patch_embedding_conv(fn: Callable[[nn.Linear, int, int], nn.Module]) -> None:
    """Check ``fn(proj, in_channels, patch_size) -> nn.Conv2d`` computing ``proj`` on every flattened patch."""
    g = _Grader("check_patch_embedding_conv")
    torch.manual_seed(8)
    for C, p, dim in ((3, 4, 10), (2, 3, 5)):
        proj = nn.Linear(C * p * p, dim)
        x = torch.randn(2, C, 3 * p, 2 * p)
        where = f"proj Linear({C * p * p}, {dim}), in_channels={C}, patch_size={p}, images {tuple(x.shape)}"
        conv = g.call(fn, proj, C, p, where=where)
        if not isinstance(conv, nn.Module):
            g.fail(f"expected an nn.Module (an nn.Conv2d), got {type(conv).__name__}")
        out = g.call(conv, x, where=f"conv(x); {where}")
        expected_shape = (2, dim, 3, 2)
        hint = ""
        if isinstance(out, Tensor) and out.ndim == 4 and out.shape[2:] == (3 * p - p + 1, 2 * p - p + 1):
            hint = ": stride 1 gives overlapping patches; the stride must equal the patch size"
        out = g.tensor(out, expected_shape, where, hint)
        with torch.no_grad():
            expected = F.conv2d(x, proj.weight.view(dim, C, p, p), proj.bias, stride=p)
            mistakes = [
                (
                    F.conv2d(x, proj.weight.view(dim, p, p, C).permute(0, 3, 1, 2), proj.bias, stride=p),
                    "weight reshaped in the wrong order: a row of proj.weight is (channel, row, column), so "
                    "view(dim, C, p, p)",
                ),
                (F.conv2d(x, proj.weight.view(dim, C, p, p), None, stride=p), "bias missing: copy proj.bias too"),
                (
                    F.conv2d(x, proj.weight.view(dim, C, p, p).transpose(-1, -2), proj.bias, stride=p),
                    "kernel transposed: the patch's rows come first, view(dim, C, p, p) without transposing",
                ),
            ]
            g.compare(out, expected, where, mistakes, atol=1e-5)
    _passed(g.name, "two sizes")


def check_encoder_block(cls: type[nn.Module]) -> None:
    """Check a pre-norm encoder block ``cls(dim, num_heads, mlp_dim)`` with companion.models.EncoderBlock's layers."""
    from companion.models import EncoderBlock

    g = _Grader("check_encoder_block")
    torch.manual_seed(9)
    dim, heads, mlp_dim = 12, 3, 24
    block = g.call(cls, dim, heads, mlp_dim, where=f"cls({dim}, {heads}, {mlp_dim})")
    if not isinstance(block, nn.Module):
        g.fail(f"cls({dim}, {heads}, {mlp_dim}) must build an nn.Module, got {type(block).__name__}")
    ref = EncoderBlock(dim, heads, mlp_dim)
    try:
        ref.load_state_dict(block.state_dict())
    except RuntimeError as err:
        g.fail(f"the block's layers must be those of the stub (norm1, attn, norm2, mlp): {err}")
    block.eval()
    ref.eval()
    with torch.no_grad():  # LayerNorms away from the identity, so that every mistake shows
        for norm in (ref.norm1, ref.norm2, block.norm1, block.norm2):
            sign = 1 if norm in (ref.norm1, block.norm1) else -1  # norm1 and norm2 differ
            norm.weight.copy_(torch.linspace(0.5, 1.5, dim).flip(0) if sign < 0 else torch.linspace(0.5, 1.5, dim))
            norm.bias.copy_(sign * torch.linspace(-0.3, 0.3, dim))
    x = torch.randn(2, 5, dim, generator=torch.Generator().manual_seed(10)) * 2 + 0.5
    where = f"x {tuple(x.shape)}"
    out = g.tensor(g.call(block, x, where=where), tuple(x.shape), where)
    with torch.no_grad():
        expected = ref(x)
        attn, mlp, n1, n2 = ref.attn, ref.mlp, ref.norm1, ref.norm2
        h = x + attn(n1(x))
        post = n1(x + attn(x))
        mistakes = [
            (
                n2(post + mlp(post)),
                "post-norm: this block normalises the input of each branch, x + attn(norm1(x)), "
                "then x + mlp(norm2(x)); LayerNorm after the sum is the original Transformer's post-norm",
            ),
            (attn(n1(x)) + mlp(n2(attn(n1(x)))), "missing residual around the attention: x = x + attn(norm1(x))"),
            (mlp(n2(h)), "missing residual around the MLP: x = x + mlp(norm2(x))"),
            (
                x + attn(n1(x)) + mlp(n2(x)),
                "both branches read the block's input: the MLP must read the output of "
                "the attention step, x = x + attn(norm1(x)) first",
            ),
            (h + mlp(n1(h)), "norm1 used twice: the MLP branch has its own LayerNorm, norm2"),
            (
                x + n1(attn(x)) + n2(mlp(x + n1(attn(x)))),
                "LayerNorm on the branch's output: normalise the branch's input, x + attn(norm1(x))",
            ),
        ]
    g.compare(out.detach(), expected, where, mistakes, atol=1e-5)
    _passed(g.name, "equal to the reference block with the same weights")


def _rollout(
    layers: list[Tensor],
    combine: Callable[[Tensor], Tensor] = lambda w: w.mean(1),
    residual: bool = True,
    reverse: bool = False,
) -> Tensor:
    """Rollout with knobs for the catalogued mistakes (how heads combine, the residual, the order of the layers)."""
    result = None
    for w in layers:
        a = combine(w)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype) if residual else a
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else (result @ a if reverse else a @ result)
    return result


def check_mean_pool_rollout(fn: Callable[[list[Tensor]], Tensor]) -> None:
    """Check ``fn(attentions: list of (B, heads, N, N)) -> (B, N)``: the rollout share of each input token in the
    mean of the output tokens (a ViT with ``pool='mean'``, no class token), rollout with 0.5 W + 0.5 I."""
    from companion.models.vit import attention_rollout

    g = _Grader("check_mean_pool_rollout")
    gen = torch.Generator().manual_seed(11)
    for B, heads, N, depth in ((2, 3, 5, 3), (3, 2, 7, 2)):
        layers = [
            torch.randn(B, heads, N, N, generator=gen, dtype=torch.float64).mul(2).softmax(-1) for _ in range(depth)
        ]
        where = f"{depth} layers of weights {tuple(layers[0].shape)}"
        out = g.call(fn, [w.clone() for w in layers], where=where)
        hint = ": one share per input token"
        if isinstance(out, Tensor) and tuple(out.shape) == (B, N, N):
            hint = ": that is the whole rollout matrix R; the pooled vector needs one share per input token, (B, N)"
        elif isinstance(out, Tensor) and tuple(out.shape) == (B, N - 1):
            hint = ": a token was dropped as if it were a class token; a mean-pooled ViT has none, all N tokens count"
        out = g.tensor(out, (B, N), where, hint)
        R = attention_rollout(layers)
        expected = R.mean(1)
        mistakes = [
            (
                R[:, 0],
                "row 0 of the rollout: that is where the class token's state comes from; a mean-pooled ViT has no "
                "class token, its pooled vector is the mean of all N output tokens, so average the rows of R",
            ),
            (
                R.mean(-1),
                "averaged within each row: row i of R is how output token i draws on the inputs; average over the "
                "output tokens, the rows (dim 1)",
            ),
            (R.sum(1), "summed over the output tokens: the pooled vector is their mean, so the shares sum to 1"),
            (
                R.diagonal(dim1=-2, dim2=-1),
                "the diagonal of R: that is how much each token keeps of itself; average the rows of R",
            ),
            (
                _rollout(layers, reverse=True).mean(1),
                "layers multiplied in the wrong order: later layers act on the result of earlier ones, "
                "R = A_L ... A_2 A_1 (rollout = a @ rollout)",
            ),
            (
                _rollout(layers, residual=False).mean(1),
                "residual missing: use A = 0.5 W + 0.5 I for the skip connection",
            ),
            (
                _rollout(layers, lambda w: w.amax(1)).mean(1),
                "heads combined by their maximum: average them (mean over dim 1)",
            ),
            (torch.stack(layers).mean((0, 2)).mean(1), "layers averaged instead of multiplied: R = A_L ... A_1"),
        ]
        g.compare(out, expected, where, mistakes)
    _passed(g.name, "two shapes, several layers and heads")


# --- Chapter 6: classifying with a language model ---------------------------------------------------------


def check_cosine_head(fn: Callable[[Tensor, Tensor, float], Tensor]) -> None:
    """Check ``fn(features (B, D), text (C, D), temperature) -> (B, C)`` logits ``cos(f_b, t_c) / temperature``."""
    g = _Grader("check_cosine_head")
    gen = torch.Generator().manual_seed(12)
    feats = torch.randn(4, 6, generator=gen, dtype=torch.float64) * torch.tensor([[0.5], [2.0], [1.0], [3.0]])
    text = torch.randn(5, 6, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2.0, 5)[:, None]
    t = 0.07
    where = f"features {tuple(feats.shape)}, text {tuple(text.shape)}, temperature={t}"
    out = g.tensor(
        g.call(fn, feats.clone(), text.clone(), t, where=where), (4, 5), where, ": one logit per (image, class)"
    )
    f_unit, t_unit = F.normalize(feats, dim=-1), F.normalize(text, dim=-1)
    expected = f_unit @ t_unit.T / t
    mistakes = [
        (feats @ t_unit.T / t, "image features not normalised: divide each by its length, F.normalize(f, dim=-1)"),
        (f_unit @ text.T / t, "class embeddings not normalised: divide each by its length"),
        (feats @ text.T / t, "neither side normalised: a cosine is the dot product of unit vectors"),
        (f_unit @ t_unit.T * t, "multiplied by the temperature: divide by it (a small temperature sharpens)"),
        (f_unit @ t_unit.T, "temperature missing: divide the cosines by it"),
        ((f_unit @ t_unit.T / t).softmax(-1), "softmax applied: return the logits, F.cross_entropy applies it"),
    ]
    g.compare(out, expected, where, mistakes)
    _passed(g.name, "features and class embeddings of uneven lengths")


def check_prompt_ensemble(fn: Callable[[Tensor], Tensor]) -> None:
    """Check ``fn(embeddings (C, T, D)) -> (C, D)``: unit-normalise each, average over the templates, re-normalise."""
    g = _Grader("check_prompt_ensemble")
    gen = torch.Generator().manual_seed(13)
    emb = torch.randn(4, 5, 8, generator=gen, dtype=torch.float64) * torch.rand(4, 5, 1, generator=gen).add(0.2)
    where = f"embeddings {tuple(emb.shape)} (classes, templates, D)"
    hint = ""
    out = g.call(fn, emb.clone(), where=where)
    if isinstance(out, Tensor) and tuple(out.shape) == (5, 8):
        hint = ": averaged over the classes; average over the templates, dim 1"
    out = g.tensor(out, (4, 8), where, hint or ": one embedding per class")
    unit = F.normalize(emb, dim=-1)
    mistakes = [
        (unit.mean(1), "not re-normalised: the mean of unit vectors is shorter than 1; normalise it again"),
        (
            F.normalize(emb.mean(1), dim=-1),
            "averaged before normalising: templates whose embeddings are longer "
            "weigh more; normalise each embedding first",
        ),
        (emb.mean(1), "no normalisation at all: normalise each embedding, average, normalise again"),
    ]
    g.compare(out, F.normalize(unit.mean(1), dim=-1), where, mistakes)
    _passed(g.name, "embeddings of uneven lengths")


def _caption_scores(logits: Tensor, captions: Tensor, pad: int, shift: int = 1, log: bool = True) -> tuple:
    """Per-token log-probabilities of the targets, (N, K, L - 1), and the mask of real targets, (K, L - 1)."""
    targets = captions[:, shift : captions.shape[1] - 1 + shift]  # (K, L - 1)
    logp = logits.log_softmax(-1) if log else logits
    picked = logp.gather(-1, targets.expand(logits.shape[0], -1, -1)[..., None])[..., 0]  # (N, K, L - 1)
    return picked, targets != pad


def check_caption_scores(fn: Callable[..., Tensor]) -> None:
    """Check ``fn(logits (N, K, L - 1, V), captions (K, L), pad) -> (N, K)``: the mean log-probability per real
    token of caption k for image n, where ``logits[n, k, t]`` predicts ``captions[k, t + 1]``, pad targets left out."""
    g = _Grader("check_caption_scores")
    gen = torch.Generator().manual_seed(14)
    for N, K, L, V, pad in ((3, 4, 7, 11, 0), (2, 5, 9, 13, 3)):
        bos = (pad + 1) % V
        lengths = torch.tensor([L - 1 - (k * 2) % (L - 2) for k in range(K)])  # real targets per caption, 1 to L - 1
        words = torch.randint(0, V - 1, (K, L - 1), generator=gen)
        words = words + (words >= pad).long()  # no pad among the real words
        captions = torch.full((K, L), pad, dtype=torch.long)
        captions[:, 0] = bos
        for k in range(K):
            captions[k, 1 : 1 + lengths[k]] = words[k, : lengths[k]]
        logits = torch.randn(N, K, L - 1, V, generator=gen, dtype=torch.float64) * 2
        where = (
            f"logits {tuple(logits.shape)}, captions {tuple(captions.shape)} of {lengths.tolist()} real target "
            f"tokens, pad={pad}"
        )
        out = g.call(fn, logits.clone(), captions.clone(), pad, where=where)
        out = g.tensor(out, (N, K), where, ": one score per (image, caption)")
        picked, real = _caption_scores(logits, captions, pad)
        expected = (picked * real).sum(-1) / real.sum(-1)
        unshifted, real0 = _caption_scores(logits, captions, pad, shift=0)
        raw, _ = _caption_scores(logits, captions, pad, log=False)
        mistakes = [
            (
                (picked * real).sum(-1),
                "summed log-probabilities: that is approach 4's score, which favours short captions; divide by "
                "the number of real (non-pad) target tokens of each caption",
            ),
            (
                picked.mean(-1),
                "padding counted: the log-probabilities of pad targets are in the mean; leave the positions whose "
                "target is pad out of the sum and the count",
            ),
            (
                (picked * real).sum(-1) / (L - 1),
                "divided by L - 1, the padded length: divide by the number of real targets of each caption",
            ),
            (
                (picked * real).sum(-1) / (captions != pad).sum(-1),
                "the start token counted: it is an input, never a target; count the real tokens of captions[:, 1:]",
            ),
            (
                (unshifted * real0).sum(-1) / real0.sum(-1),
                "targets not shifted: logits[n, k, t] predicts the next token, captions[k, t + 1]",
            ),
            ((raw * real).sum(-1) / real.sum(-1), "log_softmax missing: the logits are not log-probabilities"),
            (
                (picked.exp() * real).sum(-1) / real.sum(-1),
                "mean of the probabilities: average the log-probabilities (a geometric mean of the probabilities)",
            ),
        ]
        g.compare(out, expected, where, mistakes)
    _passed(g.name, "captions of different lengths, two pad ids")
