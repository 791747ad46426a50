"""Bad input fails clearly (one line, exit 2) and leaves nothing half-written; --on-bad-image skip goes on."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from folder_images import GREEN, RED, make_folder, solid, truncate

import fixmatch
from fixmatch.cli import main
from fixmatch.config import Config
from fixmatch.data import DatasetError, load_dataset
from fixmatch.data import folder as fd
from fixmatch.data.download import download_file


def load(root, tmp_path, **kw):
    return load_dataset(f"folder:{root}", tmp_path / "data", **kw)


def cache_entries(tmp_path):
    base = tmp_path / "data" / "folder-cache"
    return sorted(p.name for p in base.rglob("*") if p.is_file()) if base.exists() else []


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg
    return msg


def test_truncated_and_corrupt_images_are_listed_and_nothing_is_cached(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=3)
    a = truncate(solid(root / "labeled" / "cat" / "broken.jpg", RED, (64, 64), quality=90), 0.4)
    b = root / "unlabeled" / "fake.png"
    b.write_text("this is a text file with an image extension")
    with pytest.raises(DatasetError) as err:
        load(root, tmp_path)
    msg = one_line(err.value)
    assert "2 unreadable image(s)" in msg and str(a) in msg and str(b) in msg and "--on-bad-image skip" in msg
    assert cache_entries(tmp_path) == []  # no cache, no temporary file


def test_skip_leaves_bad_images_out_and_reports_the_count(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", per_class=3, unlabeled=2)
    truncate(solid(root / "labeled" / "cat" / "broken.jpg", RED, (64, 64), quality=90), 0.4)
    (root / "unlabeled" / "fake.png").write_text("not an image")
    data = load(root, tmp_path, on_bad_image="skip")
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and data.unlabeled_images.shape[0] == 2
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err
    # the cache remembers the bad files: the next load skips them without decoding anything
    again = load(root, tmp_path, on_bad_image="skip")
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err
    assert again.train_labels.tolist() == data.train_labels.tolist()
    with pytest.raises(DatasetError, match="2 unreadable"):
        load(root, tmp_path)  # error mode still refuses them


def test_truncated_png_detected(tmp_path):
    root = make_folder(tmp_path / "imgs")
    rng = np.random.default_rng(0)
    from PIL import Image
    path = root / "labeled" / "dog" / "noisy.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    truncate(path, 0.7)
    with pytest.raises(DatasetError, match="noisy.png .corrupt or truncated"):
        load(root, tmp_path)


def test_skip_drops_images_that_fail_while_decoding_and_keeps_every_other_row_in_place(tmp_path, capsys):
    # Headers intact, pixel data cut short: these pass the scan and fail in the decoding pass, whose cache rows
    # must then be compacted without shifting the good images against their labels.
    root = make_folder(tmp_path / "imgs", per_class=3)
    rng = np.random.default_rng(0)
    from PIL import Image
    for name in ("labeled/cat/1b.png", "unlabeled/cut.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / name)
        truncate(root / name, 0.7)
    data = load(root, tmp_path, on_bad_image="skip")
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and data.unlabeled_images.shape[0] == 4
    # make_folder's labeled images are solid: class colour + index, in file order (0, 1, 2; 1b.png is gone)
    want = [[v + i for v in colour] for colour in (RED, GREEN) for i in range(3)]
    assert data.train_images[:, :, 0, 0].tolist() == want
    assert not [p for p in (tmp_path / "data").rglob("*.tmp")]
    again = load(root, tmp_path, on_bad_image="skip")
    assert torch.equal(again.train_images, data.train_images)
    assert torch.equal(again.unlabeled_images, data.unlabeled_images)


def test_non_image_extension_is_ignored_and_reported(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs")
    (root / "labeled" / "cat" / "README.txt").write_text("notes")
    data = load(root, tmp_path)
    assert data.train_labels.numel() == 6
    assert "ignored 1 file(s) without an image extension" in capsys.readouterr().err


def test_empty_class_folder(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "labeled" / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*empty holds no images .*; add images or remove"):
        load(root, tmp_path)


def _no_class_folders(root):
    for f in (root / "labeled").rglob("*.png"):
        f.rename(root / "labeled" / f"{f.parent.name}-{f.name}")
    for d in (root / "labeled").iterdir():
        if d.is_dir():
            d.rmdir()


def _csv(text):
    def write(root):
        (root / "labels.csv").write_text(text)
        return {"labels_csv": str(root / "labels.csv")}  # beside labeled/, the CSV must be named
    return write


def _empty_test_class(root):
    for f in (root / "test" / "dog").iterdir():
        f.unlink()


def _test_without_class_folders(root):
    for d in (root / "test").iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


@pytest.mark.parametrize("spoil, message", [
    (_no_class_folders, r"labeled has no class folders; put each class's images in .*labeled/<class name>/"),
    (_csv("path,label\n\n"), r"labels.csv lists no images; add rows 'path,label'"),
    (_csv("labeled/cat/0.png,cat\nlabeled/cat/0.png,cat\n"), r"lists .*0.png twice; keep one row per image"),
    (_empty_test_class, r"class folder .*test/dog holds no images; add images or remove the folder"),
    (_test_without_class_folders, r"test holds no class folders with images; add .*or remove it"),
], ids=["no-class-folders", "empty-csv", "csv-row-twice", "empty-test-class", "empty-test-folder"])
def test_layout_errors_name_the_problem_and_the_fix(tmp_path, spoil, message):
    root = make_folder(tmp_path / "imgs")
    with pytest.raises(DatasetError, match=message) as err:
        load(root, tmp_path, **(spoil(root) or {}))
    one_line(err.value)
    assert cache_entries(tmp_path) == []


def test_labeled_folder_and_labels_csv_together_are_ambiguous(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "labels.csv").write_text("labeled/cat/0.png,dog\nlabeled/dog/0.png,cat\n")  # swapped labels
    with pytest.raises(DatasetError, match=r"has both labeled/ and labels.csv; remove one, or pass --labels-csv"):
        load(root, tmp_path)
    data = load(root, tmp_path, labels_csv=str(root / "labels.csv"))  # named: the CSV alone gives the labels
    assert data.train_labels.tolist() == [data.class_names.index("dog"), data.class_names.index("cat")]


def test_missing_labels_csv_names_the_flag(tmp_path):
    root = make_folder(tmp_path / "imgs")
    with pytest.raises(DatasetError, match=r"labels file .*nothere.csv not found; check --labels-csv"):
        load(root, tmp_path, labels_csv=str(tmp_path / "nothere.csv"))


def test_class_only_in_test(tmp_path):
    root = make_folder(tmp_path / "imgs")
    solid(root / "test" / "bird" / "b.png")
    with pytest.raises(DatasetError, match="test class folder .*bird has no labeled counterpart"):
        load(root, tmp_path)


def test_every_labeled_image_of_a_class_unreadable_in_skip_mode(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=("cat",), per_class=2)
    for p in (root / "labeled").rglob("*.png"):
        p.write_bytes(b"garbage")
    solid(root / "labeled" / "dog" / "ok.png")
    with pytest.raises(DatasetError, match="cat of .* no readable labeled images"):
        load(root, tmp_path, on_bad_image="skip")


def test_pixel_limit_against_decompression_bombs(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    solid(root / "labeled" / "cat" / "huge.png", RED, (300, 300))
    monkeypatch.setattr(fd, "MAX_PIXELS", 50_000)
    with pytest.raises(DatasetError, match=r"huge.png \(300x300 is over the limit of 50000 pixels\)"):
        load(root, tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="permissions do not apply to root")
def test_unreadable_file_and_folder(tmp_path):
    root = make_folder(tmp_path / "imgs")
    locked = root / "labeled" / "cat" / "0.png"
    locked.chmod(0)
    try:
        with pytest.raises(DatasetError, match=r"0.png \(Permission denied\)"):
            load(root, tmp_path)
    finally:
        locked.chmod(0o644)
    folder = root / "unlabeled"
    folder.chmod(0)
    try:
        with pytest.raises(DatasetError, match="cannot list folder .*fix its permissions"):
            load(root, tmp_path)
    finally:
        folder.chmod(0o755)


def test_unreadable_file_reported_via_os_error(tmp_path, monkeypatch):
    """The same path as a permission error, simulated so that it runs as root too."""
    root = make_folder(tmp_path / "imgs")
    locked = root / "labeled" / "cat" / "0.png"
    real = Path.read_bytes

    def read_bytes(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DatasetError, match=r"0.png \(Permission denied\)"):
        load(root, tmp_path)
    data = load(root, tmp_path, on_bad_image="skip")
    assert data.train_labels.tolist() == [0, 0, 1, 1, 1]


def test_wrong_checksum_and_truncated_archive(tmp_path):
    good = tmp_path / "src.bin"
    good.write_bytes(b"x" * 1000)
    dest = tmp_path / "dl" / "file.bin"
    with pytest.raises(DatasetError, match="checksum mismatch .*expected MD5 0+"):
        download_file(good.as_uri(), dest, "0" * 32)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []
    # A truncated archive already in place (an interrupted manual copy) is reported with the fix.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 20)
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz is corrupt .*re-download"):
        load_dataset("cifar10", data_dir, download=False)


QUICK = dict(model="cnn_small", num_labels=4, batch_size=2, mu=2, eval_every=2, eval_batch_size=64,
             progress=False, device="cpu", steps=2)


def test_fewer_unlabeled_images_than_mu_b(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2, unlabeled=1)
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match=r"has 5 unlabeled images .* mu\*B = 12"):
        fixmatch.train(Config(**{**QUICK, "mu": 6}, dataset=f"folder:{root}", data_dir=str(tmp_path / "data")),
                       out=run)
    assert not run.exists()


def test_bad_image_from_the_command_line_exits_2_and_writes_no_run(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", per_class=2)
    truncate(solid(root / "unlabeled" / "x.jpg", RED, (64, 64)), 0.3)
    run = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{root}", "--data-dir", str(tmp_path / "data"), "--out", str(run),
            "--model", "cnn_small", "--num-labels", "4", "--batch-size", "2", "--mu", "2", "--steps", "2",
            "--eval-every", "2", "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.jpg" in err[0] and err[0].startswith("fixmatch: error:")
    assert not run.exists() and cache_entries(tmp_path) == []
    # with skip, the same command trains, and the folder's unlabeled images feed the unlabeled stream
    assert main(argv + ["--on-bad-image", "skip"]) == 0
    assert (run / "summary.json").is_file()


@pytest.mark.slow
def test_resume_refuses_a_folder_whose_files_were_renamed(tmp_path, capsys):
    # Renaming a file reorders the sorted training set: split.json's indices would label other images.
    root = make_folder(tmp_path / "imgs", per_class=3)
    run = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{root}", "--data-dir", str(tmp_path / "data"), "--out", str(run),
            "--model", "cnn_small", "--num-labels", "4", "--batch-size", "2", "--mu", "2", "--steps", "4",
            "--eval-every", "2", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    (run / "summary.json").unlink()
    split_before = (run / "split.json").read_text()
    (root / "labeled" / "cat" / "0.png").rename(root / "labeled" / "cat" / "9.png")
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "split.json was made for other training images" in err[-1]
    assert (run / "split.json").read_text() == split_before
    (root / "labeled" / "cat" / "9.png").rename(root / "labeled" / "cat" / "0.png")  # as it was: resumes
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
