"""Hostile data files: decompression bombs and headers that declare absurd sizes.

Every loader must check the sizes a file declares (idx headers, tar headers, MAT variable headers, file
sizes) against what the official file holds before it allocates or inflates anything, and refuse the file
in one line. The bombs are small on disk: gigabytes of zeros compressed by repeating one independently
compressed block (never held in memory), or sparse files. Memory is measured with tracemalloc, which
counts Python's and numpy's allocations: a loader that inflated the bomb would peak at a gigabyte or more.
"""
import contextlib
import io
import struct
import tarfile
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from test_datasets import write_cifar_folder, write_fashion
from test_paper_datasets import write_mnist, write_stl10, write_svhn_mat

from fixmatch.data import DatasetError, load_dataset
from fixmatch.data import datasets as ds
from fixmatch.data import paper_datasets as pd

GiB = 1 << 30
MiB = 1 << 20
FASHION_TRAIN_BYTES = 60_000 * 28 * 28  # the data the official train images file declares


# --------------------------------------------------------------------- bombs


def _deflate(data: bytes, final: bool) -> bytes:
    # A full flush ends on a byte boundary with an empty history, so these raw blocks concatenate freely.
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)


def compressed_zeros(prefix: bytes, zeros: int, suffix: bytes = b"", container: str = "gzip") -> bytes:
    """prefix + ``zeros`` zero bytes + suffix as one valid gzip (or zlib) stream, about zeros/1000 bytes long."""
    whole, rest = divmod(zeros, MiB)
    block, chunk = _deflate(bytes(MiB), False), bytes(MiB)
    body = _deflate(prefix, False) + block * whole + _deflate(bytes(rest) + suffix, True)
    checksum = zlib.crc32 if container == "gzip" else zlib.adler32
    value = checksum(prefix, 0 if container == "gzip" else 1)
    for _ in range(whole):
        value = checksum(chunk, value)
    value = checksum(bytes(rest) + suffix, value)
    if container == "gzip":
        size = len(prefix) + zeros + len(suffix)
        return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + body + struct.pack("<II", value, size & 0xFFFFFFFF)
    return b"\x78\xda" + body + struct.pack(">I", value)


def sparse_file(path: Path, prefix: bytes, size: int) -> Path:
    """``prefix`` followed by zeros up to ``size`` bytes, taking no disk space."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(prefix)
        f.truncate(size)
    return path


def tar_gz_bomb(path: Path, name: str, size: int, prefix: bytes = b"", kind: bytes = tarfile.REGTYPE) -> Path:
    """A .tar.gz whose one member ``name`` holds ``prefix`` and then zeros, ``size`` bytes in all."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    header = info.tobuf(tarfile.GNU_FORMAT)
    end = bytes(-size % 512 + 2 * 512)  # padding, then the two empty blocks that end an archive
    path.write_bytes(compressed_zeros(header + prefix, size - len(prefix), end))
    return path


def idx_header(*dims: int) -> bytes:
    return struct.pack(">I", 0x0800 | len(dims)) + struct.pack(f">{len(dims)}I", *dims)


# A pickle that asks for ~1 GiB in one read (BINBYTES8): what a bomb member feeds the unpickler.
PICKLE_BOMB = b"\x80\x04\x8e" + struct.pack("<Q", GiB - 11)


