"""Chapter 5: the Vision Transformer's parts against PyTorch, shapes, clear errors, rollout, the recipe's pieces."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from companion.attention import sinusoidal_position_encoding_2d
from companion.augment import ErasingLoader
from companion.models import EncoderBlock, PatchEmbedding, ViT, count_flops, load_weights
from companion.models.vit import attention_rollout
from companion.recipes.vit import VIT_RECIPE, VIT_RECIPE_GPU, make_vit, train_vit

TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32


@pytest.mark.parametrize("seed", range(8))
def test_patch_embedding_is_unfold_then_linear_and_a_strided_conv(seed: int) -> None:
    rng = random.Random(seed)
    patch = rng.choice([1, 2, 4, 8])
    size, channels, dim, batch = patch * rng.randint(1, 5), rng.randint(1, 4), rng.randint(1, 40), rng.randint(1, 4)
    embed = PatchEmbedding(size, patch, channels, dim)
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
    ours = embed(x)
    assert ours.shape == (batch, (size // patch) ** 2, dim)
    patches = F.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2)  # (B, N, C * p * p)
    torch.testing.assert_close(embed.patchify(x), patches, atol=0, rtol=0)
    torch.testing.assert_close(ours, F.linear(patches, embed.proj.weight, embed.proj.bias), **TOL)
    conv = embed.to_conv()
    torch.testing.assert_close(ours, conv(x).flatten(2).transpose(1, 2), **TOL)
    assert conv.stride == (patch, patch) and conv.kernel_size == (patch, patch)


def test_patch_order_is_row_major() -> None:
    embed = PatchEmbedding(8, 4, 1, 1)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4:, :4] = 1.0  # the bottom-left patch is patch number 2 in row-major order
    assert embed.patchify(x).sum(-1).flatten().tolist() == [0.0, 0.0, 16.0, 0.0]


@pytest.mark.parametrize("seed", range(10))
def test_encoder_block_equals_torch_transformer_encoder_layer(seed: int) -> None:
    rng = random.Random(seed)
    heads = rng.choice([1, 2, 3, 4])
    dim, mlp_dim = heads * rng.randint(1, 12), rng.randint(1, 64)
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(
        dim, heads, mlp_dim, dropout=0.0, norm_first=True, batch_first=True, activation="gelu"
    ).eval()
    with torch.no_grad():  # move the norms away from (1, 0) so they are really compared
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    block = EncoderBlock.from_torch(layer).eval()
    x = torch.randn(rng.randint(1, 4), rng.randint(1, 20), dim)
    torch.testing.assert_close(block(x), layer(x), **TOL)
    with torch.no_grad():  # PyTorch's fused inference path, too
        torch.testing.assert_close(block(x), layer(x), **TOL)
    out, weights = block(x, return_attention=True)
    torch.testing.assert_close(out, layer(x), **TOL)
    assert weights.shape == (x.shape[0], heads, x.shape[1], x.shape[1])
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), **TOL)


def test_encoder_block_gradients_match_torch() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=True, batch_first=True, activation="gelu")
    block = EncoderBlock.from_torch(layer)
    x = torch.randn(2, 9, 16)
    layer(x).square().sum().backward()
    block(x).square().sum().backward()
    torch.testing.assert_close(block.mlp[0].weight.grad, layer.linear1.weight.grad, **TOL)
    torch.testing.assert_close(block.attn.q_proj.weight.grad, layer.self_attn.in_proj_weight.grad[:16], **TOL)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm_first": False}, "norm_first=True"),
        ({"activation": "relu"}, "activation='gelu'"),
        ({"batch_first": False}, "batch_first=True"),
    ],
)
def test_from_torch_rejects_other_layers(kwargs: dict, match: str) -> None:
    options = {"dropout": 0.0, "norm_first": True, "batch_first": True, "activation": "gelu"} | kwargs
    with pytest.raises(ValueError, match=match):
        EncoderBlock.from_torch(nn.TransformerEncoderLayer(8, 2, 16, **options))


@pytest.mark.parametrize("seed", range(8))
def test_vit_shapes_for_several_configurations(seed: int) -> None:
    rng = random.Random(seed)
    patch = rng.choice([2, 4, 8])
    size, heads = patch * rng.randint(1, 4), rng.choice([1, 2, 4])
    dim = 4 * heads * rng.randint(1, 3)  # a multiple of 4 so that 'sincos' works too
    depth, classes, pool = rng.randint(1, 3), rng.randint(2, 12), rng.choice(["cls", "mean"])
    model = ViT(
        size,
        patch,
        dim,
        depth,
        heads,
        rng.choice([1.0, 2.0, 4.0]),
        classes,
        pool,
        pos_embedding=rng.choice(["learned", "sincos"]),
        in_channels=rng.choice([1, 3]),
    )
    nn.init.normal_(model.head.weight)  # the head starts at zero: all logits would be 0 on both paths
    x = torch.randn(3, model.patch_embed.in_channels, size, size)
    logits, attentions = model(x, return_attention=True)
    assert logits.abs().amax() > 0.1
    tokens = (size // patch) ** 2 + (pool == "cls")
    assert logits.shape == (3, classes)
    assert len(attentions) == depth and all(a.shape == (3, heads, tokens, tokens) for a in attentions)
    torch.testing.assert_close(model(x), logits, **TOL)  # the fused path gives the same logits
    assert attention_rollout(attentions).shape == (3, tokens, tokens)


def test_count_flops_sees_attention() -> None:
    model = ViT(image_size=32, patch_size=4, dim=32, depth=2, num_heads=4).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32), return_attention=True)  # the readable path: plain matmuls
    n, dim = 65, 32
    attention = 2 * 2 * n * n * dim  # per layer: Q K^T and weights @ V, 2 FLOPs per multiply-add
    assert count_flops(model) == counter.get_total_flops() and count_flops(model) > 2 * attention


def test_zero_head_and_position_embeddings() -> None:
    model = ViT(dim=32, depth=1, num_heads=2, pos_embedding="sincos")
    assert torch.count_nonzero(model(torch.randn(2, 3, 32, 32))) == 0  # zero-initialised head: uniform start
    assert "pos_embedding" not in dict(model.named_parameters())  # fixed, not trained
    torch.testing.assert_close(model.pos_embedding[1:], sinusoidal_position_encoding_2d(8, 8, 32))
    assert torch.count_nonzero(model.pos_embedding[0]) == 0  # the class token has no position
    learned = ViT(dim=32, depth=1, num_heads=2, pool="mean")
    assert learned.cls_token is None and learned.pos_embedding.shape == (64, 32) and learned.pos_embedding.requires_grad


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_only_the_position_embedding_tells_the_patches_apart(pool: str) -> None:
    torch.manual_seed(0)
    model = ViT(image_size=8, patch_size=2, dim=16, depth=2, num_heads=2, pool=pool).eval()
    nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 8, 8)
    perm = torch.randperm(16)
    grid = x.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 3, 2, 2)  # (B, patch, C, 2, 2)
    shuffled = grid[:, perm].reshape(2, 4, 4, 3, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 8, 8)
    torch.testing.assert_close(model.patch_embed(shuffled), model.patch_embed(x)[:, perm])
    assert not torch.allclose(model(shuffled), model(x), atol=1e-3)  # learned positions: order matters
    with torch.no_grad():
        model.pos_embedding.zero_()
    torch.testing.assert_close(model(shuffled), model(x), **TOL)  # no positions: a bag of patches


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 32, "patch_size": 5}, r"patch_size=5 does not divide image_size=32.*\[1, 2, 4, 8, 16, 32\]"),
        ({"dim": 30, "num_heads": 4}, r"num_heads=4 does not divide dim=30.*choose num_heads from"),
        ({"pool": "max"}, "pool must be 'cls'"),
        ({"pos_embedding": "rope"}, "pos_embedding must be"),
        ({"depth": 0}, "depth must be at least 1"),
    ],
)
def test_bad_vit_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ViT(**({"dim": 32, "num_heads": 2} | kwargs))


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 3, 28, 28), r"expects images of shape \(B, 3, 32, 32\), got \(2, 3, 28, 28\).*resize or crop.* to 32x32"),
        ((3, 32, 32), "unsqueeze"),
        ((2, 1, 32, 32), r"\(B, 3, 32, 32\)"),
    ],
)
def test_wrong_input_image_is_a_clear_error(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ViT(dim=16, depth=1, num_heads=2)(torch.randn(*shape))


def test_non_square_image_hint_names_no_wrong_size() -> None:
    """A 28x32 image used to get the hint 'build the model with image_size=32', which cannot fit it."""
    model = ViT(dim=16, depth=1, num_heads=2)
    for shape in ((2, 3, 28, 32), (2, 3, 32, 28)):
        with pytest.raises(ValueError, match=r"resize or crop the images to 32x32") as err:
            model(torch.randn(*shape))
        assert "image_size=" not in str(err.value)


def test_vit_leaves_the_head_check_to_multi_head_attention() -> None:
    with pytest.raises(ValueError, match=r"num_heads=4 does not divide dim=30") as err:
        ViT(dim=30, num_heads=4)
    assert any(str(entry.path).endswith("attention.py") for entry in err.traceback)  # raised by MultiHeadAttention


def test_attention_rollout() -> None:
    eye = torch.eye(5).expand(2, 3, 5, 5)
    torch.testing.assert_close(attention_rollout([eye, eye]), torch.eye(5).expand(2, 5, 5))  # no mixing at all
    uniform = torch.full((1, 2, 4, 4), 0.25)
    torch.testing.assert_close(attention_rollout([uniform], residual=False), torch.full((1, 4, 4), 0.25))
    torch.manual_seed(0)
    layers = [torch.softmax(torch.randn(2, 3, 6, 6), -1) for _ in range(3)]
    r = attention_rollout(layers)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 6), **TOL)  # rows stay distributions
    a = [0.5 * w.mean(1) + 0.5 * torch.eye(6) for w in layers]
    torch.testing.assert_close(r, a[2] @ a[1] @ a[0], **TOL)
    with pytest.raises(ValueError, match="at least one layer"):
        attention_rollout([])
    with pytest.raises(ValueError, match=r"\(B, heads, T, T\)"):
        attention_rollout([torch.ones(2, 5, 5)])


def test_random_erasing() -> None:
    x = torch.ones(64, 3, 32, 32)
    loader = ErasingLoader([(x, torch.zeros(64))], p=1.0)  # type: ignore[arg-type]
    erased = loader.erase(x)
    frac = (erased == 0).float().mean(dim=(1, 2, 3))  # per image
    assert bool(((frac >= 0.01) & (frac <= 0.3)).all())  # one rectangle of about 2% to 25% (rounded) in every image
    assert bool((erased[:, 0] == erased[:, 2]).all())  # the same rectangle in every channel
    assert torch.equal(ErasingLoader([], p=0.0).erase(x), x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        ErasingLoader([], p=1.5)  # type: ignore[arg-type]


def test_recipes_build_and_train_a_step() -> None:
    for recipe in (VIT_RECIPE, VIT_RECIPE_GPU):
        with torch.device("meta"):  # shapes only: no memory, no initialisation work
            model = make_vit(recipe)
        assert model.patch_embed.patch_size == recipe.patch_size and len(model.blocks) == recipe.depth
    torch.manual_seed(0)
    model = ViT(image_size=8, patch_size=4, dim=16, depth=1, num_heads=2)
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first  # it can memorise a small batch


def test_train_vit_end_to_end(fake_cifar, tmp_path, capsys) -> None:
    recipe = VIT_RECIPE.replace(dim=16, depth=1, num_heads=2, erase=0.5, batch_size=32, quick_batch_size=16)
    recipe = recipe.replace(quick_n_train=40, quick_n_test=20)
    save = tmp_path / "vit.safetensors"
    result = train_vit(quick=True, epochs=2, root=fake_cifar, save=save, recipe=recipe, progress=False)
    saved, line = capsys.readouterr().out.splitlines()  # the weights are written first, then the result line
    assert line.startswith("ViT cpu recipe (dim 16, depth 1") and "(quick, 2 epochs, 40 training images)" in line
    assert "flip-TTA" in line and saved == f"weights saved to {save}"
    assert result.n_train == 40 and len(result.history.test_acc) == 2 and result.recipe.erase == 0.5
    assert result.recipe.batch_size == 16  # quick mode trains in the recipe's quick_batch_size
    assert 0 <= result.test_acc <= 1 and 0 <= result.test_acc_tta <= 1 and result.train_seconds > 0
    reloaded = load_weights(make_vit(recipe), save)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded.eval()(x), result.model.cpu().eval()(x))
