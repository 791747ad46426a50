"""The folder data set: layouts, CSV labels, every image mode, EXIF orientation, size, and the cache."""
import os

import numpy as np
import pytest
import torch
from folder_images import BLUE, GREEN, RED, make_folder, noise, solid
from PIL import Image

from fixmatch.data import DatasetError, load_dataset
from fixmatch.data import folder as fd


def load(root, tmp_path, **kw):
    return load_dataset(f"folder:{root}", tmp_path / "data", **kw)


def cache_files(tmp_path):
    base = tmp_path / "data" / "folder-cache"
    return sorted(p.name for p in base.rglob("*") if p.is_file()) if base.exists() else []


def test_layout_classes_test_and_unlabeled_pool(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=("cat", "dog", "eel"), per_class=3, unlabeled=5)
    (root / "labeled" / "cat" / "notes.txt").write_text("not an image")
    solid(root / "labeled" / "cat" / ".hidden.png")
    solid(root / "labeled" / "dog" / "sub" / "nested.png", GREEN)  # any depth below a class folder
    data = load(root, tmp_path)
    assert data.class_names == ["cat", "dog", "eel"]
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert data.test_labels.tolist() == [0, 1, 2]
    assert data.unlabeled_images.shape == (5, 3, 20, 20)
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (10, 3, 20, 20)
    # rows follow the sorted file names: cat/0.png is RED + 0, eel/2.png is BLUE + 2
    assert data.train_images[0, :, 5, 5].tolist() == list(RED)
    assert data.train_images[9, :, 5, 5].tolist() == [v + 2 for v in BLUE]
    assert data.test_images[1, :, 0, 0].tolist() == [v + 10 for v in GREEN]
    expected_u = np.asarray(Image.open(root / "unlabeled" / "batch0" / "deeper" / "u0.png")).transpose(2, 0, 1)
    assert np.array_equal(data.unlabeled_images[0].numpy(), expected_u)


