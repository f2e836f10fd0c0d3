"""The ViT's small-data options: stochastic depth, shifted patch tokenization, locality self-attention."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from companion.attention import MultiHeadAttention
from companion.models.vit import (
    DropPath,
    EncoderBlock,
    LocalitySelfAttention,
    PatchEmbedding,
    ShiftedPatchEmbedding,
    ViT,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def test_drop_path_is_the_identity_in_eval_and_at_zero() -> None:
    x = torch.randn(8, 5, 4)
    torch.testing.assert_close(DropPath(0.3).eval()(x), x, atol=0, rtol=0)
    torch.testing.assert_close(DropPath(0.0).train()(x), x, atol=0, rtol=0)


def test_drop_path_drops_whole_examples_at_the_rate_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    x = torch.ones(20_000, 3, 2)
    out = DropPath(0.25).train()(x)
    per_example = out.flatten(1)
    dropped = (per_example == 0).all(1)
    kept = (per_example == 1 / 0.75).all(1)
    assert bool((dropped | kept).all())  # each example is either all dropped or all kept and rescaled
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.015)
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropPath(1.0)


def test_vit_drop_path_rates_rise_linearly_and_eval_is_deterministic() -> None:
    model = ViT(image_size=8, patch_size=4, dim=8, depth=3, num_heads=2, drop_path=0.2)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])
    x = torch.randn(4, 3, 8, 8)
    torch.nn.init.normal_(model.head.weight)  # the head starts at zero: every output would be 0
    model.eval()
    assert model(x).abs().amax() > 0
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
    # with drop path off, the same weights give the same outputs in train and eval mode (no other randomness)
    torch.manual_seed(1)
    plain = ViT(image_size=8, patch_size=4, dim=8, depth=3, num_heads=2)
    torch.nn.init.normal_(plain.head.weight)
    torch.testing.assert_close(plain.train()(x), plain.eval()(x))


@pytest.mark.parametrize("seed", range(6))
def test_shifted_patches_equal_patching_the_stacked_shifted_images(seed: int) -> None:
    rng = random.Random(seed)
    p = rng.choice([1, 2, 4])
    size, c, dim = p * rng.randint(2, 4), rng.randint(1, 3), rng.randint(2, 12)
    spt = ShiftedPatchEmbedding(size, p, c, dim)
    with torch.no_grad():
        spt.norm.weight.uniform_(0.5, 1.5)
        spt.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(rng.randint(1, 3), c, size, size, generator=torch.Generator().manual_seed(seed))
    s = max(1, p // 2)

    def moved(dy: int, dx: int) -> torch.Tensor:
        """The image with its content moved by (dy, dx) pixels (down, right positive), zeros where it left."""
        out = torch.zeros_like(x)
        for i in range(size):
            for j in range(size):
                if 0 <= i - dy < size and 0 <= j - dx < size:
                    out[..., i, j] = x[..., i - dy, j - dx]
        return out

    stack = torch.cat([x, moved(-s, -s), moved(-s, s), moved(s, -s), moved(s, s)], dim=1)  # (B, 5C, H, W)
    torch.testing.assert_close(spt.shift(x), stack, atol=0, rtol=0)
    patches = F.unfold(stack, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, 5 C p p)
    want = F.linear(F.layer_norm(patches, (patches.shape[-1],), spt.norm.weight, spt.norm.bias), *_linear(spt))
    out = spt(x)
    assert out.shape == (len(x), (size // p) ** 2, dim)
    torch.testing.assert_close(out, want, **TOL)


def _linear(spt: ShiftedPatchEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
    return spt.embed.proj.weight, spt.embed.proj.bias


def test_shifted_patch_embedding_rejects_the_wrong_image() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        ShiftedPatchEmbedding(32, 4, 3, 16)(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("seed", range(6))
def test_locality_attention_masks_the_diagonal_and_uses_its_temperature(seed: int) -> None:
    rng = random.Random(seed)
    heads = rng.choice([1, 2, 4])
    dim, T, B = heads * rng.randint(1, 6), rng.randint(2, 9), rng.randint(1, 3)
    torch.manual_seed(seed)
    lsa = LocalitySelfAttention(dim, heads).eval()
    with torch.no_grad():
        lsa.log_scale.fill_(rng.uniform(-2.0, 1.0))
    x = torch.randn(B, T, dim)
    out, weights = lsa(x, return_attention=True)
    assert weights.shape == (B, heads, T, T)
    torch.testing.assert_close(weights.diagonal(dim1=-2, dim2=-1), torch.zeros(B, heads, T), atol=0, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, heads, T), **TOL)
    # by hand: the scores times exp(log_scale), the diagonal at -inf, softmax, the values, the output projection
    hd = dim // heads
    q = lsa.q_proj(x).view(B, T, heads, hd).transpose(1, 2)
    k = lsa.k_proj(x).view(B, T, heads, hd).transpose(1, 2)
    v = lsa.v_proj(x).view(B, T, heads, hd).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) * lsa.log_scale.exp()
    scores = scores.masked_fill(torch.eye(T, dtype=torch.bool), float("-inf"))
    want_w = scores.softmax(-1)
    want = lsa.out_proj((want_w @ v).transpose(1, 2).reshape(B, T, dim))
    torch.testing.assert_close(weights, want_w, **TOL)
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(lsa(x), out, **TOL)  # the fused path agrees with the readable one


def test_locality_attention_starts_as_plain_attention_apart_from_the_diagonal() -> None:
    torch.manual_seed(0)
    lsa = LocalitySelfAttention(8, 2).eval()
    mha = MultiHeadAttention(8, 2).eval()
    mha.load_state_dict({k: v for k, v in lsa.state_dict().items() if k != "log_scale"})
    x = torch.randn(2, 5, 8)
    mask = ~torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(lsa(x), mha(x, attn_mask=mask), **TOL)
    lsa(x).sum().backward()
    assert lsa.log_scale.grad is not None and lsa.log_scale.grad.abs() > 0  # the temperature is learned


def test_vit_options_build_train_and_default_to_the_plain_vit() -> None:
    plain = ViT(image_size=16, patch_size=4, dim=16, depth=2, num_heads=2)  # the defaults: every option off
    assert all(b.drop_path.p == 0.0 for b in plain.blocks) and type(plain.patch_embed) is PatchEmbedding
    assert all(type(b.attn) is MultiHeadAttention for b in plain.blocks)
    torch.nn.init.normal_(plain.head.weight)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain.train()(x), plain.eval()(x))  # no randomness left in training mode
    options = {"drop_path": 0.1, "shifted_patches": True, "locality_attention": True}
    small = ViT(image_size=16, patch_size=4, dim=16, depth=2, num_heads=2, **options)
    assert isinstance(small.patch_embed, ShiftedPatchEmbedding)
    assert all(isinstance(b.attn, LocalitySelfAttention) for b in small.blocks)
    x = torch.randn(4, 3, 16, 16)
    logits, attentions = small(x, return_attention=True)
    assert logits.shape == (4, 10) and len(attentions) == 2 and attentions[0].shape == (4, 2, 17, 17)
    torch.nn.init.normal_(small.head.weight)
    F.cross_entropy(small.train()(x), torch.arange(4)).backward()
    assert all(p.grad is not None for p in small.parameters())
    block = EncoderBlock(16, 2, 32, drop_path=0.5, locality=True)
    assert block.drop_path.p == 0.5 and isinstance(block.attn, LocalitySelfAttention)
