"""Tests of the SAGAN self-attention block and the CNN that uses it (companion.models.sagan)."""

import math

import pytest
import torch
import torch.nn.functional as F

from companion.models import AttentionCNN, FastCNN, SelfAttention2d

pytestmark = pytest.mark.usefixtures("one_thread")


def seed_formula(block: SelfAttention2d, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SAGAN written directly with bmm, as in the seed code, from the block's weights."""
    B, C, H, W = x.shape
    N = H * W
    f = F.conv2d(x, block.query.weight, block.query.bias).reshape(B, -1, N)  # (B, C', N)
    g = F.conv2d(x, block.key.weight, block.key.bias).reshape(B, -1, N)  # (B, C', N)
    h = F.conv2d(x, block.value.weight, block.value.bias).reshape(B, C, N)  # (B, C, N)
    energy = torch.bmm(f.permute(0, 2, 1), g) * scale  # (B, N, N): energy[b, i, j] = q_i . k_j
    attn = torch.softmax(energy, dim=-1)  # row i: the weights of query position i over all positions j
    out = torch.bmm(h, attn.permute(0, 2, 1)).reshape(B, C, H, W)  # out[:, :, i] = sum_j attn[i, j] v_j
    return block.gamma * out + x, attn


def random_cases(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        B, H, W = (int(torch.randint(1, 5, (), generator=gen)) for _ in range(3))
        reduction = [1, 2, 4, 8][int(torch.randint(0, 4, (), generator=gen))]
        C = reduction * int(torch.randint(1, 5, (), generator=gen))
        yield B, C, H, W, reduction


@pytest.mark.parametrize("scale, seed", [(1.0, 0), (None, 1), (0.3, 2)])
def test_matches_seed_formula_over_random_shapes(scale, seed):
    for i, (B, C, H, W, r) in enumerate(random_cases(25, seed)):
        torch.manual_seed(i)
        block = SelfAttention2d(C, reduction=r, scale=scale)
        with torch.no_grad():
            block.gamma.fill_(torch.randn(()).item())  # a trained-looking gamma, so the attention term counts
        x = torch.randn(B, C, H, W)
        out, weights = block(x, return_attention=True)
        s = 1 / math.sqrt(C // r) if scale is None else scale
        ref_out, ref_weights = seed_formula(block, x, s)
        assert out.shape == x.shape and weights.shape == (B, H * W, H * W)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights, ref_weights, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block(x), out, atol=1e-5, rtol=1e-5)  # fused kernel path, no weights


def test_softmax_runs_over_keys_each_query_row_sums_to_one():
    torch.manual_seed(0)
    block = SelfAttention2d(16, reduction=4)
    _, weights = block(torch.randn(3, 16, 5, 6), return_attention=True)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 30))  # over keys: one distribution per query
    assert not torch.allclose(weights.sum(-2), torch.ones(3, 30), atol=1e-3)  # columns do not: axis matters


def test_gamma_zero_is_identity_and_only_gamma_learns_first():
    torch.manual_seed(0)
    for C, H, W in [(8, 4, 4), (32, 7, 7), (16, 3, 9)]:
        block = SelfAttention2d(C)
        x = torch.randn(2, C, H, W, requires_grad=True)
        out = block(x)
        assert block.gamma.item() == 0.0 and block.gamma.shape == ()
        assert torch.equal(out, x)
        out.square().sum().backward()
        assert block.gamma.grad.abs() > 0  # gamma gets a gradient at once ...
        for conv in (block.query, block.key, block.value):  # ... the projections only once gamma != 0
            assert torch.count_nonzero(conv.weight.grad) == 0


