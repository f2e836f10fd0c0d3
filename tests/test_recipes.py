"""The recipes' shared parts: quick mode made explicit, the result and its record, the command line's checks."""

from __future__ import annotations

import json

import pytest
import torch

from companion.__main__ import main
from companion.data import CIFAR10_MEAN, CIFAR10_STD, DeviceLoader
from companion.models import load_weights
from companion.recipes import common
from companion.recipes.cnn import CNN_RECIPE, CNN_RECIPE_SMALL, make_cnn, train_cnn
from companion.recipes.common import Recipe, cifar10_loaders, whitening_batch
from companion.recipes.llm import LLM_RECIPE, train_llm
from companion.recipes.vit import VIT_RECIPE, VIT_RECIPE_GPU, train_vit


@pytest.mark.parametrize(
    ("recipe", "quick_sizes"),
    [  # (n_train, n_test, epochs, batch_size) in quick mode: the figures the book's quick runs have always used
        (CNN_RECIPE, (2_000, 1_000, 5, 64)),
        (VIT_RECIPE, (2_000, 1_000, 4, 128)),
        (VIT_RECIPE_GPU, (2_000, 1_000, 4, 256)),
        (LLM_RECIPE, (2_000, 1_000, 3, 128)),
    ],
)
def test_for_mode_puts_the_quick_sizes_in_place(recipe: Recipe, quick_sizes: tuple[int, int, int, int]) -> None:
    assert recipe.for_mode(False) is recipe and not recipe.quick
    quick = recipe.for_mode(True)
    assert quick.quick and (quick.n_train, quick.n_test, quick.train.epochs, quick.batch_size) == quick_sizes
    assert quick.for_mode(True) is quick and quick.for_mode(False) is quick  # already in its mode: unchanged
    assert type(quick) is type(recipe)
    sizes = ("n_train", "n_test", "epochs", "batch_size", "quick")
    others = {k: v for k, v in quick.settings().items() if k not in sizes}
    assert others == {k: v for k, v in recipe.settings().items() if k in others}  # nothing else changes
    assert set(others) | set(sizes) == set(recipe.settings())
    assert (recipe.n_train, recipe.n_test) == (None, None)  # full mode: all images
    assert recipe.for_mode(True, epochs=1) == quick.replace(epochs=1)  # an epochs override applies in either mode
    assert recipe.for_mode(False, epochs=1) == recipe.replace(epochs=1)


def test_chapter_6_trains_the_network_and_data_of_the_small_recipe() -> None:
    # LLMRecipe inherits CNNRecipe, whose defaults follow the current CPU recipe; Chapter 6's records were measured
    # with CNN_RECIPE_SMALL's network and augmentation, so a new default there must not leak into Chapter 6
    same = ("widths", "depth_per_stage", "batch_norm", "bn_scale", "identity_init", "whiten", "augment", "translate")
    same += ("padding_mode", "batch_size", "tta_translate")
    assert {k: getattr(LLM_RECIPE, k) for k in same} == {k: getattr(CNN_RECIPE_SMALL, k) for k in same}


def test_train_result_and_its_record(fake_cifar, capsys) -> None:
    recipe = CNN_RECIPE.replace(widths=(8, 8, 8), quick_n_train=40, quick_n_test=20, quick_batch_size=16)
    result = train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=recipe, progress=False)
    assert capsys.readouterr().out == result.line() + "\n"
    assert result.line().startswith("FastCNN(8, 8, 8) (quick, 1 epochs, 40 training images): test accuracy ")
    assert result.recipe == recipe.for_mode(True).replace(epochs=1)  # the recipe that ran, quick sizes in place
    record = json.loads(json.dumps(result.record()))  # JSON-able
    assert record["model"] == "FastCNN(8, 8, 8)" and record["recipe"] == "CNNRecipe" and record["mode"] == "quick"
    assert record["settings"]["batch_size"] == 16 and record["settings"]["widths"] == [8, 8, 8]
    assert record["test_acc"] == result.test_acc and record["n_train"] == 40 and record["epochs"] == 1
    assert {"test_acc_tta", "train_seconds", "device", "threads", "torch", "date"} <= set(record)
    assert record["seed"] == 0 and record["params"] == result.params > 0
    assert record["settings"]["lr"] == result.recipe.lr and record["precision"] == result.history.precision
    full = train_cnn(epochs=1, root=fake_cifar, recipe=recipe.replace(n_train=20, batch_size=8), verbose=False)
    assert full.record()["mode"] == "full" and full.n_train == 20 and full.recipe.batch_size == 8


@pytest.fixture
def no_data(monkeypatch):
    """Make any data load fail loudly: a check that must come before loading cannot pass by loading."""

    def load(*args, **kwargs):
        raise AssertionError("data were loaded")

    monkeypatch.setattr(common, "load_cifar10", load)


@pytest.mark.parametrize("what", ["cnn", "vit", "llm"])
def test_save_to_a_missing_folder_fails_before_any_data_loads(no_data, tmp_path, capsys, what: str) -> None:
    bad = tmp_path / "no" / "such" / "w.safetensors"
    assert main(["train", what, "--quick", "--save", str(bad)]) == 2  # a usage error, in one line
    err = capsys.readouterr().err
    assert f"{tmp_path / 'no' / 'such'} does not exist" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_cnn(quick=True, save=bad)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        train_cnn(quick=True, save=tmp_path)


