"""The run directory: the names of a run's files, its lock, its state, and whether a configuration may resume it.

``RunDir`` is the only code that knows how a run directory is laid out::

    RUN_DIR/config.yaml          the resolved configuration; written last when a run starts: it marks a run
    RUN_DIR/split.json           the labeled indices (data/split.py)
    RUN_DIR/time_budget.json     what a time budget chose, for a run started with one (training/budget.py)
    RUN_DIR/metrics.jsonl        one row per evaluation (log.py)
    RUN_DIR/summary.json         written when the run has finished
    RUN_DIR/checkpoints/         last.pt (every evaluation) and best.pt (the best test accuracy so far)
    RUN_DIR/tensorboard/         TensorBoard's event files
    RUN_DIR/error.txt            why the run failed, when a sweep ran it (studies/sweep.py)
    RUN_DIR/.lock                held while a run trains

One run directory, one writer: an advisory lock on RUN_DIR/.lock is held while a run trains.

The lock is taken on an open file descriptor (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows), so the
operating system releases it when the process ends in any way, SIGKILL and power loss included: a crash never
leaves a run directory stuck. The file's content (the holder's pid) is only informative; a lock file left
behind by a dead process is simply locked again. ``fcntl.flock`` locks are not reliable on some network file
systems (older NFS); keep run directories on a local disk when two machines could start the same run.

A run directory may come from someone else (a shared runs folder, a copied run), so its entries are not
trusted: files are opened and replaced without following links (core/files.py), and when the lock is taken, a
link or a special file where the run keeps its files, checkpoints or TensorBoard logs is refused in one line.
The directory named by --out may itself be a link: the user chose it, and nothing but the run's own files is
ever written or removed there (a ``.lock`` that is not a fixmatch lock file is refused, not truncated).
These checks are made on paths: a process that changes the directory while a run writes it can still race
them, so a run directory should be writable by its owner only (as the folders a run creates are, with the
usual umask).
"""
from __future__ import annotations

import contextlib
import enum
import glob
import json
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

from fixmatch.config import (
    PRETRAIN_RESUME_MUTABLE_KEYS,
    RESUME_MUTABLE_KEYS,
    Config,
    ConfigError,
    PretrainConfig,
    parse_yaml,
    read_yaml,
    short_repr,
    validate_overrides,
)
from fixmatch.core.files import (
    FileError,
    check_regular_file,
    file_kind,
    not_regular_error,
    open_regular,
    read_run_file,
)

# The names in a run directory (the module docstring says what each holds); only RunDir joins them to a path.
CONFIG_NAME = "config.yaml"
SPLIT_NAME = "split.json"
TIME_BUDGET_NAME = "time_budget.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
ERROR_NAME = "error.txt"
LOCK_NAME = ".lock"
CHECKPOINTS_NAME = "checkpoints"
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"
TENSORBOARD_NAME = "tensorboard"
# What a run keeps in its directory (training/loop.py), checked when the lock is taken: files replaced whole or
# appended, and two folders.
RUN_FILES = (CONFIG_NAME, SPLIT_NAME, METRICS_NAME, SUMMARY_NAME)
CHECKPOINT_FILES = (LAST_NAME, BEST_NAME)
RUN_FOLDERS = (CHECKPOINTS_NAME, TENSORBOARD_NAME)

_LOCK_CONTENT = re.compile(rb"\d*\n?")  # what a fixmatch lock file holds: a pid, or nothing yet

# The run directory's errors and those of the files in it are one type: the CLI reports either in one line.
RunDirError = FileError


class RunState(str, enum.Enum):
    """Where a run stands: what ``fixmatch sweep`` does with it (and prints with ``--dry-run``)."""
    NEW = "new"              # nothing to continue (no checkpoint yet, or no directory): it starts afresh
    RESUMABLE = "resumable"  # a checkpoint and no summary: killed or stopped; --resume continues it
    FINISHED = "finished"    # its summary is written

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:  # f"{state:<10}" pads the value, on every Python version
        return format(self.value, spec)


