"""The default optimizer and learning-rate schedule built from a run's config.

They live below the engine so that a method configuring several optimizers (MEKD's student next to
its generator and discriminator) builds the student's exactly as the trainer's default would;
`engine/optim.py` re-exports them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distillkit.config import RunConfig


def build_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW; no weight decay on biases and norm scales."""
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0 if cfg.optimizer == "adamw" else cfg.weight_decay},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(cfg: RunConfig, step: int, steps_per_epoch: int, epochs: int | None = None) -> float:
    """Multiplier of the base learning rate at a global step: linear warm-up, then the schedule.

    `epochs` (default cfg.epochs) is the length the schedule spans, for a method whose student
    trains in only part of the run.
    """
    total = (cfg.epochs if epochs is None else epochs) * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
