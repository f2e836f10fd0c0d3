"""Faults and bad inputs (issues 12, 14 and 15): each test reproduces one report, so none of it comes back."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import multiprocessing
import os
import pickle
import shutil
import signal
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import companion
from companion import data, llm
from companion.attention import scaled_dot_product_attention
from companion.bench import bench_attention, bench_conv, bench_text
from companion.conv import avg_pool2d, max_pool2d
from companion.data import CIFAR10_CLASSES, DeviceLoader, load_cifar10
from companion.models.common import load_weights, save_weights
from companion.recipes.cnn import CNNRecipe, make_cnn
from companion.train import evaluate, fit


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Keep every test's user cache in its own temporary folder, and never download."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.delenv("COMPANION_DATA", raising=False)
    monkeypatch.setenv("COMPANION_DOWNLOAD", "0")
    monkeypatch.setenv("COMPANION_ALLOW_PARTIAL", "1")  # the fake copies are small; tests of completeness unset it


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
        history = fit(model, data, data, epochs=3, progress=False)
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

    with pytest.raises(ValueError, match="lr must be a positive finite number.*got nan"):
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
    # spawn, not fork: a child forked from a process whose OpenMP threads have run can hang in its first torch op
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_load_in_a_race, args=(fake_cifar, barrier, results)) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        for w in workers:
            w.join(timeout=120)
        assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    finally:
        for w in workers:
            w.kill()
    got = [results.get(timeout=5) for _ in range(5)]
    assert got.count("decoded") == 1, "one process decodes while the others wait for it"
    images, labels = load_cifar10(train=False, root=fake_cifar)
    want = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
    assert [g for g in got if g != "decoded"] == [want] * 4
    assert not list(fake_cifar.glob("*.tmp")) and not list(fake_cifar.glob(".*.tmp"))


# --- issue 14 items 7 and 8: DeviceLoader and subset check what they are given ---------------------------


def test_device_loader_takes_uint8_rgb_or_says_what_it_expects():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(8)
    floats = images.float() / 255
    with pytest.raises(TypeError, match=r"expects uint8 images .*got torch.float32.*float_input=True"):
        DeviceLoader(floats, labels, device="cpu")  # was divided by 255 a second time
    x_float, _ = next(iter(DeviceLoader(floats, labels, 8, device="cpu", float_input=True)))
    x_uint8, _ = next(iter(DeviceLoader(images, labels, 8, device="cpu")))
    assert torch.equal(x_float, x_uint8)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        DeviceLoader(floats * 255, labels, device="cpu", float_input=True)
    with pytest.raises(ValueError, match=r"1 channel\(s\).*expects \(N, 3, H, W\)"):
        DeviceLoader(images[:, :1], labels, device="cpu")  # was broadcast to three channels
    with pytest.raises(TypeError, match="labels must be 1-D integers"):
        DeviceLoader(images, labels.float(), device="cpu")


def test_subset_is_exact_or_says_which_class_ran_short(fake_cifar):
    for png in sorted((fake_cifar / "train" / "cat").glob("*.png"))[1:]:
        png.unlink()  # 4 images of every class but one cat: 37 in all
    images, labels = load_cifar10(train=True, root=fake_cifar, subset=10)
    assert len(images) == 10 and torch.bincount(labels).tolist() == [1] * 10
    with pytest.raises(ValueError, match=r"subset=30 takes 3 images of class 'cat', but this split holds only 1"):
        load_cifar10(train=True, root=fake_cifar, subset=30)  # returned 28 images
    for bad in (2.5, "100", True):
        with pytest.raises(TypeError, match="subset must be a whole number of images"):
            load_cifar10(train=True, root=fake_cifar, subset=bad)


# --- issue 14: clear errors instead of confusing tracebacks ---------------------------------------------


def test_load_weights_names_a_bad_file(tmp_path):
    model = tiny_cnn()
    good = tmp_path / "good.safetensors"
    save_weights(model, good)
    raw = good.read_bytes()
    torch.save(model.state_dict(), tmp_path / "torch.pt")
    bad = {"truncated": raw[: len(raw) // 2], "empty": b"", "torch": (tmp_path / "torch.pt").read_bytes()}
    for name, content in bad.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=rf"{path} \(.* bytes\) is not a readable .safetensors file"):
            load_weights(tiny_cnn(), path)
    load_weights(tiny_cnn(), good)


def test_truncated_python_batch_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder, 4)
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match=rf"{folder / 'data_batch_3'} is not a readable CIFAR-10 batch"):
        load_cifar10(train=True, root=tmp_path)


def test_bench_on_a_missing_gpu_says_so_before_loading_anything(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(llm, "TextEncoder", lambda *a, **k: pytest.fail("loaded a model before checking the device"))
    for bench in (bench_text, bench_conv, bench_attention):
        with pytest.raises(RuntimeError, match=r"--device cuda asks for a CUDA GPU, but PyTorch sees none"):
            bench(device="cuda")


def test_bench_cli_on_a_missing_or_unknown_device_is_a_usage_error(monkeypatch, capsys):
    from companion.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in [("cuda", "asks for a CUDA GPU, but PyTorch sees none"), ("gpu0", "is not a device name")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "text", "--device", device])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_cache_holding_the_wrong_object(fake_cifar):
    want, _ = load_cifar10(train=False, root=fake_cifar)
    for name in ("cifar10-test-uint8.pt", "cifar10-test-uint8-v2.pt"):  # the old and the current name
        torch.save([1, 2, 3], fake_cifar / name)
    with pytest.warns(UserWarning, match=r"cifar10-test-uint8-v2.pt cannot be used: not a decoded CIFAR-10 cache"):
        images, _ = load_cifar10(train=False, root=fake_cifar)
    assert torch.equal(images, want)
    torch.save(torch.zeros(3), fake_cifar / "cifar10-test-uint8-v2.pt")
    shutil.rmtree(fake_cifar / "test")
    with pytest.raises(ValueError, match=r"cifar10-test-uint8-v2.pt cannot be used: not a decoded .*no copy"):
        load_cifar10(train=False, root=fake_cifar)


def test_fit_refuses_an_empty_test_set_before_training():
    model = tiny_cnn()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="test_data yields no batches"):
        fit(model, float_batches(), test_data=[], epochs=1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any step
    with pytest.raises(ValueError, match="the data yields no batches"):
        evaluate(model, iter([]))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_integer_max_pool2d_with_padding_matches_pytorch(dtype):
    g = torch.Generator().manual_seed(0)
    low = 0 if dtype == torch.uint8 else -100
    x = torch.randint(low, 100, (2, 3, 9, 7), generator=g).to(dtype)
    for kernel, stride, padding in [(3, 1, 1), (3, 2, 1), ((2, 4), (1, 2), (1, 2)), (5, 3, 2)]:
        assert torch.equal(max_pool2d(x, kernel, stride, padding), F.max_pool2d(x, kernel, stride, padding))
        if dtype == torch.int64:  # the one integer type F.avg_pool2d takes
            assert torch.equal(avg_pool2d(x, kernel, stride, padding), F.avg_pool2d(x, kernel, stride, padding))


# --- issue 15 item 1: every source gives the images in a mixed class order ------------------------------


def write_tree(folder: Path, per_class: int) -> Path:
    """train/ and test/ class folders with ``per_class`` distinct PNG images per class."""
    for split in ("train", "test"):
        for label, name in enumerate(CIFAR10_CLASSES):
            (folder / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.random.default_rng([len(split), label, i]).integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / split / name / f"{i}.png")
    return folder


def write_batches(folder: Path, per_batch: int) -> Path:
    """Fake original python batches (five training batches and a test batch), classes mixed as in the original."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in rng.permutation(np.arange(per_batch) % 10)]
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    return folder


