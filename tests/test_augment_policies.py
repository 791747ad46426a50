"""Tests for fixmatch.augment.policies: weak_augment and RandAugment."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sample_images import generator, smooth_images

from fixmatch.augment import RandAugment, RandAugmentChoices, weak_augment

SHAPES = [(4, 1, 28, 28), (4, 3, 32, 32), (3, 3, 24, 40), (3, 1, 17, 9)]


# ----------------------------------------------------------------------------- weak_augment


@pytest.mark.parametrize("padding, mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_weak_translation_is_a_padded_crop_within_bound(padding: str, mode: str) -> None:
    n, h, w = 128, 28, 28
    # All values distinct and none 0, so that each crop of the padded image matches one shift only.
    x = torch.arange(1, n * h * w + 1, dtype=torch.float32).view(n, 1, h, w) / (n * h * w)
    out = weak_augment(x, generator(0), flip=False, padding=padding)
    p = round(0.125 * h)  # = 4
    padded = F.pad(x, (p, p, p, p), mode=mode)  # constant: zeros
    shifts = []
    for i in range(n):
        matches = [
            (oy - p, ox - p)
            for oy in range(2 * p + 1)
            for ox in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, oy : oy + h, ox : ox + w])
        ]
        assert len(matches) == 1
        shifts.append(matches[0])
    dy, dx = torch.tensor(shifts).T
    assert dy.abs().max() == p and dx.abs().max() == p  # the extremes occur
    assert {-p, p} <= set(dy.tolist()) and {-p, p} <= set(dx.tolist())
    assert len(set(shifts)) > 40  # the two axes are drawn independently


def test_weak_zero_padding_differs_from_reflection_only_in_the_border() -> None:
    x = smooth_images((64, 3, 20, 20)).clamp(min=1)  # no pixel is 0: only the padding is black
    reflect = weak_augment(x, generator(5))
    zeros = weak_augment(x, generator(5), padding="zeros")
    assert torch.equal(zeros, weak_augment(x.float() / 255, generator(5), padding="zeros"))  # uint8 = float input
    black = (zeros == 0).all(1)  # (N, H, W): the padded border, all channels 0
    assert torch.equal(zeros, torch.where(black[:, None], 0.0, reflect))  # the same flip and shift elsewhere
    # The border is whole rows and columns, at most p = round(0.125 * 20) = 2 of each, and p occurs.
    rows, cols = black.all(2), black.all(1)  # (N, H) black rows, (N, W) black columns
    assert torch.equal(black, rows[:, :, None] | cols[:, None, :])
    p = round(0.125 * 20)
    assert rows.sum(1).max() == p and cols.sum(1).max() == p
    assert (rows.sum(1) == 0).any() and (cols.sum(1) == 0).any()  # shift 0 occurs too


def test_weak_padding_is_checked() -> None:
    with pytest.raises(ValueError, match="padding must be one of reflect, zeros"):
        weak_augment(smooth_images((1, 1, 8, 8)), generator(0), padding="edge")


def test_weak_flip_about_half() -> None:
    x = torch.rand(2000, 1, 6, 5, generator=generator(1))
    out = weak_augment(x, generator(2), translate=0.0)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert (same ^ flipped).all()
    assert 0.45 < flipped.float().mean() < 0.55


def test_weak_identity_when_disabled() -> None:
    x = smooth_images((4, 3, 32, 32))
    assert torch.equal(weak_augment(x, generator(0), flip=False, translate=0.0), x.float() / 255)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_weak_shapes_dtype_determinism(shape: tuple[int, ...]) -> None:
    x = smooth_images(shape)
    out = weak_augment(x, generator(3))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, weak_augment(x.float() / 255, generator(3)))  # uint8 and float input agree
    assert torch.equal(out, weak_augment(x, generator(3)))  # the same seed gives the same batch


# ----------------------------------------------------------------------------- RandAugment


def test_value_mapping_table() -> None:
    ra = RandAugment()
    names = [op.name for op in ra.ops]
    assert names == [
        "Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Contrast",
        "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Posterize",
    ]  # fmt: skip
    levels = torch.tensor([1, 5, 9])

    def values(name: str) -> list[float]:
        return [round(v, 6) for v in ra.value(names.index(name), levels).tolist()]

    assert values("Rotate") == [-24.0, 0.0, 24.0]
    assert values("ShearX") == values("TranslateY") == [-0.24, 0.0, 0.24]
    assert values("Solarize") == [0.1, 0.5, 0.9]
    assert values("Brightness") == values("Sharpness") == [0.14, 0.5, 0.86]
    assert ra.value(names.index("Posterize"), torch.arange(1, 10)).tolist() == [4, 5, 5, 6, 6, 6, 7, 7, 8]


def test_sample_distribution() -> None:
    ra = RandAugment(num_ops=2, prob=0.5)
    ch = ra.sample(20000, generator(0))
    assert ch.ops.shape == ch.levels.shape == ch.applied.shape == (20000, 2)
    freq = torch.bincount(ch.ops.flatten(), minlength=14).float() / ch.ops.numel()
    assert freq.numel() == 14 and (freq - 1 / 14).abs().max() < 0.01
    assert ch.levels.min() == 1 and ch.levels.max() == 9 and ch.levels.unique().numel() == 9
    assert abs(ch.applied.float().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("num_ops", [1, 3])
def test_number_of_ops_and_their_probability(num_ops: int) -> None:
    x = smooth_images((16, 3, 32, 32)).float() / 255
    always = RandAugment(num_ops=num_ops, prob=1.0, cutout=0.0)
    assert always.sample(16, generator(1)).applied.shape == (16, num_ops)
    assert bool(always.sample(16, generator(1)).applied.all())
    never = RandAugment(num_ops=num_ops, prob=0.0, cutout=0.0)
    assert not bool(never.sample(16, generator(1)).applied.any())
    assert torch.equal(never(x, generator(2)), x)  # no op applied and no Cutout: the images unchanged


def test_batch_gets_different_ops_and_matches_per_sample_application() -> None:
    """Checks that grouping samples by op gives the same result as applying each sample's ops one at a time."""
    ra = RandAugment(num_ops=2, prob=0.8, cutout=0.0)
    x = smooth_images((48, 3, 32, 32)).float() / 255
    ch = ra.sample(48, generator(5))
    out = ra.apply(x, ch, generator(6))
    assert ch.ops[ch.applied].unique().numel() >= 10 and ch.levels.unique().numel() == 9
    for i in range(48):
        y = x[i : i + 1]
        for layer in range(2):
            if ch.applied[i, layer]:
                k = int(ch.ops[i, layer])
                y = ra.ops[k].fn(y, ra.value(k, ch.levels[i, layer : layer + 1]))
        assert torch.allclose(out[i : i + 1], y, atol=1e-6), ra.describe(ch, i)
    assert len({ra.describe(ch, i) for i in range(48)}) > 30