@contextlib.contextmanager
def peak_memory() -> Iterator[dict]:
    """Records the peak of traced allocations (bytes) and the wall time of the block in the yielded dict."""
    result: dict = {}
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start
        result["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def refused(load: Callable[[], object], *parts: str, max_peak: int = 16 * MiB) -> dict:
    """Run ``load``, which must raise a one-line DatasetError naming ``parts``, quickly and in little memory."""
    with peak_memory() as mem, pytest.raises(DatasetError) as e:
        load()
    msg = str(e.value)
    assert mem["peak"] < max_peak, f"peak {mem['peak'] / MiB:.0f} MiB while refusing: {msg}"
    assert mem["seconds"] < 20, mem
    assert "\n" not in msg
    for p in parts:
        assert p in msg, (p, msg)
    return mem


def test_bomb_writers_make_valid_streams(tmp_path):
    for container, inflate in (("gzip", lambda b: zlib.decompress(b, 31)), ("zlib", zlib.decompress)):
        data = compressed_zeros(b"head", 3 * MiB + 5, b"tail", container)
        assert inflate(data) == b"head" + bytes(3 * MiB + 5) + b"tail"
    with tarfile.open(tar_gz_bomb(tmp_path / "a.tar.gz", "d/f", 1000, b"xy")) as tar:
        (info,) = tar.getmembers()
        assert info.name == "d/f" and tar.extractfile(info).read() == b"xy" + bytes(998)
    mat = scipy.io.loadmat(write_mat(tmp_path / "a.mat", mat_element(mat_x(3, 3 * 3072), 3 * 3072),
                                     mat_element(mat_y(3))))
    assert mat["X"].shape == (32, 32, 3, 3) and mat["y"].shape == (3, 1)


# ------------------------------------------------------------------ idx files


@pytest.mark.parametrize("gz", [True, False])
def test_idx_bomb_with_a_valid_header_is_refused_after_its_declared_size(tmp_path, monkeypatch, gz):
    # The header declares exactly the official train images, but 1 GiB of data follows: the loader reads
    # the declared 47 MB plus one byte, never the rest.
    monkeypatch.setattr(ds, "_FASHION_SYSTEM_DIRS", ())
    write_fashion(tmp_path, gz=gz)
    bomb = tmp_path / ("train-images-idx3-ubyte" + ".gz" * gz)
    header = idx_header(60_000, 28, 28)
    if gz:
        bomb.write_bytes(compressed_zeros(header, GiB))
        assert bomb.stat().st_size < 2 * MiB
    else:
        sparse_file(bomb, header, len(header) + GiB)
    refused(lambda: load_dataset("fashion-mnist", tmp_path, download=False), str(bomb),
            f"more than the {FASHION_TRAIN_BYTES} bytes", "decompression bomb", ds.FASHION_MNIST_URL,
            max_peak=FASHION_TRAIN_BYTES + 16 * MiB)


@pytest.mark.parametrize("name,dims", [
    ("train-images-idx3-ubyte.gz", (60_001, 28, 28)),  # one image more than the official file
    ("train-images-idx3-ubyte.gz", (2**31, 2**31, 4)),  # 2^64 bytes: wraps around to 0 in int64
    ("t10k-images-idx3-ubyte.gz", (10_000, 28, 29)),
    ("train-labels-idx1-ubyte.gz", (2**32 - 1,)),
    ("t10k-labels-idx1-ubyte.gz", (10_000, 1)),  # a second dimension
])
def test_idx_header_declaring_an_absurd_shape_is_refused_before_reading(tmp_path, monkeypatch, name, dims):
    monkeypatch.setattr(ds, "_FASHION_SYSTEM_DIRS", ())
    write_fashion(tmp_path, n_train=60, n_test=10)
    bomb = tmp_path / name
    bomb.write_bytes(compressed_zeros(idx_header(*dims), GiB))
    refused(lambda: load_dataset("fashion-mnist", tmp_path, download=False), str(bomb),
            f"header declares dimensions {dims}, beyond the official file's")


def test_mnist_idx_bomb_is_refused(tmp_path):
    write_mnist(tmp_path / "mnist")
    bomb = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    bomb.write_bytes(compressed_zeros(idx_header(10_000), GiB))
    refused(lambda: load_dataset("mnist", tmp_path, download=False), str(bomb), "not a valid MNIST idx file",
            "more than the 10000 bytes")


def test_idx_reader_has_a_hard_cap_without_a_shape(tmp_path):
    path = tmp_path / "x.idx.gz"
    path.write_bytes(compressed_zeros(idx_header(2**16, 2**16), GiB))
    refused(lambda: ds._read_idx(path), str(path), "(65536, 65536), more than 268435456 bytes")


# ------------------------------------------------------------------- CIFAR


def test_cifar_archive_member_inflating_to_a_gigabyte_is_refused_from_its_header(tmp_path):
    archive = tar_gz_bomb(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py/data_batch_1", GiB,
                          PICKLE_BOMB)
    assert archive.stat().st_size < 2 * MiB
    refused(lambda: load_dataset("cifar10", tmp_path, download=False), str(archive),
            f"'cifar-10-batches-py/data_batch_1' declares {GiB} bytes", "re-download")


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_tar_extended_header_bomb_is_refused_before_tarfile_reads_it(tmp_path, kind):
    # tarfile reads a pax header or a GNU long name whole into memory while listing the archive.
    archive = tar_gz_bomb(tmp_path / "cifar-10-python.tar.gz", "././@LongLink", GiB, kind=kind)
    refused(lambda: load_dataset("cifar10", tmp_path, download=False), str(archive),
            f"an extended header declares {GiB} bytes")


def test_cifar_archive_with_endless_members_is_refused(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(1001):
            tar.addfile(tarfile.TarInfo(f"junk/{i}"), io.BytesIO(b""))
    refused(lambda: load_dataset("cifar10", tmp_path, download=False), str(archive), "more than 1000 entries")


def test_cifar_folder_file_larger_than_any_batch_is_refused_before_unpickling(tmp_path):
    write_cifar_folder(tmp_path)
    bomb = sparse_file(tmp_path / "cifar-10-batches-py" / "data_batch_3", PICKLE_BOMB, GiB)
    refused(lambda: load_dataset("cifar10", tmp_path, download=False), str(bomb), f"{GiB} bytes, more than")


# ------------------------------------------------------------------- STL-10


def test_stl10_archive_member_beyond_the_official_size_is_refused_before_extracting(tmp_path):
    archive = tar_gz_bomb(tmp_path / "stl10_binary.tar.gz", "stl10_binary/train_X.bin", GiB)
    refused(lambda: load_dataset("stl10", tmp_path, download=False), str(archive),
            f"stl10_binary/train_X.bin declares {GiB} bytes, more than the official file's 138240000", pd.STL10_URL)
    assert not any((tmp_path / "stl10_binary").iterdir())  # nothing extracted


@pytest.mark.parametrize("name,size,why", [
    ("train_X.bin", 40_000 * 27648, "it holds 40000 images, more than the official file's 5000"),
    ("unlabeled_X.bin", 100_001 * 27648, "more than the official file's 100000"),
    ("train_y.bin", 256 * MiB, f"has {256 * MiB} labels for 20 images"),
    ("class_names.txt", 256 * MiB, f"{256 * MiB} bytes, more than the 1048576"),
    ("fold_indices.txt", 256 * MiB, f"{256 * MiB} bytes, more than the 1048576"),
])
def test_stl10_oversized_files_are_refused_before_reading(tmp_path, name, size, why):
    folder = tmp_path / "stl10_binary"
    write_stl10(folder)
    bomb = sparse_file(folder / name, b"", size)
    refused(lambda: load_dataset("stl10", tmp_path, download=False), str(bomb), why, pd.STL10_URL)
    assert not (folder / "unlabeled_X.uint8.npy").exists()


# --------------------------------------------------------------------- SVHN


def _element(mdtype: int, data: bytes) -> bytes:
    return struct.pack("<II", mdtype, len(data)) + data + bytes(-len(data) % 8)


def mat_x(n: int, data_bytes: int) -> bytes:
    """The start of a MAT v5 uint8 variable X of shape (32, 32, 3, n) whose data element declares
    ``data_bytes``; the data itself (zeros) follows."""
    head = (_element(6, struct.pack("<II", 9, 0))  # array flags: class mxUINT8
            + _element(5, struct.pack("<4i", 32, 32, 3, n))  # dimensions
            + struct.pack("<HH", 1, 1) + b"X\0\0\0"  # the name, as a small data element
            + struct.pack("<II", 2, data_bytes))  # miUINT8 data
    return struct.pack("<II", 14, len(head) + data_bytes + -data_bytes % 8) + head


def mat_y(n: int) -> bytes:
    var = (_element(6, struct.pack("<II", 9, 0)) + _element(5, struct.pack("<2i", n, 1))
           + struct.pack("<HH", 1, 1) + b"y\0\0\0" + _element(2, bytes([1] * n)))
    return struct.pack("<II", 14, len(var)) + var


def mat_element(var: bytes, zeros: int = 0) -> bytes:
    """A compressed top-level MAT v5 element: ``var`` followed by ``zeros`` zero bytes (its data)."""
    data = compressed_zeros(var, zeros, container="zlib")
    return struct.pack("<II", 15, len(data)) + data


def write_mat(path: Path, *elements: bytes) -> Path:
    header = b"MATLAB 5.0 MAT-file, hostile test".ljust(116) + bytes(8) + struct.pack("<H", 0x0100) + b"IM"
    path.write_bytes(header + b"".join(elements))
    return path


@pytest.mark.parametrize("n,data_bytes,why", [
    (350_000, 350_000 * 3072, "X declares 350000 images, more than the official train_32x32.mat holds (73257)"),
    (10, GiB, f"X declares {GiB} bytes of data for dimensions (32, 32, 3, 10)"),
])
def test_svhn_mat_bomb_is_refused_from_its_headers(tmp_path, n, data_bytes, why):
    bomb = write_mat(tmp_path / "train_32x32.mat", mat_element(mat_x(n, data_bytes), data_bytes))
    write_svhn_mat(tmp_path / "test_32x32.mat", 3)
    assert bomb.stat().st_size < 2 * MiB
    refused(lambda: load_dataset("svhn", tmp_path, download=False), str(bomb), why, pd.SVHN_URL)


def test_svhn_matlab_v4_header_declaring_terabytes_is_refused(tmp_path):
    # MAT v4: type, rows, columns, imaginary flag, name length, then the name and data (here absent).
    bomb = tmp_path / "train_32x32.mat"
    bomb.write_bytes(struct.pack("<5i", 0, 2**20, 2**20, 0, 2) + b"X\0")
    write_svhn_mat(tmp_path / "test_32x32.mat", 3)
    refused(lambda: load_dataset("svhn", tmp_path, download=False), str(bomb), "MATLAB v4 file")


def test_svhn_official_layout_still_loads_with_the_header_checks(tmp_path):
    x, _ = write_svhn_mat(tmp_path / "train_32x32.mat", 6)
    write_mat(tmp_path / "test_32x32.mat", mat_element(mat_x(4, 4 * 3072), 4 * 3072), mat_element(mat_y(4)))
    d = load_dataset("svhn", tmp_path, download=False)
    assert d.train_images.shape == (6, 3, 32, 32) and d.test_images.shape == (4, 3, 32, 32)
    assert np.array_equal(d.train_images.numpy(), x.transpose(3, 2, 0, 1))


def test_stl10_archive_limits_do_not_refuse_the_official_layout(tmp_path):
    # Only a small text file is missing: the archive's larger members are skipped over, not refused.
    src = tmp_path / "src" / "stl10_binary"
    ref = write_stl10(src, n_unlabeled=60)  # unlabeled_X.bin is larger than a text file's limit
    data_dir = tmp_path / "data"
    folder = data_dir / "stl10_binary"
    write_stl10(folder, n_unlabeled=60)
    with tarfile.open(data_dir / "stl10_binary.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="stl10_binary")
    (folder / "class_names.txt").unlink()
    d = load_dataset("stl10", data_dir, download=False)
    assert d.class_names == ref["names"] and (folder / "class_names.txt").is_file()
