"""Speed options that change how a step runs, not what the algorithm is: mixed precision and torch.compile.

- ``amp: bf16`` autocasts the forward pass and loss to bfloat16 (CUDA, and CPUs with bf16 matrix units;
  on others it is slower than fp32: benchmarks/bench_step.py measures it). No loss scaling is needed.
- ``amp: fp16`` autocasts to float16 and scales the loss with a GradScaler (CUDA only). A step whose scaled
  gradients overflow is skipped by the scaler and the scale lowered: that is loss scaling working, not a
  non-finite step.
- ``compile``: torch.compile of the training module (the model, or its DistributedDataParallel wrapper).

What a device cannot run (fp16 or compile without a C++ compiler on the CPU) is refused by
config.check_runtime, before training.
"""
from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from fixmatch.config import check_compile

CPU_COMPILERS = ("g++", "c++", "clang++")  # what torch.compile's C++ code generation looks for on the CPU


def make_grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler, enabled for fp16 only (bf16 and fp32 have fp32's exponent range). Disabled, its scale,
    step and update are plain passes, so the step has no branch for it."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def find_cpu_compiler() -> str | None:
    """The C++ compiler torch.compile would use on the CPU ($CXX, else the first of CPU_COMPILERS on PATH)."""
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return shutil.which(cxx)
    for name in CPU_COMPILERS:
        if path := shutil.which(name):
            return path
    return None


def compile_module(module: nn.Module, device: torch.device) -> nn.Module:
    check_compile(True, device.type, find_cpu_compiler())
    return torch.compile(module)
