"""Class-balanced labeled/unlabeled splits of a training set, saved as JSON."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fixmatch.core.atomic import atomic_file
from fixmatch.core.files import read_run_file

__all__ = ["Split", "SplitError", "make_split", "save_split", "load_split", "train_digest"]

_FORMAT = "fixmatch-split"
_VERSION = 1


class SplitError(ValueError):
    """Invalid split request or split file; the message says how to fix it."""


@dataclass(frozen=True)
class Split:
    labeled: list[int]  # indices into the training set, sorted
    unlabeled: list[int]  # all training indices: labeled ones stay in the pool, as in the official FixMatch code
    seed: int
    num_labels: int
    # train_digest() of the training set the indices refer to; None in splits written before it was recorded.
    train_digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "seed": self.seed, "num_labels": self.num_labels}
        if self.train_digest is not None:
            d["train_digest"] = self.train_digest
        # The pool is normally every training index: store just its size, else the list itself.
        if list(self.unlabeled) == list(range(len(self.unlabeled))):
            d["num_train"] = len(self.unlabeled)
        else:
            d["unlabeled"] = list(self.unlabeled)
        d["labeled"] = list(self.labeled)
        return d

    @classmethod
    def from_json(cls, d: Any, num_train: int | None = None) -> Split:
        """Build and validate a Split from ``to_json`` output (``num_train``: size of the training set)."""
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise SplitError(f"not a {_FORMAT} JSON object; give the split.json of an earlier run "
                             "(RUN_DIR/split.json), or one written by fixmatch.data.split.save_split")
        if d.get("version") != _VERSION:
            raise SplitError(f"unsupported split version {d.get('version')!r} (expected {_VERSION}); "
                             "recreate the split")
        for key in ("seed", "num_labels", *(("num_train",) if "unlabeled" not in d else ())):
            if not _is_int(d.get(key)):
                raise SplitError(f"split field '{key}' must be an integer, got {d.get(key)!r}; recreate the split")
        if "unlabeled" in d:
            unlabeled = _index_list(d["unlabeled"], "unlabeled", num_train)
        else:
            if num_train is not None and d["num_train"] != num_train:
                raise SplitError(
                    f"split was made for a training set of {d['num_train']} images but this one has {num_train}; "
                    "use the split made for this data set or create a new one"
                )
            unlabeled = list(range(d["num_train"]))
        labeled = _index_list(d.get("labeled"), "labeled", num_train if "unlabeled" in d else d["num_train"])
        if len(labeled) != d["num_labels"]:
            raise SplitError(
                f"split lists {len(labeled)} labeled indices but num_labels is {d['num_labels']}; recreate the split"
            )
        if not set(labeled) <= set(unlabeled):
            raise SplitError("split has labeled indices missing from the unlabeled pool; recreate the split")
        digest = d.get("train_digest")
        if digest is not None and not isinstance(digest, str):
            raise SplitError(f"split field 'train_digest' must be a string, got {digest!r}; recreate the split")
        return cls(labeled=labeled, unlabeled=unlabeled, seed=d["seed"], num_labels=d["num_labels"],
                   train_digest=digest)


def train_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A fingerprint of a training set's images and labels, in order: a split's indices mean the same images only
    for the same fingerprint (not so for another data set of the same size, or a folder with a file renamed)."""
    h = hashlib.blake2b(digest_size=16)
    for t in (images, labels):
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).data)
    return h.hexdigest()


