"""``fixmatch advise``: which training images a person should label first, on a budget.

Embed every training image (a ``fixmatch pretrain`` run's network with ``--features``, else a fixed random
projection of the pixels, runs/features.py), take the images already labeled as ``fixmatch train`` would (the
rows of ``--labels-csv`` alone where it is given; else, for a folder data set, its labeled/<class>/ folders or its
own labels.csv), run TypiClust (core/typiclust.py) for ``budget`` more, and write

    OUT/to_label.csv   index (built-in data sets: position in the training set) or path (folder data sets:
                       relative to the folder), cluster, cluster_size, typicality; one row per image, in the
                       order picked (largest cluster first)
    OUT/index.html     the labeling page (labeling_page.py), which saves the labels.csv that
                       ``fixmatch train --labels-csv`` reads: the labels given so far, then the new answers,
                       so that the file is the whole labeled set (train --labels-csv uses nothing else)

Both files are written atomically, the page first; OUT may hold nothing else, so that a typo in --out never mixes
with other files.
"""
from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fixmatch.config import ConfigError
from fixmatch.core.files import write_text_atomic
from fixmatch.core.preprocess import resolve_device
from fixmatch.core.typiclust import Pick, typiclust
from fixmatch.data.datasets import default_data_dir, load_dataset
from fixmatch.data.folder_pool import load_folder_pool
from fixmatch.data.labels_file import read_index_labels, read_path_labels
from fixmatch.inference.labeling_page import write_labeling_page
from fixmatch.runs.features import PIXEL_FEATURES, network_features, pixel_features
from fixmatch.runs.model_spec import load_model_checkpoint

__all__ = ["advise", "Advice", "TO_LABEL_NAME", "PAGE_NAME"]

TO_LABEL_NAME = "to_label.csv"
PAGE_NAME = "index.html"
_OWN_FILES = frozenset({TO_LABEL_NAME, PAGE_NAME})


@dataclass(frozen=True)
class Advice:
    picks: list[Pick]  # in the order picked
    ids: list[str]  # each pick's index (built-in data set) or path (folder), as to_label.csv writes it
    csv_path: Path
    page_path: Path
    features: str  # what the images were embedded with, in words
    num_labeled: int  # images already labeled before this advice


@dataclass(frozen=True)
class _Pool:
    images: torch.Tensor  # uint8 (N, C, H, W)
    ids: list[str]
    id_column: str  # "index" or "path"
    labeled: list[int]  # rows already labeled
    classes: list[str]
    given: list[tuple[str, str]]  # (id, class name) of each labeled row, for the page to save with the new labels


def advise(dataset: str, budget: int, out: str | Path, *, features: str | Path | None = None,
           labels_csv: str | Path | None = None, seed: int = 0, data_dir: str | Path | None = None,
           device: str = "auto", classes: list[str] | None = None) -> Advice:
    """Propose ``budget`` more images of ``dataset``'s training set to label; write OUT/to_label.csv and
    OUT/index.html. ``features``: a pretrain run directory (or checkpoint); ``labels_csv``: the labels given so far."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"--budget must be a positive number of images, got {budget!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    _check_out(out)
    dev = resolve_device(device)
    network = load_model_checkpoint(features, "ema") if features else None  # refused early if it is no checkpoint
    size = network.spec.input_size if network is not None else None
    pool = _load_pool(dataset, data_dir, labels_csv, classes, size[0] if size else None)
    unlabeled = len(pool.ids) - len(pool.labeled)
    if budget > unlabeled:
        raise ConfigError(f"--budget {budget} is more than the {unlabeled} training images not labeled yet; "
                          f"ask for at most {unlabeled}")
    if network is not None:
        if tuple(pool.images.shape[2:]) != tuple(network.spec.input_size):
            raise ConfigError(f"--features {features} was trained on {network.spec.input_size[0]}x"
                              f"{network.spec.input_size[1]} images but {dataset} has {pool.images.shape[2]}x"
                              f"{pool.images.shape[3]}; pretrain on this data set (fixmatch pretrain)")
        feats = network_features(network, pool.images, device=dev, flag="--features")
        what = f"the features of the pretrained network in {features}"
    else:
        print(f"fixmatch: no --features: embedding the images with {PIXEL_FEATURES}; for features learned "
              "from these images, run fixmatch pretrain and pass --features RUN_DIR", file=sys.stderr)
        feats = pixel_features(pool.images)
        what = PIXEL_FEATURES
    picks = typiclust(feats.numpy(), budget, pool.labeled, seed=seed)
    ids = [pool.ids[p.index] for p in picks]

    out.mkdir(parents=True, exist_ok=True)
    csv_path, page_path = out / TO_LABEL_NAME, out / PAGE_NAME
    chosen = pool.images[[p.index for p in picks]].permute(0, 2, 3, 1).contiguous().numpy()
    write_labeling_page(page_path, np.asarray(chosen, dtype=np.uint8), ids, pool.classes, id_column=pool.id_column,
                        title=f"fixmatch: {budget} images of {_short(dataset)} to label", given=pool.given)
    # to_label.csv last: scripts read it, so once it is there (replaced) the whole advice, page included, is.
    write_text_atomic(csv_path, _to_label_csv(pool.id_column, ids, picks))
    return Advice(picks, ids, csv_path, page_path, what, len(pool.labeled))


def _to_label_csv(id_column: str, ids: list[str], picks: list[Pick]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([id_column, "cluster", "cluster_size", "typicality"])
    for i, p in zip(ids, picks):
        writer.writerow([i, p.cluster, p.cluster_size, f"{p.typicality:.6g}"])
    return buffer.getvalue()


def _check_out(out: Path) -> None:
    """OUT is new, empty, or holds only the files an earlier advice wrote (which are replaced)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose a new folder")
    if out.is_dir():
        try:
            others = sorted(name for name in os.listdir(out) if name not in _OWN_FILES)
        except OSError as e:
            raise ConfigError(f"cannot list --out {out} ({e.strerror or e}); choose another folder") from None
        if others:
            raise ConfigError(f"--out {out} holds other files ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); choose a new or empty folder")


