"""Per-sample caching of teacher outputs for inputs that do not change between epochs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distillkit.files import atomic_path
from distillkit.teachers.base import TeacherOutput


class CachedTeacher(nn.Module):
    """Wraps a teacher; answers are stored per dataset index, so each sample is queried once.

    Only valid for deterministic inputs (no random augmentation): the cache is keyed by the
    sample's index in its split, not by pixel content.
    """

    accepts_indices = True  # callers pass the batch's sample indices as a second argument

    def __init__(self, teacher: nn.Module, num_samples: int, path: str | Path | None = None):
        super().__init__()
        self.teacher = teacher
        self.kind = teacher.kind
        self.budget = getattr(teacher, "budget", None)
        self.path = Path(path) if path is not None else None
        self.num_samples = num_samples
        self.values: torch.Tensor | None = None
        self.known = torch.zeros(num_samples, dtype=torch.bool)
        self.field = None
        if self.path is not None and self.path.is_file():
            self._load()
        self.train(False)

    @property
    def queries(self) -> int:
        """Queries the wrapped teacher actually answered."""
        return self.teacher.queries

    def train(self, mode: bool = True) -> CachedTeacher:
        """Stay in eval mode."""
        super().train(False)
        return self

    def _load(self) -> None:
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state["known"].shape[0] != self.num_samples:
            raise ValueError(
                f"teacher cache {self.path} holds {state['known'].shape[0]} samples, "
                f"the dataset has {self.num_samples}; delete the cache file to rebuild it"
            )
        self.values, self.known, self.field = state["values"], state["known"], state["field"]

    def save(self) -> None:
        """Write the cache atomically, if it has a path."""
        if self.path is None or self.values is None:
            return
        with atomic_path(self.path) as tmp:
            torch.save({"values": self.values, "known": self.known, "field": self.field}, tmp)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> TeacherOutput:
        """Answer from the cache where known, query the teacher for the rest."""
        if idx is None:
            return self.teacher(x)
        idx_cpu = idx.cpu()
        missing = ~self.known[idx_cpu]
        if missing.any():
            out = self.teacher(x[missing.to(x.device)])
            for name in ("logits", "probs", "labels"):
                value = getattr(out, name)
                if value is not None:
                    break
            if self.values is None:
                self.field = name
                self.values = torch.zeros((self.num_samples, *value.shape[1:]), dtype=value.dtype)
            self.values[idx_cpu[missing]] = value.detach().cpu()
            self.known[idx_cpu[missing]] = True
        return TeacherOutput(**{self.field: self.values[idx_cpu].to(x.device)})
