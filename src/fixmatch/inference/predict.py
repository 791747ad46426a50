"""`fixmatch predict`: classify image files and folders with a trained model.

Files are decoded with the pixel-limited opener (data/safe_image.py) and converted as folder data sets
convert their images (``inference.model.pil_to_tensor``); a file that cannot be read becomes a row with an
``error`` and the others go on.
"""
from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from fixmatch.config import ConfigError
from fixmatch.data.download import DatasetError
from fixmatch.data.folder import IMAGE_EXTENSIONS
from fixmatch.data.safe_image import open_image
from fixmatch.inference.model import FixMatchModel, pil_to_tensor

FORMATS = ("table", "csv", "json")


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files named on the command line as given; folders searched recursively for image extensions.

    A named file is always tried (its reading reports whether it is an image); inside folders only
    files with a known image extension are taken, in sorted order. A missing path is an error.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            found.append(p)
        else:
            raise ConfigError(f"no such file or folder: {p}")
    return found


def _read(path: Path, model: FixMatchModel) -> torch.Tensor:
    with open_image(path) as img:
        return pil_to_tensor(img, model.spec.in_channels, model.spec.input_size)


def predict_files(model: FixMatchModel, files: Sequence[Path], batch_size: int = 64, top_k: int = 1
                  ) -> Iterator[dict[str, Any]]:
    """One row per file, in order: {path, predictions: [{class, confidence}] (top_k, best first)} or
    {path, error}. Files are read and classified ``batch_size`` at a time."""
    for start in range(0, len(files), batch_size):
        rows: list[dict[str, Any]] = []
        images: list[torch.Tensor] = []
        for path in files[start:start + batch_size]:
            try:
                images.append(_read(path, model))
                rows.append({"path": str(path)})
            except (DatasetError, OSError, ValueError) as e:  # unreadable, not an image, too large
                rows.append({"path": str(path), "error": str(e)})
        if images:
            top = iter(model.predict(torch.cat(images), batch_size=batch_size).top(top_k))
            for row in rows:
                if "error" not in row:
                    row["predictions"] = [{"class": c, "confidence": p} for c, p in next(top)]
        yield from rows


def write_rows(rows: Iterator[dict[str, Any]], fmt: str, out: TextIO | None = None, err: TextIO | None = None,
               top_k: int = 1) -> tuple[int, int]:
    """Print the rows in ``fmt`` as they come (JSON: one array at the end); errors also go to ``err``.

    Table and CSV output start with a header row; the table's names ``top_k`` (class, confidence) pairs.
    Returns (files classified, files that could not be read).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    out, err = out or sys.stdout, err or sys.stderr
    ok = bad = 0
    collected = []
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(["path", "rank", "class", "confidence", "error"])
    elif fmt == "table":
        out.write(table_header(top_k) + "\n")
    for row in rows:
        if "error" in row:
            bad += 1
            print(f"fixmatch: cannot read {row['path']}: {row['error']}", file=err)
        else:
            ok += 1
        if fmt == "json":
            collected.append(row)
        elif writer is not None:
            if "error" in row:
                writer.writerow([row["path"], "", "", "", row["error"]])
            for rank, p in enumerate(row.get("predictions", []), 1):
                writer.writerow([row["path"], rank, p["class"], f"{p['confidence']:.6f}", ""])
        else:
            out.write(_table_line(row) + "\n")
        out.flush()
    if fmt == "json":
        json.dump(collected, out, indent=2)
        out.write("\n")
    return ok, bad


def table_header(top_k: int = 1) -> str:
    """The table's column names: path, then class and confidence (numbered from 1 when there are several)."""
    if top_k == 1:
        return "path\tclass\tconfidence"
    return "\t".join(["path"] + [f"class_{i}\tconfidence_{i}" for i in range(1, top_k + 1)])


def _table_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['path']}\tERROR\t{row['error']}"
    return "\t".join([row["path"]] + [f"{p['class']}\t{p['confidence']:.4f}" for p in row["predictions"]])

