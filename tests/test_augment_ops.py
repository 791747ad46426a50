"""Tests for fixmatch.augment.ops, checked against Pillow on real images.

Test images:
- the Grace Hopper photo that ships with matplotlib, centre-cropped and
  resized to 32x32, 64x64 and 48x40 (W x H) RGB;
- four Fashion-MNIST test images (28x28 greyscale), skipped when the dataset
  file is absent.

The ops are compared with Pillow's functions on the 0..255 scale, applied to
``uint8 / 255``. Tolerances:

- equalize, posterize, solarize: exact.
- brightness, contrast, autocontrast: Pillow truncates, the ops do not. Their
  difference ``d = op * 255 - pil`` must lie in [0, 1].
- color, sharpness: Pillow also rounds the degenerate image (convert("L") or
  the SMOOTH filter) before blending. d must lie in [-0.5, 1.5].
- all point ops: after rounding to uint8, at most 1 level off, and mean |d| < 0.6.
- translate, shear: exact for the tested values, with fill 128. This includes
  half-pixel ties such as a 3.5 px shift, because the op breaks ties the way
  Pillow does. Pillow's shear uses 16.16 fixed point, so near ties Pillow can
  round the other way and a whole row moves by one pixel. For example shear
  +-0.2 (0.2 * 7.5 = 1.5) does this; the tested values avoid it.
- rotate: at most 0.2% of pixels may differ, which is a few pixels for the
  tested angles. Those pixels lie on boundaries where float32 and Pillow's
  fixed point pick different neighbours. Over every half degree in [-45, 45]
  the worst case is 0.5%.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from sample_images import fashion_mnist, photo, to_array, to_numpy, to_tensor

from fixmatch.augment import ops

FILL = 128  # Pillow's fillcolor; the ops get fill=128/255 so the two match exactly


# ----------------------------------------------------------------------------- images


@pytest.fixture(
    scope="module", params=["photo32", "photo64", "photo48x40", "fmnist28"]
)
def images(request) -> list[Image.Image]:
    """Gives the images that cases cycle through in one batch: one photo, or several Fashion-MNIST images."""
    return {
        "photo32": lambda: [photo((32, 32))],
        "photo64": lambda: [photo((64, 64))],
        "photo48x40": lambda: [photo((48, 40))],
        "fmnist28": fashion_mnist,
    }[request.param]()


def _run(op, pil_fn, imgs: list[Image.Image], values: list[float], **kw) -> tuple[np.ndarray, np.ndarray]:
    """Applies op to a batch and pil_fn to each of its samples.

    Sample i of the batch is imgs[i % len(imgs)] with parameter values[i].
    """
    batch = [imgs[i % len(imgs)] for i in range(len(values))]
    ours = to_numpy(op(to_tensor(batch), torch.tensor(values, dtype=torch.float32), **kw))
    ref = to_array([pil_fn(im, v) for im, v in zip(batch, values)]).astype(np.float64)
    return ours, ref


# ----------------------------------------------------------------------------- point ops vs Pillow

FACTORS = [0.05, 0.3, 0.5, 0.77, 0.95, 1.5]

# name -> (op, Pillow reference, parameter values, bounds on d = ours - pil)
POINT_OPS = {
    "auto_contrast": (ops.auto_contrast, lambda im, v: ImageOps.autocontrast(im), [0.0] * 4, (0.0, 1.0)),
    "equalize": (ops.equalize, lambda im, v: ImageOps.equalize(im), [0.0] * 4, (0.0, 0.0)),
    "posterize": (ops.posterize, lambda im, v: ImageOps.posterize(im, int(v)), [1, 2, 4, 5, 6, 7, 8], (0.0, 0.0)),
    # v = t / 256 gives a threshold of exactly t on Pillow's 0..255 scale.
    "solarize": (
        ops.solarize,
        lambda im, v: ImageOps.solarize(im, round(v * 256)),
        [t / 256 for t in (0, 1, 64, 128, 200, 255, 256)],
        (0.0, 0.0),
    ),
    "brightness": (ops.brightness, lambda im, v: ImageEnhance.Brightness(im).enhance(v), FACTORS, (0.0, 1.0)),
    "contrast": (ops.contrast, lambda im, v: ImageEnhance.Contrast(im).enhance(v), FACTORS, (0.0, 1.0)),
    "color": (ops.color, lambda im, v: ImageEnhance.Color(im).enhance(v), FACTORS, (-0.5, 1.5)),
    "sharpness": (ops.sharpness, lambda im, v: ImageEnhance.Sharpness(im).enhance(v), FACTORS, (-0.5, 1.5)),
}


@pytest.mark.parametrize("name", list(POINT_OPS))
def test_point_op_matches_pil(name: str, images: list[Image.Image]) -> None:
    op, pil_fn, values, (lo, hi) = POINT_OPS[name]
    ours, ref = _run(op, pil_fn, images, values)
    d = ours - ref
    eps = 1e-3  # float32 rounding
    assert d.min() >= lo - eps and d.max() <= hi + eps, (d.min(), d.max())
    assert np.abs(np.round(ours) - ref).max() <= 1
    assert np.abs(d).mean() < 0.6


# ----------------------------------------------------------------------------- geometric ops vs Pillow


def _fillcolor(im: Image.Image) -> int | tuple[int, ...]:
    return FILL if im.mode == "L" else (FILL,) * 3


def _affine(coeffs):
    return lambda im, v: im.transform(im.size, Image.AFFINE, coeffs(im, v), fillcolor=_fillcolor(im))


SHEARS = [-0.3, -0.24, -0.18, -0.12, -0.06, 0.0, 0.06, 0.13, 0.24, 0.3]
SHIFTS = [-0.3, -0.24, -0.125, -0.06, 0.0, 0.06, 0.1, 0.18, 0.3]

# name -> (op, Pillow reference, parameter values, largest allowed fraction of differing pixels)
GEOMETRIC_OPS = {
    "rotate": (
        ops.rotate,
        lambda im, v: im.rotate(v, resample=Image.NEAREST, fillcolor=_fillcolor(im)),
        [-30, -24, -17.5, -6, 0, 6, 10, 18, 24, 30, 90],
        0.002,
    ),
    "shear_x": (ops.shear_x, _affine(lambda im, v: (1, v, 0, 0, 1, 0)), SHEARS, 0.0),
    "shear_y": (ops.shear_y, _affine(lambda im, v: (1, 0, 0, v, 1, 0)), SHEARS, 0.0),
    "translate_x": (ops.translate_x, _affine(lambda im, v: (1, 0, -v * im.width, 0, 1, 0)), SHIFTS, 0.0),
    "translate_y": (ops.translate_y, _affine(lambda im, v: (1, 0, 0, 0, 1, -v * im.height)), SHIFTS, 0.0),
}


@pytest.mark.parametrize("name", list(GEOMETRIC_OPS))
def test_geometric_op_matches_pil(name: str, images: list[Image.Image]) -> None:
    op, pil_fn, values, max_frac = GEOMETRIC_OPS[name]
    # Pillow gets the float32 value so both sides see the same parameter.
    values = [float(np.float32(v)) for v in values]
    ours, ref = _run(op, pil_fn, images, values, fill=FILL / 255)
    differs = (np.round(ours) != ref).any(axis=-1)  # (N, H, W)
    assert differs.mean(axis=(1, 2)).max() <= max_frac, differs.mean(axis=(1, 2))


def test_geometric_directions() -> None:
    """Checks the sign conventions.

    Rotate is counter-clockwise, and translate with v > 0 moves content right
    and down.
    """
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 1, 6] = 1  # top-right corner region
    rot = ops.rotate(x, torch.tensor([90.0]), fill=0)
    assert rot[0, 0, 1, 1] == 1  # top-right -> top-left under CCW rotation
    tx = ops.translate_x(x, torch.tensor([-0.25]), fill=0)
    assert tx[0, 0, 1, 4] == 1
    ty = ops.translate_y(x, torch.tensor([0.25]), fill=0)
    assert ty[0, 0, 3, 6] == 1
    # Fill: content that moves in from outside the image is grey.
    assert (ops.translate_x(x, torch.tensor([0.5]))[..., :4] == 0.5).all()


def test_bilinear_mode_fills_smoothly() -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = ops.rotate(x, torch.tensor([15.0, -15.0]), mode="bilinear")
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert torch.allclose(ops.rotate(x, torch.zeros(2), mode="bilinear"), x, atol=1e-6)


# ----------------------------------------------------------------------------- generic properties

ALL_OPS = {
    "identity": (ops.identity, 0.0),
    "auto_contrast": (ops.auto_contrast, 0.0),
    "equalize": (ops.equalize, 0.0),
    "rotate": (ops.rotate, 23.0),
    "shear_x": (ops.shear_x, -0.2),
    "shear_y": (ops.shear_y, 0.2),
    "translate_x": (ops.translate_x, 0.21),
    "translate_y": (ops.translate_y, -0.21),
    "solarize": (ops.solarize, 0.4),
    "posterize": (ops.posterize, 3.0),
    "brightness": (ops.brightness, 1.7),
    "color": (ops.color, 1.7),
    "contrast": (ops.contrast, 1.7),
    "sharpness": (ops.sharpness, 1.7),
}
SHAPES = [(3, 1, 28, 28), (3, 3, 32, 32), (2, 3, 24, 40), (2, 1, 17, 9)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(ALL_OPS))
def test_shape_dtype_range(name: str, shape: tuple[int, ...]) -> None:
    op, v = ALL_OPS[name]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    out = op(x, torch.full((shape[0],), v))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", [n for n in ALL_OPS if n != "identity"])
def test_per_sample_parameters(name: str) -> None:
    """Checks that a batch with per-sample parameters equals the samples processed one at a time.

    It also checks that the parameters change the result.
    """
    op, v = ALL_OPS[name]
    x = to_tensor([photo((32, 32))] * 3)
    params = {"posterize": [1.0, 4.0, 7.0]}.get(name, [v, 0.5 * v, -0.3 * v])
    params = torch.tensor(params)
    batched = op(x, params)
    single = torch.cat([op(x[i : i + 1], params[i : i + 1]) for i in range(3)])
    assert torch.equal(batched, single)
    if name not in ("auto_contrast", "equalize"):  # these two take no parameter
        assert not torch.equal(batched[0], batched[1])


def test_scalar_parameter_broadcasts() -> None:
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ops.brightness(x, 0.5), ops.brightness(x, torch.full((4,), 0.5)))


def test_float_input_not_quantised() -> None:
    g = torch.Generator().manual_seed(3)
    x = 0.2 + 0.5 * torch.rand(2, 3, 16, 16, generator=g)
    ac = ops.auto_contrast(x)
    assert torch.allclose(ac.amin(dim=(2, 3)), torch.zeros(2, 3))
    assert torch.allclose(ac.amax(dim=(2, 3)), torch.ones(2, 3))
    assert not torch.equal((ac * 255).round(), ac * 255)  # the stretch stays continuous
    assert torch.allclose(ops.brightness(x, 0.5), x * 0.5)
    assert torch.allclose(ops.color(x, 1.0), x) and torch.equal(ops.solarize(x, 1.0), x)


def test_constant_channels_unchanged() -> None:
    x = torch.full((2, 3, 8, 8), 0.3)
    assert torch.equal(ops.auto_contrast(x), x)
    assert torch.equal(ops.equalize(x), x)


def test_degenerate_factors() -> None:
    x = to_tensor([photo((32, 32))])
    grey = ops.color(x, 0.0)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    flat = ops.contrast(x, 0.0)
    assert flat.unique().numel() == 1
    assert torch.equal(ops.brightness(x, 0.0), torch.zeros_like(x))
    assert torch.allclose(ops.sharpness(x, 1.0), x)


def _grey_tie() -> np.ndarray:
    a = np.full((4, 4), 100, np.uint8)
    a[:2] = 101  # mean exactly 100.5: PIL's int(mean + 0.5) gives 101, round-half-even would give 100
    return a


def _rgb_luma_rounding() -> np.ndarray:
    # L(0, 1, 0) = 1 after PIL's rounding, so the mean L is 0.5 -> 1; the unrounded luma mean is 0.29 -> 0.
    return np.tile(np.array([[[0, 1, 0], [0, 0, 0]]], np.uint8), (4, 2, 1))


@pytest.mark.parametrize("image", [_grey_tie(), _rgb_luma_rounding()], ids=["grey-half-tie", "rgb-luma-rounding"])
def test_contrast_uses_pils_whole_level_mean(image: np.ndarray) -> None:
    # The degenerate grey level is PIL's exactly: only Pillow's truncation of the blend remains, d in [0, 1).
    ref = np.asarray(ImageEnhance.Contrast(Image.fromarray(image)).enhance(0.05)).astype(np.float64)
    x = torch.from_numpy(image).float() / 255
    x = x[None, None] if image.ndim == 2 else x.permute(2, 0, 1)[None]
    ours = ops.contrast(x, 0.05)[0].permute(1, 2, 0).squeeze(-1).numpy().astype(np.float64) * 255
    d = ours - ref
    assert d.min() >= -1e-4 and d.max() < 1, (d.min(), d.max())


# ----------------------------------------------------------------------------- cutout


@pytest.mark.parametrize(
    "cy, cx, size, expected",
    [
        (16, 12, 8, 8 * 8),  # interior: the full square
        (16, 12, 7, 7 * 7),  # odd side: rows/cols [c - 3, c + 4)
        (0, 0, 8, 4 * 4),  # top-left corner: rows and columns [-4, 4) are clipped to [0, 4)
        (31, 23, 8, 5 * 5),  # bottom-right corner: rows [27, 35) -> [27, 32), cols [19, 27) -> [19, 24)
        (2, 12, 10, 7 * 10),  # top edge: rows [-3, 7) -> [0, 7)
    ],
)
def test_cutout_mask_area(cy: int, cx: int, size: int, expected: int) -> None:
    mask = ops.cutout_mask(torch.tensor([cy]), torch.tensor([cx]), size, 32, 24)
    assert mask.shape == (1, 1, 32, 24) and mask.dtype == torch.bool
    assert int(mask.sum()) == expected
    assert mask[0, 0, cy, cx]


def test_cutout_batch() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.zeros(200, 3, 28, 28)
    size = 14
    out = ops.cutout(x, size, g, fill=1.0)
    mask = out[:, 0] == 1
    assert torch.equal(out, mask[:, None].expand_as(out).float())  # the same square in every channel
    areas = mask.sum(dim=(1, 2))
    rows, cols = mask.any(2).sum(1), mask.any(1).sum(1)
    assert torch.equal(areas, rows * cols)  # each one is an axis-aligned rectangle
    assert areas.max() == size * size and areas.min() >= (size // 2) ** 2
    assert (areas < size * size).any()  # some of them are clipped at the border
    assert torch.equal(ops.cutout(x, 0, g), x)
    g.manual_seed(4)
    assert torch.equal(ops.cutout(x, size, g, fill=1.0), out)


def test_integer_images_other_than_uint8_are_refused_not_clamped():
    x = torch.full((1, 1, 4, 4), 200, dtype=torch.int64)
    with pytest.raises(TypeError, match="uint8 in \\[0, 255\\] or float in \\[0, 1\\], not torch.int64"):
        ops.to_float(x)
    assert ops.to_float(x.to(torch.uint8)).max().item() == pytest.approx(200 / 255)
