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
- with exact=True (CTAugment's ops), brightness, color, contrast, sharpness and
  autocontrast reproduce Pillow's uint8 arithmetic: d = 0.
- rotate, translate, shear: exact, pixel for pixel, with fill 128. The ops
  compute Pillow's coefficients in double and run its NEAREST transform's own
  arithmetic (16.16 fixed point, or double sums for translations), so sample
  points on a pixel edge land where Pillow puts them. The tested values
  include such ties: shear +-0.12 (0.56 + 12 * 0.12 = 2) and +-0.2
  (0.2 * 7.5 = 1.5), 0.04, and a 3.5 px shift. test_augment_every_op.py checks
  every magnitude each policy can draw.
"""

from __future__ import annotations

import math

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
# exact=True: Pillow's uint8 arithmetic, including the float32 blend factor and its truncation, and factors
# above 1 (Pillow's clipped extrapolation; CTAugment goes up to 2).
EXACT_FACTORS = [0.05, 0.1, 0.3, 0.5, 0.77, 0.95, 1.0, 1.3, 1.5, 1.9, 2.0, float(np.float32(0.1 + 1.9 * 0.97))]
POINT_OPS.update({
    f"{name}_exact": (lambda x, v, op=op: op(x, v, exact=True), pil_fn, EXACT_FACTORS, (0.0, 0.0))
    for name, (op, pil_fn, _, _) in POINT_OPS.items() if name in ("brightness", "contrast", "color", "sharpness")
})
POINT_OPS["auto_contrast_exact"] = (lambda x, v: ops.auto_contrast(x, exact=True),
                                    lambda im, v: ImageOps.autocontrast(im), [0.0] * 4, (0.0, 0.0))


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


SHEARS = [-0.3, -0.24, -0.2, -0.18, -0.12, -0.06, 0.0, 0.04, 0.06, 0.12, 0.13, 0.2, 0.24, 0.3]
SHIFTS = [-0.3, -0.24, -0.125, -0.06, 0.0, 0.06, 0.1, 0.18, 0.3]

# name -> (op, Pillow reference, parameter values)
GEOMETRIC_OPS = {
    "rotate": (
        ops.rotate,
        lambda im, v: im.rotate(v, resample=Image.NEAREST, fillcolor=_fillcolor(im)),
        [-30, -24, -17.5, -6, 0, 6, 10, 18, 24, 30, 90, 180, -90, 270, 12.3456],
    ),
    "shear_x": (ops.shear_x, _affine(lambda im, v: (1, v, 0, 0, 1, 0)), SHEARS),
    "shear_y": (ops.shear_y, _affine(lambda im, v: (1, 0, 0, v, 1, 0)), SHEARS),
    "translate_x": (ops.translate_x, _affine(lambda im, v: (1, 0, -v * im.width, 0, 1, 0)), SHIFTS),
    "translate_y": (ops.translate_y, _affine(lambda im, v: (1, 0, 0, 0, 1, -v * im.height)), SHIFTS),
}


@pytest.mark.parametrize("name", list(GEOMETRIC_OPS))
def test_geometric_op_matches_pil(name: str, images: list[Image.Image]) -> None:
    op, pil_fn, values = GEOMETRIC_OPS[name]
    # Pillow gets the float32 value so both sides see the same parameter.
    values = [float(np.float32(v)) for v in values]
    ours, ref = _run(op, pil_fn, images, values, fill=FILL / 255)
    differs = (np.round(ours) != ref).any(axis=-1)  # (N, H, W)
    assert not differs.any(), [(v, int(d.sum())) for v, d in zip(values, differs) if d.any()]


def _coordinates(h: int, w: int) -> Image.Image:
    """An RGB image whose pixels are all different (column, row, and a mix), none black: any misplaced read shows."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x + 10, y + 10, (x * 7 + y * 13) % 200 + 30], -1).astype(np.uint8))


def _affine_cases() -> list[tuple[float, ...]]:
    """Coefficients for each of Pillow's three NEAREST paths, including their edge cases."""
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(40):
        # ImagingScaleAffine (a1 = a3 = 0): scales whose positions, summed in double, round differently from
        # start + k * step, so the running sums must be reproduced term by term.
        cases.append((float(rng.choice([0.1, 0.3, 0.7, 1 / 3, -0.9])), 0.0, float(rng.choice([0.1, 0.3, -0.45, 1 / 3])),
                      0.0, float(rng.choice([0.1, 0.3, 0.7, 1 / 3])), float(rng.choice([0.2, 0.3, 1 / 7]))))
        cases.append((float(rng.uniform(-2, 2)), 0.0, float(rng.uniform(-40, 40)), 0.0, float(rng.uniform(-2, 2)),
                      float(rng.uniform(-40, 40))))
        # affine_fixed: any rotation, shear and scale.
        cases.append(tuple(float(v) for v in (*rng.uniform(-2, 2, 2), rng.uniform(-40, 40), *rng.uniform(-2, 2, 2),
                                              rng.uniform(-40, 40))))
        # The double-precision fallback: a corner maps beyond +-32768, yet some rows land inside the image.
        s, row = float(rng.uniform(1000, 3000)), float(rng.uniform(3, 20))
        cases.append((1 + float(rng.uniform(-0.3, 0.3)), s, -s * (row + 0.5) + float(rng.uniform(0, 20)),
                      float(rng.uniform(-0.1, 0.1)), 1.0, 0.0))
    # Ties and signed zeros: positions exactly on a pixel edge, or a hair away.
    cases += [(1.0, 0.0, 1e-17, 0.0, 1.0, -0.5 + 1e-17), (-1.0, 0.0, 31.9999999999, 0.0, 1.0, -1e-300),
              (1.0, -0.0, -3.5, -0.0, 1.0, 2.5), (1.0, 0.12, 0.0, 0.0, 1.0, 0.0), (0.5, 0.0, 0.0, 0.0, 0.5, 0.0)]
    return cases


@pytest.mark.parametrize("size", [(32, 32), (23, 17)], ids=str)
def test_affine_matches_pil_on_every_path(size: tuple[int, int]) -> None:
    im = _coordinates(*size)
    cases = _affine_cases()
    x = to_tensor([im] * len(cases))
    ours = np.round(to_numpy(ops.affine(x, torch.tensor(cases, dtype=torch.float64), fill=0.0)))
    for i, coeffs in enumerate(cases):
        ref = np.asarray(im.transform(im.size, Image.AFFINE, coeffs, resample=Image.NEAREST, fillcolor=(0, 0, 0)))
        assert np.array_equal(ours[i], ref), (coeffs, int((ours[i] != ref).any(-1).sum()))


# Every angle a policy can draw: whole degrees up to 45 (CTAugment, randaugment-fixed up to M = 15), the paper's
# multiples of 6, and float32 values of a continuous draw (randaugment-3op), plus other halves and tenths.
ANGLES = ([float(a) for a in range(-360, 361)] + [a / 2 for a in range(-91, 91, 2)] + [a / 10 for a in range(-451, 451, 7)]
          + [float(v) for v in torch.rand(200, generator=torch.Generator().manual_seed(0)) * 60 - 30])


@pytest.mark.parametrize("size", [(32, 32), (28, 28), (96, 96), (48, 40)], ids=str)
def test_rotate_coefficients_are_pillows(size: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """rotate_coeffs gives Image.rotate's matrix bit for bit: Pillow's own code computes it here, captured."""
    captured = []
    transform = Image.Image.transform

    def capture(self, size, method, data=None, *args, **kwargs):
        captured.append(list(data))
        return transform(self, size, method, data, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "transform", capture)
    im = Image.new("L", size)
    ours = ops.rotate_coeffs(torch.tensor(ANGLES, dtype=torch.float64), size[1], size[0]).tolist()
    checked = 0
    for angle, coeffs in zip(ANGLES, ours):
        captured.clear()
        im.rotate(angle, resample=Image.NEAREST)
        if captured:  # not one of Pillow's shortcuts (0, 180, and 90 / 270 on a square image)
            assert coeffs == captured[0], angle
            checked += 1
    assert checked > 0.9 * len(ANGLES)


def test_fixed_point_coefficients_do_not_depend_on_the_last_bit() -> None:
    """Pillow's 16.16 rounding of every rotation a policy draws is far from a tie, so the last bit of cos and sin
    (where a GPU's or another C library's may differ) cannot move a pixel."""

    def fixed(coeffs: list[float]) -> list[int]:
        a0, a1, a2, a3, a4, a5 = coeffs
        return [math.floor(v * 65536.0 + 0.5) for v in (a0, a1, a2 + a0 * 0.5 + a1 * 0.5, a3, a4, a5 + a3 * 0.5 + a4 * 0.5)]

    for h, w in [(32, 32), (28, 28), (96, 96), (40, 48)]:
        for coeffs in ops.rotate_coeffs(torch.tensor(ANGLES, dtype=torch.float64), h, w).tolist():
            for steps in (-4, 4):
                nudged = [math.nextafter(v, math.copysign(math.inf, steps)) for v in coeffs]
                for _ in range(abs(steps) - 1):
                    nudged = [math.nextafter(v, math.copysign(math.inf, steps)) for v in nudged]
                assert fixed(nudged) == fixed(coeffs)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_pixels() -> None:
    """Pillow's arithmetic is reproduced with integer, float64 and single float32 operations, so a GPU gives the
    same pixels: the geometric ops (ties included), every affine path, and the exact=True point ops."""
    x = to_tensor([photo((32, 32))] * 16)
    g = torch.Generator().manual_seed(0)
    for name, (op, _, values) in GEOMETRIC_OPS.items():
        v = torch.tensor((values * 2)[:16], dtype=torch.float32)
        assert torch.equal(op(x, v), op(x.cuda(), v.cuda()).cpu()), name
    coeffs = torch.tensor(_affine_cases(), dtype=torch.float64)
    xs = x[:1].expand(len(coeffs), -1, -1, -1)
    assert torch.equal(ops.affine(xs, coeffs, fill=0.0), ops.affine(xs.cuda(), coeffs.cuda(), fill=0.0).cpu())
    factors = torch.rand(16, generator=g) * 1.9 + 0.1
    for name, fn in {"brightness": ops.brightness, "color": ops.color, "contrast": ops.contrast,
                     "sharpness": ops.sharpness, "smooth": ops.smooth, "blur": ops.blur}.items():
        cpu, gpu = fn(x, factors, exact=True), fn(x.cuda(), factors.cuda(), exact=True).cpu()
        assert torch.equal((cpu * 255).round(), (gpu * 255).round()), name
    ac = ops.blend(x, ops.auto_contrast(x, exact=True), factors / 2, exact=True)
    ac_gpu = ops.blend(x.cuda(), ops.auto_contrast(x.cuda(), exact=True), factors.cuda() / 2, exact=True).cpu()
    assert torch.equal((ac * 255).round(), (ac_gpu * 255).round())
