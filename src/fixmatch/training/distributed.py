"""Several processes, one run: torchrun's environment, the process group, and each rank's share of a step.

``torchrun --nproc-per-node N -m fixmatch train ...`` starts N processes and gives each RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them a run is one process and nothing here does anything.

What several processes mean for a run:

- ``batch_size`` (B) and ``mu`` are GLOBAL: a step uses B labeled and mu*B unlabeled images in all, whatever the
  number of processes W. Every rank draws the same global index batch from IndexStream (a pure function of seed
  and step) and keeps its contiguous W-th of it (``shard``), so the data order does not depend on W and a run
  may be resumed with another W. B must be divisible by W.
- Gradients are averaged over ranks by DistributedDataParallel. Every loss term is a mean over equally sized
  per-rank slices, so the averaged gradient is the gradient of the global batch's loss, except for
  BatchNorm, whose batch statistics are per rank unless ``sync_bn`` (CUDA only) makes them global.
  ``lu_norm: masked`` divides every rank's sum by the masked count averaged over ranks, which keeps it exact.
- CTAugment: every rank probes its slice of the labeled batch, and every rank updates its bin rates from the
  probes of all ranks (gathered in rank order), so the rates stay identical everywhere and learn from the
  whole labeled batch, as one process does.
- Augmentation: each rank augments only its slice, with a generator seeded from (seed, step, rank)
  (``augment_seed``; rank 0 uses exactly the single-process seed). A run with W processes therefore draws
  other random views than a run with one, from the same images in the same order; results differ across
  process counts through those draws, BatchNorm statistics and float summation order only.
- Rank 0 alone writes (run directory, metrics, checkpoints, progress bar, TensorBoard) and evaluates; the other
  ranks wait for it at their next collective. Training statistics are summed over ranks before logging.
- torchrun starts each rank in a session of its own, so a ``kill -9`` of torchrun's process group does not
  reach the ranks. Each rank therefore watches its launcher (``LauncherWatch``) and, once it has gone, stops
  as on SIGTERM, with a checkpoint, instead of training on alone; ``--resume`` then continues the run.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fixmatch.config import ConfigError, check_sync_bn


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands among the run's processes (rank 0 of 1 without torchrun).

    ``launcher_pid``: under torchrun, the pid of the process that started this one (its parent when the
    environment was read), which the rank watches; None for a plain process.
    """
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher_pid: int | None = field(default=None, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them; absent = a single process."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ and "RANK" not in environ:
        return DistEnv()
    values = {}
    for name, default in (("RANK", None), ("WORLD_SIZE", None), ("LOCAL_RANK", "0")):
        text = environ.get(name, default)
        if text is None or not text.strip().isdigit():
            raise ConfigError(f"environment variable {name}={text!r} is not a non-negative integer; start "
                              f"several processes with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK")
        values[name] = int(text)
    env = DistEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], launcher_pid=os.getppid())
    if env.world_size < 1 or env.rank >= env.world_size:
        raise ConfigError(f"RANK={env.rank} is not below WORLD_SIZE={env.world_size}; start the processes "
                          f"with torchrun")
    return env


