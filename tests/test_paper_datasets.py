"""CIFAR-100, SVHN, STL-10 and MNIST, read from small files written here in the exact official formats."""
import gzip
import importlib
import io
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from test_datasets import py2_pickle  # Python 2 cPickle protocol-2 writer, as the CIFAR files were made

import fixmatch
from fixmatch.config import Config, ConfigError
from fixmatch.data import DatasetError, cifar, load_dataset
from fixmatch.data import paper_datasets as pd
from fixmatch.data.array_cache import open_npy_mmap, write_npy_atomic
from fixmatch.data.download import file_md5
from fixmatch.data.pool import gather_pool, pool_labels
from fixmatch.data.split import SplitError, fold_split, make_split, unlabeled_pool

# ------------------------------------------------------------------ writers


def one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    for p in parts:
        assert p in msg, (p, msg)
    return msg


def write_cifar100(folder: Path, n_train: int = 30, n_test: int = 12) -> dict:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    ref = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        batch = {b"filenames": [b"f%d.png" % i for i in range(n)], b"batch_label": b"training batch 1 of 1",
                 b"fine_labels": fine, b"coarse_labels": [v // 5 for v in fine], b"data": data}
        (folder / name).write_bytes(py2_pickle(batch))
        ref[name] = (data, fine)
    meta = {b"fine_label_names": [b"class%03d" % i for i in range(100)],
            b"coarse_label_names": [b"super%02d" % i for i in range(20)]}
    (folder / "meta").write_bytes(py2_pickle(meta))
    return ref


def write_svhn_mat(path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The official layout: X (32, 32, 3, N) = height, width, channel, image; y (N, 1) in 1..10, 10 = digit 0."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0, 0] = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": x, "y": y}, do_compression=True)
    return x, y


def write_stl10(folder: Path, n_train: int = 20, n_test: int = 10, n_unlabeled: int = 50) -> dict:
    """stl10_binary: images channel by channel, each channel column-major; labels bytes 1..10."""
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    ref = {}
    for name, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        x = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # NCHW: what the loader must return
        (folder / f"{name}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())  # column-major channels
        ref[f"{name}_x"] = x
        if name != "unlabeled":
            y = rng.integers(1, 11, n).astype(np.uint8)
            (folder / f"{name}_y.bin").write_bytes(y.tobytes())
            ref[f"{name}_y"] = y.astype(np.int64) - 1
    folds = [sorted(rng.choice(n_train, 4, replace=False).tolist()) for _ in range(10)]
    (folder / "fold_indices.txt").write_text("".join(" ".join(map(str, f)) + " \n" for f in folds))
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    ref["folds"], ref["names"] = folds, names
    return ref


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    raw = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw, compresslevel=1) if gz else raw)


def write_mnist(folder: Path, gz: bool = True) -> dict:
    rng = np.random.default_rng(3)
    ref = {"train-images-idx3-ubyte": rng.integers(0, 256, (25, 28, 28), dtype=np.uint8),
           "train-labels-idx1-ubyte": rng.integers(0, 10, 25, dtype=np.uint8),
           "t10k-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
           "t10k-labels-idx1-ubyte": rng.integers(0, 10, 7, dtype=np.uint8)}
    for name, arr in ref.items():
        write_idx(folder / (name + (".gz" if gz else "")), arr, gz)
    return ref


