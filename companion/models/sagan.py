"""SAGAN-style self-attention for CNN feature maps (Zhang et al., 2019), and a FastCNN that uses it (Chapter 4).

``SelfAttention2d`` treats the ``H * W`` positions of a feature map as tokens: 1x1 convolutions give each
position a query, a key and a value, every position takes a softmax-weighted average of the values of all
positions, and the result is added back to the input as ``gamma * out + x`` with ``gamma`` learned and
starting at 0, so that the block begins as the identity. ``AttentionCNN`` is Chapter 3's ``FastCNN`` with
one such block after a chosen stage; everything else is shared, so the two differ only by the block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from companion.attention import scaled_dot_product_attention
from companion.models.cnn import FastCNN
from companion.validation import validate_images, validate_int, validate_positive

__all__ = ["AttentionCNN", "SelfAttention2d"]


class SelfAttention2d(nn.Module):
    """The self-attention block of SAGAN: ``gamma * softmax(Q K^T * scale) V + x`` over all H*W positions.

    Queries and keys have ``channels // reduction`` channels, values ``channels``. ``scale=1.0`` (the
    default) is SAGAN's unscaled dot product; ``scale=None`` uses the Transformer's ``1 / sqrt(d_k)``.
    """

    def __init__(self, channels: int, reduction: int = 8, scale: float | None = 1.0) -> None:
        super().__init__()
        validate_int(channels, "channels"), validate_int(reduction, "reduction", minimum=None)
        if scale is not None:
            validate_positive(scale, "scale", " (the factor on Q K^T), or None for 1 / sqrt(d_k)")
        if reduction < 1 or channels // reduction < 1:
            raise ValueError(
                f"channels // reduction must be at least 1 (queries and keys get that many channels), "
                f"got channels={channels}, reduction={reduction}; use reduction <= {max(channels, 1)}"
            )
        self.channels, self.reduction, self.scale = channels, reduction, scale
        self.query = nn.Conv2d(channels, channels // reduction, kernel_size=1)
        self.key = nn.Conv2d(channels, channels // reduction, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(()))  # 0: the block starts as the identity

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, C, H, W) -> (B, C, H, W); with ``return_attention`` also the attention map (B, H*W, H*W).

        Row ``i`` of the map holds the weights with which position ``i`` (row-major, ``i = h * W + w``)
        averages all positions; each row sums to 1.
        """
        validate_images(x, "SelfAttention2d", self.channels)
        B, C, H, W = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, HW, C/r): one query per position
        k = self.key(x).flatten(2).transpose(1, 2)  # (B, HW, C/r)
        v = self.value(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        out = scaled_dot_product_attention(q, k, v, scale=self.scale, return_attention=return_attention)
        if return_attention:
            out, weights = out  # weights (B, HW, HW): softmax over the last axis, the keys
        out = out.transpose(1, 2).reshape(B, C, H, W)  # (B, C, HW) -> (B, C, H, W)
        out = self.gamma * out + x
        return (out, weights) if return_attention else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, scale={self.scale}"


class AttentionCNN(FastCNN):
    """FastCNN with a SelfAttention2d block after stage ``attention_after`` (1 = after the first stage).

    The block's parameters are created after all of FastCNN's, so with the same seed the shared layers
    start from the same weights as ``FastCNN(widths, ...)`` (and, with gamma = 0, the same outputs).
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (64, 128, 256),
        depth_per_stage: int = 2,
        num_classes: int = 10,
        stem_width: int = 24,
        batch_norm: bool = True,
        logit_scale: float = 1 / 9,
        attention_after: int = 2,
        reduction: int = 8,
        scale: float | None = 1.0,
    ) -> None:
        super().__init__(widths, depth_per_stage, num_classes, stem_width, batch_norm, logit_scale)
        if not 1 <= validate_int(attention_after, "attention_after", minimum=None) <= len(widths):
            raise ValueError(
                f"attention_after must name a stage, 1 to {len(widths)} for widths={tuple(widths)}, got "
                f"{attention_after}"
            )
        self.attention_after = attention_after
        self.attention = SelfAttention2d(widths[attention_after - 1], reduction, scale)

    def forward_features(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, 3, H, W) images -> (B, widths[-1], h, w) features; with ``return_attention`` also the map (B, hw, hw)."""
        x = self.forward_stem(x)  # (B, stem_width, H-1, W-1): FastCNN's checks and stem
        weights = None
        for i, stage in enumerate(self.stages, start=1):
            x = stage(x)  # (B, width, H/2, W/2)
            if i == self.attention_after:
                x = self.attention(x, return_attention=return_attention)  # (B, width, h, w), same shape
                if return_attention:
                    x, weights = x  # (B, h*w, h*w)
        return (x, weights) if return_attention else x

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, 3, H, W) images -> (B, num_classes) logits; with ``return_attention`` also the map (B, hw, hw)."""
        if not return_attention:
            return self.forward_head(self.forward_features(x))
        features, weights = self.forward_features(x, return_attention=True)
        return self.forward_head(features), weights
