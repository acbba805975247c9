"""MobileNetV2 adapted to small images (fewer early downsamplings)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBNReLU, init_weights
from .registry import register


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project, residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, kernel_size=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2; stages grouped by resolution into layer1..layer4."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width_mult: float = 0.5,
        expand: int = 6,
        last_channel: int = 1280,
    ) -> None:
        super().__init__()
        # (expansion, channels, repeats, stride); the stem and the second stage keep
        # stride 1 so that 32x32 inputs are downsampled only three times.
        settings = [
            [(1, 16, 1, 1), (expand, 24, 2, 1)],
            [(expand, 32, 3, 2)],
            [(expand, 64, 4, 2), (expand, 96, 3, 1)],
            [(expand, 160, 3, 2), (expand, 320, 1, 1)],
        ]
        prev = max(8, int(32 * width_mult))
        self.stem = ConvBNReLU(in_channels, prev, kernel_size=3)
        self.hook_layers: list[str] = []
        for i, group in enumerate(settings, start=1):
            blocks: list[nn.Module] = []
            for t, c, n, s in group:
                out = max(8, int(c * width_mult))
                for j in range(n):
                    blocks.append(InvertedResidual(prev, out, s if j == 0 else 1, t))
                    prev = out
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            self.hook_layers.append(f"layer{i}")
        if width_mult > 1.0:
            last_channel = int(last_channel * width_mult)
        self.conv_last = ConvBNReLU(prev, last_channel, kernel_size=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channel, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for a batch of images."""
        x = self.stem(x)
        for name in self.hook_layers:
            x = getattr(self, name)(x)
        x = self.conv_last(x)
        return self.classifier(self.pool(x).flatten(1))


@register("mobilenetv2")
def mobilenetv2(
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    width_mult: float = 0.5,
    expand: int = 6,
) -> MobileNetV2:
    """Build a CIFAR-style MobileNetV2 (width multiplier 0.5 by default)."""
    return MobileNetV2(in_channels, num_classes, width_mult=width_mult, expand=expand)