def tar_folder(folder: Path, arcname: str, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
        evil = tarfile.TarInfo("../evil.txt")  # never written: only expected member names are read
        tar.addfile(evil, io.BytesIO(b""))
    return dest


# ----------------------------------------------------------------- CIFAR-100


def check_cifar100(d, ref):
    train_data, train_fine = ref["train"]
    assert d.name == "cifar100" and d.num_classes == 100
    assert d.class_names[0] == "class000" and d.class_names[99] == "class099"
    assert d.train_images.shape == (30, 3, 32, 32) and d.test_images.shape == (12, 3, 32, 32)
    for i, c, h, w in [(0, 0, 0, 0), (7, 1, 5, 9), (29, 2, 31, 30)]:  # row byte c*1024 + h*32 + w
        assert d.train_images[i, c, h, w] == train_data[i, c * 1024 + h * 32 + w]
    assert d.train_labels.tolist() == train_fine  # fine labels, not coarse
    assert d.test_labels.tolist() == ref["test"][1]
    x = train_data.reshape(-1, 3, 1024) / 255
    np.testing.assert_allclose(d.mean, x.mean(axis=(0, 2)), rtol=1e-12)


def test_cifar100_folder(tmp_path):
    ref = write_cifar100(tmp_path / "cifar-100-python")
    check_cifar100(load_dataset("cifar100", tmp_path, download=False), ref)


def test_cifar100_archive_is_read_without_extracting(tmp_path):
    ref = write_cifar100(tmp_path / "src" / "cifar-100-python")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tar_folder(tmp_path / "src" / "cifar-100-python", "cifar-100-python", data_dir / "cifar-100-python.tar.gz")
    check_cifar100(load_dataset("cifar100", data_dir, download=False), ref)
    assert [p.name for p in data_dir.iterdir()] == ["cifar-100-python.tar.gz"]
    assert not (tmp_path / "evil.txt").exists()


def test_cifar100_download_and_checksum_failure(tmp_path, monkeypatch):
    ref = write_cifar100(tmp_path / "src" / "cifar-100-python")
    upstream = tar_folder(tmp_path / "src" / "cifar-100-python", "cifar-100-python", tmp_path / "up.tar.gz")
    monkeypatch.setattr(cifar, "CIFAR100_URL", upstream.as_uri())
    monkeypatch.setattr(cifar, "CIFAR100_MD5", "0" * 32)
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar100", tmp_path / "data")
    one_line(e, "checksum mismatch", upstream.as_uri())
    assert not (tmp_path / "data").exists()  # nothing half-written, not even the folder
    monkeypatch.setattr(cifar, "CIFAR100_MD5", file_md5(upstream))
    check_cifar100(load_dataset("cifar100", tmp_path / "data"), ref)


@pytest.mark.parametrize("member", ["train", "meta"])
def test_cifar100_truncated_pickle(tmp_path, member):
    write_cifar100(tmp_path / "cifar-100-python")
    path = tmp_path / "cifar-100-python" / member
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar100", tmp_path, download=False)
    one_line(e, str(path), "not a valid CIFAR-100 file", "re-download")


def test_cifar100_truncated_archive(tmp_path):
    write_cifar100(tmp_path / "src" / "cifar-100-python")
    archive = tar_folder(tmp_path / "src" / "cifar-100-python", "cifar-100-python",
                         tmp_path / "cifar-100-python.tar.gz")
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar100", tmp_path, download=False)
    one_line(e, str(archive), "re-download")


def test_cifar100_code_in_pickle_is_refused(tmp_path):
    write_cifar100(tmp_path / "cifar-100-python")
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}".encode()
    (tmp_path / "cifar-100-python" / "test").write_bytes(
        b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R.")
    with pytest.raises(DatasetError, match=r"cifar-100-python/test .*os\.system"):
        load_dataset("cifar100", tmp_path, download=False)
    assert not marker.exists()


def test_cifar100_coarse_only_labels_refused(tmp_path):
    write_cifar100(tmp_path / "cifar-100-python")
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"coarse_labels": [0, 1]}))
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar100", tmp_path, download=False)
    one_line(e, str(path), "fine_labels")


