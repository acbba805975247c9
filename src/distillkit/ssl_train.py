"""Self-supervised runs (DINO alone, or MOKD for a pair): training loop, resume, evaluation.

The run config (`SSLConfig`) lives with the method in `methods/dino.py`, the views in
`data/multicrop.py`, the k-NN / linear-probe evaluators in `engine/evaluation.py`.

The supervised Trainer assumes one student, one optimizer and labels; SSL runs have one or two
students, one optimizer each, EMA teachers and per-step schedules, so they get their own loop
here. It reuses the engine's checkpointing, RNG capture, device and torchrun helpers and writes
the usual run directory (config.yaml, metrics.jsonl, metrics.json, checkpoints/{last,best}.pt).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from distillkit.config import ConfigError, _merge
from distillkit.data.datasets import DataBundle, load_dataset
from distillkit.data.loader import BatchLoader, derive_seed
from distillkit.data.multicrop import MultiCrop
from distillkit.engine.checkpoint import (
    KILL_ENV,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from distillkit.engine.distributed import (
    DistContext,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from distillkit.engine.evaluation import eval_subset, probe_accuracies
from distillkit.engine.logging import MetricsLogger
from distillkit.engine.trainer import (
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from distillkit.methods.dino import (
    DINO,
    SSLConfig,
    SSLModelConfig,
    build_dino,
    load_ssl_config,
    ssl_config_from_dict,
)
from distillkit.methods.mokd import build_mokd
from distillkit.methods.ssl_schedules import cosine_value, ema_momentum, lr_at, teacher_temperature

# the config and its loaders live with the method; runs and tests load them from here as well
__all__ = [
    "SSLConfig",
    "SSLModelConfig",
    "SSLTrainer",
    "build_method",
    "evaluate_ssl_checkpoint",
    "is_ssl_checkpoint",
    "load_ssl_config",
    "resume_ssl",
    "run_ssl",
    "ssl_config_from_dict",
]

CHECKPOINT_KIND = "ssl"
_VIEW_STREAM = 7  # randomness stream id for multi-crop, distinct from the loader's streams


# --------------------------------------------------------------------------- building


def build_method(cfg: SSLConfig, bundle: DataBundle) -> DINO:
    """The DINO or MOKD module, students initialised from cfg.seed (each member its own stream)."""
    if cfg.method == "mokd":
        return build_mokd(cfg, bundle)
    return build_dino(cfg, bundle)


def build_optimizer(mcfg: SSLModelConfig, module: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases and norm scales (group 0 decays, group 1 not)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": mcfg.weight_decay},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if mcfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=mcfg.lr, momentum=mcfg.momentum)
    return torch.optim.AdamW(groups, lr=mcfg.lr)


# --------------------------------------------------------------------------- distributed helpers


def _dist_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Mean of gradients over ranks in one flat all-reduce (no DDP wrapper: two models, two optimizers)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _broadcast_buffers(module: nn.Module) -> None:
    # BatchNorm running stats drift apart per rank; rank 0's copy is the one checkpoints keep
    for b in module.buffers():
        dist.broadcast(b, src=0)


# --------------------------------------------------------------------------- trainer


class SSLTrainer:
    """Epoch loop over multi-crop views: per-model optimizers, EMA teachers, k-NN/probe evaluation."""

    def __init__(
        self, cfg: SSLConfig, run_dir: Path, device: torch.device, ctx: DistContext | None = None
    ):
        self.cfg = cfg
        self.ctx = ctx or DistContext()
        self.device = device
        self.run_dir = Path(run_dir)
        if cfg.batch_size % self.ctx.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be divisible by the number of processes "
                f"{self.ctx.world_size} (it is the global batch)"
            )
        self.bundle = load_dataset(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size)
        seed_everything(cfg.seed, cfg.deterministic)
        self.method = build_method(cfg, self.bundle).to(device)
        if self.ctx.enabled:
            self.method.reduce = _dist_sum
            self.method.world_size = self.ctx.world_size
        self.names = self.method.names()
        self.mcfgs = cfg.member_configs()
        self.optimizers = {
            n: build_optimizer(self.mcfgs[n], self.method.members[n].student) for n in self.names
        }
        indices = None
        if cfg.max_train_samples is not None and cfg.max_train_samples < len(self.bundle.train):
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, 99))
            indices = torch.randperm(len(self.bundle.train), generator=g)[: cfg.max_train_samples]
        # labels are never read in training: the loader is used only for shuffling and sharding
        self.loader = BatchLoader(
            self.bundle.train,
            cfg.batch_size // self.ctx.world_size,
            mean=self.bundle.mean,
            std=self.bundle.std,
            shuffle=True,
            augment=False,
            seed=cfg.seed,
            drop_last=True,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            indices=indices,
        )
        if len(self.loader) == 0:
            raise ValueError(
                f"batch_size {cfg.batch_size} is larger than the training set "
                f"({self.loader.num_samples * self.ctx.world_size} samples)"
            )
        self.images = self.bundle.train.images.to(device)
        g, local = cfg.crop_sizes(self.bundle.image_size)
        self.multicrop = MultiCrop(
            g,
            local,
            cfg.local_crops_number,
            tuple(cfg.global_crops_scale),
            tuple(cfg.local_crops_scale),
            flip=self.bundle.hflip,
            jitter=cfg.jitter,
            blur=cfg.blur,
            solarize=cfg.solarize,
        )
        self._mean = torch.tensor(self.bundle.mean, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.bundle.std, device=device).view(1, -1, 1, 1)
        self.logger = MetricsLogger(self.run_dir, enabled=self.ctx.is_main)
        self.epoch = 0
        self.step = 0
        self.best_score = -1.0
        self.best_epoch = 0
        self.train_time = 0.0
        self.images_seen = 0
        self.wall_offset = 0.0
        self.last_eval: dict[str, dict[str, float]] = {}

    # -- state ---------------------------------------------------------------------------------
    def model_meta(self) -> dict[str, Any]:
        """What rebuilding each model needs (evaluation, export)."""
        return {
            n: {
                "name": self.mcfgs[n].name,
                "kwargs": dict(self.mcfgs[n].kwargs),
                "in_channels": self.bundle.in_channels,
                "num_classes": self.bundle.num_classes,
                "image_size": self.bundle.image_size,
                "dataset": self.bundle.name,
                "mean": list(self.bundle.mean),
                "std": list(self.bundle.std),
            }
            for n in self.names
        }

    def state(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly."""
        return {
            "kind": CHECKPOINT_KIND,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "method": self.method.state_dict(),
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "model_meta": self.model_meta(),
            "rng": rng_state(),
            "history": self.logger.history,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "last_eval": self.last_eval,
            "train_time": self.train_time,
            "images_seen": self.images_seen,
            "wall_time": self.wall_offset + (time.perf_counter() - self._start),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore a state written by `state()`, RNG included."""
        self.method.load_state_dict(state["method"])
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.last_eval = state.get("last_eval", {})
        self.train_time, self.images_seen = state["train_time"], state["images_seen"]
        self.wall_offset = state["wall_time"]
        self.logger.restore(state["history"])
        set_rng_state(state["rng"])

    # -- schedules -----------------------------------------------------------------------------
    def _total_steps(self) -> int:
        return self.cfg.epochs * len(self.loader)

    def _set_schedules(self, name: str) -> float:
        mcfg, opt = self.mcfgs[name], self.optimizers[name]
        spe = len(self.loader)
        base, final = mcfg.effective_lr(self.cfg.batch_size)
        lr = lr_at(self.step, spe, self.cfg.epochs, base, final, mcfg.warmup_epochs)
        wd_end = mcfg.weight_decay if mcfg.weight_decay_end is None else mcfg.weight_decay_end
        wd = cosine_value(self.step, self._total_steps(), mcfg.weight_decay, wd_end)
        for i, group in enumerate(opt.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        return lr

    # -- loop ----------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        """One pass over this rank's shard; loss terms are averaged over steps and ranks."""
        cfg = self.cfg
        self.method.train()
        self.loader.set_epoch(self.epoch)
        gen = torch.Generator().manual_seed(
            derive_seed(cfg.seed, self.epoch, _VIEW_STREAM, self.ctx.rank)
        )
        temp = teacher_temperature(
            self.epoch, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs
        )
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        lrs: dict[str, float] = {}
        momenta: dict[str, float] = {}
        show = self.ctx.is_main and not cfg.quiet and sys.stderr.isatty()
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(self.loader), desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False
            )
        for idx in self.loader.epoch_indices().split(self.loader.batch_size):
            if len(idx) < self.loader.batch_size:
                break  # drop_last: equal batches keep centers and schedules comparable
            x = self.images[idx.to(self.device)].float().div_(255.0)
            views = [(v - self._mean) / self._std for v in self.multicrop(x, gen)]
            losses = self.method.compute_losses(views, temp)
            total = sum(sum(terms.values()) for terms in losses.values())
            if not torch.isfinite(total):
                values = {f"{n}/{k}": float(v) for n, t in losses.items() for k, v in t.items()}
                raise FloatingPointError(
                    f"loss became {float(total)} at epoch {self.epoch + 1} (terms {values}); lower lr"
                )
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            total.backward()
            for n in self.names:
                student = self.method.members[n].student
                params = [p for p in student.parameters() if p.requires_grad]
                if self.ctx.enabled:
                    _average_gradients(params, self.ctx.world_size)
                mcfg = self.mcfgs[n]
                if mcfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, mcfg.grad_clip)
                if self.epoch < mcfg.freeze_last_layer:
                    for pname, p in student.named_parameters():
                        if "last_layer" in pname:
                            p.grad = None
                lrs[n] = self._set_schedules(n)
                self.optimizers[n].step()
                momenta[n] = ema_momentum(self.step, self._total_steps(), mcfg.ema_momentum)
            self.method.update_teachers(momenta)
            self.step += 1
            steps += 1
            for n, terms in losses.items():
                for k, v in terms.items():
                    key = f"loss_{n}_{k}"
                    sums[key] = sums.get(key, 0.0) + v.detach().float()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total.item():.3f}")
        if bar is not None:
            bar.close()
        if self.ctx.enabled:
            for n in self.names:
                _broadcast_buffers(self.method.members[n])
        keys = sorted(sums)
        local = torch.tensor([sums[k].item() for k in keys] + [float(steps)], dtype=torch.float64)
        if self.ctx.enabled:
            local = _dist_sum(local.to(self.device)).cpu()
        count = max(local[-1].item(), 1.0)
        out = {k: local[i].item() / count for i, k in enumerate(keys)}
        for n in self.names:
            out[f"loss_{n}"] = sum(v for k, v in out.items() if k.startswith(f"loss_{n}_"))
            out[f"lr_{n}"] = lrs.get(n, 0.0)
            out[f"ema_momentum_{n}"] = momenta.get(n, 0.0)
        out["teacher_temp"] = temp
        out["train_images"] = steps * self.loader.batch_size * self.ctx.world_size
        return out

    def evaluate(self) -> dict[str, dict[str, float]]:
        """k-NN and linear-probe accuracy (%) of each EMA teacher's frozen backbone features."""
        cfg, b = self.cfg, self.bundle
        train = eval_subset(b.train, cfg.eval_train_samples, derive_seed(cfg.seed, 97))
        test = eval_subset(b.test, cfg.eval_test_samples, derive_seed(cfg.seed, 98))
        return {
            n: probe_accuracies(
                self.method.members[n].teacher.backbone,
                train,
                test,
                b,
                self.device,
                batch_size=cfg.eval_batch_size,
                knn_k=cfg.knn_k,
                knn_temperature=cfg.knn_temperature,
                probe_steps=cfg.probe_steps,
                probe_l2=cfg.probe_l2,
            )
            for n in self.names
        }

    def fit(self, stop_after_epoch: int | None = None) -> dict[str, Any]:
        """Train to cfg.epochs (or stop after `stop_after_epoch`, as a kill would) and summarise."""
        cfg = self.cfg
        self._start = time.perf_counter()
        kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            stats = self.train_epoch()
            seconds = time.perf_counter() - t0
            self.train_time += seconds
            self.images_seen += int(stats.pop("train_images"))
            self.epoch += 1
            final = self.epoch == cfg.epochs
            row: dict[str, Any] = {"epoch": self.epoch, **stats}
            improved = False
            due = cfg.eval_every > 0 and self.epoch % cfg.eval_every == 0
            if final or due:
                if self.ctx.is_main:
                    self.last_eval = self.evaluate()
                    for n, accs in self.last_eval.items():
                        row.update({f"{k}_{n}": v for k, v in accs.items()})
                    score = sum(a["knn_acc"] for a in self.last_eval.values()) / len(self.last_eval)
                    row["knn_acc_mean"] = score
                    if score > self.best_score:
                        self.best_score, self.best_epoch, improved = score, self.epoch, True
            row["epoch_time"] = time.perf_counter() - t0
            row["images_per_sec"] = (
                self.images_seen / self.train_time if self.train_time > 0 else 0.0
            )
            self.logger.log(row)
            if self.ctx.is_main and not cfg.quiet:
                terms = " ".join(
                    f"{k}={v:.4f}"
                    for k, v in stats.items()
                    if k.startswith("loss_") and k.count("_") == 1
                )
                accs = " ".join(
                    f"{k}={v:.2f}"
                    for k, v in row.items()
                    if k.startswith(("knn_acc_", "linear_acc_"))
                )
                print(
                    f"[{cfg.name}] epoch {self.epoch}/{cfg.epochs} {terms} {accs} ({row['epoch_time']:.1f}s)",
                    flush=True,
                )
            if self.ctx.is_main and (final or improved or self.epoch % max(1, cfg.save_every) == 0):
                state = self.state()
                save_checkpoint(state, self.run_dir / "checkpoints" / "last.pt")
                if improved:
                    save_checkpoint(state, self.run_dir / "checkpoints" / "best.pt")
            barrier(self.ctx)
            if kill_after and self.epoch == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop_after_epoch is not None and self.epoch >= stop_after_epoch and not final:
                return {"stopped_after_epoch": self.epoch}
        summary = self.summary()
        self.logger.write_final(summary)
        return summary

    def summary(self) -> dict[str, Any]:
        """Final numbers of the run (metrics.json)."""
        models = {n: {"model": self.mcfgs[n].name, **self.last_eval.get(n, {})} for n in self.names}
        out: dict[str, Any] = {
            "name": self.cfg.name,
            "kind": CHECKPOINT_KIND,
            "method": self.cfg.method,
            "dataset": self.cfg.dataset,
            "epochs": self.epoch,
            "models": models,
        }
        for n in self.names:
            for k, v in self.last_eval.get(n, {}).items():
                out[f"{k}_{n}"] = v
        out.update(
            {
                "best_knn_acc_mean": self.best_score,
                "best_epoch": self.best_epoch,
                "wall_time_s": self.wall_offset + (time.perf_counter() - self._start),
                "train_time_s": self.train_time,
                "images_per_sec": self.images_seen / self.train_time
                if self.train_time > 0
                else 0.0,
                "train_samples": int(len(self.loader.base_indices)),
                "world_size": self.ctx.world_size,
                "device": str(self.device),
            }
        )
        return out


