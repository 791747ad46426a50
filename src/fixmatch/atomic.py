"""Files replaced whole: a reader (or a crash) sees the previous file or the new one, never a part of it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "default_permissions"]


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write instead of ``path``; a clean exit syncs it and renames it over ``path``.

    The temporary file is ``.<name>.<random><suffix>`` in the same folder (a rename within a folder is
    atomic, and two writers never share a name). It gets the permissions a plain ``open`` would give
    (``mkstemp`` makes it private). If the block raises, the file is removed and ``path`` is untouched.
    The file is synced before the rename and the folder after it, so a power cut keeps one whole version.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)  # the data reach the disk before the rename makes them the file's content
        os.chmod(tmp, default_permissions())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder; the file itself is synced
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    folder = path.is_dir()
    if folder and os.name != "posix":  # Windows cannot open a folder; its renames are durable on NTFS
        return
    fd = os.open(path, os.O_RDONLY if folder else os.O_RDWR)  # Windows syncs only writable files
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_permissions() -> int:
    """The mode a new file gets from ``open``: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
