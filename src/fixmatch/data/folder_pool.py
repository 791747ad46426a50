"""Every image of a folder data set that a person could label: what ``fixmatch advise --dataset folder:PATH`` chooses
from and ``fixmatch pretrain --dataset folder:PATH`` learns from. Unlike ``load_folder_dataset``, which needs
labeled images to train, this takes a folder of unlabeled images alone.

The pool is ``PATH/labeled/<class>/`` (images already labeled, by their folder; their rows come first),
``PATH/unlabeled/`` (any nesting) and any further files the caller names (rows of a labels CSV). ``PATH/test/`` is
not in the pool; ``test=True`` (``fixmatch pretrain``'s kNN monitor) decodes its images too, in the same array,
where labeled/ gives the classes to compare them with. Images are listed, decoded and cached as folder.py does
for training (its own cache folder, so that neither evicts the other's); unreadable ones are skipped with a note
on stderr, since they cannot be proposed for labeling (``on_bad_image="error"`` refuses them instead).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .download import DatasetError
from .folder import class_images, decode_cached, list_images, test_files

__all__ = ["FolderPool", "load_folder_pool"]


@dataclass(frozen=True)
class FolderPool:
    root: Path
    paths: list[Path]  # the file of each image row
    images: torch.Tensor  # uint8 (N, C, S, S)
    labeled: dict[int, str]  # row -> class name, for the images under labeled/<class>/ (rows 0 .. len - 1)
    classes: list[str]  # the class folders under labeled/ (none without it)
    # With test=True and labeled/ classes: PATH/test/<class>/'s images and class numbers (in ``classes``).
    test_images: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None

    def ids(self) -> list[str]:
        """Each image's path relative to the folder (as a labels CSV names it), or absolute if outside it."""
        root = os.path.abspath(self.root)
        out = []
        for p in self.paths:
            full = os.path.abspath(p)
            inside = os.path.commonpath([root, full]) == root
            out.append(Path(os.path.relpath(full, root)).as_posix() if inside else full)
        return out


def load_folder_pool(root: str | Path, data_dir: str | Path, image_size: int | None = None,
                     extra: Sequence[str | Path] = (), *, test: bool = False,
                     on_bad_image: str = "skip") -> FolderPool:
    """The images of ``root``'s labeled/<class>/ and unlabeled/ folders, plus the files ``extra`` names; with
    ``test`` also test/<class>/'s images where labeled/ names classes (the size is then chosen over them too, as
    training's is)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {root} not found; pass --dataset folder:PATH with PATH holding "
                           "unlabeled/ (and optionally labeled/<class>/) image folders")
    paths: list[Path] = []
    labels: list[int] = []  # class number, -1 for an unlabeled image
    classes: list[str] = []
    labeled_dir = root / "labeled"
    if labeled_dir.is_dir():
        for c, (d, files) in enumerate(class_images(labeled_dir)):
            classes.append(d.name)
            paths += files
            labels += [c] * len(files)
    if (root / "unlabeled").is_dir():
        files = list_images(root / "unlabeled")
        paths += files
        labels += [-1] * len(files)
    seen = {os.path.realpath(p) for p in paths}
    for p in extra:
        if os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            paths.append(Path(p))
            labels.append(-1)
    if not paths:
        raise DatasetError(f"{root} holds no images to label; put them in {root / 'unlabeled'}/ (any nesting)")
    pool_size = len(paths)
    if test and classes and (root / "test").is_dir():
        for p, c in test_files(root / "test", classes):
            paths.append(p)
            labels.append(c)
    decoded = decode_cached(paths, Path(data_dir).expanduser() / "folder-cache" / "advise", root, image_size,
                            on_bad_image)
    if decoded.skipped:
        print(f"fixmatch: skipped {decoded.skipped}", file=sys.stderr)
    n = sum(1 for i in decoded.kept if i < pool_size)  # the test rows come last
    if n == 0:
        raise DatasetError(f"no readable images in {root}'s labeled/ and unlabeled/ folders; {decoded.skipped}")
    kept = decoded.kept[:n]
    labeled = {row: classes[labels[i]] for row, i in enumerate(kept) if labels[i] >= 0}
    test_kw: dict[str, torch.Tensor] = {}
    if n < len(decoded.kept):
        test_kw = {"test_images": decoded.images[n:],
                   "test_labels": torch.tensor([labels[i] for i in decoded.kept[n:]], dtype=torch.int64)}
    return FolderPool(root, [paths[i] for i in kept], decoded.images[:n], labeled, classes, **test_kw)
