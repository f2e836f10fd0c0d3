"""Chapter 6 recipe: the CNN image tower with a cosine head over locked language-model class embeddings.

``python -m companion train llm`` calls :func:`train_llm`; Chapter 6 reuses :data:`LLM_RECIPE`, the same
data and the same seed for its linear-head baseline, so the book's numbers and the command line agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import nn

from companion.data import DeviceLoader
from companion.llm import TEMPLATES, TextEncoder, class_embeddings
from companion.models import ImageTextClassifier
from companion.recipes.cnn import CNNRecipe, make_cnn
from companion.recipes.common import RunResult, run, whitening_batch
from companion.runtime import seed_everything
from companion.train import TrainConfig

__all__ = ["LLM_RECIPE", "LLMRecipe", "train_linear_baseline", "train_llm"]


@dataclass(frozen=True)
class LLMRecipe(CNNRecipe):
    """CNN_RECIPE_SMALL's network and data plus the text side; fewer epochs, so the chapter's three runs fit a CPU."""

    # CNN_RECIPE_SMALL (Chapter 3's recipe until 2026-12-03) uses lr 0.1 at this batch size; this chapter's runs are
    # measured with 0.2. Three epochs: three CNN trainings in Chapter 6, under 10 minutes on a 2-core CPU.
    train: TrainConfig = TrainConfig(epochs=3, optimizer="sgd", lr=0.2, weight_decay=5e-4, label_smoothing=0.2)
    # the network and data of CNN_RECIPE_SMALL (Chapter 3's recipe until 2026-12-03), which this chapter measured
    widths: tuple[int, ...] = (32, 64, 128)
    bn_scale: bool = True
    identity_init: bool = False
    translate: int = 4
    padding_mode: str = "zeros"  # CNNRecipe's default became "reflect" on 2026-12-03; the records used zeros
    batch_size: int = 128
    tta_translate: int = 0
    quick_epochs: int = 3  # quick mode: 2,000 images (Chapter 3's subset) for 3 epochs, fixed here for this chapter
    quick_batch_size: int | None = None  # the same batches in both modes
    text_model: str | None = None  # None: the bundled all-MiniLM-L6-v2
    templates: tuple[str, ...] = TEMPLATES
    init_temperature: float = 0.07  # CLIP's initial temperature: logit scale 1 / 0.07 = 14.3
    # Under torchrun the lr stays as it is: a larger one throws the learnable temperature off (measured in quick
    # mode with 2 CPU processes: see Chapter 3's section on torchrun).
    lr_scaling: str = "none"


LLM_RECIPE = LLMRecipe()


def _text_model(encoder: TextEncoder | None, recipe: LLMRecipe, train: DeviceLoader, seed: int) -> nn.Module:
    """The recipe's CNN with a cosine head over the class-text embeddings (the same initial body as the baseline)."""
    whiten = whitening_batch(train)
    seed_everything(seed)  # the same initial CNN body for both heads
    encoder = encoder if encoder is not None else TextEncoder(recipe.text_model)
    cnn = make_cnn(recipe, whiten)
    return ImageTextClassifier(
        cnn, class_embeddings(encoder, recipe.classes, recipe.templates), recipe.init_temperature
    )


def _linear_model(recipe: LLMRecipe, train: DeviceLoader, seed: int) -> nn.Module:
    """The recipe's CNN with FastCNN's ordinary linear head, from the same initial body as the text model."""
    whiten = whitening_batch(train)
    seed_everything(seed)
    return make_cnn(recipe, whiten, num_classes=len(recipe.classes))


def _temperature(model: ImageTextClassifier) -> float:
    return 1 / model.head.logit_scale.exp().clamp(max=model.head.max_scale).item()


def train_llm(
    quick: bool = False,
    epochs: int | None = None,
    recipe: LLMRecipe = LLM_RECIPE,
    encoder: TextEncoder | None = None,
    **options,
) -> RunResult:
    """Train approach 1 (CNN + projection into the text space + cosine logits) on CIFAR-10 and report test accuracy.

    Runs ``recipe.for_mode(quick)``, with ``epochs`` in place of the recipe's if given; ``recipe.classes`` restricts
    training and testing to those classes (the zero-shot experiment); ``encoder`` is the text encoder (loaded from
    ``recipe.text_model`` if None). ``options`` are ``run``'s (``seed``, ``save``, ...). The learned temperature is
    in the result's ``notes``.
    """

    def title(r: LLMRecipe, model: ImageTextClassifier) -> str:
        return (
            f"FastCNN{r.widths} + cosine head over {len(r.classes)} class-text embeddings "
            f"(temperature {_temperature(model):.4f})"
        )

    return run(
        recipe.for_mode(quick, epochs),
        partial(_text_model, encoder),
        title=title,
        notes=lambda model: {"temperature": _temperature(model)},
        **options,
    )


def train_linear_baseline(
    quick: bool = False, epochs: int | None = None, recipe: LLMRecipe = LLM_RECIPE, **options
) -> RunResult:
    """The same CNN, data, seed and budget as :func:`train_llm`, with FastCNN's ordinary linear head."""
    return run(
        recipe.for_mode(quick, epochs), _linear_model, title=lambda r, m: f"FastCNN{r.widths} + linear head", **options
    )
