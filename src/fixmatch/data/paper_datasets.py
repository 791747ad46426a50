"""The paper's other benchmarks, read from their official files: SVHN, STL-10 and MNIST (CIFAR-10 and
CIFAR-100 are in cifar.py).

Each loader looks in the data directory for the layout torchvision uses (so existing downloads are
found); when the files are absent it downloads the official archive and checks its MD5. Parsing never
runs code from a file: SVHN's MATLAB files go through ``scipy.io.loadmat`` (a parser of the MAT
format), STL-10 and MNIST are raw bytes. STL-10's unlabeled split and SVHN's extra set are decoded once
into a uint8 .npy cache next to the files and memory-mapped from it (array_cache.py). One small reader
per format; every reader checks sizes and values and names the bad file and the fix in a one-line
``DatasetError``.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from fixmatch.core.atomic import atomic_path

from .array_cache import cache_is_fresh, open_npy_mmap, write_npy_atomic
from .datasets import IDX_SHAPES, MNIST_FILES, Dataset, _find_idx_files, _make, _read_idx
from .download import DatasetError, download_file
from .safe_archive import ArchiveLimitError, open_tar, safe_tar_files

__all__ = ["LOADERS", "load_mnist", "load_stl10", "load_svhn"]


# ------------------------------------------------------------------------- SVHN

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = {  # file name -> MD5
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    "extra_32x32.mat": "a93ce644f1a588dc4d68dda5feec44a7",
}
SVHN_CLASSES = [str(d) for d in range(10)]  # label 0 is the digit 0 (the files label it 10)
_SVHN_CHUNK = 8192  # images per chunk when writing the extra cache (25 MB)
_SVHN_MAX_IMAGES = {"train_32x32.mat": 73_257, "test_32x32.mat": 26_032, "extra_32x32.mat": 531_131}  # official
# MAT v5 (scipy.io.matlab's names): numeric data types miINT8..miUINT64 -> bytes per element, the numeric
# array classes mxDOUBLE..mxUINT64, and the two kinds of top-level element that hold a variable.
_MI_BYTES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8}
_MX_NUMERIC, _MX_UINT8 = range(6, 16), 9
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MAT_HEAD_BYTES = 4096  # a variable's header (flags, dimensions, name, data tag): ~100 bytes in SVHN's files
_MAT_MAX_VARIABLES = 64  # SVHN's files hold two


def load_svhn(data_dir: Path, download: bool, extra: bool = False) -> Dataset:
    """SVHN's train and test sets; ``extra=True`` adds the 531,131 extra images to the unlabeled pool only.

    The paper's protocol trains on train alone (73,257 images). The extra images are decoded once into a
    memory-mapped cache (extra_32x32.uint8.npy and extra_32x32.labels.npy beside the .mat file).
    """
    train = _read_svhn_mat(_svhn_file(data_dir, "train_32x32.mat", download))
    test = _read_svhn_mat(_svhn_file(data_dir, "test_32x32.mat", download))
    pool = {}
    if extra:
        images, labels = _svhn_extra(_svhn_file(data_dir, "extra_32x32.mat", download))
        pool = {"unlabeled_images": images, "unlabeled_labels": labels}
    return _make("svhn", train, test, list(SVHN_CLASSES), **pool)


def _svhn_file(data_dir: Path, name: str, download: bool) -> Path:
    # torchvision keeps the .mat files directly in its root; ours go to data_dir/svhn.
    for path in (data_dir / name, data_dir / "svhn" / name):
        if path.is_file():
            return path
    target = data_dir / "svhn" / name
    if not download:
        raise DatasetError(f"SVHN file {name} not found in {data_dir} or {data_dir / 'svhn'}; download "
                           f"{SVHN_URL}{name} to {target} or pass download=True")
    return download_file(SVHN_URL + name, target, SVHN_FILES[name])


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 in [0, 9]) from an SVHN .mat file."""
    try:
        import scipy.io  # only SVHN needs scipy
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise DatasetError("reading SVHN's .mat files needs scipy: pip install 'fixmatch[svhn]'") from None

    _check_mat_sizes(path, _SVHN_MAX_IMAGES.get(path.name, max(_SVHN_MAX_IMAGES.values())))
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except NotImplementedError:  # scipy reads MATLAB v4-v7.2 files; the official ones are v5
        raise _bad_svhn(path, "a MATLAB v7.3 (HDF5) file; the official files are v5") from None
    except (MatReadError, OSError, ValueError, IndexError, EOFError, TypeError, zlib.error) as e:
        raise _bad_svhn(path, f"cannot be parsed as a MATLAB file: {e}") from None
    x, y = mat.get("X"), mat.get("y")
    # The official files hold X as (32, 32, 3, N): height, width, channel, image.
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise _bad_svhn(path, "no uint8 array 'X' of shape (32, 32, 3, N)")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3] or not np.issubdtype(y.dtype, np.number):
        raise _bad_svhn(path, f"no numeric array 'y' with {x.shape[3]} labels")
    labels = y.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10 or not np.array_equal(labels, y.reshape(-1))):
        raise _bad_svhn(path, "labels must be integers 1..10 (10 is the digit 0)")
    return x.transpose(3, 2, 0, 1), labels % 10  # NCHW; the copy is made once, in _make


