"""StableKD (Kao, Chen & Chan, arXiv 2312.13223): blockwise distillation, then recomposition.

The paper's public copies hold only its abstract, so the choices below are ours (METHODS.md).

Blocks. Teacher and student are split into ``n`` paired blocks (``models/stagewise.py``: stem
merged into the first stage, head alone, stages divided evenly; ``n`` = the first entry of the
schedule, 4 by default). Boundary ``k`` (k = 1..n-1) is the output of block ``k-1`` = the input
of block ``k``.

Schedule. A list of stages, each a partition of the ``n`` blocks into contiguous groups, every
stage merging neighbouring groups of the previous one and the last being one group (end-to-end).
``blocks_per_stage: [4, 2, 1]`` splits evenly (4 -> [1,1,1,1], 2 -> [2,2], 1 -> [4]);
``stages: [[1,1,1,1], [2,2], [4]]`` gives the group sizes explicitly. ``stage_epochs`` gives each
stage's epochs and must sum to the run's ``epochs`` (empty: ``epochs`` divided evenly, earlier
stages taking the remainder). The stage is derived from the epoch the trainer announces through
``on_epoch_start(epoch)`` and is stored in the ``stage`` buffer, so checkpoints record it; the
loss names carry it (``s1_b0_feat``, ``s2_b2-3_kd``, ``s3_b0-3_ce``), so every metrics row names
its stage and groups.

Per batch. The teacher runs once, without gradients, block by block (its own modules), giving its
features at every boundary and its logits. A group covering blocks ``a..b`` gets as input the
image (``a == 0``) or the teacher's feature at boundary ``a`` through an input connector
(teacher -> student shape; these inputs carry no gradient, so no gradient crosses a group
boundary), and runs the student's blocks ``a..b``:

- a group ending before the head is trained to reproduce the teacher's feature at boundary
  ``b+1``: ``feat_weight * MSE(out_connector(student feature), teacher feature)``;
- the group ending with the head is trained on the teacher's logits:
  ``(1 - alpha) * T^2 * KL(p_t^T || p_s^T)`` plus ``alpha * CE`` when ``alpha > 0`` (the config's
  ``temperature`` and ``alpha``), so the last, one-group stage is exactly the ``kd`` method.

Inner boundaries of a merged group are not supervised: merging is what lets the blocks adapt to
each other again. The returned logits (train accuracy) are the last group's output: on teacher
features before the final stage, the plain student forward in it. Test accuracy is always that of
the plain student.

Connectors. ``nn.Identity`` where teacher and student shapes agree at a boundary, else a 1x1 conv
+ BN (resizing the grid) or a linear map, one per direction and boundary. They live in the
distiller (``in_connectors``, ``out_connectors``), never in the student, so the exported student
(``distiller.student``, the checkpoints' ``model`` entry) is the plain model. They are trained
(their parameters are in the optimizer) while a stage uses them and ignored afterwards.

Optimisation. One optimizer and LR schedule for the whole run (the trainer's): stages do not
restart the learning rate; with the cosine schedule the end-to-end stage is the low-LR tail.

What to expect. Before the last stage each block is only ever run on the teacher's features, so
the plain student (blocks chained on their own outputs, BN statistics gathered on teacher
features) can test far below its train accuracy until the groups are merged: on digits
(resnet20 -> cnn_small, 10+10+10 epochs) its test accuracy is ~10-20% in stage 1, ~20-60% in
stage 2 and ~97% at the end (end-to-end KD: ~99%). With ``stage_epochs`` left empty the stages
follow ``epochs``, so resuming with more epochs re-divides them; give ``stage_epochs`` to pin them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.methods.base import Batch, Distiller
from distillkit.methods.losses import kd_kl
from distillkit.methods.registry import register_method
from distillkit.models.stagewise import Block, make_connector, pair_blocks, split_blocks


@dataclass(frozen=True)
class Stage:
    """One stage of the schedule: its groups of block indices and its number of epochs."""

    index: int
    groups: tuple[tuple[int, ...], ...]
    epochs: int

    @property
    def name(self) -> str:
        """'s1', 's2', ... (1-based, as in the loss names)."""
        return f"s{self.index + 1}"

    def group_name(self, group: tuple[int, ...]) -> str:
        """'s1_b2' for one block, 's2_b0-1' for a merged group."""
        a, b = group[0], group[-1]
        return f"{self.name}_b{a}" if a == b else f"{self.name}_b{a}-{b}"


def _even_sizes(n: int, k: int) -> list[int]:
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _bounds(sizes: list[int]) -> set[int]:
    out, pos = set(), 0
    for s in sizes[:-1]:
        pos += s
        out.add(pos)
    return out


def stage_sizes(
    blocks_per_stage: list[int] | None = None, stages: list[list[int]] | None = None
) -> list[list[int]]:
    """Group sizes of every stage, checked: each stage merges neighbours of the previous one."""
    if stages:
        sizes = [list(s) for s in stages]
        key = "options.stages"
    else:
        if not blocks_per_stage:
            raise ValueError("options.blocks_per_stage: give at least one stage, e.g. [4, 2, 1]")
        if any(k < 1 for k in blocks_per_stage):
            raise ValueError(
                f"options.blocks_per_stage: entries must be >= 1, got {blocks_per_stage}"
            )
        n = blocks_per_stage[0]
        if any(k > n for k in blocks_per_stage):
            raise ValueError(
                f"options.blocks_per_stage: no stage may have more blocks than the first "
                f"({n}), got {blocks_per_stage}"
            )
        sizes = [_even_sizes(n, k) for k in blocks_per_stage]
        key = "options.blocks_per_stage"
    if any(not s or any(v < 1 for v in s) for s in sizes):
        raise ValueError(f"{key}: every stage needs group sizes >= 1, got {sizes}")
    n = sum(sizes[0])
    for i, s in enumerate(sizes):
        if sum(s) != n:
            raise ValueError(
                f"{key}: stage {i + 1} covers {sum(s)} blocks but the first covers {n}: {sizes}"
            )
        if i and not _bounds(s) <= _bounds(sizes[i - 1]):
            raise ValueError(
                f"{key}: stage {i + 1} {s} does not merge neighbouring groups of stage {i} "
                f"{sizes[i - 1]} (its boundaries must be a subset); give options.stages "
                "explicitly, e.g. [[1,1,1,1],[2,2],[4]]"
            )
    if len(sizes[-1]) != 1:
        raise ValueError(
            f"{key}: the last stage must be end-to-end (one group of all {n} blocks), got "
            f"{sizes[-1]}"
        )
    return sizes


def build_schedule(
    sizes: list[list[int]], stage_epochs: list[int] | None, total_epochs: int
) -> list[Stage]:
    """Stages from group sizes; ``stage_epochs`` must sum to ``total_epochs`` (empty: split)."""
    if stage_epochs:
        if len(stage_epochs) != len(sizes):
            raise ValueError(
                f"options.stage_epochs has {len(stage_epochs)} entries but the schedule has "
                f"{len(sizes)} stages {sizes}"
            )
        if sum(stage_epochs) != total_epochs:
            raise ValueError(
                f"options.stage_epochs {stage_epochs} sums to {sum(stage_epochs)} but epochs is "
                f"{total_epochs}; set epochs={sum(stage_epochs)} or change stage_epochs"
            )
        epochs = list(stage_epochs)
    else:
        if total_epochs < len(sizes):
            raise ValueError(
                f"epochs={total_epochs} is fewer than the {len(sizes)} stages of the schedule"
            )
        epochs = _even_sizes(total_epochs, len(sizes))
    stages = []
    for i, (s, e) in enumerate(zip(sizes, epochs)):
        groups, pos = [], 0
        for size in s:
            groups.append(tuple(range(pos, pos + size)))
            pos += size
        stages.append(Stage(i, tuple(groups), e))
    return stages


def stage_of_epoch(epoch: int, stage_epochs: list[int]) -> int:
    """Index of the stage that 0-based ``epoch`` belongs to (the last one past the end)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    end = 0
    for i, e in enumerate(stage_epochs):
        end += e
        if epoch < end:
            return i
    return len(stage_epochs) - 1