@pytest.mark.parametrize("epochs", ["0", "-3", "two"])
def test_epochs_must_be_a_positive_integer(no_data, capsys, epochs: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "cnn", "--quick", "--epochs", epochs])
    assert exit_info.value.code == 2 and "--epochs" in capsys.readouterr().err


@pytest.mark.parametrize("epochs", [0, -3, 2.5])
def test_python_callers_get_the_epochs_check_before_any_data_loads(no_data, epochs) -> None:
    for train in (train_cnn, train_vit, train_llm):
        with pytest.raises(ValueError, match="epochs must be a whole number >= 1"):
            train(quick=True, epochs=epochs)
    with pytest.raises(ValueError, match="epochs must be a whole number >= 1"):
        CNN_RECIPE.replace(epochs=0).for_mode(False)  # a recipe built with bad epochs is refused too


def test_save_adds_the_suffix(fake_cifar, tmp_path, capsys) -> None:
    recipe = CNN_RECIPE.replace(widths=(8, 8, 8), quick_n_train=40, quick_n_test=20, quick_batch_size=16)
    result = train_cnn(quick=True, epochs=1, root=fake_cifar, save=tmp_path / "w", recipe=recipe, progress=False)
    assert not (tmp_path / "w").exists()
    reloaded = load_weights(make_cnn(recipe.replace(whiten=False)), tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded.eval()(x), result.model.cpu().eval()(x))
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"weights saved to {tmp_path / 'w.safetensors'}", result.line()]  # the weights first


def test_a_failed_save_keeps_the_trained_model(fake_cifar, tmp_path, monkeypatch, capsys) -> None:
    import safetensors.torch

    target = tmp_path / "out" / "w.safetensors"
    target.parent.mkdir()
    save, calls = safetensors.torch.save, []

    def failing_save(tensors, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the first save, to ``target``
            raise OSError(28, "No space left on device")  # the disk filled up while training
        return save(tensors, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save", failing_save)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "w.safetensors").write_bytes(b"an older file, not to be overwritten")
    recipe = CNN_RECIPE.replace(widths=(8, 8, 8), quick_n_train=40, quick_n_test=20, quick_batch_size=16)
    result = train_cnn(quick=True, epochs=1, root=fake_cifar, save=target, recipe=recipe, progress=False)
    captured = capsys.readouterr()
    assert result.line() in captured.out  # the run reports its result, whatever happened to the weights
    fallback = work / "w-1.safetensors"
    assert f"could not save the weights to {target}" in captured.err and f"saved them to {fallback}" in captured.err
    assert (work / "w.safetensors").read_bytes() == b"an older file, not to be overwritten"
    reloaded = load_weights(make_cnn(recipe.replace(whiten=False)), fallback)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded.eval()(x), result.model.cpu().eval()(x))


def test_whitening_batch_is_a_seeded_sample_of_every_class() -> None:
    labels = torch.arange(10).repeat_interleave(100)  # sorted by class, as a class-folder copy of CIFAR-10 is
    images = (20 * labels).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()  # pixel = 20 * label
    train = DeviceLoader(images, labels, batch_size=10, device="cpu")
    batch = whitening_batch(train, n=100)
    assert batch.shape == (100, 3, 4, 4)
    pixels = batch[:, 0, 0, 0] * CIFAR10_STD[0] + CIFAR10_MEAN[0]  # undo the normalisation: 20 * label / 255
    sampled = (pixels * 255 / 20).round().long()
    assert sorted(sampled.unique().tolist()) == list(range(10))  # all ten classes, not the first 100 (all class 0)
    assert torch.equal(whitening_batch(train, n=100), batch)  # seeded: the same sample again
    assert not torch.equal(whitening_batch(train, n=100, seed=1), batch)
    assert whitening_batch(train, n=5_000).shape[0] == 1_000  # at most the whole set


def test_bench_step_times_every_model_batch_and_precision(capsys, monkeypatch) -> None:
    from companion import bench, runtime

    monkeypatch.setattr(runtime, "cpu_bf16", lambda: True)  # both precisions, whatever this CPU has
    rows = bench.bench_step(device="cpu", models=("cnn", "vit"), batch_sizes=(2, 3), steps=1)
    assert [(r["batch"], r["precision"]) for r in rows[:4]] == [(2, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16")]
    assert len(rows) == 8 and all(r["ms"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "FastCNN(64, 256, 256)" in out and "ViT dim 96 depth 4" in out and "images/s" in out


def test_the_recipes_padding_mode_reaches_the_loader_and_is_checked(fake_cifar) -> None:
    recipe = CNN_RECIPE.replace(n_train=40, n_test=20, padding_mode="reflect")
    train, _ = cifar10_loaders(recipe, root=fake_cifar, device=torch.device("cpu"))
    assert (train.pad, train.padding_mode) == (recipe.translate, "reflect")
    with pytest.raises(ValueError, match="padding_mode must be 'zeros' or 'reflect', got 'edge'"):
        CNN_RECIPE.replace(padding_mode="edge")


def test_the_final_tta_evaluation_computes_in_the_recipes_precision(fake_cifar, monkeypatch) -> None:
    seen = []
    real = common.evaluate
    monkeypatch.setattr(common, "evaluate", lambda *a, **kw: seen.append((a, kw)) or real(*a, **kw))
    recipe = CNN_RECIPE.replace(widths=(8, 8, 8), quick_n_train=40, quick_n_test=20, precision="fp32")
    train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=recipe, progress=False, verbose=False, record=False)
    ((args, kwargs),) = seen
    assert "fp32" in args or kwargs.get("precision") == "fp32"