def _check_mat_sizes(path: Path, max_images: int) -> None:
    """Refuse a file whose X or y declares more data than SVHN's ``max_images``, before loadmat reads it.

    scipy.io.loadmat sizes each array from the headers in the file and inflates a compressed variable
    whole, so a small crafted file could make it allocate gigabytes. This reads the headers of the MAT v5
    variables only (inflating at most _MAT_HEAD_BYTES of each) up to the first X and y, the two that
    loadmat reads, and checks their class, dimensions and data size. Other defects are left to loadmat.
    """
    try:
        with open(path, "rb") as f:
            head, size = f.read(128), os.fstat(f.fileno()).st_size
            if 0 in head[:4]:  # how scipy tells v4, whose reader trusts the sizes in its headers alike
                raise _bad_svhn(path, "a MATLAB v4 file; the official files are v5")
            order = {b"IM": "<", b"MI": ">"}.get(head[126:128])
            if order is None or struct.unpack(order + "H", head[124:126])[0] >> 8 != 1:
                return  # not v5: loadmat refuses it (v7.3 is reported as such)
            pos, seen = 128, set()
            for _ in range(_MAT_MAX_VARIABLES):
                if {"X", "y"} <= seen or pos + 8 > size:
                    return
                f.seek(pos)
                mdtype, nbytes = struct.unpack(order + "II", f.read(8))
                if mdtype == _MI_COMPRESSED:
                    var = zlib.decompressobj().decompress(f.read(min(nbytes, _MAT_HEAD_BYTES)), _MAT_HEAD_BYTES)
                elif mdtype == _MI_MATRIX:
                    var = struct.pack(order + "II", mdtype, nbytes) + f.read(min(nbytes, _MAT_HEAD_BYTES))
                else:
                    return  # not a variable: loadmat refuses the file
                name = _check_mat_variable(path, var, order, max_images, seen)
                seen.add(name)
                pos += 8 + nbytes
    except (OSError, zlib.error, struct.error) as e:
        raise _bad_svhn(path, f"cannot be parsed as a MATLAB file: {e}") from None
    raise _bad_svhn(path, f"X and y are not among its first {_MAT_MAX_VARIABLES} variables")


def _check_mat_variable(path: Path, var: bytes, order: str, max_images: int, seen: set[str]) -> str:
    """The name of the variable whose miMATRIX element starts ``var``; an X or y (the first of its name)
    must be a real numeric array declaring at most ``max_images`` images' worth of data."""
    mdtype, _, off, _ = _mat_tag(var, 0, order)
    if mdtype != _MI_MATRIX:
        raise _bad_svhn(path, "cannot be parsed as a MATLAB file: a variable is not an array")
    _, _, flags_at, off = _mat_tag(var, off, order)
    _, count, dims_at, off = _mat_tag(var, off, order)
    _, length, name_at, off = _mat_tag(var, off, order)
    name = var[name_at:name_at + length].decode("latin1")
    if name not in ("X", "y") or name in seen:
        return name  # loadmat skips it without reading its data
    flags = struct.unpack_from(order + "I", var, flags_at)[0]  # class in the low byte; 0x800: complex
    dims = struct.unpack_from(f"{order}{count // 4}i", var, dims_at)
    real = not flags & 0x800 and flags & 0xFF in _MX_NUMERIC and min(dims, default=0) >= 0  # no cell, sparse...
    if name == "X":
        if not real or flags & 0xFF != _MX_UINT8 or len(dims) != 4 or dims[:3] != (32, 32, 3):
            raise _bad_svhn(path, "no uint8 array 'X' of shape (32, 32, 3, N)")
        images = dims[3]
    else:
        if not real:
            raise _bad_svhn(path, "'y' is not an array of real numbers")
        images = math.prod(dims)
    if images > max_images:
        what = "images" if name == "X" else "labels"
        raise _bad_svhn(path, f"{name} declares {images} {what}, more than the official {path.name} holds "
                              f"({max_images})")
    elements = math.prod(dims)
    if elements:  # the data element that loadmat reads next must hold exactly the declared array
        dtype, nbytes, _, _ = _mat_tag(var, off, order)
        if dtype not in _MI_BYTES or nbytes != elements * _MI_BYTES[dtype]:
            raise _bad_svhn(path, f"{name} declares {nbytes} bytes of data for dimensions {dims}")
    return name


