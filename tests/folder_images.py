"""Helpers that write small image folders for the folder data set tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (20, 40, 210)


def solid(path: Path, colour=RED, size=(20, 20), mode="RGB", fmt=None, **save) -> Path:
    """A one-colour image saved at ``path`` (format from the extension unless ``fmt``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, fmt, **save)
    return path


def noise(path: Path, seed: int, size=(24, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def make_folder(root: Path, classes=("cat", "dog"), per_class=3, unlabeled=4, test_per_class=1, size=(20, 20)) -> Path:
    """root/labeled/<class>/, root/unlabeled/ (nested), root/test/<class>/ with distinct PNG images."""
    colours = [RED, GREEN, BLUE]
    seed = 0
    for c, name in enumerate(classes):
        for i in range(per_class):
            solid(root / "labeled" / name / f"{i}.png", tuple(v + i for v in colours[c % 3]), size)
        for i in range(test_per_class):
            solid(root / "test" / name / f"t{i}.png", tuple(v + 10 + i for v in colours[c % 3]), size)
    for i in range(unlabeled):
        seed += 1
        noise(root / "unlabeled" / f"batch{i % 2}" / "deeper" / f"u{i}.png", seed, size)
    return root


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
