"""companion.train and companion.runtime: the loop learns, schedules are right, runs repeat exactly."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import companion
from companion.data import DeviceLoader
from companion.train import TrainConfig, _schedule, evaluate, fit, predict


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )


def tiny_batch(n: int = 32) -> DeviceLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return DeviceLoader(images, torch.arange(n) % 10, batch_size=n, device="cpu")


def test_fit_overfits_a_tiny_batch():
    companion.seed_everything(0)
    data = tiny_batch()
    model = tiny_cnn()
    start_loss, _ = evaluate(model, data)
    history = fit(model, data, data, epochs=60, optimizer="adamw", lr=3e-3, weight_decay=0, warmup=0.1, progress=False)
    assert history.train_loss[-1] < 0.1 * start_loss
    assert history.test_acc[-1] == 1.0  # 32 random images, memorised
    assert len(history.seconds) == 60 and history.device == "cpu"


def test_runs_repeat_exactly_with_the_same_seed():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(64) % 10

    def run() -> list[float]:
        companion.seed_everything(123)
        data = DeviceLoader(images, labels, batch_size=16, shuffle=True, augment=True, device="cpu", seed=5)
        return fit(tiny_cnn(), data, epochs=2, label_smoothing=0.1, progress=False).train_loss

    assert run() == run()


@pytest.mark.parametrize("kind", ["onecycle", "cosine"])
def test_schedule_warms_up_then_decays_to_zero(kind):
    f = _schedule(kind, total_steps=100, warmup=0.2)
    values = [f(s) for s in range(100)]
    assert values[0] == pytest.approx(1 / 20) and values[19] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:20], values[1:20]))  # rising
    assert all(a >= b for a, b in zip(values[19:], values[20:]))  # falling
    assert values[-1] < 0.06 and f(100) == pytest.approx(0.0)
    if kind == "cosine":
        assert f(20 + 40) == pytest.approx(0.5)  # half-way through the decay


def test_bad_training_arguments():
    data, model = tiny_batch(), tiny_cnn()
    with pytest.raises(ValueError, match="optimizer must be 'sgd', 'adamw', 'muon' or 'muon-adamw'"):
        fit(model, data, optimizer="adam", progress=False)
    with pytest.raises(ValueError, match="schedule must be"):
        fit(model, data, schedule="step", progress=False)
    with pytest.raises(ValueError, match="warmup must be a fraction"):
        fit(model, data, warmup=5, progress=False)
    with pytest.raises(ValueError, match="epochs must be a whole number >= 1"):
        fit(model, data, epochs=0, progress=False)
    with pytest.raises(TypeError, match="unknown settings \\['tta_flip'\\]"):
        fit(model, data, tta_flip=True, progress=False)


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("grad_clip", -1.0, "positive finite gradient norm"),  # a negative norm would make gradient ascent
        ("grad_clip", 0.0, "None for no clipping"),  # 0 would mean no training at all
        ("grad_clip", math.inf, "positive finite"),
        ("lr", -0.1, "positive finite"),
        ("lr", math.nan, "positive finite"),
        ("momentum", 1.0, r"\[0, 1\)"),
        ("weight_decay", -5e-4, ">= 0"),
        ("label_smoothing", 1.0, r"\[0, 1\)"),
        ("epochs", 2.5, "whole number"),
        ("epochs", True, "whole number"),
        ("precision", "fp16", "'auto', 'bf16' or 'fp32'"),
        ("vector_lr_scale", 0, "positive"),
        ("compile", "yes", "True or False"),
    ],
)
def test_train_config_refuses_values_without_meaning(name: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError, match=f"TrainConfig.{name} must be .*{allowed}"):
        TrainConfig(**{name: value})


def test_train_config_defaults_and_plain_numbers() -> None:
    assert TrainConfig().lr == 0.05 and TrainConfig(optimizer="adamw").lr == 1e-3  # each optimiser's usual start
    config = TrainConfig(lr=np.float32(0.1), grad_clip=np.float64(1.0))
    assert type(config.lr) is float and type(config.grad_clip) is float  # JSON-able in records
    assert json.loads(json.dumps(dataclasses.asdict(config)))["lr"] == pytest.approx(0.1)


def test_fit_takes_a_config_whole_or_as_overrides() -> None:
    data = tiny_batch()
    config = TrainConfig(epochs=2, optimizer="adamw", lr=3e-3, progress=False)
    torch.manual_seed(0)
    whole = fit(tiny_cnn(), data, config=config)
    torch.manual_seed(0)
    short = fit(tiny_cnn(), data, epochs=2, optimizer="adamw", lr=3e-3, progress=False)
    assert whole.train_loss == short.train_loss and len(whole.train_loss) == 2
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        fit(tiny_cnn(), data, None, {"epochs": 2})


class Fixed(nn.Module):
    """A 'model' whose logits favour class (sum of the first pixel > 0), mirrored or not."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0, 0, 0], -x[:, 0, 0, 0]], dim=1) + self.dummy


def test_evaluate_and_flip_tta():
    x = torch.randn(10, 3, 4, 4)
    y = (x[:, 0, 0, 0] <= 0).long()  # exactly what Fixed predicts
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    loss, acc = evaluate(Fixed(), data)
    assert acc == 1.0 and loss > 0
    logits, labels = predict(Fixed(), data, tta_flip=True)
    want = 0.5 * (Fixed()(x) + Fixed()(x.flip(3)))
    assert torch.allclose(logits, want) and torch.equal(labels, y)


def test_quick_mode_and_device(monkeypatch):
    monkeypatch.setenv("COMPANION_QUICK", "1")
    assert companion.quick()
    monkeypatch.setenv("COMPANION_QUICK", "0")
    assert not companion.quick()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert companion.device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert companion.device().type == "cpu"


def test_the_precision_follows_the_config_then_companion_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    from companion.__main__ import main

    data = tiny_batch(8)
    seen = []

    def run(**overrides) -> str:
        model = tiny_cnn()
        model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        return fit(model, data, epochs=1, progress=False, **overrides).precision

    monkeypatch.setenv("COMPANION_PRECISION", "fp32")
    assert run() == "float32" and seen[-1] == torch.float32
    assert run(precision="bf16") == "bfloat16 autocast" and seen[-1] == torch.bfloat16  # the config's word wins
    monkeypatch.setenv("COMPANION_PRECISION", "bf16")
    assert run() == "bfloat16 autocast" and seen[-1] == torch.bfloat16
    assert run(precision="fp32") == "float32" and seen[-1] == torch.float32
    monkeypatch.setenv("COMPANION_PRECISION", "half")
    with pytest.raises(ValueError, match="COMPANION_PRECISION='half' is not a precision"):
        run()
    assert main(["train", "cnn", "--quick"]) == 2  # the command says so in one line, before any data loads
    monkeypatch.delenv("COMPANION_PRECISION")
    with pytest.raises(SystemExit):
        main(["train", "cnn", "--precision", "fp16"])


def test_evaluate_refuses_batches_it_cannot_score() -> None:
    """Tuples of inputs or sequence targets (which fit trains on) get a clear error, not a crash or a wrong score."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x = torch.randn(4, 3, 2, 2)
    assert 0 <= evaluate(model, [(x, torch.tensor([0, 1, 2, 3]))])[1] <= 1
    for batch in [((x, x), torch.tensor([0, 1, 2, 3])), (x, torch.zeros(4, 5, dtype=torch.long))]:
        with pytest.raises(ValueError, match="pass test_data=None to fit"):
            evaluate(model, [batch])
