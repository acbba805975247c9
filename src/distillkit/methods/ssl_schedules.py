"""Per-step schedules of self-supervised runs: cosine values, EMA momentum, lr, teacher temperature."""

from __future__ import annotations

import math

import numpy as np


def cosine_value(step: int, total: int, start: float, end: float) -> float:
    """Cosine interpolation from `start` (step 0) to `end` (step `total`)."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """Teacher EMA momentum at a global step: cosine from `base` to `final` over the run."""
    return cosine_value(step, total_steps, base, final)


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """Teacher temperature: linear warm-up over `warmup_epochs` epochs, then constant."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return temp
    # same grid as DINO's np.linspace(warmup, temp, warmup_epochs)
    return float(np.linspace(warmup_temp, temp, warmup_epochs)[epoch])


def lr_at(
    step: int, steps_per_epoch: int, epochs: int, base: float, final: float, warmup: float
) -> float:
    """Learning rate at a global step: linear warm-up then cosine decay to `final`."""
    warm = int(round(warmup * steps_per_epoch))
    total = epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return base * (step + 1) / warm
    return cosine_value(step - warm, max(1, total - warm), base, final)
