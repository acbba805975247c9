"""The one training loop: every method, supervised, adversarial or self-supervised, runs here.

The trainer owns the loader, AMP, DDP, per-step schedules, clipping, progress, metrics files,
checkpoints, kill points and exact resume; a method owns its losses and, through the contract in
`methods/base.py`, its optimizers, phases and evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distillkit.config import RunConfig
from distillkit.data.datasets import DataBundle
from distillkit.data.loader import BatchLoader
from distillkit.data.transforms import BatchShard, use_shard
from distillkit.engine.checkpoint import kill_point, save_run_checkpoints
from distillkit.engine.distributed import (
    DistContext,
    all_gather_rows,
    all_reduce_sum,
    barrier,
    convert_sync_batchnorm,
)
from distillkit.engine.evaluation import evaluate
from distillkit.engine.logging import MetricsLogger
from distillkit.engine.optim import build_optimizer, lr_factor
from distillkit.engine.setup import (
    AMP_DTYPES,
    fold_frozen_batchnorm,
    resolve_amp,
    resolve_device,
    rng_state,
    set_rng_state,
    use_channels_last,
)
from distillkit.methods.base import Distiller, OptimizerConfig, SetupContext
from distillkit.teachers.local import LocalTeacher

# re-exported: scripts and tests import these from the trainer
__all__ = ["Trainer", "build_optimizer", "evaluate", "lr_factor", "resolve_device"]


class Trainer:
    """Runs epochs of a Distiller, evaluating and checkpointing after each one."""

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
        steps = len(self.loader)
        if steps == 0:
            raise ValueError(
                f"batch_size {cfg.batch_size} leaves no training step (drop_last with "
                f"{self.loader.num_samples * self.ctx.world_size} samples)"
            )
        self.distiller.setup(
            SetupContext(
                cfg=cfg,
                bundle=bundle,
                device=device,
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
                steps_per_epoch=steps,
                epochs=cfg.epochs,
                run_dir=self.run_dir,
            )
        )
        self.distiller.to(device)  # setup may have built modules (generators, heads)
        # before the optimizers exist: compile and memory formats act on the final modules
        self.amp = resolve_amp(cfg.amp, device)  # before _fast_path: memory formats follow it
        self._fast_path()
        self.opts = self._configure_optimizers(steps)
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(o.optimizer, o.lr_lambda or (lambda step: 1.0))
            for o in self.opts
        ]
        self.amp_dtype = AMP_DTYPES[self.amp]
        if self.amp_dtype is not None and device.type not in ("cuda", "cpu"):
            raise ValueError(f"amp={self.amp} is supported on cuda and cpu, not {device.type}")
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=(self.amp_dtype == torch.float16 and device.type == "cuda")
        )
        self.manual = not self.distiller.automatic_optimization
        self.model: nn.Module = self.distiller
        if self.ctx.enabled and not self.manual:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(
                self.distiller,
                device_ids=ids,
                find_unused_parameters=self.distiller.ddp_find_unused_parameters,
            )
        self.distiller._engine = self  # what a manually optimizing method borrows (EngineHooks)
        self.loss_weight = 1.0
        self.logger = MetricsLogger(
            self.run_dir, enabled=self.ctx.is_main, tensorboard=cfg.tensorboard
        )
        self.epoch = 0
        self.global_step = 0
        self.best_score = -float("inf")
        self.best_epoch = 0
        self.last_eval: dict[str, float] = {}
        self.train_time = 0.0
        self.images_seen = 0
        self.wall_offset = 0.0
        self._queries_offset = 0

    def _fast_path(self) -> None:
        """Fold frozen teachers' BN, pick memory formats and compile.

        Every choice keeps the step's function: channels_last and BN folding change only the
        order of float operations (tests/test_speed_paths.py holds the loss trajectory to the
        plain path's).
        """
        cfg, d, cl = self.cfg, self.distiller, torch.channels_last
        if self.device.type == "cuda" and not cfg.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its kernels once
        teacher = d.teacher if isinstance(d.teacher, nn.Module) else None
        # a LocalTeacher's model is frozen for good (eval mode, no gradients): EMA teachers and
        # anything else that still changes are never folded
        frozen = [
            m.model for m in (teacher.modules() if teacher else ()) if isinstance(m, LocalTeacher)
        ]
        for model in frozen:
            fold_frozen_batchnorm(model)
        nhwc = functools.partial(
            use_channels_last, cfg.channels_last, device=self.device, amp=self.amp
        )
        student = d.student if isinstance(d.student, nn.Module) else None
        if student is not None and nhwc(student):
            for child in d.children():
                if child is not teacher:
                    child.to(memory_format=cl)
            self.loader.memory_format = cl
        if teacher is not None and nhwc(teacher):
            teacher.to(memory_format=cl)
        if cfg.compile:
            for model in ([student] if student is not None else []) + frozen:
                model.compile()

    def _configure_optimizers(self, steps: int) -> list[OptimizerConfig]:
        opts = self.distiller.configure_optimizers()
        if opts is None:
            params = list(self.distiller.trainable_parameters())
            if not params:
                raise ValueError("the method has no trainable parameters")
            cfg = self.cfg
            opts = [
                OptimizerConfig(
                    build_optimizer(cfg, params),
                    lr_lambda=lambda step: lr_factor(cfg, step, steps),
                    grad_clip=cfg.grad_clip,
                )
            ]
        if not opts:
            raise ValueError("configure_optimizers returned no optimizer")
        names = [o.name for o in opts]
        if len(set(names)) != len(names):
            raise ValueError(f"optimizer names must be distinct, got {names}")
        return list(opts)

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly."""
        return {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.distiller.deployable().state_dict(),
            "model_meta": self.model_meta,
            "distiller": self.distiller.trainable_state_dict(),
            "extra_state": self.distiller.extra_state(),
            "optimizers": {o.name: o.optimizer.state_dict() for o in self.opts},
            "schedulers": {o.name: s.state_dict() for o, s in zip(self.opts, self.schedulers)},
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "history": self.logger.history,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "last_eval": self.last_eval,
            "train_time": self.train_time,
            "images_seen": self.images_seen,
            "wall_time": self.wall_offset + (time.perf_counter() - self._start),
            "teacher_queries": self._teacher_queries(),
            "train_indices": self.train_indices,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore a state written by `state()`; RNG states too, so the next epoch is identical."""
        if "optimizers" not in state:
            raise ValueError(
                "this checkpoint was written by an older distillkit layout and cannot be resumed"
            )
        # extra state first: it may rebuild modules (pools, generators) the weights then fill
        self.distiller.load_extra_state(state.get("extra_state", {}))
        self.distiller.load_trainable_state_dict(state["distiller"])
        saved, wanted = sorted(state["optimizers"]), sorted(o.name for o in self.opts)
        if saved != wanted:
            raise ValueError(
                f"checkpoint holds optimizers {saved}, this method configures {wanted}: it was "
                "written by another method or an older distillkit and cannot be resumed"
            )
        for o, sched in zip(self.opts, self.schedulers):
            o.optimizer.load_state_dict(state["optimizers"][o.name])
            sched.load_state_dict(state["schedulers"][o.name])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = state["epoch"]
        self.global_step = state.get("global_step", 0)
        self.best_score = state["best_score"]
        self.best_epoch = state["best_epoch"]
        self.last_eval = state.get("last_eval", {})
        self.train_time = state["train_time"]
        self.images_seen = state["images_seen"]
        self.wall_offset = state["wall_time"]
        self._queries_offset = state.get("teacher_queries", 0)
        self.logger.restore(state["history"])
        set_rng_state(state["rng"])

    def _teacher_queries(self) -> int:
        return self._queries_offset + int(getattr(self.distiller.teacher, "queries", 0))

    # -- backward and optimizer steps (also the EngineHooks of manual optimization) --------------
    def optimizers(self) -> list[OptimizerConfig]:
        """The configured optimizers, in configure_optimizers order."""
        return self.opts

    def backward(self, loss: torch.Tensor) -> None:
        """AMP-scaled backward of `loss` times this rank's batch weight (`loss_weight`)."""
        w = self.loss_weight
        self.scaler.scale(loss if w == 1.0 else loss * w).backward()

    def step(self, opt: OptimizerConfig) -> None:
        """`step_optimizer`, then zero that optimizer's gradients."""
        self.step_optimizer(opt)
        opt.optimizer.zero_grad(set_to_none=True)

    def step_optimizer(self, opt: OptimizerConfig) -> None:
        """Unscale, average gradients over ranks (manual mode), clip and step one optimizer."""
        params = opt.params()
        if self.manual and self.ctx.enabled:
            self._average_gradients(params)
        if opt.grad_clip:
            self.scaler.unscale_(opt.optimizer)
            torch.nn.utils.clip_grad_norm_(params, opt.grad_clip)
        self.scaler.step(opt.optimizer)

    def _average_gradients(self, params: list[nn.Parameter]) -> None:
        # every rank must all-reduce the same tensors: a gradient missing on one rank is a zero
        grads = [p for p in params if p.requires_grad]
        if not grads:
            return
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in grads]
        )
        has = torch.tensor(
            [float(p.grad is not None) for p in grads], device=flat.device, dtype=flat.dtype
        )
        both = torch.cat([flat, has])
        dist.all_reduce(both)
        flat, has = both[: flat.numel()] / self.ctx.world_size, both[flat.numel() :]
        for p, h, grad in zip(grads, has.tolist(), flat.split([q.numel() for q in grads])):
            if h > 0:
                p.grad = grad.view_as(p).clone()

    # -- loop ------------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        """One pass over this rank's shard; returns loss terms and accuracy summed over ranks."""
        self.distiller.train()
        self.loader.set_epoch(self.epoch)
        self.distiller.on_epoch_start(self.epoch)
        bar = None
        if self.ctx.is_main and not self.cfg.quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            desc = f"epoch {self.epoch + 1}/{self.cfg.epochs}"
            bar = tqdm(total=len(self.loader), desc=desc, leave=False, dynamic_ncols=True)
        dtype = self.amp_dtype
        amp = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=self.device)
        count = scored = 0
        for step, (x, y, idx) in enumerate(self.loader):
            shard = self._shard(step)
            # Losses are means over this rank's rows and gradients are averaged over ranks, so
            # weighting by rows / (global rows / world size) makes the result the global-batch mean
            # when the last batch splits unevenly; padding rows get weight 0. 1.0 on full batches.
            b = y.shape[0] if shard is None else shard.real
            self.loss_weight = 1.0 if shard is None else b * self.ctx.world_size / shard.total
            if not self.manual:
                for o in self.opts:
                    o.optimizer.zero_grad(set_to_none=True)
            # the distiller's forward is its training_step (through DDP unless manual)
            with amp, use_shard(shard):
                logits, losses = self.model((x, y, idx))
            if self.manual:
                loss = sum(v.detach() for v in losses.values()) if losses else None
            else:
                if not losses:
                    raise ValueError("training_step returned no losses")
                loss = sum(losses.values())
                self.backward(loss)
                for o in self.opts:
                    self.step_optimizer(o)
            self.scaler.update()
            with warnings.catch_warnings():
                # a manually optimizing method may leave an optimizer idle for a phase (MEKD's
                # student while the GAN trains); its schedule still advances with the global step
                if self.manual:
                    warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                for sched in self.schedulers:
                    sched.step()
            self.distiller.on_step_end(self.global_step)
            self.global_step += 1
            # accumulate on the device: a .item() per step would stall a GPU
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * b
            if logits is not None:
                correct += (logits[:b].argmax(1) == y[:b]).sum()
                scored += b
            count += b
            # reading the loss waits for the device: every 50 steps only
            if step % 50 == 0 and loss is not None:
                self._check_finite(loss, losses)
                if bar is not None:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if self.manual and self.ctx.enabled:
            # manual mode has no DDP wrapper to keep BatchNorm statistics equal across ranks
            for buf in self.distiller.buffers():
                dist.broadcast(buf, 0)
        if sums:
            self._check_finite(sum(sums.values()), sums)
        names = sorted(sums)
        local = [float(sums[n]) for n in names] + [float(correct), float(scored), float(count)]
        *terms, correct, scored, count = all_reduce_sum(local, self.ctx, self.device)
        out = {f"loss_{n}": total / count for n, total in zip(names, terms)}
        out["train_loss"] = sum(out.values())
        if scored > 0:
            out["train_acc"] = 100.0 * correct / scored
        out["train_images"] = count
        return out

    def _shard(self, step: int) -> BatchShard | None:
        """This rank's slice of the global batch at `step`, with a gather over ranks (DDP only)."""
        if not self.ctx.enabled:
            return None
        shard = self.loader.shard(step)
        gather = functools.partial(all_gather_rows, counts=shard.counts, ctx=self.ctx)
        return dataclasses.replace(shard, gather=gather)

    def _check_finite(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if not torch.isfinite(torch.as_tensor(loss)):
            values = {k: float(v) for k, v in terms.items()}
            raise FloatingPointError(
                f"loss became {float(loss)} at epoch {self.epoch + 1} (terms {values}); "
                "lower lr or set grad_clip"
            )

    def evaluate(self) -> dict[str, float]:
        """The method's own evaluation, or the student's test accuracy and loss; `score` ranks."""
        own = self.distiller.evaluate()
        if own is not None:
            return {"score": own.get("test_acc", 0.0), **own}
        test = evaluate(
            self.distiller.deployable(),
            self.bundle.test,
            self.bundle,
            self.device,
            self.cfg.eval_batch_size,
            self.ctx,
        )
        return {"test_acc": test["acc"], "test_loss": test["loss"], "score": test["acc"]}

    def fit(self) -> dict[str, Any]:
        """Train to cfg.epochs from wherever the state stands; returns the final summary."""
        self._start = time.perf_counter()
        while self.epoch < self.cfg.epochs:
            t0 = time.perf_counter()
            stats = self.train_epoch()
            self.train_time += time.perf_counter() - t0
            self.images_seen += int(stats.pop("train_images"))
            stats.update(self.distiller.on_epoch_end(self.epoch))
            self.epoch += 1
            final = self.epoch == self.cfg.epochs
            row: dict[str, Any] = {"epoch": self.epoch, **stats}
            if final or self.epoch % max(1, self.cfg.eval_every) == 0:
                self.last_eval = self.evaluate()
                row.update({k: v for k, v in self.last_eval.items() if k != "score"})
                if self.last_eval["score"] > self.best_score:
                    self.best_score, self.best_epoch = self.last_eval["score"], self.epoch
            row["lr"] = self.opts[0].optimizer.param_groups[0]["lr"]  # the first optimizer's
            row["epoch_time"] = time.perf_counter() - t0
            row["images_per_sec"] = stats_rate(self.images_seen, self.train_time)
            row["teacher_queries"] = self._queries_total()
            self.logger.log(row)
            if not self.cfg.quiet and self.ctx.is_main:
                self._print_epoch(stats, row)
            improved = self.best_epoch == self.epoch
            if self.ctx.is_main and (
                final or improved or self.epoch % max(1, self.cfg.save_every) == 0
            ):
                save_run_checkpoints(self.state(), self.run_dir, best=improved)
            barrier(self.ctx)
            kill_point(self.epoch)
        summary = self.summary()
        self.logger.write_final(summary)
        return summary

    def _print_epoch(self, stats: dict[str, float], row: dict[str, Any]) -> None:
        terms = " ".join(f"{k}={v:.4f}" for k, v in stats.items() if k.startswith("loss_"))
        shown = ("train_acc", "test_acc") + tuple(k for k in self.last_eval if "_acc" in k)
        accs = " ".join(
            f"{k}={row[k]:.2f}" for k in dict.fromkeys(shown) if isinstance(row.get(k), float)
        )
        print(
            f"[{self.cfg.name}] epoch {self.epoch}/{self.cfg.epochs} {terms} {accs} "
            f"({row['epoch_time']:.1f}s)",
            flush=True,
        )

    def _queries_total(self) -> int:
        return int(all_reduce_sum([float(self._teacher_queries())], self.ctx, self.device)[0])

    def summary(self) -> dict[str, Any]:
        """Final numbers of the run (metrics.json)."""
        last = self.logger.history[-1] if self.logger.history else {}
        out = {
            "name": self.cfg.name,
            "method": self.cfg.method,
            "model": self.cfg.model,
            "dataset": self.cfg.dataset,
            "epochs": self.epoch,
            "test_acc": last.get("test_acc"),
            "test_loss": last.get("test_loss"),
            "best_acc": self.best_score,
            "best_epoch": self.best_epoch,
        }
        out.update({k: v for k, v in self.last_eval.items() if k not in out and k != "score"})
        return {
            **out,
            "wall_time_s": self.wall_offset + (time.perf_counter() - self._start),
            "train_time_s": self.train_time,
            "images_per_sec": stats_rate(self.images_seen, self.train_time),
            "teacher_queries": self._queries_total(),
            "train_samples": len(self.loader.base_indices),
            "world_size": self.ctx.world_size,
            "device": str(self.device),
            "amp": self.amp,  # what amp=auto resolved to on this device
        }

    def close(self) -> None:
        """Drop the DDP wrapper and the method's link back (clean gloo shutdown, no cycle)."""
        self.model = None  # type: ignore[assignment]
        self.distiller._engine = None


def stats_rate(images: float, seconds: float) -> float:
    """Images per second, 0 when no time has passed."""
    return images / seconds if seconds > 0 else 0.0
