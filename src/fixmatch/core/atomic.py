"""Files replaced whole: a reader (or a crash) sees the previous file or the new one, never a part of it.

The temporary file is made with ``O_EXCL`` (``mkstemp``), so a link planted in the folder is never written
through. Before the rename it is reopened without following links and checked to be a regular file, so a link
or a FIFO put at the temporary's name meanwhile is neither changed (no ``chmod`` through a link) nor renamed
into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_file", "atomic_path", "default_permissions"]

# Opening a path that may have been replaced: never through a link, never blocking on a FIFO.
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write instead of ``path``; a clean exit syncs it and renames it over ``path``.

    The temporary file is ``.<name>.<random><suffix>`` in the same folder (a rename within a folder is
    atomic, and two writers never share a name). It gets the permissions a plain ``open`` would give
    (``mkstemp`` makes it private). If the block raises, the file is removed and ``path`` is untouched.
    The file is synced before the rename and the folder after it, so a power cut keeps one whole version.
    A writer that can, should prefer ``atomic_file``: it never opens the temporary by name again.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = _open_own_file(tmp)
        try:
            _finish(fd, tmp)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # removes the name only, whatever it names now
    _sync_folder(path.parent)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", suffix: str = ".tmp", **kwargs: Any) -> Iterator[IO[Any]]:
    """Like ``atomic_path``, but yield the temporary file already open for writing (``open`` ``mode`` and
    ``kwargs``): the file written is the one ``mkstemp`` created, whatever its name is made to point to."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    tmp = Path(name)
    try:
        try:
            f = open(fd, mode, **kwargs)  # owns fd from here: closed with f
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            _finish(f.fileno(), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sync_folder(path.parent)


def _open_own_file(tmp: Path) -> int:
    """The temporary reopened by name: refused if a link, a FIFO or a folder has taken its place."""
    try:
        fd = os.open(tmp, os.O_RDWR | _NO_FOLLOW)  # Windows syncs only writable files
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EISDIR):  # EMLINK: a link, on BSD
            raise _replaced(tmp) from None
        raise
    return fd


def _finish(fd: int, tmp: Path) -> None:
    """Sync and set the usual permissions, on the descriptor (a chmod by name would follow a link)."""
    st = os.fstat(fd)
    named = os.lstat(tmp)
    if not stat.S_ISREG(st.st_mode) or not os.path.samestat(st, named):
        raise _replaced(tmp)
    os.fsync(fd)  # the data reach the disk before the rename makes them the file's content
    if hasattr(os, "fchmod"):
        os.fchmod(fd, default_permissions())
    else:  # pragma: no cover - Windows before Python 3.13, which has no links to follow here
        os.chmod(tmp, default_permissions())


def _replaced(tmp: Path) -> OSError:
    return OSError(errno.EEXIST, f"temporary file {tmp.name} was replaced by something other than the file "
                                 f"written (another process writes in this folder)", str(tmp))


def _sync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder; its renames are durable on NTFS
        return
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder; the file itself is synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def default_permissions() -> int:
    """The mode a new file gets from ``open``: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
