"""companion.optim: which parameters get weight decay."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from companion.models import FastCNN, ViT
from companion.optim import EMA, Muon, hidden_weights, make_optimizer, orthogonalize, param_groups
from companion.train import TrainConfig


def decayed(model: nn.Module, groups: list[dict]) -> set[str]:
    ids = {id(p) for p in groups[0]["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_vit_groups_skip_norms_biases_and_optionally_the_embeddings() -> None:
    model = ViT(image_size=8, patch_size=4, dim=8, depth=2, num_heads=2)
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2}
    groups = param_groups(model, 0.05)  # today's rule: every matrix, the embeddings included
    assert decayed(model, groups) == matrices and {"cls_token", "pos_embedding"} <= matrices
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    groups = param_groups(model, 0.05, no_decay=("cls_token", "pos_embedding"))
    assert decayed(model, groups) == matrices - {"cls_token", "pos_embedding"}
    assert {id(p) for p in groups[2]["params"]} == {id(model.cls_token), id(model.pos_embedding)}
    assert all(not n.endswith("bias") and "norm" not in n for n in decayed(model, groups))
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))  # every trainable parameter in exactly one group


def test_make_optimizer_asks_the_model_which_parameters_skip_decay() -> None:
    model = ViT(image_size=8, patch_size=4, dim=8, depth=2, num_heads=2)
    assert model.no_weight_decay() == {"cls_token", "pos_embedding"}  # timm's convention, said by the model
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2}
    opt = make_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW) and decayed(model, opt.param_groups) == matrices  # default: all
    opt = make_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.05, decay_embeddings=False))
    assert decayed(model, opt.param_groups) == matrices - {"cls_token", "pos_embedding"}
    sgd = make_optimizer(model, TrainConfig(lr=0.1, vector_lr_scale=4.0))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.param_groups[1]["lr"] == 0.4
    # no class token, fixed sine-cosine positions: nothing to name (a name without a parameter would be an error)
    plain = ViT(image_size=8, patch_size=4, dim=8, depth=1, num_heads=2, pool="mean", pos_embedding="sincos")
    assert plain.no_weight_decay() == set()
    make_optimizer(plain, TrainConfig(decay_embeddings=False))


def test_frozen_parameters_are_left_out_and_unknown_names_are_errors() -> None:
    model = FastCNN()
    model.whiten(torch.randn(64, 3, 32, 32))  # freezes the stem's weight
    groups = param_groups(model, 5e-4)
    assert "stem.weight" not in decayed(model, groups)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="match no parameter"):
        param_groups(model, 5e-4, no_decay=("cls_token",))


def test_groups_work_in_an_optimizer() -> None:
    model = ViT(image_size=8, patch_size=4, dim=8, depth=1, num_heads=2)
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


def test_vectors_get_their_own_learning_rate() -> None:
    model = FastCNN((8, 8, 8))
    groups = param_groups(model, 5e-4, vector_lr=3.0)
    assert groups[1]["lr"] == 3.0 and "lr" not in groups[0] and len(groups) == 2
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.parameters() if p.ndim < 2}
    opt = torch.optim.SGD(groups, lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # a schedule scales each group's own rate
    assert [g["lr"] for g in opt.param_groups] == [0.05, 1.5]


def small_bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_ema_averages_weights_and_buffers() -> None:
    torch.manual_seed(0)
    model = small_bn_net()
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()(torch.randn(8, 3))  # moves the BatchNorm statistics
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * start[k] + 0.1 * model.state_dict()[k])
        else:
            assert torch.equal(v, model.state_dict()[k])  # num_batches_tracked: copied
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    ema.copy_to(model)
    for k, v in ema.module.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_ema_every_k_steps_and_lookahead_resets_the_model() -> None:
    torch.manual_seed(0)
    model = small_bn_net()
    ema = EMA(model, decay=0.5, every=3, lookahead=True)
    start = model[0].weight.detach().clone()
    for step in range(1, 4):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update(model)
        if step < 3:  # not averaged yet
            torch.testing.assert_close(ema.module[0].weight, start)
    torch.testing.assert_close(ema.module[0].weight, start + 1.5)  # 0.5 start + 0.5 (start + 3)
    torch.testing.assert_close(model[0].weight, start + 1.5)  # lookahead: the model restarts from the average
    with pytest.raises(ValueError, match="need decay in"):
        EMA(model, decay=1.0)
    with pytest.raises(ValueError, match="ramp >= 0"):
        EMA(model, decay=0.5, ramp=-1.0)


@pytest.mark.parametrize(("epoch", "step"), [(0, 1), (1, 2), (3, 4)])
def test_ema_ramp_grows_the_decay_with_training_progress(epoch: int, step: int) -> None:
    """In fit, the decay is decay * progress ** ramp, progress = steps done / all steps (airbench's schedule)."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = small_bn_net()
    ema = EMA(model, decay=0.8, ramp=3.0)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    state = SimpleNamespace(
        model=model, epoch=epoch, step=step, train_data=[None] * 4, config=SimpleNamespace(epochs=4)
    )
    ema.on_step_end(state)
    decay = 0.8 * ((epoch * 4 + step) / 16) ** 3
    torch.testing.assert_close(ema.module[0].weight, decay * start + (1 - decay) * (start + 1))


@pytest.mark.parametrize("shape", [(8, 8), (16, 72), (72, 16), (64, 576), (10, 256)])
def test_orthogonalize_moves_every_singular_value_near_one(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=g))[0]
    update = u @ torch.diag(torch.logspace(-1.5, 0, k)) @ v.T  # singular values from 0.03 to 1
    got = torch.linalg.svdvals(orthogonalize(update, steps=5).float())
    assert got.min() > 0.3 and got.max() < 1.3, got  # Muon's iteration lands in about [0.5, 1.5], not exactly 1
    u, _, vh = torch.linalg.svd(update, full_matrices=False)
    cosine = torch.nn.functional.cosine_similarity(orthogonalize(update, 5).float().flatten(), (u @ vh).flatten(), 0)
    assert cosine > 0.95  # the direction is U V^T's


