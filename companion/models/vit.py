"""The Vision Transformer (Dosovitskiy et al., 2021), sized for 32x32 images.

An image is cut into ``patch_size x patch_size`` patches, each patch is flattened and projected to a
``dim``-vector (``PatchEmbedding``), a learned class token is prepended, position embeddings are
added, and a stack of pre-norm Transformer encoder blocks (``EncoderBlock``, built on
``companion.attention.MultiHeadAttention``) mixes the tokens. All tokens go through a final LayerNorm;
the class token (or the mean of the patch tokens) then goes through a linear head.

Three options for training on small data sets, all off by default: stochastic depth (``DropPath``,
Huang et al., 2016), shifted patch tokenization (``ShiftedPatchEmbedding``) and locality self-attention
(``LocalitySelfAttention``), both from Lee et al. (2021), "Vision Transformer for Small-Size Datasets".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from companion.attention import MultiHeadAttention, scaled_dot_product_attention, sinusoidal_position_encoding_2d
from companion.validation import validate_divides, validate_images, validate_int, validate_positive

__all__ = [
    "DropPath",
    "EncoderBlock",
    "LocalitySelfAttention",
    "PatchEmbedding",
    "ShiftedPatchEmbedding",
    "ViT",
    "attention_rollout",
]


class PatchEmbedding(nn.Module):
    """Cut (B, C, H, W) images into non-overlapping p x p patches and project each one: (B, N, dim).

    The projection is one matrix product, ``tokens = patches @ W^T + b`` with ``W`` of shape
    (dim, C * p * p); the patches are flattened channel first, then row, then column, the order of
    ``torch.nn.functional.unfold`` and of a ``Conv2d`` kernel, so ``to_conv()`` gives the equal
    strided convolution.
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, dim: int = 192) -> None:
        super().__init__()
        validate_int(in_channels, "in_channels"), validate_int(dim, "dim")
        validate_divides(image_size, patch_size, "image_size", "patch_size", "the patches must tile the image exactly")
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Linear(in_channels * patch_size**2, dim)

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, N, C * p * p) flattened patches, in row-major patch order."""
        s = self.image_size
        hint = f"; resize or crop the images to {s}x{s}, or build a model for square images of another side"
        validate_images(x, "this model", self.in_channels, s, hint=hint)
        B, C, _, _ = x.shape
        p, g = self.patch_size, self.grid_size
        x = x.reshape(B, C, g, p, g, p)  # (B, C, row, i, col, j)
        x = x.permute(0, 2, 4, 1, 3, 5)  # (B, row, col, C, i, j)
        return x.reshape(B, g * g, C * p * p)  # (B, N, C * p * p)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, dim) patch tokens."""
        return self.proj(self.patchify(x))  # (B, N, dim)

    def to_conv(self) -> nn.Conv2d:
        """The same map as a ``Conv2d`` with kernel size = stride = patch size (a copy of the weights)."""
        p = self.patch_size
        conv = nn.Conv2d(self.in_channels, self.proj.out_features, kernel_size=p, stride=p)
        conv = conv.to(device=self.proj.weight.device, dtype=self.proj.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.proj.weight.view(-1, self.in_channels, p, p))
            conv.bias.copy_(self.proj.bias)
        return conv


class ShiftedPatchEmbedding(nn.Module):
    """Shifted patch tokenization (Lee et al., 2021): (B, C, H, W) -> (B, N, dim) tokens that also see neighbours.

    The image and four copies shifted diagonally by half a patch (at least one pixel; zeros fill the gap)
    are stacked along the channels (5C), cut into patches, layer-normalised and projected. Each token then
    covers a wider window than its own patch, which gives a small-data ViT some of a CNN's locality.
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, dim: int = 192) -> None:
        super().__init__()
        self.embed = PatchEmbedding(image_size, patch_size, 5 * in_channels, dim)  # checks the patch size
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.grid_size, self.num_patches = self.embed.grid_size, self.embed.num_patches
        self.shift_by = max(1, patch_size // 2)
        self.norm = nn.LayerNorm(5 * in_channels * patch_size**2)

    def shift(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 5C, H, W): the image, then its copies moved up-left, up-right, down-left, down-right."""
        s = self.image_size
        hint = f"; resize or crop the images to {s}x{s}, or build a model for square images of another side"
        validate_images(x, "this model", self.in_channels, s, hint=hint)
        s, H, W = self.shift_by, x.shape[2], x.shape[3]
        padded = F.pad(x, (s, s, s, s))  # (B, C, H + 2s, W + 2s)
        moves = ((s, s), (s, -s), (-s, s), (-s, -s))  # crop offsets: the content moves up-left, up-right, ...
        shifted = [padded[:, :, s + dy : s + dy + H, s + dx : s + dx + W] for dy, dx in moves]
        return torch.cat([x, *shifted], dim=1)  # (B, 5C, H, W)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, dim) patch tokens of the shifted stack."""
        patches = self.embed.patchify(self.shift(x))  # (B, N, 5 C p p)
        return self.embed.proj(self.norm(patches))  # (B, N, dim)


