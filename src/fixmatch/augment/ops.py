"""Batched image operations for RandAugment-style augmentation.

Every op has the signature ``op(x, v) -> Tensor`` where ``x`` is a float
tensor of shape (N, C, H, W) with values in [0, 1] (C = 1 or 3) on any device
and ``v`` holds one parameter per sample (shape (N,), or a scalar that is
broadcast) in the op's natural unit. Outputs are float tensors clamped to
[0, 1]. There are no Python loops over the batch, so each sample can get its
own parameter in one kernel launch.

Each op reproduces the Pillow function named in its docstring. Pillow works
on uint8 and truncates where these ops stay continuous by default. For a uint8
image ``p``, ``op(p / 255, v) * 255`` then lies within about one grey level of
Pillow's result; the tests give the exact bound for each op. Equalize and
posterize are defined on the 256-level grid, so they quantise (round
``x * 255``). Solarize rounds only to compare with its threshold.

With ``exact=True`` (brightness, color, contrast, sharpness, auto_contrast,
blend, smooth, blur; CTAugment runs them so), an op instead takes the input's
nearest 0..255 levels and reproduces Pillow's uint8 arithmetic bit for bit,
returning whole levels / 255:

- ``Image.blend`` (and so every ImageEnhance op): the factor becomes a C float
  (float32), each level is ``a + v * (b - a)`` in float32, clipped to
  [0, 255] and truncated (Blend.c);
- autocontrast: Python's lookup table ``int(i * scale + offset)`` in double;
- SMOOTH / BLUR (Filter.c): float32 kernel ``k / divisor``, each pixel summed
  from 0.5 in Pillow's order, truncated, the border copied;
- ``convert("L")`` in 16.16 fixed point and Contrast's ``int(mean + 0.5)``.

Each float32 step is one torch op, so it is rounded once, as in Pillow's C
(no fused multiply-add), on any device; divisions that matter divide a tensor
by a tensor (CUDA multiplies by the reciprocal of a scalar divisor).

Geometric ops use Pillow's ``Image.transform(size, AFFINE, (a, b, c, d, e, f))``
convention: output pixel ``(x, y)`` (pixel-corner coordinates, origin at the
top-left, pixel centres at ``i + 0.5``) samples the input at
``(a x + b y + c, d x + e y + f)``. Pixels that map outside the image are set
to ``fill``. Sampling is nearest-neighbour by default, as in Pillow, and then
reads exactly the pixels Pillow reads, at every parameter: the coefficients
are computed in float64 as Pillow's Python code computes them (Image.rotate's
matrix step by step, with its rounding of cos and sin to 15 decimals), and
libImaging/Geometry.c's arithmetic is reproduced (_pil_nearest_index): a
translation sums its positions ``c + a / 2 + k a`` in double and truncates;
any other transform converts its coefficients to 16.16 fixed point,
``floor(v * 65536 + 0.5)``, sums integers and shifts right by 16. Sample
points exactly on a pixel edge (e.g. shear 0.12: ``0.56 + 12 * 0.12 = 2``,
which Pillow's integers put just below 2) therefore go where Pillow sends
them, and the integer arithmetic gives the same pixels on a GPU (torch's cos
and sin may differ from the C library's in the last bit, but no rotation a
policy draws is within a few ulps of a 16.16 rounding boundary). Bilinear and
bicubic sampling use grid_sample and do not reproduce Pillow's filters.
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


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor | float, exact: bool = False) -> Tensor:
    """Computes PIL ImageEnhance's ``Image.blend(degenerate, x, factor)``: 0 gives the degenerate image, 1 gives x.

    exact=True uses Pillow's arithmetic (_pil_blend).
    """
    if exact:
        return _pil_blend(degenerate, x, factor)
    return (degenerate + _param(factor, x) * (x - degenerate)).clamp_(0, 1)


def _pil_blend(x: Tensor, y: Tensor, v: Tensor | float) -> Tensor:
    """Pillow's ``Image.blend(x, y, v)`` exactly, on the nearest 0..255 levels of x and y; whole levels / 255."""
    return _pil_blend_levels(_levels(x).float(), _levels(y).float(), v).to(x.dtype) / 255


