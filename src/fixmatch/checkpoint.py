"""Atomic, weights-only-loadable checkpoints of a run."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a fixmatch checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file, and
    a failed write (disk full, read-only folder) leaves no temporary file behind and raises
    ``CheckpointError`` in one line.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            writer = _ErrorKeepingWriter(f)
            try:
                torch.save(state, writer)
            except RuntimeError:  # torch reports a failed write as a RuntimeError about the zip stream
                if writer.error is None:
                    raise
                raise writer.error from None
            f.flush()
            os.fsync(f.fileno())
        _test_pause_before_rename()
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path} ({e.strerror or e}); the previous checkpoint there, "
                              f"if any, is intact; free disk space or make the folder writable") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # some file systems cannot fsync a folder; the file itself is synced
        _fsync_dir(path.parent)  # make the rename itself survive a power cut


class _ErrorKeepingWriter:
    """A file wrapper that remembers the OSError (e.g. ENOSPC) that torch.save would hide."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = e
            raise


# Test hook: the kill-at-any-moment test sets this to widen the window between a complete temporary file
# and its rename, so that it can SIGKILL a run at exactly that moment. Unset in normal use.
TEST_PAUSE_ENV = "FIXMATCH_TEST_CHECKPOINT_PAUSE_S"


def _test_pause_before_rename() -> None:
    pause = os.environ.get(TEST_PAUSE_ENV)
    if pause:
        time.sleep(float(pause))


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder for fsync; its rename is durable on NTFS
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers only, so a crafted file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != "fixmatch-checkpoint":
        raise CheckpointError(f"{path} is not a fixmatch checkpoint")
    return state


def find_checkpoint(path: str | Path, name: str = "last.pt") -> Path:
    """A run directory resolves to RUN_DIR/checkpoints/<name>; a file is taken as is."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / name
        if not candidate.is_file():
            raise CheckpointError(f"no checkpoint in run directory {path} (expected {candidate})")
        return candidate
    if not path.exists():
        raise CheckpointError(f"no such run directory or checkpoint: {path}")
    return path