def _mat_tag(buf: bytes, off: int, order: str) -> tuple[int, int, int, int]:
    """(data type, byte count, data offset, next element's offset) of the MAT v5 element at ``off``."""
    word, nbytes = struct.unpack_from(order + "II", buf, off)
    if word >> 16:  # small data element: type and count share a word, the data is the next 4 bytes
        return word & 0xFFFF, word >> 16, off + 4, off + 8
    return word, nbytes, off + 8, off + 8 + nbytes + (-nbytes % 8)


def _svhn_extra(path: Path):
    images_cache = path.with_name("extra_32x32.uint8.npy")
    labels_cache = path.with_name("extra_32x32.labels.npy")
    # The labels are written first and the images last, so a fresh images file implies both are complete.
    if not (cache_is_fresh(images_cache, [path]) and cache_is_fresh(labels_cache, [path])):
        x, labels = _read_svhn_mat(path)  # loadmat must read the whole array once; the cache avoids repeating it
        write_npy_atomic(labels_cache, labels.shape, [labels], dtype="<i8")
        write_npy_atomic(images_cache, x.shape, (np.ascontiguousarray(x[i:i + _SVHN_CHUNK])
                                                 for i in range(0, x.shape[0], _SVHN_CHUNK)))
        del x
    labels = open_npy_mmap(labels_cache, dtype="<i8").clone()  # small: keep in memory
    images = open_npy_mmap(images_cache, (labels.numel(), 3, 32, 32))
    return images, labels


def _bad_svhn(path: Path, why: str) -> DatasetError:
    return DatasetError(f"{path} is not a valid SVHN file ({why}); delete it and re-download "
                        f"{SVHN_URL}{path.name}")


# ----------------------------------------------------------------------- STL-10

STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
STL10_MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
_STL10_DIR = "stl10_binary"
_STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin", "fold_indices.txt",
                "class_names.txt")
_STL10_IMAGE_BYTES = 3 * 96 * 96
_STL10_CHUNK = 2048  # images per chunk when decoding unlabeled_X.bin into the cache (57 MB)
_STL10_MAX_IMAGES = {"train_X.bin": 5_000, "test_X.bin": 8_000, "unlabeled_X.bin": 100_000}  # the official counts
_STL10_TEXT_BYTES = 1 << 20  # fold_indices.txt and class_names.txt: under 50 kB officially
# The most each file may hold, checked from the archive's headers before extracting and from the file's size
# before reading, so that neither a crafted archive nor an oversized file can exhaust disk or memory.
_STL10_MAX_BYTES = {**{name: n * _STL10_IMAGE_BYTES for name, n in _STL10_MAX_IMAGES.items()},
                    "train_y.bin": 5_000, "test_y.bin": 8_000,
                    "fold_indices.txt": _STL10_TEXT_BYTES, "class_names.txt": _STL10_TEXT_BYTES}


def load_stl10(data_dir: Path, download: bool) -> Dataset:
    """STL-10: 5,000 labeled train images, the 100,000 unlabeled images as the unlabeled pool, 8,000 test.

    The ten official folds of 1,000 labeled train indices (fold_indices.txt) are kept in ``folds``.
    """
    folder = data_dir / _STL10_DIR
    missing = [f for f in _STL10_FILES if not (folder / f).is_file()]
    if missing:
        archive = data_dir / "stl10_binary.tar.gz"
        if not archive.is_file():
            if not download:
                raise DatasetError(f"STL-10 not found: {folder} lacks {', '.join(missing)} and there is no "
                                   f"{archive}; download {STL10_URL} into {data_dir} or pass download=True")
            download_file(STL10_URL, archive, STL10_MD5)
        _extract_members(archive, _STL10_DIR, missing, _STL10_MAX_BYTES, folder, STL10_URL)
    train_x = _read_stl10_images(folder / "train_X.bin")
    test_x = _read_stl10_images(folder / "test_X.bin")
    train_y = _read_stl10_labels(folder / "train_y.bin", len(train_x))
    test_y = _read_stl10_labels(folder / "test_y.bin", len(test_x))
    classes = _read_stl10_classes(folder / "class_names.txt")
    folds = _read_stl10_folds(folder / "fold_indices.txt", len(train_x))
    unlabeled = _stl10_unlabeled(folder / "unlabeled_X.bin")
    return _make("stl10", (train_x, train_y), (test_x, test_y), classes, unlabeled_images=unlabeled, folds=folds)


