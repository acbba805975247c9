"""StableKD (Kao, Chen & Chan, arXiv 2312.13223): blockwise distillation, then recomposition.

The paper's public copies hold only its abstract, so the choices below are ours (measured below).

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
features at every boundary and its logits. The groups run in order; a group covering blocks
``a..b`` gets as input the image (``a == 0``) or, at boundary ``a``, by ``block_input``:

- ``anneal`` (default): ``w * student + (1 - w) * connector(teacher)``, ``student`` being the
  student's own feature there (the previous group's output, detached) and ``w`` rising linearly
  with the epoch from 0 (first epoch: pure teacher features, as in the paper) to 1 (the start of
  the end-to-end stage). Blocks learn the teacher's mapping on clean inputs first and are moved
  onto the inputs they get at test time before the groups are merged;
- ``teacher``: the teacher's feature through an input connector (teacher -> student shape), the
  issue's original design. Blocks never see student features until the end-to-end stage, so the
  merged student starts mismatched (BN statistics and weights fitted to teacher features);
- ``student``: the student's own feature (detached). The groups then chain exactly as in the
  plain student (one student forward per batch), i.e. greedy local learning on teacher targets.

Either way the input carries no gradient into earlier blocks: no gradient crosses a group
boundary. Then the group runs the student's blocks ``a..b``:

- a group ending before the head is trained to reproduce the teacher's feature at boundary
  ``b+1``: ``feat_weight * L(out_connector(student feature), teacher feature)``, where ``L`` is
  ``feat_loss``: ``nmse`` (default: squared error divided by each teacher channel's variance
  over the batch, floored at 1% of the mean variance, so every channel and every boundary counts
  about the same whatever its scale) or plain ``mse``;
- the group ending with the head is trained on the teacher's logits: ``(1 - alpha) * T^2 *
  KL(p_t^T || p_s^T)`` plus ``alpha * CE`` when ``alpha > 0`` (``options.temperature`` and
  ``options.alpha``, defaults 4 and 0.1 as in ``kd``), so with ``inner_feat_weight: 0`` the
  last, one-group stage is exactly the ``kd`` method.

``inner_feat_weight`` (default 0) adds ``inner_feat_weight * L`` at the inner boundaries of
merged groups (named ``s2_b0-1_feat1``: stage, group, boundary), the end-to-end stage included.
The returned logits (train accuracy) are the last group's output on its input: the plain student
forward with student inputs or in the end-to-end stage. Test accuracy is the plain student's.

Connectors. ``nn.Identity`` where teacher and student shapes agree at a boundary, else a 1x1 conv
+ BN (resizing the grid) or a linear map, one per direction and boundary; ``out_connector:
always`` gives the output side a learned map even at equal shapes (FitNet's regressor: the
student only has to reproduce the teacher's feature up to a linear map). They live in the
distiller (``in_connectors``, ``out_connectors``), never in the student, so the exported student
(``distiller.student``, the checkpoints' ``model`` entry) is the plain model. They are trained
(their parameters are in the optimizer) while a stage uses them and ignored afterwards.

Optimisation. One optimizer and LR schedule for the whole run (the trainer's): stages do not
restart the learning rate; with the cosine schedule the end-to-end stage is the low-LR tail.

Why these defaults (the paper leaves them open). Fashion-MNIST, resnet8 teacher (89.7%) ->
cnn_small on the first 12,000 training images, 6 epochs, batch 128, lr 0.1 cosine with 1 warm-up
epoch, seeds 0-3 (one GPU; KD reruns in each line vary by +-0.2 from GPU nondeterminism), final
test accuracy, mean +- std; "40%" is StableKD on a random per-class 40% subset:

| variant (block_input, feat_loss, stage epochs) | StableKD | StableKD 40% | KD same call |
|---|---|---|---|
| teacher, mse, 2+2+2 (the original) | 82.03 +- 0.48 | 77.95 | 83.36 |
| teacher, nmse, 2+2+2 | 83.06 +- 0.05 | 78.92 | 83.42 |
| teacher, mse, 1+1+4 | 82.33 +- 0.50 | 79.15 | 83.23 |
| teacher, nmse, 2+2+2, inner_feat_weight 1 | 82.32 +- 0.13 | 78.93 | 83.39 |
| student, nmse, 2+2+2 | 82.09 +- 0.17 | 76.39 | 83.16 |
| student, mse, 2+2+2 | 80.75 +- 0.35 | 75.70 | 83.34 |
| student, nmse, 2+2+2, inner_feat_weight 1 | 80.98 +- 0.32 | 75.80 | 83.45 |
| student, nmse, 2+2+2, out_connector always | 81.68 +- 0.40 | 74.67 | 83.36 |
| student, nmse, 1+1+4 | 81.81 +- 0.73 | 77.23 | 83.29 |
| anneal, mse, 2+2+2 | 81.81 +- 0.65 | 78.53 | 83.51 |
| anneal, nmse, 2+2+2 | 83.50 +- 0.12 | 79.66 | 83.13 |
| **anneal, nmse, 1+1+4** | **83.98 +- 0.53** | **80.25** | 83.52 |

Annealing the inputs and normalising the feature loss each matter (either alone: <= 83.1);
together they end above end-to-end KD, more so with fewer decomposition epochs. Pure student
inputs (greedy local learning) are worst, extra feature losses in merged groups hurt, and
learned output connectors at equal shapes do not help. On digits (resnet20 -> cnn_small) the
blockwise stages cost more than on Fashion-MNIST: see ``configs/digits_stablekd.yaml``.

What to expect. The paper's speed and data claims are not reproduced at this scale: with the
defaults StableKD reaches end-to-end KD's final accuracy only in the last two epochs (5.3 of 6 on
average, 3 of 4 seeds), not in a third of them, and StableKD on 40% of the data (80.3%) stays
about 3 points below KD on 100%, though 3 points above KD on the same 40% (77.3%). While the
inputs are still mostly the teacher's, the plain student tests well below its train accuracy.
With ``stage_epochs`` left empty the stages follow ``epochs``, so resuming with more epochs
re-divides them; give ``stage_epochs`` to pin them.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.errors import ConfigError
from distillkit.methods.base import Batch, Distiller
from distillkit.methods.losses import check_alpha, check_temperature, kd_kl
from distillkit.methods.registry import register_method
from distillkit.models.stagewise import (
    Block,
    Connector,
    even_sizes,
    make_connector,
    pair_blocks,
    split_blocks,
)


@dataclass(frozen=True)
class Stage:
    """One stage of the schedule: its groups of block indices and its number of epochs."""

    index: int
    groups: tuple[tuple[int, ...], ...]
    epochs: int

    def group_name(self, group: tuple[int, ...]) -> str:
        """'s1_b2' for one block, 's2_b0-1' for a merged group (stages count from 1)."""
        a, b = group[0], group[-1]
        return f"s{self.index + 1}_b{a}" if a == b else f"s{self.index + 1}_b{a}-{b}"


def _bounds(sizes: list[int]) -> set[int]:
    return set(accumulate(sizes[:-1]))


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
        sizes = [even_sizes(n, k) for k in blocks_per_stage]
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
        epochs = even_sizes(total_epochs, len(sizes))
    stages = []
    for i, (s, e) in enumerate(zip(sizes, epochs)):
        starts = [0, *accumulate(s)]
        stages.append(Stage(i, tuple(tuple(range(a, b)) for a, b in zip(starts, starts[1:])), e))
    return stages


def stage_of_epoch(epoch: int, stage_epochs: list[int]) -> int:
    """Index of the stage that 0-based ``epoch`` belongs to (the last one past the end)."""
    return min(bisect_right(list(accumulate(stage_epochs)), epoch), len(stage_epochs) - 1)


# the values each string option may take
CHOICES = {
    "block_input": ("student", "teacher", "anneal"),
    "feat_loss": ("nmse", "mse"),
    "out_connector": ("auto", "always"),
}


def feature_loss(student: torch.Tensor, target: torch.Tensor, kind: str = "nmse") -> torch.Tensor:
    """MSE, or MSE divided by each target channel's variance over the batch ('nmse')."""
    s, t = student.float(), target.float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind != "nmse":
        raise ValueError(f"feature loss must be one of {CHOICES['feat_loss']}, got {kind!r}")
    # channels: dim 1 of maps (N, C, ...) and vectors (N, D), the last dim of tokens (N, L, D)
    dims = tuple(d for d in range(t.dim()) if d != (t.dim() - 1 if t.dim() == 3 else 1))
    var = t.var(dim=dims, keepdim=True, unbiased=False)
    # a channel that is (nearly) constant over the batch, e.g. a dead ReLU, must not dominate
    var = var.clamp_min(1e-2 * float(var.mean()) + 1e-8)
    return ((s - t).pow(2) / var).mean()


