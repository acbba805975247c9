"""Losses shared by the distillation methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillkit.teachers.base import TeacherOutput


def kd_kl(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(p_t || p_s) at temperature T, averaged over the batch (Hinton et al., 2015).

    `teacher_log_probs` are log-probabilities at temperature 1; they are re-tempered here so that
    teachers returning logits or probabilities are treated alike (log p / T is logits / T up to a
    per-row constant, which softmax ignores). Hard labels must not come through here: a floored
    one-hot re-tempered at T > 1 spreads mass over the other classes; use `kd_loss`.
    """
    _check_shapes(student_logits, teacher_log_probs)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_log_probs.float() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * (temperature * temperature)


def is_hard(out: TeacherOutput) -> bool:
    """Whether the teacher answered with labels only."""
    return out.labels is not None and out.logits is None and out.probs is None


def kd_target(
    out: TeacherOutput, temperature: float, num_classes: int | None = None
) -> torch.Tensor:
    """The teacher's distribution at temperature T: softmax(log p / T), exact one-hot for labels.

    A label carries no confidence to soften, so its target is the one-hot vector at every T.
    """
    if is_hard(out):
        if num_classes is None:
            raise ValueError("num_classes is needed to turn hard labels into targets")
        return F.one_hot(out.labels.long(), num_classes).float()
    return F.softmax(out.log_probs(num_classes).float() / temperature, dim=1)


def kd_loss(
    student_logits: torch.Tensor,
    out: TeacherOutput,
    temperature: float,
    num_classes: int | None = None,
) -> torch.Tensor:
    """T^2 * KL(kd_target || p_s^T), batch mean, for any teacher answer (logits, probs, labels)."""
    if not is_hard(out):
        return kd_kl(student_logits, out.log_probs(num_classes), temperature)
    target = kd_target(out, temperature, num_classes or student_logits.shape[1])
    _check_shapes(student_logits, target)
    # a one-hot target has zero entropy: the KL is the tempered student's cross-entropy
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return -(target * log_p_s).sum(dim=1).mean() * (temperature * temperature)


def _check_shapes(student_logits: torch.Tensor, teacher: torch.Tensor) -> None:
    if student_logits.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher outputs "
            f"{tuple(teacher.shape)} must have the same shape"
        )


def check_temperature(value: float, key: str = "options.temperature") -> None:
    """ValueError naming the config key unless the KD temperature is > 0."""
    if not value > 0:
        raise ValueError(f"config key '{key}': must be > 0, got {value!r}")


def check_alpha(value: float, key: str = "options.alpha") -> None:
    """ValueError naming the config key unless the cross-entropy share is in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"config key '{key}': must be in [0, 1], got {value!r}")
