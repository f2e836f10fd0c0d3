"""The book's models and the helpers they share."""

from companion.models.cnn import FastCNN, SimpleCNN  # noqa: F401
from companion.models.common import (  # noqa: F401
    count_flops,
    count_parameters,
    format_table,
    load_weights,
    save_weights,
    summary,
)
from companion.models.sagan import SelfAttention2d, AttentionCNN  # noqa: F401
from companion.models.vit import ViT, PatchEmbedding, EncoderBlock  # noqa: F401
