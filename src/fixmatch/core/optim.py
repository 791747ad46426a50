"""The optimiser (SGD with Nesterov momentum as the paper, or Adam/AdamW), weight decay on weights only, and the
learning-rate schedule (the FixMatch cosine, ReduceLROnPlateau on the test accuracy, or constant; optional warm-up)."""
from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay convolution, linear and attention-projection weights only; no decay on BatchNorm/other norm
    parameters, biases, or a ViT's position embedding and class token.

    The official code adds wd * sum(||kernel||^2) / 2 to the loss for kernels only, whose gradient
    wd * w is exactly what SGD's coupled ``weight_decay`` adds before momentum.
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_kernel = name == "weight" and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            # Attention's fused q/k/v projection kernel is a parameter of the attention module itself.
            is_kernel |= isinstance(module, nn.MultiheadAttention) and name.endswith("proj_weight")
            (decay if is_kernel else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float,
                   name: str = "sgd") -> torch.optim.Optimizer:
    """sgd: the paper's (momentum, Nesterov, coupled L2 decay). adam: Adam with coupled L2 decay (added to the
    gradient). adamw: Adam with decoupled decay (w -= lr * wd * w). Adam's betas are PyTorch's (0.9, 0.999);
    momentum and nesterov apply to sgd only. All three decay kernels only (parameter_groups).
    """
    groups = parameter_groups(model, weight_decay)
    # foreach: one multi-tensor kernel per update instead of a Python loop over parameters.
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, foreach=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}; expected sgd, adam or adamw")


def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """lr(k) = lr0 * cos(7*pi*k / (16*K)): decays to lr0 * cos(7*pi/16) ~ 0.2 * lr0 at k = K, never to 0."""
    return base_lr * math.cos(7 * math.pi * step / (16 * total_steps))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class LRSchedule:
    """lr(k) = warm-up, then the schedule. Written by hand rather than with torch.optim.lr_scheduler because the
    loop sets the lr of every step itself (warm-up times schedule), and torch's ReduceLROnPlateau writes the
    optimiser's lr directly.

    warm-up (k < W): lr0 * (k + 1) / W, from lr0 / W up to lr0 at k = W - 1.
    cosine: lr0 * cos(7*pi*k' / (16*K')) with k' = k - W, K' = K - W (W = 0: exactly the paper's schedule;
        W > 0: the warm-up-then-cosine of the PyTorch ports).
    plateau: lr0 * factor^n, n = how often ``observe`` saw ``patience + 1`` evaluations in a row without a
        higher accuracy than the best so far (ReduceLROnPlateau's rule in mode max, without threshold or cooldown).
    constant: lr0.
    Its state (the plateau's best, counter and scale) goes into checkpoints so that a resumed run continues it.
    """

    def __init__(self, kind: str, base_lr: float, total_steps: int, warmup: int = 0, factor: float = 0.5,
                 patience: int = 3) -> None:
        if kind not in ("cosine", "plateau", "constant"):
            raise ValueError(f"unknown schedule {kind!r}; expected cosine, plateau or constant")
        self.kind, self.base_lr, self.total_steps, self.warmup = kind, base_lr, total_steps, warmup
        self.factor, self.patience = factor, patience
        self.scale, self.best, self.num_bad = 1.0, -math.inf, 0

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.kind == "cosine":
            return cosine_lr(step - self.warmup, max(self.total_steps - self.warmup, 1), self.base_lr)
        return self.base_lr * self.scale

    def observe(self, accuracy: float) -> None:
        """Called after each evaluation with the test accuracy; only the plateau schedule uses it."""
        if self.kind != "plateau":
            return
        if accuracy > self.best:
            self.best, self.num_bad = accuracy, 0
        else:
            self.num_bad += 1
            if self.num_bad > self.patience:
                self.scale *= self.factor
                self.num_bad = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "best": self.best, "num_bad": self.num_bad}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.best, self.num_bad = float(state["scale"]), float(state["best"]), int(state["num_bad"])
