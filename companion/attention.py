"""Scaled dot-product attention, multi-head attention and positional encodings (Chapter 2).

Chapters 4 (SAGAN block), 5 (ViT encoder) and 6 (caption decoder) import these rather than
re-implementing them.

Masks are named and read as PyTorch names and reads them. ``attn_mask``, everywhere in this module:
a **boolean** mask is ``True`` where a query may attend to a key, exactly like the ``attn_mask`` of
``torch.nn.functional.scaled_dot_product_attention``; a **float** mask is added to the scores before the
softmax: ``0`` lets a key through, ``-inf`` blocks it. (``torch.nn.MultiheadAttention``'s ``attn_mask``
uses the opposite convention, ``True`` = blocked: pass it ``~attn_mask``.) ``MultiHeadAttention`` also
takes a ``key_padding_mask`` (B, M) as ``nn.MultiheadAttention`` does: ``True`` = ignore that key.
A query row whose keys are all blocked has nothing to average: both paths return zeros for it
(output and weights), as PyTorch's fused kernel does, instead of the NaN of a plain softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from companion.validation import validate_divides, validate_int, validate_positive

__all__ = [
    "LearnedPositionEmbedding",
    "MultiHeadAttention",
    "attention_weights",
    "causal_mask",
    "padding_mask",
    "scaled_dot_product_attention",
    "sinusoidal_position_encoding",
    "sinusoidal_position_encoding_2d",
]


def _scores_shape(q: Tensor, k: Tensor, v: Tensor | None = None) -> tuple[int, ...]:
    """Check q, k (and v) against each other and return the shape (..., N, M) of the scores."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None and t.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., tokens, features), got {tuple(t.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head dimension d_k (last axis): got q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}; project them to a common size first"
        )
    if v is not None and v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"k and v must hold the same number of tokens (axis -2): got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    others = [k.shape[:-2]] + ([v.shape[:-2]] if v is not None else [])
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], *others)
    except RuntimeError as err:
        raise ValueError(
            f"the leading (batch, head) dimensions of q {tuple(q.shape)}, k {tuple(k.shape)} do not broadcast"
        ) from err
    return (*batch, q.shape[-2], k.shape[-2])


