"""Batched image operations for RandAugment-style augmentation.

Every op has the signature ``op(x, v) -> Tensor`` where ``x`` is a float
tensor of shape (N, C, H, W) with values in [0, 1] (C = 1 or 3) on any device
and ``v`` holds one parameter per sample (shape (N,), or a scalar that is
broadcast) in the op's natural unit. Outputs are float tensors clamped to
[0, 1]. There are no Python loops over the batch, so each sample can get its
own parameter in one kernel launch.

Each op reproduces the Pillow function named in its docstring. Pillow works
on uint8 and truncates where these ops stay continuous. For a uint8 image
``p``, ``op(p / 255, v) * 255`` therefore lies within about one grey level of
Pillow's result; the tests give the exact bound for each op. Equalize and
posterize are defined on the 256-level grid, so they quantise (round
``x * 255``). Solarize rounds only to compare with its threshold. The other
ops never quantise.

Geometric ops use Pillow's ``Image.transform(size, AFFINE, (a, b, c, d, e, f))``
convention: output pixel ``(x, y)`` (pixel-corner coordinates, origin at the
top-left, pixel centres at ``i + 0.5``) samples the input at
``(a x + b y + c, d x + e y + f)``. Sampling is nearest-neighbour by default,
as in Pillow. Pixels that map outside the image are set to ``fill``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "to_float",
    "identity",
    "auto_contrast",
    "equalize",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "solarize",
    "posterize",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "cutout",
    "cutout_mask",
    # the extra ops of CTAugment
    "blend",
    "invert",
    "smooth",
    "blur",
    "rescale",
    "RESCALE_METHODS",
    "cutout_per_sample",
]

_TIE_BREAK = 1e-4  # pixels; see _pil_affine
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights of PIL's convert("L")


def to_float(x: Tensor, copy: bool = False) -> Tensor:
    """Returns a float32 image in [0, 1] (uint8 input is divided by 255).

    Float32 input is returned as it is unless ``copy`` is set; with copy=True the result never shares
    memory with x, so the caller may modify it in place.
    """
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if not x.is_floating_point():  # e.g. int64 in 0..255: taken as [0, 1] it would be clamped to black and white
        raise TypeError(f"images must be uint8 in [0, 255] or float in [0, 1], not {x.dtype}")
    return x.to(torch.float32, copy=copy)


def _param(v: Tensor | float, x: Tensor) -> Tensor:
    """Gives each sample's parameter as an (N, 1, 1, 1) tensor that broadcasts over the image."""
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).expand(x.shape[0]).view(-1, 1, 1, 1)


def _quantise(x: Tensor) -> Tensor:
    """Gives the nearest 0..255 grey level as int64 (used by the ops that Pillow defines on 256 levels)."""
    return (x * 255).round_().clamp_(0, 255).long()


def _levels(x: Tensor) -> Tensor:
    """Like _quantise, as floats (whole numbers, exact in float32): cheaper where no index is needed."""
    return (x * 255).round_().clamp_(0, 255)


def _grey(x: Tensor) -> Tensor:
    """Gives the luma image (N, 1, H, W), which is PIL's convert("L") without its rounding."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor | float) -> Tensor:
    """Computes PIL ImageEnhance's ``Image.blend(degenerate, x, factor)``: 0 gives the degenerate image, 1 gives x."""
    return (degenerate + _param(factor, x) * (x - degenerate)).clamp_(0, 1)


# ----------------------------------------------------------------------------- point / colour ops


def identity(x: Tensor, v: Tensor | None = None) -> Tensor:
    """Returns x unchanged; v is ignored."""
    return x


def auto_contrast(x: Tensor, v: Tensor | None = None) -> Tensor:
    """Does ``PIL.ImageOps.autocontrast(img, cutoff=0)``.

    Each channel is stretched linearly so that its min becomes 0 and its max
    becomes 1. A constant channel is left unchanged. PIL truncates the
    stretched value to an integer; this op does not.
    """
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    stretched = (x - lo) / span.clamp_min(1e-12)
    return torch.where(span > 0, stretched, x).clamp_(0, 1)


