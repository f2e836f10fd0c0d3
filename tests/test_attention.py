"""companion.attention: the readable path against the formula, PyTorch's fused kernel and nn.MultiheadAttention."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from companion.attention import (
    LearnedPositionEmbedding,
    MultiHeadAttention,
    attention_weights,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    sinusoidal_position_encoding,
    sinusoidal_position_encoding_2d,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(atol=1e-5, rtol=1e-5)  # float32


def random_problem(rng: random.Random, gen: torch.Generator, mask_kind: str):
    """Random q, k, v with 0-3 leading axes, and a mask of the given kind that broadcasts to (..., N, M)."""
    lead = [rng.randint(1, 3) for _ in range(rng.randint(0, 3))]
    n, m, dk, dv = rng.randint(1, 17), rng.randint(1, 17), rng.randint(1, 40), rng.randint(1, 40)
    q = torch.randn(*lead, n, dk, generator=gen)
    k = torch.randn(*lead, m, dk, generator=gen)
    v = torch.randn(*lead, m, dv, generator=gen)
    # the mask keeps some leading axes and sets the others to 1 (shared), or drops them
    keep = rng.randint(0, len(lead))
    mshape = [d if rng.random() < 0.5 else 1 for d in lead[len(lead) - keep :]] + [n, m]
    if mask_kind == "none":
        mask = None
    elif mask_kind == "bool":
        mask = torch.rand(*mshape, generator=gen) < 0.7  # some rows end up fully masked
    else:
        mask = torch.randn(*mshape, generator=gen)
        mask[torch.rand(*mshape, generator=gen) < 0.3] = float("-inf")
    return q, k, v, mask


def reference(q, k, v, mask):
    """The formula in float64, written out independently (fully masked rows -> 0)."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = torch.where(mask, scores, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    w = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return w @ v, w


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_readable_and_fused_paths_agree_with_the_formula(mask_kind):
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(60):
        q, k, v, mask = random_problem(rng, gen, mask_kind)
        want_out, want_w = reference(q, k, v, mask)
        out, w = scaled_dot_product_attention(q, k, v, mask, return_attention=True)
        fused = scaled_dot_product_attention(q, k, v, mask)  # goes to F.scaled_dot_product_attention
        readable = scaled_dot_product_attention(q, k, v, mask, fused=False)
        torch.testing.assert_close(fused, readable, **TOL)
        torch.testing.assert_close(out, readable, **TOL)
        torch.testing.assert_close(out.double(), want_out, **TOL)
        torch.testing.assert_close(w.double(), want_w, **TOL)
        torch.testing.assert_close(attention_weights(q, k, mask), w, **TOL)


def test_fully_masked_rows_give_zeros_and_finite_gradients_on_both_paths():
    gen = torch.Generator().manual_seed(1)
    for mask in (
        torch.tensor([[True, False, True], [False, False, False]]),
        torch.tensor([[0.0, -math.inf, 0.5], [-math.inf, -math.inf, -math.inf]]),
    ):
        grads = []
        for fused in (True, False):
            q = torch.randn(2, 3, 2, 4, generator=gen.manual_seed(1)).requires_grad_()
            k = torch.randn(2, 3, 3, 4, generator=gen).requires_grad_()
            v = torch.randn(2, 3, 3, 5, generator=gen).requires_grad_()
            out = scaled_dot_product_attention(q, k, v, mask, fused=fused)
            assert torch.equal(out[..., 1, :], torch.zeros_like(out[..., 1, :]))
            out.square().sum().backward()
            assert all(t.grad.isfinite().all() for t in (q, k, v))
            grads.append([t.grad for t in (q, k, v)])
        for g_fused, g_readable in zip(*grads, strict=True):
            torch.testing.assert_close(g_fused, g_readable, **TOL)
        _, w = scaled_dot_product_attention(q, k, v, mask, return_attention=True)
        assert torch.equal(w[..., 1, :], torch.zeros_like(w[..., 1, :]))
        torch.testing.assert_close(w[..., 0, :].sum(-1), torch.ones(2, 3))


