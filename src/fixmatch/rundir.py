"""Writing a run directory safely: one writer at a time, and files that are whole or absent.

One run directory, one writer: an advisory lock on RUN_DIR/.lock is held while a run trains.

The lock is taken on an open file descriptor (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows), so the
operating system releases it when the process ends in any way, SIGKILL and power loss included: a crash never
leaves a run directory stuck. The file's content (the holder's pid) is only informative; a lock file left
behind by a dead process is simply locked again. ``fcntl.flock`` locks are not reliable on some network file
systems (older NFS); keep run directories on a local disk when two machines could start the same run.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fixmatch.atomic import atomic_path

LOCK_NAME = ".lock"


class RunDirError(RuntimeError):
    """The run directory is in use by another process or cannot be written (message: one line, with the fix)."""


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
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            return None
        try:  # the previous holder removes the file on release: it may have gone between open and lock
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    return None


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Temporary files (.NAME[.RANDOM].tmp) left by a writer that was killed before its rename.

    Only called with the lock held: no other process can be writing them.
    """
    for folder in (run_dir, run_dir / "checkpoints"):
        for tmp in folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:  # on Windows the locked byte cannot be read by others
        pid = ""
    return f" (pid {pid})" if pid.isdigit() else ""


@contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Hold RUN_DIR/.lock for the duration of the block, or raise ``RunDirError`` if another process holds it.

    Creates RUN_DIR if needed, and removes it again if it is still empty at the end. The lock file exists only
    while a run holds it (or after the holder was killed, when it is free to be locked again).
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path)
    except OSError as e:
        raise RunDirError(f"cannot create the run directory {run_dir} ({e.strerror or e}); "
                          f"choose a writable --out") from None
    try:
        if fd is None:
            raise RunDirError(f"run directory {run_dir} is in use by another fixmatch process{_holder(path)}; "
                              f"wait for it to finish or stop it, or choose another --out")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # the pid is for messages only; a full disk must not stop the lock from working
        _remove_stale_temp_files(run_dir)
        try:
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
    """Replace ``path`` by a file holding ``text``, atomically (atomic.py): it is whole, or the old one, or absent."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise _write_error(path, e) from None


def append_line(path: str | Path, line: str) -> None:
    """Append one line and fsync; if the write fails (disk full), cut the file back so no torn line is left."""
    path = Path(path)
    try:
        with open(path, "a") as f:
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
