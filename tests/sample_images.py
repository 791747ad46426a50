"""Test images shared by the augmentation tests, and the conversions used to compare the ops with Pillow.

- ``smooth_images(shape, seed)``: a seeded random uint8 batch, smooth enough that every op visibly changes it;
- ``photo(size)``: the Grace Hopper photo that ships with matplotlib, centre-cropped and resized (W x H), RGB;
- ``fashion_mnist(n)``: the first n Fashion-MNIST test images (28x28 grey); the test is skipped when the
  data set's file is absent.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """uint8 (N, C, H, W): uniform noise on a grid 4x coarser, bilinearly upsampled."""
    x = torch.rand(shape[0], shape[1], shape[2] // 4 + 1, shape[3] // 4 + 1, generator=generator(seed))
    x = F.interpolate(x, size=shape[2:], mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def photo(size: tuple[int, int]) -> Image.Image:
    img = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    w, h = img.size
    s = min(w, h)
    return img.crop(((w - s) // 2, 0, (w - s) // 2 + s, s)).resize(size, Image.BILINEAR)


def fashion_mnist(n: int = 4) -> list[Image.Image]:
    if not FMNIST.exists():
        pytest.skip(f"{FMNIST} not available")
    with gzip.open(FMNIST, "rb") as f:
        pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    return [Image.fromarray(pixels[i], mode="L") for i in range(n)]


def to_array(imgs: list[Image.Image]) -> np.ndarray:
    """Stacks images into (N, H, W, C) uint8."""
    arrays = [np.asarray(im) for im in imgs]
    return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])


def to_tensor(imgs: list[Image.Image]) -> torch.Tensor:
    """Images as an (N, C, H, W) float tensor in [0, 1] (uint8 / 255)."""
    return torch.from_numpy(to_array(imgs)).permute(0, 3, 1, 2).float() / 255


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """Converts an (N, C, H, W) tensor in [0, 1] to (N, H, W, C) float64 on the 0..255 scale, without rounding."""
    return x.permute(0, 2, 3, 1).double().numpy() * 255