class LauncherWatch:
    """Tells a rank that its launcher (torchrun) has died, so that it stops instead of training on alone.

    On Linux the kernel sends ``signum`` when the parent dies (``prctl(PR_SET_PDEATHSIG)``); ``gone()`` also
    compares the parent pid with the one read at start, which covers a launcher that died before the prctl
    call and systems without it. A plain process (``launcher_pid`` None) watches nothing: a ``fixmatch train``
    whose shell ends keeps running, as it always did.
    """

    def __init__(self, env: DistEnv, signum: int | None = signal.SIGTERM) -> None:
        self.launcher_pid = env.launcher_pid
        self._signalled = self.launcher_pid is not None and signum is not None  # None: may not take signals
        if self._signalled:
            _parent_death_signal(signum)

    def gone(self) -> bool:
        return self.launcher_pid is not None and os.getppid() != self.launcher_pid

    def close(self) -> None:
        """No death signal once the loop that handles it has ended (train() may be called in a longer process)."""
        if self._signalled:
            _parent_death_signal(0)
            self._signalled = False


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _parent_death_signal(signum: int) -> None:
    """Linux: the kernel sends ``signum`` (0: nothing) when the parent dies; elsewhere ``gone()`` alone tells.

    The kernel sends it when the thread that started this process ends; torchrun starts its ranks from its
    main thread, whose end is the launcher's.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):  # no libc symbol to call: the per-step parent check still works
        pass


def process_device(device: torch.device, env: DistEnv) -> torch.device:
    """Each process of a CUDA run takes the GPU of its LOCAL_RANK (torchrun's one GPU per process)."""
    if not env.enabled or device.type != "cuda":
        return device
    if env.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {env.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                          f"start at most that many processes per node (--nproc-per-node)")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


@contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """Joins the run's process group (NCCL for CUDA, gloo for CPU) and leaves it at the end."""
    if not env.enabled or dist.is_initialized():  # a caller that set up its own group keeps it
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Rank 0 evaluates and writes checkpoints while the others wait at their next collective: allow long waits.
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(hours=2),
                            device_id=device if device.type == "cuda" else None)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other ranks may be gone
        raise
    # A rank that tears down its connections while a peer still reads from them can abort the peer
    # (gloo's "terminate called without an active exception"): leave together.
    dist.barrier()
    dist.destroy_process_group()


def shard(batch: Tensor, env: DistEnv) -> Tensor:
    """This rank's contiguous 1/W of a global batch (W divides its length)."""
    if not env.enabled:
        return batch
    n = batch.shape[0] // env.world_size
    return batch[env.rank * n:(env.rank + 1) * n]


def augment_seed(seed: int, step: int, rank: int) -> int:
    """Seed of a rank's augmentation generator at ``step``: rank 0 draws what a single process draws."""
    base = seed * 2**32 + step
    return base if rank == 0 else (base * 1_000_003 + rank) % 2**63


def wrap_model(model: nn.Module, env: DistEnv, device: torch.device, sync_bn: bool) -> nn.Module:
    """The module the step calls: DistributedDataParallel around ``model`` (which stays the one to save).

    sync_bn converts BatchNorm layers of ``model`` in place, so the saved model holds the same parameters and
    buffers under the same names (SyncBatchNorm's state dict is BatchNorm's).
    """
    check_sync_bn(sync_bn, device.type)
    if not env.enabled:
        return model
    if sync_bn:
        _convert_sync_bn_in_place(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _convert_sync_bn_in_place(model: nn.Module) -> None:
    # convert_sync_batchnorm returns a new root when the root itself is a BatchNorm; models here never are.
    for name, child in model.named_children():
        setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))


def all_reduce_sum_(t: Tensor, env: DistEnv) -> Tensor:
    """In place: the sum of ``t`` over ranks (unchanged with one process)."""
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_(t: Tensor, env: DistEnv) -> Tensor:
    """In place: the mean of ``t`` over ranks (unchanged with one process)."""
    if env.enabled:
        all_reduce_sum_(t, env).div_(env.world_size)
    return t


def all_gather_cat(t: Tensor, env: DistEnv) -> Tensor:
    """Every rank's ``t`` (the same shape on each) concatenated along dim 0 in rank order: with contiguous
    shards, the tensor one process would have for the global batch."""
    if not env.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(env.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def min_over_ranks(t: Tensor, env: DistEnv) -> Tensor:
    """The elementwise minimum of ``t`` over ranks, on the device (no host sync); ``t`` is left as it is.

    Booleans as integers: true on every rank iff their minimum is 1 (a verdict all ranks share).
    """
    if not env.enabled:
        return t
    out = t.to(torch.int64 if t.dtype == torch.bool else t.dtype, copy=True)  # MIN on integers: every backend
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out.to(t.dtype)


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a stop request that reached one process)."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(value: Any, env: DistEnv) -> Any:
    """Rank 0's ``value`` on every rank (a path, a test accuracy)."""
    if not env.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
