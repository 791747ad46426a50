"""What a checkpoint says about its model, so that the checkpoint alone is enough to use it.

Training adds ``checkpoint_fields(...)`` to every checkpoint: the registry name and constructor
arguments of the backbone, the input channels and size, and the per-channel mean/std of the training
images that the network's input was standardised with (``class_names`` is stored beside them).
Checkpoints written before these fields existed are described from their saved config, by loading
their data set from disk (never downloading).

A description is checked before anything is built from it (a damaged or crafted file must not make
``load`` allocate for an absurd network or input): every field within bounds, and the network it describes
built on the meta device (shapes only, no memory) and compared, tensor by tensor, with the weights the file
holds, which must also be finite. ``load_model_checkpoint`` is the one place a network is restored from a
checkpoint for use (``fixmatch.load`` and the features of ``--selection-checkpoint``), so every such use gets
these checks.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fixmatch.runs.checkpoint import CheckpointError, CheckpointFields, find_checkpoint, load_checkpoint

SPEC_KEYS = ("model_name", "model_kwargs", "in_channels", "input_size", "mean", "std", "class_names")

# Bounds of a description, far above any model this package trains: the shipped data sets are at most 224
# pixels a side and folder data sets default to at most 96; one image at the largest input size is 50 MB as
# float RGB (an unbounded size let a crafted file ask for 120 GB).
MAX_INPUT_SIDE = 2048
MAX_CHANNELS = 4
MAX_CLASSES = 100_000
# Constructor arguments: scalars or short lists, integers at most this (layer counts and widths of real
# networks are far below it; a larger one would make even the shape-only build slow).
MAX_KWARG_INT = 4096
_MAX_KWARG_LIST = 16


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
        if not isinstance(d, dict):
            raise CheckpointError(f"{source} has a malformed model description (a {type(d).__name__}, not a mapping); "
                                  f"{_FIX}")
        missing = [k for k in SPEC_KEYS if k not in d]
        if missing:
            raise CheckpointError(f"{source} lacks the model description field(s) {', '.join(missing)}")
        try:
            spec = cls(name=str(d["model_name"]), kwargs=dict(d["model_kwargs"]),
                       class_names=tuple(str(c) for c in d["class_names"]), in_channels=int(d["in_channels"]),
                       input_size=tuple(int(s) for s in d["input_size"]),  # type: ignore[arg-type]
                       mean=tuple(float(m) for m in d["mean"]), std=tuple(float(s) for s in d["std"]))
        except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
            raise CheckpointError(f"{source} has a malformed model description ({_clip(str(e), 120)}); {_FIX}"
                                  ) from None
        problem = spec._problem()
        if problem:
            raise CheckpointError(f"{source} has a malformed model description: {problem}; {_FIX}")
        return spec

    def _problem(self) -> str:
        from fixmatch.models import list_models

        if not 1 <= self.in_channels <= MAX_CHANNELS:
            return f"{self.in_channels} input channels (1 to {MAX_CHANNELS} are possible)"
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            return f"{self.in_channels} input channels with mean {_short(self.mean)} and std {_short(self.std)}"
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            return f"input size {_short(self.input_size)} is not (height, width)"
        if max(self.input_size) > MAX_INPUT_SIDE:
            return f"input size {self.input_size} is over the limit of {MAX_INPUT_SIDE} pixels a side"
        if not all(math.isfinite(m) and 0 <= m <= 1 for m in self.mean):
            return f"mean {self.mean} must lie in [0, 1] (the images' scale)"
        if not all(math.isfinite(s) and 0 < s <= 1 for s in self.std):
            return f"std {self.std} must be positive (and at most 1, the images' scale)"
        if self.num_classes < 1:
            return "no class names"
        if self.num_classes > MAX_CLASSES:
            return f"{self.num_classes} class names, over the limit of {MAX_CLASSES}"
        if len(set(self.class_names)) != self.num_classes:
            return "the class names are not unique"
        if self.name not in list_models():
            return f"unknown model {_short(self.name)} (known models: {', '.join(list_models())})"
        return _kwargs_problem(self.kwargs, self.input_size)

    def check_weights(self, weights: Any, source: str, what: str = "") -> None:
        """Refuse ``weights`` (a state dict from ``source``; ``what``: "ema ", "model " or "") that this
        description's network does not take tensor for tensor, or that are not finite.

        The network is built on the meta device, so an absurd description costs no memory, and the real
        build that follows allocates exactly what the file holds.
        """
        if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in weights.items()):
            raise CheckpointError(f"{source}: its {what}weights are not a state dict of named tensors "
                                  f"(found {type(weights).__name__}); {_FIX}")
        expected = self._meta_shapes(source)
        problem = _mismatch(expected, {k: tuple(v.shape) for k, v in weights.items()}, self.num_classes)
        if problem:
            raise CheckpointError(f"{source}: the {what}weights do not fit model {self.name!r} as described "
                                  f"({problem}); {_FIX}")
        for key, t in weights.items():
            if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
                raise CheckpointError(f"{source}: its {what}weights hold non-finite values (NaN or inf) in "
                                      f"{key!r}; use another checkpoint of the run (best.pt or an earlier copy)")

    def _meta_shapes(self, source: str) -> dict[str, tuple[int, ...]]:
        try:
            with torch.device("meta"):
                net = self.build()
        # Whatever a constructor raises for arguments it cannot take (an unexpected keyword, a zero patch size,
        # heads that do not divide the width) comes from the file, not from a bug here.
        except Exception as e:
            raise CheckpointError(f"{source}: its model description cannot build {self.name!r} "
                                  f"({_clip(str(e) or type(e).__name__, 160)}); "
                                  f"{_FIX}") from None
        return {k: tuple(v.shape) for k, v in net.state_dict().items()}


_FIX = "the file was damaged or edited: use a checkpoint or export as fixmatch wrote it"


def _clip(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())  # one line, whatever the file holds
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(value: Any) -> str:
    return _clip(repr(value))


def _kwargs_problem(kwargs: dict[str, Any], input_size: tuple[int, ...]) -> str:
    for key, value in kwargs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not isinstance(key, str) or not key.isidentifier() or len(values) > _MAX_KWARG_LIST:
            return f"constructor argument {_short(key)}={_short(value)} is not a name with a short value"
        for v in values:
            bad_number = isinstance(v, (int, float)) and not isinstance(v, bool) and (
                not math.isfinite(v) or abs(v) > MAX_KWARG_INT)
            if bad_number or not isinstance(v, (bool, int, float, str, type(None))) or (
                    isinstance(v, str) and len(v) > 64):
                return (f"constructor argument {key}={_short(value)} is not a finite number up to {MAX_KWARG_INT}, "
                        f"a short text or a short list of them")
    size = kwargs.get("image_size")
    if size is not None and tuple(size if isinstance(size, (list, tuple)) else (size, size)) != tuple(input_size):
        return f"image_size {_short(size)} of the network differs from the input size {tuple(input_size)}"
    return ""


def _mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], num_classes: int) -> str:
    """The first difference between the shapes a network takes and those a file holds ("" when none)."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    implied, held = (sum(math.prod(s) for s in d.values()) for d in (expected, found))
    sizes = f", and the description implies {implied:,} values where the file holds {held:,}" if implied != held else ""
    if missing:
        return f"{len(missing)} tensor(s) missing, e.g. {missing[0]!r}{sizes}"
    if extra:
        return f"{len(extra)} unexpected tensor(s), e.g. {extra[0]!r}{sizes}"
    for key, shape in expected.items():
        have = found[key]
        if have != shape:
            if shape and have and shape[0] == num_classes and shape[1:] == have[1:]:  # the classifier
                return f"the description lists {num_classes} class names but {key!r} has {have[0]} outputs"
            return f"{key!r} is {have} in the file but {shape} in the described network{sizes}"
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

    name = name or config["dataset"]
    # A built-in data set's --labels-csv changes training labels only, which evaluation never reads: not needed.
    labels_csv = config.get("labels_csv") if str(name).startswith("folder:") else None
    return load_dataset(name, data_dir or config.get("data_dir"), download, image_size=config.get("image_size"),
                        on_bad_image=config.get("on_bad_image", "error"), labels_csv=labels_csv)


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