class RunDir:
    """One run's directory: the paths of its files, its lock, its state, and the resume check.

    Cheap to make (nothing is read until asked); a path-like object, so ``Path(run)`` and ``RunDir(run)`` work.
    """

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # --- where things are
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def split_file(self) -> Path:
        return self.path / SPLIT_NAME

    @property
    def time_budget_file(self) -> Path:
        return self.path / TIME_BUDGET_NAME

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_NAME

    @property
    def error_file(self) -> Path:
        return self.path / ERROR_NAME

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_NAME

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_NAME

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / BEST_NAME

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_NAME

    @classmethod
    def default(cls, config: Config) -> RunDir:
        """Where a run goes without --out: runs/DATASET-METHOD-LABELS-seedSEED-TIME."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dataset = Path(config.dataset.removeprefix("folder:")).name or "folder"  # folder:PATH -> PATH's last part
        return cls(Path("runs") / f"{dataset}-{config.method}-{config.num_labels}-seed{config.seed}-{stamp}")

    @classmethod
    def find(cls, folder: str | Path) -> list[RunDir]:
        """The training run directories anywhere below ``folder`` that have logged metrics, in path order
        (``fixmatch pretrain`` runs, which have no accuracy to report, are left out)."""
        found = (cls(c.parent) for c in Path(folder).rglob(CONFIG_NAME))
        return sorted((run for run in found if run.metrics_file.is_file() and run.kind == "train"),
                      key=lambda run: run.path)

    # --- what it holds
    @property
    def is_run(self) -> bool:
        """A run started here: its config.yaml, written once the run's settings and data were accepted."""
        return self.config_file.is_file()

    @property
    def kind(self) -> str:
        """"train" or "pretrain", from the keys of config.yaml ("train" where it is missing or unreadable: what
        reads it then reports the problem)."""
        try:
            data = parse_yaml(read_run_file(self.config_file) or "", str(self.config_file))
        except (ConfigError, FileError, OSError, UnicodeDecodeError):
            return "train"
        return _kind_of(data) if isinstance(data, dict) else "train"

    @property
    def state(self) -> RunState:
        """Finished (a summary), resumable (a last checkpoint) or new (nothing to continue)."""
        if self.summary_file.is_file():
            return RunState.FINISHED
        if self.last_checkpoint.is_file():
            return RunState.RESUMABLE
        return RunState.NEW

    def read_summary(self) -> dict[str, Any]:
        text = read_run_file(self.summary_file)
        if text is None:
            raise RunDirError(f"{self.summary_file} is missing; resume the run with --resume to write it")
        return json.loads(text)

    def lock(self) -> AbstractContextManager[Path]:
        """Hold the run directory's lock for a block (``lock_run_dir``): one writer at a time."""
        return lock_run_dir(self.path)

    def check_unused(self) -> None:
        """A new run needs a directory of its own: one that holds anything but a lock is refused in one line."""
        if self.path.exists() and any(p.name != LOCK_NAME for p in self.path.iterdir()):
            raise ConfigError(f"run directory {self.path} already exists; pass --resume to continue it "
                              f"or choose another --out")

    # --- may this configuration resume the run?
    def saved_config(self, schema: type[Any] = Config) -> Any:
        """The configuration the run was started with (config.yaml), a ``schema`` (Config, or PretrainConfig for a
        pretrain run); one-line ConfigError if there is none, or if the run is of the other kind."""
        path = self.config_file
        check_regular_file(path)  # read before the lock is taken: never through a link or from a FIFO
        if not path.is_file():
            raise ConfigError(f"cannot resume: {path} not found; is {self.path} a fixmatch run directory?")
        data = read_yaml(path, "config file", "--config")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of config keys, not {type(data).__name__}")
        wanted, found = _KINDS[schema][0], _kind_of(data)
        if found != wanted:
            raise ConfigError(f"{self.path} is a fixmatch {found} run, not a {wanted} run; resume it with "
                              f"fixmatch {found} --out {self.path} --resume")
        # One-line errors for a damaged or hand-edited file.
        return schema(**validate_overrides(data, f"config file {path}", schema))

    def resume_changes(self, config: Config) -> list[tuple[str, Any, Any]]:
        """(key, saved value, value in ``config``) of each key ``config`` changes that a resume must keep: all
        but RESUME_MUTABLE_KEYS, which change where and how the run runs, not what it computes. [] where
        ``config`` may resume the run."""
        return _changes(self.saved_config(), config)

    def resume_config(self, config: Any, schema: type[Any] = Config) -> Any:
        """The configuration that resumes the run: the saved one (``config`` None) or ``config`` if it changes
        nothing a resume must keep; ConfigError in one line otherwise, or if config.yaml was edited since the
        last checkpoint. ``schema``: Config, or PretrainConfig for a pretrain run."""
        saved = self.saved_config(schema)
        mutable = _KINDS[schema][1]
        self._check_config_file_unchanged(saved, mutable)
        if config is None:
            return saved
        changes = _changes(saved, config, mutable)
        if changes:
            key, old, new = changes[0]
            raise ConfigError(f"cannot change '{key}' when resuming ({short_repr(old)} -> {short_repr(new)}); "
                              f"start a new run with another --out instead")
        return config

    def _check_config_file_unchanged(self, saved: Any, mutable: frozenset[str]) -> None:
        """config.yaml must still hold what the last checkpoint was trained with: a hand edit (lr, steps)
        would otherwise change the resumed run silently, where the same change as a flag is refused."""
        trained = _checkpoint_config(self.last_checkpoint)
        if trained is None:  # killed before its first checkpoint: it restarts from step 0 with the file as it is
            return
        # A checkpoint older than a key was trained with its default.
        trained = {**type(saved)().to_dict(), **trained}
        edited = _changed_keys(trained, saved.to_dict(), mutable)
        if edited:
            shown = "; ".join(f"{k}: {short_repr(trained[k])} in the checkpoint, "
                              f"{short_repr(getattr(saved, k))} in the file" for k in edited[:4])
            more = f"; and {len(edited) - 4} more" if len(edited) > 4 else ""
            raise ConfigError(f"cannot resume: {self.config_file} no longer matches the run's last checkpoint "
                              f"({shown}{more}); put the checkpoint's values back in the file, or start a new run "
                              f"with another --out")