@dataclass
class StableKDOptions:
    """Options of `method: stablekd` (the `options:` mapping of a config)."""

    blocks_per_stage: list[int] = field(default_factory=lambda: [4, 2, 1])
    stages: list[list[int]] = field(default_factory=list)  # explicit sizes; overrides the above
    stage_epochs: list[int] = field(default_factory=list)  # empty: epochs split evenly
    feat_weight: float = 1.0
    block_input: str = "anneal"  # anneal | teacher | student (module doc)
    feat_loss: str = "nmse"  # nmse (per-channel normalised) | mse
    inner_feat_weight: float = 0.0  # feature losses at the inner boundaries of merged groups
    out_connector: str = "auto"  # auto (identity for equal shapes) | always (learned 1x1 map)
    temperature: float = 4.0  # of the KD term on the logits
    alpha: float = 0.1  # weight of cross-entropy there; the KD term gets 1 - alpha

    def validate(self) -> None:
        """Checks that do not need the run's epochs (those happen when the method is built)."""
        check_temperature(self.temperature)
        check_alpha(self.alpha)
        sizes = stage_sizes(self.blocks_per_stage, self.stages)
        if self.stage_epochs:
            if any(e < 1 for e in self.stage_epochs):
                raise ValueError(
                    f"options.stage_epochs: every stage needs >= 1 epoch, got {self.stage_epochs}"
                )
            build_schedule(sizes, self.stage_epochs, sum(self.stage_epochs))
        for key in ("feat_weight", "inner_feat_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"options.{key}: must be >= 0, got {getattr(self, key)}")
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"options.{key}: one of {choices}, got {getattr(self, key)!r}")


