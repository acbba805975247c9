"""Local teachers: a white-box model, and any model exposed as a black box with a query budget."""

from __future__ import annotations

import torch
from torch import nn

from distillkit.teachers.base import BudgetExceededError, TeacherOutput


class LocalTeacher(nn.Module):
    """A white-box teacher: always in eval mode, never tracks gradients, returns logits."""

    kind = "white-box"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.queries = 0
        self.budget: int | None = None
        self.train(False)

    def train(self, mode: bool = True) -> LocalTeacher:
        """Stay in eval mode whatever the caller asks: BN statistics must not drift."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """Logits of the wrapped model."""
        self.queries += x.shape[0]
        return TeacherOutput(logits=self.model(x))


class BlackBoxTeacher(nn.Module):
    """Any local model seen only through probabilities ('soft') or labels ('hard'), with a budget."""

    def __init__(self, model: nn.Module, kind: str = "soft", budget: int | None = None):
        super().__init__()
        if kind not in ("soft", "hard"):
            raise ValueError(f"black-box teacher kind must be 'soft' or 'hard', got {kind!r}")
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None, got {budget}")
        self.inner = LocalTeacher(model)
        self.kind = kind
        self.budget = budget
        self.queries = 0
        self.train(False)

    def train(self, mode: bool = True) -> BlackBoxTeacher:
        """Stay in eval mode."""
        super().train(False)
        return self

    @property
    def remaining(self) -> int | None:
        """Queries left before the budget is spent (None: unlimited)."""
        return None if self.budget is None else self.budget - self.queries

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """Probabilities or labels; refuses a batch that would exceed the budget."""
        n = x.shape[0]
        if self.budget is not None and self.queries + n > self.budget:
            raise BudgetExceededError(
                f"query budget exceeded: {self.queries} used + {n} asked > budget {self.budget}"
            )
        self.queries += n
        logits = self.inner(x).logits
        if self.kind == "soft":
            return TeacherOutput(probs=torch.softmax(logits.float(), dim=1))
        return TeacherOutput(labels=logits.argmax(dim=1))
