"""Reading torch files of unknown origin: ``torch.load(weights_only=True)``, with its refusals in one line.

Checkpoints (runs/checkpoint.py) and ``--init-weights`` files (models/pretrained.py) are read through this one
function, so both refuse the same files with the same words.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_weights_only"]


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``; a file it refuses raises ValueError with the reason in one line.

    torch's own message for a refused file is several lines long and suggests ``weights_only=False``, which is
    exactly what must not be done with a file of unknown origin; the reason is rewritten without that advice.
    """
    try:
        with warnings.catch_warnings():
            # A plain pickle of protocol > 2 makes torch warn before it fails; the error below says it all.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise ValueError(_refusal_reason(e)) from None


def _refusal_reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    imported = re.search(r"GLOBAL ([\w.]+)", text)  # torch words this two ways, depending on the module
    if imported:
        return (f"it asks to import {imported.group(1)}, which a file of tensors and plain containers never "
                f"does (loading it could run code), so it was not loaded")
    if isinstance(e, EOFError):
        return "the file is empty or cut short"
    if isinstance(e, PermissionError):
        return "no permission to read it"
    if "zip archive" in text or isinstance(e, OSError):  # OSError: e.g. a seek past the end of a cut-short file
        return "the file is cut short or corrupt (its zip archive cannot be read)"
    # Anything else is the unpickler choking on bytes that are no pickle of tensors: keep torch's detail only
    # when it is short and not its generic advice.
    detail = re.search(r"Unsupported operand \d+", text)
    detail = detail.group(0) if detail else ("" if "Weights only load failed" in text else text[:80])
    return f"not a torch file of tensors and plain containers, or a corrupt one{f' ({detail})' if detail else ''}"
