"""The forward half of a FixMatch step: augmented batches in, loss and statistics out.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fixmatch.inference.evaluate import normalize
from fixmatch.core.loss import LossStats, fixmatch_loss

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
                 rank_mean: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, LossStats]:
    """Loss Ls + lambda_u * Lu of one step (``fixmatch_loss``) from float images in [0, 1].

    ``x_ulb_w`` / ``x_ulb_s`` None: the supervised baseline. ``model`` is what is called (possibly wrapped in
    DistributedDataParallel or compiled); ``bn_model`` is the plain module whose BatchNorm layers
    ``weak_no_grad`` freezes (default: ``model``). ``align``: distribution alignment of the pseudo-label
    probabilities (``fixmatch_loss``), None for the paper's FixMatch. ``rank_mean``: the mean over ranks with
    several processes (``fixmatch_loss``'s masked Lu), None for one.
    """
    def net(x: Tensor) -> Tensor:
        return model(normalize(x, mean, std, channels_last))

    loss_kw = dict(tau=tau, lambda_u=lambda_u, T=T, lu_norm=lu_norm, align=align, rank_mean=rank_mean)
    with autocast(x_lb.device, amp):
        if x_ulb_w is None or x_ulb_s is None:
            return fixmatch_loss(net(x_lb), y_lb, None, None, **loss_kw)
        n_lb = x_lb.shape[0]
        if weak_no_grad:
            with torch.no_grad(), frozen_running_stats(bn_model if bn_model is not None else model):
                logits_w = net(x_ulb_w)
            logits = net(torch.cat([x_lb, x_ulb_s]))
            return fixmatch_loss(logits[:n_lb], y_lb, logits_w, logits[n_lb:], **loss_kw)
        # One forward pass over labeled, weak and strong images: BatchNorm sees all of them.
        logits = net(torch.cat([x_lb, x_ulb_w, x_ulb_s]))
        n_ulb = x_ulb_w.shape[0]
        return fixmatch_loss(logits[:n_lb], y_lb, logits[n_lb:n_lb + n_ulb], logits[n_lb + n_ulb:], **loss_kw)
