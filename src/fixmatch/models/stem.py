"""Which stem a convolutional backbone gets, from the size of the images it will see.

ImageNet networks shrink the input 4x before their first stage (a 7x7 stride-2 convolution, then a
3x3 stride-2 max-pool): on 32x32 images that leaves 8x8 maps for the first stage and 1x1 for the
last. The usual CIFAR adaptation replaces it with a 3x3 stride-1 convolution and no max-pool.
Images up to ``CIFAR_STEM_MAX_SIDE`` pixels (CIFAR, SVHN, MNIST-like 28x28, 64x64 Tiny-ImageNet)
get the CIFAR stem; larger ones (STL-10's 96x96, ImageNet's 224x224) the ImageNet stem, whose
first-stage maps (24x24 at 96) are then about as large as the CIFAR stem's at 32.
"""
from __future__ import annotations

from torch import nn

ImageSize = int | tuple[int, int]

CIFAR_STEM_MAX_SIDE = 64
STEMS = ("cifar", "imagenet")


def image_side(image_size: ImageSize) -> int:
    """The shorter side of ``image_size`` (an int, or (height, width))."""
    side = min(image_size) if isinstance(image_size, (tuple, list)) else image_size
    if not isinstance(side, int) or side < 1:
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return side


def choose_stem(image_size: ImageSize, stem: str | None = None) -> str:
    """``stem`` if given ('cifar' or 'imagenet'), else the stem suited to ``image_size``."""
    if stem is not None:
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)} (or None to choose from image_size), "
                             f"got {stem!r}")
        return stem
    return "cifar" if image_side(image_size) <= CIFAR_STEM_MAX_SIDE else "imagenet"


def stem_layers(kind: str, in_channels: int, out_channels: int) -> tuple[nn.Conv2d, nn.Module]:
    """The stem's convolution (no bias: a BatchNorm follows) and its max-pool (Identity for the CIFAR stem)."""
    if kind == "imagenet":
        return (nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False),
                nn.MaxPool2d(3, stride=2, padding=1))
    return nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False), nn.Identity()