def make_split(labels: torch.Tensor | np.ndarray, num_labels: int, num_classes: int, seed: int) -> Split:
    """Draw ``num_labels // num_classes`` labeled examples per class, uniformly at random.

    Uses its own ``numpy`` Generator seeded by ``seed``, so the split is the same
    whatever torch's global RNG state is.
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise SplitError(f"labels must be a 1-D integer array, got shape {tuple(y.shape)} dtype {y.dtype}")
    if not _is_int(num_classes) or num_classes <= 0:
        raise SplitError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not _is_int(num_labels):
        raise SplitError(f"num_labels must be an integer, got {num_labels!r}")
    if not _is_int(seed) or seed < 0:
        raise SplitError(f"seed must be a non-negative integer, got {seed!r}")
    if num_labels <= 0:
        raise SplitError(f"num_labels must be positive, got {num_labels}; pass e.g. {num_classes * 4}")
    if num_labels % num_classes:
        raise SplitError(
            f"num_labels={num_labels} is not divisible by num_classes={num_classes}; "
            f"use a multiple of {num_classes} (e.g. {max(1, num_labels // num_classes) * num_classes})"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise SplitError(f"labels must lie in [0, {num_classes}), found values in [{y.min()}, {y.max()}]")
    per_class = num_labels // num_classes
    counts = np.bincount(y, minlength=num_classes)
    if counts.min() < per_class:
        c = int(counts.argmin())
        raise SplitError(
            f"num_labels={num_labels} needs {per_class} labels per class but class {c} has only {counts[c]} "
            f"examples; use num_labels <= {int(counts.min()) * num_classes}"
        )
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(y == c), size=per_class, replace=False) for c in range(num_classes)]
    labeled = sorted(int(i) for i in np.concatenate(chosen))
    return Split(labeled=labeled, unlabeled=list(range(len(y))), seed=seed, num_labels=num_labels)


def save_split(split: Split, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:  # a crash never leaves a torn split.json; never written through a link
        f.write(json.dumps(split.to_json()) + "\n")
    return path


def load_split(path: str | Path, num_train: int | None = None, digest: str | None = None) -> Split:
    """Load a split saved by ``save_split``; ``num_train`` checks it fits the training set, ``digest`` (its
    ``train_digest``) that it was made for these very images (splits that record none are taken on trust)."""
    path = Path(path)
    try:
        text = read_run_file(path)  # never through a link, nor from a FIFO
        if text is None:
            raise FileNotFoundError(path)
        d = json.loads(text)
    except FileNotFoundError:
        raise SplitError(f"split file {path} not found; create it with save_split or check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SplitError(f"cannot read split file {path} ({e}); delete it and recreate the split") from None
    try:
        split = Split.from_json(d, num_train=num_train)
    except SplitError as e:
        raise SplitError(f"{path}: {e}") from None
    if digest is not None and split.train_digest is not None and split.train_digest != digest:
        raise SplitError(f"{path} was made for other training images (another data set of the same size, or a "
                         "folder whose files were added, removed or renamed since); use the split made for this "
                         "data set or create a new one")
    return split


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _index_list(x: Any, name: str, num_train: int | None) -> list[int]:
    if not isinstance(x, list) or not all(_is_int(i) for i in x):
        raise SplitError(f"split field '{name}' must be a list of integers; recreate the split")
    bad = [i for i in x if i < 0 or (num_train is not None and i >= num_train)]
    if bad:
        bound = f"[0, {num_train})" if num_train is not None else "[0, inf)"
        raise SplitError(f"split field '{name}' has indices outside {bound}, e.g. {bad[0]}; recreate the split")
    if len(set(x)) != len(x):
        raise SplitError(f"split field '{name}' has duplicate indices; recreate the split")
    return sorted(x)


def fold_split(folds: list[list[int]], fold: int, num_train: int, seed: int) -> Split:
    """The labeled images of predefined fold ``fold`` (STL-10's official folds); the pool stays every train index."""
    if not folds:
        raise SplitError("this data set has no predefined folds; --fold applies to stl10 only")
    if not 0 <= fold < len(folds):
        raise SplitError(f"fold {fold} does not exist; choose one of 0..{len(folds) - 1}")
    labeled = _index_list(list(folds[fold]), f"fold {fold}", num_train)
    return Split(labeled=labeled, unlabeled=list(range(num_train)), seed=seed, num_labels=len(labeled))


def unlabeled_pool(split: Split, num_train: int, num_extra: int) -> torch.Tensor:
    """Indices the unlabeled stream draws from: the split's training indices, then every one of the data set's
    ``num_extra`` separate unlabeled images (STL-10 unlabeled, SVHN extra), numbered from ``num_train`` on.

    As in the official code, the labeled images stay in the pool and the separate images are all added.
    """
    train = torch.as_tensor(split.unlabeled, dtype=torch.long)
    return torch.cat([train, torch.arange(num_train, num_train + num_extra, dtype=torch.long)])
