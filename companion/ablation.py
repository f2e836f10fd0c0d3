"""What each ingredient of a recipe buys, and which of two models is better: trainings over seeds, with verdicts.

``python -m companion ablate cnn --seeds 3`` trains the CNN recipe as it is and once per ingredient with that
ingredient switched off (or, for an ingredient only the GPU recipe uses, switched on at CPU scale), each with
seeds 0, 1, 2, and prints one row per variant: accuracy mean and standard deviation over the seeds, training
time, the difference from the full recipe, and whether that difference is larger than the noise (more than
two standard errors of the difference). ``python -m companion compare vit-vs-cnn --seeds 3`` does the same for the
models a chapter compares (``COMPARISONS``). Benchmarks print figures; they are not tests.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from tqdm.auto import tqdm

from companion.recipes.cnn import CNN_RECIPE, train_cnn
from companion.recipes.common import Recipe, RunResult
from companion.recipes.vit import VIT_RECIPE, train_vit

__all__ = ["COMPARISONS", "INGREDIENTS", "Variant", "ablate", "compare", "format_ablation"]

# Each ingredient: the change that removes it from the CPU recipe ("off"), or adds a GPU recipe's ingredient ("on").
INGREDIENTS: dict[str, dict[str, dict[str, Any]]] = {
    "cnn": {
        "no flips and translations": {"augment": False},
        "zeros instead of reflection around translations": {"padding_mode": "zeros"},
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
        "AdamW instead of Muon for the blocks": {"optimizer": "adamw"},
        "batches of 128 instead of 256 (AdamW lr 2e-3)": {"batch_size": 128, "lr": 2e-3},
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


def _text_head(**options: Any) -> RunResult:
    from companion.recipes.llm import train_llm  # the text encoder's packages load only when asked for

    return train_llm(**options)


def _linear_head(**options: Any) -> RunResult:
    from companion.recipes.llm import train_linear_baseline

    return train_linear_baseline(**options)


# Each comparison a chapter draws a conclusion from, as the chapter trains it: (row name, training function); the
# first row is the reference. Each function takes ``quick``, ``seed`` and ``run``'s options and returns a RunResult.
COMPARISONS: dict[str, tuple[tuple[str, Callable[..., RunResult]], ...]] = {
    "vit-vs-cnn": (  # Chapter 5: the ViT's CPU recipe against Chapter 3's CNN recipe cut to 2 epochs
        ("FastCNN, Chapter 3's recipe for 2 epochs", partial(train_cnn, epochs=2)),
        ("ViT, the CPU recipe", train_vit),
    ),
    "text-vs-linear-head": (  # Chapter 6: approach 1 against the same CNN with a linear head
        ("FastCNN + linear head", _linear_head),
        ("FastCNN + cosine head over text embeddings", _text_head),
    ),
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


def compare(what: str, seeds: int = 3, quick: bool = False, **options: Any) -> list[Variant]:
    """Train each model of the comparison ``what`` (see ``COMPARISONS``) for seeds 0..seeds-1; one row per model.

    ``options`` go to every training function (e.g. ``root``). A row's accuracies are with its recipe's TTA (none
    for a recipe without one). Nothing is printed per run and no records are written.
    """
    if what not in COMPARISONS:
        raise ValueError(f"what must be one of {sorted(COMPARISONS)}, got {what!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a whole number >= 1, got {seeds!r}")
    rows = []
    for name, train in tqdm(COMPARISONS[what], desc=f"comparison {what}"):
        runs = [
            train(quick=quick, seed=s, progress=False, verbose=False, record=False, **options) for s in range(seeds)
        ]
        rows.append(Variant(name, {}, tuple(r.test_acc_tta for r in runs), tuple(r.train_seconds for r in runs)))
    return rows


def format_ablation(rows: Sequence[Variant], accuracy: str = "accuracy (TTA)") -> str:
    """The ablation as a text table: accuracy mean ± sd, time, difference from the first row, and its verdict.

    Any comparison over seeds fits it: the first row is the reference; ``accuracy`` names the measure in the header.
    """
    base = rows[0]
    n = len(base.accuracies)
    lines = [
        f"{'variant':46s} {accuracy + ', mean ± sd':>26s} {'train s':>8s} {'difference':>11s}  verdict",
    ]
    for row in rows:
        diff, se = row.difference(base)
        diverged = sum(math.isnan(a) for a in row.accuracies)
        if diverged:
            verdict = f"diverged with {diverged} of {n} seeds"
        elif row is base:
            verdict = f"(the reference; {n} seed{'s' if n > 1 else ''})"
        elif n < 2:
            verdict = "one seed: no verdict"
        else:
            verdict = "larger than the noise" if abs(diff) > 2 * se else "within the noise (< 2 standard errors)"
        lines.append(
            f"{row.name:46s} {100 * row.mean:15.2f} ± {100 * row.sd:5.2f} %  {row.mean_seconds:8.1f} "
            f"{100 * diff:+10.2f}   {verdict}"
        )
    return "\n".join(lines)
