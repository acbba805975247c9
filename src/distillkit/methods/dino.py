"""DINO self-distillation (Caron et al., ICCV 2021) as a method of the one Trainer.

`method: dino` trains model a (the run's `model`) without labels: multi-crop views of the raw
training images, a student with a projection head, its EMA teacher, output centering and a
teacher-temperature warm-up; `methods/mokd.py` adds a second model and cross-distillation. Its
options (`methods/ssl_options.py`) give each model its own optimiser: the method optimises
manually, with warm-up + cosine learning rate, cosine weight decay, per-model clipping and a
frozen last layer in the first epochs.

The views are cut from the raw uint8 images by sample index (the loader's normalised, maybe
augmented batch is not used), with numbers drawn from a (seed, epoch) generator for the whole
global batch: an exact resume and a run under torchrun see the views of a single-process run.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distillkit.data.datasets import DataBundle
from distillkit.data.loader import derive_seed
from distillkit.data.multicrop import MultiCrop
from distillkit.data.transforms import current_shard
from distillkit.methods.base import Batch, Distiller, OptimizerConfig, SetupContext
from distillkit.methods.registry import register_method
from distillkit.methods.ssl_eval import (
    eval_subset,
    extract_features,
    fit_linear_probe,
    knn_accuracy,
    probe_accuracy,
)
from distillkit.methods.ssl_heads import SSLMember, build_member
from distillkit.methods.ssl_options import DINOOptions, ModelOptions
from distillkit.methods.ssl_schedules import cosine_value, ema_momentum, lr_at, teacher_temperature
from distillkit.models import build_model

_VIEW_STREAM = 7  # randomness stream of the views, distinct from the loader's streams

# Run-level optimisation keys a self-supervised run does not read: each model has its own
# optimiser under options.a / options.b, with a key of the same name, and no lr schedule keys
_RUN_KEYS_PER_MODEL = ("optimizer", "lr", "momentum", "weight_decay", "warmup_epochs", "grad_clip")
_RUN_KEYS_SCHEDULE = ("schedule", "milestones", "gamma", "nesterov")
_SELF_TERMS = {"head": "dino", "thead": "dino_thead"}  # loss name of each self-distilled output


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
    terms = [
        soft_cross_entropy(sout, tout - center, student_temp, teacher_temp)
        for t, tout in enumerate(teacher_out)
        for v, sout in enumerate(student_out)
        if v != t
    ]
    if not terms:
        raise ValueError("the DINO loss needs at least two views")
    return sum(terms) / len(terms)


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


Rows = tuple[int, int]  # (this process's real rows, rows of the global batch)


def build_ssl_optimizer(
    recipe: ModelOptions, module: nn.Module, lr: float
) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases and norm scales (group 0 decays, group 1 not)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": recipe.weight_decay},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum)
    return torch.optim.AdamW(groups, lr=lr)


# --------------------------------------------------------------------------- the method


class DINO(Distiller):
    """DINO self-distillation for each model independently (one model: plain DINO).

    `student` is the ModuleDict of members (each a student network, its EMA teacher and its
    output centers), so checkpoints and `sync_bn` see every network of the run.
    """

    automatic_optimization = False

    def __init__(
        self,
        members: dict[str, SSLMember],
        options: DINOOptions | None = None,
        *,
        deploy: nn.Module | None = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__(nn.ModuleDict(members), None)
        self.options = options or DINOOptions()
        # the outputs each member self-distils: its head, and its T-head when built with one
        self.heads = ("head", "thead") if members["a"].student.thead is not None else ("head",)
        self.student_temp = self.options.student_temp
        self.world_size = 1  # > 1: centers sum their batch means over processes (torchrun)
        # what evaluate/export use: a's network as built by the run, classifier intact; kept out
        # of the module tree (its weights are a's teacher's, filled in by deployable)
        self._deploy = [deploy]
        embed = members["a"].student.backbone.embed_dim
        # the linear probe of the latest evaluation on a's teacher features: deployable's classifier
        self.register_buffer("probe_weight", torch.zeros(num_classes, embed))
        self.register_buffer("probe_bias", torch.zeros(num_classes))
        self._epoch = self._epoch_step = 0
        self._teacher_temp = self.options.warmup_teacher_temp
        self._gen: torch.Generator | None = None
        self._last: dict[str, float] = {}

    @property
    def members(self) -> nn.ModuleDict:
        """The models of the run by name ("a", and "b" for MOKD)."""
        return self.student

    def recipe(self, name: str) -> ModelOptions:
        """The optimisation recipe of member `name`."""
        return self.options.members()[name]

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, ctx: SetupContext) -> None:
        """Views, raw images on the device and the cross-process reduction."""
        super().setup(ctx)
        o, bundle = self.options, ctx.bundle
        self.multicrop = MultiCrop(
            *o.crop_sizes(bundle.image_size),
            o.local_crops_number,
            tuple(o.global_crops_scale),
            tuple(o.local_crops_scale),
            flip=bundle.hflip,
            jitter=o.jitter,
            blur=o.blur,
            solarize=o.solarize,
        )
        self._images = bundle.train.images.to(ctx.device)
        self._mean = torch.tensor(bundle.mean, device=ctx.device).view(1, -1, 1, 1)
        self._std = torch.tensor(bundle.std, device=ctx.device).view(1, -1, 1, 1)
        self.world_size = ctx.world_size

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (the schedules' horizon)."""
        ctx = self._context()
        return ctx.epochs * ctx.steps_per_epoch

    def _context(self) -> SetupContext:
        if self.context is None:
            raise RuntimeError("DINO needs the trainer's setup before training")
        return self.context

    def configure_optimizers(self) -> list[OptimizerConfig]:
        """One optimiser per model: warm-up + cosine lr (per step), its own clipping."""
        ctx = self._context()
        spe, epochs = ctx.steps_per_epoch, ctx.epochs
        out = []
        for name, m in self.members.items():
            r = self.recipe(name)
            base, final = r.effective_lr(ctx.cfg.batch_size)

            def factor(step: int, base=base, final=final, warm=r.warmup_epochs) -> float:
                return lr_at(step, spe, epochs, base, final, warm) / base

            opt = build_ssl_optimizer(r, m.student, base)
            out.append(OptimizerConfig(opt, lr_lambda=factor, grad_clip=r.grad_clip, name=name))
        return out

    def apply_weight_decay(self, opt: OptimizerConfig, step: int) -> float:
        """Set the decaying group's weight decay for global `step` (cosine to weight_decay_end)."""
        r = self.recipe(opt.name)
        end = r.weight_decay if r.weight_decay_end is None else r.weight_decay_end
        wd = cosine_value(step, self.total_steps, r.weight_decay, end)
        opt.optimizer.param_groups[0]["weight_decay"] = wd
        return wd

    # -- training ----------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """The epoch's view generator and teacher temperature."""
        o = self.options
        self._epoch, self._epoch_step, self._last = epoch, 0, {}
        # rank 0's stream of the old per-rank views: single-process views are unchanged, and
        # every process draws for the whole global batch (MultiCrop with the batch's shard)
        seed = self._context().cfg.seed
        self._gen = torch.Generator().manual_seed(derive_seed(seed, epoch, _VIEW_STREAM, 0))
        self._teacher_temp = teacher_temperature(
            epoch, o.warmup_teacher_temp, o.teacher_temp, o.warmup_teacher_temp_epochs
        )

    def views(self, idx: torch.Tensor) -> tuple[list[torch.Tensor], Rows]:
        """Normalised multi-crop views of training samples `idx`, and their rows."""
        if self._gen is None:
            raise RuntimeError("on_epoch_start must run before training_step")
        shard = current_shard()
        x = self._images[idx.to(self._images.device)].float().div_(255.0)
        # views in full precision: under autocast the blur would run in half precision
        with torch.autocast(x.device.type, enabled=False):
            views = [(v - self._mean) / self._std for v in self.multicrop(x, self._gen, shard)]
        rows = (shard.real, shard.total) if shard is not None else (len(idx), len(idx))
        return views, rows

    def training_step(self, batch: Batch) -> tuple[None, dict[str, torch.Tensor]]:
        """Losses on this batch's views, backward, then each model's optimiser steps."""
        _, _, idx = batch
        views, rows = self.views(idx)
        losses = self.compute_losses(views, self._teacher_temp, rows)
        self.manual_backward(sum(sum(t.values()) for t in losses.values()))
        step = self._epoch * self._context().steps_per_epoch + self._epoch_step
        for opt in self.optimizers():
            if self._epoch < self.recipe(opt.name).freeze_last_layer:
                # the heads' last layers get no gradient: no update, no clipping share
                for pname, p in self.members[opt.name].student.named_parameters():
                    if "last_layer" in pname:
                        p.grad = None
            self._last[f"weight_decay_{opt.name}"] = self.apply_weight_decay(opt, step)
            self._last[f"lr_{opt.name}"] = opt.optimizer.param_groups[0]["lr"]
            self.optimizer_step(opt)
        self._epoch_step += 1
        return None, {f"{n}_{k}": v.detach() for n, t in losses.items() for k, v in t.items()}

    def on_step_end(self, step: int) -> None:
        """EMA step of every teacher towards its student (momentum cosine to 1)."""
        for name, m in self.members.items():
            momentum = ema_momentum(step, self.total_steps, self.recipe(name).ema_momentum)
            ema_update(m.teacher, m.student, momentum)
            self._last[f"ema_momentum_{name}"] = momentum

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Last step's lr, weight decay and EMA momentum per model, and the teacher temperature."""
        return {**dict(sorted(self._last.items())), "teacher_temp": self._teacher_temp}

    # -- losses --------------------------------------------------------------------------------
    def _set_center(
        self, member: SSLMember, name: str, outs: Sequence[torch.Tensor], rows: Rows | None
    ) -> None:
        """Move center `name` of `member` towards the global batch mean of `outs`."""
        n = outs[0].shape[0]
        real, total = rows if rows is not None else (n, n * self.world_size)
        # a process holding only a padding row (uneven last batch) adds nothing
        batch_sum = torch.cat([o[:real].detach().float() for o in outs]).sum(0, keepdim=True)
        if self.world_size > 1:
            dist.all_reduce(batch_sum, op=dist.ReduceOp.SUM)
        batch_mean = batch_sum / (total * len(outs))
        center = updated_center(getattr(member, name), batch_mean, self.options.center_momentum)
        setattr(member, name, center)

    def forward_all(self, views: Sequence[torch.Tensor]) -> dict[str, tuple[dict, dict]]:
        """(student outputs on all views, teacher outputs on the 2 global views) per member."""
        return {
            n: (m.student(views), m.teacher_forward(views[:2])) for n, m in self.members.items()
        }

    def self_losses(
        self, m: SSLMember, s: dict, t: dict, teacher_temp: float
    ) -> dict[str, torch.Tensor]:
        """A member's own DINO terms (head, and T-head when it has one)."""
        return {
            _SELF_TERMS[h]: dino_loss(
                s[h], t[h], getattr(m, f"center_{h}"), self.student_temp, teacher_temp
            )
            for h in self.heads
        }

    def update_centers(self, outputs: dict[str, tuple[dict, dict]], rows: Rows | None) -> None:
        """EMA of each teacher's mean output (after the losses used the old centers)."""
        for name, m in self.members.items():
            for h in self.heads:
                self._set_center(m, f"center_{h}", outputs[name][1][h], rows)

    def compute_losses(
        self, views: Sequence[torch.Tensor], teacher_temp: float, rows: Rows | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Named loss terms per member for one batch of views; centers are updated afterwards."""
        outputs = self.forward_all(views)
        losses = {
            name: self.self_losses(m, *outputs[name], teacher_temp)
            for name, m in self.members.items()
        }
        self.update_centers(outputs, rows)
        return losses

    # -- evaluation and export -------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """k-NN and linear-probe accuracy (%) of each EMA teacher's frozen backbone features.

        `score` (best.pt) is the mean k-NN accuracy; `test_acc` is linear_acc_a, the accuracy of
        the deployable model; a's probe becomes the deployable's classifier.
        """
        ctx = self._context()
        o, cfg, bundle = self.options, ctx.cfg, ctx.bundle
        train = eval_subset(bundle.train, o.eval_train_samples, derive_seed(cfg.seed, 97))
        test = eval_subset(bundle.test, o.eval_test_samples, derive_seed(cfg.seed, 98))
        extract = functools.partial(
            extract_features,
            mean=bundle.mean,
            std=bundle.std,
            device=ctx.device,
            batch_size=cfg.eval_batch_size,
        )
        k = bundle.num_classes
        out: dict[str, float] = {}
        for name, m in self.members.items():
            tr, te = (extract(m.teacher.backbone, s.images) for s in (train, test))
            weight, bias = fit_linear_probe(tr, train.labels, k, o.probe_steps, o.probe_l2)
            knn = knn_accuracy(tr, train.labels, te, test.labels, k, o.knn_k, o.knn_temperature)
            out[f"knn_acc_{name}"] = knn
            out[f"linear_acc_{name}"] = probe_accuracy(weight, bias, te, test.labels)
            if name == "a":
                self.probe_weight.copy_(weight.to(self.probe_weight))
                self.probe_bias.copy_(bias.to(self.probe_bias))
        score = sum(out[f"knn_acc_{n}"] for n in self.members) / len(self.members)
        out.update({"knn_acc_mean": score, "test_acc": out["linear_acc_a"], "score": score})
        return out

    def deployable(self) -> nn.Module:
        """Model a's EMA teacher with the latest linear probe as its classifier.

        Without a linear classifier to fill (a model whose classifier is not one nn.Linear), the
        teacher's backbone alone (embeddings, no classifier).
        """
        net = self._deploy[0]
        backbone = self.members["a"].teacher.backbone.model
        if net is None:
            return backbone
        state = dict(backbone.state_dict())
        state["classifier.weight"] = self.probe_weight
        state["classifier.bias"] = self.probe_bias
        net.load_state_dict(state)
        return net


# --------------------------------------------------------------------------- building


def check_run_config(cfg: Any) -> None:
    """Refuse run-level settings the method would silently ignore (teacher, optimiser keys)."""
    if getattr(cfg, "teacher", None):
        raise ValueError(f"method '{cfg.method}' learns without a teacher: remove `teacher`")
    for f in dataclasses.fields(cfg):
        if f.name not in _RUN_KEYS_PER_MODEL + _RUN_KEYS_SCHEDULE:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(cfg, f.name) != default:
            where = (
                f"set it per model as options.a.{f.name} (and options.b.{f.name})"
                if f.name in _RUN_KEYS_PER_MODEL
                else "its lr is a warm-up then cosine to options.a.min_lr"
            )
            raise ValueError(
                f"config key '{f.name}': method '{cfg.method}' does not use it; {where}"
            )


def build_dino_like(
    cls: type[DINO],
    cfg: Any,
    options: DINOOptions,
    student: nn.Module,
    bundle: DataBundle,
    with_thead: bool,
) -> DINO:
    """Members, deployable copy and the method object (shared by dino and mokd).

    Model a is the run's `model`, b (MOKD) is built from options.b.
    """
    check_run_config(cfg)
    fresh = copy.deepcopy(student)  # before the backbone adapter drops its classifier
    global_size, _ = options.crop_sizes(bundle.image_size)
    members = {}
    for i, (name, r) in enumerate(options.members().items()):
        # each member its own stream: a's heads and b do not depend on how a was built
        torch.manual_seed(derive_seed(cfg.seed, 1000 + i))
        if name == "a":
            model = student
        else:
            try:
                model = build_model(
                    r.model or "",
                    in_channels=bundle.in_channels,
                    num_classes=bundle.num_classes,
                    image_size=bundle.image_size,
                    **r.model_kwargs,
                )
            except TypeError as exc:
                raise ValueError(
                    f"config key 'options.{name}.model_kwargs': model '{r.model}' rejected "
                    f"{r.model_kwargs}: {exc}"
                ) from None
        members[name] = build_member(options, r, model, global_size, with_thead)
    # the deployable: the fresh copy when its classifier is a linear layer a probe can fill
    clf = getattr(fresh, "classifier", None)
    shape = (clf.in_features, clf.out_features) if isinstance(clf, nn.Linear) else None
    embed = members["a"].student.backbone.embed_dim
    deploy = fresh.cpu().eval() if shape == (embed, bundle.num_classes) else None
    return cls(members, options, deploy=deploy, num_classes=bundle.num_classes)


@register_method(
    "dino",
    options=DINOOptions,
    needs_teacher=False,
    description="self-supervised DINO of `model` (multi-crop, EMA teacher); k-NN/linear probe",
)
def build(cfg: Any, options: DINOOptions, student: nn.Module, teacher: Any, bundle: DataBundle):
    """Registry builder: model a is the run's `model`; a T-head only with options.thead."""
    return build_dino_like(DINO, cfg, options, student, bundle, with_thead=options.thead)
