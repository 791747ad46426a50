"""The per-image Pillow pipeline that batched augmentation is measured against (bench_augment.py).

It is the straightforward implementation found in public FixMatch code: a data set turns each uint8
image into a PIL image, augments it with Pillow, one image at a time, and converts it to a float
array. The policy is the one train() runs with the defaults:

- weak view: horizontal flip with p = 0.5, then a random crop of the image padded by 12.5% of each
  side with reflection (4 px at 32x32; NumPy's reflect padding, as torchvision does for PIL images);
- strong view: its own weak view, then the paper's RandAugment (2 ops drawn with replacement from
  14, each applied with p = 0.5, integer level 1..9 of 10 mapped onto the appendix ranges, as in
  fixmatch.augment.policies), then Cutout: a grey square of half the side, centre uniform, clipped.

It is kept next to the benchmark so the comparison can be checked and rerun. The tests also use its
geometric ops (tests/test_augment_every_op.py): at every level, the batched RandAugment gives exactly
the pixels of these Pillow calls.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

FILL = 128  # grey, 0.5 on the [0, 1] scale: the batched policy's fill


def _fill(img: Image.Image) -> int | tuple[int, ...]:
    return FILL if img.mode == "L" else (FILL,) * len(img.getbands())


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.NEAREST, fillcolor=_fill(img))


# name -> (function of (image, value), lo, hi): the value for level m is lo + (hi - lo) * m / 10.
OPS = [
    ("Identity", lambda im, v: im, 0, 0),
    ("AutoContrast", lambda im, v: ImageOps.autocontrast(im), 0, 0),
    ("Equalize", lambda im, v: ImageOps.equalize(im), 0, 0),
    ("Rotate", lambda im, v: im.rotate(v, resample=Image.NEAREST, fillcolor=_fill(im)), -30, 30),
    ("Solarize", lambda im, v: ImageOps.solarize(im, v * 256), 0, 1),
    ("Color", lambda im, v: ImageEnhance.Color(im).enhance(v), 0.05, 0.95),
    ("Contrast", lambda im, v: ImageEnhance.Contrast(im).enhance(v), 0.05, 0.95),
    ("Brightness", lambda im, v: ImageEnhance.Brightness(im).enhance(v), 0.05, 0.95),
    ("Sharpness", lambda im, v: ImageEnhance.Sharpness(im).enhance(v), 0.05, 0.95),
    ("ShearX", lambda im, v: _affine(im, (1, v, 0, 0, 1, 0)), -0.3, 0.3),
    ("ShearY", lambda im, v: _affine(im, (1, 0, 0, v, 1, 0)), -0.3, 0.3),
    ("TranslateX", lambda im, v: _affine(im, (1, 0, -v * im.width, 0, 1, 0)), -0.3, 0.3),
    ("TranslateY", lambda im, v: _affine(im, (1, 0, 0, 0, 1, -v * im.height)), -0.3, 0.3),
    ("Posterize", lambda im, v: ImageOps.posterize(im, int(round(v))), 4, 8),
]


def weak(img: Image.Image, rng: random.Random, translate: float = 0.125) -> Image.Image:
    """Flip with p = 0.5, then a random crop of the reflect-padded image (at most translate * side)."""
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    w, h = img.size
    pw, ph = round(translate * w), round(translate * h)
    a = np.asarray(img)
    pad = ((ph, ph), (pw, pw)) + (((0, 0),) if a.ndim == 3 else ())
    padded = np.pad(a, pad, mode="reflect")
    top, left = rng.randint(0, 2 * ph), rng.randint(0, 2 * pw)
    return Image.fromarray(padded[top:top + h, left:left + w])


def randaugment(img: Image.Image, rng: random.Random, num_ops: int = 2, prob: float = 0.5) -> Image.Image:
    for _ in range(num_ops):
        _, fn, lo, hi = rng.choice(OPS)
        level = rng.randint(1, 9)
        if rng.random() < prob:
            img = fn(img, lo + (hi - lo) * level / 10)
    return img


def cutout(img: Image.Image, rng: random.Random, frac: float = 0.5) -> Image.Image:
    """A grey square of side round(frac * min side), centred on a uniformly drawn pixel, clipped."""
    w, h = img.size
    size = round(frac * min(w, h))
    cy, cx = rng.randrange(h), rng.randrange(w)
    top, left = cy - size // 2, cx - size // 2
    img = img.copy()
    ImageDraw.Draw(img).rectangle((left, top, left + size - 1, top + size - 1), fill=_fill(img))
    return img


def strong(img: Image.Image, rng: random.Random) -> Image.Image:
    return cutout(randaugment(weak(img, rng), rng), rng)


def to_array(img: Image.Image) -> np.ndarray:
    """(C, H, W) float32 in [0, 1], as a per-image ToTensor gives it."""
    a = np.asarray(img, dtype=np.float32) / 255
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def weak_and_strong(images: np.ndarray, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """Weak and strong views of uint8 images (N, H, W, C), one image at a time; float32 (N, C, H, W) each."""
    weak_views, strong_views = [], []
    for a in images:
        img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        weak_views.append(to_array(weak(img, rng)))
        strong_views.append(to_array(strong(img, rng)))
    return np.stack(weak_views), np.stack(strong_views)
