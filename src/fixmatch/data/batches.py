"""Endless labeled and unlabeled index streams.

Each stream is a pure function of (seed, step): pass e over the pool uses the permutation drawn
from seed and e, and step k takes the samples at positions [k*B, (k+1)*B) of the concatenated
passes. Resuming at step k therefore needs no saved sampler state, and batches larger than the
pool (64 labeled images per step from 40 labels) simply span passes.
"""
from __future__ import annotations

import torch
from torch import Tensor


class IndexStream:
    def __init__(self, pool: Tensor | list[int], batch_size: int, seed: int, stream_id: int) -> None:
        self.pool = torch.as_tensor(pool, dtype=torch.long)
        if self.pool.numel() == 0:
            raise ValueError("cannot draw batches from an empty pool of images")
        self.batch_size = batch_size
        self.seed = seed
        self.stream_id = stream_id
        self._perms: dict[int, Tensor] = {}

    def _permutation(self, pass_index: int) -> Tensor:
        perm = self._perms.get(pass_index)
        if perm is None:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.stream_id) * 1_000_003 + pass_index)
            perm = self.pool[torch.randperm(self.pool.numel(), generator=g)]
            if len(self._perms) > 4:  # steps only move forward: keep the few passes in use
                self._perms.pop(min(self._perms))
            self._perms[pass_index] = perm
        return perm

    def batch(self, step: int) -> Tensor:
        """Indices of the images for optimiser step ``step``."""
        n = self.pool.numel()
        start = step * self.batch_size
        first, last = start // n, (start + self.batch_size - 1) // n
        if first == last:
            offset = start - first * n
            return self._permutation(first)[offset:offset + self.batch_size]
        positions = torch.arange(start, start + self.batch_size)
        passes, offsets = positions // n, positions % n
        out = torch.empty(self.batch_size, dtype=torch.long)
        for p in range(first, last + 1):
            sel = passes == p
            out[sel] = self._permutation(p)[offsets[sel]]
        return out
