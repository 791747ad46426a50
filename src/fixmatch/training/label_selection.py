"""Which training images get labels: ``--label-selection random|file|representative|unrepresentative``.

``random`` is the paper's protocol (``split.make_split``: ``num_labels / C`` images per class, uniformly,
with the run's seed). ``file`` reuses a saved split (``--split-file``).

``representative`` and ``unrepresentative`` are a **study tool**: they read the true labels of the whole
training set to pick, per class, the ``num_labels / C`` images nearest to (or farthest from) the class
centroid in a feature space, to measure how much the choice of labeled images matters. A real
semi-supervised user does not have those labels. The feature space is a trained model's pooled features
(``forward_features`` of the EMA model in ``--selection-checkpoint``) or, without a checkpoint, a fixed
random projection of the standardised pixels (seed ``PROJECTION_SEED``, ``PROJECTION_DIM`` dimensions;
Johnson-Lindenstrauss: distances are preserved approximately). Both are deterministic, so every seed of a
study gets the same labeled images and only the training randomness varies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fixmatch.config import ConfigError, check_label_selection
from fixmatch.core.preprocess import channel_stats, predict_logits
from fixmatch.data.split import Split, SplitError, load_split, make_split
from fixmatch.runs.model_spec import load_model_checkpoint

__all__ = ["select_labels", "centroid_selection", "pixel_features", "checkpoint_features"]

PROJECTION_SEED = 0
PROJECTION_DIM = 128
_CHUNK = 2048  # images per block when computing features: bounds the float copy in memory


def select_labels(strategy: str, labels: torch.Tensor, num_labels: int, num_classes: int, seed: int, *,
                  images: torch.Tensor | None = None, split_file: str | None = None,
                  checkpoint: str | None = None, digest: str | None = None) -> Split:
    """The labeled/unlabeled split for ``strategy`` (``images``: uint8 (N, C, H, W) train images; ``digest``: their
    ``train_digest``, which a split file must match where it records one). A ``checkpoint`` records the
    statistics its network was trained with (``checkpoint_features``)."""
    check_label_selection(strategy, split_file)
    if split_file:  # label_selection file, or random replaced by the file
        return load_split(split_file, num_train=labels.numel(), digest=digest)
    if strategy == "random":
        return make_split(labels, num_labels, num_classes, seed)
    if strategy not in ("representative", "unrepresentative"):
        raise ConfigError(f"unknown label_selection {strategy!r}; use random, file, representative or unrepresentative")
    if images is None:
        raise ValueError("representative selection needs the training images")
    make_split(labels, num_labels, num_classes, seed)  # the same checks (divisibility, enough per class)
    if checkpoint:
        features = checkpoint_features(checkpoint, images)
    else:
        features = pixel_features(images)
    labeled = centroid_selection(features, labels, num_labels // num_classes, nearest=strategy == "representative")
    return Split(labeled=labeled, unlabeled=list(range(labels.numel())), seed=seed, num_labels=num_labels)


def centroid_selection(features: torch.Tensor, labels: torch.Tensor, per_class: int, nearest: bool) -> list[int]:
    """Per class, the ``per_class`` indices whose features are nearest to / farthest from the class mean.

    Ties are broken by the lower index, so the result is fully determined by the features.
    """
    feats = features.double()
    y = labels.cpu()
    chosen: list[int] = []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        f = feats[members]
        dist = (f - f.mean(0, keepdim=True)).pow(2).sum(1)
        # A stable sort on the (signed) distance keeps index order among equal distances.
        order = torch.sort(dist if nearest else -dist, stable=True).indices
        chosen += members[order[:per_class]].tolist()
    return sorted(chosen)


def pixel_features(images: torch.Tensor, dim: int = PROJECTION_DIM, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """A fixed Gaussian random projection of the per-pixel-standardised images: (N, dim) float64."""
    n = images.shape[0]
    d = int(np.prod(images.shape[1:]))
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(d, dim, generator=g, dtype=torch.float64) / dim**0.5
    # Mean and std of every pixel over the set, so that no pixel dominates the distances by its scale.
    total = torch.zeros(d, dtype=torch.float64)
    total_sq = torch.zeros(d, dtype=torch.float64)
    for start in range(0, n, _CHUNK):
        x = images[start:start + _CHUNK].reshape(-1, d).double()
        total += x.sum(0)
        total_sq += x.pow(2).sum(0)
    mean = total / n
    std = (total_sq / n - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
    out = torch.empty(n, dim, dtype=torch.float64)
    for start in range(0, n, _CHUNK):
        x = images[start:start + _CHUNK].reshape(-1, d).double()
        out[start:start + _CHUNK] = ((x - mean) / std) @ proj
    return out


def checkpoint_features(path: str | Path, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Pooled ``forward_features`` of the EMA model saved in a fixmatch checkpoint: (N, D) float64 on the CPU.

    The checkpoint is loaded as ``fixmatch.load`` loads it (its model description checked first), and the
    images are standardised with the statistics the network was trained with, which it records.
    """
    loaded = load_model_checkpoint(path, "ema")
    spec, model = loaded.spec, loaded.backbone
    if spec.in_channels != images.shape[1]:
        raise SplitError(f"--selection-checkpoint {path} does not fit these images (its model takes "
                         f"{spec.in_channels}-channel images, these have {images.shape[1]}); use a checkpoint "
                         "trained on images with the same channels")
    if not hasattr(model, "forward_features"):
        raise SplitError(f"model {spec.name!r} has no forward_features; pick another checkpoint")
    mean, std = channel_stats(spec.mean, spec.std)
    return predict_logits(model, images, mean, std, batch_size, forward=model.forward_features).flatten(1).double()
