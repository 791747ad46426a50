"""CIFAR-10 and CIFAR-100 from their official python-format files, through one reader.

Both data sets ship as pickled dicts (``b'data'``: uint8 rows of 3072 channel-major pixels, plus a label
list) in a ``.tar.gz`` whose top folder torchvision keeps after extracting; an existing download is found
in either form under the data directory. When neither is there, the archive is downloaded and its MD5
checked. The pickles go through the restricted unpickler (safe_pickle.py): a crafted file cannot run code.
The two data sets differ only in the names described by ``_CifarFormat``.
"""

from __future__ import annotations

import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from .datasets import Dataset, _make
from .download import DatasetError, download_file
from .safe_archive import ArchiveLimitError, open_tar, safe_tar_files
from .safe_pickle import safe_load_pickle

__all__ = ["LOADERS", "CIFAR10_MD5", "CIFAR10_URL", "CIFAR100_MD5", "CIFAR100_URL", "load_cifar10", "load_cifar100"]

# Read when a loader is called (not bound at import), so that a mirror can be set before loading.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# The largest file a loader reads (CIFAR-100's train pickle is 155 MB); checked from the tar header or the
# file size before a byte is unpickled, so a compressed archive cannot inflate a member to gigabytes.
_MAX_MEMBER_BYTES = 1 << 28


@dataclass(frozen=True)
class _CifarFormat:
    name: str  # the data set's key in load_dataset
    title: str  # as written in messages
    folder: str  # top folder inside the archive (and after extracting it)
    archive: str
    train: tuple[str, ...]  # members whose batches are concatenated into the training set
    test: str
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)


_CIFAR10 = _CifarFormat("cifar10", "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                        tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                        b"labels", b"label_names", 10)
# CIFAR-100's 100 fine labels; its 20 coarse super-classes are not used.
_CIFAR100 = _CifarFormat("cifar100", "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
                         ("train",), "test", "meta", b"fine_labels", b"fine_label_names", 100)


def load_cifar10(data_dir: Path, download: bool) -> Dataset:
    """CIFAR-10: 50,000 training and 10,000 test images of 32x32x3, 10 classes."""
    return _load(_CIFAR10, data_dir, download, CIFAR10_URL, CIFAR10_MD5)


def load_cifar100(data_dir: Path, download: bool) -> Dataset:
    """CIFAR-100 with its 100 fine labels: 50,000 training and 10,000 test images of 32x32x3."""
    return _load(_CIFAR100, data_dir, download, CIFAR100_URL, CIFAR100_MD5)


def _load(fmt: _CifarFormat, data_dir: Path, download: bool, url: str, md5: str) -> Dataset:
    folder, archive = data_dir / fmt.folder, data_dir / fmt.archive
    if all((folder / m).is_file() for m in fmt.members):
        raw = _read_folder(fmt, folder, url)
    else:
        if not archive.is_file():
            if not download:
                raise DatasetError(f"{fmt.title} not found: expected the folder {folder} or the archive {archive}; "
                                   f"download {url} into {data_dir} or pass download=True")
            download_file(url, archive, md5)
        raw = _read_archive(fmt, archive, url)
    meta, meta_src = raw[fmt.meta]
    names = meta.get(fmt.names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != fmt.num_classes:
        raise _bad(fmt, meta_src, f"no list of {fmt.num_classes} {fmt.names_key!r}", url)
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    train = [_batch(fmt, *raw[m], url) for m in fmt.train]
    images = np.concatenate([x for x, _ in train]).reshape(-1, 3, 32, 32)  # rows are channel-major (CHW)
    labels = np.concatenate([y for _, y in train])
    test_images, test_labels = _batch(fmt, *raw[fmt.test], url)
    return _make(fmt.name, (images, labels), (test_images.reshape(-1, 3, 32, 32), test_labels), classes)


def _read_folder(fmt: _CifarFormat, folder: Path, url: str) -> dict[str, tuple[object, str]]:
    """member name -> (unpickled object, source shown in errors)"""
    raw = {}
    for m in fmt.members:
        src = str(folder / m)
        try:
            with open(folder / m, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > _MAX_MEMBER_BYTES:
                    raise _bad(fmt, src, f"{size} bytes, more than the {_MAX_MEMBER_BYTES} any of its files holds",
                               url)
                raw[m] = (_unpickle(fmt, f, src, url), src)
        except OSError as e:
            raise DatasetError(f"cannot read {src} ({e.strerror or e}); fix its permissions or re-download "
                               f"{url}") from None
    return raw


def _read_archive(fmt: _CifarFormat, archive: Path, url: str) -> dict[str, tuple[object, str]]:
    # One forward pass over the gzip stream (no seeking back), reading only the expected member names and
    # stopping once all are read: nothing is extracted to disk, no member larger than _MAX_MEMBER_BYTES read.
    wanted = {f"{fmt.folder}/{m}": m for m in fmt.members}
    raw = {}
    try:
        with open_tar(archive, "r:gz") as tar:
            # Skips absolute and '..' member names, links and devices; refuses oversized members.
            for info in safe_tar_files(tar, max_bytes=_MAX_MEMBER_BYTES):
                m = wanted.get(info.name)
                if m is not None and m not in raw:
                    src = f"{archive}:{info.name}"
                    raw[m] = (_unpickle(fmt, tar.extractfile(info), src, url), src)
                    if len(raw) == len(wanted):
                        break
    except ArchiveLimitError as e:
        raise DatasetError(f"{archive} is not the {fmt.title} archive ({e}); delete it and re-download {url}") \
            from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{archive} is corrupt or truncated ({e}); delete it and re-download {url}") from None
    missing = [n for n, m in wanted.items() if m not in raw]
    if missing:
        raise DatasetError(f"{archive} lacks {', '.join(missing)}; delete it and re-download {url}")
    return raw


def _unpickle(fmt: _CifarFormat, f: IO[bytes] | None, src: str, url: str) -> object:
    try:
        return safe_load_pickle(f)  # type: ignore[arg-type]
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise _bad(fmt, src, str(e), url) from None


def _batch(fmt: _CifarFormat, batch: object, src: str, url: str) -> tuple[np.ndarray, np.ndarray]:
    """Check one unpickled batch: uint8 (N, 3072) pixels and N labels in [0, num_classes)."""
    if not isinstance(batch, dict):
        raise _bad(fmt, src, "not a dict", url)
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise _bad(fmt, src, "b'data' is not a uint8 (N, 3072) array", url)
    try:
        y = np.asarray(batch.get(fmt.label_key), dtype=np.int64)
    except (TypeError, ValueError):
        y = np.zeros(0, dtype=np.int64)  # reported just below
    top = fmt.num_classes - 1
    if y.shape != (data.shape[0],) or (y.size and (y.min() < 0 or y.max() > top)):
        raise _bad(fmt, src, f"{fmt.label_key!r} must be {data.shape[0]} ints in [0, {top}]", url)
    return data, y


def _bad(fmt: _CifarFormat, src: str, why: str, url: str) -> DatasetError:
    return DatasetError(f"{src} is not a valid {fmt.title} file ({why}); delete it and re-download {url}")


LOADERS: dict[str, Callable[[Path, bool], Dataset]] = {"cifar10": load_cifar10, "cifar100": load_cifar100}