def test_randaugment_cutout() -> None:
    """Checks that with no ops applied, the only change is one grey square of side round(0.5 * min(H, W)) per sample."""
    ra = RandAugment(prob=0.0, cutout=0.5, fill=0.5)
    x = torch.zeros(64, 3, 24, 40)
    out = ra(x, generator(9))
    size = 12
    mask = out[:, 0] != 0
    assert torch.equal(out, mask[:, None].expand_as(out).float() * 0.5)
    areas = mask.sum(dim=(1, 2))
    assert areas.max() == size * size and (areas < size * size).any()
    assert torch.equal(areas, mask.any(2).sum(1) * mask.any(1).sum(1))  # each one is a rectangle
    assert torch.equal(RandAugment(prob=0.0, cutout=0.0)(x, generator(9)), x)


def test_describe() -> None:
    ra = RandAugment()
    ch = RandAugmentChoices(
        ops=torch.tensor([[3, 13], [1, 9], [0, 5]]),
        levels=torch.tensor([[8, 5], [2, 1], [3, 3]]),
        applied=torch.tensor([[True, True], [True, False], [False, False]]),
    )
    assert ra.describe(ch, 0) == "Rotate(+18.0) Posterize(6) Cutout(0.5)"
    assert ra.describe(ch, 1) == "AutoContrast Cutout(0.5)"
    assert RandAugment(cutout=0).describe(ch, 2) == "Identity"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda() -> None:
    x = smooth_images((16, 3, 32, 32)).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    for out in (RandAugment()(x, g), weak_augment(x, g)):
        assert out.is_cuda and out.shape == x.shape and 0 <= out.min() and out.max() <= 1
