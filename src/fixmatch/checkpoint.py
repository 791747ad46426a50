"""Atomic, weights-only-loadable checkpoints of a run."""
from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import torch

from fixmatch.atomic import atomic_path


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a fixmatch checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file, and
    a failed write (disk full, read-only folder) leaves no temporary file behind and raises
    ``CheckpointError`` in one line.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # synced, then renamed over path (atomic.py)
            with open(tmp, "wb") as f:
                writer = _ErrorKeepingWriter(f)
                try:
                    torch.save(state, writer)
                except RuntimeError:  # torch reports a failed write as a RuntimeError about the zip stream
                    if writer.error is None:
                        raise
                    raise writer.error from None
            _test_pause_before_rename()
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path} ({e.strerror or e}); the previous checkpoint there, "
                              f"if any, is intact; free disk space or make the folder writable") from None


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers only, so a crafted file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = load_weights_only(path, map_location)
    except ValueError as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {e}; give a checkpoint that a fixmatch run wrote "
                              f"(RUN_DIR/checkpoints/last.pt or best.pt)") from None
    if not isinstance(state, dict) or state.get("format") != "fixmatch-checkpoint":
        raise CheckpointError(f"{path} is not a fixmatch checkpoint")
    return state


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``; a file it refuses raises ValueError with the reason in one line.

    torch's own message for a refused file is several lines long and suggests ``weights_only=False``, which is
    exactly what must not be done with a file of unknown origin; the reason is rewritten without that advice.
    """
    try:
        with warnings.catch_warnings():
            # A plain pickle of protocol > 2 makes torch warn before it fails; the error below says it all.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise ValueError(_refusal_reason(e)) from None


def _refusal_reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    imported = re.search(r"GLOBAL ([\w.]+)", text)  # torch words this two ways, depending on the module
    if imported:
        return (f"it asks to import {imported.group(1)}, which a file of tensors and plain containers never "
                f"does (loading it could run code), so it was not loaded")
    if isinstance(e, EOFError):
        return "the file is empty or cut short"
    if isinstance(e, PermissionError):
        return "no permission to read it"
    if "zip archive" in text or isinstance(e, OSError):  # OSError: e.g. a seek past the end of a cut-short file
        return "the file is cut short or corrupt (its zip archive cannot be read)"
    # Anything else is the unpickler choking on bytes that are no pickle of tensors: keep torch's detail only
    # when it is short and not its generic advice.
    detail = re.search(r"Unsupported operand \d+", text)
    detail = detail.group(0) if detail else ("" if "Weights only load failed" in text else text[:80])
    return f"not a torch file of tensors and plain containers, or a corrupt one{f' ({detail})' if detail else ''}"


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
