"""Plain MLP and small VGG-like CNNs for quick experiments."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import ConvBNReLU, downsample_pool, init_weights
from .registry import register


class MLP(nn.Module):
    """Multi-layer perceptron on flattened images."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int = 32,
        hidden: Sequence[int] = (512, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = in_channels * image_size * image_size
        self.image_size = image_size
        dims = [self.in_features, *hidden]
        self.hook_layers: list[str] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:]), start=1):
            layer = nn.Sequential(
                nn.Linear(d_in, d_out), nn.ReLU(inplace=True), nn.Dropout(dropout)
            )
            self.add_module(f"layer{i}", layer)
            self.hook_layers.append(f"layer{i}")
        self.classifier = nn.Linear(dims[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for a batch of images."""
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            # a clear message beats the opaque matmul shape error
            raise ValueError(
                f"mlp was built for {self.in_features} input features "
                f"(image_size={self.image_size}) but got {x.shape[1]}; "
                "pass image_size=... to build_model"
            )
        for name in self.hook_layers:
            x = getattr(self, name)(x)
        return self.classifier(x)


class SimpleCNN(nn.Module):
    """Stages of conv-BN-ReLU layers, 2x2 max pooling between stages."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int],
        convs_per_stage: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.hook_layers: list[str] = []
        prev = in_channels
        for i, width in enumerate(widths, start=1):
            layers: list[nn.Module] = [downsample_pool()] if i > 1 else []
            for _ in range(convs_per_stage):
                layers.append(ConvBNReLU(prev, width))
                prev = width
            self.add_module(f"layer{i}", nn.Sequential(*layers))
            self.hook_layers.append(f"layer{i}")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(prev, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for a batch of images."""
        for name in self.hook_layers:
            x = getattr(self, name)(x)
        x = self.dropout(self.pool(x).flatten(1))
        return self.classifier(x)


@register("mlp")
def mlp(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, **kwargs) -> MLP:
    """Build a two-hidden-layer MLP for ``image_size`` x ``image_size`` inputs."""
    return MLP(in_channels, num_classes, image_size=image_size, **kwargs)


@register("cnn_small")
def cnn_small(
    in_channels: int = 3, num_classes: int = 10, image_size: int = 32, **kwargs
) -> SimpleCNN:
    """Build a 3-stage CNN with one conv per stage (16/32/64 channels)."""
    return SimpleCNN(in_channels, num_classes, widths=(16, 32, 64), convs_per_stage=1, **kwargs)


@register("cnn_medium")
def cnn_medium(
    in_channels: int = 3, num_classes: int = 10, image_size: int = 32, **kwargs
) -> SimpleCNN:
    """Build a 3-stage CNN with two convs per stage (32/64/128 channels)."""
    return SimpleCNN(in_channels, num_classes, widths=(32, 64, 128), convs_per_stage=2, **kwargs)


@register("cnn_large")
def cnn_large(
    in_channels: int = 3, num_classes: int = 10, image_size: int = 32, **kwargs
) -> SimpleCNN:
    """Build a 3-stage CNN with three convs per stage (64/128/256 channels)."""
    return SimpleCNN(in_channels, num_classes, widths=(64, 128, 256), convs_per_stage=3, **kwargs)
