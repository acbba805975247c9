"""The training loop: optimizer and schedule, AMP, DDP, evaluation, checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distillkit.config import RunConfig
from distillkit.data.datasets import DataBundle, Split
from distillkit.data.loader import BatchLoader
from distillkit.data.transforms import BatchShard, normalize, to_float, use_shard
from distillkit.engine.checkpoint import kill_point, save_run_checkpoints
from distillkit.engine.distributed import (
    DistContext,
    all_gather_rows,
    all_reduce_sum,
    barrier,
    convert_sync_batchnorm,
)
from distillkit.engine.logging import MetricsLogger
from distillkit.methods.base import Distiller


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks cuda (this rank's GPU), then mps, then cpu; explicit names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "device 'cuda' was asked for but CUDA is not available; use device=auto or cpu"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """Every global RNG state (dropout and friends draw from these)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW; no weight decay on biases and norm scales."""
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0 if cfg.optimizer == "adamw" else cfg.weight_decay},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(cfg: RunConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at a global step: linear warm-up, then the schedule."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    bundle: DataBundle,
    device: torch.device,
    batch_size: int = 512,
    ctx: DistContext | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` on `split`, sharded and summed over ranks."""
    ctx = ctx or DistContext()
    was_training = model.training
    model.eval()
    n = len(split)
    order = torch.arange(ctx.rank, n, ctx.world_size)
    correct = loss_sum = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x = normalize(to_float(split.images[idx].to(device)), bundle.mean, bundle.std)
        y = split.labels[idx].to(device)
        ctx_amp = (
            torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        )
        with ctx_amp:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    correct, loss_sum, count = all_reduce_sum([correct, loss_sum, float(len(order))], ctx, device)
    model.train(was_training)
    return {"acc": 100.0 * correct / max(count, 1.0), "loss": loss_sum / max(count, 1.0)}


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


