"""One step's batches: index streams -> uint8 images on the device -> weak and strong views.

Global batches hold B labeled and mu*B unlabeled images whatever the number of processes; each rank takes its
slice (distributed.shard). The augmentation generator is reseeded from (seed, step, rank), so a resumed run
draws the same views as an uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fixmatch.data.batches import IndexStream
from fixmatch.data.datasets import Dataset
from fixmatch.data.pool import gather_pool
from fixmatch.training import distributed

View = Callable[[Tensor, torch.Generator], Tensor]  # uint8 or float batch, generator -> float batch in [0, 1]


@dataclass
class Batch:
    """The paper's names: ``x_lb``/``y_lb`` labeled (weak view), ``x_ulb_w``/``x_ulb_s`` the unlabeled images'
    weak and strong views (None for the supervised baseline). ``y_ulb_true``: the unlabeled images' true labels
    (-1 where unknown), read only to monitor pseudo-label accuracy. ``generator``: the step's augmentation
    generator, positioned after the views' draws (CTAugment's probe draws from it next). ``idx_ulb``: the
    unlabeled images' indices in the pool (FlexMatch keeps a state per pool image), on the device."""
    x_lb: Tensor
    y_lb: Tensor
    x_ulb_w: Tensor | None
    x_ulb_s: Tensor | None
    y_ulb_true: Tensor | None
    generator: torch.Generator
    idx_ulb: Tensor | None = None


class Batches:
    """``batches.get(step, strong)``: the augmented batch of ``step`` for this rank.

    ``strong`` is passed per call because it belongs to the training state (CTAugment learns its rates there);
    the weak view and the data stay the same for the whole run.
    """

    def __init__(self, data: Dataset, stream_lb: IndexStream, stream_ulb: IndexStream | None, weak: View,
                 y_pool: Tensor, seed: int, env: distributed.DistEnv, device: torch.device) -> None:
        self.data, self.stream_lb, self.stream_ulb, self.weak = data, stream_lb, stream_ulb, weak
        self.y_pool, self.seed, self.env, self.device = y_pool, seed, env, device
        self.pin = device.type == "cuda"  # gathered into page-locked memory, copied asynchronously
        self.generator = torch.Generator(device=device)

    def _to_device(self, x: Tensor) -> Tensor:
        return x.to(self.device, non_blocking=True)

    def get(self, step: int, strong: View) -> Batch:
        gen = self.generator
        gen.manual_seed(distributed.augment_seed(self.seed, step, self.env.rank))
        idx_lb = distributed.shard(self.stream_lb.batch(step), self.env)
        x_lb = self.weak(self._to_device(gather_pool(self.data.train_images, None, idx_lb, pin=self.pin)), gen)
        y_lb = self._to_device(self.data.train_labels[idx_lb])
        if self.stream_ulb is None:  # the supervised baseline
            return Batch(x_lb, y_lb, None, None, None, gen)
        idx_ulb = distributed.shard(self.stream_ulb.batch(step), self.env)
        u = self._to_device(gather_pool(self.data.train_images, self.data.unlabeled_images, idx_ulb, pin=self.pin))
        # Strong view = its own flip/translate, then RandAugment and Cutout (as the PyTorch ports do).
        x_ulb_w, x_ulb_s = self.weak(u, gen), strong(self.weak(u, gen), gen)
        return Batch(x_lb, y_lb, x_ulb_w, x_ulb_s, self._to_device(self.y_pool[idx_ulb]), gen,
                     self._to_device(torch.as_tensor(idx_ulb, dtype=torch.long)))
