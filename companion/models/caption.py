"""Approach 3 of Chapter 6: a small Transformer decoder that writes a caption of a CNN feature map.

``CaptionDecoder`` cross-attends to the image tokens of the Chapter 3 CNN's last feature map and writes a
caption word by word (teacher forcing in training, greedy decoding after); the text encoder of
``companion.llm`` then maps the caption to the nearest class.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from companion.attention import (
    LearnedPositionEmbedding,
    MultiHeadAttention,
    causal_mask,
    sinusoidal_position_encoding_2d,
)
from companion.checks import check_images
from companion.train import fit

__all__ = ["CaptionDecoder", "DecoderBlock", "WordVocab", "train_captioner"]


class WordVocab:
    """A word-level vocabulary: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then the words of the given texts."""

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, texts: Sequence[str]) -> None:
        words = sorted({w for t in texts for w in self.tokenize(t)})
        self.itos = ["<pad>", "<bos>", "<eos>", *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """Lower-case words, with the full stop as a word of its own."""
        return text.lower().replace(".", " .").split()

    def encode(self, texts: Sequence[str], max_len: int | None = None) -> Tensor:
        """(N, L) token ids ``<bos> words <eos> <pad>...``; L = the longest text + 2 unless given."""
        rows = []
        for t in texts:
            unknown = [w for w in self.tokenize(t) if w not in self.stoi]
            if unknown:
                raise ValueError(
                    f"words {unknown} of {t!r} are not in the vocabulary; build WordVocab from texts that contain them"
                )
            rows.append([self.BOS, *(self.stoi[w] for w in self.tokenize(t)), self.EOS])
        length = max(map(len, rows)) if max_len is None else max_len
        if any(len(r) > length for r in rows):
            raise ValueError(f"a text has more than max_len - 2 = {length - 2} words; raise max_len")
        return torch.tensor([r + [self.PAD] * (length - len(r)) for r in rows], dtype=torch.long)

    def decode(self, ids: Tensor) -> list[str]:
        """(N, L) token ids -> N strings, read up to the first ``<eos>``."""
        texts = []
        for row in ids.tolist():
            words = []
            for i in row:
                if i == self.EOS:
                    break
                if i not in (self.PAD, self.BOS):
                    words.append(self.itos[i])
            texts.append(" ".join(words).replace(" .", "."))
        return texts


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
        check_images(feature_map, "CaptionDecoder")
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
        """Greedy decoding: (B, C, h, w) -> (B, L) token ids starting with ``bos``; ``eos`` then repeats "
        "once reached."""
        max_len = self.max_len if max_len is None else min(max_len, self.max_len)
        tokens = torch.full((feature_map.shape[0], 1), bos, dtype=torch.long, device=feature_map.device)  # (B, 1)
        done = torch.zeros(feature_map.shape[0], dtype=torch.bool, device=feature_map.device)
        while tokens.shape[1] < max_len and not done.all():
            nxt = self(feature_map, tokens)[:, -1].argmax(-1)  # (B,): the most likely next word
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)  # (B, t + 1)
            done |= nxt == eos
        return tokens


class _CaptionBatches:
    """Teacher-forcing batches ``((feature maps, input tokens), next tokens)``, a random caption of its class each."""

    def __init__(
        self, feature_maps: Tensor, labels: Tensor, captions: Tensor, batch_size: int, seed: int, device: torch.device
    ) -> None:
        self.feature_maps, self.labels, self.captions = feature_maps, labels, captions
        self.batch_size, self.device = batch_size, device
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[tuple[Tensor, Tensor], Tensor]]:
        order = torch.randperm(len(self.labels), generator=self.gen)
        for start in range(0, len(self.labels), self.batch_size):
            idx = order[start : start + self.batch_size]
            template = torch.randint(0, self.captions.shape[1], (len(idx),), generator=self.gen)
            rows = self.labels[idx].to(self.captions.device), template.to(self.captions.device)  # index where they live
            seq = self.captions[rows].to(self.device)  # (B, L): <bos> words <eos> <pad>...
            yield (self.feature_maps[idx].to(self.device), seq[:, :-1]), seq[:, 1:]  # predict each next token


def train_captioner(
    decoder: CaptionDecoder,
    feature_maps: Tensor,
    labels: Tensor,
    captions: Tensor,
    epochs: int = 3,
    batch_size: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Teacher forcing with ``companion.train.fit``: each image gets a random caption of its class from ``captions``.

    ``feature_maps`` (N, C, h, w) come from a frozen image encoder, ``captions`` (C, T, L) are token ids
    (classes, templates, length); AdamW with a short warm-up and a cosine schedule; the padding is not scored.
    Returns the mean loss per token of each epoch.
    """
    if captions.ndim != 3 or len(feature_maps) != len(labels):
        raise ValueError("captions must be (classes, templates, L) token ids and feature_maps one per label")
    dev = next(decoder.parameters()).device
    batches = _CaptionBatches(feature_maps, labels, captions, batch_size, seed, dev)
    history = fit(
        decoder,
        batches,
        epochs=epochs,
        optimizer="adamw",
        lr=lr,
        weight_decay=weight_decay,
        schedule="cosine",
        warmup=0.1,
        ignore_index=WordVocab.PAD,
        progress=progress,
    )
    decoder.eval()
    return history.train_loss
