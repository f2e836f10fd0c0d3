"""Approaches 1 and 2 of Chapter 6: image features classified against locked class-text embeddings.

``ImageTextClassifier`` projects the Chapter 3 CNN's features into the text space of a frozen sentence
encoder and classifies by scaled cosine similarity to the class-prompt embeddings: DeViSE's setting (Frome et
al., 2013: a fixed text side, the image side trained) with a CLIP-style cosine head (LiT is the reverse: it locks
the image tower). Swapping in the embeddings of other classes classifies without retraining (zero-shot).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from companion.models.cnn import FastCNN

__all__ = ["CNNEncoder", "CosineClassifier", "ImageTextClassifier", "image_embeddings", "pca_2d"]


class CNNEncoder(nn.Module):
    """A Chapter 3 FastCNN (or AttentionCNN) without its linear head: images -> feature map, or pooled features.

    It holds the CNN it is given and runs that model's own ``forward_features``, so an ``AttentionCNN`` keeps its
    attention block. The CNN's linear head is replaced by ``nn.Identity``: the encoder owns the CNN from now on.
    """

    def __init__(self, cnn: FastCNN) -> None:
        super().__init__()
        self.out_dim = cnn.head.in_features
        cnn.head = nn.Identity()  # unused here: no parameters that never get a gradient
        self.cnn = cnn

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, C, h, w) feature map, by the CNN's own forward_features."""
        return self.cnn.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C): global max pooling, as in FastCNN."""
        return self.forward_features(x).amax(dim=(2, 3))


class CosineClassifier(nn.Module):
    """Logits ``exp(t) * cos(W f, e_c)``: projected image features against fixed unit text embeddings ``e_c``."""

    def __init__(
        self, in_features: int, text_embeddings: Tensor, init_temperature: float = 0.07, max_scale: float = 100.0
    ) -> None:
        super().__init__()
        if text_embeddings.ndim != 2:
            raise ValueError(f"text_embeddings must be (classes, D), got {tuple(text_embeddings.shape)}")
        self.proj = nn.Linear(in_features, text_embeddings.shape[1], bias=False)  # into the text space, as CLIP
        self.register_buffer("text", F.normalize(text_embeddings.float(), dim=-1))  # (C, D), not trained
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))  # learnable 1/temperature, in log
        self.max_scale = max_scale

    def set_classes(self, text_embeddings: Tensor) -> None:
        """Swap in the (C', D) embeddings of another set of classes (zero-shot classification)."""
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.text.shape[1]:
            raise ValueError(
                f"text_embeddings must be (classes, {self.text.shape[1]}), got {tuple(text_embeddings.shape)}"
            )
        self.text = F.normalize(text_embeddings.float(), dim=-1).to(self.text.device)

    def embed(self, features: Tensor) -> Tensor:
        """(B, in_features) -> (B, D) unit image embeddings in the text space."""
        return F.normalize(self.proj(features), dim=-1)

    def forward(self, features: Tensor) -> Tensor:
        """(B, in_features) -> (B, C) logits."""
        scale = self.logit_scale.exp().clamp(max=self.max_scale)  # CLIP clips the scale at 100
        return scale * self.embed(features) @ self.text.T  # (B, C)


class ImageTextClassifier(nn.Module):
    """Approach 1: a CNN image tower and a cosine head over locked class-text embeddings."""

    def __init__(self, cnn: FastCNN, text_embeddings: Tensor, init_temperature: float = 0.07) -> None:
        super().__init__()
        self.encoder = CNNEncoder(cnn)
        self.head = CosineClassifier(self.encoder.out_dim, text_embeddings, init_temperature)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C) logits."""
        return self.head(self.encoder(x))

    def embed(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D) unit image embeddings in the text space."""
        return self.head.embed(self.encoder(x))


@torch.inference_mode()
def image_embeddings(model: ImageTextClassifier, data: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Unit image embeddings (N, D) and labels (N,) of a whole loader, on the CPU."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    embs, labels = zip(*[(model.embed(x.to(dev)).float().cpu(), y.cpu()) for x, y in data])
    model.train(was_training)
    return torch.cat(embs), torch.cat(labels)


def pca_2d(*arrays: Tensor) -> list[Tensor]:
    """Project several (N_i, D) arrays onto the first two principal axes of all of them together."""
    joint = torch.cat(arrays).double()
    mean = joint.mean(0)
    _, _, v = torch.linalg.svd(joint - mean, full_matrices=False)  # rows of v: principal axes
    return [((a.double() - mean) @ v[:2].T).float() for a in arrays]
