"""The default optimizer and learning-rate schedule built from a run's config.

Defined in `methods/optim.py` (below the engine, so methods that configure their own optimizers
build the student's the same way); the trainer's default optimizer is that one with fused (or
foreach) kernels: the same update, one kernel per step instead of one per parameter tensor.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from distillkit.config import RunConfig
from distillkit.methods.optim import build_optimizer as build_plain_optimizer
from distillkit.methods.optim import lr_factor

__all__ = ["build_optimizer", "lr_factor"]


def build_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW, no decay on biases and norms, fast kernels."""
    opt = build_plain_optimizer(cfg, params)
    # fused where the class (SGD from torch 2.3) and the parameters' one device have it, else
    # foreach; the groups keep every hyperparameter
    devices = {p.device.type for p in params}
    dense = all(p.is_floating_point() and p.layout == torch.strided for p in params)
    fused = "fused" in inspect.signature(type(opt).__init__).parameters
    fused = fused and dense and len(devices) == 1 and devices <= {"cpu", "cuda"}
    fast = {"fused": True} if fused else {"foreach": True}
    groups = [
        {k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in opt.param_groups
    ]
    return type(opt)(groups, lr=opt.defaults["lr"], **fast)
