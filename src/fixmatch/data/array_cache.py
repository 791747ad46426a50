"""Decoded uint8 image arrays cached as .npy files next to the data, and memory-mapped back.

Large unlabeled pools (STL-10's 100,000 images of 96x96, 2.8 GB; SVHN's 531,131 extra images) are
decoded once into a uint8 (N, C, H, W) .npy file, written chunk by chunk, and opened afterwards with
``np.load(mmap_mode="r")``. The images then live in the operating system's page cache (shared,
reclaimable, read from disk on first touch) instead of the process's own memory, and are never held
twice. A cache is valid while it is newer than every file it was decoded from.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from fixmatch.core.atomic import atomic_path

from .download import DatasetError

__all__ = ["cache_is_fresh", "write_npy_atomic", "open_npy_mmap"]


def cache_is_fresh(cache: Path, sources: Sequence[Path]) -> bool:
    """True when ``cache`` exists and was written after every file in ``sources`` last changed."""
    if not cache.is_file():
        return False
    written = cache.stat().st_mtime_ns
    return all(written >= s.stat().st_mtime_ns for s in sources)


def write_npy_atomic(path: Path, shape: tuple[int, ...], chunks: Iterable[np.ndarray], dtype: str = "|u1") -> Path:
    """Write an .npy file of ``shape`` from consecutive chunks along axis 0, atomically.

    Only one chunk is in memory at a time. The data go to a temporary file in the same folder,
    renamed to ``path`` once complete, so ``path`` is never a partial file; on any failure
    (a bad chunk from the decoder, a full disk, Ctrl-C) the temporary file is removed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".part") as tmp, open(tmp, "wb") as f:  # removed on any failure
            header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(int(d) for d in shape)}
            np.lib.format.write_array_header_1_0(f, header)
            rows = 0
            for chunk in chunks:
                if chunk.dtype != np.dtype(dtype) or chunk.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"chunk {chunk.dtype} {chunk.shape} does not fit an array {dtype} {shape}")
                f.write(np.ascontiguousarray(chunk).data)
                rows += chunk.shape[0]
            if rows != shape[0]:
                raise ValueError(f"decoder produced {rows} rows, expected {shape[0]}")
    except OSError as e:
        raise DatasetError(f"cannot write the cache file {path} ({e}); free disk space or make "
                           f"{path.parent} writable") from None
    return path


def open_npy_mmap(path: Path, shape: tuple[int, ...] | None = None, dtype: str = "|u1") -> torch.Tensor:
    """Memory-map an .npy cache read-only as a CPU tensor (no copy); a bad file raises ``DatasetError``.

    The tensor shares the file's pages: it must never be written to (nothing in this package does;
    batches are gathered copies).
    """
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"cache file {path} is unreadable ({e}); delete it and it will be rebuilt") from None
    if array.dtype != np.dtype(dtype) or (shape is not None and array.shape != tuple(shape)):
        raise DatasetError(f"cache file {path} holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} "
                           f"{shape}; delete it and it will be rebuilt")
    with warnings.catch_warnings():
        # torch warns that the array is not writable: intended, the mapping is read-only.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
