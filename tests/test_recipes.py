"""The recipes' shared parts: quick mode made explicit, the result and its record, the command line's checks."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from companion.recipes.cnn import CNN_RECIPE, train_cnn
from companion.recipes.common import Recipe
from companion.recipes.llm import LLM_RECIPE
from companion.recipes.vit import VIT_RECIPE, VIT_RECIPE_GPU


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
    assert quick.quick and (quick.n_train, quick.n_test, quick.epochs, quick.batch_size) == quick_sizes
    assert quick.for_mode(True) is quick and quick.for_mode(False) is quick  # already in its mode: unchanged
    assert type(quick) is type(recipe)
    others = {k: v for k, v in vars(quick).items() if k not in ("n_train", "n_test", "epochs", "batch_size", "quick")}
    assert others == {k: v for k, v in vars(recipe).items() if k in others}  # nothing else changes
    assert (recipe.n_train, recipe.n_test) == (None, None)  # full mode: all images


def test_train_result_and_its_record(fake_cifar, capsys) -> None:
    recipe = replace(CNN_RECIPE, widths=(8, 8, 8), quick_n_train=40, quick_n_test=20, quick_batch_size=16)
    result = train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=recipe, progress=False)
    assert capsys.readouterr().out == result.line() + "\n"
    assert result.line().startswith("FastCNN(8, 8, 8) (quick, 1 epochs, 40 training images): test accuracy ")
    assert result.recipe == replace(recipe.for_mode(True), epochs=1)  # the recipe that ran, quick sizes in place
    record = json.loads(json.dumps(result.record()))  # JSON-able
    assert record["model"] == "FastCNN(8, 8, 8)" and record["recipe"] == "CNNRecipe" and record["mode"] == "quick"
    assert record["settings"]["batch_size"] == 16 and record["settings"]["widths"] == [8, 8, 8]
    assert record["test_acc"] == result.test_acc and record["n_train"] == 40 and record["epochs"] == 1
    assert {"test_acc_tta", "train_seconds", "device", "threads", "torch", "date"} <= set(record)
    full = train_cnn(epochs=1, root=fake_cifar, recipe=replace(recipe, n_train=20, batch_size=8), verbose=False)
    assert full.record()["mode"] == "full" and full.n_train == 20 and full.recipe.batch_size == 8
