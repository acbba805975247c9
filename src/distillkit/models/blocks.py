"""Small building blocks shared by the model zoo."""

from __future__ import annotations

from torch import nn


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """Return a bias-free 3x3 convolution with padding 1."""
    # padding 1 keeps stride-2 convs from shrinking a 1x1 map to zero
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """Return a bias-free 1x1 convolution."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class ConvBNReLU(nn.Sequential):
    """Convolution followed by batch norm and ReLU."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_ch,
                out_ch,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


def downsample_pool() -> nn.MaxPool2d:
    """Return a 2x2 max pool that maps a 1x1 map to 1x1 instead of 0x0."""
    return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)


def init_weights(module: nn.Module) -> None:
    """Initialise conv/BN/linear layers with the usual He-normal scheme."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
