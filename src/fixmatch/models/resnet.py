"""ResNet-18/34/50/101/152 (He et al., 2016), laid out as torchvision's ``resnet*`` (v1.5).

Module and parameter names equal torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ``fc``...), so a torchvision ImageNet state dict loads into a model with
the ImageNet stem (``--init-weights``). Bottleneck blocks put the stride on the 3x3 convolution
(torchvision's "v1.5"). Initialisation as torchvision: Kaiming-normal (fan_out) convolutions, BN
weight 1 and bias 0, PyTorch's default for the classifier.

The stem depends on the input size (``models/stem.py``): the ImageNet stem (7x7 stride-2 conv,
3x3 stride-2 max-pool) for images larger than 64 pixels, the CIFAR stem (3x3 stride-1 conv, no
max-pool; ``maxpool`` is then an ``nn.Identity`` so the names stay the same) for smaller ones. The
CIFAR stem's ``conv1.weight`` is 3x3, so an ImageNet checkpoint's 7x7 kernel does not fit it.

Parameters with 1000 classes and the ImageNet stem, as torchvision: ResNet-18 11,689,512,
ResNet-34 21,797,672, ResNet-50 25,557,032, ResNet-101 44,549,160, ResNet-152 60,192,808.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fixmatch.models import register_model
from fixmatch.models.stem import ImageSize, choose_stem, stem_layers


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.downsample = _downsample(in_channels, width, stride, bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, bn_momentum: float) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride, bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _downsample(in_channels: int, out_channels: int, stride: int, bn_momentum: float) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels, momentum=bn_momentum))


class ResNet(nn.Module):
    """ResNet with ``layers`` blocks per stage (widths 64, 128, 256, 512 times the block's expansion)."""

    head_name = "fc"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
        image_size: ImageSize = 32,
        stem: str | None = None,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.stem_kind = choose_stem(image_size, stem)
        self.conv1, self.maxpool = stem_layers(self.stem_kind, in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        channels = 64
        for i, (width, num_blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(num_blocks):
                blocks.append(block(channels, width, stride=2 if i > 0 and j == 0 else 1, bn_momentum=bn_momentum))
                channels = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding of shape (N, 512 * expansion)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _factory(name: str, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int]) -> None:
    def build(num_classes: int, in_channels: int = 3, **kwargs: Any) -> ResNet:
        return ResNet(block, layers, num_classes, in_channels=in_channels, **kwargs)

    build.__name__ = name
    build.__doc__ = f"{name}: ResNet with {layers} {block.__name__}s; kwargs image_size, stem, bn_momentum."
    register_model(name)(build)


_factory("resnet18", BasicBlock, (2, 2, 2, 2))
_factory("resnet34", BasicBlock, (3, 4, 6, 3))
_factory("resnet50", Bottleneck, (3, 4, 6, 3))
_factory("resnet101", Bottleneck, (3, 4, 23, 3))
_factory("resnet152", Bottleneck, (3, 8, 36, 3))
