import gzip
import io
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fixmatch.data import DatasetError, cifar, download, list_datasets, load_dataset
from fixmatch.data import datasets as ds
from fixmatch.data.download import download_file, file_md5

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------- format writers


class Py2Pickler(pickle._Pickler):
    """Writes protocol-2 pickles the way Python 2's cPickle wrote the CIFAR files:
    str/bytes as (SHORT_)BINSTRING and numpy's array rebuild under numpy.core."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__module__", "") in ("numpy._core.multiarray", "numpy.core.multiarray"):
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + (name or obj.__name__).encode() + b"\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def write_cifar_folder(root: Path, n: int = 20) -> dict:
    """A tiny cifar-10-batches-py folder; returns the arrays it holds."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {"train_data": [], "train_labels": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        filenames = [b"x_%d.png" % i for i in range(n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": filenames}
        (folder / name).write_bytes(py2_pickle(batch))
        if name == "test_batch":
            out["test_data"], out["test_labels"] = data, labels
        else:
            out["train_data"].append(data)
            out["train_labels"] += labels
    meta = {b"num_cases_per_batch": n, b"label_names": [s.encode() for s in CIFAR_NAMES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    out["train_data"] = np.concatenate(out["train_data"])
    return out


def make_cifar_tar(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
        evil = tarfile.TarInfo("../evil.txt")  # must be ignored, never extracted
        tar.addfile(evil, io.BytesIO(b""))
    return dest


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    magic = 0x0800 | arr.ndim
    raw = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw, compresslevel=1) if gz else raw)
    return path


def write_fashion(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = True) -> dict:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), arr, gz)
    return arrays


@pytest.fixture
def no_system_fashion(monkeypatch):
    monkeypatch.setattr(ds, "_FASHION_SYSTEM_DIRS", ())


# ------------------------------------------------------------------- CIFAR-10


