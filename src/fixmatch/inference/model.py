"""Apply a trained model: ``model = fixmatch.load(CHECKPOINT)``; ``model.predict(images)``.

The preprocessing of training (uint8 -> [0, 1] -> per-channel standardisation with the training
set's mean/std) runs as one module, ``core.preprocess.Preprocess``, together with a resize to the model's
input size; the Python API, ``fixmatch predict`` and the TorchScript/ONNX exports all run that same module.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from fixmatch.config import ConfigError
from fixmatch.core.preprocess import Preprocess, resolve_device, run_batches, to_unit
from fixmatch.data.folder import to_8bit
from fixmatch.runs.checkpoint import DIGEST_KEY, CheckpointError, verify_digest
from fixmatch.runs.model_spec import ModelSpec, load_model_checkpoint

# ITU-R 601-2 luma weights, the ones PIL's convert("L") uses, so arrays and PIL images agree.
_LUMA = (0.299, 0.587, 0.114)


class Classifier(nn.Module):
    """Preprocess + backbone: images in, logits out (what the exports contain)."""

    def __init__(self, preprocess: Preprocess, backbone: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(self.preprocess(x))


@dataclass(frozen=True)
class Predictions:
    """Class probabilities of N images, with the predicted class names."""

    class_names: list[str]
    probabilities: np.ndarray  # float32 (N, num_classes), rows sum to 1

    @property
    def indices(self) -> list[int]:
        return [int(i) for i in self.probabilities.argmax(1)]

    @property
    def labels(self) -> list[str]:
        """The predicted class name of each image."""
        return [self.class_names[i] for i in self.indices]

    @property
    def confidences(self) -> list[float]:
        """The probability of each predicted class."""
        return [float(p) for p in self.probabilities.max(1)]

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """The k most probable (class name, probability) pairs of each image, best first."""
        k = min(k, len(self.class_names))
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[j], float(row[j])) for j in idx] for row, idx in zip(self.probabilities, order)]

    def __len__(self) -> int:
        return int(self.probabilities.shape[0])


class FixMatchModel:
    """A trained classifier with its preprocessing, in eval mode on one device."""

    def __init__(self, spec: ModelSpec, backbone: nn.Module, device: torch.device, source: str = "",
                 step: int | None = None, config: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.source = source  # the file the weights came from
        self.step = step  # the training step of the checkpoint
        self.config = dict(config or {})  # the run's configuration
        self.device = device
        self.module = Classifier(Preprocess(spec.mean, spec.std, spec.input_size), backbone).to(device).eval()

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.class_names)

    @torch.no_grad()
    def logits(self, images: Any, batch_size: int = 256) -> Tensor:
        """Logits (N, num_classes) on the CPU for any input ``predict`` accepts."""
        out = run_batches(self.module, self.to_batch(images), batch_size, self.device)
        return torch.cat(out) if out else torch.zeros(0, self.spec.num_classes)

    def predict(self, images: Any, batch_size: int = 256) -> Predictions:
        """Class probabilities of a PIL image, a list of them, a NumPy array or a tensor.

        PIL images are converted as the images of folder data sets are: upright, L or RGB, shorter side
        resized and centre cropped to the input size. Arrays follow the NumPy/PIL layout: (H, W),
        (H, W, C) or (N, H, W, C); tensors PyTorch's: (H, W), (C, H, W) or (N, C, H, W); both uint8 in
        [0, 255] or float in [0, 1], converted to the model's channels (grey <-> RGB with PIL's luma
        weights) and resized to the input size (bilinear, antialiased; no crop).
        """
        probs = torch.softmax(self.logits(images, batch_size), dim=1)
        return Predictions(self.class_names, probs.numpy())

    def to_batch(self, images: Any) -> Tensor:
        """One (N, C, H, W) tensor at the input size: uint8 if all images are, else float in [0, 1]."""
        items = _as_image_list(images, self.spec.in_channels, self.spec.input_size)
        if not items:
            raise ValueError("predict() got no images")
        items = [_match_channels(x, self.spec.in_channels) for x in items]
        size = tuple(self.spec.input_size)
        if any(x.shape[-2:] != size for x in items) or len({x.dtype for x in items}) > 1:
            items = [self.module.preprocess.resize(to_unit(x)) for x in items]
        return torch.cat(items)


def _as_image_list(images: Any, channels: int, size: tuple[int, int]) -> list[Tensor]:
    """Every accepted input as a list of (n, C, H, W) tensors (uint8 or float)."""
    if isinstance(images, (list, tuple)):
        return [t for item in images for t in _as_image_list(item, channels, size)]
    if isinstance(images, Tensor):
        x = images.detach().cpu()
        if x.ndim == 2:
            x = x[None]
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"a tensor of images must be (H, W), (C, H, W) or (N, C, H, W), not {tuple(images.shape)}")
        return [_checked(x, "tensor")]
    if isinstance(images, np.ndarray):
        a = images
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4:
            raise ValueError(f"an array of images must be (H, W), (H, W, C) or (N, H, W, C), not {images.shape}")
        a = np.ascontiguousarray(a)
        a = a if a.flags.writeable else a.copy()  # torch.from_numpy wants writable memory (PIL's arrays are not)
        return [_checked(torch.from_numpy(a).permute(0, 3, 1, 2), "array")]
    if isinstance(images, Image.Image):
        return [pil_to_tensor(images, channels, size)]
    raise ValueError(f"cannot predict on a {type(images).__name__}; pass PIL images, NumPy arrays or tensors")


def _checked(x: Tensor, kind: str) -> Tensor:
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"image {kind}s must be uint8 in [0, 255] or float in [0, 1], not {x.dtype}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"float image {kind}s must lie in [0, 1] (got [{x.min():.3g}, {x.max():.3g}]); "
                         f"divide uint8 values by 255")
    return x


def pil_to_tensor(img: Any, channels: int, size: tuple[int, int] | None = None) -> Tensor:
    """A PIL image as uint8 (1, C, H, W), converted as folder data sets convert their images.

    Upright (EXIF orientation), 8-bit L for 1-channel models or RGB for 3 (16-bit scaled, transparency over
    white: data/folder.py's conversion), and, when ``size`` (height, width) is given, the shorter side
    resized and the centre cropped to it.
    """
    from PIL import ImageOps

    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels}-channel images; only 1 (L) and 3 (RGB) map to image modes")
    img = to_8bit(ImageOps.exif_transpose(img), grey=channels == 1)
    if size is not None and (img.height, img.width) != tuple(size):
        img = ImageOps.fit(img, (size[1], size[0]), Image.Resampling.BICUBIC)
    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(a.reshape(a.shape[0], a.shape[1], -1).copy()).permute(2, 0, 1)[None]


def _match_channels(x: Tensor, channels: int) -> Tensor:
    c = x.shape[1]
    if c == channels:
        return x
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA).view(1, 3, 1, 1)
        gray = (x.float() * w).sum(1, keepdim=True)
        return gray.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else gray
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    raise ValueError(f"images have {c} channels but the model takes {channels}; pass grayscale or RGB images")


def load(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
         data_dir: str | Path | None = None) -> FixMatchModel:
    """A trained model from a checkpoint file, a run directory (its last checkpoint) or a safetensors
    file written by ``fixmatch export`` (which holds one set of weights: ``weights`` does not apply). The other
    exports (ONNX, TorchScript, .pt2) are refused in one line that says how to run them.

    ``weights``: "ema" (the averaged weights the run was evaluated with) or "raw". ``data_dir`` is only
    needed for checkpoints written before they described their model (their data set supplies it).
    """
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be 'ema' or 'raw', not {weights!r}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    kind = export_format(path)
    if Path(path).suffix == ".safetensors" or kind == "safetensors":
        return _load_safetensors(Path(path), dev)
    if kind:
        what, how = _EXPORT_USE[kind]
        raise CheckpointError(f"{path} is {what}, which fixmatch does not load: run it with {how}, or give "
                              f"fixmatch the run directory or checkpoint it was exported from")
    loaded = load_model_checkpoint(path, weights, data_dir)
    return FixMatchModel(loaded.spec, loaded.backbone, dev, str(loaded.source), loaded.step, loaded.config)


# What each file of `fixmatch export` is, and how to run it, for a file given where a checkpoint belongs.
_EXPORT_USE = {
    "onnx": ("an ONNX export", "onnxruntime (onnxruntime.InferenceSession(FILE), as in the README's Use your model)"),
    "torchscript": ("a TorchScript export", "torch.jit.load(FILE) in Python or libtorch in C++"),
    "pt2": ("a torch.export (.pt2) export", "torch.export.load(FILE).module()"),
}
# Protocol-buffer tags that follow ONNX's leading ir_version field (1, a varint): producer_name, producer_version,
# domain, model_version, doc_string, graph, opset_import.
_ONNX_NEXT_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42})


def export_format(path: str | Path) -> str:
    """Which file of ``fixmatch export`` ``path`` is: "onnx", "torchscript", "pt2" or "safetensors", told by its
    contents (ONNX also by the name .onnx); "" for anything else, checkpoints included.

    Only the first bytes are read, and for a zip archive (checkpoints, TorchScript and .pt2 files all are)
    its list of names; nothing is unpickled.
    """
    import zipfile

    path = Path(path)
    if not path.is_file():
        return ""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if head[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(path) as z:
                # Entries sit under one top folder, named after the file that was written.
                names = {n.split("/", 1)[1] for n in z.namelist() if "/" in n}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return ""  # unreadable or cut short: loading it reports why
    if head[:4] == b"PK\x03\x04":
        if "archive_format" in names or any(n.startswith("models/") for n in names):
            return "pt2"
        if "constants.pkl" in names or any(n.startswith("code/") for n in names):
            return "torchscript"
        return ""
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    onnx_like = len(head) >= 3 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] in _ONNX_NEXT_TAGS
    return "onnx" if path.suffix.lower() == ".onnx" or onnx_like else ""


def _load_safetensors(path: Path, device: torch.device) -> FixMatchModel:
    import json

    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open
    except ImportError:
        raise ConfigError("reading .safetensors files needs the safetensors package: "
                          "pip install 'fixmatch[export]'") from None
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if "fixmatch" not in meta:
        raise CheckpointError(f"{path} has no fixmatch model description; export it with fixmatch export")
    try:
        description = json.loads(meta["fixmatch"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its model description is not valid JSON ({e})") from None
    spec = ModelSpec.from_dict(description, str(path))
    verify_digest(state, meta.get(DIGEST_KEY), path, "export it again from its checkpoint")
    spec.check_weights(state, str(path))
    backbone = spec.build()
    backbone.load_state_dict(state)  # check_weights has matched every name and shape
    return FixMatchModel(spec, backbone, device, str(path))