class LocalitySelfAttention(MultiHeadAttention):
    """Locality self-attention (Lee et al., 2021): multi-head self-attention with a learned temperature whose
    tokens do not attend to themselves.

    The scores are ``q k^T * exp(log_scale)`` with ``exp(log_scale)`` starting at ``1 / sqrt(head_dim)`` and
    learned (a lower temperature sharpens the attention); the diagonal is masked out, so each token's
    output is drawn from the other tokens only.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__(dim, num_heads, bias=bias, dropout=dropout)
        self.log_scale = nn.Parameter(torch.tensor(-0.5 * math.log(self.head_dim)))

    def forward(self, query: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, T, dim) tokens -> (B, T, dim), and with ``return_attention`` the weights (B, heads, T, T)."""
        if query.ndim != 3 or query.shape[-1] != self.dim:
            raise ValueError(f"query must have shape (B, tokens, {self.dim}), got {tuple(query.shape)}")
        B, T, _ = query.shape
        H, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(query).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        v = self.v_proj(query).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        q = q * self.log_scale.exp()  # the learned temperature, folded into q so the fused kernel still runs
        attn_mask = ~torch.eye(T, dtype=torch.bool, device=query.device)  # (T, T): True = attend, not to oneself
        dropout_p = self.dropout if self.training else 0.0
        out = scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, return_attention=return_attention, scale=1.0)
        if return_attention:
            out, weights = out  # weights (B, H, T, T), zero on the diagonal
        out = self.out_proj(out.transpose(1, 2).reshape(B, T, self.dim))  # (B, T, dim): heads merged
        return (out, weights) if return_attention else out


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): in training, drop a residual branch for a random fraction ``p`` of
    the examples.

    Each example's branch output is kept with probability ``1 - p`` and then divided by ``1 - p``, so its
    expected value is unchanged; in evaluation the module is the identity.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """(B, ...) -> (B, ...): whole examples zeroed (and the rest rescaled) in training."""
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)  # (B, 1, ...)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class EncoderBlock(nn.Module):
    """Pre-norm Transformer encoder block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` with a GELU MLP.

    ``drop_path`` drops both residual branches per example in training (stochastic depth);
    ``locality`` uses :class:`LocalitySelfAttention` instead of plain multi-head attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        eps: float = 1e-5,
        drop_path: float = 0.0,
        locality: bool = False,
    ) -> None:
        super().__init__()
        validate_int(mlp_dim, "mlp_dim"), validate_positive(eps, "eps", " (added to the LayerNorm variance)")
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        attention = LocalitySelfAttention if locality else MultiHeadAttention
        self.attn = attention(dim, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, N, dim) -> (B, N, dim), and with ``return_attention`` the weights (B, heads, N, N)."""
        out = self.attn(self.norm1(x), return_attention=return_attention)
        if return_attention:
            out, weights = out  # weights (B, heads, N, N)
        x = x + self.drop_path(self.dropout(out))  # (B, N, dim)
        x = x + self.drop_path(self.mlp(self.norm2(x)))  # (B, N, dim)
        return (x, weights) if return_attention else x

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> EncoderBlock:
        """An EncoderBlock holding a copy of the weights of a pre-norm, GELU, batch-first
        ``nn.TransformerEncoderLayer``."""
        problems = []
        if not layer.norm_first:
            problems.append("norm_first=True (ours is pre-norm)")
        if not layer.self_attn.batch_first:
            problems.append("batch_first=True")
        if layer.activation is not F.gelu and not isinstance(layer.activation, nn.GELU):
            problems.append("activation='gelu'")
        if problems:
            raise ValueError(
                f"EncoderBlock.from_torch needs a TransformerEncoderLayer built with {', '.join(problems)}"
            )
        dim, mlp_dim = layer.linear1.in_features, layer.linear1.out_features
        block = cls(dim, layer.self_attn.num_heads, mlp_dim, dropout=layer.dropout.p, eps=layer.norm1.eps)
        block = block.to(device=layer.linear1.weight.device, dtype=layer.linear1.weight.dtype)
        block.attn = MultiHeadAttention.from_torch(layer.self_attn)
        block.norm1.load_state_dict(layer.norm1.state_dict())
        block.norm2.load_state_dict(layer.norm2.state_dict())
        block.mlp[0].load_state_dict(layer.linear1.state_dict())
        block.mlp[3].load_state_dict(layer.linear2.state_dict())
        return block


