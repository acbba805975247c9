"""Model zoo helpers; the registry itself lives in ``registry.py`` (kept importable from here)."""

from __future__ import annotations

from torch import nn

from .registry import build_model, list_models, register

__all__ = ["build_model", "count_parameters", "list_models", "register"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Return the number of (optionally only trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
