"""``--labels-csv FILE``: the labeled training images, as a person labeled them (the labeling page saves this file).

Two formats, one reader: ``index,label`` rows for a built-in data set (index: the image's position in the training
set; header required) and ``path,label`` rows for a folder data set (folder.py; header optional). A label is a class
name, or for a built-in data set also a class number. Blank rows are skipped. Every refusal is one line naming the
file, the line and the value, and the fix.

A relative path in a ``path,label`` file is looked up next to the file first, then under the data set's folder: the
labeling page's labels.csv lands in the browser's download folder with paths relative to the data set's folder
(``resolve_csv_path``; every reader of such a file uses it).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import sys
from pathlib import Path

import torch

from .dataset import Dataset
from .download import DatasetError

__all__ = ["read_rows", "read_index_labels", "apply_labels_csv", "resolve_csv_path", "read_path_labels"]

_SHOWN = 5  # missing files named in an error message before "and N more"
_HEADERS = {"index": "built-in data sets (--dataset fashion-mnist, cifar10, ...)", "path": "folder data sets"}


def read_rows(csv_path: Path, id_column: str, header_required: bool) -> list[tuple[int, str, str]]:
    """(line number, first field, label) of each non-blank row after the header ``<id_column>,label``."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"labels file {csv_path} not found; check --labels-csv") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read labels file {csv_path} ({e}); it must be UTF-8 text") from None
    reader = csv.reader(io.StringIO(text))
    rows: list[tuple[int, str, str]] = []
    first = True
    for row in reader:
        if not row or all(not c.strip() for c in row):
            continue
        cells = [c.strip() for c in row]
        if first:
            first = False
            header = [c.lower() for c in cells]
            if header == [id_column, "label"]:
                continue
            other = next((h for h in _HEADERS if h != id_column and header == [h, "label"]), None)
            if other is not None:
                raise DatasetError(f"{csv_path} has {other},label rows, which are for {_HEADERS[other]}; this "
                                   f"data set needs {id_column},label rows")
            if header_required:
                raise DatasetError(f"{csv_path} line {reader.line_num}: expected the header '{id_column},label', "
                                   f"got {','.join(row)!r}; add that header as the first line")
        if len(cells) != 2 or not cells[0] or not cells[1]:
            raise DatasetError(f"{csv_path} line {reader.line_num}: expected '{id_column},label', "
                               f"got {','.join(row)!r}")
        rows.append((reader.line_num, cells[0], cells[1]))
    if not rows:
        raise DatasetError(f"{csv_path} lists no images; add rows '{id_column},label' (one per labeled image)")
    return rows


def _find(csv_path: Path, root: Path, value: str) -> Path | None:
    """The rule: next to the CSV first, then under the data set's folder ``root`` (absolute paths stay as given)."""
    for path in (csv_path.parent / value, root / value):
        if path.is_file():
            return path
    return None


def resolve_csv_path(csv_path: str | Path, root: str | Path, value: str, line: int | None = None) -> Path:
    """The image file that ``value`` (a path field of ``csv_path``, on line ``line`` if given) names: looked up next to
    the CSV first, then under the folder data set ``root``; a one-line DatasetError if neither holds it."""
    csv_path, root = Path(csv_path).expanduser(), Path(root).expanduser()
    path = _find(csv_path, root, value)
    if path is None:
        where = f" line {line}" if line is not None else ""
        raise DatasetError(f"{csv_path}{where}: no image {value} (paths are relative to the CSV's folder or to "
                           f"{root}); fix or remove that row")
    return path


def read_path_labels(csv_path: str | Path, root: str | Path) -> list[tuple[Path, str]]:
    """(image file, class name) of each ``path,label`` row (header optional), paths resolved as ``resolve_csv_path``
    does. Refused in one line: missing files (all of them named, up to a few), a file listed twice."""
    csv_path, root = Path(csv_path).expanduser(), Path(root).expanduser()
    rows: list[tuple[Path, str]] = []
    missing: list[str] = []
    for line_no, name, label in read_rows(csv_path, "path", header_required=False):
        path = _find(csv_path, root, name)
        if path is None:
            missing.append(f"{csv_path.parent / name} (line {line_no})")
        else:
            rows.append((path, label))
    if missing:
        more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        raise DatasetError(f"{csv_path} lists {len(missing)} missing file(s): {', '.join(missing[:_SHOWN])}{more}; "
                           f"paths are relative to the CSV's folder or to {root}: fix or remove those rows")
    seen: set[Path] = set()
    for path, _ in rows:
        if path in seen:
            raise DatasetError(f"{csv_path} lists {path} twice; keep one row per image")
        seen.add(path)
    return rows


def read_index_labels(csv_path: str | Path, num_train: int, class_names: list[str]) -> dict[int, int]:
    """Training-set index -> class number, from ``index,label`` rows (in the file's order).

    Refused in one line: an index that is not a whole number or lies outside the training set, a label that is
    neither a class name nor a class number, an index listed twice.
    """
    csv_path = Path(csv_path).expanduser()
    by_name = {name: c for c, name in enumerate(class_names)}
    by_number = {str(c): c for c in range(len(class_names))}
    labels: dict[int, int] = {}
    first_line: dict[int, int] = {}
    for line, index_text, label in read_rows(csv_path, "index", header_required=True):
        try:
            index = int(index_text)
        except ValueError:
            raise DatasetError(f"{csv_path} line {line}: index {index_text!r} is not a whole number; give the "
                               f"image's position in the training set (0 to {num_train - 1})") from None
        if not 0 <= index < num_train:
            raise DatasetError(f"{csv_path} line {line}: index {index} is outside the training set (0 to "
                               f"{num_train - 1}); fix or remove that row")
        c = by_name.get(label, by_number.get(label))
        if c is None:
            raise DatasetError(f"{csv_path} line {line}: unknown class {label!r}; use a class name "
                               f"({', '.join(class_names)}) or number (0 to {len(class_names) - 1})")
        if index in labels:
            raise DatasetError(f"{csv_path} line {line}: index {index} is listed again (first on line "
                               f"{first_line[index]}); keep one row per image")
        labels[index], first_line[index] = c, line
    return labels


def apply_labels_csv(data: Dataset, csv_path: str | Path) -> Dataset:
    """``data`` whose labeled images are exactly the file's, with the file's labels (a person's labels replace the
    data set's own for those images; the others' labels are never used for training).

    Refused besides ``read_index_labels``'s refusals: a class with no labeled image, which training could not
    learn.
    """
    csv_path = Path(csv_path).expanduser()
    given = read_index_labels(csv_path, data.train_labels.numel(), data.class_names)
    missing = [name for c, name in enumerate(data.class_names) if c not in set(given.values())]
    if missing:
        raise DatasetError(f"{csv_path} labels no image of class(es) {', '.join(missing)}; label at least one "
                           f"image of every class of {data.name}")
    indices = torch.tensor(list(given), dtype=torch.long)
    values = torch.tensor(list(given.values()), dtype=torch.int64)
    differ = int((data.train_labels[indices] != values).sum())
    if differ:  # a person's mistakes, or the data set's: worth knowing either way
        print(f"fixmatch: {differ} of the {len(given)} labels in {csv_path} differ from {data.name}'s own labels "
              f"of those images; training uses the file's", file=sys.stderr)
    labels = data.train_labels.clone()
    labels[indices] = values
    return dataclasses.replace(data, train_labels=labels, labeled_indices=sorted(given))
