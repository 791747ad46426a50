"""SGD with Nesterov momentum, weight decay on weights only, and the FixMatch cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay convolution and linear weights only; no decay on BatchNorm/other norm parameters or biases.

    The official code adds wd * sum(||kernel||^2) / 2 to the loss for kernels only, whose gradient
    wd * w is exactly what SGD's coupled ``weight_decay`` adds before momentum.
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_kernel = name == "weight" and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            (decay if is_kernel else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float
                   ) -> torch.optim.SGD:
    # foreach: one multi-tensor kernel per update instead of a Python loop over parameters.
    return torch.optim.SGD(parameter_groups(model, weight_decay), lr=lr, momentum=momentum,
                           nesterov=nesterov and momentum > 0, foreach=True)


def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """lr(k) = lr0 * cos(7*pi*k / (16*K)): decays to lr0 * cos(7*pi/16) ~ 0.2 * lr0 at k = K, never to 0."""
    return base_lr * math.cos(7 * math.pi * step / (16 * total_steps))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