def assert_same_steps(
    a: nn.Module, ours: torch.optim.Optimizer, b: nn.Module, theirs: torch.optim.Optimizer, steps: int
) -> None:
    """Train two copies of a model on the same batches, each with its optimiser; the weights must stay equal."""
    for _ in range(steps):
        x = torch.randn(11, 5)
        for model, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("seed", range(4))
def test_muon_without_orthogonalising_is_pytorchs_nesterov_sgd(seed: int) -> None:
    torch.manual_seed(seed)
    lr, momentum, wd = [0.01, 0.1, 0.5][seed % 3], [0.0, 0.6, 0.9][seed % 3], [0.0, 1e-3, 0.05][seed % 3]
    a = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    b = copy.deepcopy(a)
    ours = Muon(a.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    theirs = torch.optim.SGD(b.parameters(), lr=lr, momentum=momentum, weight_decay=wd, nesterov=momentum > 0)
    assert_same_steps(a, ours, b, theirs, steps=5)


def test_muon_orthogonalises_only_the_kernels_and_fit_trains_with_it() -> None:
    torch.manual_seed(0)
    model = FastCNN(widths=(8, 16), stem_width=6)
    config = TrainConfig(optimizer="muon", lr=0.1, muon_lr=0.05, weight_decay=1e-3, vector_lr_scale=4.0)
    opt = make_optimizer(model, config)
    assert isinstance(opt, Muon) and opt.param_groups[0]["lr"] == 0.1  # group 0 (the head) keeps config.lr
    kernels = {id(p) for p in model.parameters() if p.ndim == 4}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert (ids <= kernels) == group["orthogonalize"] and (ids & kernels == set() or ids <= kernels)
    kernel_group = next(g for g in opt.param_groups if g["orthogonalize"])
    assert (
        kernel_group["lr"] == 0.05 and kernel_group["momentum"] == 0.6 and len(kernel_group["params"]) == len(kernels)
    )
    conv = model.stages[0].convs[1].weight
    before = conv.detach().clone()
    model(torch.randn(4, 3, 16, 16)).logsumexp(1).mean().backward()
    opt.step()
    step = (conv.detach() - before).flatten(1)  # one orthogonalised step of size lr: singular values near 0.05
    assert 0.015 < torch.linalg.svdvals(step).min() and torch.linalg.svdvals(step).max() < 0.075
    with pytest.raises(ValueError, match="muon_lr must be a positive"):
        TrainConfig(optimizer="muon", muon_lr=0.0)
    with pytest.raises(ValueError, match="muon_momentum must be a number in"):
        TrainConfig(optimizer="muon", muon_momentum=1.0)


@pytest.mark.parametrize("seed", range(4))
def test_muon_with_adamw_for_the_rest_is_pytorchs_adamw(seed: int) -> None:
    torch.manual_seed(seed)
    lr, wd = [1e-3, 3e-3, 1e-2, 2e-4][seed], [0.0, 0.05, 0.1, 0.01][seed]
    a = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))
    b = copy.deepcopy(a)
    ours = Muon(a.parameters(), lr=lr, weight_decay=wd, adamw=True)
    theirs = torch.optim.AdamW(b.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.999))
    assert_same_steps(a, ours, b, theirs, steps=6)


def test_muon_adamw_orthogonalises_the_vits_hidden_layers_only() -> None:
    torch.manual_seed(0)
    model = ViT(image_size=16, patch_size=4, dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)
    config = TrainConfig(
        optimizer="muon-adamw", lr=2e-3, muon_lr=0.02, muon_momentum=0.95, muon_steps=5, weight_decay=0.05
    )
    assert TrainConfig(optimizer="muon-adamw").lr == 1e-3  # AdamW's default for the rest
    opt = make_optimizer(model, config)
    hidden = {id(p) for p in hidden_weights(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i] for i in hidden) == sorted(
        f"blocks.{b}.{layer}.weight"
        for b in range(2)
        for layer in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.0", "mlp.3")
    )
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids == hidden if group["orthogonalize"] else not ids & hidden
        assert group["adamw"] != group["orthogonalize"]  # everything that is not orthogonalised takes AdamW steps
    fc = model.blocks[0].mlp[0].weight  # (64, 32): a tall matrix, scaled by sqrt(64 / 32)
    before = fc.detach().clone()
    nn.init.normal_(model.head.weight, std=0.1)  # the head starts at zero: no gradient would reach the blocks
    model(torch.randn(4, 3, 16, 16)).logsumexp(1).mean().backward()
    grad = fc.grad.clone()
    opt.step()
    expected = -0.02 * 2**0.5 * orthogonalize(grad + 0.95 * grad, steps=5)  # first step: the buffer is the gradient
    torch.testing.assert_close(fc.detach() - before, expected)
    with pytest.raises(ValueError, match="'muon' or 'muon-adamw'"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="muon_steps must be a whole number"):
        TrainConfig(optimizer="muon-adamw", muon_steps=0)
