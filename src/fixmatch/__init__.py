"""FixMatch semi-supervised image classification (Sohn et al., 2020).

Public API::

    import fixmatch
    config = fixmatch.resolve_config(preset="fashion-mnist")
    summary = fixmatch.train(config, out="runs/fmnist-40")
    metrics = fixmatch.evaluate("runs/fmnist-40")
    model = fixmatch.load("runs/fmnist-40")  # then model.predict(images)
"""
from __future__ import annotations

from fixmatch.config import Config, ConfigError, preset_names, resolve_config

# The functions shadow their modules' names on the package, so that fixmatch.train(config) is the call.
from fixmatch.inference.evaluate import evaluate
from fixmatch.inference.model import load
from fixmatch.training.loop import train

__all__ = ["Config", "ConfigError", "evaluate", "load", "preset_names", "resolve_config", "train"]
__version__ = "0.1.0"