def _extract_members(archive: Path, top: str, names: list[str], limits: dict[str, int], folder: Path,
                     url: str) -> None:
    """Extract ``top/name`` for each name into ``folder``, each file atomically; nothing else is written.

    Only the exact expected member names are looked at, so a crafted archive cannot write elsewhere.
    ``limits`` holds the most each member of the official archive holds: a member declaring more (any
    member, for the largest limit) is refused from its header, before it is extracted or skipped over.
    """
    wanted = {f"{top}/{n}": n for n in names}
    folder.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    try:
        with open_tar(archive) as tar:
            for info in safe_tar_files(tar, max_bytes=max(limits.values())):
                name = wanted.get(info.name)
                if name is None or name in done:
                    continue
                if info.size > limits[name]:
                    raise DatasetError(f"{archive}: {info.name} declares {info.size} bytes, more than the "
                                       f"official file's {limits[name]}; delete it and re-download {url}")
                with atomic_path(folder / name, suffix=".part") as tmp, open(tmp, "wb") as out:
                    shutil.copyfileobj(tar.extractfile(info), out, 1 << 20)  # type: ignore[misc]
                done.add(name)
                if len(done) == len(wanted):
                    break
    except ArchiveLimitError as e:
        raise DatasetError(f"{archive} is not the official archive ({e}); delete it and re-download {url}") \
            from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DatasetError(f"{archive} is corrupt or truncated ({e}); delete it and re-download {url}") from None
    except OSError as e:
        raise DatasetError(f"cannot extract {archive} into {folder} ({e}); free disk space or make it writable, "
                           f"or delete the archive and re-download {url}") from None
    missing = [f"{top}/{n}" for n in names if n not in done]
    if missing:
        raise DatasetError(f"{archive} lacks {', '.join(missing)}; delete it and re-download {url}")


def _stl10_count(path: Path) -> int:
    """The number of images in an images file, from its size: checked before anything is read."""
    size = path.stat().st_size
    if size == 0 or size % _STL10_IMAGE_BYTES:
        raise _bad_stl10(path, f"{size} bytes is not a whole number of 3x96x96 images ({_STL10_IMAGE_BYTES} "
                               "bytes each): truncated or corrupt")
    n, limit = size // _STL10_IMAGE_BYTES, _STL10_MAX_IMAGES[path.name]
    if n > limit:
        raise _bad_stl10(path, f"it holds {n} images, more than the official file's {limit}")
    return n


def _stl10_decode(raw: np.ndarray) -> np.ndarray:
    # Each image is stored channel by channel, each channel column-major: the bytes read as (N, C, W, H).
    return np.ascontiguousarray(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))


def _read_stl10_images(path: Path) -> np.ndarray:
    n = _stl10_count(path)
    return _stl10_decode(np.fromfile(path, dtype=np.uint8, count=n * _STL10_IMAGE_BYTES))


def _read_stl10_labels(path: Path, n: int) -> np.ndarray:
    size = path.stat().st_size  # one byte per label: checked before reading
    if size != n:
        raise _bad_stl10(path, f"has {size} labels for {n} images (truncated or corrupt)")
    y = np.fromfile(path, dtype=np.uint8, count=n).astype(np.int64)
    if y.shape != (n,):
        raise _bad_stl10(path, "ended early while being read (truncated)")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise _bad_stl10(path, "labels must be bytes 1..10")
    return y - 1


def _read_stl10_classes(path: Path) -> list[str]:
    names = [line.strip() for line in _read_stl10_text(path, "utf-8").splitlines()]
    names = [n for n in names if n]
    if len(names) != 10:
        raise _bad_stl10(path, f"expected 10 class names, one per line, found {len(names)}")
    return names


