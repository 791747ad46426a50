"""DenseNet-121 (Huang et al., 2017), laid out as torchvision's ``densenet121``.

Growth rate 32, blocks of (6, 12, 24, 16) layers, bottleneck width 4 x 32, transitions halve the
channels; 64 initial features. Module and parameter names equal torchvision's (``features.conv0``,
``features.denseblock1.denselayer1.norm1``, ``features.transition1.conv``, ``features.norm5``,
``classifier``), so its ImageNet state dict loads into the ImageNet-stem model. 7,978,856 parameters
with 1000 classes and the ImageNet stem, as torchvision. Initialisation as torchvision:
Kaiming-normal convolutions, BN weight 1 and bias 0, classifier bias 0.

Stem (``models/stem.py``): images larger than 64 pixels get torchvision's 7x7 stride-2 ``conv0`` and
3x3 stride-2 ``pool0``; smaller ones a 3x3 stride-1 ``conv0`` and no pooling (``pool0`` is an
``nn.Identity``), so a 32x32 image reaches the last dense block at 4x4.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from fixmatch.models import register_model
from fixmatch.models.stem import ImageSize, choose_stem, stem_layers


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (to bn_size * growth) - BN-ReLU-3x3 conv (to growth), fed the concatenated inputs."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, bn_momentum: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels, momentum=bn_momentum)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate, momentum=bn_momentum)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers named ``denselayer1``...; each sees every earlier output."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int, bn_momentum: float
                 ) -> None:
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def _transition(in_channels: int, out_channels: int, bn_momentum: float) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("norm", nn.BatchNorm2d(in_channels, momentum=bn_momentum)), ("relu", nn.ReLU(inplace=True)),
        ("conv", nn.Conv2d(in_channels, out_channels, 1, bias=False)), ("pool", nn.AvgPool2d(2, stride=2)),
    ]))


class DenseNet(nn.Module):
    head_name = "classifier"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        image_size: ImageSize = 32,
        stem: str | None = None,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.stem_kind = choose_stem(image_size, stem)
        conv0, pool0 = stem_layers(self.stem_kind, in_channels, num_init_features)
        self.features = nn.Sequential(OrderedDict([
            ("conv0", conv0), ("norm0", nn.BatchNorm2d(num_init_features, momentum=bn_momentum)),
            ("relu0", nn.ReLU(inplace=True)), ("pool0", pool0),
        ]))
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}",
                                     DenseBlock(num_layers, channels, growth_rate, bn_size, bn_momentum))
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _transition(channels, channels // 2, bn_momentum))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels, momentum=bn_momentum))
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding of shape (N, 1024) for DenseNet-121."""
        return torch.flatten(self.pool(self.relu(self.features(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@register_model("densenet121")
def densenet121(num_classes: int, in_channels: int = 3, **kwargs: Any) -> DenseNet:
    """DenseNet-121; kwargs image_size, stem, bn_momentum."""
    return DenseNet(num_classes, in_channels=in_channels, **kwargs)
