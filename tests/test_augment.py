"""companion.augment: each op's known effect on a built image, mixup/cutmix label mixing, seeded determinism."""

from __future__ import annotations

import pytest
import torch

from companion.augment import OPS, AugmentLoader, apply_op, cutmix, mixup, one_hot, random_ops, translate, tta_logits
from companion.data import DeviceLoader


def images(b: int = 4, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    """Random images on the 8-bit grid of real pixels (k / 255)."""
    return torch.randint(0, 256, (b, c, h, w), generator=torch.Generator().manual_seed(seed)) / 255


def test_identity_and_zero_magnitude_leave_the_images_alone() -> None:
    x = images()
    for name in ("identity", "brightness", "contrast", "color", "sharpness", "posterize", "rotate", "shear_x"):
        torch.testing.assert_close(apply_op(x, name, 0.0), x, atol=1e-6, rtol=0)


def test_brightness_scales_and_clamps() -> None:
    x = images()
    torch.testing.assert_close(apply_op(x, "brightness", -0.5), x * 0.55)
    torch.testing.assert_close(apply_op(x, "brightness", 1.0), (x * 1.9).clamp(max=1))


def test_contrast_and_color_keep_the_grey_level() -> None:
    x = images()
    grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    flat = apply_op(x, "contrast", -1 / 0.9)  # factor 0: every pixel becomes the image's mean grey
    torch.testing.assert_close(flat, grey.mean((1, 2)).view(-1, 1, 1, 1).expand_as(x))
    torch.testing.assert_close(apply_op(x, "color", -1 / 0.9), grey.unsqueeze(1).expand_as(x))  # factor 0: grey


def test_sharpness_leaves_a_flat_image_alone_and_changes_an_edge() -> None:
    flat = torch.full((1, 3, 6, 6), 0.4)
    torch.testing.assert_close(apply_op(flat, "sharpness", 1.0), flat)
    edge = torch.zeros(1, 1, 6, 6)
    edge[..., 3:] = 0.5
    assert not torch.allclose(apply_op(edge, "sharpness", -1.0), edge)


def test_posterize_keeps_the_top_bits() -> None:
    x = torch.arange(256.0).view(1, 1, 16, 16) / 255
    out = apply_op(x, "posterize", 1.0)  # 4 bits dropped: multiples of 16
    torch.testing.assert_close(out * 255, torch.arange(256.0).view(1, 1, 16, 16).div(16).floor().mul(16))


def test_solarize_inverts_above_the_threshold() -> None:
    x = images()
    out = apply_op(x, "solarize", 0.25)  # threshold 0.75
    torch.testing.assert_close(out, torch.where(x >= 0.75, 1 - x, x))


def test_autocontrast_stretches_each_channel() -> None:
    x = 0.2 + 0.5 * images()
    out = apply_op(x, "autocontrast", 0.0)
    torch.testing.assert_close(out.amin((2, 3)), torch.zeros(4, 3))
    torch.testing.assert_close(out.amax((2, 3)), torch.ones(4, 3))


def test_rotation_by_90_degrees_equals_rot90() -> None:
    x = images()
    torch.testing.assert_close(apply_op(x, "rotate", 3.0), torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)


def test_translation_moves_the_image_by_whole_pixels() -> None:
    x = images()
    right = torch.zeros_like(x)
    right[..., 3:] = x[..., :-3]
    torch.testing.assert_close(apply_op(x, "translate_x", 3 * 3 / 8), right, atol=1e-6, rtol=0)
    up = torch.zeros_like(x)
    up[..., :-2, :] = x[..., 2:, :]
    torch.testing.assert_close(apply_op(x, "translate_y", -2 * 3 / 8), up, atol=1e-6, rtol=0)


def test_shear_keeps_the_middle_row() -> None:
    x = images(h=9, w=9)
    out = apply_op(x, "shear_x", 0.5)  # x' = x + 0.15 y (normalised): the row at y = 0 stays put
    torch.testing.assert_close(out[..., 4, :], x[..., 4, :], atol=1e-6, rtol=0)
    assert not torch.allclose(out, x)


def test_random_ops_per_image_choice_is_seeded_and_applies_one_op_each() -> None:
    x = images(b=64)
    a = random_ops(x, torch.Generator().manual_seed(3))
    b = random_ops(x, torch.Generator().manual_seed(3))
    c = random_ops(x, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    changed = (a - x).abs().flatten(1).amax(1) > 1e-6
    assert 0.5 < changed.float().mean() < 1.0  # identity (and tiny magnitudes) leave some images alone
    # RandAugment: a fixed magnitude and a single op reproduce apply_op on every image
    only = random_ops(x, torch.Generator().manual_seed(0), ops=["solarize"], magnitude=0.25)
    torch.testing.assert_close(only, apply_op(x, "solarize", 0.25))


def test_bad_ops_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown ops"):
        random_ops(images(), torch.Generator(), ops=["blur"])
    with pytest.raises(ValueError, match="magnitude must be in"):
        random_ops(images(), torch.Generator(), magnitude=2.0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        apply_op(torch.rand(3, 8, 8), "rotate", 0.1)
    assert len(set(OPS)) == len(OPS)


def test_mixup_blends_images_and_labels() -> None:
    x, y = images(), one_hot(torch.tensor([0, 1, 2, 3]), 10)
    perm = torch.tensor([1, 0, 3, 2])
    xm, ym = mixup(x, y, 0.7, perm)
    torch.testing.assert_close(xm, 0.7 * x + 0.3 * x[perm])
    torch.testing.assert_close(ym.sum(1), torch.ones(4))
    assert ym[0, 0] == pytest.approx(0.7) and ym[0, 1] == pytest.approx(0.3)


def test_cutmix_pastes_a_box_and_mixes_labels_by_area() -> None:
    x, y = images(), one_hot(torch.tensor([0, 1, 2, 3]), 10)
    perm = torch.tensor([3, 2, 1, 0])
    xm, ym = cutmix(x, y, (2, 1, 4, 2), perm)  # 8 of 64 pixels from the partner
    torch.testing.assert_close(xm[..., 2:6, 1:3], x[perm][..., 2:6, 1:3])
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:6, 1:3] = False
    torch.testing.assert_close(xm[..., outside], x[..., outside])
    torch.testing.assert_close(ym.sum(1), torch.ones(4))
    assert ym[0, 0] == pytest.approx(56 / 64) and ym[0, 3] == pytest.approx(8 / 64)


def loader(seed: int = 0) -> DeviceLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8, generator=g)
    return DeviceLoader(x, torch.arange(48) % 10, batch_size=16, shuffle=True, device="cpu", seed=seed)


@pytest.mark.parametrize(
    "kwargs", [{}, {"mixup_alpha": 0.0}, {"cutmix_alpha": 0.0}, {"ops": ()}, {"mixup_alpha": 0.2, "num_ops": 2}]
)
def test_augment_loader_yields_soft_labels_and_repeats_with_its_seed(kwargs: dict) -> None:
    def run(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(AugmentLoader(loader(), seed=seed, **kwargs))

    first, again, other = run(1), run(1), run(2)
    assert len(first) == 3
    for (x, y), (x2, y2) in zip(first, again):
        assert x.shape == (16, 3, 16, 16) and y.shape == (16, 10)
        torch.testing.assert_close(y.sum(1), torch.ones(16))
        assert (y >= 0).all()
        torch.testing.assert_close(x, x2, atol=0, rtol=0)
        torch.testing.assert_close(y, y2, atol=0, rtol=0)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))