@dataclass(frozen=True)
class CheckpointModel:
    """A network restored from a checkpoint, with what the checkpoint says about it."""

    spec: ModelSpec
    backbone: nn.Module  # on the CPU, as built (training mode)
    source: Path  # the checkpoint file (a run directory stands for its last.pt)
    step: int  # the training step the checkpoint was written at
    config: dict[str, Any] | None  # the run's configuration


def load_model_checkpoint(path: str | Path, weights: str = "ema", data_dir: str | Path | None = None
                          ) -> CheckpointModel:
    """The network of a checkpoint file or run directory, its description and weights checked first.

    ``weights``: "ema" (the averaged weights; a run without an EMA holds only "model") or "raw". ``data_dir`` is
    only needed for checkpoints written before they described their model (their data set supplies it).
    """
    ckpt = find_checkpoint(path)
    state = load_checkpoint(ckpt)
    fields = CheckpointFields(state, ckpt)
    step = fields.integer("step")
    config = state.get("config")
    if not isinstance(config, (dict, type(None))):
        raise fields.error("config", f"is a {type(config).__name__}, not a mapping of config keys")
    spec = spec_from_checkpoint(state, ckpt, data_dir)
    key = "ema" if weights == "ema" and state.get("ema") is not None else "model"
    spec.check_weights(fields.get(key), str(ckpt), f"{key} ")  # before anything is allocated for them
    backbone = spec.build()
    fields.restore(key, backbone.load_state_dict)
    return CheckpointModel(spec, backbone, ckpt, step, config)
