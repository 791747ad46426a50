"""Non-finite losses, gradients and weights: found at the step they happen, before they reach a checkpoint.

Each step's loss, gradients and floating-point buffers are checked before the optimiser uses them (one fused
max-norm over the gradients and buffers: cheap next to the forward pass). The buffers count because the forward
pass updates BatchNorm's running statistics: a batch variance that overflows to inf normalises the activations
to zero, so the loss and gradients stay finite while ``running_var`` becomes inf, and every later evaluation
would use it. What happens then depends on ``on_nonfinite``:

- ``stop`` (default): raise ``NonFiniteError`` naming the step and the last good checkpoint, which is left as it
  was (nothing is written after a bad step).
- ``skip``: the step's update is dropped (no optimiser, EMA, CTAugment or distribution-alignment update; the
  batch and the schedule slot are consumed) and counted in ``nonfinite_steps``. The forward pass has already
  moved the BatchNorm running statistics by then (towards NaN, if its activations overflowed), so the model's
  buffers are copied before each step (``save_buffers``, a few thousand numbers) and put back when it is skipped.

With several processes every rank must reach the same verdict (else one skips or stops while another steps,
and their weights or loss scales part, or a collective hangs): ``rank_min`` takes the minimum over ranks
(distributed.min_over_ranks), so a step is finite only where it is finite on every rank. Under
DistributedDataParallel the averaged gradients already agree, but each rank's loss is its own, and under fp16
loss scaling only the loss is checked.

Reading the verdict on the host forces a device sync. On a CPU that costs nothing, so every step is checked
at once. On a GPU, ``stop`` keeps the verdict on the device (the index of the first bad step) and reads it at
the syncs the loop already makes: the progress log every few steps and every evaluation, which always comes
before a checkpoint. The bad step is still named exactly and no checkpoint is written after it; only the few
steps in between run on needlessly. ``skip`` must decide before the update, so it syncs every step on a GPU.

That deferred ``stop`` needs no per-step collective either: each rank keeps its own first bad step, and the
ranks agree on the earliest one where the verdict is read, at steps every rank reaches together. Running on
in between is safe: DistributedDataParallel has averaged the gradients, so a non-finite gradient on one rank is
non-finite on all and a finite one is the same on all, and every rank's weights stay equal; only a rank's own
loss may differ, and it is not used to update anything.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

ON_NONFINITE = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or weight (message: one line, with the fix)."""


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One boolean tensor, without a device sync: the largest magnitude is finite iff every element is.

    The max-norm propagates NaN and inf like the 2-norm would, but cannot overflow: a 2-norm squares its
    elements, so finite values above about 1e19 would make it inf in float32 and a sound step look bad.
    """
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: fused per device
    if get_total_norm is not None:
        norm = get_total_norm(tensors, math.inf)
    else:  # pragma: no cover - older torch
        norm = torch.stack([t.detach().abs().amax() for t in tensors]).amax()
    return torch.isfinite(norm)


class NonFiniteGuard:
    """Checks every step's loss and gradients; counts skipped steps; names the checkpoint that stays good."""

    def __init__(self, mode: str, device: torch.device, last_checkpoint: Path, skipped: int = 0,
                 rank_min: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if mode not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, not {mode!r}")
        self.mode, self.last_checkpoint, self.skipped = mode, Path(last_checkpoint), skipped
        self.rank_min = rank_min  # several processes: elementwise minimum over ranks (see the module docstring)
        self.deferred = mode == "stop" and device.type != "cpu"
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def step_is_finite(self, step: int, loss: torch.Tensor, params: Iterable[torch.nn.Parameter],
                       buffers: Iterable[torch.Tensor] = ()) -> bool:
        """After ``loss.backward()`` of step ``step`` (1-based): True if the update may be applied.

        ``buffers``: the model's buffers as this step's forward pass left them (BatchNorm running statistics).
        """
        checked = [p.grad.detach() for p in params if p.grad is not None]
        checked += [b.detach() for b in buffers if b.is_floating_point()]
        finite = torch.isfinite(loss.detach()) & _all_finite(checked).to(loss.device)
        if self.deferred:  # this rank's own verdict; the ranks agree in raise_if_failed
            self._first_bad = torch.where((self._first_bad < 0) & ~finite, step, self._first_bad)
            return True
        finite = self._on_every_rank(finite)
        if bool(finite):
            return True
        if self.mode == "stop":
            raise self._error(f"non-finite loss, gradients or BatchNorm statistics at step {step}")
        self.skipped += 1
        return False

    def save_buffers(self, model: torch.nn.Module) -> list[torch.Tensor] | None:
        """Before a step's forward pass in ``skip`` mode: copies of ``model``'s buffers (None in ``stop`` mode)."""
        if self.mode != "skip":
            return None
        return [b.detach().clone() for b in model.buffers()]

    @staticmethod
    def restore_buffers(model: torch.nn.Module, saved: list[torch.Tensor] | None) -> None:
        """After a skipped step: the buffers as ``save_buffers`` found them."""
        if saved is None:
            return
        with torch.no_grad():
            for buffer, before in zip(model.buffers(), saved, strict=True):
                buffer.copy_(before)

    def raise_if_failed(self) -> None:
        """Where the loop syncs anyway (logging, evaluation): report a bad step found on the device by any rank.

        With ``rank_min`` this is a collective: every rank must call it at the same step (as check_weights).
        """
        if not self.deferred:
            return
        first_bad = self._first_bad
        if self.rank_min is not None:  # the earliest bad step of any rank (none: the largest int64)
            none = torch.iinfo(torch.int64).max
            first_bad = self.rank_min(torch.where(first_bad < 0, none, first_bad))
            first_bad = torch.where(first_bad == none, -1, first_bad)
        if (bad := int(first_bad)) >= 0:
            raise self._error(f"non-finite loss, gradients or BatchNorm statistics at step {bad}")

    def check_weights(self, step: int, *modules: torch.nn.Module) -> None:
        """Before a checkpoint: every parameter and buffer of ``modules`` is finite (one sync per checkpoint)."""
        self.raise_if_failed()
        tensors = [t.detach() for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
        # On every rank: BatchNorm buffers are each rank's own between two forward passes.
        finite = self._on_every_rank(_all_finite(tensors).to(self._first_bad.device))
        if not bool(finite):
            raise self._error(f"non-finite weights at step {step}")

    def _on_every_rank(self, finite: torch.Tensor) -> torch.Tensor:
        return finite if self.rank_min is None else self.rank_min(finite)

    def _error(self, what: str) -> NonFiniteError:
        return NonFiniteError(f"{what}; stopped without writing a checkpoint. Last good checkpoint: "
                              f"{self._describe_last()}. Resume with --resume --on-nonfinite skip to skip such steps, "
                              f"or start again with a lower --lr")

    def _describe_last(self) -> str:
        from fixmatch.runs.checkpoint import CheckpointError, load_checkpoint
        if not self.last_checkpoint.is_file():
            return "none yet (no evaluation was reached)"
        try:
            return f"{self.last_checkpoint} (step {load_checkpoint(self.last_checkpoint)['step']})"
        except (CheckpointError, KeyError):
            return str(self.last_checkpoint)
