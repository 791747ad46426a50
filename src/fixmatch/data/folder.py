"""Your own images: ``--dataset folder:PATH``.

Layout (folder names are the class names; files may sit at any depth below a class folder)::

    PATH/labeled/<class>/...   labeled training images (or a CSV of path,label: PATH/labels.csv or --labels-csv)
    PATH/unlabeled/...         unlabeled images, any nesting (optional)
    PATH/test/<class>/...      test images (optional; every class must also be a labeled class)

The labeled images are also part of the unlabeled pool, as in FixMatch. Without PATH/test/, a fixed
10% of each class's labeled images (chosen with seed 0, so the same for every run) is held out as the
test set, to measure accuracy, and used for nothing else; classes with fewer than 10 labeled images give
none. This holds for a --labels-csv file too (training then labels the file's other images); stderr says
how many are held out. Where no class has 10 labeled images the test set would be empty: labels from a CSV
are then refused in one line naming the fix (labeled/<class>/ folders get the same words as a note).

Images (JPEG, PNG, BMP, WebP, GIF's first frame) are turned upright with their EXIF orientation,
converted to 8-bit RGB (or 8-bit grey when every image is grey: L, 1-bit, 16-bit), transparency
composited over white, then resized so that the shorter side is ``image_size`` and centre-cropped to a
square. ``image_size=None`` takes the median shorter side of all images, capped at ``SIZE_CAP``.

Decoding happens once: the decoded uint8 (N, C, S, S) array is cached as a .npy file under
``DATA_DIR/folder-cache/`` and memory-mapped on later loads. The cache is keyed by the *contents* of
the files: every load reads and hashes (BLAKE2b) every file's bytes, so an edited, replaced or renamed
file is noticed even if its size and modification time are unchanged. When the files change, only new
or changed images are decoded; unchanged ones are copied from the previous cache. The cache is
written to a temporary file and renamed into place, so a failed load leaves no partial cache behind.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fixmatch.core.atomic import atomic_path

from .dataset import Dataset
from .download import DatasetError
from .labels_file import read_path_labels

__all__ = ["load_folder_dataset", "to_8bit", "IMAGE_EXTENSIONS", "SIZE_CAP", "MAX_PIXELS", "ON_BAD_IMAGE",
           "list_images", "class_images", "test_files", "decode_cached", "DecodedImages"]

# Every format safe_image decodes (TIFF: microscopy and scanners; PGM/PPM: older data sets).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})
SIZE_CAP = 96  # default image side is the median shorter side, at most this (STL-10's 96x96)
MAX_PIXELS = 50_000_000  # larger images are refused before decoding (decompression bombs)
HOLDOUT_FRACTION = 0.1  # share of each class held out as the test set when PATH/test/ is absent
HOLDOUT_SEED = 0
ON_BAD_IMAGE = ("error", "skip")
_CACHE_VERSION = 1
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_SHOWN = 5  # paths named in an error message before "and N more"


@dataclass
class _Entry:
    path: Path
    role: str  # "train", "test" or "unlabeled"
    label: int  # -1 for unlabeled images
    digest: str = ""
    size: tuple[int, int] = (0, 0)  # (width, height) from the header; only the shorter side is used
    grey: bool = False


class _BadImages:
    """Unreadable images collected over a whole pass, so the error lists them all at once."""

    def __init__(self) -> None:
        self.items: dict[Path, str] = {}  # path -> why
        self.digests: dict[str, str] = {}  # content digest -> why, remembered by the cache

    def add(self, path: Path, why: str, digest: str = "") -> None:
        self.items.setdefault(path, why)
        if digest:
            self.digests.setdefault(digest, why)

    def message(self) -> str:
        shown = [f"{p} ({why})" for p, why in list(self.items.items())[:_SHOWN]]
        more = f" and {len(self.items) - _SHOWN} more" if len(self.items) > _SHOWN else ""
        return f"{len(self.items)} unreadable image(s): {'; '.join(shown)}{more}"


def load_folder_dataset(root: str | Path, data_dir: str | Path, image_size: int | None = None,
                        on_bad_image: str = "error", labels_csv: str | Path | None = None) -> Dataset:
    """Load ``root`` laid out as described in the module docstring (cache under ``data_dir``)."""
    root = Path(root).expanduser()
    if on_bad_image not in ON_BAD_IMAGE:
        raise DatasetError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, not {on_bad_image!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DatasetError(f"image_size must be a positive integer or None, not {image_size!r}")
    if not root.is_dir():
        raise DatasetError(f"image folder {root} not found; pass --dataset folder:PATH with PATH holding "
                           "labeled/<class>/ folders (or labels.csv) and optionally unlabeled/ and test/")

    ignored: list[Path] = []
    classes, labeled, source = _labeled_entries(root, labels_csv, ignored)
    csv_labels = not (root / "labeled").is_dir() or bool(labels_csv)  # else labeled/<class>/ folders
    test_dir = root / "test"
    if test_dir.is_dir():
        test = [_Entry(p, "test", c) for p, c in test_files(test_dir, classes, ignored)]
        holdout_note = ""
    else:
        labeled, test = _hold_out(labeled)
        holdout_note = _holdout_note(test_dir, source, len(labeled) + len(test), len(test), csv_labels)
    unlabeled_dir = root / "unlabeled"
    unlabeled = [_Entry(p, "unlabeled", -1) for p in list_images(unlabeled_dir, ignored)] \
        if unlabeled_dir.is_dir() else []
    # Images picked from unlabeled/ and labeled in a CSV (the labeling page's way) are in the pool as labeled ones.
    named = {key for e in labeled + test if (key := _file_key(e.path)) is not None} if csv_labels else set()
    unlabeled = [e for e in unlabeled if _file_key(e.path) not in named]
    entries = labeled + test + unlabeled
    _check_each_file_once(entries)

    decoded = decode_cached([e.path for e in entries], Path(data_dir).expanduser() / "folder-cache", root,
                            image_size, on_bad_image)
    images, entries = decoded.images, [entries[i] for i in decoded.kept]

    notes = [holdout_note] if holdout_note else []
    if ignored:
        notes.append(f"ignored {len(ignored)} file(s) without an image extension ({ignored[0]}, ...)")
    if decoded.skipped:
        notes.append(f"skipped {decoded.skipped}")
    for note in notes:
        print(f"fixmatch: {note}", file=sys.stderr)

    _check_classes(entries, classes, root)
    data = _make_dataset(root, images, entries, classes)
    if labels_csv:  # the user named the labeled images: training labels all of them (labels_file.py)
        data.labeled_indices = list(range(data.train_labels.numel()))
    return data


# ----------------------------------------------------------------------------- listing


def list_images(folder: Path, ignored: list[Path] | None = None) -> list[Path]:
    """Image files below ``folder`` at any depth, sorted; hidden files and folders are skipped, and other files
    are appended to ``ignored`` when given.

    Links to folders are followed (data often lives elsewhere), each real folder once: a link back to a folder
    above it would otherwise be walked round and round.
    """
    found: list[Path] = []
    walked = {os.path.realpath(folder)}

    def on_error(e: OSError) -> None:
        raise DatasetError(f"cannot list folder {e.filename} ({e.strerror or e}); fix its permissions")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=on_error, followlinks=True):
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in walked:
                walked.add(real)
                kept.append(d)
        dirnames[:] = kept
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            elif ignored is not None:
                ignored.append(path)
    return sorted(found)


def _file_key(path: Path) -> tuple[int, int] | None:
    """Device and inode: the same for every link, symbolic or hard, to one file; None if unreadable (reported, or
    skipped, where the images are read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_each_file_once(entries: list[_Entry]) -> None:
    """One file reached by two paths (a link, or labels.csv naming a file that is also under test/) would count
    twice: in two classes, or in both the training and the test set."""
    first: dict[tuple[int, int], Path] = {}
    for e in entries:
        key = _file_key(e.path)
        if key is None:
            continue
        if key in first:
            raise DatasetError(f"{first[key]} and {e.path} are the same file, so it would count twice (in two "
                               "classes, or in training and test); remove the link or the duplicate entry")
        first[key] = e.path


def _class_folders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DatasetError(f"cannot list folder {folder} ({e.strerror or e}); fix its permissions") from None


def class_images(folder: Path, ignored: list[Path] | None = None) -> list[tuple[Path, list[Path]]]:
    """Each class folder directly below ``folder`` (sorted by name; its name is the class name) with its image
    files at any depth (``list_images``), which may be none: the caller decides whether that is an error."""
    return [(d, list_images(d, ignored)) for d in _class_folders(folder)]


def _labeled_entries(root: Path, labels_csv: str | Path | None, ignored: list[Path]
                     ) -> tuple[list[str], list[_Entry], str]:
    """The class names, the labeled images and where they were named (the CSV, or the labeled/ folder)."""
    csv_path = Path(labels_csv).expanduser() if labels_csv else root / "labels.csv"
    folder = root / "labeled"
    if labels_csv:
        return (*_csv_entries(csv_path, root), str(csv_path))
    if csv_path.is_file():
        if folder.is_dir():  # two sources of labels that may disagree: make the user pick one
            raise DatasetError(f"{root} has both labeled/ and labels.csv; remove one, or pass --labels-csv "
                               f"{csv_path} to use the CSV")
        return (*_csv_entries(csv_path, root), str(csv_path))
    if not folder.is_dir():
        raise DatasetError(f"{root} has neither labeled/<class>/ folders nor labels.csv; put each class's images "
                           f"in {folder}/<class name>/ or list them as path,label rows in {root / 'labels.csv'}")
    found = class_images(folder, ignored)
    if not found:
        raise DatasetError(f"{folder} has no class folders; put each class's images in {folder}/<class name>/")
    classes, entries = [], []
    for label, (d, files) in enumerate(found):
        if not files:
            raise DatasetError(f"class folder {d} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                               "add images or remove the folder")
        classes.append(d.name)
        entries += [_Entry(p, "train", label) for p in files]
    return classes, entries, f"{folder}/"


def _csv_entries(csv_path: Path, root: Path) -> tuple[list[str], list[_Entry]]:
    """Rows ``path,label`` (labels_file.read_path_labels: paths next to the CSV, or else under ``root``)."""
    rows = read_path_labels(csv_path, root)
    classes = sorted({label for _, label in rows})
    index = {c: i for i, c in enumerate(classes)}
    return classes, [_Entry(path, "train", index[label]) for path, label in rows]


def test_files(test_dir: Path, classes: list[str], ignored: list[Path] | None = None) -> list[tuple[Path, int]]:
    """(image file, class number in ``classes``) of every image of ``test_dir``/<class>/; refused in one line: a
    class that is not in ``classes``, an empty class folder, no images at all."""
    index = {c: i for i, c in enumerate(classes)}
    entries = []
    for d, files in class_images(test_dir, ignored):
        if d.name not in index:
            raise DatasetError(f"test class folder {d} has no labeled counterpart (labeled classes: "
                               f"{', '.join(classes)}); rename or remove it, or add labeled images of {d.name!r}")
        if not files:
            raise DatasetError(f"class folder {d} holds no images; add images or remove the folder")
        entries += [(p, index[d.name]) for p in files]
    if not entries:
        raise DatasetError(f"{test_dir} holds no class folders with images; add {test_dir}/<class>/ folders "
                           "or remove it to hold out part of the labeled images instead")
    return entries


def _hold_out(labeled: list[_Entry]) -> tuple[list[_Entry], list[_Entry]]:
    """Move a seeded ``HOLDOUT_FRACTION`` of each class to the test set (same choice for every run)."""
    rng = np.random.default_rng(HOLDOUT_SEED)
    labels = np.array([e.label for e in labeled])
    test_idx: set[int] = set()
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(len(members) * HOLDOUT_FRACTION)
        test_idx.update(int(i) for i in rng.choice(members, size=k, replace=False))
    train = [e for i, e in enumerate(labeled) if i not in test_idx]
    test = [_Entry(e.path, "test", e.label) for i, e in enumerate(labeled) if i in test_idx]
    return train, test


def _holdout_note(test_dir: Path, source: str, total: int, held: int, from_csv: bool) -> str:
    """What the hold-out did, for stderr. With nothing held out there is no test set, which training needs to
    measure accuracy: labels from a CSV (a person's, the labeling page's) are refused in one line; labeled/<class>/
    folders get the same words as a note, since their images are also loaded for other uses than training."""
    per_class = int(round(1 / HOLDOUT_FRACTION))
    if held == 0:
        problem = (f"no test set: {test_dir} is absent and no class of the {total} labeled images of {source} has the "
                   f"{per_class} images needed to hold {HOLDOUT_FRACTION:.0%} of them out to measure accuracy; add "
                   f"{test_dir}/<class>/ images, or label at least {per_class} images of a class")
        if from_csv:
            raise DatasetError(problem)
        return problem
    return (f"no {test_dir}: {held} of the {total} labeled images of {source} ({HOLDOUT_FRACTION:.0%} of each class "
            f"with at least {per_class}, the same on every run) are held out as the test set to measure accuracy; "
            f"training labels the other {total - held}; add {test_dir}/<class>/ images to train on all {total}")


# ------------------------------------------------------------------- hashing and decoding


@dataclass(frozen=True)
class DecodedImages:
    images: torch.Tensor  # uint8 (K, C, S, S), memory-mapped from the cache
    kept: list[int]  # for each row, its position in the paths given (unreadable files skipped leave gaps)
    skipped: str  # "" or the unreadable files, as a message: "N unreadable image(s): path (why); ..."


def decode_cached(paths: list[Path], cache_dir: Path, root: Path, image_size: int | None,
                  on_bad_image: str = "error") -> DecodedImages:
    """Decode ``paths`` (files of the folder ``root``) into one array cached under ``cache_dir`` as described in the
    module docstring. ``image_size=None``: the median shorter side of these images, capped at ``SIZE_CAP``; grey
    only if every image is. Unreadable files raise one DatasetError naming them all, or with ``on_bad_image="skip"``
    are left out and reported in ``skipped``."""
    entries = [_Entry(Path(p), "", -1) for p in paths]
    bad = _BadImages()
    cache = _FolderCache(cache_dir, root)
    known = cache.known_images()
    _hash_and_scan(entries, known, bad)
    images, kept = cache.load_or_build(entries, image_size, known, bad, on_bad_image)
    position = {id(e): i for i, e in enumerate(entries)}
    return DecodedImages(images, [position[id(e)] for e in kept], bad.message() if bad.items else "")


def _hash_and_scan(entries: list[_Entry], known: dict[str, list], bad: _BadImages) -> None:
    """Hash every file's bytes; read the header (size, mode) of images the cache has not seen."""

    def work(e: _Entry) -> None:
        try:
            data = e.path.read_bytes()
        except OSError as err:
            bad.add(e.path, err.strerror or str(err))
            return
        e.digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        meta = known.get(e.digest)
        if meta is not None:
            e.size, e.grey = (meta[0], meta[1]), bool(meta[2])
            return
        try:
            with _open_image(io.BytesIO(data)) as img:
                e.size, e.grey = img.size, img.mode in _GREY_MODES
        except _ImageProblem as err:
            bad.add(e.path, str(err), e.digest)

    with ThreadPoolExecutor(_workers()) as pool:  # reading and hashing release the GIL
        list(pool.map(work, entries))


class _ImageProblem(Exception):
    pass


def _open_image(source: io.BytesIO | Path) -> Image.Image:
    """Open lazily (header only) and refuse non-images and images over ``MAX_PIXELS``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
    except UnidentifiedImageError:
        raise _ImageProblem("not an image file Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _ImageProblem(f"more than {MAX_PIXELS} pixels") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise _ImageProblem(f"cannot be read: {err}") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise _ImageProblem(f"{w}x{h} is over the limit of {MAX_PIXELS} pixels")
    if w < 1 or h < 1:
        img.close()
        raise _ImageProblem("has no pixels")
    return img


def decode_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """One file -> uint8 (channels, size, size): upright, 8-bit, shorter side resized, centre square."""
    try:
        with _open_image(Path(path)) as img:
            img.draft(None, (size, size))  # JPEG: decode at a reduced scale when the image is much larger
            img.load()
            img = ImageOps.exif_transpose(img)
            img = to_8bit(img, grey=channels == 1)
            img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8)
    except _ImageProblem:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated", "broken data stream").
        raise _ImageProblem(f"corrupt or truncated: {err}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def to_8bit(img: Image.Image, grey: bool) -> Image.Image:
    """Any Pillow mode -> 'L' (grey) or 'RGB': 16-bit scaled down, transparency composited over white.

    Public because a trained model converts the images it is given the same way (inference.model.pil_to_tensor).
    """
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        # 16-bit greyscale (PNG, TIFF) arrives as I;16* or I with values 0..65535; scale to 0..255.
        a = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa", "LA", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    target = "L" if grey else "RGB"
    return img if img.mode == target else img.convert(target)  # CMYK, YCbCr, 1, ... via Pillow's conversions


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ------------------------------------------------------------------------------ the cache


class _FolderCache:
    """``DATA_DIR/folder-cache/<folder name>-<hash of its path>/``: ``images-<key>.npy`` and ``manifest.json``.

    The manifest lists, per row of the .npy, the BLAKE2b digest of the source file's bytes, plus every
    digest's (width, height, grey) header facts and the digests found unreadable, so that an unchanged
    folder is loaded without opening an image, and a changed one decodes only its new files.
    """

    def __init__(self, base: Path, root: Path) -> None:
        tag = hashlib.blake2b(str(root.resolve()).encode(), digest_size=8).hexdigest()
        self.dir = base / f"{root.resolve().name or 'root'}-{tag}"
        self.manifest_path = self.dir / "manifest.json"
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict | None:
        try:
            m = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None
        ok = (isinstance(m, dict) and m.get("version") == _CACHE_VERSION and isinstance(m.get("rows"), list)
              and isinstance(m.get("meta"), dict) and (self.dir / str(m.get("file"))).is_file())
        return m if ok else None

    def known_images(self) -> dict[str, list]:
        return dict(self.manifest["meta"]) if self.manifest else {}

    def _old_images(self) -> np.ndarray | None:
        if self.manifest is None:
            return None
        try:
            return np.load(self.dir / self.manifest["file"], mmap_mode="r")
        except (OSError, ValueError):
            return None

    def load_or_build(self, entries: list[_Entry], image_size: int | None, known: dict[str, list],
                      bad: _BadImages, on_bad_image: str) -> tuple[torch.Tensor, list[_Entry]]:
        m = self.manifest
        # Files known to be unreadable are not decoded again.
        if m:
            for e in entries:
                if e.digest in m.get("bad", {}):
                    bad.add(e.path, m["bad"][e.digest], e.digest)
        if bad.items and on_bad_image == "error":
            raise _bad_error(bad)
        good = [e for e in entries if e.path not in bad.items]
        digests = [e.digest for e in good]
        if m and m["rows"] == digests and m["requested_size"] == image_size:
            arr = self._old_images()
            if arr is not None and arr.shape[0] == len(digests):
                return _as_tensor(self.dir / m["file"]), good
        return self._build(good, image_size, bad, on_bad_image)

    def _build(self, entries: list[_Entry], image_size: int | None, bad: _BadImages, on_bad_image: str
               ) -> tuple[torch.Tensor, list[_Entry]]:
        if not entries:
            raise DatasetError("no readable images" + (f"; {bad.message()}" if bad.items else ""))
        size = image_size or min(SIZE_CAP, int(np.median([min(e.size) for e in entries])))
        channels = 1 if all(e.grey for e in entries) else 3
        old = self._old_images()
        old_rows: dict[str, int] = {}
        if old is not None and old.shape[1:] == (channels, size, size):
            old_rows = {d: i for i, d in enumerate(self.manifest["rows"])}  # type: ignore[index]

        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".images-", suffix=".npy.tmp", dir=self.dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(len(entries), channels, size, size))
            failed = _fill(out, entries, size, channels, old, old_rows)
            for i, why in failed.items():
                bad.add(entries[i].path, why, entries[i].digest)
            if failed and on_bad_image == "error":
                raise _bad_error(bad)
            if failed:  # skip: copy the good rows into a file of the right length
                keep = [i for i in range(len(entries)) if i not in failed]
                if not keep:
                    raise DatasetError(f"no readable images; {bad.message()}")
                out = _compact(out, keep, tmp)
                entries = [entries[i] for i in keep]
            out.flush()
            del out
            key = hashlib.blake2b(json.dumps([[e.digest for e in entries], size, channels]).encode(),
                                  digest_size=8).hexdigest()
            final = self.dir / f"images-{key}.npy"
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        meta = {e.digest: [e.size[0], e.size[1], int(e.grey)] for e in entries}
        self._write_manifest({"version": _CACHE_VERSION, "file": final.name, "requested_size": image_size,
                              "rows": [e.digest for e in entries], "meta": meta, "bad": bad.digests})
        for stale in self.dir.glob("images-*.npy"):
            if stale != final:
                stale.unlink(missing_ok=True)
        return _as_tensor(final), entries

    def _write_manifest(self, manifest: dict) -> None:
        with atomic_path(self.manifest_path) as tmp:
            tmp.write_text(json.dumps(manifest))
        self.manifest = manifest


def _fill(out: np.ndarray, entries: list[_Entry], size: int, channels: int, old: np.ndarray | None,
          old_rows: dict[str, int]) -> dict[int, str]:
    """Write every row of ``out``: copied from the old cache when its digest is there, else decoded."""
    failed: dict[int, str] = {}

    def work(i: int) -> None:
        j = old_rows.get(entries[i].digest)
        if j is not None and old is not None:
            out[i] = old[j]
            return
        try:
            out[i] = decode_image(entries[i].path, size, channels)
        except _ImageProblem as err:
            failed[i] = str(err)

    with ThreadPoolExecutor(_workers()) as pool:  # Pillow releases the GIL while decoding and resizing
        list(pool.map(work, range(len(entries))))
    return failed


def _compact(out: np.ndarray, keep: list[int], tmp: Path) -> np.ndarray:
    fd, name = tempfile.mkstemp(prefix=".images-", suffix=".npy.tmp", dir=tmp.parent)
    os.close(fd)
    try:
        small = np.lib.format.open_memmap(name, mode="w+", dtype=np.uint8, shape=(len(keep), *out.shape[1:]))
        for start in range(0, len(keep), 4096):
            small[start:start + 4096] = out[keep[start:start + 4096]]
        small.flush()
        del out
        os.replace(name, tmp)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return np.load(tmp, mmap_mode="r+")


def _as_tensor(path: Path) -> torch.Tensor:
    # Copy-on-write mapping: writable for torch (no warning), pages shared and read lazily, file never modified.
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def _bad_error(bad: _BadImages) -> DatasetError:
    return DatasetError(f"{bad.message()}; fix or remove them, or pass --on-bad-image skip to leave them out")


# ----------------------------------------------------------------------------- the data set


def _check_classes(entries: list[_Entry], classes: list[str], root: Path) -> None:
    counts = np.bincount([e.label for e in entries if e.role == "train"], minlength=len(classes))
    empty = [classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DatasetError(f"class(es) {', '.join(empty)} of {root} have no readable labeled images; "
                           "add images or remove the class")


def _make_dataset(root: Path, images: torch.Tensor, entries: list[_Entry], classes: list[str]) -> Dataset:
    roles = [e.role for e in entries]
    n_train, n_test = roles.count("train"), roles.count("test")
    labels = torch.tensor([e.label for e in entries], dtype=torch.int64)
    # Rows are ordered train, test, unlabeled: each part is a slice of the memory-mapped cache, not a copy.
    return Dataset(
        name=f"folder:{root}",
        train_images=images[:n_train],
        train_labels=labels[:n_train],
        test_images=images[n_train:n_train + n_test],
        test_labels=labels[n_train:n_train + n_test],
        class_names=list(classes),
        **_unlabeled_pool(images[n_train + n_test:]),
    )


def _unlabeled_pool(images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"unlabeled_images": images}