def test_without_test_folder_a_fixed_tenth_is_held_out(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", per_class=20, test_per_class=0, unlabeled=0)
    assert not (root / "test").exists()
    a = load(root, tmp_path)
    assert a.test_labels.tolist() == [0, 0, 1, 1] and a.train_labels.numel() == 36
    assert "held out as the test set" in capsys.readouterr().err
    b = load(root, tmp_path / "other")  # the same images are held out on every load
    assert torch.equal(a.test_images, b.test_images)
    held = {tuple(x[:, 0, 0].tolist()) for x in a.test_images}
    assert not held & {tuple(x[:, 0, 0].tolist()) for x in a.train_images}


def test_training_without_any_test_image_stops_in_one_line_before_writing(tmp_path, capsys):
    from fixmatch.cli import main

    root = make_folder(tmp_path / "imgs", per_class=5, test_per_class=0, unlabeled=30)  # < 10 a class: none held out
    code = main(["train", "--dataset", f"folder:{root}", "--data-dir", str(tmp_path / "data"), "--model",
                 "cnn_small", "--num-labels", "4", "--batch-size", "2", "--mu", "2", "--steps", "2", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("fixmatch: error: ") and "no test images" in err[-1]
    assert not (tmp_path / "run").exists()


def test_labels_csv_instead_of_class_folders(tmp_path):
    root = tmp_path / "imgs"
    solid(root / "pics" / "a.png", RED)
    solid(root / "pics" / "b.png", GREEN)
    solid(root / "pics" / "c.png", RED)
    solid(root / "test" / "red" / "t.png", RED)
    (root / "labels.csv").write_text("path,label\npics/a.png,red\npics/b.png,green\n\npics/c.png,red\n")
    data = load(root, tmp_path)
    assert data.class_names == ["green", "red"]
    assert data.train_labels.tolist() == [1, 0, 1]
    assert data.test_labels.tolist() == [1]
    # --labels-csv: paths are relative to the CSV file's folder
    other = tmp_path / "elsewhere.csv"
    other.write_text("imgs/pics/b.png,green\nimgs/pics/a.png,red\n")
    data = load(root, tmp_path, labels_csv=str(other))
    assert data.class_names == ["green", "red"] and data.train_labels.tolist() == [0, 1]
    assert data.train_images[0, :, 0, 0].tolist() == list(GREEN)


@pytest.mark.parametrize("row, message", [
    ("pics/a.png", "expected 'path,label'"),
    ("pics/nothere.png,red", "missing file"),
])
def test_labels_csv_errors(tmp_path, row, message):
    root = tmp_path / "imgs"
    solid(root / "pics" / "a.png")
    (root / "labels.csv").write_text(f"{row}\n")
    with pytest.raises(DatasetError, match=message):
        load(root, tmp_path)


def _mode_images(root):
    """One labeled image per mode and format the loader converts, with the RGB value it must give."""
    lab = root / "labeled" / "all"
    expected = {}
    expected["rgb.png"] = solid(lab / "rgb.png", RED) and RED
    expected["rgb.jpg"] = solid(lab / "rgb.jpg", GREEN, quality=95) and GREEN
    expected["rgb.bmp"] = solid(lab / "rgb.bmp", BLUE) and BLUE
    expected["rgb.webp"] = solid(lab / "rgb.webp", RED, lossless=True) and RED
    expected["rgb.tif"] = solid(lab / "rgb.tif", GREEN) and GREEN
    expected["grey.pgm"] = solid(lab / "grey.pgm", 60, mode="L") and (60, 60, 60)
    expected["rgb.ppm"] = solid(lab / "rgb.ppm", BLUE) and BLUE
    expected["grey.png"] = solid(lab / "grey.png", 100, mode="L") and (100, 100, 100)
    expected["bw.png"] = solid(lab / "bw.png", 1, mode="1") and (255, 255, 255)
    # RGBA: half-transparent red over white -> (255 + 220)/2, (255 + 30)/2, ...
    expected["rgba.png"] = solid(lab / "rgba.png", (220, 30, 30, 128), mode="RGBA") and (238, 143, 143)
    expected["la.png"] = solid(lab / "la.png", (0, 0), mode="LA") and (255, 255, 255)  # fully transparent
    expected["cmyk.jpg"] = solid(lab / "cmyk.jpg", (0, 255, 255, 0), mode="CMYK", quality=95) and (255, 0, 0)
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 30, 200, 40] + [0] * 762)
    pal.save(lab / "pal.png")
    expected["pal.png"] = GREEN
    pal.save(lab / "pal_t.png", transparency=1)  # palette with a transparent index -> white
    expected["pal_t.png"] = (255, 255, 255)
    # animated GIF: only the first frame (blue) counts
    frames = [Image.new("RGB", (20, 20), c) for c in (BLUE, RED)]
    frames[0].save(lab / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    expected["anim.gif"] = BLUE
    # 16-bit grey: 0..65535 scaled to 0..255
    Image.fromarray(np.full((20, 20), 51400, dtype=np.uint16)).save(lab / "deep.png")
    expected["deep.png"] = (200, 200, 200)
    Image.fromarray(np.full((20, 20), 25700, dtype=np.uint16)).save(lab / "deep.tiff")  # 16-bit TIFF (I;16)
    expected["deep.tiff"] = (100, 100, 100)
    solid(root / "test" / "all" / "t.png")  # a test folder, so that no labeled image is held out
    return expected


def test_every_mode_and_format_is_converted(tmp_path):
    root = tmp_path / "imgs"
    expected = _mode_images(root)
    assert Image.open(root / "labeled" / "all" / "deep.png").mode.startswith("I")
    data = load(root, tmp_path, image_size=8)
    names = sorted(expected)
    assert data.train_images.shape == (len(names), 3, 8, 8)
    for i, name in enumerate(names):
        got = data.train_images[i, :, 4, 4].numpy().astype(int)
        tol = 6 if name.endswith((".jpg", ".gif")) else 1
        assert np.abs(got - np.array(expected[name])).max() <= tol, (name, got.tolist())


def test_all_grey_images_give_one_channel(tmp_path):
    root = tmp_path / "imgs"
    solid(root / "labeled" / "a" / "x.png", 10, mode="L")
    (root / "labeled" / "b").mkdir(parents=True)
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(root / "labeled" / "b" / "y.png")
    data = load(root, tmp_path)
    assert data.in_channels == 1 and data.train_images[:, 0, 0, 0].tolist() == [10, 255]


def test_exif_orientation_is_applied(tmp_path):
    root = tmp_path / "imgs"
    arr = np.zeros((20, 20, 3), dtype=np.uint8)
    arr[:, :10] = RED  # left half red, right half blue as stored
    arr[:, 10:] = BLUE
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored left becomes displayed top
    (root / "labeled" / "a").mkdir(parents=True)
    img.save(root / "labeled" / "a" / "rot.png", exif=exif)
    data = load(root, tmp_path)
    x = data.train_images[0]
    assert x[:, 2, 10].tolist() == list(RED) and x[:, 17, 10].tolist() == list(BLUE)


def test_size_defaults_to_the_capped_median_and_crops_the_centre(tmp_path):
    root = tmp_path / "imgs"
    for i, side in enumerate((30, 40, 50)):
        solid(root / "labeled" / "a" / f"{i}.png", RED, (side, side))
    assert load(root, tmp_path).image_size == (40, 40)
    big = tmp_path / "big"
    for i in range(3):
        solid(big / "labeled" / "a" / f"{i}.png", RED, (300, 200))
    assert load(big, tmp_path).image_size == (fd.SIZE_CAP, fd.SIZE_CAP)
    # 40x20 image, left quarter green: resizing the short side to 10 and keeping the centre square drops it
    wide = tmp_path / "wide"
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:] = BLUE
    arr[:, :10] = GREEN
    (wide / "labeled" / "a").mkdir(parents=True)
    Image.fromarray(arr).save(wide / "labeled" / "a" / "w.png")
    x = load(wide, tmp_path, image_size=10).train_images[0]
    assert x.shape == (3, 10, 10) and np.abs(x[:, :, 1:9].numpy().astype(int) - np.array(BLUE)[:, None, None]).max() <= 2


def test_cache_reused_without_decoding_and_refreshed_on_content_change(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", per_class=2, unlabeled=3)
    first = load(root, tmp_path)
    files = cache_files(tmp_path)
    assert len([f for f in files if f.endswith(".npy")]) == 1 and "manifest.json" in files
    assert not [f for f in files if f.endswith(".tmp")]

    calls = []
    real = fd.decode_image
    monkeypatch.setattr(fd, "decode_image", lambda *a: calls.append(a[0]) or real(*a))
    again = load(root, tmp_path)
    assert calls == [] and torch.equal(again.train_images, first.train_images)
    assert torch.equal(again.unlabeled_images, first.unlabeled_images)

    # same size and modification time, different bytes (BMP: the size depends only on the shape): still
    # noticed, and only that file is decoded again
    target = root / "unlabeled" / "batch0" / "deeper" / "u0.png"
    st = target.stat()
    noise(tmp_path / "other.bmp", 99, (20, 20))
    noise(tmp_path / "same.bmp", 98, (20, 20))
    new_bytes = (tmp_path / "other.bmp").read_bytes()
    assert len(new_bytes) == len((tmp_path / "same.bmp").read_bytes())
    target.write_bytes((tmp_path / "same.bmp").read_bytes())
    load(root, tmp_path)
    st = target.stat()
    calls.clear()
    target.write_bytes(new_bytes)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    refreshed = load(root, tmp_path)
    assert calls == [target]
    expected = np.asarray(Image.open(target)).transpose(2, 0, 1)
    assert np.array_equal(refreshed.unlabeled_images[0].numpy(), expected)
    assert torch.equal(refreshed.train_images, first.train_images)
    assert len([f for f in cache_files(tmp_path) if f.endswith(".npy")]) == 1  # the stale cache is gone


def test_cached_images_are_memory_mapped(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2, unlabeled=2)
    load(root, tmp_path)
    data = load(root, tmp_path)
    npy = next((tmp_path / "data" / "folder-cache").rglob("images-*.npy"))
    on_disk = np.load(npy, mmap_mode="r")
    assert np.array_equal(on_disk[: len(data.train_labels)], data.train_images.numpy())
    # the tensors live in a mapping of the cache file, not in a private copy
    maps = [line for line in open("/proc/self/maps") if line.rstrip().endswith(str(npy))]
    assert maps
    start, end = (int(a, 16) for a in maps[0].split()[0].split("-"))
    assert any(s <= data.train_images.data_ptr() < e for s, e in
               ((int(a, 16), int(b, 16)) for a, b in (m.split()[0].split("-") for m in maps)))
    del start, end


def test_folder_options_checked(tmp_path):
    root = make_folder(tmp_path / "imgs")
    with pytest.raises(DatasetError, match="on_bad_image"):
        load(root, tmp_path, on_bad_image="ignore")
    with pytest.raises(DatasetError, match="not found"):
        load(tmp_path / "nothing", tmp_path)
    with pytest.raises(DatasetError, match="neither labeled"):
        (tmp_path / "empty").mkdir()
        load(tmp_path / "empty", tmp_path)


def test_links_are_followed_once_and_no_file_counts_twice(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=3)
    elsewhere = make_folder(tmp_path / "elsewhere", classes=("cat",), per_class=2, unlabeled=0, test_per_class=0)
    (root / "unlabeled" / "more").symlink_to(elsewhere / "labeled" / "cat")  # data kept elsewhere: followed
    (root / "unlabeled" / "batch0" / "loop").symlink_to(root / "unlabeled")  # a cycle: each folder walked once
    data = load(root, tmp_path)
    assert data.unlabeled_images.shape[0] == 4 + 2
    # A link that puts one class's images into another (and so the same files twice) is refused.
    (root / "labeled" / "cat" / "dogs").symlink_to(root / "labeled" / "dog")
    with pytest.raises(DatasetError, match=r"are the same file, so it would count twice"):
        load(root, tmp_path)
