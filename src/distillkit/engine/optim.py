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

__all__ = ["build_optimizer", "lr_factor", "with_fast_kernels"]


def build_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW, no decay on biases and norms, fast kernels."""
    return with_fast_kernels(build_plain_optimizer(cfg, params))


def with_fast_kernels(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`opt` rebuilt with fused or foreach kernels where its class and device have them.

    Only a fresh optimizer (no state yet) whose groups left the choice to torch is rebuilt; the
    groups keep every hyperparameter, so the update is the same.
    """
    cls = type(opt)
    accepted = inspect.signature(cls.__init__).parameters
    chosen = any(g.get("fused") or g.get("foreach") for g in opt.param_groups)
    if opt.state or chosen or "foreach" not in accepted:
        return opt
    params = [p for g in opt.param_groups for p in g["params"]]
    devices = {p.device.type for p in params}
    dense = all(p.is_floating_point() and p.layout == torch.strided for p in params)
    fused = "fused" in accepted and dense and len(devices) == 1 and devices <= {"cpu", "cuda"}
    fast = {"fused": True} if fused else {"foreach": True}
    groups = [
        {k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in opt.param_groups
    ]
    return cls(groups, lr=opt.defaults["lr"], **fast)
