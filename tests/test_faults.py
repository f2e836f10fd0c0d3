"""Faults and bad inputs (issues 12, 14 and 15): each test reproduces one report, so none of it comes back."""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import companion
from companion import data
from companion.data import DeviceLoader, load_cifar10
from companion.recipes import CNNRecipe, make_cnn
from companion.train import fit


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Keep every test's user cache in its own temporary folder, and never download."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.delenv("COMPANION_DATA", raising=False)
    monkeypatch.setenv("COMPANION_DOWNLOAD", "0")


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def float_batches(n: int = 32, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


# --- issue 12: every tensor of the loops follows the data's device --------------------------------------


def test_fit_keeps_its_sums_on_the_data_device():
    """The sums were re-made on the default device every epoch, so every CUDA run crashed in epoch 2.

    With the default device set to 'meta', any tensor made without ``device=`` lands away from the data.
    """
    companion.seed_everything(0)
    data, model = float_batches(), tiny_cnn()
    with torch.device("meta"):
        history = fit(model, data, data, epochs=3, tta_flip=True, progress=False)
    assert history.device == "cpu" and len(history.train_loss) == len(history.test_acc) == 3
    assert all(math.isfinite(v) for v in history.train_loss + history.test_loss)


# --- issue 14 item 5: divergence stops training with a clear error --------------------------------------


def test_fit_stops_when_the_loss_is_not_finite():
    data = float_batches(64)
    data[1][0][0, 0, 0, 0] = float("nan")  # one NaN pixel in the second batch
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 2 .*learning rate.*bad inputs"):
        fit(tiny_cnn(), data, epochs=2, progress=False)

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    loader = DeviceLoader(images, torch.arange(64) % 10, 16, shuffle=True, augment=True, device="cpu")
    companion.seed_everything(0)
    model = make_cnn(CNNRecipe(widths=(8, 16, 32), whiten=False))
    with pytest.raises(FloatingPointError, match=r"diverged.*in epoch \d+, step \d+ \(lr=1e\+06\)"):
        fit(model, loader, epochs=3, lr=1e6, label_smoothing=0.2, progress=False)

    with pytest.raises(ValueError, match="lr must be a positive finite number, got nan"):
        fit(tiny_cnn(), data, lr=float("nan"), progress=False)


# --- issue 14 items 2-4: the decoded cache follows its source, is verified, and is built by one process -----


def make_archive(tree: Path, archive: Path) -> Path:
    """``tree``'s train/ and test/ class folders as a .tar.gz (the layout of the book's offline copy)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tree / split, arcname=split)
    return archive


def repaint(tree: Path, value: int) -> None:
    """Overwrite every test image of ``tree`` with one flat colour."""
    for png in (tree / "test").rglob("*.png"):
        Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(png)


@pytest.mark.parametrize("read_only", [False, True])
def test_cache_is_decoded_again_when_its_source_changes(fake_cifar, tmp_path, monkeypatch, read_only):
    root = tmp_path / "data"
    archive = make_archive(fake_cifar, root / "cifar10-jpeg.tar.gz")
    if read_only:
        os.chmod(root, 0o555)  # the cache goes to the per-user copy
    try:
        first, _ = load_cifar10(train=False, root=root)
        repaint(fake_cifar, 77)
        os.chmod(root, 0o755)
        make_archive(fake_cifar, archive)  # the archive is replaced by another one
        if read_only:
            os.chmod(root, 0o555)
        with pytest.warns(UserWarning, match="is stale"):
            second, _ = load_cifar10(train=False, root=root)
        assert not torch.equal(first, second) and bool((second == 77).all())
        # touched (e.g. copied) but not changed: its content hash still matches, nothing is decoded again
        os.utime(archive, ns=(1, 1))
        monkeypatch.setattr(data, "_from_archive", lambda *a: pytest.fail("decoded again although nothing changed"))
        third, _ = load_cifar10(train=False, root=root)
        assert torch.equal(second, third)
    finally:
        os.chmod(root, 0o755)


def test_damaged_or_old_caches_are_not_trusted(fake_cifar, tmp_path):
    want, want_labels = load_cifar10(train=True, root=fake_cifar)
    (cache,) = fake_cifar.glob("cifar10-train-uint8*.pt")
    raw = bytearray(cache.read_bytes())
    raw[-8192:-4096] = bytes(255 - b for b in raw[-8192:-4096])  # 4 KiB of flipped bytes inside the images
    cache.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="checksum does not match"):
        images, labels = load_cifar10(train=True, root=fake_cifar)
    assert torch.equal(images, want) and torch.equal(labels, want_labels)

    # an old-format cache holding 5 images, all labelled 0, is never read
    torch.save({"images": want[:5], "labels": torch.zeros(5, dtype=torch.long)}, fake_cifar / "cifar10-test-uint8.pt")
    test_images, test_labels = load_cifar10(train=False, root=fake_cifar)
    assert len(test_images) == 20 and torch.bincount(test_labels).tolist() == [2] * 10

    # damaged, and the source is gone: a clear error instead of wrong pixels
    cache.write_bytes(bytes(raw))
    shutil.rmtree(fake_cifar / "train")
    with pytest.raises(ValueError, match=r"cifar10-train-uint8-v2.pt cannot be used: .*no copy of CIFAR-10"):
        load_cifar10(train=True, root=fake_cifar)


def _load_in_a_race(root: Path, barrier, results) -> None:
    """One of several processes that load a cold cache at the same moment; its decode is slowed down."""
    original = data._from_tree

    def slow_decode(folder: Path, split: str):
        results.put("decoded")
        time.sleep(0.5)
        return original(folder, split)

    data._from_tree = slow_decode
    barrier.wait()
    images, labels = load_cifar10(train=False, root=root)
    results.put(hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest())


def test_concurrent_first_loads_decode_once(fake_cifar):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_load_in_a_race, args=(fake_cifar, barrier, results)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    got = [results.get(timeout=5) for _ in range(5)]
    assert got.count("decoded") == 1, "one process decodes while the others wait for it"
    images, labels = load_cifar10(train=False, root=fake_cifar)
    want = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
    assert [g for g in got if g != "decoded"] == [want] * 4
    assert not list(fake_cifar.glob("*.tmp")) and not list(fake_cifar.glob(".*.tmp"))
