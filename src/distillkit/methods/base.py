"""The method contract: one `Distiller` subclass per method, driven by the one engine.

A method returns named losses from `training_step`; the trainer sums them, runs backward (AMP
scaler, DDP), clips and steps every optimizer. A method that needs more owns it through hooks the
trainer calls, never through a loop or an optimizer of its own:

- `setup(ctx)`: steps per epoch, device, world size, config and data, once before training;
- `configure_optimizers()`: one or several optimizers with their per-step schedules (None: the
  trainer builds `cfg.optimizer` over `trainable_parameters()` with the config's schedule);
- manual optimization (`automatic_optimization = False`): `training_step` calls
  `self.manual_backward(loss)` and `self.optimizer_step(opt)` itself, e.g. a GAN's two phases;
- `on_epoch_start` / `on_step_end` / `on_epoch_end`: stages, phases, EMA teachers, diagnostics;
- `evaluate()`: quality that is not the student's test accuracy (k-NN, linear probe);
- `extra_state()` / `load_extra_state()`: budgets spent, centers, query pools, for exact resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, labels, sample indices


@dataclass
class SetupContext:
    """What a method may know about the run before it trains."""

    cfg: Any  # the RunConfig
    bundle: Any  # the DataBundle
    device: torch.device
    rank: int = 0
    world_size: int = 1
    steps_per_epoch: int = 1
    epochs: int = 1
    run_dir: Path | None = None


@dataclass
class OptimizerConfig:
    """One optimizer a method owns, with its per-step learning-rate factor and clipping."""

    optimizer: torch.optim.Optimizer
    lr_lambda: Callable[[int], float] | None = None  # factor of the base lr at a global step
    grad_clip: float | None = None
    name: str = "student"

    def params(self) -> list[nn.Parameter]:
        """Every parameter this optimizer steps (what gets clipped and synchronised)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]


class EngineHooks(Protocol):
    """What the trainer lends a method for manual optimization."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, opt: OptimizerConfig) -> None: ...

    def optimizers(self) -> list[OptimizerConfig]: ...


class Distiller(nn.Module):
    """Base class: subclasses implement `training_step(batch) -> (logits, {name: loss})`."""

    automatic_optimization: bool = True
    # DDP must look for parameters a step leaves unused (e.g. StableKD's per-stage connectors)
    ddp_find_unused_parameters: bool = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.context: SetupContext | None = None
        self._engine: EngineHooks | None = None

    # -- hooks the trainer calls ---------------------------------------------------------------
    def setup(self, ctx: SetupContext) -> None:
        """Called once before configure_optimizers; the default keeps the context."""
        self.context = ctx

    def configure_optimizers(self) -> list[OptimizerConfig] | None:
        """The method's optimizers; None lets the trainer build the config's optimizer."""
        return None

    def training_step(self, batch: Batch) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Student logits (or None) and the named loss terms for one batch."""
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based), after the loader is set to it."""

    def on_step_end(self, step: int) -> None:
        """Called after the optimizers stepped at global step `step` (0-based)."""

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Extra metrics for this epoch's metrics.jsonl row."""
        return {}

    def evaluate(self) -> dict[str, float] | None:
        """Method-specific evaluation; None: the trainer reports the student's test accuracy.

        A returned dict is logged; its `score` (higher is better) selects best.pt.
        """
        return None

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state a resume needs (budgets spent, pools, centers)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of extra_state."""

    def deployable(self) -> nn.Module:
        """The model that evaluation and export use."""
        return self.student

    # -- manual optimization -------------------------------------------------------------------
    def optimizers(self) -> list[OptimizerConfig]:
        """The optimizers configured for this run, in configure_optimizers order."""
        return self._hooks().optimizers()

    def manual_backward(self, loss: torch.Tensor) -> None:
        """Backward through the trainer (AMP loss scaling)."""
        self._hooks().backward(loss)

    def optimizer_step(self, opt: OptimizerConfig) -> None:
        """Unscale, average gradients over ranks, clip, step and zero one optimizer."""
        self._hooks().step(opt)

    def _hooks(self) -> EngineHooks:
        if self._engine is None:
            raise RuntimeError("manual optimization needs the trainer: call Trainer(...).fit()")
        return self._engine

    # -- plumbing ----------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Same as training_step, so DDP's gradient hooks see the whole step."""
        return self.training_step(batch)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the default optimizer owns: everything but the teacher."""
        for name, p in self.named_parameters():
            if not name.startswith("teacher.") and p.requires_grad:
                yield p

    def train(self, mode: bool = True) -> Distiller:
        """Train the student side; the teacher keeps its own (eval) mode."""
        super().train(mode)
        if isinstance(self.teacher, nn.Module):
            self.teacher.train(False)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State of everything but the teacher (student + adapters), for checkpoints."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of trainable_state_dict; the teacher's weights are left as they are."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}"
            )
