"""Multi-crop views for self-supervised training (DINO), on batched image tensors.

2 global + N local random-resized crops with DINO's photometric augmentations (colour jitter,
Gaussian blur, solarisation). Every random number comes from a CPU generator the caller passes
in, so a (seed, epoch)-derived generator makes the views exact on any device. Given a BatchShard
(one process's rows of a global batch), the numbers are drawn for the whole global batch and each
process keeps its rows: the views are those of a single-process run, whatever the world size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .transforms import BatchShard


@dataclass
class MultiCrop:
    """2 global + N local random-resized crops of a batch, with DINO's photometric augmentations.

    Works on float images in [0, 1] (B, C, H, W) on any device; randomness: see the module.
    """

    global_size: int
    local_size: int
    local_number: int = 8
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    flip: bool = True
    jitter: float = 0.4
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    blur: bool = True
    solarize: bool = True

    def __call__(
        self, x: torch.Tensor, gen: torch.Generator, shard: BatchShard | None = None
    ) -> list[torch.Tensor]:
        """Views in [0, 1]: [global_1, global_2, local_1, ..., local_N].

        With `shard`, x holds the rows `shard.positions` of a global batch of `shard.total`.
        """
        if shard is not None and len(shard.positions) != len(x):
            raise ValueError(f"the shard has {len(shard.positions)} rows, the images {x.shape[0]}")
        rows = _Rows(len(x)) if shard is None else _Rows(shard.total, shard.positions)
        # DINO's per-view probabilities: blur always on view 1, rarely on view 2 (which may be
        # solarised instead), half the time on local views
        plan = [
            (self.global_size, self.global_scale, 1.0, 0.0),
            (self.global_size, self.global_scale, 0.1, 0.2),
        ]
        plan += [(self.local_size, self.local_scale, 0.5, 0.0)] * self.local_number
        views = []
        for size, scale, p_blur, p_sol in plan:
            v = random_resized_crop(x, size, scale, gen, flip=self.flip, rows=rows)
            v = color_jitter(v, self.jitter, gen, rows=rows)
            if self.blur and p_blur > 0:
                v = gaussian_blur(v, p_blur, self.blur_sigma, gen, rows=rows)
            if self.solarize and p_sol > 0:
                v = solarize(v, p_sol, gen, rows=rows)
            views.append(v)
        return views


@dataclass(frozen=True)
class _Rows:
    """How many per-sample numbers to draw (the global batch) and which of them x's rows take."""

    total: int
    pick: torch.Tensor | None = None  # None: all of them, in order

    def rand(self, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U[0, 1) per row of x, drawn for the whole batch."""
        r = torch.rand(self.total, generator=gen, dtype=dtype)
        return r if self.pick is None else r[self.pick]

    def uniform(self, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
        """U[low, high) in float64 per row of x, drawn for the whole batch."""
        return low + (high - low) * self.rand(gen, torch.float64)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: Sequence[float],
    gen: torch.Generator,
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip: bool = True,
    rows: _Rows | None = None,
) -> torch.Tensor:
    """Per-sample random crop of area fraction in `scale`, aspect in `ratio`, resized to `size`."""
    b = x.shape[0]
    rows = rows or _Rows(len(x))
    area = rows.uniform(scale[0], scale[1], gen)
    r = torch.exp(rows.uniform(math.log(ratio[0]), math.log(ratio[1]), gen))
    # crop side lengths as fractions of the image side; clamped crops just keep a valid window
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - w) * (2 * rows.rand(gen, torch.float64) - 1)
    cy = (1 - h) * (2 * rows.rand(gen, torch.float64) - 1)
    sign = torch.ones(b, dtype=torch.float64)
    if flip:
        sign = torch.where(rows.rand(gen) < 0.5, -1.0, 1.0).double()
    zero = torch.zeros(b, dtype=torch.float64)
    theta = torch.stack([w * sign, zero, cx, zero, h, cy], dim=1).view(b, 2, 3).to(x)
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(
    x: torch.Tensor,
    strength: float,
    gen: torch.Generator,
    rows: _Rows,
    p: float = 0.8,
) -> torch.Tensor:
    """Brightness and contrast (and saturation/grayscale for RGB) jitter, per sample."""
    b, c = x.shape[:2]
    if strength <= 0:
        return x
    apply = (rows.rand(gen) < p).to(x.dtype)
    # brightness, contrast and saturation factors, drawn for every image (1 where not applied)
    factors = [rows.uniform(1 - strength, 1 + strength, gen).to(x.dtype) for _ in range(3)]
    gray_coin = (rows.rand(gen) < 0.2).to(x.dtype)
    bright, contrast, sat = ((1 + apply * (f - 1)).to(x.device).view(b, 1, 1, 1) for f in factors)
    y = (x * bright).clamp(0, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * contrast + mean).clamp(0, 1)
    if c == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
        weights = weights.view(1, 3, 1, 1)
        gray = (y * weights).sum(1, keepdim=True)
        y = ((y - gray) * sat + gray).clamp(0, 1)
        g = gray_coin.to(x.device).view(b, 1, 1, 1)
        y = g * (y * weights).sum(1, keepdim=True).expand_as(y) + (1 - g) * y
    return y


def gaussian_blur(
    x: torch.Tensor,
    p: float,
    sigma: Sequence[float],
    gen: torch.Generator,
    rows: _Rows,
    radius: int = 1,
) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma, applied with probability `p`."""
    b, c, h, w = x.shape
    coin = (rows.rand(gen) < p).to(x.dtype)
    s = rows.uniform(sigma[0], sigma[1], gen).to(x.dtype)
    offs = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(offs[None] ** 2) / (2 * s[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    identity = (offs == 0).to(x.dtype)  # the kernel of the samples left unblurred
    k = coin[:, None] * k + (1 - coin[:, None]) * identity
    k = k.to(x.device).repeat_interleave(c, 0)  # (B*C, K): one kernel per sample and channel
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.reshape(b, c, h, w)


def solarize(
    x: torch.Tensor,
    p: float,
    gen: torch.Generator,
    rows: _Rows,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Invert pixels above `threshold`, per sample with probability `p`."""
    coin = (rows.rand(gen) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(coin & (x >= threshold), 1.0 - x, x)
