"""In-memory image classification data sets read from their official file formats.

Every data set is decoded once into uint8 (N, C, H, W) CPU tensors; augmentation
and batching happen elsewhere. This module holds the registry (``load_dataset``, ``list_datasets``),
Fashion-MNIST and the synthetic test set; the ``Dataset`` record is in dataset.py, CIFAR-10 and CIFAR-100
are read by cifar.py, the paper's other benchmarks by paper_datasets.py, your own images by folder.py.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dataset import Dataset
from .download import DatasetError, download_file, file_md5
from .folder import load_folder_dataset
from .labels_file import apply_labels_csv

__all__ = ["Dataset", "DatasetError", "load_dataset", "list_datasets", "default_data_dir"]


def default_data_dir() -> Path:
    """``$FIXMATCH_DATA_DIR`` if set, else ``~/.cache/fixmatch/data``."""
    return Path(os.environ.get("FIXMATCH_DATA_DIR") or "~/.cache/fixmatch/data").expanduser()


def list_datasets() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True, *,
                 image_size: int | None = None, on_bad_image: str = "error", labels_csv: str | None = None,
                 **options: Any) -> Dataset:
    """Load data set ``name`` from ``data_dir`` (see ``default_data_dir``), downloading if allowed.

    ``folder:PATH`` loads your own images (data/folder.py; its decoded cache goes under ``data_dir``);
    ``image_size`` and ``on_bad_image`` apply to folder data sets only. ``labels_csv`` names the labeled
    images: ``path,label`` rows for a folder, ``index,label`` rows for a built-in data set (labels_file.py); the
    result's ``labeled_indices`` then lists them. ``options`` are specific to one data set: ``extra=True`` for
    svhn adds its extra images to the unlabeled pool.
    """
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    if name.startswith("folder:"):
        return load_folder_dataset(name[len("folder:"):], root, image_size, on_bad_image, labels_csv)
    loader = _LOADERS.get(name.strip().lower())
    if loader is None:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}, "
                           "or folder:PATH for your own images")
    unknown = sorted(set(options) - _LOADER_OPTIONS.get(name.strip().lower(), set()))
    if unknown:
        raise DatasetError(f"option {unknown[0]!r} does not apply to the {name} data set")
    data = loader(root, download, **options)
    return apply_labels_csv(data, labels_csv) if labels_csv else data


_Arrays = tuple[np.ndarray, np.ndarray]  # (images, labels)


def _make(name: str, train: _Arrays, test: _Arrays, classes: list[str], **extra: Any) -> Dataset:
    def t(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        # np.require copies only read-only (np.frombuffer) or non-contiguous arrays.
        return torch.from_numpy(np.require(x, requirements=("C", "W"))).to(dtype)

    return Dataset(
        name=name,
        train_images=t(train[0], torch.uint8),
        train_labels=t(train[1], torch.int64),
        test_images=t(test[0], torch.uint8),
        test_labels=t(test[1], torch.int64),
        class_names=classes,
        **extra,  # unlabeled_images, unlabeled_labels, folds
    )


# ---------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FASHION_FILES = {  # file name -> MD5
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12e480ee83cd310",
}
MNIST_FILES = {  # file name -> MD5: the same names, so MNIST's files are recognised where Fashion-MNIST's are sought
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# Debian's dataset-fashion-mnist package; module-level so tests can override it.
_FASHION_SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
_FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
]


def _load_fashion_mnist(data_dir: Path, download: bool) -> Dataset:
    # data_dir itself, our download folder, torchvision's layout, then system copies.
    dirs = [data_dir, data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw", *_FASHION_SYSTEM_DIRS]
    files = next((f for d in dirs if (f := _find_idx_files(d)) is not None), None)
    if files is None:
        target = data_dir / "fashion-mnist"
        if not download:
            raise DatasetError(
                f"Fashion-MNIST not found: expected {', '.join(_FASHION_FILES)} in one of "
                f"{', '.join(map(str, dirs))}; download them from {FASHION_MNIST_URL} into {target} "
                "or pass download=True"
            )
        files = {n: download_file(FASHION_MNIST_URL + n, target / n, md5) for n, md5 in _FASHION_FILES.items()}
    labels_file = files["train-labels-idx1-ubyte.gz"]  # 28 kB: cheap to checksum on every load
    if labels_file.suffix == ".gz" and file_md5(labels_file) == MNIST_FILES[labels_file.name]:
        raise DatasetError(f"{labels_file.parent} holds MNIST's files (handwritten digits), not Fashion-MNIST's, "
                           f"under the same names; use --dataset mnist, or put Fashion-MNIST's files there")
    arrays = []
    for prefix in ("train", "t10k"):
        names = f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"
        images, labels = files[names[0]], files[names[1]]
        x, y = (_read_idx(files[n], max_shape=IDX_SHAPES[n]) for n in names)
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise _bad_idx(images, f"expected 28x28 images, got dimensions {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise _bad_idx(labels, f"has dimensions {y.shape} but {images.name} has {len(x)} images")
        if y.size and y.max() > 9:
            raise _bad_idx(labels, "has labels above 9")
        arrays.append((x[:, None], y))
    return _make("fashion-mnist", arrays[0], arrays[1], list(_FASHION_CLASSES))


def _find_idx_files(d: Path) -> dict[str, Path] | None:
    """The four files in ``d`` (gzipped, or already decompressed as torchvision leaves them)."""
    found = {}
    for name in _FASHION_FILES:
        path = next((p for p in (d / name, d / name.removesuffix(".gz")) if p.is_file()), None)
        if path is None:
            return None
        found[name] = path
    return found


# The largest dimensions each file may declare: the official files' own (Fashion-MNIST's and MNIST's are alike).
IDX_SHAPES: dict[str, tuple[int, ...]] = {
    "train-images-idx3-ubyte.gz": (60_000, 28, 28),
    "train-labels-idx1-ubyte.gz": (60_000,),
    "t10k-images-idx3-ubyte.gz": (10_000, 28, 28),
    "t10k-labels-idx1-ubyte.gz": (10_000,),
}
_IDX_MAX_BYTES = 1 << 28  # any idx file: the largest official one holds 47 MB
_IDX_CHUNK = 1 << 20


def _read_idx(path: Path, what: str = "Fashion-MNIST", url: str = FASHION_MNIST_URL,
              max_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Decode an idx file (uint8 data only), validating magic, dimensions and length.

    The header is checked before any data is read: it must declare ``len(max_shape)`` dimensions, none
    larger than in ``max_shape``, and at most ``_IDX_MAX_BYTES`` in all. The data are then decompressed
    chunk by chunk into an array of exactly the declared size, so a gzip bomb (a small file inflating to
    gigabytes) or trailing data is refused after reading one byte past the declared size.
    ``what`` and ``url`` name the data set and where to re-download it in error messages.
    """
    def bad(why: str) -> DatasetError:
        return _bad_idx_file(path, why, what, url)

    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            dims = _idx_dims(f, max_shape, bad)
            data = np.empty(math.prod(dims), dtype=np.uint8)  # bounded by _idx_dims
            got = _read_into(f, data)
            if got < data.size:
                raise bad(f"dimensions {dims} need {data.size} bytes of data but it has {got} (truncated or corrupt)")
            if f.read(1):  # at the end, this also makes gzip check the stream's CRC and length
                raise bad(f"it holds more than the {data.size} bytes of data its dimensions {dims} declare "
                          "(corrupt, or a decompression bomb)")
    except (OSError, EOFError, zlib.error) as e:
        raise bad(f"cannot be read or decompressed: {e}") from None
    return data.reshape(dims)


