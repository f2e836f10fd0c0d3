"""companion.data: every source, the cache, subsets, errors, and the on-device batch iterator."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from companion import data
from companion.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    ORDER_SEED,
    DataNotFoundError,
    DeviceLoader,
    data_root,
    load_cifar10,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PER_CLASS = {"train": 3, "test": 2}


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Keep every test's user cache in its own temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.delenv("COMPANION_DATA", raising=False)
    monkeypatch.setenv("COMPANION_DOWNLOAD", "0")
    monkeypatch.setenv("COMPANION_ALLOW_PARTIAL", "1")  # the fake copies are small; tests of completeness unset it


def _pixels(split: str, label: int, i: int) -> np.ndarray:
    """A distinct, reproducible 32x32 RGB image for every (split, class, index)."""
    rng = np.random.default_rng([ord(split[1]), label, i])
    return rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")  # lossless, so pixels can be compared exactly
    return buf.getvalue()


def _expected(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-folder source as load_cifar10 documents it: sorted by (class, file name), then a seeded shuffle."""
    images, labels = [], []
    for label in range(10):
        for i in range(PER_CLASS[split]):
            images.append(_pixels(split, label, i).transpose(2, 0, 1))
            labels.append(label)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(ORDER_SEED))
    return torch.from_numpy(np.stack(images))[order], torch.tensor(labels)[order]


def make_tree(folder: Path) -> Path:
    for split, n in PER_CLASS.items():
        for label, name in enumerate(CIFAR10_CLASSES):
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / split / name / f"{i:04d}.png").write_bytes(_png(_pixels(split, label, i)))
    return folder


def make_archive(folder: Path) -> Path:
    tree = make_tree(folder / "tree")
    archive = folder / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in PER_CLASS:
            tar.add(tree / split, arcname=split)
    return archive


def test_image_folder_tree(tmp_path):
    make_tree(tmp_path / "cifar10-jpeg")
    for train, split in [(True, "train"), (False, "test")]:
        images, labels = load_cifar10(train=train, root=tmp_path)
        want_images, want_labels = _expected(split)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape == (10 * PER_CLASS[split], 3, 32, 32)
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_tree_directly_in_root(tmp_path):
    make_tree(tmp_path)
    images, labels = load_cifar10(train=False, root=tmp_path)
    assert torch.equal(images, _expected("test")[0]) and torch.equal(labels, _expected("test")[1])


def test_archive_gives_the_same_tensors_as_the_tree(tmp_path):
    make_archive(tmp_path)
    (tmp_path / "tree").rename(tmp_path / "elsewhere")  # only the archive is left in the root
    images, labels = load_cifar10(train=True, root=tmp_path)
    want_images, want_labels = _expected("train")
    assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=4)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    images, labels = load_cifar10(train=True, root=tmp_path)
    want = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(want))
    assert labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test_images, _ = load_cifar10(train=False, root=tmp_path)
    assert torch.equal(test_images, torch.from_numpy(batches["test_batch"][0].reshape(-1, 3, 32, 32)))


def test_decoded_once_then_read_from_the_cache(tmp_path):
    make_tree(tmp_path / "cifar10-jpeg")
    first = load_cifar10(train=False, root=tmp_path)
    assert (tmp_path / "cifar10-test-uint8-v2.pt").is_file()
    for p in (tmp_path / "cifar10-jpeg").rglob("*.png"):
        p.unlink()  # the source is gone: only the cache can answer now
    second = load_cifar10(train=False, root=tmp_path)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_read_only_root_caches_in_the_user_cache(tmp_path):
    root = tmp_path / "shared"
    make_archive(root)
    os.chmod(root, 0o555)
    try:
        images, _ = load_cifar10(train=False, root=root)
        assert not (root / "cifar10-test-uint8-v2.pt").exists()
        cached = list((tmp_path / "user-cache" / "companion").rglob("cifar10-test-uint8-v2.pt"))
        assert len(cached) == 1
        assert torch.equal(torch.load(cached[0], weights_only=True)["images"], images)
    finally:
        os.chmod(root, 0o755)


def test_subset_is_balanced_and_deterministic(tmp_path):
    make_tree(tmp_path)
    images, labels = load_cifar10(train=True, root=tmp_path, subset=13)
    assert len(labels) == 13
    counts = torch.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    again = load_cifar10(train=True, root=tmp_path, subset=13)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    with pytest.raises(ValueError, match="subset must be between 1 and 30"):
        load_cifar10(train=True, root=tmp_path, subset=31)


