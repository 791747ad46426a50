"""One FixMatch training step: ``train_step(state, batch)``; its forward half is ``forward_loss``.

train_step: forward -> loss -> backward -> non-finite check -> optimiser (through the fp16 loss scaler) -> EMA
-> CTAugment's probe. A step whose loss, gradients or BatchNorm statistics are not finite changes nothing in
``skip`` mode (nonfinite.py) and stops the run in ``stop`` mode.

forward_loss, the forward half: augmented batches in, loss and statistics out.

Default: ONE forward pass over [x_lb, x_ulb_w, x_ulb_s], as the official code does, so that BatchNorm
normalises all three with the statistics of the whole batch and updates its running statistics once from it.

``weak_no_grad``: the weak unlabeled view only supplies pseudo-labels (the loss never differentiates through
it), so it runs in a separate forward under ``torch.no_grad()``, which keeps no activations for backward and
skips its share of the backward pass: about a third less compute per step at mu = 7. What changes for
BatchNorm: the weak view is still normalised with batch statistics (train mode), but those of the weak batch
alone instead of the joint batch, and it does not update the running statistics (``frozen_running_stats``);
they come from the labeled + strong forward only, updated once per step as before. The labeled and strong
views are normalised with the statistics of their own joint batch. Models without BatchNorm compute exactly
the same loss either way.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fixmatch.core.loss import LossStats, fairness_loss, fixmatch_loss
from fixmatch.core.preprocess import normalize
from fixmatch.core.pseudo_label import FreeMatchPolicy, PseudoLabelPolicy

if TYPE_CHECKING:
    from fixmatch.training.batches import Batch
    from fixmatch.training.state import TrainState

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm that normalises with batch statistics but leaves its running statistics alone.

    With ``track_running_stats`` off in train mode, PyTorch's BatchNorm (and SyncBatchNorm) neither updates
    running_mean/var nor counts the batch in num_batches_tracked.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass and loss (``amp``: none, bf16 or fp16)."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def forward_loss(model: nn.Module, x_lb: Tensor, y_lb: Tensor, x_ulb_w: Tensor | None, x_ulb_s: Tensor | None,
                 mean: Tensor, std: Tensor, *, tau: float, lambda_u: float, T: float, lu_norm: str,
                 channels_last: bool, weak_no_grad: bool = False, amp: str = "none",
                 bn_model: nn.Module | None = None, align: Callable[[Tensor], Tensor] | None = None,
                 rank_mean: Callable[[Tensor], Tensor] | None = None, policy: PseudoLabelPolicy | None = None,
                 idx_ulb: Tensor | None = None, fairness_weight: float = 0.0) -> tuple[Tensor, LossStats]:
    """Loss Ls + lambda_u * Lu of one step (``fixmatch_loss``) from float images in [0, 1].

    ``x_ulb_w`` / ``x_ulb_s`` None: the supervised baseline. ``model`` is what is called (possibly wrapped in
    DistributedDataParallel or compiled); ``bn_model`` is the plain module whose BatchNorm layers
    ``weak_no_grad`` freezes (default: ``model``). ``align``: distribution alignment of the pseudo-label
    probabilities (``fixmatch_loss``), None for the paper's FixMatch. ``rank_mean``: the mean over ranks with
    several processes (``fixmatch_loss``'s masked Lu), None for one. ``policy``: the pseudo-label policy
    (pseudo_label.py; None: FixMatch's fixed tau), called with the unlabeled samples' pool indices ``idx_ulb``;
    a FreeMatch policy adds ``fairness_weight`` times its fairness loss (``loss.fairness_loss``).
    """
    def net(x: Tensor) -> Tensor:
        return model(normalize(x, mean, std, channels_last))

    policy_fn = None if policy is None else functools.partial(policy, idx_ulb=idx_ulb)
    loss_kw = dict(tau=tau, lambda_u=lambda_u, T=T, lu_norm=lu_norm, align=align, rank_mean=rank_mean,
                   policy=policy_fn)
    with autocast(x_lb.device, amp):
        if x_ulb_w is None or x_ulb_s is None:
            return fixmatch_loss(net(x_lb), y_lb, None, None, **loss_kw)
        n_lb = x_lb.shape[0]
        if weak_no_grad:
            with torch.no_grad(), frozen_running_stats(bn_model if bn_model is not None else model):
                logits_w = net(x_ulb_w)
            logits = net(torch.cat([x_lb, x_ulb_s]))
            logits_lb, logits_s = logits[:n_lb], logits[n_lb:]
        else:
            # One forward pass over labeled, weak and strong images: BatchNorm sees all of them.
            logits = net(torch.cat([x_lb, x_ulb_w, x_ulb_s]))
            n_ulb = x_ulb_w.shape[0]
            logits_lb, logits_w, logits_s = logits[:n_lb], logits[n_lb:n_lb + n_ulb], logits[n_lb + n_ulb:]
        loss, stats = fixmatch_loss(logits_lb, y_lb, logits_w, logits_s, **loss_kw)
        if isinstance(policy, FreeMatchPolicy) and fairness_weight > 0:
            loss = loss + fairness_weight * fairness_loss(logits_s, stats.mask, policy.p_t, policy.hist)
        return loss, stats


@dataclass
class StepStats:
    """What one step reports, as device tensors (reading them would sync): the losses and mask rate of this
    rank's slice, and how many masked pseudo-labels are right / have a known true label (monitoring only).
    ``finite``: False where the step was skipped (``on_nonfinite: skip``)."""
    loss_s: Tensor
    loss_u: Tensor
    mask_rate: Tensor
    pl_correct: Tensor
    pl_known: Tensor
    finite: bool


def train_step(state: TrainState, batch: Batch) -> StepStats:
    """One optimisation step of ``state`` on ``batch``; the state's step count goes up by one."""
    config, model = state.config, state.model
    saved_buffers = state.guard.save_buffers(model)  # skip mode: restored if this step is skipped
    loss, stats = forward_loss(state.train_model, batch.x_lb, batch.y_lb, batch.x_ulb_w, batch.x_ulb_s,
                               state.mean, state.std, tau=config.tau, lambda_u=config.lambda_u, T=config.T,
                               lu_norm=config.lu_norm, channels_last=config.channels_last,
                               weak_no_grad=config.weak_no_grad, amp=config.amp, bn_model=model, align=state.align,
                               rank_mean=state.rank_mean, policy=state.policy, idx_ulb=batch.idx_ulb,
                               fairness_weight=config.freematch_fairness_weight)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    # With fp16 loss scaling, overflowing gradients are the scaler's to skip: only the loss is checked.
    grads_checked = [] if state.scaler.is_enabled() else model.parameters()
    finite = state.guard.step_is_finite(state.step + 1, loss, grads_checked, model.buffers())
    if finite:
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.ema.update(model)
        if state.cta is not None:
            # CTAugment's bin weights follow how well the EMA model classifies labeled images under uniformly
            # drawn policies (the official code's probe step); every rank learns from the probes of all ranks.
            x_probe, probe_choices = state.cta.probe(batch.x_lb, batch.generator)
            with torch.no_grad():
                probs = torch.softmax(state.ema.module(normalize(x_probe, state.mean, state.std,
                                                                 config.channels_last)), 1)
            state.cta.update(probe_choices, probs, batch.y_lb, gather=state.rank_gather)
    else:
        state.guard.restore_buffers(model, saved_buffers)  # BatchNorm statistics as before the step
        if state.align is not None:
            state.align.drop_last()  # the skipped step's batch mean stays out of p_model
        if batch.x_ulb_w is not None:
            state.policy.drop_last()  # and its statistics out of the pseudo-label policy's
    state.step += 1
    pl_correct = pl_known = torch.zeros((), device=batch.y_lb.device)
    if batch.y_ulb_true is not None:  # pseudo-label accuracy on the masked samples, from the true labels
        pl_correct = ((stats.pseudo_label == batch.y_ulb_true) & stats.mask).sum()
        pl_known = (stats.mask & (batch.y_ulb_true >= 0)).sum()
    if finite:  # a skipped step stays out of the means logged at the next evaluation
        state.stats.add(loss_s=stats.loss_s, loss_u=stats.loss_u, mask_rate=stats.mask_rate, pl_correct=pl_correct,
                        steps=torch.ones((), device=pl_correct.device), pl_known=pl_known,
                        weight=stats.weight.float().mean() if stats.weight.numel() else stats.mask_rate)
    return StepStats(stats.loss_s, stats.loss_u, stats.mask_rate, pl_correct, pl_known, finite)