def test_masked_keys_get_zero_weight_and_rows_sum_to_one():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(3, 6, 8, generator=gen), torch.randn(3, 9, 8, generator=gen)
    mask = padding_mask([9, 4, 1])[:, None, :]  # (B, 1, M)
    w = attention_weights(q, k, mask)
    assert torch.equal(w[~mask.expand_as(w)], torch.zeros(int((~mask.expand_as(w)).sum())))
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 6))
    c = attention_weights(q, k[:, :6], causal_mask(6))
    assert torch.equal(c.triu(1), torch.zeros_like(c)) and (c.diagonal(dim1=-2, dim2=-1) > 0).all()


def test_masks():
    assert torch.equal(causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    assert causal_mask(2, 4).shape == (2, 4)
    assert torch.equal(padding_mask([2, 0, 3]), torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool))
    assert padding_mask([1], max_len=4).shape == (1, 4)
    with pytest.raises(ValueError, match="lengths must be"):
        padding_mask([5], max_len=3)


def test_dropout_is_applied_as_given_and_only_in_training_inside_the_module():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 64, 16, generator=gen) for _ in range(3))
    clean = attention_weights(q, k)
    torch.manual_seed(0)
    _, w = scaled_dot_product_attention(q, k, v, dropout_p=0.25, return_attention=True)
    dropped = w == 0
    assert abs(dropped.float().mean().item() - 0.25) < 0.01  # a quarter of the weights dropped
    torch.testing.assert_close(w[~dropped], clean[~dropped] / 0.75)  # the rest rescaled by 1 / (1 - p)
    assert not torch.equal(scaled_dot_product_attention(q, k, v, dropout_p=0.25), scaled_dot_product_attention(q, k, v))

    mha = MultiHeadAttention(16, 4, dropout=0.5)
    x = torch.randn(2, 10, 16, generator=gen)
    mha.eval()
    assert torch.equal(mha(x), mha(x))
    mha.train()
    assert not torch.allclose(mha(x), mha(x))


