"""The GPU recipes' ingredients, each tested on the CPU: frozen BatchNorm scales, soft labels, optimiser groups,
the weight average, translate-TTA in ``fit``/``evaluate``, and the recipes' fields."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import companion
from companion.augment import AugmentLoader, tta_logits
from companion.data import DeviceLoader
from companion.models import FastCNN, ViT, count_parameters
from companion.train import History, _optimizer, evaluate, fit, predict


def test_bn_scale_false_freezes_the_batchnorm_scales_at_one() -> None:
    torch.manual_seed(0)
    plain, frozen = FastCNN((8, 16, 16)), FastCNN((8, 16, 16), bn_scale=False)
    assert count_parameters(plain, trainable_only=True) - count_parameters(frozen, trainable_only=True) == 2 * 40
    opt = torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(frozen(x), y).backward()
        opt.step()
    norms = [bn for stage in frozen.stages for bn in stage.norms]
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in norms)
    assert any(not torch.equal(bn.bias, torch.zeros_like(bn.bias)) for bn in norms)  # the shifts do learn


def tiny_data(n: int = 48, batch_size: int = 16, seed: int = 0) -> DeviceLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return DeviceLoader(images, torch.arange(n) % 10, batch_size, shuffle=True, device="cpu", seed=seed)


class SoftLabels:
    """The same batches with one-hot float labels: soft labels that say exactly what the hard ones say."""

    def __init__(self, loader: DeviceLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x, F.one_hot(y, 10).float()


def run_fit(data, **kwargs) -> tuple[nn.Module, History]:
    companion.seed_everything(0)
    model = FastCNN((8, 8, 8))
    history = fit(model, data, tiny_data(16, 16), epochs=3, progress=False, **kwargs)
    return model, history


def test_fit_takes_soft_labels_and_one_hot_ones_train_exactly_as_hard_labels() -> None:
    _, hard = run_fit(tiny_data(), label_smoothing=0.1)
    _, soft = run_fit(SoftLabels(tiny_data()), label_smoothing=0.1)
    assert soft.train_loss == pytest.approx(hard.train_loss, rel=1e-5)
    assert soft.train_acc == hard.train_acc and soft.test_acc == hard.test_acc
    _, mixed = run_fit(AugmentLoader(tiny_data(), mixup_alpha=0.4, cutmix_alpha=1.0, seed=1))
    assert len(mixed.train_loss) == 3 and all(0 <= a <= 1 for a in mixed.train_acc)


def test_default_optimizer_groups_are_todays() -> None:
    """With the options off, the groups are the old rule's (so the CPU recipes' figures cannot move)."""
    model = ViT(image_size=8, patch_size=4, dim=8, depth=1, num_heads=2)
    opt = _optimizer(model, "adamw", 1e-3, 0.05, 0.9)
    want = [
        [p for p in model.parameters() if p.requires_grad and p.ndim >= 2],
        [p for p in model.parameters() if p.requires_grad and p.ndim < 2],
    ]
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in w] for w in want]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    opt = _optimizer(model, "sgd", 0.4, 5e-4, 0.9, no_decay=("cls_token", "pos_embedding"), vector_lr_scale=8)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 3.2, 0.4])
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0, 0.0]


def test_ema_in_fit_evaluates_and_returns_the_average() -> None:
    plain_model, plain = run_fit(tiny_data())
    same_model, same = run_fit(tiny_data(), ema_decay=0.0)  # an average with no memory is the weights themselves
    for a, b in zip(plain_model.state_dict().values(), same_model.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert same.test_acc == plain.test_acc
    model, history = run_fit(tiny_data(), ema_decay=0.9)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain_model.state_dict().values()))
    assert evaluate(model, tiny_data(16, 16))[1] == history.test_acc[-1]  # the reported model is the one returned
    assert history.train_loss == plain.train_loss  # a plain average watches training, it does not change it
    _, lookahead = run_fit(tiny_data(), ema_decay=0.5, lookahead_every=2)
    assert lookahead.train_loss != plain.train_loss  # lookahead: the weights restart from the average


def test_translate_tta_in_evaluate() -> None:
    companion.seed_everything(0)
    model, data = FastCNN((8, 8, 8)).eval(), tiny_data(32, 16)
    logits, labels = predict(model, data, tta_flip=True, tta_translate=2)
    x = torch.cat([b[0] for b in DeviceLoader(data.images, data.labels, 16, device="cpu")])
    with torch.no_grad():
        torch.testing.assert_close(logits, tta_logits(model, x, flip=True, translate_by=2))
    plain, _ = predict(model, data, tta_flip=True)
    assert not torch.allclose(plain, logits)
    loss, acc = evaluate(model, data, tta_flip=True, tta_translate=2)
    assert acc == (logits.argmax(1) == labels).float().mean().item()
