"""Chapter 6's caption decoder, trained by teacher forcing with ``fit``: its settings and its training function."""

from __future__ import annotations

from torch import Tensor

from companion.data import CaptionBatches
from companion.models.caption import CaptionDecoder
from companion.train import TrainConfig, fit
from companion.vocab import WordVocab

__all__ = ["CAPTION_CONFIG", "train_captioner"]

# AdamW with a short warm-up and a cosine schedule; the padding after <eos> is not scored.
CAPTION_CONFIG = TrainConfig(
    epochs=3, optimizer="adamw", lr=2e-3, weight_decay=0.01, schedule="cosine", warmup=0.1, ignore_index=WordVocab.PAD
)


def train_captioner(
    decoder: CaptionDecoder,
    feature_maps: Tensor,
    labels: Tensor,
    captions: Tensor,
    config: TrainConfig = CAPTION_CONFIG,
    batch_size: int = 256,
    seed: int = 0,
    **overrides,
) -> list[float]:
    """Teacher forcing with ``fit``: each image gets a random caption of its class from ``captions``.

    ``feature_maps`` (N, C, h, w) come from a frozen image encoder, ``captions`` (C, T, L) are token ids
    (classes, templates, length); ``config`` with ``overrides`` (e.g. ``epochs=5, lr=3e-3``) says how to train.
    Returns the mean loss per token of each epoch.
    """
    if captions.ndim != 3 or len(feature_maps) != len(labels):
        raise ValueError("captions must be (classes, templates, L) token ids and feature_maps one per label")
    dev = next(decoder.parameters()).device
    batches = CaptionBatches(feature_maps, labels, captions, batch_size, seed, dev)
    history = fit(decoder, batches, config=config, **overrides)
    decoder.eval()
    return history.train_loss