class ViT(nn.Module):
    """Vision Transformer: patch embedding, class token, position embedding, ``depth`` encoder blocks, head.

    ``pool='cls'`` classifies from the class token, ``pool='mean'`` from the mean of the patch tokens
    (no class token then). ``pos_embedding='learned'`` trains one vector per token; ``'sincos'`` adds
    the fixed 2-D sinusoidal encoding of the patch grid. ``drop_path`` is the stochastic-depth rate of the
    last block (rising linearly from 0 in the first); ``shifted_patches`` and ``locality_attention`` switch on
    SPT and LSA (Lee et al., 2021). With the defaults the model is the plain ViT.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 2.0,
        num_classes: int = 10,
        pool: str = "cls",
        pos_embedding: str = "learned",
        in_channels: int = 3,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        shifted_patches: bool = False,
        locality_attention: bool = False,
    ) -> None:
        super().__init__()
        if pool not in {"cls", "mean"}:
            raise ValueError(f"pool must be 'cls' (class token) or 'mean' (average of the patch tokens), got {pool!r}")
        if pos_embedding not in {"learned", "sincos"}:
            raise ValueError(f"pos_embedding must be 'learned' or 'sincos', got {pos_embedding!r}")
        if validate_int(depth, "depth", minimum=None) < 1:
            raise ValueError(f"depth must be at least 1 encoder block, got {depth}")
        validate_int(num_classes, "num_classes"), validate_int(dim, "dim")
        mlp_dim = round(validate_positive(mlp_ratio, "mlp_ratio", " (the MLP's width over dim)") * dim)
        if mlp_dim < 1:
            raise ValueError(
                f"mlp_ratio={mlp_ratio} gives an MLP of {mlp_dim} units for dim={dim}; use at least 1 / dim"
            )
        self.pool = pool
        embedding = ShiftedPatchEmbedding if shifted_patches else PatchEmbedding
        self.patch_embed = embedding(image_size, patch_size, in_channels, dim)
        num_tokens = self.patch_embed.num_patches + (1 if pool == "cls" else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        if pos_embedding == "learned":
            self.pos_embedding = nn.Parameter(torch.empty(num_tokens, dim))
            nn.init.trunc_normal_(self.pos_embedding, std=0.02, a=-0.04, b=0.04)
        else:
            g = self.patch_embed.grid_size
            grid = sinusoidal_position_encoding_2d(g, g, dim)  # (N, dim); the class token gets no position
            self.register_buffer("pos_embedding", torch.cat([torch.zeros(num_tokens - g * g, dim), grid]))
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # stochastic depth: 0 first, drop_path last
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, num_heads, mlp_dim, dropout, drop_path=r, locality=locality_attention) for r in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(self._init_weights)
        nn.init.zeros_(self.head.weight)  # start from uniform predictions (Beyer et al., 2022)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """The parameters that should get no weight decay (timm's convention): the class token, learned positions."""
        return {name for name in ("cls_token", "pos_embedding") if isinstance(getattr(self, name), nn.Parameter)}

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """(B, C, H, W) images -> (B, num_classes) logits, and with ``return_attention`` a list of (B,
        heads, T, T) per block."""
        x = self.patch_embed(x)  # (B, N, dim)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)  # (B, T = 1 + N, dim)
        x = x + self.pos_embedding  # (B, T, dim)
        attentions = []
        for block in self.blocks:
            if return_attention:
                x, weights = block(x, return_attention=True)
                attentions.append(weights)  # (B, heads, T, T)
            else:
                x = block(x)  # (B, T, dim)
        x = self.norm(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)  # (B, dim)
        logits = self.head(x)  # (B, num_classes)
        return (logits, attentions) if return_attention else logits


def attention_rollout(attentions: list[Tensor], residual: bool = True) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input token.

    ``attentions``: per-layer weights (B, heads, T, T). Heads are averaged; with ``residual`` the
    identity is added for the skip connection and rows renormalised, ``A = 0.5 * W + 0.5 * I``;
    the layers are then multiplied, ``R = A_L ... A_2 A_1``. Returns (B, T, T).
    """
    if not attentions:
        raise ValueError("attention_rollout needs the weights of at least one layer")
    rollout = None
    for weights in attentions:
        if weights.ndim != 4 or weights.shape[-1] != weights.shape[-2]:
            raise ValueError(f"each layer's weights must have shape (B, heads, T, T), got {tuple(weights.shape)}")
        a = weights.mean(dim=1)  # (B, T, T): heads averaged
        if residual:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
            a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout  # (B, T, T)
    return rollout
