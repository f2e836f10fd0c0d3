"""companion.distributed: sharded data, DistributedDataParallel in ``fit`` and the CLI under torchrun (CPU, gloo).

The multi-process tests launch ``python -m torch.distributed.run`` (torchrun) with 2 processes on tiny data.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from companion import distributed
from companion.data import DeviceLoader
from companion.train import evaluate

ROOT = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 *args`` with this checkout's companion, one thread per process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COMPANION_DOWNLOAD": "0"}
    env.pop("COMPANION_QUICK", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def tiny_model() -> nn.Module:
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(8, 10))


# --- one process: nothing changes ---------------------------------------------------------------------------------


def test_without_torchrun_there_is_one_process_and_nothing_to_set_up(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    with distributed.process_group() as up:
        assert up is False
    model = nn.Linear(3, 2)
    assert distributed.wrap(model) is model
    values = torch.tensor([1.5, 2.0])
    assert torch.equal(distributed.all_reduce(values), values)
    assert torch.equal(distributed.all_reduce(values, "min"), values)
    assert all(distributed.scale_lr(0.4, rule) == 0.4 for rule in ("linear", "sqrt", "none"))


def test_scale_lr_follows_the_rule_for_the_global_batch(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert distributed.scale_lr(0.1, "linear") == pytest.approx(0.4)
    assert distributed.scale_lr(0.1, "sqrt") == pytest.approx(0.2)
    assert distributed.scale_lr(0.1, "none") == 0.1
    with pytest.raises(ValueError, match=r"lr_scaling\) must be 'linear', 'sqrt' or 'none'"):
        distributed.scale_lr(0.1, "quadratic")


@pytest.mark.parametrize("n, world, batch, drop_last", [(100, 3, 7, False), (100, 3, 7, True), (64, 2, 8, True)])
def test_shards_are_equal_disjoint_slices_of_the_single_process_order(monkeypatch, n, world, batch, drop_last):
    def epochs_of(rank: int) -> tuple[list[list[int]], int]:
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        loader = DeviceLoader(tiny_images(n), torch.arange(n), batch, shuffle=True, drop_last=drop_last, device="cpu")
        return [[i for _, y in loader for i in y.tolist()] for _ in range(3)], len(loader)

    shards = [epochs_of(r) for r in range(world)]
    assert len({length for _, length in shards}) == 1  # every rank takes the same number of steps
    g = torch.Generator().manual_seed(0)
    for epoch in range(3):
        order = torch.randperm(n, generator=g).tolist()  # what one process would see this epoch
        per = n // world
        seen = [shards[r][0][epoch] for r in range(world)]
        usable = per // batch * batch if drop_last else per
        for r in range(world):
            assert seen[r] == order[r * per : r * per + usable]
        assert sum(len(s) for s in seen) == len(set().union(*seen))  # disjoint


def test_test_loaders_are_not_sharded(monkeypatch):
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    loader = DeviceLoader(tiny_images(10), torch.arange(10), batch_size=4, device="cpu")
    assert [i for _, y in loader for i in y.tolist()] == list(range(10)) and len(loader) == 3


def test_unsupported_devices_are_clear_errors(monkeypatch):
    monkeypatch.setattr(distributed, "_active", lambda: True)
    with pytest.raises(ValueError, match="sync_batch_norm needs CUDA"):
        distributed.wrap(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), sync_batch_norm=True)
    with pytest.raises(ValueError, match=r"needs CUDA \(nccl\) or the CPU \(gloo\), not meta"):
        distributed.wrap(nn.Linear(2, 2, device="meta"))  # e.g. Apple's mps: gloo cannot all-reduce its tensors


# --- two processes under torchrun ---------------------------------------------------------------------------------

WORKER = """
import sys
import torch
from torch import nn
from companion import distributed
from companion.data import DeviceLoader
from companion.train import fit

