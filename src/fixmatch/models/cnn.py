"""A small, fast CNN for 28x28 grayscale images (MNIST / Fashion-MNIST) on CPU.

Default widths (32, 64, 128, 128): ~242k parameters, ~8.8M multiply-accumulates per 28x28x1
image (0.2M + 3.6M + 3.6M + 1.3M for the convs at 28, 14, 7 and 3 pixels). The fourth, 3x3 stage
costs 15% more than three stages but lets the last features see the whole garment before the
global average pool (three stages see about 18 of its 28 pixels). Pass narrower
``widths`` (e.g. (24, 48, 96)) when CPU time matters more than accuracy.
Global average pooling makes it work for any input size >= 2**(stages-1) pixels and any channel count.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fixmatch.models import register_model
from fixmatch.models.wideresnet import init_official_weights


class SmallCNN(nn.Module):
    """[conv3x3-BN-LeakyReLU] x len(widths), 2x2 max-pool between stages, GAP, linear.

    ``bn_momentum`` defaults to 0.01 rather than the paper's 0.001: that value suits 2^20
    training steps, but in short CPU runs of a few thousand steps the running statistics
    used at evaluation would lag far behind the weights.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 128),
        bn_momentum: float = 0.01,
        leaky_slope: float = 0.1,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("SmallCNN needs at least one stage width")
        layers: list[nn.Module] = []
        channels = in_channels
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [
                # No conv bias: the following BN's shift makes it redundant.
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width, momentum=bn_momentum),
                nn.LeakyReLU(leaky_slope, inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.head_name = "fc"
        self.num_features = channels
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as the Wide ResNet, so both models start from comparable scales.
        init_official_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding of shape (N, widths[-1])."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@register_model("cnn_small")
def cnn_small(num_classes: int, in_channels: int = 1, image_size: Any = None, **kwargs: Any) -> SmallCNN:
    """SmallCNN with default widths (32, 64, 128, 128); image_size is accepted and ignored."""
    return SmallCNN(num_classes, in_channels=in_channels, **kwargs)
