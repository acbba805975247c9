"""KD with an extra data augmentation (Wang et al., NeurIPS 2022).

L = w_ce * CE(s(x), y) + w_kd * [T^2 KL_T(t(x) || s(x)) + T^2 KL_T(t(x') || s(x'))]

x is the batch the trainer hands in (standard crop/flip), x' the extra-augmented batch built from
x. The target on x' is the teacher's own output on x', never interpolated labels, so mixing ops
need no labels at all. Defaults follow the paper: w_ce 0.1, w_kd 0.9, T 4.

A hard-label teacher's target is the exact one-hot of its label at every T, on x and on x' alike
(the same rule as method kd, through `losses.kd_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.data.augment import Augmentation, build_augmentation, student_scorer
from distillkit.methods.base import Batch, Distiller
from distillkit.methods.losses import check_temperature, is_hard, kd_loss
from distillkit.methods.registry import register_method
from distillkit.teachers.base import TeacherOutput, ask_teacher


@dataclass
class KDDAOptions:
    """Options of method kd_da (config key `options:`)."""

    augmentation: str = "cutmixpick"
    params: dict[str, Any] = field(default_factory=dict)
    w_ce: float = 0.1
    w_kd: float = 0.9
    temperature: float = 4.0

    def validate(self) -> None:
        """Check weights and temperature, and that the augmentation builds."""
        for key in ("w_ce", "w_kd"):
            if getattr(self, key) < 0:
                raise ValueError(
                    f"config key 'options.{key}': must be >= 0, got {getattr(self, key)!r}"
                )
        check_temperature(self.temperature)
        try:
            build_augmentation(self.augmentation, **self.params)
        except ValueError as exc:
            raise ValueError(f"config key 'options.augmentation': {exc}") from None


class KDDA(Distiller):
    """Hinton KD on x plus the same KD term on an extra-augmented x'."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        augmentation: Augmentation,
        *,
        w_ce: float = 0.1,
        w_kd: float = 0.9,
        temperature: float = 4.0,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        num_classes: int | None = None,
    ):
        super().__init__(student, teacher)
        self.augmentation = augmentation
        self.w_ce = w_ce
        self.w_kd = w_kd
        self.temperature = temperature
        self.mean = mean
        self.std = std
        self.num_classes = num_classes

    def ask(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> TeacherOutput:
        """The teacher's answer on x (by sample index only for the un-augmented x)."""
        with torch.no_grad():
            return ask_teacher(self.teacher, x, idx)

    def teacher_log_probs(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher log-probabilities at T = 1: what augmentations score samples with."""
        return self.ask(x, idx).log_probs(self.num_classes)

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE on labels, KD on x, KD on x' against the teacher's output on x'."""
        x, y, idx = batch
        aug = self.augmentation
        out = self.ask(x, idx)
        logits = self.student(x)
        losses = {
            "ce": self.w_ce * F.cross_entropy(logits, y),
            "kd": self.w_kd * kd_loss(logits, out, self.temperature, self.num_classes),
        }
        # the identity's x' = x: the second term equals the first, no need for two more forwards
        logits_aug, out_aug = logits, out
        if not aug.is_identity:
            extra = aug.augment(
                x,
                mean=self.mean,
                std=self.std,
                teacher=self.teacher_log_probs if aug.needs_teacher else None,
                student=student_scorer(self.student) if aug.needs_student else None,
                temperature=self.temperature,
            )
            # an augmentation that scored x' with the teacher returns its answer: not asked twice
            t_lp = extra.teacher_log_probs
            if t_lp is None:
                out_aug = self.ask(extra.x)
            elif is_hard(out):  # the augmentation saw the floored one-hot: its argmax is the label
                out_aug = TeacherOutput(labels=t_lp.argmax(dim=1))
            else:  # log p are logits up to a per-row constant, which the tempered softmax ignores
                out_aug = TeacherOutput(logits=t_lp)
            logits_aug = self.student(extra.x)
        losses["kd_aug"] = self.w_kd * kd_loss(
            logits_aug, out_aug, self.temperature, self.num_classes
        )
        return logits, losses


@register_method(
    "kd_da",
    options=KDDAOptions,
    description="KD + extra augmentation (mixup, cutmix, cutmixpick, ...): Wang et al. 2022",
)
def build(cfg, options: KDDAOptions, student, teacher, bundle) -> KDDA:
    """Registry builder: the augmentation and weights come from `options`."""
    return KDDA(
        student,
        teacher,
        build_augmentation(options.augmentation, **options.params),
        w_ce=options.w_ce,
        w_kd=options.w_kd,
        temperature=options.temperature,
        mean=tuple(bundle.mean),
        std=tuple(bundle.std),
        num_classes=bundle.num_classes,
    )
