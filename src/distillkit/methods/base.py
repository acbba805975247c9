"""The Distiller contract: a module holding a student (and maybe a teacher) that returns named losses."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, labels, sample indices


class Distiller(nn.Module):
    """Base class: subclasses implement `training_step(batch) -> (logits, {name: loss})`."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.teacher = teacher

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits and the named loss terms for one batch; the trainer sums the terms."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same as training_step, so DDP's gradient hooks see the whole step."""
        return self.training_step(batch)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer owns: everything but the teacher."""
        for name, p in self.named_parameters():
            if not name.startswith("teacher.") and p.requires_grad:
                yield p

    def train(self, mode: bool = True) -> Distiller:
        """Train the student side; the teacher keeps its own (eval) mode."""
        super().train(mode)
        if self.teacher is not None:
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
