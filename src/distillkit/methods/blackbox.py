"""Black-box baselines under a query budget: soft KD and hard-label training on the edge's images.

Both spend the budget once: `budget` edge images (the training split; the edge's own data) are
chosen by `options.query_selection` (random, or kernel thinning on pixels), sent through the
Teacher protocol, and the answers kept with the run (checkpointed, so resume never re-queries).
Each step then trains on a batch drawn from that answered pool: KD at `options.temperature` on
the returned probabilities (`blackbox_kd`), or cross-entropy on the returned labels
(`blackbox_hard`). Without a budget every edge image is queried once. The pool is bought on the
first training step (after a resume has restored it, so a resumed run asks nothing again) and kept
in the method's extra state with the count spent; the trainer's one optimizer owns the student.

The teacher is either a remote server (`options.teacher_url`, key from the environment variable
`options.api_key_env`) or the config's `teacher=` run wrapped as a local black box
(`BlackBoxTeacher`) that answers only probabilities or labels, with the same budget.

The edge labels are never used in a loss. The logits returned to the trainer are the student's
(eval-mode, no-grad) predictions on the trainer's edge batch, so `train_acc` is a monitor only.

These methods run in one process (`check_single_process`): every rank would buy its own pool. The
per-step draws are nevertheless made for the global batch, each process keeping its rows
(`take_rows`), so ranks would never pick the same samples.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distillkit.data.transforms import draw_size, normalize, take_rows, to_float
from distillkit.errors import ConfigError
from distillkit.methods.base import Batch, Distiller
from distillkit.methods.losses import kd_kl
from distillkit.methods.registry import register_method
from distillkit.teachers.base import BudgetExceededError, TeacherOutput
from distillkit.teachers.local import BlackBoxTeacher


@dataclass
class BlackBoxOptions:
    """How to reach the black-box teacher and how to spend its budget."""

    teacher_url: str | None = None  # a `distillkit serve-teacher` URL; else the config's teacher=
    api_key_env: str = "DISTILLKIT_API_KEY"  # environment variable holding the API key
    response: str = "soft"  # soft | hard: what a local black-box teacher reveals
    budget: int | None = None  # images the run may send to the teacher (None: unlimited)
    query_selection: str = "random"  # random | kt: which images spend the budget
    cache_dir: str | None = None  # RemoteTeacher response cache (default RUN_DIR/teacher_cache)
    request_batch: int = 256  # images per teacher call

    def validate(self) -> None:
        """Check the values."""
        if self.response not in ("soft", "hard"):
            raise ValueError(f"options.response must be soft or hard, got {self.response!r}")
        if self.query_selection not in ("random", "kt"):
            raise ValueError(
                f"options.query_selection must be random or kt, got {self.query_selection!r}"
            )
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"options.budget must be >= 1 or null, got {self.budget}")
        if self.request_batch < 1:
            raise ValueError(f"options.request_batch must be >= 1, got {self.request_batch}")


@dataclass
class BlackBoxKDOptions(BlackBoxOptions):
    """Black-box options plus the KD temperature of `blackbox_kd`."""

    temperature: float = 4.0  # KD temperature on the returned probabilities

    def validate(self) -> None:
        """Check the values."""
        super().validate()
        if self.temperature <= 0:
            raise ValueError(f"options.temperature must be > 0, got {self.temperature}")


def make_teacher(cfg: Any, options: BlackBoxOptions, teacher: nn.Module | None, bundle: Any) -> Any:
    """The black-box teacher a run talks to: RemoteTeacher for a URL, else a wrapped local model."""
    if options.teacher_url:
        if teacher is not None:
            raise ConfigError(
                "set either teacher= (local) or options.teacher_url (remote), not both"
            )
        from distillkit.teachers.remote import RemoteTeacher

        key = os.environ.get(options.api_key_env)
        if not key:
            raise ConfigError(
                f"options.teacher_url is set but the API key variable {options.api_key_env} is empty"
            )
        remote = RemoteTeacher(
            options.teacher_url,
            key,
            batch_size=options.request_batch,
            cache_dir=options.cache_dir or str(cfg.run_dir() / "teacher_cache"),
            input_mean=bundle.mean,
            input_std=bundle.std,
            budget=options.budget,
        )
        if remote.num_classes != bundle.num_classes:
            raise ConfigError(
                f"the teacher at {options.teacher_url} answers {remote.num_classes} classes, "
                f"dataset '{bundle.name}' has {bundle.num_classes}"
            )
        return remote
    if teacher is None:
        raise ConfigError(
            f"method '{cfg.method}' needs a teacher: set teacher=RUN_DIR (used as a black box) "
            "or options.teacher_url=http://HOST:PORT"
        )
    model = teacher.model if hasattr(teacher, "model") else teacher
    # a teacher that only gives labels cannot be asked for probabilities
    kind = "hard" if getattr(teacher, "kind", None) == "hard" else options.response
    return BlackBoxTeacher(model, kind=kind, budget=options.budget)


def check_single_process(method: str) -> None:
    """The internal query pools and GAN optimizers are per process: refuse DDP clearly."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError(f"method '{method}' runs in a single process; launch it without torchrun")