def test_permuting_positions_permutes_the_output():
    """Without position information, the block is equivariant to any reordering of the positions."""
    torch.manual_seed(0)
    block = SelfAttention2d(16, reduction=2)
    with torch.no_grad():
        block.gamma.fill_(0.7)
    x = torch.randn(2, 16, 5, 5)
    perm = torch.randperm(25)
    permuted = x.flatten(2)[:, :, perm].reshape_as(x)
    torch.testing.assert_close(block(permuted).flatten(2), block(x).flatten(2)[:, :, perm], atol=1e-5, rtol=1e-5)


def test_channels_last_input_gives_the_same_result():
    torch.manual_seed(0)
    block = SelfAttention2d(16, reduction=2)
    with torch.no_grad():
        block.gamma.fill_(1.3)
    x = torch.randn(2, 16, 6, 4)
    torch.testing.assert_close(block(x.contiguous(memory_format=torch.channels_last)), block(x))


def test_wrong_shapes_and_arguments_raise_clear_errors():
    block = SelfAttention2d(16)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 16, H, W\).*unsqueeze"):
        block(torch.randn(16, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\), got \(2, 8, 4, 4\)"):
        block(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="channels // reduction must be at least 1"):
        SelfAttention2d(4, reduction=8)
    with pytest.raises(ValueError, match="attention_after must name a stage, 1 to 3"):
        AttentionCNN((8, 16, 32), attention_after=4)
    with pytest.raises(ValueError, match="attention_after must name a stage"):
        AttentionCNN((8, 16, 32), attention_after=0)
    with pytest.raises(ValueError, match="expects images of shape"):
        AttentionCNN((8, 16, 32))(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="needs images of at least 9x9"):
        AttentionCNN((8, 16, 32))(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("after, side", [(1, 15), (2, 7), (3, 3)])
def test_attention_cnn_is_fast_cnn_plus_the_block(after, side):
    widths = (8, 16, 32)
    torch.manual_seed(0)
    plain = FastCNN(widths, stem_width=24).eval()
    torch.manual_seed(0)
    model = AttentionCNN(widths, stem_width=24, attention_after=after).eval()
    extra = {k for k in model.state_dict() if k.startswith("attention.")}
    assert set(model.state_dict()) - extra == set(plain.state_dict())
    for key, value in plain.state_dict().items():  # same seed: the shared layers start identical
        assert torch.equal(model.state_dict()[key], value), key
    assert model.attention.channels == widths[after - 1]
    x = torch.randn(3, 3, 32, 32)
    logits, attn = model(x, return_attention=True)
    assert attn.shape == (3, side * side, side * side)
    torch.testing.assert_close(logits, plain(x))  # gamma = 0: the block is the identity at the start
    torch.testing.assert_close(model(x), logits)
    with torch.no_grad():
        model.attention.gamma.fill_(1.0)
    assert not torch.allclose(model(x), plain(x), atol=1e-4)  # ... and not once gamma moves


def test_attention_cnn_trains_gamma():
    torch.manual_seed(0)
    model = AttentionCNN((8, 16, 32), attention_after=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert model.attention.gamma.item() != 0.0
    assert model.attention.query.weight.grad.abs().sum() > 0  # once gamma moved, the projections learn too


def test_attention_cnn_reuses_fastcnn_features_and_head():
    """The stem-and-stages body is FastCNN's: with gamma = 0 the features equal FastCNN's, with the same names."""
    torch.manual_seed(0)
    plain = FastCNN((8, 16, 32)).eval()
    torch.manual_seed(0)
    model = AttentionCNN((8, 16, 32), attention_after=2).eval()
    assert set(plain.state_dict()) < set(model.state_dict())  # FastCNN's keys, plus the attention block's
    x = torch.randn(3, 3, 20, 24)
    features, weights = model.forward_features(x, return_attention=True)
    assert features.shape == (3, 32, 2, 2) and weights.shape == (3, 20, 20)
    torch.testing.assert_close(features, plain.forward_features(x))  # gamma = 0: the block is the identity
    torch.testing.assert_close(model.forward_head(features), model(x))
    torch.testing.assert_close(plain.forward_head(plain.forward_features(x)), plain(x))
