"""Pictures of what the augmentation does: original, weak and strong views of a few images.

``augment_views`` computes the views the way train() does (the weak view; the strong view is its own
weak view followed by the strong policy) and captions each strong view with the ops and magnitudes
its policy drew for it. ``grid_figure`` lays them out with matplotlib, one image per row;
``save_grid`` writes it to a PNG (``fixmatch show-augment``: studies/show_augment.py) and ``grid_image``
renders it to an RGB array for TensorBoard. matplotlib is imported only here and only when a figure is
made (the ``report`` extra: ``pip install 'fixmatch[report]'``).
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fixmatch.core.atomic import atomic_path

from .ops import to_float
from .randaugment_variants import StrongAugment
from .views import WeakAugment

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["AugmentViews", "augment_views", "grid_figure", "grid_image", "save_grid", "pick_images", "have_matplotlib",
           "AugmentGrids"]


@dataclass
class AugmentViews:
    """Float32 (N, C, H, W) images in [0, 1] on the CPU, and one caption per strong view."""

    original: Tensor
    weak: Tensor
    strong: Tensor
    captions: list[str]


def augment_views(images: Tensor, weak: WeakAugment, strong: StrongAugment, seed: int) -> AugmentViews:
    """Weak and strong views of uint8 or float images (N, C, H, W), drawn from their own generator.

    The generator lives on the images' device and is seeded with ``seed``; nothing else's random
    state is touched, so a training run that calls this gets the same results as one that does not.
    """
    gen = torch.Generator(device=images.device).manual_seed(seed)
    weak_view = weak(images, gen)
    base = weak(images, gen)  # the strong view starts from its own weak view, as in train()
    choices = strong.sample(images.shape[0], gen, images.device)
    strong_view = strong.apply(base, choices, gen)
    captions = [strong.describe(choices, i) for i in range(images.shape[0])]
    return AugmentViews(to_float(images).cpu(), weak_view.cpu(), strong_view.cpu(), captions)


def pick_images(num_available: int, num_images: int, seed: int) -> Tensor:
    """Indices of ``num_images`` distinct images drawn with their own seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(num_available, generator=gen)[:num_images]


def _to_hwc(x: Tensor) -> np.ndarray:
    a = x.clamp(0, 1).permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def grid_figure(views: AugmentViews, labels: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """One row per image: original (with its label), weak view, strong view captioned with its ops."""
    from matplotlib.figure import Figure  # without pyplot: no global state, no display needed

    n = views.original.shape[0]
    fig = Figure(figsize=(7.5, 2.1 * n + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    grey = views.original.shape[1] == 1
    for i in range(n):
        panels = (views.original[i], views.weak[i], views.strong[i])
        for j, (ax, img) in enumerate(zip(axes[i], panels)):
            ax.imshow(_to_hwc(img), cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(("original", "weak", "strong (own weak view + policy)")[j], fontsize=9)
        if labels is not None:
            axes[i, 0].set_xlabel(labels[i], fontsize=8)
        axes[i, 2].set_xlabel("\n".join(textwrap.wrap(views.captions[i], 34)), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_grid(fig: Figure, path: str | Path) -> None:
    """Writes the figure as a PNG atomically (atomic.py): the file is whole or absent."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def grid_image(fig: Figure, dpi: int = 80) -> np.ndarray:
    """Renders the figure to an RGB uint8 array (H, W, 3), e.g. for SummaryWriter.add_image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


GRID_EVERY = 5  # evaluations between augmentation grids in TensorBoard (the first evaluation always gets one)
GRID_IMAGES = 6  # images in the training-time grid


class AugmentGrids:
    """The augmentation grid that train() logs to TensorBoard at the first and every GRID_EVERY-th evaluation.

    The images are a fixed, seeded choice of training images, so successive grids show how the views
    change (CTAugment's learned magnitudes, for one). Each grid is drawn with its own generator
    seeded from (seed, step): the training run's random streams and results are not affected.
    Without matplotlib no grid is drawn.
    """

    def __init__(self, train_images: Tensor, weak: WeakAugment, strong: StrongAugment, seed: int,
                 eval_every: int, device: torch.device, title: str = "") -> None:
        self.every = GRID_EVERY if have_matplotlib() else 0
        self.images = train_images[pick_images(train_images.shape[0], GRID_IMAGES, seed)]
        self.weak, self.strong, self.seed = weak, strong, seed
        self.eval_every, self.device, self.title = eval_every, device, title

    def due(self, step: int) -> bool:
        """Whether the evaluation at this step gets a grid.

        Evaluations are numbered from 1 by ceil(step / eval_every).
        """
        k = -(-step // self.eval_every)
        return self.every > 0 and (k == 1 or k % self.every == 0)

    def render(self, step: int) -> np.ndarray:
        """The grid at this step as an RGB uint8 array (H, W, 3)."""
        views = augment_views(self.images.to(self.device), self.weak, self.strong, self.seed * 2**32 + step + 1)
        return grid_image(grid_figure(views, title=f"{self.title}step {step}"))