@pytest.mark.parametrize("source", ["python batches", "folder", "archive", "cache"])
def test_the_first_100_images_hold_every_class(tmp_path, capsys, source):
    root = tmp_path / "data"
    if source == "python batches":
        write_batches(root / "cifar-10-batches-py", 200)
    else:
        tree = write_tree(tmp_path / "tree", 20)  # 200 images per split: sorted by class, 100 would be 5 classes
        if source == "archive":
            make_archive(tree, root / "cifar10-jpeg.tar.gz")
        else:
            shutil.move(tree, root / "cifar10-jpeg")
    if source == "cache":
        for train in (True, False):
            load_cifar10(train=train, root=root)
        shutil.rmtree(root / "cifar10-jpeg")
    for train in (True, False):
        images, labels = load_cifar10(train=train, root=root)
        assert len(set(labels[:100].tolist())) == 10, f"{source}: {torch.bincount(labels[:100], minlength=10)}"
    said = capsys.readouterr().err
    where = {"cache": "read the decoded cache in"}.get(source, f"decoded from the {source}")
    assert said.count(f"CIFAR-10: {where}") == 1, said  # once per process, not once per split or call


# --- probes that already passed: kept so that they stay so ----------------------------------------------


def test_archive_members_with_traversal_names_are_never_written(fake_cifar, tmp_path, monkeypatch):
    root = tmp_path / "data"
    archive = make_archive(fake_cifar, root / "cifar10-jpeg.tar.gz")
    with tarfile.open(archive, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    png = next(data for m, data in members if data is not None)
    with tarfile.open(archive, "w:gz") as tar:
        for member, content in members:
            tar.addfile(member, io.BytesIO(content) if content is not None else None)
        for name in ("../../escaped.png", "/tmp/escaped-absolute.png", "train/cat/../../../escaped-too.png"):
            info = tarfile.TarInfo(name)
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
    work = tmp_path / "work" / "dir"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = {p for p in tmp_path.rglob("*")}
    images, _ = load_cifar10(train=True, root=root)
    assert len(images) == 40
    written = {p for p in tmp_path.rglob("*")} - before
    assert all(p.parent == root and p.name.startswith("cifar10-train-uint8") for p in written)  # the cache only
    assert not Path("/tmp/escaped-absolute.png").exists()


def _decode_then_hang(root: Path, stage: str, ready) -> None:
    """Load CIFAR-10 and hang either while decoding or half-way through writing the cache."""
    if stage == "decode":

        def hang(folder: Path, split: str):
            ready.set()
            time.sleep(600)

        data._from_tree = hang
    else:
        real_save = torch.save

        def half_save(obj, f):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as out:
                out.write(buffer.getvalue()[: buffer.tell() // 2])
                out.flush()
                ready.set()
                time.sleep(600)

        torch.save = half_save
    load_cifar10(train=False, root=root)


@pytest.mark.parametrize("stage", ["decode", "write"])
def test_kill_during_the_first_decode_leaves_no_half_written_cache(fake_cifar, stage):
    ctx = multiprocessing.get_context("spawn")  # not fork: see test_concurrent_first_loads_decode_once
    ready = ctx.Event()
    worker = ctx.Process(target=_decode_then_hang, args=(fake_cifar, stage, ready))
    worker.start()
    try:
        assert ready.wait(120)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
    assert not list(fake_cifar.glob("cifar10-test-uint8*.pt"))  # no cache that a later load could trust
    images, labels = load_cifar10(train=False, root=fake_cifar)  # the lock died with the process
    assert len(images) == 20 and torch.bincount(labels).tolist() == [2] * 10
    assert not list(fake_cifar.glob("*.tmp")) and not list(fake_cifar.glob(".*.tmp"))


@pytest.mark.parametrize("fused", [True, False])
def test_fully_masked_rows_give_zeros_without_nan(fused):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 3, 5, 5, generator=g) < 0.5
    mask[:, :, 2] = False  # query 2 may attend to no key at all
    out = scaled_dot_product_attention(q, k, v, mask, fused=fused)
    assert torch.equal(out[:, :, 2], torch.zeros(2, 3, 8)) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# --- issue 24: every flag and option accepts a documented set of values, or says what is allowed ------------


@pytest.mark.parametrize("name", ["COMPANION_QUICK", "COMPANION_DOWNLOAD"])
def test_yes_no_flags_accept_the_documented_values_and_refuse_the_rest(tmp_path, monkeypatch, name):
    from companion.runtime import env_flag

    for value, want in [("1", True), ("TRUE", True), (" yes ", True), ("On", True)]:
        monkeypatch.setenv(name, value)
        assert env_flag(name) is want
    for value in ("0", "false", "No", "OFF"):
        monkeypatch.setenv(name, value)
        assert env_flag(name, default=True) is False
    monkeypatch.setenv(name, "")
    assert env_flag(name, default=True) is True and env_flag(name, default=False) is False
    monkeypatch.delenv(name)
    assert env_flag(name, default=True) is True
    for bad in ("2", "y", "garbage", "-1"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=rf"^{name}='{bad}' is not a yes/no value: use 1, true, yes, on for yes"):
            env_flag(name)
        with pytest.raises(ValueError, match=rf"{name}='{bad}'"):  # the code that reads it refuses it too
            companion.quick() if name == "COMPANION_QUICK" else load_cifar10(root=tmp_path)


def test_a_partial_copy_is_refused_unless_asked_for_and_never_cached_as_cifar10(fake_cifar, monkeypatch, capsys):
    monkeypatch.delenv("COMPANION_ALLOW_PARTIAL")
    monkeypatch.setattr(data, "_announced", set())  # a fresh process: the lines below are said once per process
    with pytest.raises(ValueError) as refused:
        load_cifar10(train=True, root=fake_cifar)
    assert str(refused.value) == (
        f"{fake_cifar} is not the complete CIFAR-10 train split: it holds 40 images, 4 of every class, where "
        "CIFAR-10 has 50,000 (5,000 of every class); point the loader at a complete copy, or pass "
        "allow_partial=True (or set COMPANION_ALLOW_PARTIAL=1) to use this one as it is"
    )
    assert not list(fake_cifar.glob("cifar10-*.pt")), "refused, so not cached"
    images, _ = load_cifar10(train=True, root=fake_cifar, allow_partial=True, subset=20)
    assert len(images) == 20
    assert "CIFAR-10 train split: a partial copy of 40 images, 4 of every class, used" in capsys.readouterr().err
    (cache,) = fake_cifar.glob("cifar10-train-*.pt")
    with pytest.raises(ValueError, match=rf"^the decoded cache {cache} \(decoded from the folder .*\) is not the comp"):
        load_cifar10(train=True, root=fake_cifar)  # the partial copy's cache does not pass for CIFAR-10 either
    monkeypatch.setenv("COMPANION_ALLOW_PARTIAL", "yes")
    assert len(load_cifar10(train=True, root=fake_cifar)[0]) == 40
    monkeypatch.setenv("COMPANION_ALLOW_PARTIAL", "sure")
    with pytest.raises(ValueError, match="COMPANION_ALLOW_PARTIAL='sure' is not a yes/no value"):
        load_cifar10(train=True, root=fake_cifar)


def test_uneven_classes_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPANION_ALLOW_PARTIAL")
    write_batches(tmp_path / "cifar-10-batches-py", 10)  # 10 images a batch, one of each class
    with pytest.raises(
        ValueError, match=r"test split: it holds 10 images, 1 of every class, where CIFAR-10 has 10,000"
    ):
        load_cifar10(train=False, root=tmp_path)
    monkeypatch.setattr(data, "_PER_CLASS", {"train": 5, "test": 1})  # a complete copy at this small scale
    assert len(load_cifar10(train=False, root=tmp_path)[0]) == 10
    assert len(load_cifar10(train=True, root=tmp_path)[0]) == 50
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((10, 3072), np.uint8), "labels": [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]}, f)
    with (
        pytest.warns(UserWarning, match="stale"),
        pytest.raises(ValueError, match=r"10 images \(airplane 2, truck 0\), where CIFAR-10 has 10 \(1 "),
    ):
        load_cifar10(train=False, root=tmp_path)


