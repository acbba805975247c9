"""Losses shared by the distillation methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(p_t || p_s) at temperature T, averaged over the batch (Hinton et al., 2015).

    `teacher_log_probs` are log-probabilities at temperature 1; they are re-tempered here so that
    teachers returning logits or probabilities are treated alike (log p / T is logits / T up to a
    per-row constant, which softmax ignores).
    """
    if student_logits.shape != teacher_log_probs.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher outputs "
            f"{tuple(teacher_log_probs.shape)} must have the same shape"
        )
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_log_probs.float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * (t * t)