@dataclass
class StableKDOptions:
    """Options of `method: stablekd` (the `options:` mapping of a config)."""

    blocks_per_stage: list[int] = field(default_factory=lambda: [4, 2, 1])
    stages: list[list[int]] = field(default_factory=list)  # explicit sizes; overrides the above
    stage_epochs: list[int] = field(default_factory=list)  # empty: epochs split evenly
    feat_weight: float = 1.0

    def validate(self) -> None:
        """Checks that do not need the run's epochs (those happen when the method is built)."""
        sizes = stage_sizes(self.blocks_per_stage, self.stages)
        if self.stage_epochs:
            if any(e < 1 for e in self.stage_epochs):
                raise ValueError(
                    f"options.stage_epochs: every stage needs >= 1 epoch, got {self.stage_epochs}"
                )
            build_schedule(sizes, self.stage_epochs, sum(self.stage_epochs))
        if self.feat_weight < 0:
            raise ValueError(f"options.feat_weight: must be >= 0, got {self.feat_weight}")


class StableKD(Distiller):
    """Decomposition into paired blocks, then recomposition toward end-to-end KD (module doc)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        schedule: list[Stage],
        input_shape: tuple[int, ...],
        temperature: float = 4.0,
        alpha: float = 0.1,
        feat_weight: float = 1.0,
    ):
        super().__init__(student, teacher)
        kind = getattr(teacher, "kind", "white-box")
        if kind != "white-box":
            raise ValueError(
                f"stablekd needs a white-box teacher (its features), got a {kind!r} one"
            )
        self.schedule = schedule
        self.temperature = temperature
        self.alpha = alpha
        self.feat_weight = feat_weight
        self.num_blocks = sum(len(g) for g in schedule[0].groups)
        t_model = getattr(teacher, "model", teacher)
        pairing = pair_blocks(t_model, student, self.num_blocks, input_shape)
        self.pairing_text = pairing.describe()
        self._t_blocks: list[Block] = pairing.teacher  # lists: not registered as submodules
        self._s_blocks: list[Block] = pairing.student
        self.in_connectors = nn.ModuleDict()  # boundary k: teacher feature -> student input
        self.out_connectors = nn.ModuleDict()  # boundary k: student feature -> teacher target
        for k, (ts, ss) in enumerate(zip(pairing.teacher_shapes, pairing.student_shapes), 1):
            self.in_connectors[str(k)] = make_connector(ts, ss)
            self.out_connectors[str(k)] = make_connector(ss, ts)
        # the stage index: a buffer so checkpoints record it, mirrored in a python int so the
        # training step never waits on the device to read it
        self.register_buffer("stage", torch.tensor(-1, dtype=torch.long))
        self._stage_index = -1

    # -- schedule ------------------------------------------------------------------------------
    @property
    def stage_epochs(self) -> list[int]:
        """Epochs of every stage."""
        return [s.epochs for s in self.schedule]

    def stage_of_epoch(self, epoch: int) -> int:
        """Index of the stage that 0-based ``epoch`` belongs to."""
        return stage_of_epoch(epoch, self.stage_epochs)

    def set_stage(self, index: int) -> None:
        """Train the stage ``index`` from the next step on."""
        if not 0 <= index < len(self.schedule):
            raise ValueError(f"stage must be in [0, {len(self.schedule)}), got {index}")
        self.stage.fill_(index)
        self._stage_index = index

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before every epoch: pick the stage, refresh the student blocks."""
        # the student may have been rebuilt in place (SyncBatchNorm conversion): re-split it
        self._s_blocks = split_blocks(self.student, self.num_blocks)
        self.set_stage(self.stage_of_epoch(epoch))

    @property
    def current_stage(self) -> Stage:
        """The stage being trained."""
        index = self._stage_index
        if index < 0:
            raise RuntimeError(
                "stablekd: no stage set; the trainer must call on_epoch_start(epoch) before each "
                "epoch (or call set_stage(i))"
            )
        return self.schedule[index]

    # -- step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's logits and its features at the inner boundaries (no gradients)."""
        feats, h = [], x
        for i, block in enumerate(self._t_blocks):
            h = block.module(h)
            if i < len(self._t_blocks) - 1:
                feats.append(h.clone())  # a later block may work in place
        if hasattr(self.teacher, "queries"):
            self.teacher.queries += x.shape[0]
        return h, feats

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Losses of the current stage's groups; see the module doc."""
        x, y, _ = batch
        stage = self.current_stage
        t_logits, t_feats = self.teacher_features(x)
        losses: dict[str, torch.Tensor] = {}
        logits = None
        used: set[str] = set()
        for group in stage.groups:
            a, b = group[0], group[-1]
            tag = stage.group_name(group)
            if a == 0:
                h = x
            else:
                conn = self.in_connectors[str(a)]
                t_in = t_feats[a - 1]
                h = t_in.clone() if isinstance(conn, nn.Identity) else conn(t_in)
                used.add(f"in{a}")
            for i in group:
                h = self._s_blocks[i].module(h)
            if b == self.num_blocks - 1:
                logits = h
                t_log_probs = torch.log_softmax(t_logits.float(), dim=1)
                losses[f"{tag}_kd"] = (1.0 - self.alpha) * kd_kl(h, t_log_probs, self.temperature)
                if self.alpha > 0:
                    losses[f"{tag}_ce"] = self.alpha * F.cross_entropy(h, y)
            else:
                s_out = self.out_connectors[str(b + 1)](h)
                used.add(f"out{b + 1}")
                target = t_feats[b]
                losses[f"{tag}_feat"] = self.feat_weight * F.mse_loss(s_out.float(), target.float())
        assert logits is not None
        self._touch_unused(losses, used)
        return logits, losses

    def _touch_unused(self, losses: dict[str, torch.Tensor], used: set[str]) -> None:
        """Under DDP every parameter must get a gradient: add 0 * (unused connectors)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        zero = None
        for prefix, conns in (("in", self.in_connectors), ("out", self.out_connectors)):
            for k, conn in conns.items():
                if f"{prefix}{k}" in used:
                    continue
                for p in conn.parameters():
                    term = p.sum() * 0.0
                    zero = term if zero is None else zero + term
        if zero is not None:
            first = next(iter(losses))
            losses[first] = losses[first] + zero


@register_method(
    "stablekd",
    options=StableKDOptions,
    description="StableKD: blockwise distillation on teacher features, merged back to end-to-end KD",
)
def build(cfg, options: StableKDOptions, student, teacher, bundle) -> StableKD:
    """Registry builder: schedule from the options, T and alpha from the config."""
    from distillkit.config import ConfigError

    sizes = stage_sizes(options.blocks_per_stage, options.stages)
    try:
        schedule = build_schedule(sizes, options.stage_epochs, cfg.epochs)
        shape = (bundle.in_channels, bundle.image_size, bundle.image_size)
        return StableKD(
            student,
            teacher,
            schedule,
            shape,
            temperature=cfg.temperature,
            alpha=cfg.alpha,
            feat_weight=options.feat_weight,
        )
    except ValueError as exc:
        raise ConfigError(f"stablekd: {exc}") from None