def _check_mask(attn_mask: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
    """Validate a mask against the scores' shape; return it as bool or as the scores' float dtype, at least 2-D."""
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(
            f"attn_mask must be bool (True = attend) or float (added to the scores), got {attn_mask.dtype}; "
            "convert it, e.g. attn_mask.bool()"
        )
    try:
        fits = torch.broadcast_shapes(attn_mask.shape, shape) == torch.Size(shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the attention scores (..., N, M) = "
            f"{shape}; give it shape (N, M), or keep the leading axes and use size 1 where it is shared, "
            "e.g. (B, 1, 1, M) for a key padding mask over (B, heads, N, M)"
        )
    if attn_mask.ndim < 2:  # (M,) or a scalar: one row shared by every query, as (1, M)
        attn_mask = attn_mask.reshape(1, -1) if attn_mask.ndim == 1 else attn_mask.reshape(1, 1)
    return attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(dtype)


def attention_weights(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """The attention weights ``softmax(q k^T / sqrt(d_k) + attn_mask)`` over the keys, shape (..., N, M)."""
    shape = _scores_shape(q, k)
    attn_mask = _check_mask(attn_mask, shape, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else _check_scale(scale)
    scores = q @ k.transpose(-2, -1) * scale  # (..., N, M)
    if attn_mask is None:
        return torch.softmax(scores, dim=-1)
    if attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    else:
        scores = scores + attn_mask
    blocked = scores.amax(dim=-1, keepdim=True) == float("-inf")  # (..., N, 1): rows with no key left
    weights = torch.softmax(scores.masked_fill(blocked, 0.0), dim=-1)  # finite everywhere, also in gradients
    return weights.masked_fill(blocked, 0.0)


def _check_scale(scale: float) -> float:
    return validate_positive(scale, "scale", " (the factor on q k^T), or None for 1 / sqrt(d_k)")


def _check_dropout(p: float, name: str) -> None:
    if not 0.0 <= p <= 1.0:  # also catches NaN
        raise ValueError(f"{name} is a probability in [0, 1], got {p}")


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    return_attention: bool = False,
    scale: float | None = None,
    fused: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """``softmax(Q K^T / sqrt(d_k)) V`` over any leading (batch, head) dimensions.

    Shapes: q (..., N, d_k), k (..., M, d_k), v (..., M, d_v) -> (..., N, d_v). ``attn_mask`` broadcasts to
    (..., N, M): bool True = attend, or float added to the scores. ``dropout_p`` is applied as given
    (pass 0.0 at evaluation, as ``torch.nn.functional.scaled_dot_product_attention`` expects).
    With ``return_attention=False`` and ``fused=True`` the call goes to PyTorch's fused kernel; otherwise
    the readable path below runs and, if asked, also returns the (dropped-out) weights (..., N, M).
    """
    shape = _scores_shape(q, k, v)
    attn_mask = _check_mask(attn_mask, shape, q.dtype)
    _check_dropout(dropout_p, "dropout_p")
    if scale is not None:
        _check_scale(scale)
    if fused and not return_attention and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # PyTorch's CPU fused kernel is 3x slower backwards in bfloat16 than in float32 (measured, torch 2.14;
        # it made the ViT's bf16 training step slower than float32): on the CPU it runs in float32.
        with torch.autocast("cpu", enabled=False):
            mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p, scale=scale
            )
        return out.to(q.dtype)
    if fused and not return_attention:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    weights = attention_weights(q, k, attn_mask, scale)  # (..., N, M)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = weights @ v  # (..., N, d_v)
    return (out, weights) if return_attention else out


def causal_mask(n: int, m: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """Boolean (n, m) mask, True = attend, that lets query i see keys 0..i only (lower triangle)."""
    validate_int(n, "n", minimum=0)
    m = n if m is None else validate_int(m, "m", minimum=0)
    return torch.ones(n, m, dtype=torch.bool, device=device).tril()


def padding_mask(lengths: Tensor | list[int], max_len: int | None = None) -> Tensor:
    """Boolean (B, max_len) mask, True on the real tokens of sequences of the given lengths.

    Use ``attn_mask=padding_mask(lengths)[:, None, :]`` for scores (B, N, M) and ``[:, None, None, :]`` for
    (B, heads, N, M), so that no query attends to padding; ``MultiHeadAttention`` takes
    ``key_padding_mask=~padding_mask(lengths)`` (True = ignore, as ``nn.MultiheadAttention``).
    """
    lengths = torch.as_tensor(lengths)
    lengths = lengths if lengths.numel() else lengths.long()  # [] is a float tensor: no sequences, no error
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be integers (token counts), got {lengths.dtype}")
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    validate_int(max_len, "max_len", minimum=0)
    if lengths.ndim != 1 or (lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > max_len)):
        raise ValueError(f"lengths must be a 1-D list of integers in 0..{max_len}, got {lengths.tolist()}")
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project to Q, K, V, split into heads, attend in each, merge, project out.

    ``forward(query)`` is self-attention; ``forward(query, key)`` (value defaults to key) is
    cross-attention over another sequence, of another length and (with ``kdim``/``vdim``) width.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias: bool = True,
        dropout: float = 0.0,
        kdim: int | None = None,
        vdim: int | None = None,
    ) -> None:
        super().__init__()
        validate_divides(dim, num_heads, "dim", "num_heads", "each head gets dim // num_heads channels")
        _check_dropout(dropout, "dropout")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.kdim = dim if kdim is None else validate_int(kdim, "kdim")  # 0 was taken for None: the wrong width
        self.vdim = dim if vdim is None else validate_int(vdim, "vdim")
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """(B, N, dim) queries over (B, M, kdim) keys -> (B, N, dim), and per-head weights (B, heads, N, M).

        ``attn_mask``: bool (True = attend) or float, of shape (N, M), (B, N, M) or (B, heads, N, M)
        (size 1 allowed where shared); a 2-D one is always (N, M), as in PyTorch. ``key_padding_mask``:
        bool (B, M), True = ignore that key (padding), or float (B, M) added to the scores, as in
        ``nn.MultiheadAttention``.
        """
        key = query if key is None else key
        value = key if value is None else value
        for name, t, d in (("query", query, self.dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.ndim != 3 or t.shape[-1] != d:
                raise ValueError(f"{name} must have shape (B, tokens, {d}), got {tuple(t.shape)}")
        B, N, _ = query.shape
        M = key.shape[1]
        if key.shape[0] != B or value.shape[:2] != key.shape[:2]:
            raise ValueError(
                f"query, key and value must hold the same batch of B examples, and key and value the same M tokens: "
                f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        attn_mask = self._merge_masks(attn_mask, key_padding_mask, B, N, M, query.dtype)
        H, hd = self.num_heads, self.head_dim

        q = self.q_proj(query).view(B, N, H, hd).transpose(1, 2)  # (B, H, N, hd)
        k = self.k_proj(key).view(B, M, H, hd).transpose(1, 2)  # (B, H, M, hd)
        v = self.v_proj(value).view(B, M, H, hd).transpose(1, 2)  # (B, H, M, hd)
        dropout_p = self.dropout if self.training else 0.0
        out = scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=dropout_p, return_attention=return_attention)
        if return_attention:
            out, weights = out  # weights (B, H, N, M)
        out = out.transpose(1, 2).reshape(B, N, self.dim)  # (B, N, H * hd): heads merged
        out = self.out_proj(out)  # (B, N, dim)
        return (out, weights) if return_attention else out

    @staticmethod
    def _merge_masks(
        attn_mask: Tensor | None, key_padding_mask: Tensor | None, B: int, N: int, M: int, dtype: torch.dtype
    ) -> Tensor | None:
        """One mask for the scores (B, heads, N, M), bool True = attend or float, from both of forward's masks."""
        if attn_mask is not None:
            if attn_mask.ndim == 2 and tuple(attn_mask.shape) == (B, M) and N != B != 1:
                raise ValueError(
                    f"attn_mask of shape {tuple(attn_mask.shape)} = (B, M) looks like a key padding mask; a 2-D "
                    f"attn_mask is (N, M) = ({N}, {M}), one row per query. Pass padding as "
                    "key_padding_mask=... of shape (B, M), True = ignore that key (as nn.MultiheadAttention)"
                )
            if attn_mask.ndim not in (2, 3, 4):
                raise ValueError(
                    f"attn_mask must have shape (N, M), (B, N, M) or (B, heads, N, M), got {tuple(attn_mask.shape)}"
                )
            if attn_mask.ndim == 3:
                attn_mask = attn_mask.unsqueeze(1)  # (B, N, M) -> (B, 1, N, M): the same mask for every head
        if key_padding_mask is None:
            return attn_mask
        if tuple(key_padding_mask.shape) != (B, M):
            raise ValueError(
                f"key_padding_mask must have shape (B, M) = ({B}, {M}), one flag per key of each example "
                f"(True = ignore), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.dtype == torch.bool:
            keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, M): True = attend
            if attn_mask is None or attn_mask.dtype == torch.bool:
                return keep if attn_mask is None else attn_mask & keep
            keep = torch.zeros_like(keep, dtype=dtype).masked_fill(~keep, float("-inf"))
        elif key_padding_mask.is_floating_point():
            keep = key_padding_mask[:, None, None, :].to(dtype)  # (B, 1, 1, M), added to the scores
        else:
            raise ValueError(f"key_padding_mask must be bool (True = ignore) or float, got {key_padding_mask.dtype}")
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill(~attn_mask, float("-inf"))
        return keep if attn_mask is None else attn_mask + keep

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiHeadAttention:
        """A MultiHeadAttention holding a copy of the weights of a ``torch.nn.MultiheadAttention``.

        Ours is always batch-first, so it reproduces ``nn.MultiheadAttention(..., batch_first=True)``.
        """
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "add_bias_kv and add_zero_attn are not supported; build nn.MultiheadAttention without them"
            )
        bias = mha.in_proj_bias is not None
        ours = cls(mha.embed_dim, mha.num_heads, bias=bias, dropout=mha.dropout, kdim=mha.kdim, vdim=mha.vdim)
        ours = ours.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)  # (3 * dim, dim) -> 3 x (dim, dim)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        with torch.no_grad():
            for proj, w in zip((ours.q_proj, ours.k_proj, ours.v_proj), weights, strict=True):
                proj.weight.copy_(w)
            if mha.in_proj_bias is not None:
                for proj, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), mha.in_proj_bias.chunk(3), strict=True):
                    proj.bias.copy_(b)
                ours.out_proj.bias.copy_(mha.out_proj.bias)
            ours.out_proj.weight.copy_(mha.out_proj.weight)
        return ours


