"""MobileNetV3-Small and -Large (Howard et al., 2019), laid out as torchvision's ``mobilenet_v3_*``.

Same block table, squeeze-excitation widths (a quarter of the expanded width, rounded to a multiple
of 8), BN (eps 1e-3, momentum 0.01), Hardswish/ReLU placement, classifier (Linear, Hardswish,
Dropout 0.2, Linear) and initialisation as torchvision, and the same parameter names
(``features.0.0.weight``, ``features.4.block.2.fc1.weight``, ``classifier.3.weight``...), so its
ImageNet state dicts load. Parameters with 1000 classes: Small 2,542,856, Large 5,483,032.

Stem (``models/stem.py``): the first 3x3 convolution has stride 2 for images larger than 64 pixels
(torchvision's) and stride 1 for smaller ones; the network then reduces 32x32 input 16x instead of
32x (to 2x2). The kernel shapes do not change, so ImageNet weights load into either stem.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from fixmatch.models import register_model
from fixmatch.models.stem import ImageSize, choose_stem

BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # torchvision's MobileNetV3 BatchNorm settings


class BlockConfig(NamedTuple):
    kernel: int
    expanded: int
    out: int
    se: bool
    hardswish: bool  # else ReLU
    stride: int


# (kernel, expanded channels, output channels, squeeze-excitation, Hardswish, stride): the paper's Tables 1-2.
LARGE = [BlockConfig(*c) for c in [
    (3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1),
]]
SMALL = [BlockConfig(*c) for c in [
    (3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1),
]]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, never below 90% of ``value`` (the MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_act(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
                activation: type[nn.Module] | None = None) -> nn.Sequential:
    """Conv (no bias) - BN - activation, indexed 0, 1, 2 like torchvision's Conv2dNormActivation."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM),
    ]
    if activation is not None:
        layers.append(activation(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """x * hardsigmoid(fc2(relu(fc1(mean(x))))) with 1x1 convolutions fc1, fc2 (torchvision's names)."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(scale), inplace=True)), inplace=True)


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when the width does not change) - depthwise kxk - [SE] - 1x1 project (no activation)."""

    def __init__(self, in_channels: int, cfg: BlockConfig) -> None:
        super().__init__()
        act = nn.Hardswish if cfg.hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if cfg.expanded != in_channels:
            layers.append(conv_bn_act(in_channels, cfg.expanded, 1, activation=act))
        layers.append(conv_bn_act(cfg.expanded, cfg.expanded, cfg.kernel, cfg.stride, groups=cfg.expanded,
                                  activation=act))
        if cfg.se:
            layers.append(SqueezeExcitation(cfg.expanded, make_divisible(cfg.expanded // 4)))
        layers.append(conv_bn_act(cfg.expanded, cfg.out, 1))
        self.block = nn.Sequential(*layers)
        self.use_residual = cfg.stride == 1 and in_channels == cfg.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


class MobileNetV3(nn.Module):
    head_name = "classifier.3"

    def __init__(
        self,
        blocks: list[BlockConfig],
        last_channel: int,
        num_classes: int,
        in_channels: int = 3,
        image_size: ImageSize = 32,
        stem: str | None = None,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.stem_kind = choose_stem(image_size, stem)
        layers: list[nn.Module] = [conv_bn_act(in_channels, 16, 3, stride=2 if self.stem_kind == "imagenet" else 1,
                                               activation=nn.Hardswish)]
        channels = 16
        for cfg in blocks:
            layers.append(InvertedResidual(channels, cfg))
            channels = cfg.out
        layers.append(conv_bn_act(channels, 6 * channels, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * channels, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(dropout, inplace=True), nn.Linear(last_channel, num_classes))
        self.num_features = last_channel
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding after the first classifier layer and its Hardswish (N, 1024 Small / 1280 Large)."""
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[1](self.classifier[0](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier[3](self.classifier[2](self.forward_features(x)))


@register_model("mobilenetv3_small")
def mobilenetv3_small(num_classes: int, in_channels: int = 3, **kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Small; kwargs image_size, stem, dropout."""
    return MobileNetV3(SMALL, 1024, num_classes, in_channels=in_channels, **kwargs)


@register_model("mobilenetv3_large")
def mobilenetv3_large(num_classes: int, in_channels: int = 3, **kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Large; kwargs image_size, stem, dropout."""
    return MobileNetV3(LARGE, 1280, num_classes, in_channels=in_channels, **kwargs)