def test_augment_loader_without_ops_and_mixing_is_the_plain_loader() -> None:
    plain = list(loader())
    wrapped = list(AugmentLoader(loader(), ops=(), mixup_alpha=0.0, cutmix_alpha=0.0))
    for (x, y), (xa, ya) in zip(plain, wrapped):
        torch.testing.assert_close(xa, x, atol=0, rtol=0)
        torch.testing.assert_close(ya, one_hot(y, 10), atol=0, rtol=0)
    with pytest.raises(ValueError, match="alphas must be >= 0"):
        AugmentLoader(loader(), mixup_alpha=-1)


def test_translate_moves_the_content_and_reflects_at_the_border() -> None:
    x = images()
    moved = translate(x, 1, 2)  # one down, two right
    torch.testing.assert_close(moved[..., 1:, 2:], x[..., :-1, :-2], atol=0, rtol=0)
    torch.testing.assert_close(moved[..., 0, 2:], x[..., 1, :-2], atol=0, rtol=0)  # row -1 reflects to row 1
    torch.testing.assert_close(translate(x, 0, 0), x, atol=0, rtol=0)


class Recorder(torch.nn.Module):
    """A 'model' whose logits are the images' first pixel per channel; it records the views it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return x[:, :, 0, 0]


def test_tta_logits_average_the_right_views_with_the_right_weights() -> None:
    x = images()
    model = Recorder()
    torch.testing.assert_close(tta_logits(model, x, flip=False), x[:, :, 0, 0])
    torch.testing.assert_close(tta_logits(model, x, flip=True), 0.5 * (x[:, :, 0, 0] + x[:, :, 0, -1]))
    model.seen.clear()
    out = tta_logits(model, x, flip=True, translate_by=2)
    assert len(model.seen) == 6
    torch.testing.assert_close(model.seen[2], translate(x, 2, 2), atol=0, rtol=0)
    torch.testing.assert_close(model.seen[4], translate(x, -2, -2), atol=0, rtol=0)
    corner = [v[:, :, 0, 0] for v in model.seen]
    want = 0.25 * (corner[0] + corner[1]) + 0.125 * (corner[2] + corner[3] + corner[4] + corner[5])
    torch.testing.assert_close(out, want)