def test_cifar100_missing(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar100", tmp_path, download=False)
    one_line(e, str(tmp_path / "cifar-100-python"), cifar.CIFAR100_URL)


# ---------------------------------------------------------------------- SVHN


@pytest.mark.parametrize("sub", [".", "svhn"])  # torchvision's root, or ours
def test_svhn_decoding_and_labels(tmp_path, sub):
    x, y = write_svhn_mat(tmp_path / sub / "train_32x32.mat", 40)
    xt, yt = write_svhn_mat(tmp_path / sub / "test_32x32.mat", 9, seed=1)
    d = load_dataset("svhn", tmp_path, download=False)
    assert d.train_images.shape == (40, 3, 32, 32) and d.test_images.shape == (9, 3, 32, 32)
    assert d.class_names == [str(i) for i in range(10)]
    for n, c, h, w in [(0, 0, 0, 1), (5, 2, 30, 3), (39, 1, 7, 31)]:
        assert d.train_images[n, c, h, w] == x[h, w, c, n]
    assert d.train_labels.tolist() == (y[:, 0].astype(int) % 10).tolist()
    assert d.train_labels[0] == 0  # the file's 10 is the digit 0
    assert d.test_labels.tolist() == (yt[:, 0].astype(int) % 10).tolist()
    assert d.unlabeled_images is None and d.num_unlabeled_extra == 0


def test_svhn_extra_is_memory_mapped_from_a_cache(tmp_path):
    write_svhn_mat(tmp_path / "train_32x32.mat", 20)
    write_svhn_mat(tmp_path / "test_32x32.mat", 5, seed=1)
    xe, ye = write_svhn_mat(tmp_path / "extra_32x32.mat", 33, seed=2)
    d = load_dataset("svhn", tmp_path, download=False, extra=True)
    assert d.num_unlabeled_extra == 33 and d.train_images.shape[0] == 20
    assert torch.equal(d.unlabeled_images, torch.from_numpy(xe.transpose(3, 2, 0, 1).copy()))
    assert d.unlabeled_labels.tolist() == (ye[:, 0].astype(int) % 10).tolist()
    cache = tmp_path / "extra_32x32.uint8.npy"
    assert isinstance(np.load(cache, mmap_mode="r"), np.memmap)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left
    # A second load reuses the cache; a newer .mat rebuilds it.
    written = cache.stat().st_mtime_ns
    load_dataset("svhn", tmp_path, download=False, extra=True)
    assert cache.stat().st_mtime_ns == written
    xe2, _ = write_svhn_mat(tmp_path / "extra_32x32.mat", 34, seed=3)
    os.utime(tmp_path / "extra_32x32.mat", ns=(written + 10**9, written + 10**9))
    d2 = load_dataset("svhn", tmp_path, download=False, extra=True)
    assert torch.equal(d2.unlabeled_images, torch.from_numpy(xe2.transpose(3, 2, 0, 1).copy()))


def test_svhn_truncated_mat(tmp_path):
    write_svhn_mat(tmp_path / "train_32x32.mat", 40)
    write_svhn_mat(tmp_path / "test_32x32.mat", 9)
    bad = tmp_path / "train_32x32.mat"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DatasetError) as e:
        load_dataset("svhn", tmp_path, download=False)
    one_line(e, str(bad), "not a valid SVHN file", pd.SVHN_URL + "train_32x32.mat")


def test_svhn_matlab_v73_file_is_one_line(tmp_path):
    # A file re-saved by MATLAB as v7.3 is HDF5, which scipy.io.loadmat does not read (NotImplementedError).
    write_svhn_mat(tmp_path / "train_32x32.mat", 4)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    (tmp_path / "test_32x32.mat").write_bytes(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM" + b"\x00" * 512)
    with pytest.raises(DatasetError) as e:
        load_dataset("svhn", tmp_path, download=False)
    one_line(e, str(tmp_path / "test_32x32.mat"), "MATLAB v7.3")


@pytest.mark.parametrize("content", [{"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.array([[1], [2], [0], [3]])},
                                     {"X": np.zeros((28, 28, 4), np.uint8), "y": np.ones((4, 1))},
                                     {"images": np.zeros((4, 3))}])
def test_svhn_bad_contents(tmp_path, content):
    write_svhn_mat(tmp_path / "train_32x32.mat", 4)
    scipy.io.savemat(tmp_path / "test_32x32.mat", content)
    with pytest.raises(DatasetError) as e:
        load_dataset("svhn", tmp_path, download=False)
    one_line(e, str(tmp_path / "test_32x32.mat"))


def test_svhn_download_checks_md5_and_reports_missing(tmp_path, monkeypatch):
    upstream = tmp_path / "up"
    x, _ = write_svhn_mat(upstream / "train_32x32.mat", 6)
    write_svhn_mat(upstream / "test_32x32.mat", 3)
    monkeypatch.setattr(pd, "SVHN_URL", upstream.as_uri() + "/")
    monkeypatch.setattr(pd, "SVHN_FILES", {n: file_md5(upstream / n) for n in ("train_32x32.mat", "test_32x32.mat")}
                        | {"extra_32x32.mat": "0" * 32})
    d = load_dataset("svhn", tmp_path / "data")
    assert torch.equal(d.train_images, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))
    assert sorted(p.name for p in (tmp_path / "data" / "svhn").iterdir()) == ["test_32x32.mat", "train_32x32.mat"]
    with pytest.raises(DatasetError) as e:  # extra is absent upstream
        load_dataset("svhn", tmp_path / "data", extra=True)
    one_line(e, "extra_32x32.mat")
    with pytest.raises(DatasetError) as e:
        load_dataset("svhn", tmp_path / "empty", download=False)
    one_line(e, "train_32x32.mat", str(tmp_path / "empty" / "svhn" / "train_32x32.mat"))


def test_dataset_option_for_another_dataset_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="'extra' does not apply to the cifar100 data set"):
        load_dataset("cifar100", tmp_path, download=False, extra=True)


