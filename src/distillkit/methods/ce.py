"""Plain supervised training with cross-entropy: teachers and student-alone baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.methods.base import Batch, Distiller
from distillkit.methods.registry import register_method


class CrossEntropy(Distiller):
    """loss = CE(student(x), y)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None):
        super().__init__(student, None)

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy on the labels."""
        x, y, _ = batch
        logits = self.student(x)
        return logits, {"ce": F.cross_entropy(logits, y)}


@register_method(
    "ce", needs_teacher=False, description="cross-entropy on labels (teachers, baselines)"
)
def build(cfg, options, student, teacher, bundle) -> CrossEntropy:
    """Registry builder."""
    return CrossEntropy(student)