def _check_cifar(d, ref):
    assert d.name == "cifar10" and d.class_names == CIFAR_NAMES and d.num_classes == 10
    assert d.train_images.shape == (100, 3, 32, 32) and d.test_images.shape == (20, 3, 32, 32)
    assert d.train_images.dtype == torch.uint8 and d.train_labels.dtype == torch.int64
    assert d.in_channels == 3 and d.image_size == (32, 32)
    # Rows are channel-major: byte c*1024 + h*32 + w is pixel (c, h, w).
    for i, c, h, w in [(0, 0, 0, 0), (21, 1, 5, 7), (99, 2, 31, 30)]:
        assert d.train_images[i, c, h, w] == ref["train_data"][i, c * 1024 + h * 32 + w]
    assert d.test_images[3, 2, 10, 4] == ref["test_data"][3, 2 * 1024 + 10 * 32 + 4]
    assert d.train_labels.tolist() == ref["train_labels"] and d.test_labels.tolist() == ref["test_labels"]
    x = ref["train_data"].reshape(-1, 3, 1024).astype(np.float64) / 255
    np.testing.assert_allclose(d.mean, x.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(d.std, x.std(axis=(0, 2)), rtol=1e-12)


def test_cifar_folder(tmp_path):
    ref = write_cifar_folder(tmp_path)
    _check_cifar(load_dataset("cifar10", tmp_path, download=False), ref)


def test_cifar_tar_read_without_extracting(tmp_path):
    src = tmp_path / "src"
    ref = write_cifar_folder(src)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    make_cifar_tar(src / "cifar-10-batches-py", data_dir / "cifar-10-python.tar.gz")
    _check_cifar(load_dataset("CIFAR10", data_dir, download=False), ref)
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-python.tar.gz"]
    assert not (tmp_path / "evil.txt").exists()


def test_cifar_tar_missing_member(tmp_path):
    src = tmp_path / "src"
    write_cifar_folder(src)
    (src / "cifar-10-batches-py" / "test_batch").unlink()
    make_cifar_tar(src / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(DatasetError, match="lacks cifar-10-batches-py/test_batch"):
        load_dataset("cifar10", tmp_path, download=False)


def test_cifar_corrupt_tar(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DatasetError, match="corrupt"):
        load_dataset("cifar10", tmp_path, download=False)


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and str(tmp_path / "cifar-10-python.tar.gz") in msg
    assert cifar.CIFAR10_URL in msg and "\n" not in msg


def test_cifar_download(tmp_path, monkeypatch):
    src = tmp_path / "src"
    ref = write_cifar_folder(src)
    tar = make_cifar_tar(src / "cifar-10-batches-py", tmp_path / "upstream.tar.gz")
    monkeypatch.setattr(cifar, "CIFAR10_URL", tar.as_uri())
    monkeypatch.setattr(cifar, "CIFAR10_MD5", file_md5(tar))
    data_dir = tmp_path / "data"
    _check_cifar(load_dataset("cifar10", data_dir), ref)
    assert (data_dir / "cifar-10-python.tar.gz").is_file()


def test_cifar_malicious_batch_rejected(tmp_path):
    write_cifar_folder(tmp_path)
    marker = tmp_path / "pwned"
    payload = b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(f"touch {marker}")) + f"touch {marker}".encode() + b"\x85R."
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(payload)
    with pytest.raises(DatasetError, match=r"data_batch_3 .*os\.system"):
        load_dataset("cifar10", tmp_path, download=False)
    assert not marker.exists()


def test_cifar_unreadable_batch_is_one_line(tmp_path, monkeypatch):
    import fixmatch.data.cifar as cifar_module
    write_cifar_folder(tmp_path)

    def unreadable(path, *args, **kwargs):  # as a file without read permission (the tests may run as root)
        if Path(path).name == "data_batch_2":
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(cifar_module, "open", unreadable, raising=False)
    with pytest.raises(DatasetError, match=r"cannot read .*data_batch_2 \(Permission denied\).*re-download"):
        load_dataset("cifar10", tmp_path, download=False)


@pytest.mark.parametrize(
    "bad",
    [
        {b"labels": [0, 1], b"data": np.zeros((3, 3072), np.uint8)},
        {b"labels": [b"x"] * 3, b"data": np.zeros((3, 3072), np.uint8)},
        {b"labels": [0, 1, 2], b"data": np.zeros((3, 1024), np.uint8)},
        [1, 2, 3],
    ],
)
def test_cifar_bad_batch_contents(tmp_path, bad):
    write_cifar_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(py2_pickle(bad))
    with pytest.raises(DatasetError, match="test_batch is not a valid CIFAR-10 file"):
        load_dataset("cifar10", tmp_path, download=False)


# -------------------------------------------------------------- Fashion-MNIST


def _check_fashion(d, ref):
    assert d.name == "fashion-mnist" and d.num_classes == 10 and d.class_names[0] == "T-shirt/top"
    assert d.class_names[-1] == "Ankle boot"
    assert d.train_images.shape == (30, 1, 28, 28) and d.test_images.shape == (10, 1, 28, 28)
    assert torch.equal(d.train_images[:, 0], torch.from_numpy(ref["train-images-idx3-ubyte"]))
    assert torch.equal(d.test_images[:, 0], torch.from_numpy(ref["t10k-images-idx3-ubyte"]))
    assert d.train_labels.tolist() == ref["train-labels-idx1-ubyte"].tolist()
    assert d.test_labels.dtype == torch.int64 and d.test_labels.tolist() == ref["t10k-labels-idx1-ubyte"].tolist()
    x = ref["train-images-idx3-ubyte"].astype(np.float64) / 255
    np.testing.assert_allclose(d.mean, [x.mean()], rtol=1e-12)
    np.testing.assert_allclose(d.std, [x.std()], rtol=1e-12)
    assert d.in_channels == 1 and d.image_size == (28, 28)


@pytest.mark.parametrize("sub", [".", "fashion-mnist"])
def test_fashion_gz(tmp_path, no_system_fashion, sub):
    ref = write_fashion(tmp_path / sub)
    _check_fashion(load_dataset("fashion-mnist", tmp_path, download=False), ref)


def test_fashion_torchvision_layout_uncompressed(tmp_path, no_system_fashion):
    ref = write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    _check_fashion(load_dataset("fashion-mnist", tmp_path, download=False), ref)


def test_fashion_missing_without_download(tmp_path, no_system_fashion):
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", tmp_path, download=False)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "fashion-mnist") in msg
    assert ds.FASHION_MNIST_URL in msg


def _corrupt(path: Path, how: str) -> None:
    raw = gzip.decompress(path.read_bytes())
    if how == "truncated":
        raw = raw[:-5]
    elif how == "magic":
        raw = struct.pack(">I", 2049) + raw[4:]  # labels magic on an images file
    elif how == "dims":
        raw = raw[:4] + struct.pack(">I", 31) + raw[8:]
    elif how == "dims-overflow":  # 2^31 * 2^31 * 4 = 2^64: wraps around to 0 in int64
        raw = raw[:4] + struct.pack(">3I", 2**31, 2**31, 4)
    path.write_bytes(b"garbage" if how == "not-gzip" else gzip.compress(raw, compresslevel=1))


@pytest.mark.parametrize("how", ["truncated", "magic", "dims", "dims-overflow", "not-gzip"])
def test_fashion_corrupt_file(tmp_path, no_system_fashion, how):
    write_fashion(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    _corrupt(bad, how)
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_mnist_files_where_fashion_mnist_is_sought_are_refused(tmp_path, no_system_fashion, monkeypatch):
    # Both data sets use the same four file names; official MNIST files are known by their checksums.
    write_fashion(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    monkeypatch.setattr(ds, "MNIST_FILES", {**ds.MNIST_FILES, labels.name: file_md5(labels)})
    with pytest.raises(DatasetError, match=r"holds MNIST's files .*--dataset mnist"):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_fashion_count_mismatch(tmp_path, no_system_fashion):
    write_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(9, np.uint8))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.gz .*\(9,\) but t10k-images-idx3-ubyte.gz has 10 images"):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_fashion_download(tmp_path, no_system_fashion, monkeypatch):
    upstream = tmp_path / "upstream"
    ref = write_fashion(upstream)
    md5s = {name: file_md5(upstream / name) for name in sorted(ds._FASHION_FILES, reverse=True)}  # order must not matter
    monkeypatch.setattr(ds, "_FASHION_FILES", md5s)
    monkeypatch.setattr(ds, "FASHION_MNIST_URL", upstream.as_uri() + "/")
    data_dir = tmp_path / "data"
    _check_fashion(load_dataset("fashion-mnist", data_dir), ref)
    assert sorted(p.name for p in (data_dir / "fashion-mnist").iterdir()) == sorted(md5s)


SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (SYSTEM_FASHION / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_system_files(tmp_path):
    start = time.perf_counter()
    d = load_dataset("fashion-mnist", tmp_path, download=False)
    elapsed = time.perf_counter() - start
    assert d.train_images.shape == (60000, 1, 28, 28) and d.test_images.shape == (10000, 1, 28, 28)
    assert d.train_labels.bincount().tolist() == [6000] * 10
    np.testing.assert_allclose(d.mean, [0.2860], atol=1e-4)
    np.testing.assert_allclose(d.std, [0.3530], atol=1e-4)
    assert elapsed < 5  # typically ~0.6 s; generous for a shared machine


# ------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_and_balanced():
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.train_images.shape == (2000, 3, 16, 16) and a.test_images.shape == (500, 3, 16, 16)
    assert a.train_labels.bincount().tolist() == [200] * 10 and a.test_labels.bincount().tolist() == [50] * 10
    assert len(a.class_names) == 10 and len(a.mean) == len(a.std) == 3
    # Classes differ: per-class mean images are far apart relative to the noise.
    means = torch.stack([a.train_images[a.train_labels == c].float().mean(0) for c in range(10)])
    assert torch.cdist(means.flatten(1), means.flatten(1)).fill_diagonal_(1e9).min() > 50


# ------------------------------------------------------------------- registry


def test_registry_and_unknown_name():
    names = ["cifar10", "cifar100", "fashion-mnist", "mnist", "stl10", "svhn", "synthetic"]
    assert list_datasets() == names
    with pytest.raises(DatasetError, match="known datasets: " + ", ".join(names)):
        load_dataset("imagenet")


# ------------------------------------------------------------------- download


def test_download_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello" * 1000)
    dest = download_file(src.as_uri(), tmp_path / "out" / "dest.bin", file_md5(src))
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest.bin"]


def test_download_wrong_md5_leaves_nothing(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello")
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=f"expected MD5 {'0' * 32}, got {file_md5(src)}"):
        download_file(src.as_uri(), out / "dest.bin", "0" * 32)
    assert not out.exists()  # the folder the download made is removed with its partial file


def test_download_network_error(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise download.urllib.error.URLError("no route to host")

    monkeypatch.setattr(download.urllib.request, "urlopen", fail)
    with pytest.raises(DatasetError, match=r"could not download https://example\.org/f.*no route to host.*save it as"):
        download_file("https://example.org/f", tmp_path / "f", "0" * 32)
    assert list(tmp_path.iterdir()) == []
    # --data-dir a/b that did not exist: a failed download leaves neither a nor b behind; a folder that
    # existed before, or one another file landed in, stays.
    with pytest.raises(DatasetError, match="could not download"):
        download_file("https://example.org/f", tmp_path / "a" / "b" / "f", "0" * 32)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other.gz").write_bytes(b"x")
    with pytest.raises(DatasetError, match="could not download"):
        download_file("https://example.org/f", tmp_path / "kept" / "f", "0" * 32)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept", "other.gz"]


def test_interrupted_download_leaves_no_partial_file(tmp_path, monkeypatch):
    class Response:  # a server that sends one chunk, then the user presses Ctrl-C
        headers = {"Content-Length": "2000000"}
        sent = False

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            if self.sent:
                raise KeyboardInterrupt
            self.sent = True
            return b"x" * 1000

    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: Response())
    with pytest.raises(KeyboardInterrupt):
        download_file("https://example.org/f", tmp_path / "new" / "f", "0" * 32)
    assert list(tmp_path.iterdir()) == []  # neither the .part file nor the folder made for it


def test_download_into_an_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data folder should be")
    with pytest.raises(DatasetError, match=r"cannot write to .*data .*choose a writable data_dir or download it "
                                           r"manually from https://example\.org/f") as err:
        download_file("https://example.org/f", blocker / "f", "0" * 32)
    assert "\n" not in str(err.value) and blocker.read_text().startswith("a file")


def test_download_skips_valid_existing_file_and_shows_progress(tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 100)
    monkeypatch.setattr(download, "_PROGRESS_MIN_BYTES", 0)  # exercise the tqdm path
    dest = download_file(src.as_uri(), tmp_path / "dest.bin", file_md5(src))
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: pytest.fail("should not download"))
    assert download_file("https://example.org/x", dest, file_md5(src)) == dest