# -------------------------------------------------------------------- STL-10


def check_stl10(d, ref):
    assert d.name == "stl10" and d.class_names == ref["names"] and d.image_size == (96, 96)
    assert torch.equal(d.train_images, torch.from_numpy(ref["train_x"]))
    assert torch.equal(d.test_images, torch.from_numpy(ref["test_x"]))
    assert d.train_labels.tolist() == ref["train_y"].tolist() and d.test_labels.tolist() == ref["test_y"].tolist()
    assert torch.equal(d.unlabeled_images, torch.from_numpy(ref["unlabeled_x"]))
    assert d.unlabeled_labels is None and d.folds == ref["folds"]


def test_stl10_column_major_decoding_folds_and_memmapped_unlabeled(tmp_path):
    folder = tmp_path / "stl10_binary"
    ref = write_stl10(folder)
    d = load_dataset("stl10", tmp_path, download=False)
    check_stl10(d, ref)
    # Byte layout: image n, channel c, column w, row h is byte n*27648 + c*9216 + w*96 + h.
    raw = (folder / "train_X.bin").read_bytes()
    assert d.train_images[3, 1, 10, 70] == raw[3 * 27648 + 1 * 9216 + 70 * 96 + 10]
    cache = folder / "unlabeled_X.uint8.npy"
    assert isinstance(np.load(cache, mmap_mode="r"), np.memmap)
    assert not [p for p in folder.iterdir() if p.name.endswith(".part")]
    written = cache.stat().st_mtime_ns
    check_stl10(load_dataset("stl10", tmp_path, download=False), ref)
    assert cache.stat().st_mtime_ns == written  # reused, not rebuilt


def test_stl10_from_archive_extracts_only_its_members(tmp_path):
    ref = write_stl10(tmp_path / "src" / "stl10_binary")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tar_folder(tmp_path / "src" / "stl10_binary", "stl10_binary", data_dir / "stl10_binary.tar.gz")
    check_stl10(load_dataset("stl10", data_dir, download=False), ref)
    assert not (tmp_path / "evil.txt").exists() and not (data_dir.parent / "evil.txt").exists()


def test_stl10_download_checksum_failure_leaves_nothing(tmp_path, monkeypatch):
    write_stl10(tmp_path / "src" / "stl10_binary")
    upstream = tar_folder(tmp_path / "src" / "stl10_binary", "stl10_binary", tmp_path / "up.tar.gz")
    monkeypatch.setattr(pd, "STL10_URL", upstream.as_uri())
    monkeypatch.setattr(pd, "STL10_MD5", "f" * 32)
    with pytest.raises(DatasetError) as e:
        load_dataset("stl10", tmp_path / "data")
    one_line(e, "checksum mismatch", "expected MD5 " + "f" * 32)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name,cut", [("train_X.bin", 100), ("test_y.bin", 1), ("unlabeled_X.bin", 27648 * 3 + 5)])