class StableKD(Distiller):
    """Decomposition into paired blocks, then recomposition toward end-to-end KD (module doc)."""

    # a stage leaves the connectors of other stages (and, merged, inner ones) without gradient
    ddp_find_unused_parameters = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        schedule: list[Stage],
        input_shape: tuple[int, ...],
        temperature: float = 4.0,
        alpha: float = 0.1,
        feat_weight: float = 1.0,
        block_input: str = "anneal",
        feat_loss: str = "nmse",
        inner_feat_weight: float = 0.0,
        out_connector: str = "auto",
    ):
        super().__init__(student, teacher)
        given = {"block_input": block_input, "feat_loss": feat_loss, "out_connector": out_connector}
        for key, value in given.items():
            if value not in CHOICES[key]:
                raise ValueError(f"{key} must be one of {CHOICES[key]}, got {value!r}")
        self.block_input = block_input
        self.feat_loss = feat_loss
        self.inner_feat_weight = inner_feat_weight
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
        self._t_blocks: list[Block] = pairing.teacher  # lists: not registered as submodules
        self._s_blocks: list[Block] = pairing.student
        self.in_connectors = nn.ModuleDict()  # boundary k: teacher feature -> student input
        self.out_connectors = nn.ModuleDict()  # boundary k: student feature -> teacher target
        for k, (ts, ss) in enumerate(zip(pairing.teacher_shapes, pairing.student_shapes), 1):
            self.in_connectors[str(k)] = make_connector(ts, ss)
            self.out_connectors[str(k)] = (
                Connector(ss, ts) if out_connector == "always" else make_connector(ss, ts)
            )
        # the stage index: a buffer so checkpoints record it, mirrored in a python int so the
        # training step never waits on the device to read it
        self.register_buffer("stage", torch.tensor(-1, dtype=torch.long))
        self._stage_index = -1
        self._epoch = 0

    # -- schedule ------------------------------------------------------------------------------
    @property
    def stage_epochs(self) -> list[int]:
        """Epochs of every stage."""
        return [s.epochs for s in self.schedule]

    def set_stage(self, index: int) -> None:
        """Train the stage ``index`` from the next step on."""
        if not 0 <= index < len(self.schedule):
            raise ValueError(f"stage must be in [0, {len(self.schedule)}), got {index}")
        self.stage.fill_(index)
        self._stage_index = index
        self._epoch = sum(self.stage_epochs[:index])

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before every epoch: pick the stage, refresh both models' blocks."""
        # both may have been rebuilt in place since the split (the student's BN converted to
        # SyncBatchNorm, the frozen teacher's BN folded into its convs): split them again, so no
        # block runs a module its model no longer calls
        self._s_blocks = split_blocks(self.student, self.num_blocks)
        self._t_blocks = split_blocks(getattr(self.teacher, "model", self.teacher), self.num_blocks)
        self.set_stage(stage_of_epoch(epoch, self.stage_epochs))
        self._epoch = epoch

    @property
    def student_input_share(self) -> float:
        """Weight of the student's own feature in a group's input (1 - that of the teacher's)."""
        if self.block_input == "student":
            return 1.0
        if self.block_input == "teacher":
            return 0.0
        # anneal: linear over the epochs before the end-to-end stage, reaching 1 at its start
        before = sum(self.stage_epochs[:-1])
        return min(1.0, self._epoch / before) if before else 1.0

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
        if self._stage_index < 0:
            raise RuntimeError(
                "stablekd: no stage set; the trainer must call on_epoch_start(epoch) before each "
                "epoch (or call set_stage(i))"
            )
        stage = self.schedule[self._stage_index]
        t_logits, t_feats = self.teacher_features(x)
        share = self.student_input_share
        losses: dict[str, torch.Tensor] = {}
        logits = None
        prev: torch.Tensor | None = None  # the previous group's output: the student's feature
        for group in stage.groups:
            a, b = group[0], group[-1]
            tag = stage.group_name(group)
            if a == 0:
                h = x
            else:
                assert prev is not None
                own = prev.detach()  # no gradient crosses a group boundary
                if share >= 1.0:
                    h = own
                else:
                    conn = self.in_connectors[str(a)]
                    t_in = t_feats[a - 1]
                    t_in = t_in.clone() if isinstance(conn, nn.Identity) else conn(t_in)
                    h = t_in if share <= 0.0 else share * own + (1.0 - share) * t_in
            for i in group:
                h = self._s_blocks[i].module(h)
                if i != b and self.inner_feat_weight > 0:
                    losses[f"{tag}_feat{i + 1}"] = self.inner_feat_weight * self._feat_term(
                        h, t_feats, i + 1
                    )
            prev = h
            if b == self.num_blocks - 1:
                logits = h
                t_log_probs = torch.log_softmax(t_logits.float(), dim=1)
                losses[f"{tag}_kd"] = (1.0 - self.alpha) * kd_kl(h, t_log_probs, self.temperature)
                if self.alpha > 0:
                    losses[f"{tag}_ce"] = self.alpha * F.cross_entropy(h, y)
            else:
                losses[f"{tag}_feat"] = self.feat_weight * self._feat_term(h, t_feats, b + 1)
        assert logits is not None
        return logits, losses

    def _feat_term(self, h: torch.Tensor, t_feats: list[torch.Tensor], k: int) -> torch.Tensor:
        """Feature loss of the student's feature ``h`` at boundary ``k`` against the teacher's."""
        return feature_loss(self.out_connectors[str(k)](h), t_feats[k - 1], self.feat_loss)


@register_method(
    "stablekd",
    options=StableKDOptions,
    description="StableKD: blockwise distillation on teacher features, merged back to end-to-end KD",
)
def build(cfg, options: StableKDOptions, student, teacher, bundle) -> StableKD:
    """Registry builder: schedule, temperature and alpha from the options, epochs from the run."""
    sizes = stage_sizes(options.blocks_per_stage, options.stages)
    kwargs = asdict(options)  # the options besides the schedule's are StableKD's arguments
    for key in ("blocks_per_stage", "stages", "stage_epochs"):
        del kwargs[key]
    try:
        schedule = build_schedule(sizes, options.stage_epochs, cfg.epochs)
        shape = (bundle.in_channels, bundle.image_size, bundle.image_size)
        return StableKD(student, teacher, schedule, shape, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"stablekd: {exc}") from None