def _load_pool(dataset: str, data_dir: str | Path | None, labels_csv: str | Path | None,
               classes: list[str] | None, image_size: int | None) -> _Pool:
    if dataset.startswith("folder:"):
        return _folder_pool(Path(dataset[len("folder:"):]).expanduser(), data_dir, labels_csv, classes, image_size)
    if classes is not None:
        raise ConfigError(f"--classes names the classes of a folder data set; {dataset} has its own: drop --classes")
    data = load_dataset(dataset, data_dir)  # the training set only: labels.csv indices refer to it
    given = read_index_labels(labels_csv, data.train_labels.numel(), data.class_names) if labels_csv else {}
    return _Pool(data.train_images, [str(i) for i in range(data.train_labels.numel())], "index", sorted(given),
                 list(data.class_names), [(str(i), data.class_names[c]) for i, c in given.items()])


def _folder_pool(root: Path, data_dir: str | Path | None, labels_csv: str | Path | None,
                 classes: list[str] | None, image_size: int | None) -> _Pool:
    """The labeled set is what ``fixmatch train`` would use (folder.py): the rows of --labels-csv alone (labeled/
    then plays no part, so its images are left out of the pool too); else labeled/<class>/ or the folder's own
    labels.csv, refused when both exist."""
    csv_path = Path(labels_csv).expanduser() if labels_csv else root / "labels.csv"
    if not labels_csv and csv_path.is_file() and (root / "labeled").is_dir():
        raise ConfigError(f"{root} has both labeled/ and labels.csv; remove one, or pass --labels-csv {csv_path} "
                          "to use the CSV")
    # The labels given so far, read (paths resolved, refusals) exactly as train reads them.
    rows = read_path_labels(csv_path, root) if labels_csv or csv_path.is_file() else []
    pool = load_folder_pool(root, default_data_dir() if data_dir is None else data_dir, image_size,
                            extra=[p for p, _ in rows])
    paths = [os.path.realpath(p) for p in pool.paths]
    keep = list(range(len(paths)))
    if rows:  # labeled/ is not read by train with a CSV: neither its labels nor its images
        named = {os.path.realpath(p) for p, _ in rows}
        keep = [i for i in keep if i not in pool.labeled or paths[i] in named]
    row_of = {paths[i]: k for k, i in enumerate(keep)}
    all_ids = pool.ids()
    ids = [all_ids[i] for i in keep]
    if rows:
        labeled: dict[int, tuple[str, str]] = {}  # row -> (class name, where it was labeled)
        for p, label in rows:
            k = row_of.get(os.path.realpath(p))
            if k is None:  # unreadable: load_folder_pool named it on stderr
                continue
            if k in labeled:  # two paths to one file (a link)
                raise ConfigError(f"{csv_path} names {p} twice (by another path too); keep one row per image")
            labeled[k] = (label, f"the row of {p} in {csv_path}")
        names = classes or sorted({label for label, _ in labeled.values()})
    else:
        labeled = {k: (pool.labeled[i], f"{root / 'labeled' / pool.labeled[i]}/") for k, i in enumerate(keep)
                   if i in pool.labeled}
        names = classes or pool.classes
    if not names:
        raise ConfigError(f"{root} has no class names yet (no labeled/<class>/ folders, no labels.csv): pass "
                          "--classes a,b,c with the names the labeling page should offer")
    if len(set(names)) != len(names):
        raise ConfigError(f"--classes lists a name twice ({','.join(names)}); give each class once")
    for label, where in labeled.values():
        if label not in names:  # a typo in --classes would otherwise split one class in two
            raise ConfigError(f"{where} labels class {label!r}, which --classes ({','.join(names)}) lacks; "
                              "add it to --classes")
    if len(keep) < len(paths):  # after the refusals, so that one stays a single line
        print(f"fixmatch: {len(paths) - len(keep)} images under {root / 'labeled'} left out: with {csv_path} the "
              "labeled images are its rows alone, as for fixmatch train", file=sys.stderr)
    images = pool.images if len(keep) == len(paths) else pool.images[keep]
    return _Pool(images, ids, "path", sorted(labeled), list(names),
                 [(ids[k], label) for k, (label, _) in labeled.items()])


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3):]
