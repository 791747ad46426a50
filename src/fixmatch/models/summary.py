"""Parameter counts and forward FLOPs of the registered models at a given input size (``fixmatch models``).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one image, which counts a
multiply-add as 2 FLOPs (FLOPs = 2 x MACs) for convolutions, matrix products and attention, and
ignores normalisation, activations, pooling and additions (a few percent of the total). Models are
built on the ``meta`` device, so nothing is allocated or computed: listing every model takes seconds.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fixmatch.models import ModelError, count_parameters, create_model, list_models

# Input shape (C, H, W) and classes of well-known data sets, so that listing needs no download.
KNOWN_DATASETS: dict[str, tuple[tuple[int, int, int], int]] = {
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "svhn": ((3, 32, 32), 10),
    "stl10": ((3, 96, 96), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "mnist": ((1, 28, 28), 10),
    "imagenet": ((3, 224, 224), 1000),
}


@contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    # The fused inference kernel of nn.MultiheadAttention is invisible to FlopCounterMode.
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def count_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Forward FLOPs (2 x multiply-adds) of ``model`` on one image of shape (C, H, W), in eval mode."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with _no_mha_fastpath(), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


@dataclass
class ModelInfo:
    name: str
    parameters: int | None  # None when the model cannot take this input
    flops: int | None
    note: str = ""


def describe_models(input_shape: tuple[int, int, int], num_classes: int, names: list[str] | None = None
                    ) -> list[ModelInfo]:
    """Parameters and forward FLOPs per image of each model built for ``input_shape`` and ``num_classes``."""
    channels, height, width = input_shape
    rows = []
    for name in names or list_models():
        try:
            with torch.device("meta"):
                model = create_model(name, num_classes, channels, image_size=(height, width))
                rows.append(ModelInfo(name, count_parameters(model), count_flops(model, input_shape),
                                      _stem_note(model)))
        except (ModelError, RuntimeError, ValueError) as e:
            rows.append(ModelInfo(name, None, None, f"cannot take {channels}x{height}x{width}: {e}"))
    return rows


def _stem_note(model: nn.Module) -> str:
    if hasattr(model, "stem_kind"):
        return f"{model.stem_kind} stem"
    if hasattr(model, "patch_size"):
        return f"patch {model.patch_size}"
    return ""


def format_table(rows: list[ModelInfo], input_shape: tuple[int, int, int], num_classes: int) -> str:
    c, h, w = input_shape
    lines = [f"input {c}x{h}x{w}, {num_classes} classes; FLOPs = 2 x multiply-adds, forward, one image",
             f"{'model':<20}{'parameters':>14}{'GFLOPs':>10}  note"]
    for r in rows:
        params = f"{r.parameters:,}" if r.parameters is not None else "-"
        flops = f"{r.flops / 1e9:.3f}" if r.flops is not None else "-"
        lines.append(f"{r.name:<20}{params:>14}{flops:>10}  {r.note}".rstrip())
    return "\n".join(lines)


def parse_input_size(text: str) -> tuple[int, int, int]:
    """'3,32,32' -> (3, 32, 32)."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ModelError(f"--input-size expects C,H,W as three positive integers (e.g. 3,32,32), got {text!r}")
    return shape  # type: ignore[return-value]


def input_for(dataset: str | None, input_size: str | None, num_classes: int | None,
              read_dataset: Callable[[str], tuple[tuple[int, int, int], int]]) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) and classes for ``fixmatch models``: from --input-size, a data set's name, or CIFAR-10's.

    ``read_dataset(name)`` gives the shape and classes of any other data set (a folder, the synthetic one), read
    from disk by the caller: models sit below data and do not load data sets themselves.
    """
    if num_classes is not None and num_classes < 1:
        raise ModelError(f"--num-classes must be a positive integer, got {num_classes}")
    if input_size is not None:
        return parse_input_size(input_size), num_classes or 10
    if dataset is None:
        dataset = "cifar10"
    if dataset.lower() in KNOWN_DATASETS:
        shape, classes = KNOWN_DATASETS[dataset.lower()]
        return shape, num_classes or classes
    shape, classes = read_dataset(dataset)
    return shape, num_classes or classes
