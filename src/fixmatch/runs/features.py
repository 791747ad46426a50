"""Features of training images for choosing which to label: label selection (training) and ``fixmatch advise``
(inference) both embed images here, one layer below them.

Two embeddings: a network's pooled ``forward_features``, restored from a checkpoint or run directory (a train run's
EMA model, or a ``fixmatch pretrain`` run's network, which has no EMA), or, without a network, a fixed Gaussian
random projection of the per-pixel-standardised images (seed ``PROJECTION_SEED``, ``PROJECTION_DIM`` dimensions;
Johnson-Lindenstrauss: distances are preserved approximately). Both are deterministic.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fixmatch.core.preprocess import channel_stats, predict_logits
from fixmatch.data.split import SplitError
from fixmatch.runs.model_spec import CheckpointModel, load_model_checkpoint

__all__ = ["pixel_features", "checkpoint_features", "network_features", "embed_images", "PROJECTION_SEED",
           "PROJECTION_DIM", "PIXEL_FEATURES"]

PROJECTION_SEED = 0
PROJECTION_DIM = 128
_CHUNK = 2048  # images per block when computing features: bounds the float copy in memory
# What a user is told the images were embedded with when no network is given.
PIXEL_FEATURES = (f"a fixed random projection of the standardised pixels ({PROJECTION_DIM} dimensions, seed "
                  f"{PROJECTION_SEED})")


def pixel_features(images: torch.Tensor, dim: int = PROJECTION_DIM, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """A fixed Gaussian random projection of the per-pixel-standardised images: (N, dim) float64."""
    n = images.shape[0]
    d = int(np.prod(images.shape[1:]))
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(d, dim, generator=g, dtype=torch.float64) / dim**0.5
    # Mean and std of every pixel over the set, so that no pixel dominates the distances by its scale.
    total = torch.zeros(d, dtype=torch.float64)
    total_sq = torch.zeros(d, dtype=torch.float64)
    for start in range(0, n, _CHUNK):
        x = images[start:start + _CHUNK].reshape(-1, d).double()
        total += x.sum(0)
        total_sq += x.pow(2).sum(0)
    mean = total / n
    std = (total_sq / n - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
    out = torch.empty(n, dim, dtype=torch.float64)
    for start in range(0, n, _CHUNK):
        x = images[start:start + _CHUNK].reshape(-1, d).double()
        out[start:start + _CHUNK] = ((x - mean) / std) @ proj
    return out


def checkpoint_features(path: str | Path, images: torch.Tensor, batch_size: int = 256,
                        device: torch.device | str = "cpu", flag: str = "--selection-checkpoint") -> torch.Tensor:
    """Pooled ``forward_features`` of the network saved in a fixmatch checkpoint or run directory (its EMA model
    where it has one): (N, D) float64 on the CPU, computed on ``device``.

    The checkpoint is loaded as ``fixmatch.load`` loads it (its model description checked first), and the
    images are standardised with the statistics the network was trained with, which it records. ``flag`` names
    the option the checkpoint came from in error messages.
    """
    return network_features(load_model_checkpoint(path, "ema"), images, batch_size, device, flag)


def network_features(loaded: CheckpointModel, images: torch.Tensor, batch_size: int = 256,
                     device: torch.device | str = "cpu", flag: str = "--selection-checkpoint") -> torch.Tensor:
    """``checkpoint_features`` of a network already restored by ``load_model_checkpoint``."""
    spec, model, path = loaded.spec, loaded.backbone, loaded.source
    if spec.in_channels != images.shape[1]:
        raise SplitError(f"{flag} {path} does not fit these images (its model takes "
                         f"{spec.in_channels}-channel images, these have {images.shape[1]}); use a checkpoint "
                         "trained on images with the same channels")
    if not hasattr(model, "forward_features"):
        raise SplitError(f"model {spec.name!r} has no forward_features; pick another checkpoint")
    model.to(device)
    mean, std = channel_stats(spec.mean, spec.std, device)
    return predict_logits(model, images, mean, std, batch_size, forward=model.forward_features).flatten(1).double()


def embed_images(images: torch.Tensor, checkpoint: str | Path | None, device: torch.device | str = "cpu",
                 flag: str = "--features") -> tuple[torch.Tensor, str]:
    """(features (N, D) float64, what they are, in words): the checkpoint's network's features, or without one
    ``pixel_features``."""
    if checkpoint:
        return (checkpoint_features(checkpoint, images, device=device, flag=flag),
                f"the features of the network in {checkpoint}")
    return pixel_features(images), PIXEL_FEATURES
