"""The Teacher protocol: what every teacher, local or remote, white-box or black-box, answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

KINDS = ("white-box", "soft", "hard")


class BudgetExceededError(RuntimeError):
    """Raised when a query would take a teacher past its query budget."""


@dataclass
class TeacherOutput:
    """A teacher's answer for a batch: exactly one of logits, probs or labels is set."""

    logits: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def log_probs(self, num_classes: int | None = None, eps: float = 1e-8) -> torch.Tensor:
        """Log-probabilities whatever the teacher returned (one-hot for hard labels)."""
        if self.logits is not None:
            return torch.log_softmax(self.logits.float(), dim=1)
        if self.probs is not None:
            return torch.log(self.probs.float().clamp_min(eps))
        if self.labels is None:
            raise ValueError("empty TeacherOutput")
        if num_classes is None:
            raise ValueError("num_classes is needed to turn hard labels into probabilities")
        onehot = torch.nn.functional.one_hot(self.labels.long(), num_classes).float()
        return torch.log(onehot.clamp_min(eps))

    def to(self, device: torch.device | str) -> TeacherOutput:
        """Move whichever tensor is set."""
        return TeacherOutput(
            *(
                t.to(device) if t is not None else None
                for t in (self.logits, self.probs, self.labels)
            )
        )


@runtime_checkable
class Teacher(Protocol):
    """Anything that answers batches of inputs; `kind` says how much it reveals."""

    kind: str
    queries: int
    budget: int | None

    def __call__(self, x: torch.Tensor) -> TeacherOutput: ...


def ask_teacher(
    teacher: Teacher, x: torch.Tensor, idx: torch.Tensor | None = None
) -> TeacherOutput:
    """Query a teacher, passing the batch's sample indices to teachers that cache by index."""
    if idx is not None and getattr(teacher, "accepts_indices", False):
        return teacher(x, idx)
    return teacher(x)