def _idx_dims(f: Any, max_shape: tuple[int, ...] | None,
              bad: Callable[[str], DatasetError]) -> tuple[int, ...]:
    """The dimensions in an idx header, refused if they declare more data than the file may hold."""
    magic = f.read(4)
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or not 1 <= magic[3] <= 3:
        raise bad(f"bad magic number {magic.hex() or 'none'} (expected 00000801/00000803 uint8 idx)")
    ndim = magic[3]
    raw = f.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise bad("truncated header")
    dims = struct.unpack(f">{ndim}I", raw)
    if max_shape is not None and (ndim != len(max_shape) or any(d > m for d, m in zip(dims, max_shape))):
        raise bad(f"its header declares dimensions {dims}, beyond the official file's {max_shape}")
    if math.prod(dims) > _IDX_MAX_BYTES:  # Python ints: np.prod in int64 wraps around for crafted dimensions
        raise bad(f"its header declares dimensions {dims}, more than {_IDX_MAX_BYTES} bytes")
    return dims


def _read_into(f: Any, out: np.ndarray) -> int:
    """Fill the 1-D uint8 ``out`` from ``f`` in chunks (never more than a chunk in flight); the bytes read."""
    view, n = memoryview(out), 0
    while n < len(view):
        got = f.readinto(view[n : n + _IDX_CHUNK])
        if not got:
            break
        n += got
    return n


