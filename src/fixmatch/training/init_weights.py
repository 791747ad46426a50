"""``train --init-weights PATH``: where the starting weights come from.

A fixmatch run directory (``fixmatch pretrain`` or ``train``) stands for its last checkpoint. A fixmatch
checkpoint describes its network (runs/model_spec.py): it is loaded through ``load_model_checkpoint``, so its
checksum, description and weights are checked, and its network must be the one this run builds (registry name,
constructor arguments, input channels and size), else one line names both. Any other file is a plain state dict
(models/pretrained.py). In every case ``load_init_weights`` copies every tensor but the classifier head.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fixmatch.core.safe_load import load_weights_only
from fixmatch.models.pretrained import InitWeightsError, LoadReport, copy_init_weights, load_init_weights
from fixmatch.runs.checkpoint import find_checkpoint
from fixmatch.runs.model_spec import ModelSpec, load_model_checkpoint
from fixmatch.runs.rundir import RunDir


def init_from(model: nn.Module, path: str | Path, model_fields: dict[str, Any], dataset: str) -> LoadReport:
    """Load ``path``'s weights into ``model`` (built from ``model_fields``, model_spec.checkpoint_fields, for the
    data set ``dataset``) in place, all but the classifier head; one-line InitWeightsError or CheckpointError
    where they do not fit."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        if not run.last_checkpoint.is_file():
            raise InitWeightsError(f"--init-weights: {path} is a folder but not a fixmatch run directory with a "
                                   f"checkpoint (no {run.last_checkpoint}); give the --out of a finished or stopped "
                                   f"fixmatch pretrain or train run, a checkpoint, or a weights file")
        path = find_checkpoint(path)
    elif path.suffix != ".safetensors" and path.is_file() and _is_fixmatch_checkpoint(path):
        pass
    else:
        return load_init_weights(model, path)  # a plain state dict (or a missing file, reported there)
    source = load_model_checkpoint(path)  # checksum, description and weights checked before they are used
    _check_same_network(source.spec, ModelSpec.from_dict(model_fields, "this run"), path, dataset)
    return copy_init_weights(model, source.backbone.state_dict(), path)  # the copy that was checked


def _is_fixmatch_checkpoint(path: Path) -> bool:
    try:
        state = load_weights_only(path)
    except ValueError:
        return False  # not a weights-only torch file: load_init_weights says so in its words
    return isinstance(state, dict) and state.get("format") == "fixmatch-checkpoint"


def _sized_apart(spec: ModelSpec) -> dict:
    """The constructor arguments other than the image size."""
    return {k: v for k, v in spec.kwargs.items() if k != "image_size"}


def _describe(spec: ModelSpec) -> str:
    extra = _sized_apart(spec)
    args = f" {extra}" if extra else ""
    return f"{spec.name}{args} for {spec.in_channels}x{spec.input_size[0]}x{spec.input_size[1]} images"


def _check_same_network(source: ModelSpec, target: ModelSpec, path: Path, dataset: str) -> None:
    """The classifier head aside, the file's network must be the one this run builds; the fix named is the one
    that can make them agree."""
    if (source.name, _sized_apart(source)) != (target.name, _sized_apart(target)):
        fix = f"train with --model {source.name} (the checkpoint's), or pretrain again with --model {target.name}"
    elif source.in_channels != target.in_channels:
        fix = (f"its network takes {source.in_channels}-channel images and these have {target.in_channels}: "
               f"pretrain again on this data set")
    elif tuple(source.input_size) == tuple(target.input_size):
        return
    elif dataset.startswith("folder:"):  # decoded at another --image-size (a preset's 32, or the median)
        fix = (f"train with --image-size {source.input_size[0]} (the checkpoint's), or pretrain again with "
               f"--image-size {target.input_size[0]}")
    else:  # a built-in data set has one image size
        fix = "pretrain again on this data set"
    raise InitWeightsError(f"--init-weights: {path} holds {_describe(source)} but this run builds "
                           f"{_describe(target)}; {fix}")
