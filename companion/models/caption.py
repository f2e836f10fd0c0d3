"""Approach 3 of Chapter 6: a small Transformer decoder that writes a caption of a CNN feature map.

``CaptionDecoder`` cross-attends to the image tokens of the Chapter 3 CNN's last feature map and writes a
caption word by word (teacher forcing in training, greedy decoding after); the text encoder of
``companion.llm`` then maps the caption to the nearest class. Its words come from ``companion.vocab.WordVocab``;
``companion.recipes.caption.train_captioner`` trains it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from companion.attention import (
    LearnedPositionEmbedding,
    MultiHeadAttention,
    causal_mask,
    sinusoidal_position_encoding_2d,
)
from companion.validation import validate_images
from companion.vocab import WordVocab

__all__ = ["CaptionDecoder", "DecoderBlock"]


class DecoderBlock(nn.Module):
    """Pre-norm Transformer decoder block: causal self-attention, cross-attention to the image, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, num_heads, dropout=dropout)
        self.cross_attn = MultiHeadAttention(dim, num_heads, dropout=dropout)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, memory: Tensor, attn_mask: Tensor) -> Tensor:
        """(B, T, dim) words, (B, M, dim) image tokens, (T, T) causal mask -> (B, T, dim)."""
        x = x + self.self_attn(self.ln1(x), attn_mask=attn_mask)  # each word sees the words before it
        x = x + self.cross_attn(self.ln2(x), memory)  # each word looks at every image token
        return x + self.mlp(self.ln3(x))


class CaptionDecoder(nn.Module):
    """Approach 3: a small Transformer decoder that writes a caption of a CNN feature map, token by token."""

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        max_len: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % 4 != 0:
            raise ValueError(f"dim must be a multiple of 4 (2-D sine-cosine positions of the image tokens), got {dim}")
        self.dim, self.max_len = dim, max_len
        self.memory_proj = nn.Linear(feature_dim, dim)
        self.memory_norm = nn.LayerNorm(dim)
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = LearnedPositionEmbedding(max_len, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, num_heads, dropout=dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying, as in GPT-2 / nanoGPT
        nn.init.normal_(self.tok_emb.weight, std=0.02)  # small, as GPT-2: N(0, 1) rows would give huge first logits

    def encode_memory(self, feature_map: Tensor) -> Tensor:
        """(B, C, h, w) CNN features -> (B, h*w, dim) image tokens with 2-D positions."""
        validate_images(feature_map, "CaptionDecoder")
        h, w = feature_map.shape[2:]
        tokens = feature_map.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major
        pos = sinusoidal_position_encoding_2d(h, w, self.dim).to(tokens.device, tokens.dtype)  # (h*w, dim)
        return self.memory_norm(self.memory_proj(tokens) + pos)  # (B, h*w, dim)

    def forward(self, feature_map: Tensor, tokens: Tensor) -> Tensor:
        """(B, C, h, w) features and (B, T) input tokens -> (B, T, vocab) next-token logits (teacher forcing)."""
        if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens must be (B, T) with T <= max_len={self.max_len}, got {tuple(tokens.shape)}")
        memory = self.encode_memory(feature_map)  # (B, M, dim)
        x = self.pos_emb(self.tok_emb(tokens))  # (B, T, dim)
        mask = causal_mask(tokens.shape[1], device=tokens.device)  # (T, T)
        for block in self.blocks:
            x = block(x, memory, mask)  # (B, T, dim)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)

    @torch.inference_mode()
    def generate(
        self, feature_map: Tensor, bos: int = WordVocab.BOS, eos: int = WordVocab.EOS, max_len: int | None = None
    ) -> Tensor:
        """Greedy decoding: (B, C, h, w) -> (B, L) token ids starting with ``bos``; ``eos`` then repeats
        once reached."""
        max_len = self.max_len if max_len is None else min(max_len, self.max_len)
        tokens = torch.full((feature_map.shape[0], 1), bos, dtype=torch.long, device=feature_map.device)  # (B, 1)
        done = torch.zeros(feature_map.shape[0], dtype=torch.bool, device=feature_map.device)
        while tokens.shape[1] < max_len and not done.all():
            nxt = self(feature_map, tokens)[:, -1].argmax(-1)  # (B,): the most likely next word
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)  # (B, t + 1)
            done |= nxt == eos
        return tokens