def test_no_data_names_the_folder_and_both_fixes(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_cifar10(train=True, root=tmp_path / "empty", download=False)
    message = str(err.value)
    assert str(tmp_path / "empty") in message
    assert "COMPANION_DATA" in message and "download=True" in message
    assert "shared/data" not in message  # the user's own data root, not this repository's CI folder


def test_no_message_names_this_repositorys_ci_data_folder():
    package = Path(data.__file__).parent
    named = [p.name for p in package.rglob("*.py") if "shared/data" in p.read_text()]
    assert not named, f"messages name the CI's ../shared/data: {named}"


def test_corrupt_archive(tmp_path):
    archive = make_archive(tmp_path)
    (tmp_path / "tree").rename(tmp_path / "elsewhere")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_cifar10(train=True, root=tmp_path)


def test_wrong_image_size(tmp_path):
    make_tree(tmp_path)
    bad = np.zeros((16, 16, 3), dtype=np.uint8)
    (tmp_path / "train" / "cat" / "0000.png").write_bytes(_png(bad))
    with pytest.raises(ValueError, match="16x16, but CIFAR-10 images are 32x32"):
        load_cifar10(train=True, root=tmp_path)


def test_not_an_image_and_unknown_class(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "test" / "dog" / "0000.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_cifar10(train=False, root=tmp_path)
    (tmp_path / "test" / "dog" / "0000.png").write_bytes(_png(_pixels("test", 5, 0)))
    (tmp_path / "test" / "unicorn").mkdir()
    (tmp_path / "test" / "unicorn" / "0000.png").write_bytes(_png(_pixels("test", 0, 0)))
    with pytest.raises(ValueError, match="unknown class folder 'unicorn'"):
        load_cifar10(train=False, root=tmp_path)


def test_data_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPANION_DATA", str(tmp_path / "from-env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "from-env"
    monkeypatch.delenv("COMPANION_DATA")
    assert data_root() == tmp_path / "user-cache" / "companion"


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.tar.gz").is_file(), reason="the offline copy is not beside the repo")
def test_real_offline_copy(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(Path.home() / ".cache"))  # reuse the decoded cache
    images, labels = load_cifar10(train=True, root=SHARED)
    assert images.shape == (50_000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(torch.bincount(labels), torch.full((10,), 5000))
    mean = images.float().mean((0, 2, 3)) / 255  # the data README gives (0.4913, 0.4821, 0.4465)
    assert torch.allclose(mean, torch.tensor(CIFAR10_MEAN), atol=2e-3)
    test_images, test_labels = load_cifar10(train=False, root=SHARED, subset=1000)
    assert test_images.shape == (1000, 3, 32, 32)
    assert torch.equal(torch.bincount(test_labels), torch.full((10,), 100))


# --- DeviceLoader ---------------------------------------------------------------------------


def _random_data(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def test_loader_normalises_and_covers_every_image_once():
    images, labels = _random_data()
    loader = DeviceLoader(images, labels, batch_size=16, shuffle=True, device="cpu")
    assert len(loader) == 4
    xs, ys = zip(*loader)
    assert [len(y) for y in ys] == [16, 16, 16, 2]
    x, y = torch.cat(xs), torch.cat(ys)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    want = (images.float() / 255 - mean) / std
    # every image appears exactly once: compare the sorted per-image sums
    key_got = x.flatten(1).sum(1).sort().values
    key_want = want.flatten(1).sum(1).sort().values
    assert torch.allclose(key_got, key_want, atol=1e-4)
    assert sorted(y.tolist()) == sorted(labels.tolist())
    plain = DeviceLoader(images, labels, batch_size=50, device="cpu")
    assert torch.allclose(next(iter(plain))[0], want, atol=1e-6)
    assert len(DeviceLoader(images, labels, batch_size=16, drop_last=True, device="cpu")) == 3


def _flip_and_crop_of_original(images: torch.Tensor, x: torch.Tensor, pad: int, mode: str) -> list[tuple]:
    """For each augmented image in ``x``, the one (flipped, dy, dx) that maps its original onto it."""
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    found = []
    for i in range(len(x)):
        got = x[i] * std + mean
        original = images[i].float() / 255
        padded = [torch.nn.functional.pad(im[None], (pad,) * 4, mode=mode)[0] for im in (original, original.flip(2))]
        matches = [
            (f, dy, dx)
            for f in range(2)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.allclose(padded[f][:, dy : dy + 32, dx : dx + 32], got, atol=1e-5)
        ]
        assert len(matches) == 1, f"image {i} is not a single flip + {mode}-padded crop of its original"
        found.append(matches[0])
    return found


def test_augmentation_is_a_flip_and_a_translation_of_the_original():
    images, labels = _random_data(8)
    loader = DeviceLoader(images, labels, batch_size=8, augment=True, device="cpu", pad=4, seed=3)
    found = _flip_and_crop_of_original(images, next(iter(loader))[0], pad=4, mode="constant")
    assert 0 < sum(f for f, _, _ in found) < 8  # with 8 images some are mirrored, some not (fixed seed)


def test_reflect_padding_is_a_flip_and_a_reflected_translation_of_the_original():
    images, labels = _random_data(8)
    loader = DeviceLoader(images, labels, 8, augment=True, device="cpu", pad=3, padding_mode="reflect", seed=5)
    found = _flip_and_crop_of_original(images, next(iter(loader))[0], pad=3, mode="reflect")
    assert sum((dy, dx) != (3, 3) for _, dy, dx in found) >= 6  # 7 x 7 offsets, a fixed seed: nearly every one moved
    with pytest.raises(ValueError, match="padding_mode must be 'zeros' or 'reflect'"):
        DeviceLoader(images, labels, padding_mode="circular", device="cpu")
    with pytest.raises(ValueError, match="pad smaller than the images"):
        DeviceLoader(images, labels, augment=True, pad=32, padding_mode="reflect", device="cpu")


def test_loader_is_reproducible_and_checks_its_input():
    images, labels = _random_data()
    a = [x for x, _ in DeviceLoader(images, labels, 16, shuffle=True, augment=True, device="cpu", seed=1)]
    b = [x for x, _ in DeviceLoader(images, labels, 16, shuffle=True, augment=True, device="cpu", seed=1)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="one label each"):
        DeviceLoader(images, labels[:-1], device="cpu")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        DeviceLoader(images, labels, batch_size=0, device="cpu")
