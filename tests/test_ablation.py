"""The ablation command: every ingredient changed in turn, over seeds, with a verdict that compares to the noise."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from companion.__main__ import main
from companion.ablation import COMPARISONS, INGREDIENTS, Variant, ablate, compare, format_ablation
from companion.recipes.cnn import CNN_RECIPE
from companion.recipes.common import Recipe
from companion.recipes.vit import VIT_RECIPE

TINY = CNN_RECIPE.replace(widths=(8, 8, 8), quick_n_train=40, quick_n_test=20, quick_batch_size=8, quick_epochs=1)


@pytest.mark.parametrize(("what", "recipe"), [("cnn", CNN_RECIPE), ("vit", VIT_RECIPE)])
def test_every_ingredient_is_a_real_change_of_the_recipe(what: str, recipe: Recipe) -> None:
    for name, changes in INGREDIENTS[what].items():
        assert "," not in name, f"{name!r}: --only splits its list at commas"
        changed = recipe.replace(**changes).settings()
        assert any(changed[k] != recipe.settings()[k] for k in changes), f"{name} changes nothing"


def test_ablation_trains_each_variant_with_each_seed(fake_cifar: Path) -> None:
    only = ["no label smoothing", "flip-only TTA"]
    rows = ablate("cnn", seeds=2, quick=True, only=only, recipe=TINY, root=fake_cifar)
    assert [r.name for r in rows] == ["full recipe", *only]
    assert all(len(r.accuracies) == len(r.seconds) == 2 for r in rows)
    assert all(0 <= a <= 1 for r in rows for a in r.accuracies)
    table = format_ablation(rows)
    assert "full recipe" in table and "± " in table and table.count("\n") == 3
    with pytest.raises(ValueError, match="unknown ingredients"):
        ablate("cnn", seeds=1, quick=True, only=["no such thing"], recipe=TINY, root=fake_cifar)
    with pytest.raises(ValueError, match="seeds must be"):
        ablate("cnn", seeds=0)


def test_the_verdict_compares_the_difference_with_two_standard_errors() -> None:
    base = Variant("full recipe", {}, (0.80, 0.81, 0.82), (1.0, 1.0, 1.0))
    close = Variant("close", {}, (0.80, 0.815, 0.81), (1.0, 1.0, 1.0))
    far = Variant("far", {}, (0.70, 0.71, 0.72), (1.0, 1.0, 1.0))
    diff, se = far.difference(base)
    assert diff == pytest.approx(-0.10) and se == pytest.approx(math.sqrt(2 * 0.01**2 / 3))
    table = format_ablation([base, close, far, Variant("nan", {}, (math.nan, 0.8, 0.8), (1.0,) * 3)])
    lines = table.splitlines()
    assert "within the noise" in lines[2] and "larger than the noise" in lines[3]
    assert "diverged with 1 of 3 seeds" in lines[4]
    one = format_ablation([Variant("a", {}, (0.8,), (1.0,)), Variant("b", {}, (0.7,), (1.0,))])
    assert "one seed: no verdict" in one
    assert "test accuracy, mean ± sd" in format_ablation([base, far], accuracy="test accuracy").splitlines()[0]


def test_the_command_refuses_an_unknown_ingredient(capsys) -> None:
    assert main(["ablate", "cnn", "--only", "no such thing"]) == 2
    assert "unknown ingredients" in capsys.readouterr().err


def test_the_command_trains_at_the_sizes_it_is_given(fake_cifar: Path, capsys, monkeypatch) -> None:
    trained = []
    real = ablate.__globals__["RECIPES"]["cnn"]

    def spy(recipe: Recipe, **options):  # the recipe's train function, noting the sizes it was asked for
        trained.append((recipe.n_train, recipe.n_test, recipe.epochs))
        return real[1](recipe=recipe.replace(widths=(8, 8, 8)), **options)

    monkeypatch.setitem(ablate.__globals__["RECIPES"], "cnn", (real[0], spy))
    argv = ["ablate", "cnn", "--quick", "--seeds", "1", "--epochs", "1", "--only", "no label smoothing"]
    assert main([*argv, "--n-train", "30", "--n-test", "20", "--data", str(fake_cifar)]) == 0
    assert trained == [(30, 20, 1), (30, 20, 1)]
    assert "30 train images, 20 test images, 1 seeds" in capsys.readouterr().out


def fake_training(name: str, accuracy: float, calls: list):
    """A training function for ``COMPARISONS`` that notes its arguments and returns a fixed result per seed."""

    def train(quick: bool, seed: int, **options):
        calls.append((name, quick, seed, options["root"]))
        return SimpleNamespace(test_acc_tta=accuracy + seed / 100, train_seconds=1.0 + seed)

    return train


def test_a_comparison_trains_each_model_with_each_seed(monkeypatch) -> None:
    calls = []
    monkeypatch.setitem(
        COMPARISONS, "pair", (("a", fake_training("a", 0.5, calls)), ("b", fake_training("b", 0.7, calls)))
    )
    rows = compare("pair", seeds=3, quick=True, root="here")
    assert calls == [(n, True, s, "here") for n in "ab" for s in range(3)]
    assert [r.name for r in rows] == ["a", "b"] and rows[1].accuracies == pytest.approx((0.7, 0.71, 0.72))
    assert "larger than the noise" in format_ablation(rows).splitlines()[2]
    with pytest.raises(ValueError, match="what must be one of"):
        compare("no such pair")
    with pytest.raises(ValueError, match="seeds must be"):
        compare("pair", seeds=0)


def test_the_compare_command_offers_every_comparison_and_prints_the_verdict(capsys, monkeypatch) -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    usage = capsys.readouterr().out
    assert all(name in usage for name in COMPARISONS)
    calls = []
    arms = (("CNN", fake_training("CNN", 0.8, calls)), ("ViT", fake_training("ViT", 0.5, calls)))
    monkeypatch.setitem(COMPARISONS, "vit-vs-cnn", arms)
    assert main(["compare", "vit-vs-cnn", "--quick", "--seeds", "2", "--data", "somewhere"]) == 0
    out = capsys.readouterr().out
    assert calls == [(n, True, s, "somewhere") for n in ("CNN", "ViT") for s in range(2)]
    assert "Comparison vit-vs-cnn, quick mode, 2 seeds" in out and "larger than the noise" in out
    assert "ViT: seed 0: 0.5000 in 1.0 s, seed 1: 0.5100 in 2.0 s" in out  # each seed's figures, for a record