# --------------------------------------------------------------------------- entry points


def _setup(cfg: SSLConfig) -> tuple[torch.device, DistContext]:
    device = resolve_device(cfg.device)
    ctx = init_distributed(device)
    if ctx.enabled and cfg.device == "auto" and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, ctx


def _execute(trainer: SSLTrainer, stop_after_epoch: int | None) -> dict[str, Any]:
    try:
        return trainer.fit(stop_after_epoch)
    finally:
        shutdown_distributed(trainer.ctx)
        gc.collect()


def run_ssl(cfg: SSLConfig, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train a fresh SSL run; refuses to overwrite a run directory that has checkpoints."""
    run_dir = cfg.run_dir()
    if (run_dir / "checkpoints" / "last.pt").exists():
        raise FileExistsError(
            f"run directory {run_dir} already holds a checkpoint; use `distillkit ssl --resume "
            f"{run_dir}` to continue it or choose another name/out_dir"
        )
    device, ctx = _setup(cfg)
    trainer = SSLTrainer(cfg, run_dir, device, ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    barrier(ctx)
    return _execute(trainer, stop_after_epoch)


def resume_ssl(
    run_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Continue an SSL run exactly from checkpoints/last.pt (overrides such as epochs=N allowed)."""
    run_dir = Path(run_dir)
    state = load_checkpoint(resolve_checkpoint(run_dir, which="last"))
    if state.get("kind") != CHECKPOINT_KIND:
        raise ConfigError(f"{run_dir} is not an SSL run; use `distillkit resume`")
    data = _merge(dict(state["config"]), dict(overrides or {}))
    data["out_dir"] = str(run_dir)
    cfg = ssl_config_from_dict(data)
    device, ctx = _setup(cfg)
    trainer = SSLTrainer(cfg, run_dir, device, ctx)
    trainer.load_state(state)
    if ctx.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return _execute(trainer, stop_after_epoch)


def is_ssl_checkpoint(state: dict[str, Any]) -> bool:
    """True for checkpoints written by SSLTrainer."""
    return state.get("kind") == CHECKPOINT_KIND


def evaluate_ssl_checkpoint(
    path: str | Path, data_dir: str | None = None, device: str = "auto", which: str = "best"
) -> dict[str, Any]:
    """k-NN and linear-probe accuracy of every EMA teacher in an SSL checkpoint or run directory."""
    ckpt = resolve_checkpoint(path, which=which)
    state = load_checkpoint(ckpt)
    if not is_ssl_checkpoint(state):
        raise ConfigError(f"{ckpt} is not an SSL checkpoint")
    data = dict(state["config"])
    if data_dir is not None:
        data["data_dir"] = data_dir
    data["device"] = device
    cfg = ssl_config_from_dict(data)
    dev = resolve_device(device)
    bundle = load_dataset(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size)
    method = build_method(cfg, bundle)
    method.load_state_dict(state["method"])
    method.to(dev)
    # the trainer's evaluate needs only these attributes
    ev = SSLTrainer.__new__(SSLTrainer)
    ev.cfg, ev.bundle, ev.device, ev.method, ev.names = cfg, bundle, dev, method, method.names()
    results = ev.evaluate()
    out: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "kind": CHECKPOINT_KIND,
        "method": cfg.method,
        "dataset": cfg.dataset,
        "epoch": state["epoch"],
        "models": {n: {"model": state["model_meta"][n]["name"], **r} for n, r in results.items()},
    }
    for n, r in results.items():
        for k, v in r.items():
            out[f"{k}_{n}"] = v
    return out
