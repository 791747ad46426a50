"""``--init-weights FILE``: start a run from a local state dict (e.g. a torchvision ImageNet checkpoint).

Accepted files: ``.safetensors`` (needs the optional ``safetensors`` package:
``pip install 'fixmatch[safetensors]'``), or a torch file read with ``torch.load(weights_only=True)``
holding a state dict, a dict with a ``state_dict`` or ``model`` entry, or a fixmatch checkpoint
(its EMA weights). A ``module.`` prefix (DistributedDataParallel) is removed.

The classifier head (the model's ``head_name``, e.g. ``fc`` or ``heads.head``) is never loaded: it
keeps the fresh initialisation for the data set's classes. Every other tensor must have the model's
shape (a ViT's position embedding is resized to its grid first); a mismatch is an error naming the
tensor. Keys the model has but the file lacks ("missing") keep their initialisation, keys only the
file has ("unexpected") are ignored; both are reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fixmatch.core.safe_load import load_weights_only
from fixmatch.models import ModelError


class InitWeightsError(ModelError):
    """The --init-weights file cannot be read or does not fit the model (message: one line, with the fix)."""


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: keep their init
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model: ignored
    head_skipped: list[str] = field(default_factory=list)  # the file's classifier head: re-initialised

    def summary(self, max_names: int = 8) -> str:
        def names(keys: list[str]) -> str:
            shown = ", ".join(keys[:max_names])
            return shown + (f", ... ({len(keys)} in all)" if len(keys) > max_names else "")

        parts = [f"init weights from {self.path}: {len(self.loaded)} tensors loaded"]
        if self.head_skipped:
            parts.append(f"classifier head re-initialised (skipped {names(self.head_skipped)})")
        parts.append(f"missing: {names(self.missing) if self.missing else 'none'}")
        parts.append(f"unexpected: {names(self.unexpected) if self.unexpected else 'none'}")
        return "; ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or weights-only torch file, as a flat name -> tensor dict on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise InitWeightsError(f"--init-weights: {path} not found; give the path of a .safetensors or torch file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InitWeightsError(f"--init-weights: reading {path.name} needs the safetensors package; "
                                   f"install it with: pip install 'fixmatch[safetensors]'") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # the library raises its own error types for a corrupt header
            raise InitWeightsError(f"--init-weights: {path} is not a readable safetensors file ({e})") from None
    try:
        obj = load_weights_only(path)
    except ValueError as e:
        raise InitWeightsError(f"--init-weights: cannot read {path}: {e}; save the weights as a state dict "
                               f"(torch.save(model.state_dict(), path)) or as .safetensors") from None
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj.get("format") == "fixmatch-checkpoint":
        obj = obj.get("ema") or obj.get("model")
    elif isinstance(obj, dict) and not _is_state_dict(obj):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not _is_state_dict(obj):
        raise InitWeightsError(f"--init-weights: {path} holds no state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _is_state_dict(obj: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_init_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load the file's tensors into ``model`` in place, except its classifier head; return what happened."""
    return copy_init_weights(model, read_state_dict(path), path)


def copy_init_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> LoadReport:
    """Copy ``state`` (read from ``path``, named in messages) into ``model`` in place, except its classifier head."""
    adapt = getattr(model, "adapt_state_dict", None)
    if adapt is not None:
        state = adapt(state)
    head = getattr(model, "head_name", "fc") + "."
    own = model.state_dict()
    report = LoadReport(str(path))
    to_load = {}
    for key, tensor in state.items():
        if key.startswith(head):
            report.head_skipped.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif tensor.shape != own[key].shape:
            raise InitWeightsError(
                f"--init-weights: {key} has shape {tuple(tensor.shape)} in {Path(path).name} but "
                f"{tuple(own[key].shape)} in {type(model).__name__}; the file comes from another architecture "
                f"or stem (a 7x7 ImageNet stem does not fit the 3x3 stem built for small images)")
        else:
            to_load[key] = tensor
    if not to_load:
        raise InitWeightsError(f"--init-weights: none of the {len(state)} tensors in {Path(path).name} has a name "
                               f"of {type(model).__name__} (e.g. {next(iter(state))!r}); "
                               "is it a checkpoint of this model?")
    report.loaded = sorted(to_load)
    report.missing = [k for k in own if k not in to_load and not k.startswith(head)]
    model.load_state_dict(to_load, strict=False)
    return report
