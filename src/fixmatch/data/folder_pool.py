"""Every image of a folder data set that a person could label: what ``fixmatch advise --dataset folder:PATH`` chooses
from. Unlike ``load_folder_dataset``, which needs labeled images to train, this takes a folder of unlabeled
images alone.

The pool is ``PATH/unlabeled/`` (any nesting), ``PATH/labeled/<class>/`` (images already labeled, by their
folder) and any further files the caller names (rows of a labels CSV); ``PATH/test/`` is left out. Images are
listed, decoded and cached as folder.py does for training (its own cache folder, so that neither evicts the
other's); unreadable ones are skipped with a note on stderr, since they cannot be proposed for labeling.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .download import DatasetError
from .folder import _BadImages, _class_folders, _Entry, _FolderCache, _hash_and_scan, _image_files

__all__ = ["FolderPool", "load_folder_pool"]


@dataclass(frozen=True)
class FolderPool:
    root: Path
    paths: list[Path]  # the file of each image row
    images: torch.Tensor  # uint8 (N, C, S, S)
    labeled: dict[int, str]  # row -> class name, for the images under labeled/<class>/
    classes: list[str]  # the class folders under labeled/ (none without it)

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
                     extra: Sequence[str | Path] = ()) -> FolderPool:
    """The images of ``root``'s unlabeled/ and labeled/<class>/ folders, plus the files ``extra`` names."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {root} not found; pass --dataset folder:PATH with PATH holding "
                           "unlabeled/ (and optionally labeled/<class>/) image folders")
    ignored: list[Path] = []
    entries: list[_Entry] = []
    classes: list[str] = []
    labeled_dir = root / "labeled"
    if labeled_dir.is_dir():
        for c, d in enumerate(_class_folders(labeled_dir)):
            classes.append(d.name)
            entries += [_Entry(p, "train", c) for p in _image_files(d, ignored)]
    if (root / "unlabeled").is_dir():
        entries += [_Entry(p, "unlabeled", -1) for p in _image_files(root / "unlabeled", ignored)]
    seen = {os.path.realpath(e.path) for e in entries}
    for p in extra:
        if os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            entries.append(_Entry(Path(p), "unlabeled", -1))
    if not entries:
        raise DatasetError(f"{root} holds no images to label; put them in {root / 'unlabeled'}/ (any nesting)")
    bad = _BadImages()
    cache = _FolderCache(Path(data_dir).expanduser() / "folder-cache" / "advise", root)
    known = cache.known_images()
    _hash_and_scan(entries, known, bad)
    images, kept = cache.load_or_build(entries, image_size, known, bad, "skip")
    if bad.items:
        print(f"fixmatch: skipped {bad.message()}", file=sys.stderr)
    labeled = {i: classes[e.label] for i, e in enumerate(kept) if e.label >= 0}
    return FolderPool(root, [e.path for e in kept], images, labeled, classes)
