"""Shared fixtures: one torch thread for tiny tensors, and a tiny fake CIFAR-10 on disk for the recipe tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from companion.data import CIFAR10_CLASSES


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: as fast, and far faster when other jobs share the cores.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def records_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipe runs in the tests write their result records to a temporary folder, not to the book's records."""
    monkeypatch.setenv("COMPANION_RECORDS", str(tmp_path_factory.mktemp("records")))


@pytest.fixture
def fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ImageFolder copy of CIFAR-10 in ``tmp_path`` (4 train and 2 test images per class), colours set by class.

    Being far smaller than CIFAR-10, it is loaded only with ``COMPANION_ALLOW_PARTIAL=1``, which this fixture sets.
    """
    monkeypatch.setenv("COMPANION_ALLOW_PARTIAL", "1")
    rng = np.random.default_rng(0)
    for split, n in [("train", 4), ("test", 2)]:
        for label, name in enumerate(CIFAR10_CLASSES):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (32, 32, 3)) + 19 * label
                Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / split / name / f"{i}.png")
    return tmp_path