def equalize(x: Tensor, v: Tensor | None = None) -> Tensor:
    """Does ``PIL.ImageOps.equalize``: per-channel histogram equalisation of the uint8-quantised image.

    This uses PIL's lookup table exactly: ``step = (n_pixels - count of last
    nonzero bin) // 255`` and ``lut[i] = (step // 2 + sum(hist[:i])) // step``.
    Where ``step == 0`` the channel is left unchanged.
    """
    n, c, h, w = x.shape
    q = _quantise(x).reshape(n, c, h * w)
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=x.device).scatter_add_(2, q, torch.ones_like(q))
    levels = torch.arange(256, device=x.device)
    last_bin = torch.where(hist > 0, levels, 0).amax(dim=2, keepdim=True)
    step = (h * w - hist.gather(2, last_bin)) // 255  # (N, C, 1)
    below = hist.cumsum(2) - hist  # number of pixels strictly below each level
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp_(max=255)  # PIL clips the LUT to 8 bits
    out = lut.gather(2, q).view(n, c, h, w).to(x.dtype) / 255
    return torch.where(step.view(n, c, 1, 1) > 0, out, x)


def solarize(x: Tensor, v: Tensor) -> Tensor:
    """Does ``PIL.ImageOps.solarize(img, threshold=v * 256)``: inverts pixels whose 0..255 level is >= v * 256.

    With v in [0, 1], v = 0 inverts every pixel and v = 1 inverts none. The
    comparison uses the nearest grey level, so uint8 inputs get exactly
    Pillow's result.
    """
    invert = _levels(x) >= _param(v, x) * 256
    return torch.where(invert, 1 - x, x).clamp_(0, 1)


def posterize(x: Tensor, v: Tensor) -> Tensor:
    """Does ``PIL.ImageOps.posterize(img, bits=v)``: keeps the top ``v`` bits (1..8) of each 0..255 level."""
    drop = 2 ** (8 - _param(v, x).round().clamp(1, 8))  # 2 ** (number of low bits cleared)
    return torch.div(_levels(x), drop, rounding_mode="floor") * drop / 255


def brightness(x: Tensor, v: Tensor) -> Tensor:
    """Does ``PIL.ImageEnhance.Brightness(img).enhance(v)``, a blend with black."""
    return _blend(torch.zeros_like(x), x, v)


def color(x: Tensor, v: Tensor) -> Tensor:
    """Does ``PIL.ImageEnhance.Color(img).enhance(v)``, a blend with the greyscale image.

    It is the identity when C = 1.
    """
    if x.shape[1] == 1:
        return x
    return _blend(_grey(x).expand_as(x), x, v)


def contrast(x: Tensor, v: Tensor) -> Tensor:
    """Does ``PIL.ImageEnhance.Contrast(img).enhance(v)``, a blend with the image's mean grey level.

    The mean is PIL's: ``int(mean + 0.5)`` of the whole-level image ``convert("L")`` (``_grey_levels``),
    so the degenerate image is the same 0..255 level as Pillow's.
    """
    levels = _grey_levels(x)
    count = levels[0].numel()
    total = levels.sum(dim=(1, 2, 3), keepdim=True)  # int64: exact
    mean = torch.div(2 * total + count, 2 * count, rounding_mode="floor")  # floor(total / count + 0.5)
    return _blend((mean.to(x.dtype) / 255).expand_as(x), x, v)


def _grey_levels(x: Tensor) -> Tensor:
    """PIL's ``convert("L")`` as whole levels (N, 1, H, W), int32, from x's levels rounded to 0..255.

    PIL works in 16.16 fixed point: L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16.
    """
    rgb = (x * 255).round().to(torch.int32)
    if x.shape[1] == 1:
        return rgb
    w = torch.tensor((19595, 38470, 7471), dtype=torch.int32, device=x.device).view(1, 3, 1, 1)
    return ((rgb * w).sum(1, keepdim=True, dtype=torch.int32) + 0x8000) >> 16


