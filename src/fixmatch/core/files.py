"""Reading and writing files that someone else may have put there, without following a link or blocking.

A folder may come from someone else (a shared runs folder, a copied run, a split file handed over), so its
entries are not trusted: a file opened in place is opened with ``O_NOFOLLOW`` and ``O_NONBLOCK`` and used only if
the descriptor is a regular file that the path still names (and, for a file changed in place, that has no
other hard link); a file replaced whole is written to a fresh temporary (atomic.py). A link or a special file
where a regular file belongs is refused in one line naming what it is. These checks are made on paths: a
process that changes the folder meanwhile can still race them, so such folders should be writable by their
owner only.
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from fixmatch.core.atomic import atomic_file

# A path that someone else may have put there: never followed if a link, never blocking if a FIFO.
_SAFE_OPEN = (getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
              | getattr(os, "O_NOCTTY", 0))


class FileError(RuntimeError):
    """A file cannot be used safely or written: a link or a special file where a regular file belongs, a file
    with other hard links, a full disk (message: one line, with the fix)."""


def open_regular(path: str | Path, flags: int, mode: int = 0o666, single_link: bool = False) -> int:
    """A descriptor of ``path`` if it is a regular file, else ``FileError`` naming what it is.

    Refused: a link (``O_NOFOLLOW``; its target is never opened), a FIFO (opened without blocking, then refused),
    a device, a folder, a file that the path no longer names once open, and, with ``single_link`` (files
    changed in place), a file with other hard links, which would be changed through them too.
    A missing file raises ``FileNotFoundError`` unless ``flags`` hold ``O_CREAT``.
    """
    path = Path(path)
    try:
        fd = os.open(path, flags | _SAFE_OPEN, mode)
    except OSError:
        kind = file_kind(path)
        if kind is not None:  # ELOOP/EMLINK for a link, ENXIO for a FIFO, EISDIR for a folder
            raise not_regular_error(path, kind) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not os.path.samestat(st, os.lstat(path)):
            raise not_regular_error(path, file_kind(path) or "not the file that was opened")
        if single_link and st.st_nlink > 1:
            raise FileError(f"refusing {path}: it has {st.st_nlink} hard links, so writing it would change "
                            f"another file too; replace it by a copy of its own, then run the command again")
        _set_blocking(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_run_file(path: str | Path) -> str | None:
    """The text of a file, or None if there is none; never read through a link or from a FIFO."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with open(fd) as f:
        return f.read()


def check_regular_file(path: str | Path) -> None:
    """Refuse in one line a link or a special file at ``path`` (an absent file is fine), for a file that is
    opened by name elsewhere: a check before the open, where ``open_regular`` cannot be used."""
    path = Path(path)
    kind = file_kind(path)
    if kind is not None:
        raise not_regular_error(path, kind)


def _set_blocking(fd: int) -> None:
    """O_NONBLOCK only kept the open of a FIFO from waiting; a regular file's reads and writes stay as usual."""
    if os.name == "posix":
        os.set_blocking(fd, True)


def file_kind(path: str | Path) -> str | None:
    """What ``path`` is if it exists and is not a regular file (for messages), else None."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        with contextlib.suppress(OSError):
            return f"a symbolic link to {os.readlink(path)}"
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"


def not_regular_error(path: str | Path, kind: str) -> FileError:
    """The one-line refusal of ``path``, which is ``kind`` (``file_kind``) where a regular file belongs."""
    return FileError(f"refusing {path}: it is {kind}, not a regular file (a run directory's files are never "
                     f"links or special files); remove it, then run the command again")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``, atomically (atomic.py): it is whole, or the old one, or absent.

    A link or a special file at ``path`` is refused rather than replaced: the folder is not as its writer left
    it, and its owner should see why.
    """
    path = Path(path)
    check_regular_file(path)
    try:
        with atomic_file(path) as f:
            f.write(text)
    except OSError as e:
        raise _write_error(path, e) from None


def append_line(path: str | Path, line: str) -> None:
    """Append one line and fsync; if the write fails (disk full), cut the file back so no torn line is left.

    The file is opened without following a link or blocking on a FIFO, and only a regular file of its own
    (no other hard link) is appended to.
    """
    path = Path(path)
    try:
        fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, single_link=True)
        with open(fd, "a") as f:  # owns fd; append mode starts at the end, so tell() is the old size
            size = f.tell()
            try:
                f.write(line.rstrip("\n") + "\n")
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                with contextlib.suppress(OSError):  # shrinking a file needs no free space
                    f.truncate(size)
                raise
    except OSError as e:
        raise _write_error(path, e) from None


def _write_error(path: Path, e: OSError) -> FileError:
    # The files written this way are a run's (metrics, summary, config), hence the advice to resume.
    return FileError(f"cannot write {path} ({e.strerror or e}); free disk space or make the folder writable, "
                     f"then resume the run with --resume")