@pytest.mark.parametrize("allow_partial", [False, True])
def test_a_complete_archive_is_preferred_to_a_partial_tree_beside_it(fake_cifar, tmp_path, monkeypatch, allow_partial):
    monkeypatch.setattr(data, "_PER_CLASS", {"train": 4, "test": 2})  # fake_cifar is complete at this scale
    root = tmp_path / "data"
    archive = make_archive(fake_cifar, root / "cifar10-jpeg.tar.gz")
    want, want_labels = load_cifar10(train=True, root=root)
    (root / "cifar10-train-uint8-v2.pt").unlink()
    archive.rename(tmp_path / "aside.tar.gz")
    for cls in CIFAR10_CLASSES:  # a partial tree: one image of every class
        (root / "cifar10-jpeg" / "train" / cls).mkdir(parents=True)
        shutil.copy(fake_cifar / "train" / cls / "0.png", root / "cifar10-jpeg" / "train" / cls)
    assert len(load_cifar10(train=True, root=root, allow_partial=True)[0]) == 10  # alone, and asked for: used
    (tmp_path / "aside.tar.gz").rename(archive)  # the complete archive comes back beside the partial tree
    with pytest.warns(UserWarning, match=r"decoded from the folder .*cifar10-jpeg, the archive .* is used now"):
        images, labels = load_cifar10(train=True, root=root, allow_partial=allow_partial)
    assert torch.equal(images, want) and torch.equal(labels, want_labels)


