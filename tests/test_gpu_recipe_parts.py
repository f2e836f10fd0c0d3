"""The GPU recipes' ingredients, each tested on the CPU: frozen BatchNorm scales, soft labels, optimiser groups,
the weight average, translate-TTA in ``fit``/``evaluate``, and the recipes' fields."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import companion
import companion.recipes.cnn as cnn_recipes
import companion.recipes.vit as vit_recipes
from companion.augment import AugmentLoader, ErasingLoader, tta_logits
from companion.data import DeviceLoader
from companion.models import FastCNN, ViT, count_parameters
from companion.models.vit import LocalitySelfAttention, ShiftedPatchEmbedding
from companion.optim import EMA, make_optimizer
from companion.recipes.cnn import CNN_RECIPE, CNN_RECIPE_GPU, make_cnn, train_cnn
from companion.recipes.common import Recipe
from companion.recipes.vit import VIT_RECIPE, VIT_RECIPE_GPU, make_vit, train_vit, vit_data
from companion.train import History, TrainConfig, evaluate, fit, predict


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


def run_fit(data, ema: dict | None = None, **kwargs) -> tuple[nn.Module, History]:
    companion.seed_everything(0)
    model = FastCNN((8, 8, 8))
    callbacks = [EMA(model, **ema)] if ema is not None else []
    history = fit(model, data, tiny_data(16, 16), epochs=3, progress=False, callbacks=callbacks, **kwargs)
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
    opt = make_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    want = [
        [p for p in model.parameters() if p.requires_grad and p.ndim >= 2],
        [p for p in model.parameters() if p.requires_grad and p.ndim < 2],
    ]
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in w] for w in want]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    opt = make_optimizer(model, TrainConfig(lr=0.4, weight_decay=5e-4, decay_embeddings=False, vector_lr_scale=8))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 3.2, 0.4])
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0, 0.0]


def test_ema_in_fit_evaluates_and_returns_the_average() -> None:
    plain_model, plain = run_fit(tiny_data())
    same_model, same = run_fit(tiny_data(), ema={"decay": 0.0})  # an average with no memory is the weights themselves
    for a, b in zip(plain_model.state_dict().values(), same_model.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert same.test_acc == plain.test_acc
    model, history = run_fit(tiny_data(), ema={"decay": 0.9})
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain_model.state_dict().values()))
    assert evaluate(model, tiny_data(16, 16))[1] == history.test_acc[-1]  # the reported model is the one returned
    assert history.train_loss == plain.train_loss  # a plain average watches training, it does not change it
    _, lookahead = run_fit(tiny_data(), ema={"decay": 0.5, "every": 2, "lookahead": True})
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


# The GPU recipes' switches: each off (at its Recipe default) in the CPU recipes, so their measured figures hold.
GPU_SWITCHES = {
    "decay_embeddings": True,
    "vector_lr_scale": 1.0,
    "ema_decay": None,
    "lookahead_every": 0,
    "tta_translate": 0,
    "compile": False,
}
# The CNN's CPU recipe has airbench94_muon's ingredients on (measured on the CPU); only compiling stays GPU-only.
CNN_SWITCHES = {"compile": False}
VIT_SWITCHES = GPU_SWITCHES | {
    "drop_path": 0.0,
    "shifted_patches": False,
    "locality_attention": False,
    "random_ops": 0,
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
}


def test_cpu_recipes_keep_every_gpu_switch_off_and_the_gpu_recipes_turn_them_on() -> None:
    assert {k: CNN_RECIPE.settings()[k] for k in CNN_SWITCHES} == CNN_SWITCHES
    assert {k: VIT_RECIPE.settings()[k] for k in VIT_SWITCHES} == VIT_SWITCHES
    defaults = {f.name: f.default for f in fields(Recipe)} | {f.name: f.default for f in fields(TrainConfig)}
    assert {k: defaults[k] for k in GPU_SWITCHES} == GPU_SWITCHES
    cnn_on = {k for k, v in CNN_SWITCHES.items() if CNN_RECIPE_GPU.settings()[k] != v}
    assert cnn_on == set(CNN_SWITCHES)
    vit_on = {k for k, v in VIT_SWITCHES.items() if VIT_RECIPE_GPU.settings()[k] != v}
    assert vit_on == set(VIT_SWITCHES) - {"vector_lr_scale", "lookahead_every", "tta_translate"}
    assert CNN_RECIPE_GPU.widths == (64, 256, 256)


def test_gpu_recipes_build_their_models() -> None:
    cnn = make_cnn(CNN_RECIPE_GPU, torch.randn(64, 3, 32, 32))
    assert [stage.convs[0].out_channels for stage in cnn.stages] == [64, 256, 256]
    assert not any(bn.weight.requires_grad for stage in cnn.stages for bn in stage.norms)
    with torch.device("meta"):
        vit = make_vit(VIT_RECIPE_GPU)
    assert isinstance(vit.patch_embed, ShiftedPatchEmbedding)
    assert all(isinstance(b.attn, LocalitySelfAttention) for b in vit.blocks)
    assert vit.blocks[-1].drop_path.p == VIT_RECIPE_GPU.drop_path and vit.blocks[0].drop_path.p == 0


def test_compile_is_set_up_once_and_only_on_cuda() -> None:
    companion.seed_everything(0)
    model = FastCNN((8, 8, 8))
    history = fit(model, tiny_data(), epochs=1, compile=True, progress=False)  # the CPU: compile is ignored
    assert len(history.train_loss) == 1 and not hasattr(model, "_orig_mod")


class Picked(Exception):
    """Raised by a stand-in data function to report which recipe the trainer picked."""


@pytest.mark.parametrize(
    ("module", "train", "data", "gpu", "gpu_quick", "cpu"),
    [  # the GPU CNN recipe's learning rates are for batches of 2,000: quick mode on CUDA keeps the CPU recipe
        (cnn_recipes, train_cnn, "run", CNN_RECIPE_GPU, CNN_RECIPE, CNN_RECIPE),
        (vit_recipes, train_vit, "run", VIT_RECIPE_GPU, VIT_RECIPE_GPU, VIT_RECIPE),
    ],
)
def test_trainers_pick_the_gpu_recipe_on_cuda_only(monkeypatch, module, train, data, gpu, gpu_quick, cpu) -> None:
    def stop(recipe, *args, **kwargs):
        raise Picked(recipe)

    monkeypatch.setattr(module, data, stop)
    cases = (("cuda", False, gpu), ("cuda", True, gpu_quick), ("cpu", False, cpu), ("cpu", True, cpu))
    for device, quick, want in cases:
        monkeypatch.setattr(module, "device", lambda d=device: torch.device(d))
        with pytest.raises(Picked) as picked:
            train(quick=quick, progress=False)
        assert picked.value.args[0] == want.for_mode(quick), (device, quick)


def test_the_gpu_cnn_recipe_trains_end_to_end_on_the_cpu(fake_cifar: Path, capsys) -> None:
    recipe = CNN_RECIPE_GPU.replace(widths=(8, 8, 8), quick_n_train=40, quick_n_test=20, quick_batch_size=8)
    result = train_cnn(quick=True, epochs=2, root=fake_cifar, recipe=recipe, progress=False)
    assert "with flip+1px-shift TTA" in capsys.readouterr().out
    assert result.model is not None and not hasattr(result.model, "_orig_mod")  # not compiled on the CPU
    assert len(result.history.test_acc) == 2 and 0 <= result.test_acc_tta <= 1
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for s in result.model.stages for bn in s.norms)


def test_the_gpu_vit_recipe_trains_end_to_end_on_the_cpu(fake_cifar: Path) -> None:
    recipe = VIT_RECIPE_GPU.replace(dim=16, depth=2, num_heads=2, quick_n_train=40, quick_n_test=20, batch_size=8)
    recipe = recipe.for_mode(True)
    train, _ = vit_data(recipe, root=fake_cifar)
    assert isinstance(train, ErasingLoader) and isinstance(train.loader, AugmentLoader)
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8, 10) and torch.allclose(y.sum(1), torch.ones(8))
    result = train_vit(epochs=2, root=fake_cifar, recipe=recipe, progress=False, verbose=False)
    assert result.n_train == 40 and len(result.history.train_loss) == 2
    assert all(torch.isfinite(torch.tensor(result.history.train_loss)))
