"""The views of contrastive pretraining (``fixmatch pretrain``), batched on the batch's device.

SimCLR (Chen et al. 2020, appendix A) draws each view as: a random resized crop (area 8%-100% of the image,
aspect ratio 3/4-4/3, resized back to the input size) with a horizontal flip (p = 0.5), then colour
distortion: with p = 0.8 brightness, contrast and saturation jitter (each factor uniform in
[1 - 0.8 s, 1 + 0.8 s], s = 0.5 for CIFAR), and greyscale with p = 0.2. Here:

- the colour distortion runs on colour images only (on grey ones saturation and greyscale do nothing);
  hue jitter is left out (no batched hue op here); the three jitters run in a fixed order rather than
  SimCLR's random one;
- ``randaugment_ops > 0`` adds this project's RandAugment (policies.RandAugment, no Cutout) after the crop,
  as an alternative to colour distortion for images without colour (measured in the pretrain module's notes).

``SimCLRView(...)(x, generator)`` takes uint8 or float [0, 1] images (N, C, H, W) and returns float32 [0, 1]
images of the same shape; every random number comes from ``generator``, so a seed gives the same views.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .policies import RandAugment

__all__ = ["SimCLRView", "random_resized_crop"]


def random_resized_crop(x: Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> Tensor:
    """A crop per image of area fraction uniform in ``scale`` and aspect ratio log-uniform in ``ratio``, resized
    back to (H, W) with bilinear sampling, and mirrored with p = 0.5 when ``flip``. float32 [0, 1] out.

    A crop side that would exceed the image (a large area with an extreme ratio) is cut to the image's side
    (torchvision redraws such crops instead); the crop's position is uniform over the places it fits.
    """
    x = ops.to_float(x)
    n, dev = x.shape[0], x.device
    area = torch.empty(n, device=dev).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    # Sides as fractions of the image's: w * h = area, w / h = ratio (in units of the image's own aspect).
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    # Centres in grid_sample's [-1, 1] coordinates: anywhere the crop stays inside the image.
    cx = (torch.rand(n, device=dev, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, device=dev, generator=generator) * 2 - 1) * (1 - h)
    mirrored = torch.rand(n, device=dev, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool,
                                                                                              device=dev)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = torch.where(mirrored, -w, w)  # a negative x scale reads the crop right to left
    theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp_(0, 1)


@dataclass(frozen=True)
class SimCLRView:
    """One SimCLR view of a batch (module docstring); call it twice for a pair."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # area fraction of the random resized crop (SimCLR's)
    flip: bool = True  # horizontal flip with p = 0.5 (off for digits and text)
    jitter: float = 0.5  # colour-distortion strength s (SimCLR's CIFAR 0.5); colour images only; 0 = off
    jitter_prob: float = 0.8  # SimCLR's probability of the colour jitter
    grey_prob: float = 0.2  # SimCLR's probability of greyscale; colour images only
    randaugment_ops: int = 0  # RandAugment layers after the crop (0 = none, SimCLR's own views)
    randaugment_prob: float = 0.5  # probability of each RandAugment layer's op

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        x = random_resized_crop(x, generator, self.crop_scale, flip=self.flip)
        if x.shape[1] == 3 and (self.jitter > 0 or self.grey_prob > 0):
            x = self._colour(x, generator)
        if self.randaugment_ops > 0:
            x = RandAugment(self.randaugment_ops, self.randaugment_prob, cutout=0.0)(x, generator)
        return x

    def _colour(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Brightness, contrast, saturation jitter (p = jitter_prob), then greyscale (p = grey_prob): a factor of 1
        leaves an image as it is, so the images that drew no jitter get 1 and the whole batch runs each op once."""
        n, dev = x.shape[0], x.device
        jittered = torch.rand(n, device=dev, generator=generator) < self.jitter_prob
        s = 0.8 * self.jitter
        for op in (ops.brightness, ops.contrast, ops.color):
            # Clamped at 0 as torchvision's ColorJitter does: for s > 1.25 a negative factor would invert images.
            factor = torch.empty(n, device=dev).uniform_(max(0.0, 1 - s), 1 + s, generator=generator)
            x = op(x, torch.where(jittered, factor, torch.ones_like(factor)))
        grey = torch.rand(n, device=dev, generator=generator) < self.grey_prob
        return ops.color(x, torch.where(grey, 0.0, 1.0).to(x))
