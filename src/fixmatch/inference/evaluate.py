"""Test-set metrics for a model, a checkpoint or a run directory.

``evaluate`` loads, predicts and reports; the metrics themselves are pure functions in ``core/metrics.py``
(training's evaluations compute the same), and the confusion matrix is drawn here.
"""
from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fixmatch.config import ConfigError
from fixmatch.core.atomic import atomic_path
from fixmatch.core.metrics import classification_metrics
from fixmatch.inference.model import load
from fixmatch.runs.model_spec import load_run_dataset


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


def class_key(name: str) -> str:
    """A class name as compared between a model and a data set: case, Unicode composition, surrounding space
    and which separator joins the words (spaces, '_', '-', '/') do not count.

    Folder names cannot hold '/', so Fashion-MNIST's 'T-shirt/top' is naturally a folder 'T-shirt_top' or
    't-shirt top'; those are one name here. Words stay words: 'Tshirt' is not 'T-shirt'.
    """
    text = unicodedata.normalize("NFC", name).casefold()
    return re.sub(r"[\s_/-]+", " ", text).strip()


def match_classes(model_names: list[str], data_names: list[str], dataset: str) -> list[int]:
    """For each class of the data set, the model's output for the class of that name.

    Names are compared exactly, else through ``class_key`` when that maps each side's names one to one (two
    names never become one). A data set whose classes are not the model's is refused, naming the differences.
    """
    for key in (str, class_key):
        model_keys, data_keys = [key(n) for n in model_names], [key(n) for n in data_names]
        if len(set(model_keys)) < len(model_keys) or len(set(data_keys)) < len(data_keys):
            continue  # this comparison would merge two classes of one side
        if sorted(model_keys) == sorted(data_keys):
            index = {k: i for i, k in enumerate(model_keys)}
            return [index[k] for k in data_keys]
    model_set, data_set = {class_key(n) for n in model_names}, {class_key(n) for n in data_names}
    unknown = [n for n in data_names if class_key(n) not in model_set]
    missing = [n for n in model_names if class_key(n) not in data_set]
    differences = [f"classes the model does not know ({_few(unknown)})"] if unknown else []
    differences += [f"lacks {len(missing)} of the model's {len(model_names)} classes ({_few(missing)})"] \
        if missing else []
    if not differences:  # the same names, but only case or separators tell two of them apart on one side
        differences = ["classes that differ from the model's only in case or separators"]
    raise ConfigError(f"data set {dataset!r} has {' and '.join(differences)}; evaluate on a data set with the "
                      f"model's classes (for a folder data set, name its class folders as the model's classes)")


def _few(names: list[str], shown: int = 3) -> str:
    """A few names for a one-line message (each quoted with repr, so a name cannot break the line)."""
    text = ", ".join(repr(n) if len(n) <= 40 else repr(n[:37]) + "..." for n in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def evaluate(path: str | Path, data_dir: str | None = None, device: str = "auto", weights: str = "ema",
             dataset: str | None = None, confusion_png: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a run directory (its last checkpoint) or a checkpoint file on a test set.

    ``dataset`` defaults to the one the model was trained on; another must have the same class names,
    channels and image size. Classes are matched by name (``match_classes``): a data set that lists the
    model's classes in another order is evaluated with its labels mapped to the model's (one line on stderr
    says so; ``classes_remapped`` in the result), and the per-class metrics and the confusion matrix follow the
    model's class order. The images are standardised with the training run's statistics.
    """
    model = load(path, weights=weights, device=device, data_dir=data_dir)
    name = dataset or model.config.get("dataset")
    if not isinstance(name, str):
        raise ConfigError(f"{model.source} names no data set in its config; give one with --dataset")
    data = load_run_dataset(model.config, data_dir, name)
    spec = model.spec
    to_model = match_classes(list(spec.class_names), list(data.class_names), name)
    if data.in_channels != spec.in_channels or data.image_size != tuple(spec.input_size):
        raise ConfigError(f"data set {name!r} has {data.in_channels}x{data.image_size[0]}x{data.image_size[1]} "
                          f"images but the model takes {spec.in_channels}x{spec.input_size[0]}x{spec.input_size[1]}")
    remapped = to_model != list(range(len(to_model)))
    if remapped:
        loosely = "" if sorted(spec.class_names) == sorted(data.class_names) else \
            " (ignoring case and the separators ' ', '_', '-', '/')"
        print(f"fixmatch: note: data set {name!r} lists the model's classes in another order; its labels were "
              f"mapped to the model's classes by name{loosely}", file=sys.stderr)
    labels = torch.tensor(to_model, dtype=torch.int64)[data.test_labels]
    batch_size = model.config.get("eval_batch_size")
    # The run's setting, unless the config is damaged (the model description alone was checked on loading).
    batch_size = batch_size if type(batch_size) is int and 0 < batch_size <= 65536 else 256
    logits = model.logits(data.test_images, batch_size=batch_size)
    metrics = classification_metrics(logits, labels, list(spec.class_names))
    if confusion_png is not None:
        plot_confusion(torch.tensor(metrics["confusion"]), list(spec.class_names), confusion_png,
                       title=f"{spec.name} on {name} test set ({weights} weights)")
    return {"checkpoint": model.source, "step": model.step, "weights": weights, "dataset": name,
            "num_test": int(data.test_labels.numel()), **metrics, "classes_remapped": remapped}
