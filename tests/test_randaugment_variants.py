"""Tests for fixmatch.augment.randaugment_variants: make_strong_augment and the RandAugment variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from sample_images import generator, photo, smooth_images

from fixmatch.augment import (
    STRONG_AUGMENTS,
    CTAugment,
    RandAugment,
    VariantChoices,
    make_strong_augment,
    randaugment_3op,
    randaugment_fixed,
    randaugment_tf,
)

SHAPES = [(6, 1, 28, 28), (6, 3, 32, 32), (4, 3, 24, 40), (3, 1, 17, 9)]


def _choices(policy, names: list[str], mags: list[float], signs: list[float] | None = None) -> VariantChoices:
    """One layer per sample: sample i applies op names[i] at magnitude mags[i]."""
    n = len(names)
    table = [op.name for op in policy.ops]
    pad = policy.num_ops - 1  # the other layers are not applied
    return VariantChoices(
        ops=torch.tensor([[table.index(k)] + [0] * pad for k in names]),
        magnitudes=torch.tensor([[m] + [0.0] * pad for m in mags]),
        signs=torch.tensor([[s] + [1.0] * pad for s in (signs or [1.0] * n)]),
        applied=torch.tensor([[True] + [False] * pad] * n),
        cutout=torch.zeros(n),
    )


def _values(policy, name: str, mags: list[float], sign: float = 1.0) -> list[float]:
    k = [op.name for op in policy.ops].index(name)
    return [round(v, 6) for v in policy.value(k, torch.tensor(mags), sign).tolist()]


# ----------------------------------------------------------------------------- factory and common behaviour


def test_factory() -> None:
    assert set(STRONG_AUGMENTS) == {"randaugment", "randaugment-tf", "randaugment-fixed", "randaugment-3op",
                                    "ctaugment"}  # fmt: skip
    assert isinstance(make_strong_augment("randaugment", 0.5), RandAugment)
    assert isinstance(make_strong_augment("ctaugment", 0.5), CTAugment)
    fixed = make_strong_augment("randaugment-fixed", 0.25, fill=0.3, n=3, m=7)
    assert (fixed.num_ops, fixed.magnitude, fixed.cutout, fixed.fill) == (3, 7, 0.25, 0.3)
    with pytest.raises(ValueError, match="unknown strong augmentation"):
        make_strong_augment("autoaugment", 0.5)
    # "randaugment" is the paper's policy, unchanged.
    x = smooth_images((8, 3, 32, 32))
    assert torch.equal(make_strong_augment("randaugment", 0.5)(x, generator(0)), RandAugment(cutout=0.5)(x, generator(0)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", STRONG_AUGMENTS)
def test_shape_range_determinism(name: str, shape: tuple[int, ...]) -> None:
    policy = make_strong_augment(name, cutout=0.5)
    x = smooth_images(shape)
    x_float = x.float() / 255
    x_copy = x_float.clone()
    out = policy(x, generator(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, policy(x, generator(1)))  # the same seed gives the same batch
    assert torch.equal(out, policy(x_float, generator(1)))  # uint8 and float input agree
    assert torch.equal(x_float, x_copy)  # the input is left untouched
    assert not torch.equal(out, policy(x, generator(2)))
    same = x[:1].expand(shape[0], -1, -1, -1)  # one image repeated: every copy gets its own augmentation
    views = policy(same, generator(3))
    assert len({tuple(views[i].flatten().tolist()) for i in range(shape[0])}) == shape[0]
    ch = policy.sample(shape[0], generator(4))
    assert all(isinstance(policy.describe(ch, i), str) for i in range(shape[0]))


@pytest.mark.parametrize("name", ["randaugment-tf", "randaugment-fixed", "randaugment-3op"])
def test_batched_apply_equals_per_sample(name: str) -> None:
    policy = make_strong_augment(name, cutout=0.0)
    x = smooth_images((40, 3, 32, 32)).float() / 255
    ch = policy.sample(40, generator(5))
    out = policy.apply(x, ch, generator(6))
    assert ch.ops.unique().numel() >= 12
    for i in range(40):
        y = x[i : i + 1]
        for layer in range(policy.num_ops):
            if ch.applied[i, layer]:
                k = int(ch.ops[i, layer])
                v = policy.value(k, ch.magnitudes[i, layer : layer + 1], ch.signs[i, layer : layer + 1])
                y = policy.ops[k].fn(y, v)
        assert torch.allclose(out[i : i + 1], y, atol=1e-6), policy.describe(ch, i)


# ----------------------------------------------------------------------------- randaugment-tf


def test_tf_mapping() -> None:
    tf = randaugment_tf()
    assert [op.name for op in tf.ops] == [op.name for op in RandAugment().ops]  # the same 14 ops
    levels = [1.0, 5.0, 9.0]
    assert _values(tf, "Rotate", levels) == [3.0, 15.0, 27.0]
    assert _values(tf, "Rotate", levels, sign=-1.0) == [-3.0, -15.0, -27.0]
    assert _values(tf, "ShearX", levels) == _values(tf, "ShearY", levels) == [0.03, 0.15, 0.27]
    assert _values(tf, "TranslateX", levels, sign=-1.0) == [-1.0, -5.0, -9.0]  # pixels
    assert _values(tf, "Brightness", levels) == _values(tf, "Sharpness", levels, sign=-1.0) == [0.28, 1.0, 1.72]
    assert [round(v * 256, 3) for v in _values(tf, "Solarize", levels)] == [231.0, 128.0, 26.0]
    assert _values(tf, "Posterize", list(map(float, range(1, 11)))) == [4, 4, 3, 3, 2, 2, 2, 1, 1, 0]


def test_tf_sampling() -> None:
    ch = randaugment_tf().sample(20000, generator(7))
    assert ch.magnitudes.min() == 1 and ch.magnitudes.max() == 9 and ch.magnitudes.unique().numel() == 9
    assert torch.equal(ch.magnitudes, ch.magnitudes.round())
    assert abs(ch.applied.float().mean().item() - 0.5) < 0.01
    assert abs((ch.signs > 0).float().mean().item() - 0.5) < 0.01 and set(ch.signs.unique().tolist()) == {-1, 1}
    assert (ch.cutout == 0.5).all()


def test_tf_ops_match_official_pil() -> None:
    """Runs randaugment-tf's ops and the official augmentations.py definitions on a photo."""
    tf = randaugment_tf(cutout=0.0)
    img = photo((32, 32))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None].repeat(5, 1, 1, 1) / 255
    ch = _choices(tf, ["Posterize", "Solarize", "Brightness", "TranslateX", "Rotate"], [5, 3, 7, 4, 6],
                  [1, 1, 1, -1, 1])  # fmt: skip
    ours = (tf.apply(x, ch, generator(0)).permute(0, 2, 3, 1).numpy() * 255).astype(np.float64)
    grey = (128, 128, 128)
    ref = [
        ImageOps.posterize(img, 4 - int(5 * 4 / 10)),  # 2 bits
        ImageOps.solarize(img, 256 - int(3 * 256 / 10)),  # threshold 180
        ImageEnhance.Brightness(img).enhance(7 * 1.8 / 10 + 0.1),
        img.transform(img.size, Image.AFFINE, (1, 0, 4, 0, 1, 0), fillcolor=grey),  # level 4 px
        img.rotate(int(6 * 30 / 10), fillcolor=grey),  # 18 degrees
    ]
    ref = np.stack([np.asarray(r) for r in ref]).astype(np.float64)
    assert np.abs(ours[:2] - ref[:2]).max() < 1e-3  # posterize and solarize are exact
    d = ours[2] - ref[2]  # Pillow truncates the enhanced image
    assert d.min() >= -1e-3 and d.max() <= 1 + 1e-3
    # The fill 0.5 is 127.5, which rounds to Pillow's 128.
    assert np.array_equal(np.round(ours[3]), ref[3])
    assert (np.round(ours[4]) != ref[4]).any(-1).mean() <= 0.002