def _bad_idx(path: Path, why: str) -> DatasetError:
    return _bad_idx_file(path, why, "Fashion-MNIST", FASHION_MNIST_URL)


def _bad_idx_file(path: Path, why: str, what: str, url: str) -> DatasetError:
    return DatasetError(f"{path} is not a valid {what} idx file ({why}); delete it and re-download from {url}")


# -------------------------------------------------------------------- synthetic

_SYNTHETIC_CLASSES = [
    "h-stripes", "v-stripes", "h-stripes-fine", "v-stripes-fine", "checker", "rings", "blob", "two-blobs", "plus",
    "cross",
]


def _load_synthetic(data_dir: Path, download: bool) -> Dataset:
    """A small deterministic 10-class 3x16x16 set for tests (data_dir is ignored).

    Each class is a distinct shape (stripes, checkerboard, rings, blobs, bars)
    with a random phase/position, colour, contrast and noise per image. Every
    class is mirror-symmetric, so horizontal flips keep labels valid.
    """
    rng = np.random.default_rng(0)
    train = _synthetic_images(rng, 2000)
    test = _synthetic_images(rng, 500)
    return _make("synthetic", train, test, list(_SYNTHETIC_CLASSES))


def _synthetic_images(rng: np.random.Generator, n: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(n) % 10)
    g = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    y, x = g[None, :, None], g[None, None, :]

    def jitter(k: float) -> np.ndarray:  # one random value per image
        return rng.uniform(-k, k, (n, 1, 1))

    def bump(d2: np.ndarray, s: float) -> np.ndarray:  # in [-1, 1] from a squared distance
        return 2 * np.exp(-d2 / (2 * s * s)) - 1

    phase, phase2 = jitter(np.pi), jitter(np.pi)
    dy, dx = y - jitter(0.3), x - jitter(0.3)  # coordinates relative to a jittered centre
    r2 = dx**2 + dy**2
    patterns = np.stack(
        [
            np.broadcast_to(np.cos(k * np.pi * c + phase), (n, size, size))
            for k in (2, 4)
            for c in (y, x)  # coarse, then fine, horizontal/vertical stripes
        ]
        + [
            np.cos(2 * np.pi * x + phase) * np.cos(2 * np.pi * y + phase2),  # checkerboard
            np.cos(3 * np.pi * np.sqrt(r2) + phase),  # rings
            bump(r2, 0.3),  # blob
            np.maximum(bump((dx - 0.5) ** 2 + dy**2, 0.2), bump((dx + 0.5) ** 2 + dy**2, 0.2)),  # two blobs
            np.maximum(bump(dx**2, 0.12), bump(dy**2, 0.12)),  # plus
            np.maximum(bump((dx + dy) ** 2 / 2, 0.12), bump((dx - dy) ** 2 / 2, 0.12)),  # diagonal cross
        ]
    )  # (10, n, H, W) in [-1, 1]
    shape = patterns[labels, np.arange(n)]  # (n, H, W)
    colour = rng.uniform(0.5, 1.0, (n, 3, 1, 1))  # class-independent, so the shape carries the label
    contrast = rng.uniform(50, 90, (n, 1, 1, 1))
    background = rng.uniform(100, 155, (n, 1, 1, 1))
    images = background + contrast * colour * shape[:, None] + rng.normal(0, 12, (n, 3, size, size))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels.astype(np.int64)


def _deferred_loader(module: str, name: str) -> Callable[..., Dataset]:
    """A loader imported from ``module`` on first use: those modules build on Dataset and _make above."""

    def load(data_dir: Path, download: bool, **options: Any) -> Dataset:
        return importlib.import_module(f"{__package__}.{module}").LOADERS[name](data_dir, download, **options)

    return load


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "fashion-mnist": _load_fashion_mnist,
    "synthetic": _load_synthetic,
    **{name: _deferred_loader("cifar", name) for name in ("cifar10", "cifar100")},
    **{name: _deferred_loader("paper_datasets", name) for name in ("mnist", "stl10", "svhn")},
}
_LOADER_OPTIONS: dict[str, set[str]] = {"svhn": {"extra"}}  # keyword options each loader accepts
