"""Wide ResNets (Zagoruyko & Komodakis) for small images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import conv1x1, conv3x3, init_weights
from .registry import register


class PreActBlock(nn.Module):
    """Pre-activation basic block used by wide ResNets."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.dropout = dropout
        self.shortcut = None if in_ch == out_ch and stride == 1 else conv1x1(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block."""
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # the projection sees the activated input, as in the reference WRN
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-depth-k: three stages of (depth-4)/6 pre-activation blocks."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        in_channels: int = 3,
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv3x3(in_channels, widths[0])
        self.layer1 = self._make_layer(widths[0], widths[1], n, 1, dropout)
        self.layer2 = self._make_layer(widths[1], widths[2], n, 2, dropout)
        self.layer3 = self._make_layer(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[3], num_classes)
        self.hook_layers: list[str] = ["layer1", "layer2", "layer3"]
        init_weights(self)

    @staticmethod
    def _make_layer(
        in_ch: int, out_ch: int, blocks: int, stride: int, dropout: float
    ) -> nn.Sequential:
        layers = [PreActBlock(in_ch, out_ch, stride, dropout)]
        layers += [PreActBlock(out_ch, out_ch, 1, dropout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for a batch of images."""
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.classifier(self.pool(x).flatten(1))


def _make_builder(depth: int, widen: int) -> None:
    name = f"wrn_{depth}_{widen}"

    def builder(
        in_channels: int = 3, num_classes: int = 10, image_size: int = 32, dropout: float = 0.0
    ) -> WideResNet:
        return WideResNet(depth, widen, in_channels, num_classes, dropout=dropout)

    builder.__name__ = name
    builder.__doc__ = f"Build WRN-{depth}-{widen}."
    register(name)(builder)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _make_builder(_depth, _widen)
