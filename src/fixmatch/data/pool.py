"""The unlabeled pool as the training loop sees it: training images, then the data set's separate ones.

Pool index i < N is training image i; N + j is ``Dataset.unlabeled_images[j]`` (STL-10's unlabeled split,
SVHN's extra set), which may be a memory map: batches are gathered row by row, never concatenated.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .datasets import Dataset

__all__ = ["gather_pool", "pool_labels"]


def gather_pool(train_images: Tensor, extra_images: Tensor | None, idx: Tensor, *, pin: bool = False) -> Tensor:
    """Images at pool indices ``idx`` (int64), in the order of ``idx``, in a new CPU tensor.

    The rows are copied with NumPy, one block copy per image: torch's index kernel gathered
    byte by byte and took 25-50 times longer for 448 images of 96x96 (benchmarks/RESULTS.md). With ``pin``
    the rows land directly in page-locked memory, ready for an asynchronous copy to the GPU: one copy per
    batch, and the data set itself (possibly a memory map of several GB) is never pinned.
    """
    if train_images.device.type != "cpu" or (extra_images is not None and extra_images.device.type != "cpu"):
        raise ValueError("gather_pool works on CPU tensors; move batches to the device afterwards")
    n, sel = train_images.shape[0], idx.numpy()
    size = n + (0 if extra_images is None else extra_images.shape[0])
    if sel.size and (sel.min() < 0 or sel.max() >= size):
        raise IndexError(f"pool indices must lie in [0, {size}); got {sel.min()}..{sel.max()}")
    out = torch.empty((sel.size, *train_images.shape[1:]), dtype=train_images.dtype, pin_memory=pin)
    batch = out.numpy()
    if extra_images is None:
        # mode="clip" (indices checked above): NumPy documents that with mode="raise" ``out`` is always
        # buffered, a second copy that made this gather many times slower than plain fancy indexing.
        np.take(train_images.numpy(), sel, axis=0, out=batch, mode="clip")
    else:
        in_extra = sel >= n
        batch[~in_extra] = train_images.numpy()[sel[~in_extra]]
        batch[in_extra] = extra_images.numpy()[sel[in_extra] - n]
    return out


def pool_labels(data: Dataset) -> Tensor:
    """True labels of the whole pool for monitoring pseudo-labels, -1 where unknown (never an argmax)."""
    m = data.num_unlabeled_extra
    if m == 0:
        return data.train_labels
    extra = data.unlabeled_labels if data.unlabeled_labels is not None else torch.full((m,), -1, dtype=torch.int64)
    return torch.cat([data.train_labels, extra])
