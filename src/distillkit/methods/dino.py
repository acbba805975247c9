"""DINO self-distillation (Caron et al., ICCV 2021), written on tensors: config, loss, method.

Pieces: the run config (models, heads, views, loss and evaluation settings), the DINO loss over
every student/teacher view pair except identical views, output centering, the EMA teacher update,
and `DINO`, the method for one or more independent models. `methods/mokd.py` extends it with
cross-distillation between two models; heads and networks are in `methods/ssl_heads.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.config import ConfigError, _build, read_config_data
from distillkit.data.datasets import DataBundle
from distillkit.data.loader import derive_seed
from distillkit.methods.ssl_heads import (
    DINOHead,
    SSLBackbone,
    SSLMember,
    SSLNetwork,
    TransformerHead,
)
from distillkit.models import build_model

# --------------------------------------------------------------------------- config

# The whole SSL run's config for now: its run-level keys (dataset, epochs, seed, device, out_dir)
# belong to RunConfig and the rest to the method's options once DINO runs on the one Trainer.


@dataclass
class SSLModelConfig:
    """One model of an SSL run and its optimisation recipe."""

    name: str = "resnet20"
    kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"  # sgd | adamw (paper: SGD for the CNN, AdamW for the ViT)
    lr: float = 0.03
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_end: float | None = None  # cosine wd schedule end; None: constant
    warmup_epochs: float = 0.0
    grad_clip: float | None = 3.0
    freeze_last_layer: int = 0  # epochs during which the heads' last layers stay fixed
    ema_momentum: float = 0.996  # teacher momentum, cosine to 1.0
    cross_weight: float = 1.0  # MOKD lambda (paper: 1.0 for the CNN, 0.1 for the ViT)
    token_layer: str = "auto"  # tokens for the T-head: ViT final norm, else last hook layer
    norm_last_layer: bool = True
    # BatchNorm in this model's head and T-head hidden layers; None: the run's `head_bn`
    head_bn: bool | None = None
    # DINO's linear scaling rule: `lr` and `min_lr` are per 256 images of the global batch
    scale_lr: bool = False

    def effective_lr(self, batch_size: int) -> tuple[float, float]:
        """(base lr, final lr) for a global batch, after the optional batch/256 scaling."""
        scale = batch_size / 256 if self.scale_lr else 1.0
        return self.lr * scale, self.min_lr * scale


@dataclass
class SSLConfig:
    """A DINO (one model: `a`) or MOKD (two models: `a` and `b`) run."""

    name: str = "ssl"
    method: str = "dino"  # dino | mokd
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    max_train_samples: int | None = None  # train on a fixed random subset (smoke runs)
    a: SSLModelConfig = field(default_factory=SSLModelConfig)
    b: SSLModelConfig | None = None
    # heads
    out_dim: int = 4096
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_layers: int = 3
    head_bn: bool = False  # BatchNorm in the head's hidden layers (DINO's use_bn_in_head)
    thead: bool = False  # dino only: also self-distil a T-head (always on for mokd)
    thead_width: int = 384
    thead_depth: int = 3
    thead_heads: int = 6
    thead_mlp_ratio: float = 4.0
    # T-head output: 0 = bare weight-normed linear on the pooled token; >= 1 = a DINO projection
    # head of that many layers (head_hidden / head_bottleneck / head_bn, like the main head)
    thead_head_layers: int = 0
    # DINO loss
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    # multi-crop
    global_crops_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.25])
    local_crops_number: int = 8
    global_size: int | None = None  # default: the dataset's image size
    local_size: int | None = None  # default: 3/7 of the global size (96/224 in DINO)
    jitter: float = 0.4
    blur: bool = True
    solarize: bool = True
    # loop
    epochs: int = 100
    batch_size: int = 64  # global batch: split over processes under torchrun
    # evaluation of each EMA teacher's frozen features
    eval_every: int = 1  # epochs between evaluations; 0: only after the last epoch
    eval_batch_size: int = 512
    eval_train_samples: int | None = None  # k-NN bank / probe training set: a fixed random subset
    eval_test_samples: int | None = None  # evaluate on a fixed random subset of the test split
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_steps: int = 100
    probe_l2: float = 1e-4
    # engine
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    out_dir: str | None = None
    quiet: bool = False
    save_every: int = 1

    def run_dir(self) -> Path:
        """Directory this run writes to."""
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for YAML/JSON."""
        return dataclasses.asdict(self)

    def member_configs(self) -> dict[str, SSLModelConfig]:
        """The models of this run by member name."""
        out = {"a": self.a}
        if self.b is not None:
            out["b"] = self.b
        return out

    def crop_sizes(self, image_size: int) -> tuple[int, int]:
        """(global, local) view sizes for images of side `image_size`."""
        g = self.global_size or image_size
        local = self.local_size or max(2, round(g * 96 / 224))
        return g, local