def test_stl10_truncated_files(tmp_path, name, cut):
    folder = tmp_path / "stl10_binary"
    write_stl10(folder)
    path = folder / name
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(DatasetError) as e:
        load_dataset("stl10", tmp_path, download=False)
    one_line(e, str(path), "truncated", pd.STL10_URL)
    assert not (folder / "unlabeled_X.uint8.npy").exists()  # no cache from a bad file


@pytest.mark.parametrize("text,why", [("1 2 x\n", "line 1 is not a list of integers"),
                                      ("0 1\n5 99\n", "line 2 must hold distinct indices in [0, 20)"),
                                      ("\n", "holds no folds")])
def test_stl10_bad_folds(tmp_path, text, why):
    write_stl10(tmp_path / "stl10_binary")
    (tmp_path / "stl10_binary" / "fold_indices.txt").write_text(text)
    with pytest.raises(DatasetError) as e:
        load_dataset("stl10", tmp_path, download=False)
    one_line(e, "fold_indices.txt", why)


def test_stl10_missing(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("stl10", tmp_path, download=False)
    one_line(e, str(tmp_path / "stl10_binary"), "train_X.bin", str(tmp_path / "stl10_binary.tar.gz"), pd.STL10_URL)


# --------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("sub,gz", [("mnist", True), ("MNIST/raw", False), ("MNIST/raw", True)])
def test_mnist_layouts(tmp_path, sub, gz):
    ref = write_mnist(tmp_path / sub, gz)
    d = load_dataset("mnist", tmp_path, download=False)
    assert d.name == "mnist" and d.class_names == [str(i) for i in range(10)] and d.in_channels == 1
    assert torch.equal(d.train_images[:, 0], torch.from_numpy(ref["train-images-idx3-ubyte"]))
    assert d.test_labels.tolist() == ref["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_is_not_confused_with_fashion_mnist_files(tmp_path):
    write_mnist(tmp_path)  # Fashion-MNIST's file names, in data_dir itself
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", tmp_path, download=False)
    one_line(e, str(tmp_path / "mnist"), str(tmp_path / "MNIST" / "raw"))


def test_mnist_truncated(tmp_path):
    write_mnist(tmp_path / "mnist")
    bad = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-30]))
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", tmp_path, download=False)
    one_line(e, str(bad), "not a valid MNIST idx file", "truncated", pd.MNIST_URLS[0])


def test_mnist_download_falls_back_to_the_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    ref = write_mnist(mirror)
    monkeypatch.setattr(pd, "MNIST_URLS", ((tmp_path / "down").as_uri() + "/", mirror.as_uri() + "/"))
    monkeypatch.setattr(pd, "MNIST_FILES", {n: file_md5(mirror / n) for n in pd.MNIST_FILES})
    d = load_dataset("mnist", tmp_path / "data")
    assert d.train_labels.tolist() == ref["train-labels-idx1-ubyte"].tolist()
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(pd.MNIST_FILES)


# ------------------------------------------------------- cache, pool, folds


def test_npy_cache_write_is_atomic(tmp_path):
    path = tmp_path / "c.npy"

    def chunks():
        yield np.ones((2, 3), np.uint8)
        raise DatasetError("decoder failed")

    with pytest.raises(DatasetError, match="decoder failed"):
        write_npy_atomic(path, (4, 3), chunks())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="produced 2 rows, expected 4"):
        write_npy_atomic(path, (4, 3), [np.ones((2, 3), np.uint8)])
    assert list(tmp_path.iterdir()) == []
    write_npy_atomic(path, (4, 3), [np.full((3, 3), 7, np.uint8), np.zeros((1, 3), np.uint8)])
    t = open_npy_mmap(path, (4, 3))
    assert t.tolist() == [[7] * 3] * 3 + [[0] * 3]
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DatasetError, match="delete it and it will be rebuilt"):
        open_npy_mmap(path, (4, 3))


