"""Hinton knowledge distillation: alpha * CE + (1 - alpha) * T^2 * KL(p_t^T || p_s^T)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.methods.base import Batch, Distiller
from distillkit.methods.losses import check_alpha, check_temperature, kd_loss
from distillkit.methods.registry import register_method
from distillkit.teachers.base import ask_teacher


@dataclass
class KDOptions:
    """Options of method kd (config key `options:`)."""

    temperature: float = 4.0
    alpha: float = 0.1  # weight of cross-entropy; the KD term gets 1 - alpha

    def validate(self) -> None:
        """Temperature > 0, alpha in [0, 1]."""
        check_temperature(self.temperature)
        check_alpha(self.alpha)


class KD(Distiller):
    """Works with any teacher kind: logits, probabilities, or hard labels (then one-hot targets)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        alpha: float = 0.1,
        num_classes: int | None = None,
    ):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.alpha = alpha
        self.num_classes = num_classes

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE on labels plus the tempered KL to the teacher (asked by sample index to cache)."""
        x, y, idx = batch
        with torch.no_grad():
            out = ask_teacher(self.teacher, x, idx)
        logits = self.student(x)
        ce = self.alpha * F.cross_entropy(logits, y)
        kd = (1.0 - self.alpha) * kd_loss(logits, out, self.temperature, self.num_classes)
        return logits, {"ce": ce, "kd": kd}


@register_method(
    "kd",
    options=KDOptions,
    description="Hinton KD: alpha*CE + (1-alpha)*T^2*KL",
    teacher_cache=True,
)
def build(cfg, options: KDOptions, student, teacher, bundle) -> KD:
    """Registry builder: temperature and alpha come from `options`."""
    return KD(student, teacher, options.temperature, options.alpha, num_classes=bundle.num_classes)
