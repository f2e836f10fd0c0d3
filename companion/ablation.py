"""What each ingredient of a recipe buys: train the recipe with one ingredient changed at a time, over seeds.

``python -m companion ablate cnn --seeds 3`` trains the CNN recipe as it is and once per ingredient with that
ingredient switched off (or, for an ingredient only the GPU recipe uses, switched on at CPU scale), each with
seeds 0, 1, 2, and prints one row per variant: accuracy mean and standard deviation over the seeds, training
time, the difference from the full recipe, and whether that difference is larger than the noise (more than
two standard errors of the difference). Benchmarks print figures; they are not tests.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from companion.recipes.cnn import CNN_RECIPE, train_cnn
from companion.recipes.common import Recipe, RunResult
from companion.recipes.vit import VIT_RECIPE, train_vit

__all__ = ["INGREDIENTS", "Variant", "ablate", "format_ablation"]

# Each ingredient: the change that removes it from the CPU recipe ("off"), or adds a GPU recipe's ingredient ("on").
INGREDIENTS: dict[str, dict[str, dict[str, Any]]] = {
    "cnn": {
        "no flips and translations": {"augment": False},
        "no label smoothing": {"label_smoothing": 0.0},
        "no whitened stem": {"whiten": False},
        "no identity init": {"identity_init": False},
        "BatchNorm with a learned scale": {"bn_scale": True},
        "same lr for shifts and biases": {"vector_lr_scale": 1.0},
        "no decay (constant lr)": {"schedule": "constant"},
        "SGD instead of Muon for the kernels": {
            "optimizer": "sgd",
            "lr": 0.375,
            "weight_decay": 1.33e-3,
            "warmup": 0.23,
        },
        "flip-only TTA": {"tta_translate": 0},
        "+ ramped lookahead every 5 steps (GPU)": {"ema_decay": 0.77, "lookahead_every": 5, "ema_ramp": 3.0},
    },
    "vit": {
        "no label smoothing": {"label_smoothing": 0.0},
        "no gradient clipping": {"grad_clip": None},
        "no warm-up (cosine from the start)": {"warmup": 0.0},
        "+ flips and translations": {"augment": True},
        "+ no decay on class token and positions (GPU)": {"decay_embeddings": False},
        "+ stochastic depth 0.1 (GPU)": {"drop_path": 0.1},
        "+ shifted patch tokens (GPU)": {"shifted_patches": True},
        "+ locality self-attention (GPU)": {"locality_attention": True},
        "+ one TrivialAugment op (GPU)": {"random_ops": 1},
        "+ mixup / cutmix (GPU)": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0},
        "+ random erasing 0.25 (GPU)": {"erase": 0.25},
    },
}
RECIPES: dict[str, tuple[Recipe, Callable[..., RunResult]]] = {
    "cnn": (CNN_RECIPE, train_cnn),
    "vit": (VIT_RECIPE, train_vit),
}


@dataclass(frozen=True)
class Variant:
    """One row of an ablation: the recipe with ``changes``, trained once per seed."""

    name: str
    changes: dict[str, Any]
    accuracies: tuple[float, ...]  # test accuracy with the recipe's TTA, one per seed
    seconds: tuple[float, ...]  # training time, one per seed

    @property
    def finite(self) -> list[float]:
        """The accuracies of the seeds that trained (a diverged seed's is NaN)."""
        return [a for a in self.accuracies if not math.isnan(a)]

    @property
    def mean(self) -> float:
        """Mean accuracy over the seeds that trained (NaN if none did)."""
        return statistics.fmean(self.finite) if self.finite else math.nan

    @property
    def sd(self) -> float:
        """Sample standard deviation over the seeds that trained (0 for a single one)."""
        return statistics.stdev(self.finite) if len(self.finite) > 1 else 0.0

    @property
    def mean_seconds(self) -> float:
        """Mean training time over the seeds that trained."""
        times = [t for t in self.seconds if not math.isnan(t)]
        return statistics.fmean(times) if times else math.nan

    def difference(self, base: Variant) -> tuple[float, float]:
        """(this mean - the base's mean, the standard error of that difference)."""
        se = math.sqrt(self.sd**2 / max(1, len(self.finite)) + base.sd**2 / max(1, len(base.finite)))
        return self.mean - base.mean, se


def ablate(
    what: str,
    seeds: int = 3,
    quick: bool = False,
    epochs: int | None = None,
    only: Sequence[str] | None = None,
    recipe: Recipe | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    **options: Any,
) -> list[Variant]:
    """Train ``what``'s recipe ('cnn' or 'vit') as it is and with each ingredient changed, for seeds 0..seeds-1.

    ``only`` restricts the ingredients to those names (see ``INGREDIENTS``); ``recipe`` replaces the chapter's
    recipe; ``n_train`` and ``n_test``, if given, replace the mode's data sizes; ``options`` go to the recipe's
    ``train_*`` function (e.g. ``root``). The first row is the recipe as it is. Nothing is printed per run and no
    records are written.
    """
    if what not in RECIPES:
        raise ValueError(f"what must be one of {sorted(RECIPES)}, got {what!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a whole number >= 1, got {seeds!r}")
    base_recipe, train = RECIPES[what]
    recipe = (recipe or base_recipe).for_mode(quick, epochs)
    sizes = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
    recipe = recipe.replace(**sizes) if sizes else recipe
    ingredients = INGREDIENTS[what]
    unknown = sorted(set(only or ()) - set(ingredients))
    if unknown:
        raise ValueError(f"unknown ingredients {unknown}; choose from {sorted(ingredients)}")
    variants = [("full recipe", {})] + [(n, c) for n, c in ingredients.items() if only is None or n in only]
    runs = [(name, changes, seed) for name, changes in variants for seed in range(seeds)]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    for name, changes, seed in tqdm(runs, desc=f"ablation of the {what} recipe"):
        try:
            run = train(
                recipe=recipe.replace(**changes), seed=seed, progress=False, verbose=False, record=False, **options
            )
            results[name].append((run.test_acc_tta, run.train_seconds))
        except FloatingPointError:  # this variant diverged with this seed: a result too, shown as such
            results[name].append((math.nan, math.nan))
    return [Variant(name, changes, *map(tuple, zip(*results[name]))) for name, changes in variants]


def format_ablation(rows: Sequence[Variant]) -> str:
    """The ablation as a text table: accuracy mean ± sd, time, difference from the first row, and its verdict."""
    base = rows[0]
    n = len(base.accuracies)
    lines = [
        f"{'variant':46s} {'accuracy (TTA), mean ± sd':>26s} {'train s':>8s} {'difference':>11s}  verdict",
    ]
    for row in rows:
        diff, se = row.difference(base)
        diverged = sum(math.isnan(a) for a in row.accuracies)
        if diverged:
            verdict = f"diverged with {diverged} of {n} seeds"
        elif row is base:
            verdict = f"(the recipe; {n} seed{'s' if n > 1 else ''})"
        elif n < 2:
            verdict = "one seed: no verdict"
        else:
            verdict = "larger than the noise" if abs(diff) > 2 * se else "within the noise (< 2 standard errors)"
        lines.append(
            f"{row.name:46s} {100 * row.mean:15.2f} ± {100 * row.sd:5.2f} %  {row.mean_seconds:8.1f} "
            f"{100 * diff:+10.2f}   {verdict}"
        )
    return "\n".join(lines)