def test_load_cifar10_refuses_arguments_it_cannot_mean(fake_cifar, monkeypatch):
    for name, value in [("train", "test"), ("train", None), ("download", "no"), ("allow_partial", 1)]:
        allowed = "True or False" if name == "train" else "True, False or None"
        with pytest.raises(TypeError, match=rf"^{name} must be {allowed}, got {value!r}$"):
            load_cifar10(**{"root": fake_cifar, name: value})
    with pytest.raises(ValueError, match=r"^root='' is an empty path; give a folder"):
        load_cifar10(root="")  # was the current directory, silently
    with pytest.raises(TypeError, match=r"^root must be a folder's path \(a str or os.PathLike\) or None, got 1$"):
        load_cifar10(root=1)
    with pytest.raises(NotADirectoryError, match=r"the data root .*0.png is a file, not a folder"):
        load_cifar10(root=fake_cifar / "train" / "cat" / "0.png")
    (fake_cifar / "cifar10-test-uint8-v2.pt").mkdir()
    with pytest.raises(IsADirectoryError, match=r"cifar10-test-uint8-v2.pt is a folder, where the decoded cache go"):
        load_cifar10(train=False, root=fake_cifar)
    monkeypatch.setenv("COMPANION_DOWNLOAD", "nope")  # refused although the data is at hand and no download is needed
    with pytest.raises(ValueError, match="COMPANION_DOWNLOAD='nope' is not a yes/no value"):
        load_cifar10(root=fake_cifar)


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask-022", "umask-002"])
def test_the_decoded_cache_follows_the_umask(fake_cifar, tmp_path, umask):
    root = tmp_path / "data"
    make_archive(fake_cifar, root / "cifar10-jpeg.tar.gz")
    before = set(root.iterdir())
    old = os.umask(umask)
    try:
        load_cifar10(train=False, root=root)
    finally:
        os.umask(old)
    written = set(root.iterdir()) - before
    assert any(p.name == "cifar10-test-uint8-v2.pt" for p in written)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written if p.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes  # was 0600: a class could not share one cache