class Trainer:
    """Runs epochs of a Distiller, evaluating the student and checkpointing after each one."""

    def __init__(
        self,
        cfg: RunConfig,
        distiller: Distiller,
        bundle: DataBundle,
        device: torch.device,
        run_dir: Path,
        ctx: DistContext | None = None,
        train_indices: np.ndarray | None = None,
        model_meta: dict[str, Any] | None = None,
    ):
        self.cfg = cfg
        self.ctx = ctx or DistContext()
        self.device = device
        self.bundle = bundle
        self.run_dir = Path(run_dir)
        self.model_meta = model_meta or {}
        self.train_indices = train_indices
        if cfg.batch_size % self.ctx.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be divisible by the number of processes "
                f"{self.ctx.world_size} (it is the global batch)"
            )
        self.distiller = distiller.to(device)
        if cfg.sync_bn and self.ctx.enabled:
            self.distiller.student = convert_sync_batchnorm(self.distiller.student, device)
        self.loader = BatchLoader(
            bundle.train,
            cfg.batch_size // self.ctx.world_size,
            mean=bundle.mean,
            std=bundle.std,
            shuffle=True,
            augment=cfg.augment,
            flip=bundle.hflip,
            seed=cfg.seed,
            drop_last=cfg.drop_last,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            indices=None if train_indices is None else [int(i) for i in train_indices],
            device=device,
        )
        self.params = list(self.distiller.trainable_parameters())
        if not self.params:
            raise ValueError("the method has no trainable parameters")
        self.optimizer = build_optimizer(cfg, self.params)
        steps = len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(cfg, step, steps)
        )
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        if self.amp_dtype is not None and device.type not in ("cuda", "cpu"):
            raise ValueError(f"amp={cfg.amp} is supported on cuda and cpu, not {device.type}")
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=(self.amp_dtype == torch.float16 and device.type == "cuda")
        )
        self.model: nn.Module = self.distiller
        if self.ctx.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.distiller, device_ids=ids)
        self.logger = MetricsLogger(
            self.run_dir, enabled=self.ctx.is_main, tensorboard=cfg.tensorboard
        )
        self.epoch = 0
        self.best_acc = -1.0
        self.best_epoch = 0
        self.train_time = 0.0
        self.images_seen = 0
        self.wall_offset = 0.0

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly."""
        return {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "model": self.distiller.student.state_dict(),
            "model_meta": self.model_meta,
            "distiller": self.distiller.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "history": self.logger.history,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "train_time": self.train_time,
            "images_seen": self.images_seen,
            "wall_time": self.wall_offset + (time.perf_counter() - self._start),
            "teacher_queries": self._teacher_queries(),
            "train_indices": self.train_indices,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore a state written by `state()`; RNG states too, so the next epoch is identical."""
        self.distiller.load_trainable_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = state["epoch"]
        self.best_acc = state["best_acc"]
        self.best_epoch = state["best_epoch"]
        self.train_time = state["train_time"]
        self.images_seen = state["images_seen"]
        self.wall_offset = state["wall_time"]
        self._queries_offset = state.get("teacher_queries", 0)
        self.logger.restore(state["history"])
        set_rng_state(state["rng"])

    def _teacher_queries(self) -> int:
        teacher = self.distiller.teacher
        local = int(getattr(teacher, "queries", 0)) if teacher is not None else 0
        return getattr(self, "_queries_offset", 0) + local

    # -- loop ------------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        """One pass over this rank's shard; returns loss terms and accuracy summed over ranks."""
        self.distiller.train()
        self.loader.set_epoch(self.epoch)
        # schedule-driven methods (StableKD stages, MEKD phases) read the epoch here
        hook = getattr(self.distiller, "on_epoch_start", None)
        if hook is not None:
            hook(self.epoch)
        show = self.ctx.is_main and not self.cfg.quiet and sys.stderr.isatty()
        bar = _progress(len(self.loader), f"epoch {self.epoch + 1}/{self.cfg.epochs}", show)
        amp = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype
            else contextlib.nullcontext()
        )
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=self.device)
        count = 0
        for step, (x, y, idx) in enumerate(self.loader):
            shard = self._shard(step)
            with amp, use_shard(shard):
                logits, losses = self.model((x, y, idx))
            if not losses:
                raise ValueError("training_step returned no losses")
            loss = sum(losses.values())
            # Losses are means over this rank's rows and DDP averages gradients over ranks, so
            # weighting by rows / (global rows / world size) makes the result the global-batch mean
            # when the last batch splits unevenly; padding rows get weight 0. 1.0 on full batches.
            b = y.shape[0] if shard is None else shard.real
            weight = 1.0 if shard is None else b * self.ctx.world_size / shard.total
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss if weight == 1.0 else loss * weight).backward()
            if self.cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            # accumulate on the device: a .item() per step would stall a GPU
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * b
            correct += (logits[:b].argmax(1) == y[:b]).sum()
            count += b
            if step % 50 == 0:
                self._check_finite(loss, losses)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if bar is not None:
            bar.close()
        self._check_finite(sum(sums.values()), sums)
        names = sorted(sums)
        local = [sums[n].item() for n in names] + [correct.item(), float(count)]
        totals = all_reduce_sum(local, self.ctx, self.device)
        count = totals[-1]
        out = {f"loss_{n}": totals[i] / count for i, n in enumerate(names)}
        out["train_loss"] = sum(out.values())
        out["train_acc"] = 100.0 * totals[-2] / count
        out["train_images"] = count
        return out

    def _shard(self, step: int) -> BatchShard | None:
        """This rank's slice of the global batch at `step`, with a gather over ranks (DDP only)."""
        if not self.ctx.enabled:
            return None
        shard = self.loader.shard(step)

        def gather(t: torch.Tensor) -> torch.Tensor:
            return all_gather_rows(t, shard.counts, self.ctx)

        return dataclasses.replace(shard, gather=gather)

    def _check_finite(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if not torch.isfinite(loss):
            values = {k: float(v) for k, v in terms.items()}
            raise FloatingPointError(
                f"loss became {float(loss)} at epoch {self.epoch + 1} (terms {values}); "
                "lower lr or set grad_clip"
            )

    def fit(self) -> dict[str, Any]:
        """Train to cfg.epochs from wherever the state stands; returns the final summary."""
        self._start = time.perf_counter()
        while self.epoch < self.cfg.epochs:
            t0 = time.perf_counter()
            stats = self.train_epoch()
            train_seconds = time.perf_counter() - t0
            self.train_time += train_seconds
            self.images_seen += int(stats.pop("train_images"))
            test = evaluate(
                self.distiller.student,
                self.bundle.test,
                self.bundle,
                self.device,
                self.cfg.eval_batch_size,
                self.ctx,
                self.amp_dtype,
            )
            self.epoch += 1
            row = {
                "epoch": self.epoch,
                **stats,
                "test_acc": test["acc"],
                "test_loss": test["loss"],
                "lr": self.optimizer.param_groups[0]["lr"],
                "epoch_time": time.perf_counter() - t0,
                "images_per_sec": stats_rate(self.images_seen, self.train_time),
                "teacher_queries": self._queries_total(),
            }
            improved = test["acc"] > self.best_acc
            if improved:
                self.best_acc, self.best_epoch = test["acc"], self.epoch
            self.logger.log(row)
            if not self.cfg.quiet and self.ctx.is_main:
                terms = " ".join(f"{k}={v:.4f}" for k, v in stats.items() if k.startswith("loss_"))
                print(
                    f"[{self.cfg.name}] epoch {self.epoch}/{self.cfg.epochs} {terms} "
                    f"train_acc={stats['train_acc']:.2f} test_acc={test['acc']:.2f} "
                    f"({row['epoch_time']:.1f}s)",
                    flush=True,
                )
            final = self.epoch == self.cfg.epochs
            if self.ctx.is_main and (
                final or improved or self.epoch % max(1, self.cfg.save_every) == 0
            ):
                save_run_checkpoints(self.state(), self.run_dir, best=improved)
            barrier(self.ctx)
            kill_point(self.epoch)
        summary = self.summary()
        self.logger.write_final(summary)
        return summary

    def _queries_total(self) -> int:
        return int(all_reduce_sum([float(self._teacher_queries())], self.ctx, self.device)[0])

    def summary(self) -> dict[str, Any]:
        """Final numbers of the run (metrics.json)."""
        last = self.logger.history[-1] if self.logger.history else {}
        return {
            "name": self.cfg.name,
            "method": self.cfg.method,
            "model": self.cfg.model,
            "dataset": self.cfg.dataset,
            "epochs": self.epoch,
            "test_acc": last.get("test_acc"),
            "test_loss": last.get("test_loss"),
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "wall_time_s": self.wall_offset + (time.perf_counter() - self._start),
            "train_time_s": self.train_time,
            "images_per_sec": stats_rate(self.images_seen, self.train_time),
            "teacher_queries": self._queries_total(),
            "train_samples": len(self.loader.base_indices),
            "world_size": self.ctx.world_size,
            "device": str(self.device),
        }

    def close(self) -> None:
        """Drop the DDP wrapper before the process group goes (clean gloo shutdown)."""
        self.model = None  # type: ignore[assignment]


def stats_rate(images: float, seconds: float) -> float:
    """Images per second, 0 when no time has passed."""
    return images / seconds if seconds > 0 else 0.0
