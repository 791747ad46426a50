"""Test-set metrics for a model, a checkpoint or a run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fixmatch.checkpoint import find_checkpoint, load_checkpoint
from fixmatch.config import ConfigError, config_from_dict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def normalize(x: Tensor, mean: Tensor, std: Tensor, channels_last: bool) -> Tensor:
    """float images in [0, 1] -> the network's input: per-channel standardisation with the data set's statistics."""
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, mean: Tensor, std: Tensor, batch_size: int,
                   channels_last: bool = False) -> Tensor:
    """Logits for uint8 images (N, C, H, W), in eval mode, batch by batch on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255)
        out.append(model(normalize(x, mean, std, channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def accuracy_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (top-5 is top-k with k = min(5, classes))."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    correct = topk == labels.view(-1, 1)
    return {"top1": 100.0 * correct[:, 0].float().mean().item(), "top5": 100.0 * correct.any(1).float().mean().item()}


def evaluate(path: str | Path, data_dir: str | None = None, device: str = "auto", weights: str = "ema"
             ) -> dict[str, Any]:
    """Re-evaluate a run directory (its last checkpoint) or a checkpoint file on the test set."""
    from fixmatch.data.datasets import load_dataset
    from fixmatch.models import create_model

    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be 'ema' or 'raw', not {weights!r}")
    ckpt_path = find_checkpoint(path)
    state = load_checkpoint(ckpt_path)
    config = config_from_dict(state["config"], f"checkpoint {ckpt_path}")
    dev = resolve_device(device)
    data = load_dataset(config.dataset, data_dir or config.data_dir, image_size=config.image_size,
                        on_bad_image=config.on_bad_image, labels_csv=config.labels_csv)
    model = create_model(config.model, data.num_classes, data.in_channels, image_size=data.image_size)
    model.load_state_dict(state["ema" if weights == "ema" and state.get("ema") is not None else "model"])
    model.to(dev)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    mean, std = channel_stats(data.mean, data.std, dev)
    logits = predict_logits(model, data.test_images, mean, std, config.eval_batch_size, config.channels_last)
    metrics = accuracy_metrics(logits, data.test_labels)
    return {"checkpoint": str(ckpt_path), "step": int(state["step"]), "weights": weights, "dataset": config.dataset,
            "num_test": int(data.test_labels.numel()), "test_acc": metrics["top1"], "test_top5": metrics["top5"]}
