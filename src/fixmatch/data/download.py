"""Checksummed, atomic file downloads (urllib only, no extra dependencies)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

__all__ = ["DatasetError", "download_file", "file_md5"]

_CHUNK = 1 << 20
_PROGRESS_MIN_BYTES = 5 << 20  # only show a progress bar for files worth waiting on


class DatasetError(Exception):
    """User-facing data problem: the message says what is wrong and how to fix it.

    Defined here, the lowest-level data module, so that ``datasets`` can import it
    without an import cycle; it is re-exported from ``fixmatch.data.datasets``.
    """


def file_md5(path: str | Path) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: str | Path, md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` and check its MD5; returns ``dest``.

    The data is streamed into a temporary file next to ``dest`` and renamed only
    once the checksum matches, so ``dest`` never holds a partial or corrupt file; a failed download also
    removes the folders it created for ``dest``.
    An existing ``dest`` with the right checksum is kept without downloading.
    """
    dest = Path(dest)
    md5 = md5.lower()
    if dest.is_file() and file_md5(dest) == md5:
        return dest
    manual = f"download it manually from {url} and save it as {dest}"
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # removed again on failure
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        _remove_empty(created)
        raise DatasetError(f"cannot write to {dest.parent} ({e}); choose a writable data_dir or {manual}") from e
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            bar = _progress(total, dest.name)
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        actual = digest.hexdigest()
        if actual != md5:
            raise DatasetError(
                f"checksum mismatch for {url}: expected MD5 {md5}, got {actual}; "
                f"the download is corrupt or the file changed upstream: retry, or {manual}"
            )
        os.replace(tmp, dest)  # atomic within one folder
    except DatasetError:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise
    except (urllib.error.URLError, HTTPException, OSError, ValueError) as e:
        # URLError/HTTPError are OSError subclasses; ValueError covers malformed URLs.
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e  # keep HTTP codes
        raise DatasetError(f"could not download {url} ({reason}); check your connection or {manual}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. KeyboardInterrupt: leave no partial file behind
        _remove_empty(created)
        raise
    return dest


def _remove_empty(folders: list[Path]) -> None:
    """Undo a failed download's folders, deepest first; one that now holds anything (another file) stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _progress(total: int, name: str):
    if total < _PROGRESS_MIN_BYTES:
        return None
    from tqdm.auto import tqdm

    # disable=None turns the bar off when stderr is not a terminal (logs, CI).
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=None)
