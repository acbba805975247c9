"""Batched, vectorised image transforms with per-sample randomness."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["normalize", "random_crop_flip", "to_float"]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Convert uint8 images to float32 in [0, 1] (float input is returned as float32)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def normalize(
    x: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Per-channel `(x - mean) / std` for x of shape (B, C, H, W)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - m) / s


def random_crop_flip(
    x: torch.Tensor,
    padding: int,
    flip: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Zero-pad by `padding`, take a random HxW window and maybe mirror it, independently per sample."""
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    if b == 0 or (padding == 0 and not flip):
        return x
    # Draw on the generator's device (usually CPU) so results do not depend on where x lives.
    gdev = generator.device
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=gdev)
    coins = (
        torch.randint(0, 2, (b,), generator=generator, device=gdev).bool()
        if flip
        else torch.zeros(b, dtype=torch.bool, device=gdev)
    )
    offsets, coins = offsets.to(x.device), coins.to(x.device)

    pw = w + 2 * padding
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(coins[:, None], (w - 1) - cols, cols) + offsets[1, :, None]  # (B, W)
    # One flat gather over the padded image keeps the output contiguous in (B, C, H, W)
    # and avoids a Python loop over samples.
    flat = (rows[:, :, None] * pw + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    padded = torch.nn.functional.pad(x, (padding,) * 4) if padding else x
    return padded.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)