def sinusoidal_position_encoding(n: int, dim: int, base: float = 10000.0) -> Tensor:
    """Fixed encodings of Vaswani et al. (2017), (n, dim): PE[p, 2i] = sin(p w_i), PE[p, 2i+1] = cos(p w_i).

    The frequencies are ``w_i = base ** (-2i / dim)``, from 1 down to nearly ``1 / base``.
    """
    validate_int(n, "n", minimum=0)
    if validate_int(dim, "dim", minimum=None) % 2 != 0 or dim < 2:
        raise ValueError(f"dim must be a positive even number (sine/cosine pairs), got {dim}")
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 1):
        raise ValueError(f"base must be a finite number above 1 (the longest wavelength is 2 pi base), got {base!r}")
    position = torch.arange(n, dtype=torch.float64)[:, None]  # (n, 1)
    freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim / 2,)
    angle = position * freq  # (n, dim / 2)
    pe = torch.stack([angle.sin(), angle.cos()], dim=-1)  # (n, dim / 2, 2): sin, cos interleaved
    return pe.reshape(n, dim).float()


def sinusoidal_position_encoding_2d(h: int, w: int, dim: int, base: float = 10000.0) -> Tensor:
    """Fixed encodings of an h x w grid, (h * w, dim), row-major: half the channels encode the row, half the column."""
    validate_int(h, "h", minimum=0), validate_int(w, "w", minimum=0)
    if validate_int(dim, "dim", minimum=None) % 4 != 0 or dim < 4:
        raise ValueError(
            f"dim must be a positive multiple of 4 (half for rows, half for columns, each in sine/cosine pairs), "
            f"got {dim}"
        )
    rows = sinusoidal_position_encoding(h, dim // 2, base)  # (h, dim / 2)
    cols = sinusoidal_position_encoding(w, dim // 2, base)  # (w, dim / 2)
    grid = torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1)  # (h, w, dim)
    return grid.reshape(h * w, dim)


class LearnedPositionEmbedding(nn.Module):
    """A trainable table of ``n`` position vectors, added to the tokens (as in BERT and ViT)."""

    def __init__(self, n: int, dim: int, std: float = 0.02) -> None:
        super().__init__()
        validate_int(n, "n"), validate_int(dim, "dim"), validate_positive(std, "std", " (of the initial values)")
        self.weight = nn.Parameter(torch.empty(n, dim))
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: Tensor) -> Tensor:
        """(..., N, dim) tokens -> the same tokens plus the first N position vectors."""
        n, dim = self.weight.shape
        if x.ndim < 2 or x.shape[-2] > n or x.shape[-1] != dim:
            raise ValueError(f"expected tokens of shape (..., N <= {n}, {dim}), got {tuple(x.shape)}")
        return x + self.weight[: x.shape[-2]]