def sharpness(x: Tensor, v: Tensor) -> Tensor:
    """Does ``PIL.ImageEnhance.Sharpness(img).enhance(v)``, a blend with ``img.filter(ImageFilter.SMOOTH)``.

    SMOOTH is the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13. Like
    PIL, it leaves the 1-pixel border as it was.
    """
    n, c, h, w = x.shape
    if h < 3 or w < 3:
        return x
    # Nine shifted slices rather than conv2d: a depthwise 3x3 convolution is slow on CPU, and its
    # backend prepares a new kernel for every batch size (each op group has its own).
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]  # (N, C, H - 2, W): vertical sums of 3
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = (box + 4 * x[:, :, 1:-1, 1:-1]) / 13
    return _blend(degenerate, x, v)


# ----------------------------------------------------------------------------- geometric ops


def _pil_affine(x: Tensor, coeffs: Tensor, fill: float, mode: str) -> Tensor:
    """Does ``Image.transform(size, AFFINE, coeffs[i])`` for each sample i with one grid_sample call.

    coeffs (N, 6) = (a, b, c, d, e, f) in PIL's convention: output pixel
    (x, y) samples the input at (a x + b y + c, d x + e y + f), in pixel
    coordinates with the origin at the image corner. With align_corners=False,
    normalised coordinates map linearly onto the same corner-based pixel
    coordinates, so the PIL matrix M becomes ``theta = T M T^-1``.
    """
    n, _, h, w = x.shape
    m = torch.zeros(n, 3, 3, dtype=x.dtype, device=x.device)
    m[:, :2, :] = coeffs.view(n, 2, 3)
    m[:, 2, 2] = 1
    if mode == "nearest":
        # PIL floors the corner-based coordinate, which rounds half up. grid_sample rounds half to even.
        # A tiny offset resolves exact ties (e.g. a 3.5 px shift) the way PIL does.
        m[:, :2, 2] += _TIE_BREAK
    t = torch.tensor([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]], dtype=x.dtype, device=x.device)
    t_inv = torch.tensor([[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]], dtype=x.dtype, device=x.device)
    theta = (t @ m @ t_inv)[:, :2, :]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Zero padding of (x - fill), with fill added back afterwards, pads with fill.
    # With bilinear sampling the border also blends into fill.
    out = F.grid_sample(x - fill, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill
    return out.clamp_(0, 1)


def affine(x: Tensor, coeffs: Tensor, fill: float = 0.5, mode: str = "nearest") -> Tensor:
    """Does ``Image.transform(size, AFFINE, coeffs[i], fillcolor=fill)`` for each sample i (coeffs (N, 6)).

    The geometric ops below are this with the coefficients of their ``*_coeffs`` function; a policy
    that draws different geometric ops for different samples can transform them all in one call.
    """
    return _pil_affine(x, coeffs, fill, mode)


def _param_1d(v: Tensor | float, x: Tensor) -> Tensor:
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).expand(x.shape[0])


def _coeffs(v: Tensor, *rows: Tensor | float) -> Tensor:
    """Stacks six scalars or (N,) tensors into an (N, 6) coefficient tensor (N, dtype and device of v)."""
    n = v.shape[0]
    return torch.stack([torch.as_tensor(r, dtype=v.dtype, device=v.device).expand(n) for r in rows], dim=1)