def torch_mask(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Our mask (True = attend, (B, H, N, M)) in nn.MultiheadAttention's form (True = blocked, (B*H, N, M))."""
    mask = ~mask if mask.dtype == torch.bool else mask
    return mask.flatten(0, 1) if mask.ndim == 4 else mask


def test_multi_head_attention_reproduces_torch():
    rng, gen = random.Random(4), torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    for i in range(40):
        heads = rng.choice([1, 2, 3, 4, 8])
        dim = heads * rng.randint(1, 8)
        cross = i % 2 == 1
        kdim, vdim = (rng.choice([None, 5, 12]), rng.choice([None, 7])) if cross else (None, None)
        ref = nn.MultiheadAttention(dim, heads, bias=rng.random() < 0.7, batch_first=True, kdim=kdim, vdim=vdim)
        ref.eval()
        ours = MultiHeadAttention.from_torch(ref)
        B, N = rng.randint(1, 3), rng.randint(1, 12)
        M = rng.randint(1, 12) if cross else N
        x = torch.randn(B, N, dim, generator=gen)
        key = torch.randn(B, M, kdim or dim, generator=gen) if cross else x
        value = torch.randn(B, M, vdim or dim, generator=gen) if cross else x
        mask = None
        if i % 3 == 1:  # boolean, different for every example and head, no fully masked row
            mask = torch.rand(B, heads, N, M, generator=gen) < 0.6
            mask[..., 0] = True
        elif i % 3 == 2:  # float, shared
            mask = torch.randn(N, M, generator=gen)
        tmask = None if mask is None else torch_mask(mask, heads)
        want, want_w = ref(x, key, value, attn_mask=tmask, average_attn_weights=False)
        want_avg = ref(x, key, value, attn_mask=tmask)[1]
        args = (x,) if not cross else (x, key, value)
        out, w = ours(*args, attn_mask=mask, return_attention=True)
        assert w.shape == (B, heads, N, M)
        torch.testing.assert_close(out, want, **TOL)
        torch.testing.assert_close(w, want_w, **TOL)
        torch.testing.assert_close(w.mean(1), want_avg, **TOL)
        torch.testing.assert_close(ours(*args, attn_mask=mask), want, **TOL)  # the fused path


def test_multi_head_attention_masks_of_every_rank_and_value_defaults_to_key():
    torch.manual_seed(5)
    mha = MultiHeadAttention(12, 3).eval()
    x, ctx = torch.randn(2, 5, 12), torch.randn(2, 7, 12)
    pad = padding_mask([7, 3])  # (B, M)
    full = pad[:, None, None, :].expand(2, 3, 5, 7)
    want = mha(x, ctx, ctx, attn_mask=full)
    for mask in (pad[:, None, :], pad[:, None, None, :], full[:, 0]):  # (B, 1, M), (B, 1, 1, M), (B, N, M)
        torch.testing.assert_close(mha(x, ctx, attn_mask=mask), want, **TOL)
    torch.testing.assert_close(
        mha(x, attn_mask=causal_mask(5)), mha(x, x, x, attn_mask=causal_mask(5)[None, None]), **TOL
    )


def test_key_padding_mask_is_read_as_b_m_even_when_b_equals_n():
    """Issue 14.6: a (B, M) padding mask was misread as (N, M) when B == N; now it has its own argument."""
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    for _ in range(20):
        heads = rng.choice([1, 2, 4])
        dim, B, M = heads * rng.randint(1, 6), rng.randint(2, 5), rng.randint(2, 9)
        ref = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
        ours = MultiHeadAttention.from_torch(ref)
        x, ctx = torch.randn(B, B, dim, generator=gen), torch.randn(B, M, dim, generator=gen)  # N == B
        lengths = [rng.randint(1, M) for _ in range(B)]
        ignore = ~padding_mask(lengths, M)  # (B, M), True = padding, as nn.MultiheadAttention
        want = ref(x, ctx, ctx, key_padding_mask=ignore)[0]
        torch.testing.assert_close(ours(x, ctx, key_padding_mask=ignore), want, **TOL)
        out, w = ours(x, ctx, key_padding_mask=ignore, return_attention=True)
        torch.testing.assert_close(out, want, **TOL)
        assert w.masked_select(ignore[:, None, None, :]).eq(0).all()  # no weight on padding
        causal = causal_mask(B, M)  # combined with an attn_mask (True = attend): both apply
        both = ref(x, ctx, ctx, attn_mask=~causal | ignore[:, None, :].repeat_interleave(heads, 0))[0]
        rows = causal.unsqueeze(0) & ~ignore[:, None, :]  # rows with a key left (nn.MultiheadAttention: NaN)
        got = ours(x, ctx, attn_mask=causal, key_padding_mask=ignore)
        assert got[~rows.any(-1)].eq(0).all()
        torch.testing.assert_close(got[rows.any(-1)], both[rows.any(-1)], **TOL)
        float_pad = torch.zeros(B, M).masked_fill(ignore, float("-inf"))
        torch.testing.assert_close(ours(x, ctx, key_padding_mask=float_pad), want, **TOL)


def test_ambiguous_or_wrong_masks_are_rejected_with_the_right_form():
    mha = MultiHeadAttention(8, 2).eval()
    x, ctx = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    pad = padding_mask([7, 2, 4])  # (B, M), True = real token
    with pytest.raises(ValueError, match=r"\(B, M\) looks like a key padding mask.*key_padding_mask="):
        mha(x, ctx, attn_mask=pad)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, M\) = \(3, 7\)"):
        mha(x, ctx, key_padding_mask=~pad.T)
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        mha(x, ctx, key_padding_mask=pad.long())


