"""TrainState: everything a run carries from one step to the next, saved and restored by one pair of methods.

A checkpoint is ``state.state_dict()`` and nothing else; ``load_state_dict`` is the only code that restores a
run. The file format is unchanged from the first release (the same keys, the running sums as one 6-value
tensor), so every checkpoint ever written still resumes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fixmatch.augment import CTAugment
from fixmatch.config import Config
from fixmatch.core.dist_align import DistributionAlignment
from fixmatch.core.ema import EMA
from fixmatch.core.optim import LRSchedule, make_optimizer, set_lr
from fixmatch.core.pseudo_label import PseudoLabelPolicy, make_policy
from fixmatch.data.split import Split
from fixmatch.runs.checkpoint import CheckpointFields, restore_optimizer, restore_rng, tensor_like
from fixmatch.training import distributed
from fixmatch.training.batches import View
from fixmatch.training.nonfinite import NonFiniteGuard
from fixmatch.training.speed import compile_module, make_grad_scaler

CHECKPOINT_FORMAT = "fixmatch-checkpoint"
SUMS = 6  # RunningStats' fields in the checkpoint's "sums" tensor


@dataclass
class RunningStats:
    """Sums over the steps since the last evaluation, as float64 tensors on the device (reading them would
    sync). Under several processes each rank sums its own slices until ``all_reduce`` adds them up."""
    loss_s: Tensor
    loss_u: Tensor
    mask_rate: Tensor
    pl_correct: Tensor  # masked samples whose pseudo-label equals their true label
    steps: Tensor       # finite steps summed
    pl_known: Tensor    # masked samples whose true label is known

    @classmethod
    def zeros(cls, device: torch.device) -> RunningStats:
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in dataclasses.fields(cls)))

    def as_tensor(self) -> Tensor:
        """The sums in field order: the checkpoint's ``sums`` field, and one buffer for an all-reduce."""
        return torch.stack([getattr(self, f.name) for f in dataclasses.fields(self)])

    def load_tensor(self, values: Tensor) -> None:
        for f, v in zip(dataclasses.fields(self), values.to(self.steps.device), strict=True):
            getattr(self, f.name).copy_(v)

    def add(self, **values: Tensor) -> None:
        for name, v in values.items():
            getattr(self, name).add_(v.double())

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).zero_()

    def all_reduce(self, env: distributed.DistEnv) -> None:
        """Sum over every rank (a no-op with one process)."""
        if env.enabled:
            total = self.as_tensor()
            distributed.all_reduce_sum_(total, env)
            self.load_tensor(total)

    def means(self) -> dict[str, float | None]:
        """What a metrics row reports; None (JSON null) where it is undefined: no finite step since the last
        evaluation, or no used pseudo-label whose true label is known."""
        loss_s, loss_u, mask, pl_correct, n, known = self.as_tensor().tolist()[:SUMS]
        mean = (lambda total: total / n) if n > 0 else (lambda total: None)
        return {"loss_s": mean(loss_s), "loss_u": mean(loss_u), "mask_rate": mean(mask),
                "pseudo_label_acc": 100.0 * pl_correct / known if known > 0 else None}


@dataclass
class TrainStats(RunningStats):
    """RunningStats (release 0.1's checkpoint ``sums``, the first SUMS values of ``as_tensor``) plus the sum of
    the unlabeled samples' mean weight in Lu (pseudo_label.py), saved with the policy's state."""
    weight: Tensor

    def means(self) -> dict[str, float | None]:
        n, weight = self.steps.item(), self.weight.item()
        return {**super().means(), "weight_mean": weight / n if n > 0 else None}


