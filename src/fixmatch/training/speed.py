"""Speed options that change how a step runs, not what the algorithm is: mixed precision and torch.compile.

- ``amp: bf16`` autocasts the forward pass and loss to bfloat16 (CUDA, and CPUs with bf16 matrix units;
  on others it is slower than fp32: benchmarks/bench_step.py measures it). No loss scaling is needed.
- ``amp: fp16`` autocasts to float16 and scales the loss with a GradScaler (CUDA only). A step whose scaled
  gradients overflow is skipped by the scaler and the scale lowered: that is loss scaling working, not a
  non-finite step.
- ``compile``: torch.compile of the training module (the model, or its DistributedDataParallel wrapper).
"""
from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from fixmatch.config import ConfigError

CPU_COMPILERS = ("g++", "c++", "clang++")  # what torch.compile's C++ code generation looks for on the CPU


def check_amp(amp: str, device: torch.device) -> None:
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA (float16 with loss scaling); on the CPU use --amp bf16 or none")


def make_grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16, None otherwise (bf16 and fp32 have fp32's exponent range)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def find_cpu_compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return shutil.which(cxx)
    for name in CPU_COMPILERS:
        if path := shutil.which(name):
            return path
    return None


def check_compile(compile: bool, device: torch.device) -> None:
    """torch.compile generates C++ on the CPU: refuse in one line, before training, if no compiler is there."""
    if compile and device.type == "cpu" and find_cpu_compiler() is None:
        raise ConfigError("--compile on the CPU needs a C++ compiler (g++, c++ or clang++, or $CXX) and none was "
                          "found on PATH; install one or leave --compile off")


def compile_module(module: nn.Module, device: torch.device) -> nn.Module:
    check_compile(True, device)
    return torch.compile(module)
