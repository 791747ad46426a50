"""Wide ResNet exactly as in the official FixMatch code.

Reference: google-research/fixmatch, ``libml/models.py``, class ``ResNet`` (called with
``scales=3, filters=32, repeat=4`` for WRN-28-2), and its faithful PyTorch ports.

Layout (WRN-28-k): 3x3 conv stem to 16 channels, then 3 groups of ``(depth - 4) / 6``
pre-activation basic blocks of widths 16k, 32k, 64k with strides 1, 2, 2, then
BN + LeakyReLU + global average pool + linear. Differences from the original WRN paper
that the official code makes and we keep: LeakyReLU(0.1) instead of ReLU, BN momentum
0.001 (TF decay 0.999) with epsilon 1e-3 (TF default), and dropout (if any) only before
the classifier. Input normalisation ((x - mean) / std, inside the official graph) is left
to the data pipeline.

Two deliberate deviations, shared with the PyTorch ports (and the 1,467,610 parameter
count quoted for WRN-28-2): convs have no bias (the TF ``ResNet`` keeps tf.layers' default
zero-initialised bias: 2,032 more parameters for WRN-28-2, redundant since every conv
output passes through a BN, which cancels per-channel shifts, before any nonlinearity),
and stride-2 convs pad symmetrically (padding=1) where TF 'same' pads only bottom/right.

WRN-37-2, FixMatch's STL-10 model (``wrn37_2``), is the official ``ResNet`` classifier with one more scale:
``scales=4, filters=32, repeat=4``, i.e. four groups of 4 blocks of widths 32, 64, 128, 256 with
strides 1, 2, 2, 2 (96x96 input -> 12x12 before the pool). The official code's default for 96x96
images would be ``scales = ceil(log2(96)) - 2 = 5``; the authors confirmed that the STL-10 runs
used ``--scales=4``, a model of about 6M parameters (google-research/fixmatch issue #34; the
23.8M quoted in ReMixMatch was a mistake). "37" counts the stem, the 32 convolutions of the
blocks and the 4 projection shortcuts, the count that gives 28 for WRN-28-2 (1 + 24 + 3).
Parameters with 10 classes: 5,929,434 without conv biases (ours), 5,933,770 with the TF code's
conv biases (+4,336). The stem is the same 3x3 stride-1 convolution at every input size, as in the
official code, so ``image_size`` is accepted and ignored.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fixmatch.models import register_model

# tf.layers.batch_normalization's default epsilon, which the official code keeps.
BN_EPS = 1e-3


def init_official_weights(model: nn.Module) -> None:
    """The official code's initialisation, applied to every convolution, BatchNorm and linear layer."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # Official: normal(stddev = rsqrt(0.5 * k * k * filters)) = sqrt(2 / fan_out),
            # i.e. Kaiming-normal fan_out with gain sqrt(2) (leaky_relu with a=0).
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            # Official: tf.glorot_normal_initializer (a truncated normal in TF1); the
            # PyTorch ports use the untruncated Xavier-normal, as we do. Bias zero.
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Pre-activation residual block (official ``residual()``).

    The residual branch always sees BN+LeakyReLU(x). The shortcut sees the raw ``x``
    unless ``activate_before_residual`` (first block of the network), where the
    activated tensor is shared with the shortcut. A 1x1 conv projects the shortcut when
    the shape changes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        activate_before_residual: bool,
        bn_momentum: float,
        leaky_slope: float,
    ) -> None:
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=bn_momentum, eps=BN_EPS)
        self.act1 = nn.LeakyReLU(leaky_slope, inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, momentum=bn_momentum, eps=BN_EPS)
        self.act2 = nn.LeakyReLU(leaky_slope, inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        if self.activate_before_residual:
            x = out
        out = self.conv2(self.act2(self.bn2(self.conv1(out))))
        return (x if self.shortcut is None else self.shortcut(x)) + out


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` with ``num_groups`` groups (the official ``scales``).

    Group g has width 16 * widen_factor * 2**g; depth = 2 * num_groups * n + num_groups + 1 for n
    blocks per group (6n + 4 with 3 groups). WRN-28-2 with 10 classes has 1,467,610 parameters.
    """

    head_name = "fc"

    def __init__(
        self,
        num_classes: int,
        depth: int = 28,
        widen_factor: int = 2,
        in_channels: int = 3,
        bn_momentum: float = 0.001,
        leaky_slope: float = 0.1,
        dropout: float = 0.0,
        num_groups: int = 3,
    ) -> None:
        super().__init__()
        g = num_groups
        if g < 1 or (depth - g - 1) % (2 * g) != 0 or depth < 3 * g + 1:
            raise ValueError(f"WideResNet depth with {g} groups must be {2 * g}n + {g + 1} with n >= 1, got {depth}")
        repeat = (depth - g - 1) // (2 * g)
        widths = [16 * widen_factor * 2**i for i in range(g)]

        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups: list[nn.Module] = []
        channels = 16
        for scale, width in enumerate(widths):
            blocks = []
            for i in range(repeat):
                blocks.append(
                    BasicBlock(
                        channels,
                        width,
                        stride=2 if scale > 0 and i == 0 else 1,
                        activate_before_residual=scale == 0 and i == 0,
                        bn_momentum=bn_momentum,
                        leaky_slope=leaky_slope,
                    )
                )
                channels = width
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(channels, momentum=bn_momentum, eps=BN_EPS)
        self.act = nn.LeakyReLU(leaky_slope, inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        self._init_weights()

    def _init_weights(self) -> None:
        init_official_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding of shape (N, 16 * widen_factor * 2**(num_groups - 1))."""
        x = self.act(self.bn(self.groups(self.stem(x))))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


# image_size is accepted for the registry's common signature; these networks do not depend on it.
@register_model("wrn28_2")
def wrn28_2(num_classes: int, in_channels: int = 3, image_size: Any = None, **kwargs: Any) -> WideResNet:
    """WRN-28-2, FixMatch's CIFAR-10 / SVHN model (1.47M parameters)."""
    return WideResNet(num_classes, depth=28, widen_factor=2, in_channels=in_channels, **kwargs)


@register_model("wrn28_8")
def wrn28_8(num_classes: int, in_channels: int = 3, image_size: Any = None, **kwargs: Any) -> WideResNet:
    """WRN-28-8, FixMatch's CIFAR-100 model (23.4M parameters)."""
    return WideResNet(num_classes, depth=28, widen_factor=8, in_channels=in_channels, **kwargs)


@register_model("wrn37_2")
def wrn37_2(num_classes: int, in_channels: int = 3, image_size: Any = None, **kwargs: Any) -> WideResNet:
    """WRN-37-2, FixMatch's STL-10 model: the official code with --scales=4 (5.93M parameters)."""
    return WideResNet(num_classes, depth=37, widen_factor=2, in_channels=in_channels, num_groups=4, **kwargs)