def _read_stl10_folds(path: Path, n_train: int) -> list[list[int]]:
    """The official folds: one line per fold of space-separated 0-based train indices."""
    folds = []
    for k, line in enumerate(_read_stl10_text(path, "ascii").splitlines(), 1):
        if not line.strip():
            continue
        try:
            fold = [int(t) for t in line.split()]
        except ValueError:
            raise _bad_stl10(path, f"line {k} is not a list of integers") from None
        if min(fold) < 0 or max(fold) >= n_train or len(set(fold)) != len(fold):
            raise _bad_stl10(path, f"line {k} must hold distinct indices in [0, {n_train})")
        folds.append(fold)
    if not folds:
        raise _bad_stl10(path, "holds no folds")
    return folds


def _read_stl10_text(path: Path, encoding: str) -> str:
    size = path.stat().st_size
    if size > _STL10_TEXT_BYTES:
        raise _bad_stl10(path, f"{size} bytes, more than the {_STL10_TEXT_BYTES} a text file of STL-10 may hold")
    return path.read_text(encoding=encoding, errors="replace")


def _stl10_unlabeled(path: Path):
    n = _stl10_count(path)
    cache = path.with_name("unlabeled_X.uint8.npy")
    if not cache_is_fresh(cache, [path]):
        write_npy_atomic(cache, (n, 3, 96, 96), _stl10_chunks(path, n))
    return open_npy_mmap(cache, (n, 3, 96, 96))


def _stl10_chunks(path: Path, n: int) -> Iterator[np.ndarray]:
    # Plain reads, not a memory map of the source: the process never holds more than one chunk.
    with open(path, "rb") as f:
        for start in range(0, n, _STL10_CHUNK):
            count = min(_STL10_CHUNK, n - start)
            raw = np.fromfile(f, dtype=np.uint8, count=count * _STL10_IMAGE_BYTES)
            if raw.size != count * _STL10_IMAGE_BYTES:
                raise _bad_stl10(path, "ended early while being read (truncated)")
            yield _stl10_decode(raw)


def _bad_stl10(path: Path, why: str) -> DatasetError:
    return DatasetError(f"{path} is not a valid STL-10 file ({why}); delete it and re-extract or re-download "
                        f"{STL10_URL}")


# ------------------------------------------------------------------------ MNIST

MNIST_URLS = ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")  # official, mirror


def load_mnist(data_dir: Path, download: bool) -> Dataset:
    # Fashion-MNIST's files have the same names, so MNIST is only looked for in its own folders:
    # ours (data_dir/mnist) and torchvision's (data_dir/MNIST/raw, gzipped or decompressed).
    dirs = [data_dir / "mnist", data_dir / "MNIST" / "raw"]
    files = next((f for d in dirs if (f := _find_idx_files(d)) is not None), None)
    if files is None:
        target = data_dir / "mnist"
        if not download:
            raise DatasetError(f"MNIST not found: expected {', '.join(MNIST_FILES)} in {dirs[0]} or {dirs[1]}; "
                               f"download them from {MNIST_URLS[0]} into {target} or pass download=True")
        files = {n: _download_mirrored(MNIST_URLS, n, target / n, md5) for n, md5 in MNIST_FILES.items()}
    arrays = []
    for prefix in ("train", "t10k"):
        names = f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"
        images, labels = files[names[0]], files[names[1]]
        x, y = (_read_idx(files[n], "MNIST", MNIST_URLS[0], IDX_SHAPES[n]) for n in names)
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise _bad_mnist(images, f"expected 28x28 images, got dimensions {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise _bad_mnist(labels, f"has dimensions {y.shape} but {images.name} has {len(x)} images")
        if y.size and y.max() > 9:
            raise _bad_mnist(labels, "has labels above 9")
        arrays.append((x[:, None], y))
    return _make("mnist", arrays[0], arrays[1], [str(d) for d in range(10)])


def _download_mirrored(bases: tuple[str, ...], name: str, dest: Path, md5: str) -> Path:
    """Try each base URL in turn (the official MNIST server is often unreachable); report the last error."""
    for base in bases[:-1]:
        try:
            return download_file(base + name, dest, md5)
        except DatasetError:
            continue
    return download_file(bases[-1] + name, dest, md5)


def _bad_mnist(path: Path, why: str) -> DatasetError:
    return DatasetError(f"{path} is not a valid MNIST idx file ({why}); delete it and re-download from "
                        f"{MNIST_URLS[0]}")


LOADERS: dict[str, Callable[..., Dataset]] = {
    "mnist": load_mnist,
    "stl10": load_stl10,
    "svhn": load_svhn,
}
