"""Writing a run directory safely: one writer at a time, files that are whole or absent, and no file written
or read through a link.

One run directory, one writer: an advisory lock on RUN_DIR/.lock is held while a run trains.

The lock is taken on an open file descriptor (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows), so the
operating system releases it when the process ends in any way, SIGKILL and power loss included: a crash never
leaves a run directory stuck. The file's content (the holder's pid) is only informative; a lock file left
behind by a dead process is simply locked again. ``fcntl.flock`` locks are not reliable on some network file
systems (older NFS); keep run directories on a local disk when two machines could start the same run.

A run directory may come from someone else (a shared runs folder, a copied run), so its entries are not
trusted: a file a run opens in place (the lock, metrics.jsonl) is opened with ``O_NOFOLLOW`` and ``O_NONBLOCK``
and used only if the descriptor is a regular file that the path still names and that has no other hard link;
files replaced whole are written to a fresh temporary (atomic.py); and when the lock is taken, a link or a
special file where the run keeps its files, checkpoints or TensorBoard logs is refused in one line. The
directory named by --out may itself be a link: the user chose it, and nothing but the run's own files is
ever written or removed there (a ``.lock`` that is not a fixmatch lock file is refused, not truncated).
These checks are made on paths: a process that changes the directory while a run writes it can still race
them, so a run directory should be writable by its owner only (as the folders a run creates are, with the
usual umask).
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fixmatch.core.atomic import atomic_file

LOCK_NAME = ".lock"
# What a run keeps in its directory (train.py): files replaced whole or appended, and two folders.
RUN_FILES = ("config.yaml", "split.json", "metrics.jsonl", "summary.json")
CHECKPOINT_FILES = ("last.pt", "best.pt")
RUN_FOLDERS = ("checkpoints", "tensorboard")

# A path that someone else may have put there: never followed if a link, never blocking if a FIFO.
_SAFE_OPEN = (getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
              | getattr(os, "O_NOCTTY", 0))
_LOCK_CONTENT = re.compile(rb"\d*\n?")  # what a fixmatch lock file holds: a pid, or nothing yet


class RunDirError(RuntimeError):
    """The run directory is in use by another process, cannot be written, or holds a link or a special file where
    a run keeps its files (message: one line, with the fix)."""


def open_regular(path: str | Path, flags: int, mode: int = 0o666, single_link: bool = False) -> int:
    """A descriptor of ``path`` if it is a regular file, else ``RunDirError`` naming what it is.

    Refused: a link (``O_NOFOLLOW``; its target is never opened), a FIFO (opened without blocking, then refused),
    a device, a folder, a file that the path no longer names once open, and, with ``single_link`` (files
    changed in place), a file with other hard links, which would be changed through them too.
    A missing file raises ``FileNotFoundError`` unless ``flags`` hold ``O_CREAT``.
    """
    path = Path(path)
    try:
        fd = os.open(path, flags | _SAFE_OPEN, mode)
    except OSError:
        kind = _kind(path)
        if kind is not None:  # ELOOP/EMLINK for a link, ENXIO for a FIFO, EISDIR for a folder
            raise _not_regular(path, kind) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not os.path.samestat(st, os.lstat(path)):
            raise _not_regular(path, _kind(path) or "not the file that was opened")
        if single_link and st.st_nlink > 1:
            raise RunDirError(f"refusing {path}: it has {st.st_nlink} hard links, so writing it would change "
                              f"another file too; replace it by a copy of its own, then run the command again")
        _set_blocking(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_run_file(path: str | Path) -> str | None:
    """The text of a run directory's file, or None if there is none; never read through a link or from a FIFO."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with open(fd) as f:
        return f.read()


def check_regular_file(path: str | Path) -> None:
    """Refuse in one line a link or a special file at ``path`` (an absent file is fine), for a run directory's
    file that is opened by name elsewhere: a check before the open, where ``open_regular`` cannot be used."""
    path = Path(path)
    kind = _kind(path)
    if kind is not None:
        raise _not_regular(path, kind)


def _set_blocking(fd: int) -> None:
    """O_NONBLOCK only kept the open of a FIFO from waiting; a regular file's reads and writes stay as usual."""
    if os.name == "posix":
        os.set_blocking(fd, True)


def _kind(path: Path) -> str | None:
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


