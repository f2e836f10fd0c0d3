"""companion.optim: which parameters get weight decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from companion.models import FastCNN, ViT
from companion.optim import param_groups


def decayed(model: nn.Module, groups: list[dict]) -> set[str]:
    ids = {id(p) for p in groups[0]["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_vit_groups_skip_norms_biases_and_optionally_the_embeddings() -> None:
    model = ViT(image_size=8, patch_size=4, dim=8, depth=2, heads=2)
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2}
    groups = param_groups(model, 0.05)  # today's rule: every matrix, the embeddings included
    assert decayed(model, groups) == matrices and {"cls_token", "pos_embedding"} <= matrices
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    groups = param_groups(model, 0.05, no_decay=("cls_token", "pos_embedding"))
    assert decayed(model, groups) == matrices - {"cls_token", "pos_embedding"}
    assert all(not n.endswith("bias") and "norm" not in n for n in decayed(model, groups))
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))  # every trainable parameter in exactly one group


def test_frozen_parameters_are_left_out_and_unknown_names_are_errors() -> None:
    model = FastCNN()
    model.whiten(torch.randn(64, 3, 32, 32))  # freezes the stem's weight
    groups = param_groups(model, 5e-4)
    assert "stem.weight" not in decayed(model, groups)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="match no parameter"):
        param_groups(model, 5e-4, no_decay=("cls_token",))


def test_groups_work_in_an_optimizer() -> None:
    model = ViT(image_size=8, patch_size=4, dim=8, depth=1, heads=2)
    opt = torch.optim.AdamW(param_groups(model, 0.5, no_decay=("pos_embedding",)), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradients: only the decoupled weight decay moves a parameter
    pos, cls = model.pos_embedding.detach().clone(), model.cls_token.detach().clone()
    cls.add_(1.0)
    with torch.no_grad():
        model.cls_token.add_(1.0)
    opt.step()
    torch.testing.assert_close(model.pos_embedding, pos, atol=0, rtol=0)  # skipped
    torch.testing.assert_close(model.cls_token, cls * (1 - 0.1 * 0.5))  # decayed: p <- p (1 - lr wd)
