"""`fixmatch export`: a trained model as TorchScript, torch.export (.pt2), ONNX or safetensors, written atomically.

TorchScript, .pt2 and ONNX files hold the whole ``inference.model.Classifier``: images (N, C, H, W), uint8 in
[0, 255] or float in [0, 1], of any height and width, are resized to the input size and standardised
inside the graph; the output is the logits (N, num_classes). A TorchScript file takes both input types;
a .pt2 or ONNX graph takes the one it was exported for (``input_dtype``). The model description (class
names, input size, normalisation: ``ModelSpec``) travels with every file: TorchScript and .pt2 in the
extra file ``fixmatch.json``, ONNX in the metadata property ``fixmatch``, safetensors in its header
metadata ``fixmatch``. A safetensors file holds the backbone's state dict only (no preprocessing): load it with
``fixmatch.load(FILE)``, which checks it against the checksum in its metadata ``tensor_digest``
(``checkpoint.tensor_digest``), or into ``create_model(name, num_classes, in_channels, **kwargs)``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from fixmatch.config import ConfigError
from fixmatch.core.atomic import atomic_path
from fixmatch.inference.model import FixMatchModel, load
from fixmatch.runs.checkpoint import DIGEST_KEY, tensor_digest

EXPORT_FORMATS = ("torchscript", "pt2", "onnx", "safetensors")
# A .pt2 or ONNX graph has one input type, fixed when it is exported.
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
ONNX_OPSET = 18  # the first opset whose Resize has the antialias attribute the preprocessing needs


def export_model(checkpoint: str | Path, fmt: str, out: str | Path, weights: str = "ema",
                 input_dtype: str = "uint8", data_dir: str | Path | None = None) -> Path:
    """Export the checkpoint's ``weights`` ("ema" or "raw") to ``out`` in ``fmt``; returns ``out``."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if input_dtype not in INPUT_DTYPES:
        raise ConfigError(f"unknown input dtype {input_dtype!r}; use one of {', '.join(INPUT_DTYPES)}")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / ('model.' + _SUFFIX[fmt])}")
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write {out}: folder {out.parent} does not exist; create it first")
    dtype = INPUT_DTYPES[input_dtype]
    writer = {"torchscript": _torchscript, "pt2": lambda m, p: _exported_program(m, p, dtype),
              "onnx": lambda m, p: _onnx(m, p, dtype), "safetensors": _safetensors}[fmt]
    _check_dependencies(fmt)
    model = load(checkpoint, weights=weights, device="cpu", data_dir=data_dir)
    with atomic_path(out, suffix=".tmp" + out.suffix) as tmp:  # out is either complete or untouched
        writer(model, tmp)  # type: ignore[operator]
    return out


_SUFFIX = {"torchscript": "pt", "pt2": "pt2", "onnx": "onnx", "safetensors": "safetensors"}


def _check_dependencies(fmt: str) -> None:
    needed = {"onnx": ("onnx", "onnxscript"), "safetensors": ("safetensors",)}.get(fmt, ())
    for module in needed:
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"{fmt} export needs the {module!r} package: pip install 'fixmatch[export]'") from None


def _example_input(model: FixMatchModel, dtype: torch.dtype) -> torch.Tensor:
    # Two images (a batch of one would let a tracer treat the batch size as a constant) at the input size.
    h, w = model.spec.input_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, model.spec.in_channels, h, w), dtype=torch.uint8, generator=gen)
    return x if dtype == torch.uint8 else x.float() / 255


def _torchscript(model: FixMatchModel, path: Path) -> None:
    classifier = model.module
    x = classifier.preprocess(_example_input(model, torch.uint8))
    # The backbone is traced (any registered network is a static graph), the preprocessing scripted (its
    # uint8/float branch must stay a branch), and the two composed in one scripted module.
    # TorchScript is deprecated in favour of torch.export, but it is still the format C++ (libtorch) and
    # mobile runtimes load; the warning is about the API, not the file.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        backbone = torch.jit.trace(classifier.backbone, x)
        scripted = torch.jit.script(type(classifier)(classifier.preprocess, backbone))
        torch.jit.save(scripted, str(path), _extra_files={"fixmatch.json": model.spec.to_json()})


def _dynamic_dims() -> tuple[dict[int, Any], ...]:
    """Batch size, height and width stay free in the graph; the channel count is the model's."""
    return ({0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")},)


def _exported_program(model: FixMatchModel, path: Path, dtype: torch.dtype) -> None:
    # torch.export's ExportedProgram, the successor of TorchScript: torch.export.load(FILE).module() runs it in
    # Python, and AOTInductor compiles it for C++. The uint8/float branch of the preprocessing is resolved when
    # exporting, so the graph takes the one input type it was exported for.
    with torch.no_grad():
        program = torch.export.export(model.module, (_example_input(model, dtype),), dynamic_shapes=_dynamic_dims())
    torch.export.save(program, str(path), extra_files={"fixmatch.json": model.spec.to_json()})


def _onnx(model: FixMatchModel, path: Path, dtype: torch.dtype) -> None:
    import onnx

    # The exporter narrates its passes on stdout and warns about optional packages (torchvision) it does
    # not need here; the command prints its own one-line result instead.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            program = torch.onnx.export(model.module, (_example_input(model, dtype),), dynamo=True, verbose=False,
                                        input_names=["images"], output_names=["logits"], dynamic_shapes=_dynamic_dims(),
                                        opset_version=ONNX_OPSET)
        finally:
            onnx_log.setLevel(level)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = "fixmatch", model.spec.to_json()
    onnx.save(proto, str(path))


def _safetensors(model: FixMatchModel, path: Path) -> None:
    from safetensors.torch import save_file

    # clone(): save_file refuses tensors that share memory, and a state dict may hold views.
    state = {k: v.detach().clone().contiguous() for k, v in model.module.backbone.state_dict().items()}
    # The checksum of the tensors lets fixmatch.load tell a damaged file from a good one.
    save_file(state, str(path), metadata={"format": "pt", "fixmatch": model.spec.to_json(),
                                          DIGEST_KEY: tensor_digest(state)})
