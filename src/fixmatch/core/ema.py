"""Exponential moving average of a model's weights, used for evaluation."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * weights after every optimiser step.

    Only parameters are averaged; buffers (BatchNorm running statistics) are copied from the live
    model, whose statistics are already running averages. decay = 0 makes the EMA a plain copy.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._ema_params = list(self.module.parameters())
        self._ema_buffers = list(self.module.buffers())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        # lerp(ema, p, 1 - decay) = decay * ema + (1 - decay) * p, in one multi-tensor kernel.
        torch._foreach_lerp_(self._ema_params, params, 1.0 - self.decay)
        for ema_b, b in zip(self._ema_buffers, model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