def test_one_dimensional_mask_gives_the_same_result_on_both_paths():
    """A (M,) mask: the readable path accepted it, the fused one failed with an IndexError for 4-D inputs."""
    gen = torch.Generator().manual_seed(8)
    for lead in ((), (2,), (2, 3), (1, 2, 3)):
        q, k, v = (torch.randn(*lead, n, d, generator=gen) for n, d in ((4, 8), (5, 8), (5, 3)))
        for mask in (torch.tensor([True, False, True, True, False]), torch.tensor([0.0, -1.0, 2.0, -math.inf, 0.5])):
            readable = scaled_dot_product_attention(q, k, v, mask, fused=False)
            fused = scaled_dot_product_attention(q, k, v, mask)
            torch.testing.assert_close(fused, readable, **TOL)
            torch.testing.assert_close(fused, scaled_dot_product_attention(q, k, v, mask.expand(4, 5)), **TOL)
    with pytest.raises(ValueError, match="does not broadcast"):  # both paths refuse a wrong length alike
        scaled_dot_product_attention(q, k, v, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, k, v, torch.ones(4, dtype=torch.bool), fused=False)


def test_multi_head_attention_rejects_mismatched_batches_and_bad_dropout():
    mha = MultiHeadAttention(8, 2)
    for key, value in ((torch.randn(3, 6, 8), None), (torch.randn(2, 6, 8), torch.randn(3, 6, 8))):
        with pytest.raises(ValueError, match=r"same batch of B examples.*query \(2, 5, 8\)"):
            mha(torch.randn(2, 5, 8), key, value)
    for p in (2.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"dropout is a probability in \[0, 1\]"):
            MultiHeadAttention(8, 2, dropout=p)


def test_self_attention_without_positions_is_permutation_equivariant():
    torch.manual_seed(6)
    mha = MultiHeadAttention(16, 4).eval()
    for n in (2, 7, 20):
        x, perm = torch.randn(3, n, 16), torch.randperm(n)
        torch.testing.assert_close(mha(x[:, perm]), mha(x)[:, perm], **TOL)
        shift = torch.arange(n).roll(1)  # a permutation that moves every token
        pe = sinusoidal_position_encoding(n, 16)
        assert not torch.allclose(mha(x[:, shift] + pe), mha(x + pe)[:, shift], atol=1e-3)