def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}, got {value!r}")


def validate_ssl_config(cfg: SSLConfig) -> None:
    """Raise ConfigError naming the first bad key."""
    from distillkit.data.datasets import list_datasets
    from distillkit.models import list_models

    _check(cfg.method in ("dino", "mokd"), "method", "choose from ('dino', 'mokd')", cfg.method)
    if cfg.method == "mokd" and cfg.b is None:
        raise ConfigError("method 'mokd' trains two models: set `b` (e.g. b.name=vit_tiny)")
    if cfg.method == "dino" and cfg.b is not None:
        raise ConfigError("config key 'b': method 'dino' trains one model (`a`); use method=mokd")
    _check(cfg.dataset in list_datasets(), "dataset", f"choose from {list_datasets()}", cfg.dataset)
    for name, m in cfg.member_configs().items():
        if m.name not in list_models():
            close = difflib.get_close_matches(m.name, list_models(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config key '{name}.name': unknown model {m.name!r}{hint}")
        _check(
            m.optimizer in ("sgd", "adamw"),
            f"{name}.optimizer",
            "choose from ('sgd', 'adamw')",
            m.optimizer,
        )
        _check(m.lr > 0, f"{name}.lr", "must be > 0", m.lr)
        _check(
            0.0 <= m.ema_momentum <= 1.0,
            f"{name}.ema_momentum",
            "must be in [0, 1]",
            m.ema_momentum,
        )
        _check(m.cross_weight >= 0, f"{name}.cross_weight", "must be >= 0", m.cross_weight)
        _check(
            m.grad_clip is None or m.grad_clip > 0,
            f"{name}.grad_clip",
            "must be > 0 or null",
            m.grad_clip,
        )
    for key in (
        "out_dim",
        "head_hidden",
        "head_bottleneck",
        "head_layers",
        "thead_width",
        "thead_depth",
        "thead_heads",
        "epochs",
        "batch_size",
        "eval_batch_size",
        "knn_k",
        "probe_steps",
    ):
        _check(getattr(cfg, key) > 0, key, "must be > 0", getattr(cfg, key))
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp", "knn_temperature"):
        _check(getattr(cfg, key) > 0, key, "must be > 0", getattr(cfg, key))
    _check(
        cfg.thead_head_layers >= 0,
        "thead_head_layers",
        "must be >= 0",
        cfg.thead_head_layers,
    )
    _check(
        cfg.thead_width % cfg.thead_heads == 0,
        "thead_width",
        f"must be divisible by thead_heads={cfg.thead_heads}",
        cfg.thead_width,
    )
    _check(
        0.0 <= cfg.center_momentum <= 1.0,
        "center_momentum",
        "must be in [0, 1]",
        cfg.center_momentum,
    )
    _check(
        cfg.local_crops_number >= 0, "local_crops_number", "must be >= 0", cfg.local_crops_number
    )
    _check(cfg.eval_every >= 0, "eval_every", "must be >= 0", cfg.eval_every)
    for key in ("global_crops_scale", "local_crops_scale"):
        v = getattr(cfg, key)
        _check(
            len(v) == 2 and 0 < v[0] <= v[1] <= 1,
            key,
            "must be [low, high] with 0 < low <= high <= 1",
            v,
        )
    for key in (
        "global_size",
        "local_size",
        "max_train_samples",
        "image_size",
        "eval_train_samples",
        "eval_test_samples",
    ):
        v = getattr(cfg, key)
        _check(v is None or v > 0, key, "must be > 0 or null", v)


def ssl_config_from_dict(data: dict[str, Any]) -> SSLConfig:
    """Build and validate an SSLConfig; unknown keys are errors that name the key."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"a config must be a mapping of keys to values, got {type(data).__name__}"
        )
    cfg = _build(SSLConfig, data)
    validate_ssl_config(cfg)
    return cfg


def load_ssl_config(path: str | Path | None, overrides: list[str] | None = None) -> SSLConfig:
    """Read a YAML SSL config (or none: defaults) and apply `key=value` overrides."""
    return ssl_config_from_dict(read_config_data(path, overrides))


# --------------------------------------------------------------------------- building


def build_member(
    cfg: SSLConfig, mcfg: SSLModelConfig, bundle: DataBundle, with_thead: bool
) -> SSLMember:
    """Student network (backbone, head, optional T-head) and its EMA teacher."""
    global_size, _ = cfg.crop_sizes(bundle.image_size)
    model = build_model(
        mcfg.name,
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=global_size,
        **mcfg.kwargs,
    )
    backbone = SSLBackbone(model, mcfg.token_layer, probe_size=global_size)
    head_bn = cfg.head_bn if mcfg.head_bn is None else mcfg.head_bn
    head = DINOHead(
        backbone.embed_dim,
        cfg.out_dim,
        cfg.head_hidden,
        cfg.head_bottleneck,
        cfg.head_layers,
        mcfg.norm_last_layer,
        head_bn,
    )
    thead = None
    if with_thead:
        thead = TransformerHead(
            backbone.token_dim,
            cfg.out_dim,
            cfg.thead_width,
            cfg.thead_depth,
            cfg.thead_heads,
            cfg.thead_mlp_ratio,
            backbone.probe_grid,
            mcfg.norm_last_layer,
            cfg.thead_head_layers,
            cfg.head_hidden,
            cfg.head_bottleneck,
            head_bn,
        )
    return SSLMember(SSLNetwork(backbone, head, thead), cfg.out_dim, mcfg.cross_weight)


def build_members(cfg: SSLConfig, bundle: DataBundle, with_thead: bool) -> dict[str, SSLMember]:
    """Every model of the run, initialised from cfg.seed (each member its own stream)."""
    members = {}
    for i, (name, mcfg) in enumerate(cfg.member_configs().items()):
        torch.manual_seed(derive_seed(cfg.seed, 1000 + i))
        members[name] = build_member(cfg, mcfg, bundle, with_thead=with_thead)
    return members


def build_dino(cfg: SSLConfig, bundle: DataBundle) -> DINO:
    """The DINO method of a `method: dino` run (a T-head only with `thead: true`)."""
    members = build_members(cfg, bundle, with_thead=cfg.thead)
    return DINO(members, cfg.student_temp, cfg.center_momentum, use_thead=cfg.thead)


# --------------------------------------------------------------------------- loss, centering, EMA


def dino_loss(
    student_out: Sequence[torch.Tensor],
    teacher_out: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Mean over pairs (student view v, teacher global view t), v != t, of the batch-mean CE.

    Teacher view t is the same crop as student view t (global views come first in both lists).
    """
    total = student_out[0].new_zeros(())
    n_terms = 0
    for t, tout in enumerate(teacher_out):
        q = F.softmax((tout.detach() - center) / teacher_temp, dim=-1)
        for v, sout in enumerate(student_out):
            if v == t:
                continue
            total = (
                total + torch.sum(-q * F.log_softmax(sout / student_temp, dim=-1), dim=-1).mean()
            )
            n_terms += 1
    if n_terms == 0:
        raise ValueError("the DINO loss needs at least two views")
    return total / n_terms


def soft_cross_entropy(
    student: torch.Tensor, target: torch.Tensor, student_temp: float, teacher_temp: float
) -> torch.Tensor:
    """Batch-mean CE between softmax(target / teacher_temp) and softmax(student / student_temp)."""
    q = F.softmax(target.detach() / teacher_temp, dim=-1)
    return torch.sum(-q * F.log_softmax(student / student_temp, dim=-1), dim=-1).mean()


@torch.no_grad()
def updated_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """center * m + batch_mean * (1 - m)."""
    return center * momentum + batch_mean * (1.0 - momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, parameter by parameter (buffers are the teacher's own)."""
    for pt, ps in zip(teacher.parameters(), student.parameters(), strict=True):
        pt.mul_(momentum).add_(ps.detach(), alpha=1.0 - momentum)


Reducer = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class DINO(nn.Module):
    """DINO self-distillation for each model independently (one model: plain DINO)."""

    def __init__(
        self,
        members: dict[str, SSLMember],
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        use_thead: bool = False,
    ) -> None:
        super().__init__()
        self.members = nn.ModuleDict(members)
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.use_thead = use_thead
        # sums a tensor over ranks; the trainer swaps in torch.distributed under torchrun
        self.reduce: Reducer = _identity
        self.world_size = 1

    def names(self) -> list[str]:
        """Member names in a fixed order."""
        return list(self.members.keys())

    def _batch_mean(self, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        cat = torch.cat([o.detach().float() for o in outs])
        return self.reduce(cat.sum(0, keepdim=True)) / (cat.shape[0] * self.world_size)

    def _set_center(self, member: SSLMember, name: str, outs: Sequence[torch.Tensor]) -> None:
        batch_mean = self._batch_mean(outs)
        setattr(
            member, name, updated_center(getattr(member, name), batch_mean, self.center_momentum)
        )

    def forward_all(self, views: Sequence[torch.Tensor]) -> dict[str, tuple[dict, dict]]:
        """(student outputs on all views, teacher outputs on the 2 global views) per member."""
        out = {}
        for name, m in self.members.items():
            out[name] = (m.student(views), m.teacher_forward(views[:2]))
        return out

    def self_losses(
        self, m: SSLMember, s: dict, t: dict, teacher_temp: float
    ) -> dict[str, torch.Tensor]:
        """A member's own DINO terms (head, and T-head when it has one)."""
        losses = {
            "dino": dino_loss(s["head"], t["head"], m.center_head, self.student_temp, teacher_temp)
        }
        if self.use_thead:
            losses["dino_thead"] = dino_loss(
                s["thead"], t["thead"], m.center_thead, self.student_temp, teacher_temp
            )
        return losses

    def update_centers(self, outputs: dict[str, tuple[dict, dict]]) -> None:
        """EMA of each teacher's mean output (after the losses used the old centers)."""
        for name, m in self.members.items():
            t = outputs[name][1]
            self._set_center(m, "center_head", t["head"])
            if self.use_thead:
                self._set_center(m, "center_thead", t["thead"])

    def compute_losses(
        self, views: Sequence[torch.Tensor], teacher_temp: float
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Named loss terms per member for one batch of views; centers are updated afterwards."""
        outputs = self.forward_all(views)
        losses = {
            name: self.self_losses(m, *outputs[name], teacher_temp)
            for name, m in self.members.items()
        }
        self.update_centers(outputs)
        return losses

    @torch.no_grad()
    def update_teachers(self, momenta: dict[str, float]) -> None:
        """EMA step of every teacher towards its student."""
        for name, m in self.members.items():
            ema_update(m.teacher, m.student, momenta[name])