out = sys.argv[1]
with distributed.process_group() as up:
    assert up and distributed.world_size() == 2
    rank = distributed.rank()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=g)
    shards = DeviceLoader(images, torch.arange(50), batch_size=8, shuffle=True, device="cpu", seed=3)
    epochs = [[i for _, y in shards for i in y.tolist()] for _ in range(2)]

    torch.manual_seed(rank)  # a different start on each rank: DistributedDataParallel copies rank 0's
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # the same as tiny_model() in the test
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = DeviceLoader(images, torch.arange(50) % 10, 8, shuffle=True, augment=True, pad=2, device="cpu")
    test = DeviceLoader(images[:20], torch.arange(20) % 10, batch_size=6, device="cpu")
    history = fit(model, train, test, epochs=3, lr=0.1, progress=False)
    saved = {"epochs": epochs, "steps": len(train), "before": before, "state": model.state_dict()}
    torch.save({**saved, "history": vars(history)}, f"{out}/rank{rank}.pt")
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Run WORKER on 2 processes; return what each rank saved."""
    folder = tmp_path_factory.mktemp("ddp")
    (folder / "worker.py").write_text(WORKER)
    run = torchrun(["worker.py", str(folder)], cwd=folder)
    assert run.returncode == 0, run.stdout + run.stderr
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_ranks_see_disjoint_shards_that_cover_the_epoch(two_ranks):
    g = torch.Generator().manual_seed(3)
    for epoch in range(2):
        order = torch.randperm(50, generator=g).tolist()  # the permutation one process would draw
        first, second = (two_ranks[r]["epochs"][epoch] for r in range(2))
        assert first == order[:25] and second == order[25:]
        assert set(first).isdisjoint(second) and set(first) | set(second) == set(range(50))
    assert two_ranks[0]["epochs"][0] != two_ranks[0]["epochs"][1]  # reshuffled every epoch
    assert two_ranks[0]["steps"] == two_ranks[1]["steps"] == 4  # 25 images per rank, batches of 8, drop_last=False


def test_parameters_are_identical_on_every_rank_after_training(two_ranks):
    first, second = (two_ranks[r]["state"] for r in range(2))
    assert not torch.equal(two_ranks[0]["before"]["0.weight"], two_ranks[1]["before"]["0.weight"])
    for name in first:
        assert torch.equal(first[name], second[name]), name  # parameters and batch-norm statistics
    assert not torch.equal(first["0.weight"], two_ranks[0]["before"]["0.weight"])  # and they did train


def test_figures_are_global_and_evaluation_matches_one_process(two_ranks):
    first, second = (two_ranks[r]["history"] for r in range(2))
    assert first["train_loss"] == second["train_loss"] and first["test_acc"] == second["test_acc"]
    model = tiny_model()
    model.load_state_dict(two_ranks[0]["state"])
    test = DeviceLoader(tiny_images(50)[:20], torch.arange(20) % 10, batch_size=6, device="cpu")
    loss, acc = evaluate(model, test)
    assert acc == first["test_acc"][-1] and loss == pytest.approx(first["test_loss"][-1], rel=1e-6)


def fake_cifar_batches(root: Path, n_train: int = 2_000, n_test: int = 1_000) -> Path:
    """A fake CIFAR-10 in the original python-batch layout, large enough for the quick recipe (colours by class)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", n_train // 5) for i in range(1, 6)), ("test_batch", n_test)]:
        labels = np.arange(n) % 10
        data = (rng.integers(0, 60, (n, 3 * 32 * 32)) + 19 * labels[:, None]).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels.tolist()}, f)
    return root


def test_two_process_quick_recipe_prints_one_result_line(tmp_path, monkeypatch):
    data = fake_cifar_batches(tmp_path / "data")
    monkeypatch.setenv("COMPANION_ALLOW_PARTIAL", "1")  # 3,000 images, not CIFAR-10's 60,000
    run = torchrun(["-m", "companion", "train", "cnn", "--quick", "--epochs", "1", "--data", str(data)], cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if "test accuracy" in line]
    assert len(lines) == 1, run.stdout
    assert "(quick, 1 epochs, 2,000 training images)" in lines[0]
    assert re.search(r"\| device cpu, (bfloat16 autocast|float32) \| torch threads 1 \| 2 processes$", lines[0])


FAILING = """
import sys
import torch
from torch import nn
from companion import distributed
from companion.data import DeviceLoader
from companion.train import fit


class Failing:
    # Batches of a loader; on rank 1 the third batch raises.
    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for step, batch in enumerate(self.loader):
            if step == 2 and distributed.rank() == 1:
                raise RuntimeError("rank 1 fails on purpose")
            yield batch


with distributed.process_group():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    train = DeviceLoader(images, torch.arange(64) % 10, 8, shuffle=True, device="cpu")
    fit(nn.Sequential(nn.Flatten(), nn.Linear(192, 10)), Failing(train), epochs=50, progress=False)
"""


def test_a_failing_rank_ends_the_whole_job(tmp_path):
    (tmp_path / "failing.py").write_text(FAILING)
    run = torchrun(["failing.py"], cwd=tmp_path, timeout=60)  # a hang would raise TimeoutExpired
    assert run.returncode != 0
    assert "rank 1 fails on purpose" in run.stdout + run.stderr