def test_sinusoidal_encoding_matches_the_formula_and_depends_only_on_offsets():
    for n, dim in ((1, 2), (10, 8), (50, 64), (7, 6)):
        pe = sinusoidal_position_encoding(n, dim)
        assert pe.shape == (n, dim) and pe.dtype == torch.float32
        for p in range(n):
            for i in range(dim // 2):
                w = 10000 ** (-2 * i / dim)
                assert math.isclose(pe[p, 2 * i], math.sin(p * w), abs_tol=1e-6)
                assert math.isclose(pe[p, 2 * i + 1], math.cos(p * w), abs_tol=1e-6)
    pe = sinusoidal_position_encoding(64, 32).double()
    sim = pe @ pe.T
    for offset in (0, 1, 5, 30):  # every diagonal of PE PE^T is constant: similarity depends on p - p' only
        d = sim.diagonal(offset)
        torch.testing.assert_close(d, torch.full_like(d, d[0].item()), atol=1e-5, rtol=0)


def test_2d_encoding_is_row_code_then_column_code():
    for h, w, dim in ((1, 1, 4), (3, 5, 8), (8, 8, 64)):
        pe = sinusoidal_position_encoding_2d(h, w, dim).view(h, w, dim)
        rows, cols = sinusoidal_position_encoding(h, dim // 2), sinusoidal_position_encoding(w, dim // 2)
        for r in range(h):
            for c in range(w):
                assert torch.equal(pe[r, c], torch.cat([rows[r], cols[c]]))


def test_learned_position_embedding_adds_a_trainable_table():
    torch.manual_seed(7)
    emb = LearnedPositionEmbedding(10, 8)
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(emb(x), x + emb.weight[:6])
    emb(x).sum().backward()
    torch.testing.assert_close(emb.weight.grad[:6], torch.full((6, 8), 2.0))
    assert torch.equal(emb.weight.grad[6:], torch.zeros(4, 8))
    assert emb.weight.abs().max() <= 0.04


def test_clear_errors():
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="same head dimension d_k"):
        scaled_dot_product_attention(q, torch.randn(2, 5, 7), v)
    with pytest.raises(ValueError, match="same number of tokens"):
        scaled_dot_product_attention(q, k, torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="do not broadcast"):
        scaled_dot_product_attention(q, torch.randn(3, 5, 8), torch.randn(3, 5, 3))
    with pytest.raises(ValueError, match=r"does not broadcast to the attention scores \(\.\.\., N, M\) = \(2, 4, 5\)"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):  # would expand the scores: also refused
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        scaled_dot_product_attention(torch.randn(8), k, v)
    with pytest.raises(ValueError, match=r"num_heads=4 does not divide dim=10.*\[1, 2, 5, 10\]"):
        MultiHeadAttention(10, 4)
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"query must have shape \(B, tokens, 8\)"):
        mha(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match=r"key must have shape"):
        mha(torch.randn(2, 4, 8), torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="does not broadcast"):
        mha(torch.randn(2, 4, 8), attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True))
    with pytest.raises(ValueError, match="positive even"):
        sinusoidal_position_encoding(4, 7)
    with pytest.raises(ValueError, match="multiple of 4"):
        sinusoidal_position_encoding_2d(4, 4, 10)
    with pytest.raises(ValueError, match=r"N <= 4"):
        LearnedPositionEmbedding(4, 8)(torch.randn(1, 5, 8))


def test_bench_attention_prints_both_paths(capsys):
    from companion.bench import bench_attention

    rows = bench_attention(device="cpu", lengths=(8, 16), min_time=0.01)
    text = capsys.readouterr().out
    assert "cpu" in text.lower() and "readable" in text and "fused" in text
    assert [r["n"] for r in rows] == [8, 16]
    assert all(r["readable_ms"] > 0 and r["fused_ms"] > 0 for r in rows)
    assert rows[1]["weights_mib"] == pytest.approx(4 * rows[0]["weights_mib"])


def test_fused_kernel_is_what_the_fast_path_calls(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = torch.randn(1, 3, 4)
    scaled_dot_product_attention(q, q, q)
    MultiHeadAttention(4, 2)(q)
    assert len(calls) == 2
    scaled_dot_product_attention(q, q, q, return_attention=True)
    MultiHeadAttention(4, 2)(q, return_attention=True)
    assert len(calls) == 2


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_attention_on_the_cpu_runs_in_float32_and_matches(masked: bool) -> None:
    """bfloat16 inputs on the CPU go through the fused kernel in float32: same values and gradients as float32."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 3, 17, 8) for _ in range(3))
    mask = torch.rand(17, 17) > 0.3 if masked else None
    if mask is not None:
        mask.fill_diagonal_(True)
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    ref = [t.bfloat16().float().requires_grad_() for t in (q, k, v)]  # the same rounded inputs, in float32
    out = scaled_dot_product_attention(*low, attn_mask=mask)
    expected = F.scaled_dot_product_attention(*ref, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=0, atol=0)  # one rounding, same place
    out.float().sum().backward()
    expected.sum().backward()
    for a, b in zip(low, ref):
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=1e-2, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would cast float32 back: it is switched off inside
        again = scaled_dot_product_attention(*(t.detach() for t in low), attn_mask=mask)
    torch.testing.assert_close(again.float(), out.float().detach(), rtol=0, atol=0)
