"""The ``Dataset`` record that every loader returns: uint8 (N, C, H, W) images, labels and class names.

Below every loader (datasets.py, folder.py, cifar.py, paper_datasets.py), so that each can build one without
importing the registry that dispatches to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Dataset"]


@dataclass(eq=False, repr=False)
class Dataset:
    name: str
    train_images: torch.Tensor  # uint8 (N, C, H, W), CPU
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...] = field(default=())  # per-channel mean of the train images on the [0, 1] scale
    std: tuple[float, ...] = field(default=())
    # Images used only as unlabeled data, besides the train images (which FixMatch also uses unlabeled):
    # uint8 (M, C, H, W) or None, e.g. the unlabeled/ folder of a folder data set.
    unlabeled_images: torch.Tensor | None = None
    # Large pools (STL-10's unlabeled split, SVHN's extra) are read-only memory maps (data/array_cache.py).
    unlabeled_labels: torch.Tensor | None = None  # int64 (M,) where the true labels are known (monitoring only)
    folds: list[list[int]] = field(default_factory=list)  # predefined labeled subsets (STL-10's official folds)
    # Train indices that --labels-csv labels (labels_file.py): the split labels exactly these; None = drawn.
    labeled_indices: list[int] | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.dtype != torch.uint8 or x.ndim != 4 or y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: {split} images must be uint8 (N,C,H,W) with int64 (N,) labels")
        u = self.unlabeled_images
        if u is not None and (u.dtype != torch.uint8 or u.shape[1:] != self.train_images.shape[1:]):
            raise ValueError(f"{self.name}: unlabeled images must be uint8 with the train images' (C, H, W)")
        uy = self.unlabeled_labels
        if uy is not None and (u is None or uy.dtype != torch.int64 or uy.shape != (u.shape[0],)):
            raise ValueError(f"{self.name}: unlabeled labels must be int64, one per unlabeled image")
        if not self.mean or not self.std:
            self.mean, self.std = _channel_stats(self.train_images.numpy())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def num_unlabeled_extra(self) -> int:
        """M, the images beyond the training set in the unlabeled pool (pool indices N .. N+M-1)."""
        return 0 if self.unlabeled_images is None else int(self.unlabeled_images.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_labels)}, test={len(self.test_labels)}, "
            f"image=({self.in_channels}, {self.image_size[0]}, {self.image_size[1]}), classes={self.num_classes})"
        )


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of uint8 (N, C, H, W) images on the [0, 1] scale.

    Integer sums (squares fit in uint16) in chunks: exact, fast, and no float
    copy of the whole data set.
    """
    n = images.shape[0] * images.shape[2] * images.shape[3]
    if n == 0:
        return (0.0,) * images.shape[1], (1.0,) * images.shape[1]
    s = images.sum(axis=(0, 2, 3), dtype=np.int64)
    sq = np.zeros(images.shape[1], dtype=np.int64)
    for i in range(0, images.shape[0], 4096):
        chunk = images[i : i + 4096].astype(np.uint16)
        np.multiply(chunk, chunk, out=chunk)
        sq += chunk.sum(axis=(0, 2, 3), dtype=np.int64)
    mean = tuple(int(a) / n / 255 for a in s)
    # n*sum(x^2) - sum(x)^2 in Python ints: exact, never negative.
    std = tuple(((n * int(q) - int(a) ** 2) ** 0.5) / n / 255 for a, q in zip(s, sq))
    return mean, std