def test_atomic_write_follows_the_umask_keeps_the_old_file_on_failure_and_overwrites_only_if_asked(tmp_path):
    from companion.files import atomic_write

    target = tmp_path / "out.bin"
    old = os.umask(0o027)
    try:
        assert atomic_write(target, lambda f: f.write(b"one")) == target
    finally:
        os.umask(old)
    assert target.read_bytes() == b"one" and target.stat().st_mode & 0o777 == 0o640

    def fails(f):
        f.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(target, fails)
    assert target.read_bytes() == b"one" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with pytest.raises(FileExistsError, match=rf"^{target} exists already and is not replaced"):
        atomic_write(target, lambda f: f.write(b"two"), overwrite=False)
    assert target.read_bytes() == b"one" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    atomic_write(target, lambda f: f.write(b"two"))
    assert target.read_bytes() == b"two"


def test_atomic_write_without_overwrite_lets_exactly_one_of_concurrent_writers_win(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from companion.files import atomic_write

    target, barrier = tmp_path / "weights.safetensors", threading.Barrier(8)

    def writer(i: int) -> str:
        def write(f):
            f.write(str(i).encode())
            barrier.wait()  # every writer has its temporary file ready before any puts it in place

        try:
            atomic_write(target, write, overwrite=False)
            return "won"
        except FileExistsError:
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(writer, range(8)))
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]  # each refused after writing: the name was free then
    assert target.read_text() == str(outcomes.index("won"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


def test_save_weights_saves_the_caption_decoder_with_its_tied_weights(tmp_path):
    from companion.models.caption import CaptionDecoder

    torch.manual_seed(0)
    model = CaptionDecoder(vocab_size=20, feature_dim=8, dim=16, depth=1, num_heads=2, max_len=6).eval()
    path = save_weights(model, tmp_path / "caption.safetensors")  # safetensors refused the shared tensor
    torch.manual_seed(1)
    other = load_weights(CaptionDecoder(20, 8, dim=16, depth=1, num_heads=2, max_len=6).eval(), path)
    assert other.lm_head.weight is other.tok_emb.weight  # still one tensor, not two copies
    features, tokens = torch.randn(2, 8, 3, 3), torch.randint(0, 20, (2, 5))
    assert torch.equal(model(features, tokens), other(features, tokens))
    assert torch.equal(model.generate(features), other.generate(features))


def test_weights_follow_the_umask_and_are_never_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    model, path = tiny_cnn(), tmp_path / "w.safetensors"
    old = os.umask(0o022)
    try:
        save_weights(model, path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # was 0600 (safetensors' own file)
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save", lambda *a, **k: pytest.fail("not reached"))
    with pytest.raises(FileExistsError, match="exists already and is not replaced"):
        save_weights(tiny_cnn(), path, overwrite=False)
    assert path.read_bytes() == before


def test_load_weights_says_in_one_line_what_does_not_fit(tmp_path):
    path = save_weights(tiny_cnn(), tmp_path / "w.safetensors")
    wider = nn.Sequential(*list(tiny_cnn())[:-1], nn.Linear(8 * 8 * 8, 12))
    with pytest.raises(ValueError) as err:
        load_weights(wider, path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"the weights in {path} do not fit this model (Sequential;")
    assert "2 of another shape (5.weight (10, 512) in the file, (12, 512) in the model, 5.bias (10,)" in message
    with pytest.raises(ValueError, match=r"\): 9 not in the model \([^)]*and 6 more\); load them into the model"):
        load_weights(nn.Sequential(nn.Identity(), nn.Identity()), path)
    with pytest.raises(IsADirectoryError, match=rf"^{tmp_path} is a folder, not a weights file"):
        load_weights(tiny_cnn(), tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"^cannot write {tmp_path}/no/w.safetensors: the folder .* does not"):
        save_weights(tiny_cnn(), tmp_path / "no" / "w.safetensors")
    with pytest.raises(IsADirectoryError, match=rf"^{tmp_path} is a folder; give the path of a file"):
        save_weights(tiny_cnn(), tmp_path)


def _bad_arguments() -> list[tuple[str, object, type, str]]:
    """(case, call, error, message) for arguments that were accepted silently or failed deep inside torch."""
    from companion import attention, conv
    from companion.models import cnn, sagan, vit

    q, x = torch.randn(2, 4, 8), torch.randn(1, 3, 8, 8)
    return [
        ("FastCNN widths=(8.5,)", lambda: cnn.FastCNN(widths=(8.5,)), ValueError, "positive channel counts \\(ints\\)"),
        ("FastCNN widths=8", lambda: cnn.FastCNN(widths=8), ValueError, "non-empty tuple of positive channel"),
        ("FastCNN num_classes=0", lambda: cnn.FastCNN(num_classes=0), ValueError, "num_classes must be at least 1"),
        ("FastCNN stem_width=0", lambda: cnn.FastCNN(stem_width=0), ValueError, "stem_width must be at least 1"),
        ("FastCNN logit_scale=nan", lambda: cnn.FastCNN(logit_scale=math.nan), ValueError, "logit_scale must be a pos"),
        ("FastCNN logit_scale=0", lambda: cnn.FastCNN(logit_scale=0), ValueError, "logit_scale must be a positive"),
        ("SimpleCNN num_classes=-3", lambda: cnn.SimpleCNN(-3), ValueError, "num_classes must be at least 1, got -3"),
        ("ViT dim=0", lambda: vit.ViT(dim=0, num_heads=1), ValueError, "dim must be at least 1"),
        ("ViT image_size=0", lambda: vit.ViT(image_size=0), ValueError, "image_size must be at least 1"),
        ("ViT in_channels=0", lambda: vit.ViT(in_channels=0), ValueError, "in_channels must be at least 1"),
        ("ViT mlp_ratio=0", lambda: vit.ViT(mlp_ratio=0), ValueError, "mlp_ratio must be a positive finite"),
        ("ViT mlp_ratio=0.001", lambda: vit.ViT(mlp_ratio=1e-3), ValueError, "gives an MLP of 0 units for dim=192"),
        ("ViT num_classes=0", lambda: vit.ViT(num_classes=0), ValueError, "num_classes must be at least 1"),
        ("ViT depth=2.5", lambda: vit.ViT(depth=2.5), TypeError, "depth must be a whole number \\(an int\\), got 2.5"),
        ("SelfAttention2d scale=nan", lambda: sagan.SelfAttention2d(8, 2, math.nan), ValueError, "scale must be a pos"),
        ("SelfAttention2d scale=-1", lambda: sagan.SelfAttention2d(8, 2, -1.0), ValueError, "scale must be a pos"),
        ("MHA kdim=0", lambda: attention.MultiHeadAttention(8, 2, kdim=0), ValueError, "kdim must be at least 1"),
        ("MHA dim=0", lambda: attention.MultiHeadAttention(0, 1), ValueError, "dim must be at least 1"),
        ("sdpa scale=nan", lambda: scaled_dot_product_attention(q, q, q, scale=math.nan), ValueError, "scale must"),
        ("weights scale=0", lambda: attention.attention_weights(q, q, scale=0.0), ValueError, "scale must be a pos"),
        ("causal_mask(-1)", lambda: attention.causal_mask(-1), ValueError, "n must be at least 0, got -1"),
        ("causal_mask(2.5)", lambda: attention.causal_mask(2.5), TypeError, "n must be a whole number"),
        ("padding_mask floats", lambda: attention.padding_mask([1.5, 2]), TypeError, "lengths must be integers"),
        ("positions n=-1", lambda: attention.sinusoidal_position_encoding(-1, 4), ValueError, "n must be at least 0"),
        ("positions base=0", lambda: attention.sinusoidal_position_encoding(3, 4, 0), ValueError, "base must be"),
        ("positions dim=4.0", lambda: attention.sinusoidal_position_encoding(3, 4.0), TypeError, "dim must be a whole"),
        ("positions 2-D h=-1", lambda: attention.sinusoidal_position_encoding_2d(-1, 2, 4), ValueError, "h must be"),
        ("learned positions n=-1", lambda: attention.LearnedPositionEmbedding(-1, 4), ValueError, "n must be at least"),
        ("learned positions std=0", lambda: attention.LearnedPositionEmbedding(3, 4, 0), ValueError, "std must be a p"),
        ("conv kernel_size=True", lambda: conv.conv_output_size(8, True), ValueError, "kernel_size must be an int or"),
        ("conv2d float64 weight", lambda: conv.conv2d(x, torch.randn(2, 3, 3, 3).double()), TypeError, "one dtype"),
        ("convolve2d empty kernel", lambda: conv.convolve2d(np.ones((5, 5)), np.ones((0, 3))), ValueError, "not empty"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_arguments())), ids=[c[0] for c in _bad_arguments()])
def test_models_and_functions_refuse_arguments_with_no_meaning(case):
    _, call, error, message = _bad_arguments()[case]
    with pytest.raises(error, match=message):
        call()


def test_values_that_keep_a_meaning_are_still_accepted():
    from companion import attention

    assert attention.padding_mask([]).shape == (0, 0)  # no sequences (was a RuntimeError from max())
    assert attention.causal_mask(0).shape == (0, 0)
    assert attention.sinusoidal_position_encoding_2d(0, 2, 4).shape == (0, 4)
    assert attention.MultiHeadAttention(8, 2, kdim=None).kdim == 8
