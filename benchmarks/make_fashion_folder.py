"""Write a folder data set made of Fashion-MNIST images as PNGs, for the time-budget measurement in RESULTS.md.

labeled/<class>/ gets PER_CLASS_TRAIN training images per class and test/<class>/ PER_CLASS_TEST test images,
drawn with seed 0, so the folder is the same on every machine:

    python benchmarks/make_fashion_folder.py /tmp/fm2000
    fixmatch train --preset cpu-small --dataset folder:/tmp/fm2000 --num-labels 40 --out runs/fm2000
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from fixmatch.data.datasets import load_dataset

PER_CLASS_TRAIN, PER_CLASS_TEST = 150, 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to create (must not exist)")
    parser.add_argument("--data-dir", default=None, help="where Fashion-MNIST is found or downloaded (as for train)")
    args = parser.parse_args()
    args.root.mkdir(parents=True)
    data = load_dataset("fashion-mnist", args.data_dir)
    rng = np.random.default_rng(0)
    # Folder names cannot hold '/': "T-shirt/top" becomes "T-shirt_top" (evaluate matches it to the built-in name).
    names = [name.replace("/", "_") for name in data.class_names]
    for images, labels, sub, per_class in ((data.train_images, data.train_labels, "labeled", PER_CLASS_TRAIN),
                                          (data.test_images, data.test_labels, "test", PER_CLASS_TEST)):
        labels = labels.numpy()
        for c, name in enumerate(names):
            folder = args.root / sub / name
            folder.mkdir(parents=True)
            for i in rng.choice(np.flatnonzero(labels == c), per_class, replace=False):
                Image.fromarray(images[i, 0].numpy()).save(folder / f"{sub}-{i:05d}.png")
    print(f"{sum(1 for _ in args.root.rglob('*.png'))} images in {args.root}")


if __name__ == "__main__":
    main()
