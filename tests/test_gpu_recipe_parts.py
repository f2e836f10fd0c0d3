"""The GPU recipes' ingredients, each tested on the CPU: frozen BatchNorm scales, ..."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from companion.models import FastCNN, count_parameters


def test_bn_scale_false_freezes_the_batchnorm_scales_at_one() -> None:
    torch.manual_seed(0)
    plain, frozen = FastCNN((8, 16, 16)), FastCNN((8, 16, 16), bn_scale=False)
    assert count_parameters(plain, trainable_only=True) - count_parameters(frozen, trainable_only=True) == 2 * 40
    opt = torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(frozen(x), y).backward()
        opt.step()
    norms = [bn for stage in frozen.stages for bn in stage.norms]
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in norms)
    assert any(not torch.equal(bn.bias, torch.zeros_like(bn.bias)) for bn in norms)  # the shifts do learn
