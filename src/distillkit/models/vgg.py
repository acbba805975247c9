"""CIFAR-style VGG networks with batch norm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import ConvBNReLU, downsample_pool, init_weights
from .registry import register

# Channels of the convs in each of the five blocks.
_CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


class VGG(nn.Module):
    """Five conv-BN-ReLU blocks, max pooling between blocks, global average pool."""

    def __init__(
        self, cfg: Sequence[Sequence[int]], in_channels: int = 3, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.hook_layers: list[str] = []
        prev = in_channels
        for i, widths in enumerate(cfg, start=1):
            layers: list[nn.Module] = [downsample_pool()] if i > 1 else []
            for width in widths:
                layers.append(ConvBNReLU(prev, width))
                prev = width
            self.add_module(f"layer{i}", nn.Sequential(*layers))
            self.hook_layers.append(f"layer{i}")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for a batch of images."""
        for name in self.hook_layers:
            x = getattr(self, name)(x)
        return self.classifier(self.pool(x).flatten(1))


def _make_builder(name: str) -> None:
    def builder(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> VGG:
        return VGG(_CFGS[name], in_channels=in_channels, num_classes=num_classes)

    builder.__name__ = name
    builder.__doc__ = f"Build the CIFAR-style {name} with batch norm."
    register(name)(builder)


for _name in _CFGS:
    _make_builder(_name)
