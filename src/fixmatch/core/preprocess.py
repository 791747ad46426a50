"""What an image goes through before the network, written once for training, evaluation, label selection,
``fixmatch.load`` and the exports: uint8 [0, 255] -> float [0, 1] -> per-channel standardisation with the
training set's mean/std (-> channels-last where the run asks for it), batch by batch on the model's device.

``resolve_device`` turns the ``device`` config value into a torch.device for training and for using a model.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fixmatch.config import Config, ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the values the ``device`` config key takes) as a torch.device."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use --device cpu or auto")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' requested but there are {torch.cuda.device_count()} CUDA devices; "
                          f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}, cuda or auto")
    return device


def check_device_name(name: Any) -> None:
    """ConfigError for a value the ``device`` config key refuses (train checks the same with that key)."""
    key = next(f for f in fields(Config) if f.name == "device")
    if not isinstance(name, str) or not key.metadata["check"](name):
        raise ConfigError(f"unknown device {name!r}; use {key.metadata['accepted']}")


def to_unit(x: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [0, 1]; float images (already in [0, 1]) as float32."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def normalize(x: Tensor, mean: Tensor, std: Tensor, channels_last: bool) -> Tensor:
    """float images in [0, 1] -> the network's input: per-channel standardisation with the data set's statistics."""
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def channel_stats(mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
                  ) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std as float32 (1, C, 1, 1) tensors on ``device``, ready to broadcast over a batch."""
    return (torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1),
            torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1))


class Preprocess(nn.Module):
    """uint8 [0, 255] or float [0, 1] images (N, C, H, W) of any size -> the network's standardised input.

    The module form of ``to_unit`` and ``normalize``, with a resize to the model's input size in between, so
    that ``fixmatch.load`` and the TorchScript/.pt2/ONNX exports carry the preprocessing inside the graph. The
    resize (bilinear with antialiasing, so that shrinking averages like PIL's resize does) is an exact identity
    when the images already have the input size, which is the case for training data.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], input_size: tuple[int, int]) -> None:
        super().__init__()
        mean_t, std_t = channel_stats(mean, std)
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.input_size = [int(input_size[0]), int(input_size[1])]

    def resize(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)

    def forward(self, x: Tensor) -> Tensor:
        return normalize(self.resize(to_unit(x)), self.mean, self.std, False)


def run_batches(fn: Callable[[Tensor], Tensor], images: Tensor, batch_size: int, device: torch.device
                ) -> list[Tensor]:
    """``fn`` of each slice of ``batch_size`` images, moved to ``device``; the outputs as float32 on the CPU."""
    return [fn(images[start:start + batch_size].to(device, non_blocking=True)).float().cpu()
            for start in range(0, images.shape[0], batch_size)]


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, mean: Tensor, std: Tensor, batch_size: int,
                   channels_last: bool = False, forward: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Logits for uint8 images (N, C, H, W), in eval mode, batch by batch on the model's device.

    ``forward``, when given, runs on each standardised batch instead of ``model`` itself (label selection takes
    the model's ``forward_features``); ``model`` still picks the device and is switched to eval mode.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    run = forward or model
    out = run_batches(lambda x: run(normalize(to_unit(x), mean, std, channels_last)), images, batch_size, device)
    model.train(was_training)
    return torch.cat(out)