# What config.yaml holds for each kind of run, and the keys a resume of it may change.
_KINDS: dict[type[Any], tuple[str, frozenset[str]]] = {Config: ("train", RESUME_MUTABLE_KEYS),
                                                        PretrainConfig: ("pretrain", PRETRAIN_RESUME_MUTABLE_KEYS)}


def _kind_of(data: Mapping[str, Any]) -> str:
    """A pretrain run's config.yaml has a projection head and no labels (config.PretrainConfig)."""
    return "pretrain" if "proj_dim" in data and "num_labels" not in data else "train"


def _changes(saved: Any, config: Any, mutable: frozenset[str] = RESUME_MUTABLE_KEYS) -> list[tuple[str, Any, Any]]:
    return [(k, getattr(saved, k), getattr(config, k))
            for k in _changed_keys(saved.to_dict(), config.to_dict(), mutable)]


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any],
                  mutable: frozenset[str] = RESUME_MUTABLE_KEYS) -> list[str]:
    """The keys of ``new`` whose value differs from ``old``'s, leaving out those a resume may change."""
    return [k for k, v in new.items() if k not in mutable and old[k] != v]


def _checkpoint_config(path: Path) -> dict[str, Any] | None:
    """The configuration stored in a checkpoint, read without its tensor data: memory-mapped, the tensors are
    not read here (restoring them is the checkpoint's one full load). None where there is no readable file:
    restoring reports a damaged one in its own words."""
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # restoring the checkpoint repeats any warning about the file
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises several types for a damaged file; restoring it names the damage
        return None
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else None


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse, in one line, a link or a special file where a run keeps its files and folders.

    Called with the lock held, before anything is read or written: a run directory handed over with a link at
    checkpoints/ or metrics.jsonl is refused at the start, not after hours of training.
    """
    run_dir = Path(run_dir)
    for name in RUN_FOLDERS:
        kind = file_kind(run_dir / name)
        if kind is not None and kind != "a folder":
            raise RunDirError(f"refusing {run_dir / name}: it is {kind}, not a folder (a run directory's folders "
                              f"are never links); remove it, then run the command again")
    run = RunDir(run_dir)
    for path in [run_dir / n for n in RUN_FILES] + [run.checkpoints / n for n in CHECKPOINT_FILES]:
        check_regular_file(path)
    if run.tensorboard.is_dir():  # a real folder by now; event files are created, never reopened
        for entry in os.scandir(run.tensorboard):
            if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
                raise not_regular_error(Path(entry.path), file_kind(entry.path) or "a special file")


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
    for folder, names in ((run_dir, RUN_FILES), (RunDir(run_dir).checkpoints, CHECKPOINT_FILES)):
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
    path = RunDir(run_dir).lock_file
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
