"""Chapter 3 models: output shapes, clear errors, training on a small batch, save/load, counts, the recipe."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from companion.models import (
    FastCNN,
    SimpleCNN,
    count_flops,
    count_parameters,
    format_table,
    load_weights,
    save_weights,
    summary,
)
from companion.models.cnn import patch_whitening
from companion.recipes.cnn import CNN_RECIPE, make_cnn, train_cnn


@pytest.mark.parametrize("seed", range(4))
def test_simple_cnn_shapes(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    batch, classes = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(2, 20, (1,), generator=g))
    out = SimpleCNN(num_classes=classes)(torch.randn(batch, 3, 32, 32, generator=g))
    assert out.shape == (batch, classes)


@pytest.mark.parametrize("seed", range(6))
def test_fast_cnn_shapes(seed: int) -> None:
    rng = random.Random(seed)
    stages = rng.randint(1, 4)
    widths = tuple(rng.choice([4, 8, 12]) for _ in range(stages))
    depth, classes, size = rng.randint(1, 3), rng.randint(2, 12), rng.choice([32, 40, 2**stages + 1])
    model = FastCNN(widths, depth_per_stage=depth, num_classes=classes, batch_norm=rng.random() < 0.5)
    out = model(torch.randn(3, 3, size, size))
    assert out.shape == (3, classes)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 1 + stages * depth


@pytest.mark.parametrize(
    ("model", "shape", "match"),
    [
        (SimpleCNN(), (2, 3, 28, 28), r"SimpleCNN expects images of shape \(B, 3, 32, 32\)"),
        (SimpleCNN(), (3, 32, 32), "unsqueeze"),
        (SimpleCNN(), (2, 1, 32, 32), r"\(B, 3, 32, 32\)"),
        (FastCNN((8, 8, 8)), (2, 1, 32, 32), r"\(B, 3, H, W\)"),
        (FastCNN((8, 8, 8)), (2, 3, 8, 8), "at least 9x9"),
    ],
)
def test_wrong_input_shape_is_a_clear_error(model: nn.Module, shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


@pytest.mark.parametrize(("kwargs", "match"), [({"widths": ()}, "widths"), ({"depth_per_stage": 0}, "depth")])
def test_bad_fast_cnn_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FastCNN(**kwargs)


@pytest.mark.parametrize("make", [SimpleCNN, lambda: FastCNN((8, 8, 16))])
def test_loss_falls_on_a_small_batch(make) -> None:
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(20, 3, 32, 32), torch.arange(20) % 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("make", [SimpleCNN, lambda: FastCNN((8, 16, 16)).to(memory_format=torch.channels_last)])
def test_save_load_round_trip(make, tmp_path) -> None:
    torch.manual_seed(0)
    model = make()
    model.train()(torch.randn(16, 3, 32, 32))  # move batch-norm running statistics away from their defaults
    path = tmp_path / "weights.safetensors"
    save_weights(model, path)
    torch.manual_seed(1)
    other = load_weights(make(), path)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model.eval()(x), other.eval()(x))
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_weights_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_weights(SimpleCNN(), tmp_path / "missing.safetensors")
    save_weights(SimpleCNN(num_classes=5), tmp_path / "five.safetensors")
    with pytest.raises(ValueError, match="do not fit this model"):
        load_weights(SimpleCNN(), tmp_path / "five.safetensors")


def test_count_parameters_by_hand() -> None:
    # SimpleCNN: conv weights + biases, then fully connected weights + biases.
    by_hand = (3 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert count_parameters(SimpleCNN()) == by_hand == 62_006
    # FastCNN((a, b), depth 2): 2x2 stem (24 filters + bias), bias-free 3x3 convs, 2 BN parameters per channel, head.
    a, b = 8, 16
    convs = 24 * a * 9 + a * a * 9 + a * b * 9 + b * b * 9
    by_hand = (3 * 4 * 24 + 24) + convs + 2 * 2 * (a + b) + b * 10
    model = FastCNN((a, b), depth_per_stage=2)
    assert count_parameters(model) == by_hand
    model.whiten(torch.randn(8, 3, 32, 32))  # freezes the stem's 288 weights
    assert count_parameters(model, trainable_only=True) == by_hand - 288


@pytest.mark.parametrize("seed", range(8))
def test_count_flops_of_one_conv_matches_the_formula(seed: int) -> None:
    rng = random.Random(seed)
    c_in, c_out, k = rng.randint(1, 8), rng.randint(1, 8), rng.choice([1, 3, 5])
    stride, padding, size, batch = rng.randint(1, 2), rng.randint(0, 2), rng.randint(8, 20), rng.randint(1, 4)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=False)
    out = (size + 2 * padding - k) // stride + 1
    assert count_flops(conv, (batch, c_in, size, size)) == 2 * c_in * c_out * k * k * out * out  # per image


def test_count_flops_of_simple_cnn() -> None:
    macs = 6 * 3 * 25 * 28 * 28 + 16 * 6 * 25 * 10 * 10 + 400 * 120 + 120 * 84 + 84 * 10
    assert count_flops(SimpleCNN()) == 2 * macs


def test_summary_rows() -> None:
    rows = summary(SimpleCNN(), (2, 3, 32, 32))
    assert [r[0] for r in rows] == ["conv1", "pool", "conv2", "pool", "fc1", "fc2", "fc3"]
    assert [r[2] for r in rows] == [
        (2, 6, 28, 28),
        (2, 6, 14, 14),
        (2, 16, 10, 10),
        (2, 16, 5, 5),
        (2, 120),
        (2, 84),
        (2, 10),
    ]
    model = FastCNN((8, 16, 32))
    rows = summary(model)
    assert sum(r[3] for r in rows) == count_parameters(model)
    assert rows[-1][2] == (1, 10) and rows[0][2] == (1, 24, 31, 31)
    table = format_table(rows).splitlines()
    assert table[0].split() == ["layer", "type", "output", "shape", "params"] and len(table) == len(rows) + 2
    assert table[2].endswith("312")  # numbers right-aligned


def test_format_table_checks_row_length() -> None:
    assert format_table([("a", 1234)], ["name", "n"]).splitlines()[-1] == "a     1,234"
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        format_table([("a", 1, 2)], ["name", "n"])


def test_patch_whitening_decorrelates_patches() -> None:
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.9, 0.8], [0.0, 0.5, 0.4], [0.0, 0.0, 0.2]])
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 16, 16))  # correlated channels
    images = images + 0.7 * images.roll(1, dims=3)  # correlated neighbours
    stem = nn.Conv2d(3, 24, 2)
    eigenvalues = patch_whitening(stem, images, eps=1e-3)
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:])  # largest first
    with torch.no_grad():
        out = stem(images)[:, :12].permute(1, 0, 2, 3).reshape(12, -1)  # the first 12 filters, (12, N*15*15)
    cov = torch.cov(out.double()).float()
    # Decorrelated outputs with variance lambda / (lambda + eps): close to 1 for all but the weakest directions.
    assert torch.allclose(cov, torch.diag(eigenvalues / (eigenvalues + 1e-3)), atol=1e-4), cov
    assert cov.diagonal().min() > 0.9
    assert torch.equal(stem.weight[12:], -stem.weight[:12])
    with pytest.raises(ValueError, match="out_channels = 2"):
        patch_whitening(nn.Conv2d(3, 16, 2), images)


def test_train_cnn_end_to_end(fake_cifar, capsys) -> None:
    tmp_path = fake_cifar
    recipe = CNN_RECIPE.replace(widths=(8, 8, 8), quick_n_train=40, quick_n_test=20, quick_batch_size=16)
    save = tmp_path / "cnn.safetensors"
    result = train_cnn(quick=True, epochs=2, root=tmp_path, save=save, recipe=recipe, progress=False)
    line = capsys.readouterr().out
    assert "test accuracy" in line and "flip+1px-shift TTA" in line and "torch threads" in line
    assert result.epochs == 2 and result.n_train == 40 and len(result.history.test_acc) == 2
    assert result.recipe.quick and result.recipe.batch_size == 16 and result.recipe.n_test == 20
    assert 0 <= result.test_acc <= 1 and 0 <= result.test_acc_tta <= 1 and result.train_seconds > 0
    reloaded = load_weights(FastCNN((8, 8, 8)), save)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(reloaded.eval()(x), result.model.cpu().eval()(x))


def test_make_cnn_needs_images_to_whiten() -> None:
    with pytest.raises(ValueError, match="needs whiten_images"):
        make_cnn(CNN_RECIPE)
    model = make_cnn(CNN_RECIPE.replace(whiten=False, widths=(8, 8, 8)))
    assert model.stem.weight.requires_grad and model.stages[0].convs[0].weight.is_contiguous(
        memory_format=torch.channels_last
    )
