"""Which training images get labels: ``--label-selection random|file|representative|unrepresentative|typiclust``.

``random`` is the paper's protocol (``split.make_split``: ``num_labels / C`` images per class, uniformly,
with the run's seed). ``file`` reuses a saved split (``--split-file``).

``representative``, ``unrepresentative`` and ``typiclust`` are **study tools**: they choose images in a feature
space and then read the true labels of the images chosen, so that a study measures how much the choice of
labeled images matters without a person labeling them. ``representative`` and ``unrepresentative`` read the
true labels of the whole training set to pick, per class, the ``num_labels / C`` images nearest to (or farthest
from) the class centroid; a real semi-supervised user does not have those labels. ``typiclust`` is what
``fixmatch advise`` proposes to a real user (core/typiclust.py: the most typical image of each of the
``num_labels`` largest k-means clusters, k-means seeded with the run's seed), with the true labels standing in
for the annotator; it needs no labels to choose, so its images need not cover every class (a class without a
labeled image gets no supervised signal; training runs as usual, and a line names such classes).

The feature space (runs/features.py) is a network's pooled features (``forward_features`` of the EMA model in
``--selection-checkpoint``, or of a ``fixmatch pretrain`` run's network) or, without a checkpoint, a fixed
random projection of the standardised pixels. ``representative`` and ``unrepresentative`` are deterministic, so
every seed of a study gets the same labeled images and only the training randomness varies.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from fixmatch.config import ConfigError, check_label_selection
from fixmatch.core.typiclust import typiclust
from fixmatch.data.split import Split, SplitError, load_split, make_split
from fixmatch.runs.features import PROJECTION_DIM, PROJECTION_SEED, checkpoint_features, embed_images, pixel_features

__all__ = ["select_labels", "centroid_selection", "typiclust_selection", "pixel_features", "checkpoint_features",
           "PROJECTION_DIM", "PROJECTION_SEED"]


def select_labels(strategy: str, labels: torch.Tensor, num_labels: int, num_classes: int, seed: int, *,
                  images: torch.Tensor | None = None, split_file: str | None = None,
                  checkpoint: str | None = None, digest: str | None = None,
                  device: torch.device | str = "cpu") -> Split:
    """The labeled/unlabeled split for ``strategy`` (``images``: uint8 (N, C, H, W) train images; ``digest``: their
    ``train_digest``, which a split file must match where it records one). A ``checkpoint`` records the
    statistics its network was trained with (``checkpoint_features``); its network embeds the images on
    ``device`` (the run's: a WRN over 50,000 images is minutes on a CPU, seconds on a GPU)."""
    check_label_selection(strategy, split_file)
    if split_file:  # label_selection file, or random replaced by the file
        return load_split(split_file, num_train=labels.numel(), digest=digest)
    if strategy == "random":
        return make_split(labels, num_labels, num_classes, seed)
    if strategy not in ("representative", "unrepresentative", "typiclust"):
        raise ConfigError(f"unknown label_selection {strategy!r}; use random, file, representative, unrepresentative "
                          "or typiclust")
    if images is None:
        raise ValueError(f"{strategy} selection needs the training images")
    if strategy == "typiclust":
        return typiclust_selection(labels, num_labels, num_classes, seed, images, checkpoint, device)
    make_split(labels, num_labels, num_classes, seed)  # the same checks (divisibility, enough per class)
    if checkpoint:
        features = checkpoint_features(checkpoint, images, device=device)
    else:
        features = pixel_features(images)
    labeled = centroid_selection(features, labels, num_labels // num_classes, nearest=strategy == "representative")
    return Split(labeled=labeled, unlabeled=list(range(labels.numel())), seed=seed, num_labels=num_labels)


def typiclust_selection(labels: torch.Tensor, num_labels: int, num_classes: int, seed: int, images: torch.Tensor,
                        checkpoint: str | None = None, device: torch.device | str = "cpu") -> Split:
    """The ``num_labels`` images ``fixmatch advise`` would propose (k-means seeded with ``seed``), labeled with
    their true labels; one line on stderr says which features were used and which classes got no image."""
    n = labels.numel()
    if not isinstance(num_labels, int) or not 1 <= num_labels <= n:
        raise SplitError(f"label_selection typiclust needs 1 <= num_labels <= {n} (the training images), "
                         f"got {num_labels!r}")
    features, what = embed_images(images, checkpoint, device, flag="--selection-checkpoint")
    labeled = sorted(p.index for p in typiclust(features.numpy(), num_labels, seed=seed))
    counts = np.bincount(labels[labeled].numpy(), minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    note = (f"typiclust chose {num_labels} images in {what}, covering {num_classes - missing.size} of "
            f"{num_classes} classes")
    if missing.size:
        shown = ", ".join(str(int(c)) for c in missing[:10]) + (" ..." if missing.size > 10 else "")
        note += f" (none of class {shown}: no supervised signal for them)"
    print(f"fixmatch: {note}", file=sys.stderr)
    return Split(labeled=labeled, unlabeled=list(range(n)), seed=seed, num_labels=num_labels)


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