def _not_regular(path: Path, kind: str) -> RunDirError:
    return RunDirError(f"refusing {path}: it is {kind}, not a regular file (a run directory's files are never "
                       f"links or special files); remove it, then run the command again")


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse, in one line, a link or a special file where a run keeps its files and folders.

    Called with the lock held, before anything is read or written: a run directory handed over with a link at
    checkpoints/ or metrics.jsonl is refused at the start, not after hours of training.
    """
    run_dir = Path(run_dir)
    for name in RUN_FOLDERS:
        kind = _kind(run_dir / name)
        if kind is not None and kind != "a folder":
            raise RunDirError(f"refusing {run_dir / name}: it is {kind}, not a folder (a run directory's folders "
                              f"are never links); remove it, then run the command again")
    for path in [run_dir / n for n in RUN_FILES] + [run_dir / "checkpoints" / n for n in CHECKPOINT_FILES]:
        check_regular_file(path)
    if (run_dir / "tensorboard").is_dir():  # a real folder by now; event files are created, never reopened
        for entry in os.scandir(run_dir / "tensorboard"):
            if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
                raise _not_regular(Path(entry.path), _kind(Path(entry.path)) or "a special file")


def _try_lock(fd: int) -> bool:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # byte 0; released when the descriptor is closed
        except OSError:
            return False
        return True
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def _open_locked(path: Path) -> int | None:
    """A locked descriptor of ``path``, or None if another process holds the lock."""
    for _ in range(3):
        try:
            fd = open_regular(path, os.O_RDWR | os.O_CREAT, 0o644, single_link=True)
        except FileNotFoundError:  # removed by its previous holder between our open and our check
            continue
        if not _try_lock(fd):
            os.close(fd)
            return None
        try:  # the previous holder removes the file on release: it may have gone between open and lock
            if os.path.samestat(os.fstat(fd), os.lstat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    return None


def _check_lock_content(fd: int, path: Path) -> None:
    """A ``.lock`` that holds anything but a pid is another program's file: refused, left as it is."""
    if os.name == "nt":  # pragma: no cover - the locked byte cannot be read; Windows has no such links
        return
    head = os.pread(fd, 64, 0)
    if len(head) > 32 or not _LOCK_CONTENT.fullmatch(head):
        raise RunDirError(f"refusing {path}: it is not a fixmatch lock file (it holds other data), so {path.parent} "
                          f"is not a fixmatch run directory; choose another --out")


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Temporary files (.NAME.RANDOM.tmp) of the run's own files, left by a writer killed before its rename.

    Only called with the lock held (no other process can be writing them) and after ``check_run_dir`` (the
    folders are real ones). Only the run's own names are matched, and unlink removes a name, never a link's
    target, so nothing else in the folder that --out leads to is ever removed.
    """
    for folder, names in ((run_dir, RUN_FILES), (run_dir / "checkpoints", CHECKPOINT_FILES)):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for name in names:
            for tmp in folder.glob(f".{glob.escape(name)}.*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()


def _holder(path: Path) -> str:
    try:
        pid = (read_run_file(path) or "").strip()
    except (OSError, RunDirError, UnicodeDecodeError):  # on Windows the locked byte cannot be read by others
        pid = ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _unusable_dir_error(run_dir: Path, e: OSError) -> RunDirError:
    if run_dir.is_dir():  # it exists: the folder itself refuses the lock file
        return RunDirError(f"run directory {run_dir} exists but is not writable ({e.strerror or e}); make it "
                           f"writable (e.g. chmod u+w {run_dir}) or choose another --out")
    return RunDirError(f"cannot create the run directory {run_dir} ({e.strerror or e}); choose a writable --out")


@contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Hold RUN_DIR/.lock for the duration of the block, or raise ``RunDirError`` if another process holds it.

    Creates RUN_DIR if needed, and removes it again if it is still empty at the end. The lock file exists only
    while a run holds it (or after the holder was killed, when it is free to be locked again). With the lock
    held, the directory's entries are checked (``check_run_dir``) and stale temporary files removed.
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path)
    except OSError as e:
        raise _unusable_dir_error(run_dir, e) from None
    try:
        if fd is None:
            raise RunDirError(f"run directory {run_dir} is in use by another fixmatch process{_holder(path)}; "
                              f"wait for it to finish or stop it, or choose another --out")
        _check_lock_content(fd, path)  # before it is truncated or removed: another program's file stays
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # the pid is for messages only; a full disk must not stop the lock from working
        try:
            check_run_dir(run_dir)
            _remove_stale_temp_files(run_dir)
            yield run_dir
        finally:
            # Removed while still held: a process that opened the old file and locks it after us sees that
            # the path no longer names it (_open_locked) and starts over.
            with contextlib.suppress(OSError):  # Windows cannot remove an open file: it stays, unlocked
                path.unlink(missing_ok=True)
                if created and not any(run_dir.iterdir()):
                    run_dir.rmdir()  # a run refused for a bad setting leaves nothing behind
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``, atomically (atomic.py): it is whole, or the old one, or absent.

    A link or a special file at ``path`` is refused rather than replaced: the run directory is not as the run
    left it, and its owner should see why.
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


def _write_error(path: Path, e: OSError) -> RunDirError:
    return RunDirError(f"cannot write {path} ({e.strerror or e}); free disk space or make the folder writable, "
                       f"then resume the run with --resume")
