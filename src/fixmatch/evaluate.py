"""Test-set metrics for a model, a checkpoint or a run directory.

The metric functions are pure (tensors in, numbers out); ``evaluate`` loads, predicts and reports.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fixmatch.atomic import atomic_path
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


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """int64 (C, C): entry [i, j] counts images of true class i predicted as class j."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(confusion: Tensor) -> list[float | None]:
    """Recall of each class in percent (None for a class without test images)."""
    support = confusion.sum(1)
    return [100.0 * confusion[i, i].item() / n if n else None for i, n in enumerate(support.tolist())]


def macro_f1(confusion: Tensor) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN), in percent.

    Classes that neither occur nor are predicted have no F1 and are left out of the mean (as
    scikit-learn does when it infers the labels from the data).
    """
    tp = confusion.diag().double()
    denom = 2 * tp + (confusion.sum(0) - confusion.diag()) + (confusion.sum(1) - confusion.diag())
    present = denom > 0
    if not present.any():
        return 0.0
    return 100.0 * (2 * tp[present] / denom[present]).mean().item()


def draw_confusion(ax: Any, confusion: Tensor, class_names: list[str]) -> None:
    """Draws a confusion matrix on a matplotlib Axes: colour = fraction of the true class, cells = counts."""
    c = confusion.double()
    rates = (c / c.sum(1, keepdim=True).clamp_min(1)).numpy()
    n = len(class_names)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:  # beyond that the numbers are unreadable
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8 if n <= 12 else 7,
                        color="white" if rates[i, j] > 0.5 else "black")


def plot_confusion(confusion: Tensor, class_names: list[str], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix as a PNG (counts in the cells), written atomically."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("drawing the confusion matrix needs matplotlib: pip install 'fixmatch[report]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"the confusion matrix is written as PNG; give a file name ending in .png, not {path.name}")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: folder {path.parent} does not exist")
    side = max(4.0, 0.55 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    draw_confusion(ax, confusion, class_names)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def classification_metrics(logits: Tensor, labels: Tensor, class_names: list[str]) -> dict[str, Any]:
    """Top-1/top-5, per-class accuracy, macro-F1 and the confusion matrix (as nested lists)."""
    cm = confusion_matrix(logits.argmax(1), labels, len(class_names))
    acc = accuracy_metrics(logits, labels)
    return {"test_acc": acc["top1"], "test_top5": acc["top5"], "macro_f1": macro_f1(cm),
            "per_class_acc": dict(zip(class_names, per_class_accuracy(cm))), "confusion": cm.tolist()}


def evaluate(path: str | Path, data_dir: str | None = None, device: str = "auto", weights: str = "ema",
             dataset: str | None = None, confusion_png: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a run directory (its last checkpoint) or a checkpoint file on a test set.

    ``dataset`` defaults to the one the model was trained on; another must have the same classes,
    channels and image size. The images are standardised with the training run's statistics.
    """
    from fixmatch.inference import load
    from fixmatch.model_spec import load_run_dataset

    model = load(path, weights=weights, device=device, data_dir=data_dir)
    name = dataset or model.config.get("dataset")
    if not isinstance(name, str):
        raise ConfigError(f"{model.source} names no data set in its config; give one with --dataset")
    data = load_run_dataset(model.config, data_dir, name)
    spec = model.spec
    if data.num_classes != spec.num_classes:
        raise ConfigError(f"data set {name!r} has {data.num_classes} classes but the model predicts "
                          f"{spec.num_classes}; evaluate on a data set with the same classes")
    if data.in_channels != spec.in_channels or data.image_size != tuple(spec.input_size):
        raise ConfigError(f"data set {name!r} has {data.in_channels}x{data.image_size[0]}x{data.image_size[1]} "
                          f"images but the model takes {spec.in_channels}x{spec.input_size[0]}x{spec.input_size[1]}")
    batch_size = model.config.get("eval_batch_size")
    # The run's setting, unless the config is damaged (the model description alone was checked on loading).
    batch_size = batch_size if type(batch_size) is int and 0 < batch_size <= 65536 else 256
    logits = model.logits(data.test_images, batch_size=batch_size)
    metrics = classification_metrics(logits, data.test_labels, list(spec.class_names))
    if confusion_png is not None:
        plot_confusion(torch.tensor(metrics["confusion"]), list(spec.class_names), confusion_png,
                       title=f"{spec.name} on {name} test set ({weights} weights)")
    return {"checkpoint": model.source, "step": model.step, "weights": weights, "dataset": name,
            "num_test": int(data.test_labels.numel()), **metrics}