def rotate_coeffs(v: Tensor, h: int, w: int) -> Tensor:
    """PIL's inverse map of a rotation by v (N,) degrees counter-clockwise about (W/2, H/2)."""
    theta = v * (math.pi / 180)
    cos, sin = theta.cos(), theta.sin()
    cx, cy = w / 2, h / 2
    # input = R(theta) (output - centre) + centre, with y pointing down.
    return _coeffs(v, cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def shear_x_coeffs(v: Tensor, h: int, w: int) -> Tensor:
    return _coeffs(v, 1, v, 0, 0, 1, 0)


def shear_y_coeffs(v: Tensor, h: int, w: int) -> Tensor:
    return _coeffs(v, 1, 0, 0, v, 1, 0)


def translate_x_coeffs(v: Tensor, h: int, w: int) -> Tensor:
    return _coeffs(v, 1, 0, -v * w, 0, 1, 0)


def translate_y_coeffs(v: Tensor, h: int, w: int) -> Tensor:
    return _coeffs(v, 1, 0, 0, 0, 1, -v * h)


def rotate(x: Tensor, v: Tensor, fill: float = 0.5, mode: str = "nearest") -> Tensor:
    """Does ``img.rotate(v, resample=NEAREST, fillcolor=fill)``: v degrees counter-clockwise about the image centre.

    The centre is (W/2, H/2) in corner coordinates, as in PIL.
    """
    return _pil_affine(x, rotate_coeffs(_param_1d(v, x), *x.shape[2:]), fill, mode)


def shear_x(x: Tensor, v: Tensor, fill: float = 0.5, mode: str = "nearest") -> Tensor:
    """Does ``img.transform(img.size, AFFINE, (1, v, 0, 0, 1, 0), fillcolor=fill)``.

    Output (x, y) samples input (x + v y, y), so the top row stays fixed.
    """
    return _pil_affine(x, shear_x_coeffs(_param_1d(v, x), *x.shape[2:]), fill, mode)


def shear_y(x: Tensor, v: Tensor, fill: float = 0.5, mode: str = "nearest") -> Tensor:
    """Does ``img.transform(img.size, AFFINE, (1, 0, 0, v, 1, 0), fillcolor=fill)``.

    Output (x, y) samples input (x, v x + y), so the left column stays fixed.
    """
    return _pil_affine(x, shear_y_coeffs(_param_1d(v, x), *x.shape[2:]), fill, mode)


def translate_x(x: Tensor, v: Tensor, fill: float = 0.5, mode: str = "nearest") -> Tensor:
    """Does ``img.transform(img.size, AFFINE, (1, 0, -v * W, 0, 1, 0), fillcolor=fill)``.

    The content moves right by v * W pixels (v > 0 means right).
    """
    return _pil_affine(x, translate_x_coeffs(_param_1d(v, x), *x.shape[2:]), fill, mode)


def translate_y(x: Tensor, v: Tensor, fill: float = 0.5, mode: str = "nearest") -> Tensor:
    """Does ``img.transform(img.size, AFFINE, (1, 0, 0, 0, 1, -v * H), fillcolor=fill)``.

    The content moves down by v * H pixels (v > 0 means down).
    """
    return _pil_affine(x, translate_y_coeffs(_param_1d(v, x), *x.shape[2:]), fill, mode)


# ----------------------------------------------------------------------------- cutout


def cutout_mask(cy: Tensor, cx: Tensor, size: int, height: int, width: int) -> Tensor:
    """Gives a boolean mask (N, 1, H, W) of squares with side ``size``, clipped to the image.

    The squares are centred at the integer pixels (cy, cx): each one covers
    rows ``[cy - size // 2, cy - size // 2 + size)`` and the matching columns.
    """
    top = (cy - size // 2).view(-1, 1)
    left = (cx - size // 2).view(-1, 1)
    rows = torch.arange(height, device=cy.device).view(1, -1)
    cols = torch.arange(width, device=cx.device).view(1, -1)
    in_rows = (rows >= top) & (rows < top + size)  # (N, H)
    in_cols = (cols >= left) & (cols < left + size)  # (N, W)
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def cutout(x: Tensor, size: int, generator: torch.Generator, fill: float = 0.5) -> Tensor:
    """Sets a square of side ``size`` pixels to ``fill`` in each sample.

    The square's centre is drawn uniformly over the pixels, and the square is
    clipped at the border.
    """
    n, _, h, w = x.shape
    if size <= 0:
        return x
    cy = torch.randint(0, h, (n,), generator=generator, device=x.device)
    cx = torch.randint(0, w, (n,), generator=generator, device=x.device)
    return _fill_squares(x, cy.view(n, 1), cx.view(n, 1), torch.as_tensor(size, device=x.device), fill)


def _fill_squares(x: Tensor, cy: Tensor, cx: Tensor, size: Tensor, fill: float) -> Tensor:
    """Sets the square of side size (an int tensor, per sample (N, 1) or shared) centred at (cy, cx) (N, 1) to fill.

    The square is blended in with a 0/1 float mask (lerp): on CPU that is several times faster than
    masked_fill or where with a boolean mask broadcast over the channels.
    """
    _, _, h, w = x.shape
    top, left = cy - size // 2, cx - size // 2
    rows = torch.arange(h, device=x.device).view(1, -1)
    cols = torch.arange(w, device=x.device).view(1, -1)
    in_rows = ((rows >= top) & (rows < top + size)).to(x.dtype)  # (N, H)
    in_cols = ((cols >= left) & (cols < left + size)).to(x.dtype)  # (N, W)
    mask = (in_rows[:, :, None] * in_cols[:, None, :]).unsqueeze(1)  # (N, 1, H, W): 1 inside the square
    return torch.lerp(x, torch.full((), fill, dtype=x.dtype, device=x.device), mask)  # weight 1 gives fill exactly


# ----------------------------------------------------------------------------- ops added for CTAugment


def blend(x: Tensor, y: Tensor, v: Tensor | float) -> Tensor:
    """Does ``Image.blend(x, y, v)``: ``x + v * (y - x)``, so v = 0 gives x and v = 1 gives y.

    CTAugment uses it to apply AutoContrast, Equalize, Invert, Smooth and Blur
    with a strength v in [0, 1]. Pillow truncates the result; this op does not.
    """
    return _blend(x, y, v)


def invert(x: Tensor, v: Tensor | None = None) -> Tensor:
    """Does ``PIL.ImageOps.invert``: ``1 - x`` (255 - p on the 0..255 scale); v is ignored."""
    return 1 - x


def _pil_filter(x: Tensor, kernel: tuple[tuple[int, ...], ...], divisor: int) -> Tensor:
    """Does ``img.filter(kernel)`` for a symmetric k x k Pillow kernel, without Pillow's rounding.

    Like Pillow's Filter.c, the outer k // 2 rows and columns keep their
    values, and an image smaller than the kernel is returned unchanged.
    """
    _, c, h, w = x.shape
    k = len(kernel)
    r = k // 2
    if h < k or w < k:
        return x
    weight = (torch.tensor(kernel, dtype=x.dtype, device=x.device) / divisor).expand(c, 1, k, k)
    out = x.clone()
    out[:, :, r:-r, r:-r] = F.conv2d(x, weight, groups=c)
    return out


_SMOOTH = (((1, 1, 1), (1, 5, 1), (1, 1, 1)), 13)  # ImageFilter.SMOOTH
_BLUR = (((1, 1, 1, 1, 1), (1, 0, 0, 0, 1), (1, 0, 0, 0, 1), (1, 0, 0, 0, 1), (1, 1, 1, 1, 1)), 16)  # ImageFilter.BLUR


def smooth(x: Tensor, v: Tensor | float) -> Tensor:
    """Does ``Image.blend(img, img.filter(ImageFilter.SMOOTH), v)``, CTAugment's Smooth.

    SMOOTH is the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 with the
    1-pixel border left as it was (the degenerate image of sharpness()). v = 0
    gives x and v = 1 the smoothed image.
    """
    return blend(x, _pil_filter(x, *_SMOOTH), v)


def blur(x: Tensor, v: Tensor | float) -> Tensor:
    """Does ``Image.blend(img, img.filter(ImageFilter.BLUR), v)``, the official CTAugment's Blur.

    BLUR is Pillow's 5x5 kernel: ones on the outer ring, zeros inside, divided
    by 16. The 2-pixel border is left as it was.
    """
    return blend(x, _pil_filter(x, *_BLUR), v)


# Pillow's resampling filters in the order of the official CTAugment's Rescale (ANTIALIAS is LANCZOS).
RESCALE_METHODS = ("lanczos", "bicubic", "bilinear", "box", "hamming", "nearest")


def _sinc(t: Tensor) -> Tensor:
    pt = math.pi * t
    return torch.where(t == 0, torch.ones_like(t), torch.sin(pt) / torch.where(t == 0, torch.ones_like(t), pt))


# The kernels as in Pillow's Resample.c (their supports need no window: each is 0 outside it). NEAREST is not a kernel.
_RESAMPLE_KERNELS: dict[str, Callable[[Tensor], Tensor]] = {
    "lanczos": lambda t: torch.where((t >= -3) & (t < 3), _sinc(t) * _sinc(t / 3), torch.zeros_like(t)),
    "bicubic": lambda t: torch.where(
        t.abs() < 1,
        (1.5 * t.abs() - 2.5) * t * t + 1,  # a = -0.5
        torch.where(t.abs() < 2, (((t.abs() - 5) * t.abs() + 8) * t.abs() - 4) * -0.5, torch.zeros_like(t)),
    ),
    "bilinear": lambda t: (1 - t.abs()).clamp_min(0),
    "box": lambda t: ((t > -0.5) & (t <= 0.5)).to(t.dtype),
    "hamming": lambda t: torch.where(
        t.abs() < 1, _sinc(t) * (0.54 + 0.46 * torch.cos(math.pi * t)), torch.zeros_like(t)
    ),
}


def _pil_nearest(width: int, size: int) -> list[int]:
    """Gives the input pixel of each output pixel for Pillow's NEAREST resize of ``width`` pixels to ``size``.

    Pillow (ImagingScaleAffine) starts at scale / 2 and adds scale = width /
    size in double precision for each pixel, then truncates; accumulating the
    same way breaks exact ties (an integer (j + 0.5) * scale) as Pillow does.
    """
    scale = width / size
    pos, out = scale * 0.5, []
    for _ in range(size):
        out.append(int(pos))
        pos += scale
    return out


def _resample_matrix(size: int, lo: Tensor, hi: Tensor, method: Tensor) -> Tensor:
    """Gives Pillow's weights (N, size_out, size_in) for resizing the pixel range [lo, hi) of each sample to ``size``.

    This is Resample.c's precompute_coeffs for enlarging (filterscale 1):
    output pixel j is centred at c = (j + 0.5) * (hi - lo) / size in crop
    coordinates, crop pixel i gets kernel((i - c) + 0.5), and the weights of
    the pixels inside the crop are divided by their sum (the edge handling).
    NEAREST (method 5) puts weight 1 on the pixel _pil_nearest gives.
    """
    n = lo.shape[0]
    f64 = dict(dtype=torch.float64, device=lo.device)
    scale = ((hi - lo).to(torch.float64) / size).view(n, 1, 1)
    centre = (torch.arange(size, **f64).view(1, -1, 1) + 0.5) * scale  # (N, out, 1)
    i = torch.arange(size, **f64).view(1, 1, -1) - lo.view(n, 1, 1)  # input pixels in crop coordinates (N, 1, in)
    t = (i - centre + 0.5).expand(n, size, size)
    weights = torch.zeros(n, size, size, **f64)
    for k, name in enumerate(RESCALE_METHODS):
        sel = method == k
        if not bool(sel.any()):
            continue
        if name == "nearest":
            widths = (hi - lo)[sel].tolist()
            table = {wd: _pil_nearest(wd, size) for wd in set(widths)}
            pick = torch.tensor([table[wd] for wd in widths], device=lo.device)  # (n_sel, out)
            weights[sel] = (i[sel] == pick[..., None]).to(torch.float64)
        else:
            weights[sel] = _RESAMPLE_KERNELS[name](t[sel])
    weights = weights * ((i >= 0) & (i < (hi - lo).view(n, 1, 1)))
    return weights / weights.sum(-1, keepdim=True)


def rescale(x: Tensor, v: Tensor | float, method: Tensor | int | str = "bilinear") -> Tensor:
    """Does ``img.crop((v W, v H, W (1 - v), H (1 - v))).resize((W, H), method)``: zooms in on the centre.

    v is the fraction cut from each side (the official CTAugment's Rescale uses
    0.25 * level, so v <= 0.25). Like Pillow's crop, the box is rounded to
    whole pixels with Python's round (half to even). ``method`` indexes
    RESCALE_METHODS, per sample or for all, or names one.

    Each method uses Pillow's own kernel, support and edge renormalisation
    (Lanczos a = 3, bicubic a = -0.5, bilinear, box, Hamming), as one
    resampling matrix per sample and axis; the horizontal pass runs first and
    is clamped to [0, 1] as Pillow's uint8 intermediate is. NEAREST copies
    Pillow's scaling transform, including how it breaks exact ties, so it and
    BOX give Pillow's pixels exactly. Not copied: Pillow rounds the
    intermediate and the final image to uint8 and uses 22-bit fixed-point
    weights, so the other methods differ from it by about one grey level.
    """
    n, _, h, w = x.shape
    if isinstance(method, str):
        method = RESCALE_METHODS.index(method)
    method = torch.as_tensor(method, device=x.device).long().expand(n)
    v = torch.as_tensor(v, dtype=torch.float64, device=x.device).expand(n)

    def bounds(side: int) -> tuple[Tensor, Tensor]:
        lo = (v * side).round().long()
        hi = (side * (1 - v)).round().long()
        return lo, torch.maximum(hi, lo + 1)  # at least one pixel, where Pillow would fail

    (top, bottom), (left, right) = bounds(h), bounds(w)
    wx = _resample_matrix(w, left, right, method).to(x.dtype)
    wy = _resample_matrix(h, top, bottom, method).to(x.dtype)
    out = torch.einsum("nchw,nxw->nchx", x, wx).clamp_(0, 1)
    return torch.einsum("nyh,nchx->ncyx", wy, out).clamp_(0, 1)


def cutout_per_sample(
    x: Tensor, size: Tensor | int, generator: torch.Generator, fill: float = 0.5
) -> Tensor:
    """Like cutout(), with one side length ``size[i]`` (whole pixels) per sample; 0 leaves a sample unchanged.

    The centres are drawn exactly as cutout() draws them, so for a constant
    size > 0 it gives cutout()'s result from the same generator state.
    """
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1), generator=generator, device=x.device)
    cx = torch.randint(0, w, (n, 1), generator=generator, device=x.device)
    size = torch.as_tensor(size, device=x.device).long().expand(n).view(n, 1)
    return _fill_squares(x, cy, cx, size, fill)


def apply_grouped(x: Tensor, op_idx: Tensor, ops_to_run: Iterable[int],
                  transform: Callable[[int, Tensor, Tensor], Tensor], inplace: bool = False) -> Tensor:
    """Per-sample op choices, batched: the samples that drew op k (op_idx == k) are transformed together.

    ``transform(k, xs, idx)`` gets the images xs = x[idx] of the samples idx (ascending) that drew op k
    and returns their new images; samples whose op_idx is not in ``ops_to_run`` (e.g. -1 for "not
    applied", or Identity) are left as they are. ``inplace=True`` writes into x (the caller owns it);
    otherwise x is not modified. The samples are sorted by op once, so the whole layer costs one gather
    and one scatter, and each group is a contiguous slice.
    """
    run = torch.as_tensor(list(ops_to_run), dtype=op_idx.dtype, device=op_idx.device)
    selected = torch.nonzero(torch.isin(op_idx, run)).squeeze(1)
    if selected.numel() == 0:
        return x
    order = selected[torch.argsort(op_idx[selected], stable=True)]  # grouped by op, ascending within a group
    keys, counts = torch.unique_consecutive(op_idx[order], return_counts=True)
    xs = x[order]
    start = 0
    for k, count in zip(keys.tolist(), counts.tolist()):
        xs[start:start + count] = transform(k, xs[start:start + count], order[start:start + count])
        start += count
    out = x if inplace else x.clone()
    return out.index_copy_(0, order, xs)