def test_unlabeled_pool_gathers_from_train_and_extra_in_batch_order():
    train = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    extra = (100 + torch.arange(4, dtype=torch.uint8)).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    split = make_split(torch.tensor([0, 1, 0, 1, 0]), 2, 2, seed=0)
    pool = unlabeled_pool(split, 5, 4)
    assert pool.tolist() == list(range(9))  # labeled images stay in the pool, every extra image is added
    idx = torch.tensor([7, 0, 8, 4, 5])
    assert gather_pool(train, extra, idx)[:, 0, 0, 0].tolist() == [102, 0, 103, 4, 100]
    assert gather_pool(train, None, torch.tensor([3, 1]))[:, 0, 0, 0].tolist() == [3, 1]
    for bad in ([9], [-1]):  # past the pool, or negative: never clipped or wrapped to another image
        with pytest.raises(IndexError, match=r"\[0, 9\)"):
            gather_pool(train, extra, torch.tensor(bad))
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        gather_pool(train, None, torch.tensor([0, 5]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_gather_copies_to_the_gpu_unchanged():
    train = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    idx = torch.tensor([7, 0, 49, 7])
    batch = gather_pool(train, None, idx, pin=True)
    assert batch.is_pinned() and not train.is_pinned()  # only the batch is page-locked, never the data set
    assert torch.equal(batch.to("cuda", non_blocking=True).cpu(), train[idx])


def test_pool_labels_mark_unknown_labels(tmp_path):
    write_stl10(tmp_path / "stl10_binary", n_unlabeled=3)
    d = load_dataset("stl10", tmp_path, download=False)
    y = pool_labels(d)
    assert y.tolist() == d.train_labels.tolist() + [-1, -1, -1]


def test_fold_split():
    folds = [[3, 1, 7], [0, 2, 4]]
    s = fold_split(folds, 1, num_train=10, seed=5)
    assert s.labeled == [0, 2, 4] and s.unlabeled == list(range(10)) and s.num_labels == 3
    with pytest.raises(SplitError, match="choose one of 0..1"):
        fold_split(folds, 2, 10, 0)
    with pytest.raises(SplitError, match="stl10 only"):
        fold_split([], 0, 10, 0)


# ------------------------------------------------------------------ training


@pytest.mark.slow
def test_training_on_stl10_draws_from_the_unlabeled_split_and_its_fold(tmp_path, monkeypatch):
    ref = write_stl10(tmp_path / "stl10_binary", n_train=20, n_test=6, n_unlabeled=40)
    train_module = importlib.import_module("fixmatch.training.batches")  # where the step gathers its images

    drawn = []
    real_gather = train_module.gather_pool

    def spy(train, extra, idx, **options):
        drawn.append(idx.clone())
        return real_gather(train, extra, idx, **options)

    monkeypatch.setattr(train_module, "gather_pool", spy)
    cfg = Config(dataset="stl10", data_dir=str(tmp_path), model="cnn_small", fold=2, num_labels=4, batch_size=2,
                 mu=3, steps=2, eval_every=2, eval_batch_size=8, progress=False, device="cpu", seed=1)
    summary = fixmatch.train(cfg, out=tmp_path / "run")
    assert summary["steps"] == 2
    idx = torch.cat(drawn)
    assert idx.max() >= 20 and idx.min() < 60  # pool indices 20..59 are the unlabeled split
    saved = (tmp_path / "run" / "split.json").read_text()
    assert f'"labeled": {ref["folds"][2]}'.replace(" ", "") in saved.replace(" ", "")


def test_fold_and_svhn_extra_only_where_they_apply(tmp_path):
    write_stl10(tmp_path / "stl10_binary")
    base = dict(data_dir=str(tmp_path), model="cnn_small", steps=1, progress=False, device="cpu")
    with pytest.raises(ConfigError, match="--fold .* does not apply to synthetic"):
        fixmatch.train(Config(dataset="synthetic", fold=0, **base), out=tmp_path / "a")
    with pytest.raises(ConfigError, match="--svhn-extra .* does not apply to stl10"):
        fixmatch.train(Config(dataset="stl10", svhn_extra=True, **base), out=tmp_path / "b")
    with pytest.raises(ConfigError, match="--fold 0 labels the 4 images of that fold; set --num-labels 4"):
        fixmatch.train(Config(dataset="stl10", fold=0, num_labels=1000, **base), out=tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