def _pil_blend_levels(a: Tensor, b: Tensor, v: Tensor | float) -> Tensor:
    """libImaging/Blend.c on float32 levels a and b (either may broadcast), one factor per sample; float32 levels.

    Pillow passes v to C as a float (float32), computes ``a + v * (b - a)`` in float32 (one rounding
    for the product, one for the sum; no fused multiply-add) and casts to UINT8, i.e. clips to
    [0, 255] and truncates. The same float32 operations, one torch op each, give the same bits on
    every device.
    """
    n = max(a.shape[0], b.shape[0])
    alpha = torch.as_tensor(v, dtype=torch.float64, device=b.device).to(torch.float32).expand(n).view(-1, 1, 1, 1)
    return (b - a).mul_(alpha).add_(a).clamp_(0, 255).floor_()


# ----------------------------------------------------------------------------- point / colour ops


def identity(x: Tensor, v: Tensor | None = None) -> Tensor:
    """Returns x unchanged; v is ignored."""
    return x


def auto_contrast(x: Tensor, v: Tensor | None = None, exact: bool = False) -> Tensor:
    """Does ``PIL.ImageOps.autocontrast(img, cutoff=0)``.

    Each channel is stretched linearly so that its min becomes 0 and its max
    becomes 1. A constant channel is left unchanged. PIL truncates the
    stretched value to an integer; this op does not, unless exact=True: then
    it builds Pillow's lookup table on the nearest 0..255 levels, in double as
    Python does, ``lut[i] = int(i * scale + offset)`` with ``scale = 255.0 /
    (hi - lo)`` and ``offset = -lo * scale``, clipped to 0..255.
    """
    if exact:
        n, c, h, w = x.shape
        q = _quantise(x).view(n, c, h * w)
        lo, hi = q.amin(2, keepdim=True).double(), q.amax(2, keepdim=True).double()  # (N, C, 1)
        # 255.0 / (hi - lo) as a true division, as Python's (torch's scalar / tensor multiplies by a reciprocal);
        # inf where hi == lo, where the channel keeps its levels.
        scale = torch.full_like(hi, 255.0) / (hi - lo)
        levels = torch.arange(256, dtype=torch.float64, device=x.device)
        lut = torch.where(hi > lo, (levels * scale + -lo * scale).trunc_().clamp_(0, 255), levels)  # (N, C, 256)
        return lut.to(x.dtype).gather(2, q).view(n, c, h, w) / 255  # whole levels: exact in any float dtype
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


def brightness(x: Tensor, v: Tensor, exact: bool = False) -> Tensor:
    """Does ``PIL.ImageEnhance.Brightness(img).enhance(v)``, a blend with black.

    exact=True: with Pillow's uint8 arithmetic (see _pil_blend), as for the other enhance ops.
    """
    if exact:
        black = torch.zeros(1, 1, 1, 1, device=x.device)
        return _pil_blend_levels(black, _levels(x).float(), v).to(x.dtype) / 255
    return _blend(torch.zeros_like(x), x, v)


def color(x: Tensor, v: Tensor, exact: bool = False) -> Tensor:
    """Does ``PIL.ImageEnhance.Color(img).enhance(v)``, a blend with the greyscale image.

    It is the identity when C = 1. exact=True blends with Pillow's rounded
    ``convert("L")`` (_grey_levels) using Pillow's arithmetic (_pil_blend).
    """
    if x.shape[1] == 1:
        return _levels(x) / 255 if exact else x
    if exact:
        return _pil_blend_levels(_grey_levels(x).float(), _levels(x).float(), v).to(x.dtype) / 255
    return _blend(_grey(x).expand_as(x), x, v)


def contrast(x: Tensor, v: Tensor, exact: bool = False) -> Tensor:
    """Does ``PIL.ImageEnhance.Contrast(img).enhance(v)``, a blend with the image's mean grey level.

    The mean is PIL's: ``int(mean + 0.5)`` of the whole-level image ``convert("L")`` (``_grey_levels``),
    so the degenerate image is the same 0..255 level as Pillow's. exact=True: with Pillow's blend arithmetic.
    """
    levels = _grey_levels(x)
    count = levels[0].numel()
    total = levels.sum(dim=(1, 2, 3), keepdim=True)  # int64: exact
    mean = torch.div(2 * total + count, 2 * count, rounding_mode="floor")  # floor(total / count + 0.5)
    if exact:
        return _pil_blend_levels(mean.float(), _levels(x).float(), v).to(x.dtype) / 255
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


