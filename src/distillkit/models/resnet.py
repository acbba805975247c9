"""CIFAR-style ResNets (depth 6n+2, three stages of basic blocks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import conv1x1, conv3x3, init_weights
from .registry import register


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity or 1x1-projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stem, three stages, global average pool."""

    def __init__(
        self, depth: int, num_filters: Sequence[int], in_channels: int = 3, num_classes: int = 10
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if len(num_filters) != 4:
            raise ValueError("num_filters needs 4 entries: stem and three stages")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, num_filters[0])
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[0], num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[1], num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[2], num_filters[3], n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(num_filters[3], num_classes)
        self.hook_layers: list[str] = ["layer1", "layer2", "layer3"]
        init_weights(self)

    @staticmethod
    def _make_layer(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_ch, out_ch, stride)]
        layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for a batch of images."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(self.pool(x).flatten(1))


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def _make_builder(name: str, depth: int, num_filters: Sequence[int]) -> None:
    def builder(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> CifarResNet:
        return CifarResNet(depth, num_filters, in_channels=in_channels, num_classes=num_classes)

    builder.__name__ = name
    builder.__doc__ = f"Build the CIFAR {name} (depth {depth}, filters {list(num_filters)})."
    register(name)(builder)


for _depth in (8, 14, 20, 32, 56, 110):
    _make_builder(f"resnet{_depth}", _depth, _NARROW)
for _depth in (8, 32):
    _make_builder(f"resnet{_depth}x4", _depth, _WIDE)