def select_queries(features: np.ndarray, size: int, method: str, seed: int) -> np.ndarray:
    """Indices of `size` rows of `features` to spend the budget on (random or kernel thinning)."""
    n = features.shape[0]
    if size >= n:
        return np.arange(n, dtype=np.int64)
    if method == "random":
        return np.sort(np.random.default_rng(seed).choice(n, size, replace=False)).astype(np.int64)
    try:
        from distillkit.data.subset import select
    except ImportError as exc:
        raise RuntimeError(
            "query_selection=kt needs distillkit.data.subset.select (kernel thinning), which this "
            f"install lacks ({exc}); use options.query_selection=random"
        ) from exc
    return np.asarray(
        select(features, size, method="kt", labels=None, per_class=False, seed=seed), dtype=np.int64
    )


def response_target(out: TeacherOutput, kind: str) -> torch.Tensor:
    """What a pool stores per image: log-probabilities (soft) or labels (hard)."""
    if kind != "hard":
        return out.log_probs().float()
    return out.labels.long() if out.labels is not None else out.log_probs().argmax(1)


class BudgetedDistiller(Distiller):
    """Shared machinery: counts every image sent, keeps it in extra state, monitors on edge data."""

    def __init__(
        self, student: nn.Module, teacher: Any, options: BlackBoxOptions, num_classes: int
    ):
        # a local teacher becomes a submodule (moved with the distiller, excluded from state); a
        # RemoteTeacher is a plain object and stays a plain attribute, outside the module tree
        super().__init__(student, teacher)
        self.options = options
        self.num_classes = num_classes
        self.spent = 0  # images sent to the teacher by this run, across resumes

    def query(self, x: torch.Tensor) -> TeacherOutput:
        """Ask the teacher in request-sized chunks; every image counts against the budget."""
        budget = self.options.budget
        if budget is not None and self.spent + x.shape[0] > budget:
            raise BudgetExceededError(
                f"query budget exceeded: {self.spent} used + {x.shape[0]} asked > budget {budget}"
            )
        outs = []
        for start in range(0, x.shape[0], self.options.request_batch):
            chunk = x[start : start + self.options.request_batch]
            outs.append(self.teacher(chunk))
            self.spent += chunk.shape[0]
        fields = {}
        for name in ("logits", "probs", "labels"):
            values = [getattr(o, name) for o in outs]
            if values[0] is not None:
                fields[name] = torch.cat(values).to(x.device)
        return TeacherOutput(**fields)

    def query_all(
        self,
        keys: torch.Tensor,
        images_of: Callable[[torch.Tensor], torch.Tensor],
        target_of: Callable[[TeacherOutput], torch.Tensor],
    ) -> torch.Tensor:
        """Ask the teacher about images_of(part) for every 1024 keys; the targets, on the CPU."""
        with torch.no_grad():
            return torch.cat(
                [target_of(self.query(images_of(part))).cpu() for part in keys.split(1024)]
            )

    def use_edge(self, bundle: Any, seed: int) -> None:
        """Where answers are bought: the edge's images (`bundle.train`), chosen with `seed`."""
        self.edge = bundle.train
        self.mean, self.std = bundle.mean, bundle.std
        self.seed = seed

    def edge_batch(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Normalised edge images by index, unaugmented: the pixels the teacher answered for."""
        return normalize(to_float(self.edge.images[idx.cpu()].to(device)), self.mean, self.std)

    def answer_edge(
        self, size: int, device: torch.device, target_of: Callable[[TeacherOutput], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose `size` edge images (all, if fewer), ask about each once: (indices, targets)."""
        images = self.edge.images  # uint8, N x C x H x W: chosen on their [0, 1] pixels
        feats = images.reshape(len(images), -1).numpy().astype(np.float64) / 255.0
        idx = torch.from_numpy(select_queries(feats, size, self.options.query_selection, self.seed))
        return idx, self.query_all(idx, lambda part: self.edge_batch(part, device), target_of)

    @property
    def remaining(self) -> int | None:
        """Images this run may still send (None: unlimited)."""
        return None if self.options.budget is None else self.options.budget - self.spent

    def monitor_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Student predictions on the edge batch for train_acc, without touching BN statistics."""
        was = self.student.training
        self.student.eval()
        with torch.no_grad():
            logits = self.student(x)
        self.student.train(was)
        return logits

    # -- checkpoint state (the trainer saves it under "extra_state") -----------------------------
    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state to checkpoint (subclasses extend)."""
        return {"spent": self.spent}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of extra_state; tightens the teacher's own budget by what was already spent."""
        self.spent = int(state.get("spent", 0))
        if self.options.budget is not None and hasattr(self.teacher, "budget"):
            self.teacher.budget = max(0, self.options.budget - self.spent) + int(
                getattr(self.teacher, "queries", 0)
            )


class EdgePoolDistiller(BudgetedDistiller):
    """Queries a budget-sized pool of edge images once, then trains on draws from it."""

    def __init__(
        self,
        student: nn.Module,
        teacher: Any,
        options: BlackBoxOptions,
        bundle: Any,
        temperature: float = 4.0,
        seed: int = 0,
    ):
        super().__init__(student, teacher, options, bundle.num_classes)
        self.kind = "hard" if options.response == "hard" or teacher.kind == "hard" else "soft"
        self.temperature = temperature
        self.use_edge(bundle, seed)
        self.pool_idx: torch.Tensor | None = None
        self.pool_t: torch.Tensor | None = None

    def extra_state(self) -> dict[str, Any]:
        """Spent count plus the answered pool."""
        return {**super().extra_state(), "pool_idx": self.pool_idx, "pool_t": self.pool_t}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the pool so a resumed run spends nothing again."""
        super().load_extra_state(state)
        self.pool_idx, self.pool_t = state.get("pool_idx"), state.get("pool_t")

    def draw_pool(self, x: torch.Tensor) -> torch.Tensor:
        """Pool rows for this step: drawn for the global batch, this process's rows kept."""
        if self.pool_idx is None:  # the first step buys the pool, once
            size = len(self.edge) if self.remaining is None else self.remaining
            if size < 1:
                raise BudgetExceededError("no query budget left to build the answered pool")
            target = partial(response_target, kind=self.kind)
            self.pool_idx, self.pool_t = self.answer_edge(size, x.device, target)
        return take_rows(torch.randint(len(self.pool_idx), (draw_size(x),)), x)

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss on a draw from the answered pool; logits on the edge batch for monitoring."""
        x, _, _ = batch
        sel = self.draw_pool(x)
        logits = self.student(self.edge_batch(self.pool_idx[sel], x.device))
        target = self.pool_t[sel].to(x.device)
        if self.kind == "hard":
            losses = {"ce": F.cross_entropy(logits, target)}
        else:
            losses = {"kd": kd_kl(logits, target, self.temperature)}
        return self.monitor_logits(x), losses


@register_method(
    "blackbox_kd",
    options=BlackBoxKDOptions,
    needs_teacher=False,
    description="KD on budget-limited soft answers (probabilities) for the edge's own images",
)
def build_blackbox_kd(cfg, options, student, teacher, bundle) -> EdgePoolDistiller:
    """Registry builder for black-box soft KD."""
    check_single_process("blackbox_kd")
    bb = make_teacher(cfg, options, teacher, bundle)
    if bb.kind != "soft":
        raise ConfigError(
            "blackbox_kd needs soft answers; use blackbox_hard for a hard-label teacher"
        )
    return EdgePoolDistiller(student, bb, options, bundle, options.temperature, cfg.seed)


@dataclass
class HardOptions(BlackBoxOptions):
    """Black-box options with hard answers by default."""

    response: str = "hard"


@register_method(
    "blackbox_hard",
    options=HardOptions,
    needs_teacher=False,
    description="cross-entropy on budget-limited hard answers (labels) for the edge's own images",
)
def build_blackbox_hard(cfg, options, student, teacher, bundle) -> EdgePoolDistiller:
    """Registry builder for hard-label training (any teacher's answers reduced to labels)."""
    check_single_process("blackbox_hard")
    bb = make_teacher(cfg, options, teacher, bundle)
    distiller = EdgePoolDistiller(student, bb, options, bundle, seed=cfg.seed)
    distiller.kind = "hard"
    return distiller