def sharpness(x: Tensor, v: Tensor, exact: bool = False) -> Tensor:
    """Does ``PIL.ImageEnhance.Sharpness(img).enhance(v)``, a blend with ``img.filter(ImageFilter.SMOOTH)``.

    SMOOTH is the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13. Like
    PIL, it leaves the 1-pixel border as it was. exact=True: Pillow's filter
    and blend arithmetic (_pil_filter_levels, _pil_blend).
    """
    if exact:
        q = _levels(x).float()
        return _pil_blend_levels(_pil_filter_levels(q, *_SMOOTH), q, v).to(x.dtype) / 255
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

_FIXED_ONE = 65536.0  # affine_fixed's 16.16 fixed point: 1.0 is 2 ** 16
_FIXED_LIMIT = 32768.0  # affine_fixed is used only where every corner maps inside +-2 ** 15 (check_fixed)


def _fix(v: Tensor) -> Tensor:
    """Pillow's ``FIX(v) = FLOOR(v * 65536.0 + 0.5)``, evaluated in double as Pillow does, as int64."""
    return (v * _FIXED_ONE + 0.5).floor_().long()


def _fits_fixed_point(a: Tensor, h: int, w: int) -> Tensor:
    """Pillow's check_fixed at the four corners (0, 0), (W, H), (0, H), (W, 0), per sample (N,)."""
    cx = torch.tensor([0.0, w, 0.0, w], dtype=torch.float64, device=a.device)
    cy = torch.tensor([0.0, h, h, 0.0], dtype=torch.float64, device=a.device)
    m = a.view(-1, 2, 3, 1)  # (N, axis, coefficient, corner)
    return ((m[:, :, 0] * cx + m[:, :, 1] * cy) + m[:, :, 2]).abs().lt(_FIXED_LIMIT).flatten(1).all(1)