# ----------------------------------------------------------------------------- randaugment-fixed


def test_fixed_magnitude_always_applied() -> None:
    fixed = randaugment_fixed(n=3, m=7)
    ch = fixed.sample(500, generator(8))
    assert ch.ops.shape == (500, 3) and ch.applied.all() and (ch.magnitudes == 7).all()
    assert _values(fixed, "Rotate", [7.0]) == [21.0] and _values(fixed, "Brightness", [7.0]) == [1.36]
    # m = 10, the end of every range: Posterize keeps 0 bits (black) and Solarize inverts every pixel.
    top = randaugment_fixed(m=10, cutout=0.0)
    x = smooth_images((2, 3, 16, 16)).float() / 255
    out = top.apply(x, _choices(top, ["Posterize", "Solarize"], [10.0, 10.0]), generator(0))
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.allclose(out[1], 1 - x[1])


# ----------------------------------------------------------------------------- randaugment-3op


def test_3op_mapping_and_sampling() -> None:
    ra = randaugment_3op()
    u = [0.0, 0.5, 0.99]
    assert _values(ra, "Rotate", [0.0, 0.5, 1.0]) == [-30.0, 0.0, 30.0]
    assert _values(ra, "TranslateY", [0.0, 0.5, 1.0]) == [-0.3, 0.0, 0.3]
    assert _values(ra, "Color", [0.0, 0.5, 1.0]) == [0.05, 0.5, 0.95]
    assert _values(ra, "Posterize", u) == [4.0, 6.0, 7.0]
    assert _values(ra, "Solarize", u) == [0.0, 0.5, 0.99]
    ch = ra.sample(5000, generator(9))
    assert ch.ops.shape == (5000, 3) and ch.applied.all()
    assert 0 <= ch.magnitudes.min() < 0.01 and 0.99 < ch.magnitudes.max() < 1
    assert ch.magnitudes.unique().numel() > 14000  # continuous
    assert 0 <= ch.cutout.min() < 0.01 and 0.49 < ch.cutout.max() <= 0.5


def test_3op_cutout_sizes_vary() -> None:
    ra = randaugment_3op(cutout=0.5, fill=1.0)
    ch = ra.sample(64, generator(10))
    ch.ops.zero_()  # Identity everywhere: only Cutout acts
    out = ra.apply(torch.zeros(64, 1, 32, 32), ch, generator(11))
    sides = (ch.cutout * 32).round()
    areas = out.sum(dim=(1, 2, 3))
    assert (areas <= sides**2).all() and areas.unique().numel() > 20


def test_describe() -> None:
    tf = randaugment_tf()
    ch = _choices(tf, ["Rotate", "TranslateX", "Posterize", "AutoContrast"], [8, 3, 5, 1], [-1, 1, 1, 1])
    ch.cutout[:] = 0.5
    assert tf.describe(ch, 0) == "Rotate(-24) Cutout(0.5)"
    assert tf.describe(ch, 1) == "TranslateX(+3px) Cutout(0.5)"
    assert tf.describe(ch, 2) == "Posterize(2) Cutout(0.5)"
    assert randaugment_tf(cutout=0).describe(ch, 3) == "AutoContrast"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", STRONG_AUGMENTS)
def test_cuda(name: str) -> None:
    x = smooth_images((16, 3, 32, 32)).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = make_strong_augment(name, 0.5)(x, g)
    assert out.is_cuda and out.shape == x.shape and 0 <= out.min() and out.max() <= 1
