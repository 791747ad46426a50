"""Atomic, weights-only-loadable checkpoints of a run."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a fixmatch checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