def _closed_form_sum(start: Tensor, step: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Gives ``start + k * step`` for k = 0..n-1 (a new last axis) and, per row, whether it equals Pillow's running sum.

    Pillow adds ``step`` n - 1 times in double, rounding after each addition. Where every term of the
    closed form plus step gives the next term exactly, the closed form obeys that recurrence and so
    equals the running sum term by term (always the case for the policies' coefficients).
    """
    pos = start[..., None] + torch.arange(n, dtype=start.dtype, device=start.device) * step[..., None]
    exact = ((pos[..., :-1] + step[..., None]) == pos[..., 1:]).all(-1)
    return pos, exact


def _running_sum(start: Tensor, step: Tensor, n: int) -> Tensor:
    """Pillow's running sum start, start + step, ... (a new last axis of n terms), one double rounding per addition."""
    pos = start.new_empty(*start.shape, n)
    pos[..., 0] = start
    for k in range(1, n):  # a loop over pixels of one row, for the rare rows _closed_form_sum cannot give
        pos[..., k] = pos[..., k - 1] + step
    return pos


def _coord(pos: Tensor, size: int) -> Tensor:
    """Pillow's COORD (truncation, -1 below 0) as an int64 pixel index, with -1 for every position outside [0, size)."""
    return torch.where((pos >= 0) & (pos < size), pos, -1).floor_().long()  # NaN is outside too


def _sources_sequential(a: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """The source column and row (n, H, W), -1 outside, of rare samples that need Pillow's double sums in order.

    ImagingScaleAffine (no rotation or shear) accumulates the column and row positions separately;
    ImagingTransformAffine's fallback (a corner outside check_fixed's range) accumulates each row's
    start, then along the row.
    """
    a0, a1, a2, a3, a4, a5 = a.unbind(1)
    scale = ((a1 == 0) & (a3 == 0)).view(-1, 1, 1)
    sx = _running_sum(a2 + a0 * 0.5, a0, w)[:, None, :].expand(-1, h, -1)
    sy = _running_sum(a5 + a4 * 0.5, a4, h)[:, :, None].expand(-1, -1, w)
    dx = _running_sum(_running_sum(a2 + a1 * 0.5 + a0 * 0.5, a1, h), a0[:, None], w)
    dy = _running_sum(_running_sum(a5 + a4 * 0.5 + a3 * 0.5, a4, h), a3[:, None], w)
    return _coord(torch.where(scale, sx, dx), w), _coord(torch.where(scale, sy, dy), h)


def _pil_nearest_index(coeffs: Tensor, h: int, w: int) -> Tensor:
    """Gives the pixel that Pillow's NEAREST AFFINE transform reads for each output pixel (N, H, W), int64.

    The index is into the input padded with one pixel of fill on every side, flattened ((H + 2) x
    (W + 2) per sample): a source outside the image reads the padding, as Pillow leaves the fill there.
    This is libImaging/Geometry.c's ImagingTransformAffine, one sample per row of coeffs (N, 6), with
    each of its three paths:

    - a1 == a3 == 0 (translation, or no transform): ImagingScaleAffine. The column position starts at
      ``a2 + a0 * 0.5`` and adds a0 per column in double, the row position likewise with a5 and a4, and
      COORD truncates them;
    - otherwise, when the corners map inside +-32768 (any image a policy sees): affine_fixed. Each
      coefficient becomes a 16.16 fixed-point integer ``FIX(v) = floor(v * 65536 + 0.5)`` (the offsets
      with the half-pixel terms folded in first: ``FIX(a2 + a0 * 0.5 + a1 * 0.5)``), the integers are
      summed exactly, and the source index is the sum shifted right by 16 (a floor). Integer
      arithmetic gives the same result on every device;
    - otherwise the double-precision version of the same sums, accumulated in order.

    A sample point exactly on a pixel edge therefore goes where Pillow sends it, including the 16.16
    rounding that moves some edge points down by one pixel (e.g. shear 0.12: ``0.56 + 12 * 0.12 = 2``,
    which Pillow's integers put just below 2).

    Both axes are written as ``(row term + column term) >> 16``, the scale path's indices shifted up
    by 16 bits, so every sample takes the same few full-size int32 passes; the rare samples whose
    double sums the closed form cannot give are redone one pixel at a time.
    """
    a = coeffs.to(torch.float64)
    a0, a1, a2, a3, a4, a5 = a.unbind(1)
    n, dev = a.shape[0], a.device
    scale = (a1 == 0) & (a3 == 0)
    fixed = ~scale & _fits_fixed_point(a, h, w)
    # affine_fixed's integers (zeros for the other samples), as (N, 1, 1).
    folded = torch.stack([a0, a1, a2 + a0 * 0.5 + a1 * 0.5, a3, a4, a5 + a3 * 0.5 + a4 * 0.5], 1)
    f0, f1, f2, f3, f4, f5 = _fix(torch.where(fixed[:, None], folded, 0)).view(n, 6, 1, 1).unbind(1)
    # ImagingScaleAffine: a closed form, checked against the running sums.
    sx, x_exact = _closed_form_sum(a2 + a0 * 0.5, a0, w)
    sy, y_exact = _closed_form_sum(a5 + a4 * 0.5, a4, h)
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    one, zero = 1 << 16, torch.zeros((), dtype=torch.int64, device=dev)  # one pixel: the padding's offset
    # (row term, column term) of each axis on each path.
    x_fixed, y_fixed = (f2 + rows * f1 + one, cols * f0), (f5 + rows * f4 + one, cols * f3)
    x_scale = (zero, (_coord(sx, w) + 1).view(n, 1, w) << 16)
    y_scale = ((_coord(sy, h) + 1).view(n, h, 1) << 16, zero)
    is_scale = scale.view(n, 1, 1)
    x_src = _shift_sum(is_scale, x_scale, x_fixed, w, h)
    y_src = _shift_sum(is_scale, y_scale, y_fixed, h, w)
    index = (y_src * (w + 2)).add_(x_src).long()
    slow = (scale & ~(x_exact & y_exact)) | (~scale & ~fixed)
    if bool(slow.any()):  # one host sync rules out the rare samples summed one pixel at a time
        i = slow.nonzero().squeeze(1)
        xs, ys = _sources_sequential(a[i], h, w)
        index[i] = (ys + 1) * (w + 2) + (xs + 1)
    return index


def _shift_sum(pick: Tensor, first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor], size: int,
               other: int) -> Tensor:
    """``(row term + column term) >> 16``, from ``first`` where pick else ``second``, clamped to [0, size + 1].

    int32 unless the image is huge: a term may wrap, but the sum of an in-image source fits, and a
    wrapped sum is far outside and clamps to the padding like any other outside source.
    """
    small = torch.int32 if max(size, other) < 1 << 14 else torch.int64
    row = torch.where(pick, first[0], second[0]).to(small)
    col = torch.where(pick, first[1], second[1]).to(small)
    return ((row + col) >> 16).clamp_(0, size + 1)


def _pil_affine(x: Tensor, coeffs: Tensor, fill: float, mode: str) -> Tensor:
    """Does ``Image.transform(size, AFFINE, coeffs[i])`` for each sample i.

    coeffs (N, 6) = (a, b, c, d, e, f) in PIL's convention: output pixel (x, y) samples the input at
    (a x + b y + c, d x + e y + f), in pixel coordinates with the origin at the image corner.
    Nearest sampling reads exactly the pixels Pillow reads (_pil_nearest_index) with one gather.
    Other modes use grid_sample: with align_corners=False, normalised coordinates map linearly onto
    the same corner-based pixel coordinates, so the PIL matrix M becomes ``theta = T M T^-1``; these
    do not reproduce Pillow's filters.
    """
    n, c, h, w = x.shape
    if mode == "nearest":
        index = _pil_nearest_index(coeffs, h, w).view(n, 1, h * w).expand(n, c, h * w)
        padded = F.pad(x, (1, 1, 1, 1), value=min(max(fill, 0.0), 1.0))
        return padded.view(n, c, -1).gather(2, index).view(n, c, h, w)
    m = torch.zeros(n, 3, 3, dtype=x.dtype, device=x.device)
    m[:, :2, :] = coeffs.to(x.dtype).view(n, 2, 3)
    m[:, 2, 2] = 1
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
    Pass the coefficients in float64 (as the ``*_coeffs`` functions give them): Pillow computes them in
    double, and float32 rounding of a rotation's offsets can move a pixel.
    """
    return _pil_affine(x, coeffs, fill, mode)


def _param_f64(v: Tensor | float, x: Tensor) -> Tensor:
    """Gives each sample's parameter (N,) in float64, in which Pillow computes the affine coefficients."""
    return torch.as_tensor(v, dtype=torch.float64, device=x.device).expand(x.shape[0])


def _coeffs(v: Tensor, *rows: Tensor | float) -> Tensor:
    """Stacks six scalars or (N,) tensors into an (N, 6) float64 coefficient tensor (N and device of v)."""
    n = v.shape[0]
    return torch.stack([torch.as_tensor(r, dtype=torch.float64, device=v.device).expand(n) for r in rows], dim=1)


_SPLIT = 134217729.0  # 2 ** 27 + 1: Veltkamp's splitting of a double into two 26-bit halves
_E15 = 1e15
_E15_HI = _SPLIT * _E15 - (_SPLIT * _E15 - _E15)
_E15_LO = _E15 - _E15_HI


def _round15(t: Tensor) -> Tensor:
    """Python's ``round(t, 15)`` (|t| <= 1), as Image.rotate applies it to cos and sin: exact, not just close.

    Python rounds the exact decimal value half to even, then converts back. Here p = t * 1e15 is
    rounded by the multiplication; its exact error e (Dekker's two-product, no fused multiply-add)
    decides the cases where p and t * 10 ** 15 round to different integers. K / 1e15, both exact
    doubles, is then correctly rounded like Python's conversion of the decimal string.
    """
    p = t * _E15
    c = t * _SPLIT
    hi = c - (c - t)
    lo = t - hi
    e = (((hi * _E15_HI - p) + hi * _E15_LO) + lo * _E15_HI) + lo * _E15_LO  # t * 1e15 - p, exactly
    k = p.round()  # half to even, right unless e moves t * 10 ** 15 across a half
    d = p - k  # exact: |d| <= 0.5
    k = torch.where((d - 0.5) > -e, k + 1, torch.where((d + 0.5) < -e, k - 1, k))
    return k / torch.full_like(k, _E15)  # tensor / tensor: CUDA multiplies by the reciprocal of a scalar divisor


def rotate_coeffs(v: Tensor, h: int, w: int) -> Tensor:
    """Image.rotate's inverse map for a rotation by v (N,) degrees counter-clockwise about (W/2, H/2), float64.

    Each step is Image.rotate's, in double: ``angle = -radians(v % 360)``, cos and sin rounded to 15
    decimals, and the offsets ``c = cos * -cx + sin * -cy + cx``, ``f = -sin * -cx + cos * -cy + cy``.
    This gives Pillow's matrix bit for bit wherever torch's cos and sin agree with the C library's;
    where they differ in the last bit, the rounding to 15 decimals and to 16.16 fixed point absorbs it
    for every angle the policies draw (tested), and for any other angle short of a 1e-10 coincidence.
    """
    v = v.to(torch.float64)
    angle = torch.fmod(v, 360.0)
    angle = torch.where(angle < 0, angle + 360.0, angle)  # Python's v % 360.0
    theta = -(angle * (math.pi / 180))
    cos, sin = _round15(torch.stack([theta.cos(), theta.sin()])).unbind(0)
    cx, cy = w / 2, h / 2
    return _coeffs(v, cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)


def shear_x_coeffs(v: Tensor, h: int, w: int) -> Tensor:
    return _coeffs(v, 1, v, 0, 0, 1, 0)


def shear_y_coeffs(v: Tensor, h: int, w: int) -> Tensor:
    return _coeffs(v, 1, 0, 0, v, 1, 0)


def translate_x_coeffs(v: Tensor, h: int, w: int) -> Tensor:
    return _coeffs(v, 1, 0, -v.to(torch.float64) * w, 0, 1, 0)


def translate_y_coeffs(v: Tensor, h: int, w: int) -> Tensor:
    return _coeffs(v, 1, 0, 0, 0, 1, -v.to(torch.float64) * h)


def rotate(x: Tensor, v: Tensor, fill: float = 0.5, mode: str = "nearest") -> Tensor:
    """Does ``img.rotate(v, resample=NEAREST, fillcolor=fill)``: v degrees counter-clockwise about the image centre.

    The centre is (W/2, H/2) in corner coordinates, as in PIL. Pillow's shortcuts (no transform at
    0 degrees, transposes at 180 and, for square images, at 90 and 270) give the same pixels as its
    affine transform, which this op reproduces.
    """
    return _pil_affine(x, rotate_coeffs(_param_f64(v, x), *x.shape[2:]), fill, mode)


def shear_x(x: Tensor, v: Tensor, fill: float = 0.5, mode: str = "nearest") -> Tensor:
    """Does ``img.transform(img.size, AFFINE, (1, v, 0, 0, 1, 0), fillcolor=fill)``.

    Output (x, y) samples input (x + v y, y), so the top row stays fixed.
    """
    return _pil_affine(x, shear_x_coeffs(_param_f64(v, x), *x.shape[2:]), fill, mode)


def shear_y(x: Tensor, v: Tensor, fill: float = 0.5, mode: str = "nearest") -> Tensor:
    """Does ``img.transform(img.size, AFFINE, (1, 0, 0, v, 1, 0), fillcolor=fill)``.

    Output (x, y) samples input (x, v x + y), so the left column stays fixed.
    """
    return _pil_affine(x, shear_y_coeffs(_param_f64(v, x), *x.shape[2:]), fill, mode)


def translate_x(x: Tensor, v: Tensor, fill: float = 0.5, mode: str = "nearest") -> Tensor:
    """Does ``img.transform(img.size, AFFINE, (1, 0, -v * W, 0, 1, 0), fillcolor=fill)``.

    The content moves right by v * W pixels (v > 0 means right).
    """
    return _pil_affine(x, translate_x_coeffs(_param_f64(v, x), *x.shape[2:]), fill, mode)


def translate_y(x: Tensor, v: Tensor, fill: float = 0.5, mode: str = "nearest") -> Tensor:
    """Does ``img.transform(img.size, AFFINE, (1, 0, 0, 0, 1, -v * H), fillcolor=fill)``.

    The content moves down by v * H pixels (v > 0 means down).
    """
    return _pil_affine(x, translate_y_coeffs(_param_f64(v, x), *x.shape[2:]), fill, mode)


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


def blend(x: Tensor, y: Tensor, v: Tensor | float, exact: bool = False) -> Tensor:
    """Does ``Image.blend(x, y, v)``: ``x + v * (y - x)``, so v = 0 gives x and v = 1 gives y.

    CTAugment uses it to apply AutoContrast, Equalize, Invert, Smooth and Blur
    with a strength v in [0, 1]. Pillow truncates the result; this op does
    not, unless exact=True: then it is Pillow's arithmetic on the nearest
    0..255 levels of x and y (v as float32, float32 sums, truncation).
    """
    return _blend(x, y, v, exact)


def invert(x: Tensor, v: Tensor | None = None) -> Tensor:
    """Does ``PIL.ImageOps.invert``: ``1 - x`` (255 - p on the 0..255 scale); v is ignored."""
    return 1 - x


def _pil_filter(x: Tensor, kernel: tuple[tuple[int, ...], ...], divisor: int) -> Tensor:
    """Does ``img.filter(kernel)`` for a symmetric k x k Pillow kernel, without Pillow's rounding.

    Like Pillow's Filter.c, the outer k // 2 rows and columns keep their
    values, and an image smaller than the kernel is returned unchanged.
    _pil_filter_levels has Pillow's arithmetic.
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


def _pil_filter_levels(q: Tensor, kernel: tuple[tuple[int, ...], ...], divisor: int) -> Tensor:
    """Pillow's Filter.c (ImagingFilter3x3 / 5x5) on whole levels q (float32), exactly.

    The kernel is Pillow's float32 ``k / divisor``. Each output pixel starts at 0.5 (the offset plus
    Pillow's rounding term) and adds the kernel rows from the bottom image row (y + k // 2) up, each
    row summed left to right; every product and sum is one float32 rounding, as in Pillow's C, and
    the result is clipped to [0, 255] and truncated. The outer k // 2 rows and columns keep their
    levels; an image smaller than the kernel is returned unchanged.
    """
    h, w = q.shape[2:]
    k = len(kernel)
    r = k // 2
    if h < k or w < k:
        return q
    # float32 k / divisor as a true division on the CPU (CUDA would multiply by the divisor's reciprocal)
    weights = (torch.tensor(kernel, dtype=torch.float32) / torch.tensor(float(divisor))).to(q.device)
    total = torch.full_like(q[:, :, r:h - r, r:w - r], 0.5)
    for i in range(k):  # kernel row i weights image row y + r - i
        row = None
        for j in range(k):  # column j weights image column x + j - r; zero weights add exactly nothing
            if kernel[i][j] == 0:
                continue
            term = q[:, :, 2 * r - i:h - i, j:w - 2 * r + j] * weights[i, j]
            row = term if row is None else row + term
        if row is not None:
            total = total + row
    out = q.clone()
    out[:, :, r:h - r, r:w - r] = total.clamp_(0, 255).floor_()
    return out


_SMOOTH = (((1, 1, 1), (1, 5, 1), (1, 1, 1)), 13)  # ImageFilter.SMOOTH
_BLUR = (((1, 1, 1, 1, 1), (1, 0, 0, 0, 1), (1, 0, 0, 0, 1), (1, 0, 0, 0, 1), (1, 1, 1, 1, 1)), 16)  # ImageFilter.BLUR


def smooth(x: Tensor, v: Tensor | float, exact: bool = False) -> Tensor:
    """Does ``Image.blend(img, img.filter(ImageFilter.SMOOTH), v)``, CTAugment's Smooth.

    SMOOTH is the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 with the
    1-pixel border left as it was (the degenerate image of sharpness()). v = 0
    gives x and v = 1 the smoothed image. exact=True: Pillow's filter and blend arithmetic.
    """
    if exact:
        q = _levels(x).float()
        return _pil_blend_levels(q, _pil_filter_levels(q, *_SMOOTH), v).to(x.dtype) / 255
    return blend(x, _pil_filter(x, *_SMOOTH), v)


def blur(x: Tensor, v: Tensor | float, exact: bool = False) -> Tensor:
    """Does ``Image.blend(img, img.filter(ImageFilter.BLUR), v)``, the official CTAugment's Blur.

    BLUR is Pillow's 5x5 kernel: ones on the outer ring, zeros inside, divided
    by 16. The 2-pixel border is left as it was. exact=True: Pillow's filter and blend arithmetic.
    """
    if exact:
        q = _levels(x).float()
        return _pil_blend_levels(q, _pil_filter_levels(q, *_BLUR), v).to(x.dtype) / 255
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
