"""What a checkpoint says about its model, so that the checkpoint alone is enough to use it.

Training adds ``checkpoint_fields(...)`` to every checkpoint: the registry name and constructor
arguments of the backbone, the input channels and size, and the per-channel mean/std of the training
images that the network's input was standardised with (``class_names`` is stored beside them).
Checkpoints written before these fields existed are described from their saved config, by loading
their data set from disk (never downloading).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fixmatch.checkpoint import CheckpointError

SPEC_KEYS = ("model_name", "model_kwargs", "in_channels", "input_size", "mean", "std", "class_names")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry name (fixmatch models)
    class_names: tuple[str, ...]
    in_channels: int  # 1 (grayscale, PIL mode L) or 3 (RGB) for the data sets shipped
    input_size: tuple[int, int]  # (height, width) of the training images
    mean: tuple[float, ...]  # per-channel mean of the training images on the [0, 1] scale
    std: tuple[float, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments of the backbone

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def build(self) -> nn.Module:
        """The backbone with freshly initialised weights, ready for ``load_state_dict``."""
        from fixmatch.models import create_model
        return create_model(self.name, self.num_classes, self.in_channels, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's fields (plain, JSON-serialisable values)."""
        return {"model_name": self.name, "model_kwargs": dict(self.kwargs), "in_channels": self.in_channels,
                "input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "class_names": list(self.class_names)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> ModelSpec:
        """Validate the fields (a checkpoint or an exported file may be damaged or hand-edited)."""
        missing = [k for k in SPEC_KEYS if k not in d]
        if missing:
            raise CheckpointError(f"{source} lacks the model description field(s) {', '.join(missing)}")
        try:
            spec = cls(name=str(d["model_name"]), kwargs=dict(d["model_kwargs"]),
                       class_names=tuple(str(c) for c in d["class_names"]), in_channels=int(d["in_channels"]),
                       input_size=tuple(int(s) for s in d["input_size"]),  # type: ignore[arg-type]
                       mean=tuple(float(m) for m in d["mean"]), std=tuple(float(s) for s in d["std"]))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source} has a malformed model description ({e})") from None
        problem = spec._problem()
        if problem:
            raise CheckpointError(f"{source} has a malformed model description: {problem}")
        return spec

    def _problem(self) -> str:
        if self.in_channels < 1 or len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            return f"{self.in_channels} input channels with mean {self.mean} and std {self.std}"
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            return f"input size {self.input_size} is not (height, width)"
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            return f"std {self.std} must be positive"
        if self.num_classes < 1:
            return "no class names"
        return ""


def checkpoint_fields(name: str, kwargs: dict[str, Any], data: Any) -> dict[str, Any]:
    """The model description a training run adds to its checkpoints (``data``: the training Dataset)."""
    return ModelSpec(name=name, kwargs=dict(kwargs), class_names=tuple(data.class_names),
                     in_channels=data.in_channels, input_size=data.image_size, mean=tuple(data.mean),
                     std=tuple(data.std)).to_dict()


def load_run_dataset(config: dict[str, Any], data_dir: str | Path | None = None, name: str | None = None,
                     download: bool = True) -> Any:
    """The data set of a run's saved config (or data set ``name``), loaded with the run's folder options."""
    from fixmatch.data.datasets import load_dataset

    return load_dataset(name or config["dataset"], data_dir or config.get("data_dir"), download,
                        image_size=config.get("image_size"), on_bad_image=config.get("on_bad_image", "error"),
                        labels_csv=config.get("labels_csv"))


def spec_from_checkpoint(state: dict[str, Any], source: str | Path, data_dir: str | Path | None = None
                         ) -> ModelSpec:
    """The checkpoint's model description; for older checkpoints, derived from the config and data set."""
    if "model_name" in state:
        return ModelSpec.from_dict(state, str(source))
    from fixmatch.data.datasets import DatasetError

    config = state.get("config") or {}
    if "dataset" not in config or "model" not in config:
        raise CheckpointError(f"{source} has neither a model description nor a config to derive one from")
    try:
        data = load_run_dataset(config, data_dir, download=False)
    except DatasetError as e:
        raise CheckpointError(f"{source} predates self-describing checkpoints; its input size and normalisation "
                              f"come from the {config['dataset']!r} data set, which could not be read: {e}") from None
    # Training then built every backbone with the data set's image size (models/__init__.py: create_model).
    fields_ = checkpoint_fields(config["model"], {"image_size": list(data.image_size)}, data)
    if state.get("class_names"):
        fields_["class_names"] = list(state["class_names"])
    return ModelSpec.from_dict(fields_, str(source))
