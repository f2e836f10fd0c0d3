"""The book's models and the helpers they share."""

from companion.models.caption import CaptionDecoder, DecoderBlock  # noqa: F401
from companion.models.cnn import FastCNN, SimpleCNN  # noqa: F401
from companion.models.common import (  # noqa: F401
    count_flops,
    count_parameters,
    format_table,
    load_weights,
    save_weights,
    summary,
)
from companion.models.image_text import (  # noqa: F401
    CNNEncoder,
    CosineClassifier,
    ImageTextClassifier,
    image_embeddings,
    pca_2d,
)
from companion.models.sagan import AttentionCNN, SelfAttention2d  # noqa: F401
from companion.models.vit import EncoderBlock, PatchEmbedding, ViT  # noqa: F401