@dataclass(eq=False)
class TrainState:
    """The run's model, EMA, optimiser, schedule, loss scaler, non-finite guard, the strong view (CTAugment's
    rates), the pseudo-label transform (distribution alignment), the step, the best accuracy and the running
    statistics; plus what each checkpoint records about the run (config, split, classes, model description).

    ``model`` is the plain module that EMA, evaluation and checkpoints use; ``train_model`` is what the step
    calls: the same module inside DistributedDataParallel with several processes, compiled on request.
    """
    config: Config
    model: nn.Module
    train_model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler  # enabled for fp16 only: with it disabled, scale/step/update are plain passes
    guard: NonFiniteGuard
    strong: View
    align: DistributionAlignment | None
    policy: PseudoLabelPolicy  # the pseudo-label policy (--algorithm), after ``align``
    mean: Tensor
    std: Tensor
    env: distributed.DistEnv
    device: torch.device
    split: Split
    class_names: list[str]
    model_fields: dict[str, Any]  # the model description (model_spec.checkpoint_fields)
    stats: TrainStats
    step: int = 0
    best_acc: float = -math.inf
    wall_before: float = 0.0  # training seconds of the run before this process took it over (resumes)
    started: float = field(default_factory=time.perf_counter)

    @property
    def cta(self) -> CTAugment | None:
        """The strong view when it learns its magnitudes while training (CTAugment)."""
        return self.strong if isinstance(self.strong, CTAugment) else None

    @functools.cached_property
    def rank_mean(self) -> Callable[[Tensor], Tensor] | None:
        """Mean over ranks, for the loss's masked Lu (None with one process)."""
        return functools.partial(distributed.all_reduce_mean_, env=self.env) if self.env.enabled else None

    @functools.cached_property
    def rank_gather(self) -> Callable[[Tensor], Tensor] | None:
        """Concatenation over ranks, for CTAugment's probes (None with one process)."""
        return functools.partial(distributed.all_gather_cat, env=self.env) if self.env.enabled else None

    def wall_s(self) -> float:
        """Training seconds of the whole run so far, resumes included."""
        return self.wall_before + time.perf_counter() - self.started

    def set_lr(self) -> float:
        """The schedule's learning rate for the coming step, set on the optimiser."""
        lr = self.schedule.lr(self.step)
        set_lr(self.optimizer, lr)
        return lr

    # ------------------------------------------------------------------ saving and restoring
    def _load_pseudo_label(self, saved: dict[str, Any], device: torch.device) -> None:
        """The policy's state and the running weight sum (the checkpoint's "pseudo_label" field)."""
        self.policy.load_state_dict(saved["policy"], device=device)
        self.stats.weight.copy_(tensor_like(saved["weight_sum"], like=self.stats.weight.cpu()))

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: every field a resume needs, plus what loading the model alone needs."""
        cuda = self.device.type == "cuda"
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "config": self.config.to_dict(), "split": self.split.to_json(), "class_names": list(self.class_names),
                "best_acc": self.best_acc, "wall_s": self.wall_s(), "sums": self.stats.as_tensor()[:SUMS].cpu(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(self.device) if cuda else None},
                "nonfinite_steps": self.guard.skipped, **self.model_fields,
                "ctaugment": self.cta.state_dict() if self.cta is not None else None,
                "schedule": self.schedule.state_dict(),
                "dist_align": self.align.state_dict() if self.align is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                # FixMatch's policy has no state and its weight sum is the mask-rate sum: its checkpoints keep
                # release 0.1's keys exactly.
                **({} if self.config.algorithm == "fixmatch" else {"pseudo_label": {
                    "policy": self.policy.state_dict(), "weight_sum": self.stats.weight.detach().cpu()}})}

    def load_state_dict(self, state: dict[str, Any], path: str | Path, fix: str) -> None:
        """Restore a run from ``state`` (a checkpoint read from ``path``). Every field is checked as it is
        restored: a damaged or hand-edited file stops here in one line naming the file, the field and ``fix``."""
        saved = CheckpointFields(state, path, fix)
        self.guard.skipped = saved.integer("nonfinite_steps", default=0)
        self.step, self.best_acc = saved.integer("step"), saved.number("best_acc")
        self.wall_before, self.started = saved.number("wall_s"), time.perf_counter()
        saved.restore("model", self.model.load_state_dict)
        saved.restore("ema", self.ema.load_state_dict)
        saved.restore("optimizer", functools.partial(restore_optimizer, self.optimizer))
        sums = saved.restore("sums", functools.partial(tensor_like, like=self.stats.as_tensor()[:SUMS]))
        # Without "pseudo_label" (FixMatch's, or from before the policies) the weights are the mask.
        weight_sum = sums[2:3]
        if state.get("pseudo_label") is not None:
            saved.restore("pseudo_label", functools.partial(self._load_pseudo_label, device=self.device))
            weight_sum = self.stats.weight.detach().cpu().reshape(1)
        sums = torch.cat([sums, weight_sum.to(sums)])
        # The saved sums are over all ranks: rank 0 alone takes them, so that the next all-reduce counts them once.
        self.stats.load_tensor(sums if self.env.is_main else torch.zeros_like(sums))
        if self.scaler.is_enabled() and state.get("scaler"):
            saved.restore("scaler", self.scaler.load_state_dict)
        if self.cta is not None:
            saved.restore("ctaugment", self.cta.load_state_dict)
        if self.align is not None:
            saved.restore("dist_align", functools.partial(self.align.load_state_dict, device=self.device))
        if state.get("schedule") is not None:
            saved.restore("schedule", self.schedule.load_state_dict)
        saved.restore("rng", functools.partial(restore_rng, device=self.device))  # last: it changes global state


def new_train_state(config: Config, model: nn.Module, strong: View, align: DistributionAlignment | None,
                    mean: Tensor, std: Tensor, split: Split, class_names: list[str], model_fields: dict[str, Any],
                    last_checkpoint: Path, env: distributed.DistEnv, device: torch.device,
                    pool_size: int = 0) -> TrainState:
    """The state of a run at step 0 around ``model`` (built, initialised and on ``device``); ``pool_size``: the
    number of images the unlabeled indices point into (FlexMatch's state)."""
    gather = functools.partial(distributed.all_gather_cat, env=env) if env.enabled else None
    train_model = distributed.wrap_model(model, env, device, config.sync_bn)
    if config.compile:
        train_model = compile_module(train_model, device)
    rank_min = functools.partial(distributed.min_over_ranks, env=env) if env.enabled else None
    return TrainState(
        config=config, model=model, train_model=train_model, ema=EMA(model, config.ema),
        optimizer=make_optimizer(model, config.lr, config.momentum, config.nesterov, config.wd, config.optimizer),
        schedule=LRSchedule(config.schedule, config.lr, config.steps, config.warmup, config.plateau_factor,
                            config.plateau_patience),
        scaler=make_grad_scaler(config.amp, device),
        guard=NonFiniteGuard(config.on_nonfinite, device, last_checkpoint, rank_min=rank_min),
        strong=strong, align=align, policy=make_policy(config, len(class_names), pool_size, gather), mean=mean,
        std=std, env=env, device=device, split=split,
        class_names=list(class_names), model_fields=model_fields, stats=TrainStats.zeros(device))
