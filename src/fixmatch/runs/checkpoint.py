"""Atomic, weights-only-loadable checkpoints of a run."""
from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from fixmatch.core.atomic import atomic_file
from fixmatch.core.safe_load import load_weights_only
from fixmatch.runs.rundir import BEST_NAME, CHECKPOINTS_NAME, LAST_NAME, RunDir


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a fixmatch checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file, and
    a failed write (disk full, read-only folder) leaves no temporary file behind and raises
    ``CheckpointError`` in one line. A checksum of every tensor (``tensor_digest``) is stored with the state,
    so that ``load_checkpoint`` notices data that changed on disk.
    """
    state = {**state, DIGEST_KEY: tensor_digest(state)}
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written through the descriptor mkstemp returned, synced, then renamed over path (atomic.py): a link
        # planted at the temporary name is never written through.
        with atomic_file(path, "wb") as f:
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


DEFAULT_FIX = f"give a checkpoint that a fixmatch run wrote (RUN_DIR/{CHECKPOINTS_NAME}/{LAST_NAME} or {BEST_NAME})"
DAMAGED_FIX = (f"use another checkpoint of the run ({CHECKPOINTS_NAME}/{BEST_NAME} or {LAST_NAME}) or an intact copy "
               f"of this file")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", fix: str | None = None
                    ) -> dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers only, so a crafted file cannot run code.

    The tensors are checked against the checksum saved with them. ``fix``, when given, replaces the advice
    at the end of the error messages (resuming a run has its own).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = load_weights_only(path, map_location)
    except ValueError as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {e}; {fix or DEFAULT_FIX}") from None
    if not isinstance(state, dict) or state.get("format") != "fixmatch-checkpoint":
        raise CheckpointError(f"{path} is not a fixmatch checkpoint")
    verify_digest(state, state.get(DIGEST_KEY), path, fix or DAMAGED_FIX)
    return state


# ------------------------------------------------------------------ checksum of the tensor data

DIGEST_KEY = "tensor_digest"  # in a checkpoint's dict, and in the metadata of a safetensors export
_DIGEST_PREFIX = "blake2b-256:"


def tensor_digest(obj: Any) -> str:
    """BLAKE2b over every tensor in ``obj`` (nested dicts, lists, tuples): its place, dtype, shape and bytes.

    Containers are walked in a fixed order (dict keys sorted by their repr), so the same tensors give the
    same digest after a save and a load whatever order the file keeps. Values other than tensors are left
    out (the checks of each field cover them). About 1 GB/s, so a few ms for a small network's checkpoint.
    """
    h = hashlib.blake2b(digest_size=32)
    seen: set[int] = set()  # a crafted file may hold a container that contains itself
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, torch.Tensor):
            t = value.detach()
            h.update(f"{where}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, (dict, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            items = sorted(value.items(), key=lambda kv: repr(kv[0])) if isinstance(value, dict) else enumerate(value)
            # Pushed in reverse so that they are hashed in order; the stored digest itself is not hashed.
            stack += [(f"{where}/{k!r}", v) for k, v in reversed(list(items)) if not (where == "" and k == DIGEST_KEY)]
    return _DIGEST_PREFIX + h.hexdigest()


_NOTED_WITHOUT_DIGEST: set[str] = set()


def verify_digest(tensors: Any, stored: Any, path: str | Path, fix: str) -> None:
    """CheckpointError when the tensors do not match the stored digest; a file without one (written before
    checksums were saved) loads, with a note on stderr once per file."""
    if stored is None:
        if str(path) not in _NOTED_WITHOUT_DIGEST:
            _NOTED_WITHOUT_DIGEST.add(str(path))
            print(f"fixmatch: note: {path} has no checksum of its tensors (an older file); it loads, but damage "
                  f"to its data cannot be detected", file=sys.stderr)
        return
    try:
        intact = isinstance(stored, str) and stored.startswith(_DIGEST_PREFIX) and tensor_digest(tensors) == stored
    except RuntimeError:  # a tensor whose bytes cannot be read, e.g. one on the meta device
        intact = False
    if not intact:
        raise CheckpointError(f"{path} is damaged: its tensor data does not match the checksum saved with it "
                              f"(changed on disk or in a copy); {fix}")


# ------------------------------------------------------------------ reading fields

def _reason(e: BaseException) -> str:
    """An exception as a short phrase for a one-line message."""
    if isinstance(e, KeyError):
        return f"no field {e.args[0]!r}" if e.args else "a field is missing"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # load_state_dict's message starts with "Error(s) in loading state_dict for X:"; the detail follows.
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    text = " ".join(lines) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class CheckpointFields:
    """Typed access to a checkpoint's fields: a missing, mistyped or unfitting field is one CheckpointError
    naming the file and the field, with ``fix`` as the advice."""

    def __init__(self, state: dict[str, Any], path: str | Path, fix: str = DAMAGED_FIX) -> None:
        self.state, self.path, self.fix = state, Path(path), fix

    def error(self, field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: its field {field!r} {problem}; {self.fix}")

    def get(self, field: str) -> Any:
        if field not in self.state:
            raise self.error(field, "is missing")
        return self.state[field]

    def integer(self, field: str, default: int | None = None, minimum: int = 0) -> int:
        value = self.state.get(field, default) if default is not None else self.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.error(field, f"is {_short(value)}, not an integer >= {minimum}")
        return value

    def number(self, field: str) -> float:
        """A real number (-inf allowed: a run's best accuracy before its first evaluation)."""
        value = self.get(field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or value == float("inf"):
            raise self.error(field, f"is {_short(value)}, not a number")
        return float(value)

    def restore(self, field: str, load: Callable[[Any], Any]) -> Any:
        """``load(state[field])``, with whatever it raises (a shape or type that does not fit) as one line."""
        value = self.get(field)
        try:
            return load(value)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            raise self.error(field, f"cannot be restored ({_reason(e)})") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def restore_optimizer(optimizer: torch.optim.Optimizer, state: Any) -> None:
    """``optimizer.load_state_dict``, refusing per-parameter state (momentum) whose shape is not the parameter's:
    torch would take it and fail at the first step."""
    if not isinstance(state, dict):
        raise TypeError(f"a {type(state).__name__}, not a dict")
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.ndim and v.shape != p.shape:
                    raise ValueError(f"its {name} of shape {tuple(v.shape)} is for a parameter of shape "
                                     f"{tuple(p.shape)}")


def tensor_like(value: Any, like: torch.Tensor) -> torch.Tensor:
    """``value`` if it is a tensor of ``like``'s shape (``copy_`` would broadcast a wrong-sized one silently)."""
    if not isinstance(value, torch.Tensor) or value.shape != like.shape:
        found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"expected a tensor of shape {tuple(like.shape)}, found {found}")
    return value


def restore_rng(rng: Any, device: torch.device) -> None:
    """The CPU generator's state, and the GPU's (dropout's draws) when the run is on one."""
    if not isinstance(rng, dict):
        raise TypeError(f"a {type(rng).__name__}, not a dict")
    torch.set_rng_state(tensor_like(rng["torch"], torch.get_rng_state()).cpu())
    if rng.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def resume_fix(run_dir: str | Path) -> str:
    """What to do when a run's last checkpoint cannot be resumed from."""
    run = RunDir(run_dir)
    if run.best_checkpoint.is_file():
        return (f"to resume from the best evaluation instead, copy {run.best_checkpoint} over "
                f"{run.last_checkpoint}; or start a new run with another --out")
    return f"restore {run.last_checkpoint} from a copy, or start a new run with another --out"


def find_checkpoint(path: str | Path) -> Path:
    """A run directory resolves to its last checkpoint (``RunDir.last_checkpoint``); a file is taken as is."""
    path = Path(path)
    if path.is_dir():
        candidate = RunDir(path).last_checkpoint
        if not candidate.is_file():
            raise CheckpointError(f"no checkpoint in run directory {path} (expected {candidate})")
        return candidate
    if not path.exists():
        raise CheckpointError(f"no such run directory or checkpoint: {path}")
    return path
