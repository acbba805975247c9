"""Engine speed side by side: hand-written training loops and distillkit's Trainer, same step.

Every workload is one training step repeated over an epoch of a fixed random subset of the train
split: `TEACHER>STUDENT` is Hinton KD (alpha 0.1, T 4, teacher forward every step), a plain model
name is cross-entropy alone. Every row does the same work per step: draw the epoch's shuffle and
per-sample crop/flip, gather the uint8 images, crop, normalise, teacher forward, student forward
and backward, SGD (momentum 0.9, weight decay 5e-4, none on biases and norms) with a per-step
cosine learning rate, and loss and accuracy sums for the epoch.

Rows:
  hand_plain          a typical eager loop: NCHW, teacher under no_grad, the default SGD,
                      loss.item() and accuracy .item() every step
  hand_tuned          channels_last (conv models), teacher under inference_mode with its own
                      memory format and its BNs folded into its convs (torch.fx fuse), fused
                      SGD, zero_grad(set_to_none=True), no host syncs
  hand_compiled       hand_tuned with torch.compile on student and teacher (--compile)
  distillkit          distillkit's Trainer built by runner.prepare from the default config
  distillkit_compile  the same with compile=true (--compile)
  distillkit_base     the default config run by another source tree (--baseline-src, e.g. the
                      last release), in a worker process that only runs while its row is timed
  distillkit_noaug    KD with augment=false and teacher_cache=false (--teacher-cache)
  distillkit_noaug_cached  the same with the teacher cache: after the warm-up epoch the teacher
                      never runs (its saving is this row over distillkit_noaug)

All rows live in this process (except distillkit_base) and are timed in interleaved repeats, in a
rotated order, so machine load hits every row alike. Each repeat is one epoch; the first epoch of
each row is a warm-up (for compiled rows it holds the compile time, reported separately; inductor's
on-disk graph cache is off, so every compile is cold). Rates are medians (and bests) over repeats,
by wall clock and by the process's CPU time (less sensitive to other jobs on a shared machine).
Results are appended to benchmarks/results/engine_speed.jsonl.

    python benchmarks/engine_speed.py --threads 1 --device cpu --repeats 7
    python benchmarks/engine_speed.py --models 'resnet8>cnn_small' --compile --repeats 5
    python benchmarks/engine_speed.py --baseline-src /tmp/old/src   # today's engine alongside
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "engine_speed.jsonl"
ALPHA, TEMPERATURE = 0.1, 4.0
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


@dataclass
class Workload:
    """One training step: KD from `teacher` into `student`, or CE alone when teacher is None."""

    student: str
    teacher: str | None

    @property
    def name(self) -> str:
        """How tables and JSON lines name it."""
        return f"kd {self.teacher}>{self.student}" if self.teacher else f"ce {self.student}"


def parse_workloads(text: str) -> list[Workload]:
    """'resnet8>cnn_small,resnet20' -> [KD resnet8 into cnn_small, CE resnet20]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        teacher, _, student = item.rpartition(">")
        out.append(Workload(student, teacher or None))
    return out


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timer sees it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- hand-written loops


def _is_conv(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


class HandLoop:
    """A training loop written by hand for one workload; `tuned` turns on every known speed-up."""

    def __init__(self, wl, bundle, indices, teacher_dir, args, tuned: bool, compiled: bool):
        from distillkit.engine.checkpoint import model_from_checkpoint
        from distillkit.engine.setup import AMP_DTYPES, resolve_amp
        from distillkit.models import build_model

        self.device, self.batch, self.tuned = args.device, args.batch_size, tuned
        # the tuned loops use bf16 autocast where the device does bf16 math (what amp=auto picks)
        amp = resolve_amp(args.amp, args.device) if tuned else "none"
        self.amp = AMP_DTYPES[amp]
        torch.manual_seed(0)
        self.student = build_model(
            wl.student,
            in_channels=bundle.in_channels,
            num_classes=bundle.num_classes,
            image_size=bundle.image_size,
        ).to(self.device)
        self.teacher = None
        if wl.teacher:
            self.teacher = model_from_checkpoint(teacher_dir, which="best")[0].to(self.device)
            self.teacher.eval().requires_grad_(False)
        self.fmt = torch.contiguous_format
        if tuned and _is_conv(self.student):
            self.fmt = torch.channels_last
            self.student.to(memory_format=self.fmt)
        if tuned and self.teacher is not None:
            from torch.fx.experimental.optimization import fuse

            self.teacher = fuse(self.teacher)  # conv+BN folded for inference
            if _is_conv(self.teacher):
                self.teacher.to(memory_format=torch.channels_last)
        if compiled:
            self.student.compile()
            if self.teacher is not None:
                self.teacher.compile()
        params = list(self.student.parameters())
        groups = [
            {"params": [p for p in params if p.dim() > 1], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": WEIGHT_DECAY},
        ]
        fast = {"fused": True} if tuned else {}
        self.opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, **fast)
        idx = torch.as_tensor(indices, dtype=torch.int64)
        self.images = bundle.train.images[idx].to(self.device)
        self.labels = bundle.train.labels[idx].to(self.device)
        c = self.images.shape[1]
        self.mean = torch.tensor(bundle.mean, device=self.device).reshape(1, c, 1, 1)
        self.inv_std = 1.0 / torch.tensor(bundle.std, device=self.device).reshape(1, c, 1, 1)
        self.pad = max(1, int(self.images.shape[-1]) // 8)
        self.flip = bundle.hflip
        self.steps = math.ceil(len(idx) / self.batch)
        self.total_steps = self.steps * (args.repeats + 1)
        self.step = 0
        self.gen = torch.Generator(self.device).manual_seed(0)

    def _crop_flip(self, x: torch.Tensor, off: torch.Tensor, coins: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.pad
        rows = off[0, :, None] + torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device).expand(b, w)
        cols = torch.where(coins[:, None], (w - 1) - cols, cols) + off[1, :, None]
        flat = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).reshape(b, 1, h * w)
        padded = F.pad(x, (p, p, p, p)).reshape(b, c, -1)
        return padded.gather(2, flat.expand(b, c, h * w)).reshape(b, c, h, w)

    def epoch(self) -> int:
        """One pass over the subset; returns the number of images trained on."""
        n, b, dev = len(self.labels), self.batch, self.device
        # the epoch's shuffle and augmentation drawn on the device at once
        perm = torch.randperm(n, device=dev, generator=self.gen)
        off = torch.randint(0, 2 * self.pad + 1, (2, n), device=dev, generator=self.gen)
        coins = torch.randint(0, 2, (n,), device=dev, generator=self.gen).bool()
        if not self.flip:
            coins.zero_()
        self.student.train()
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.int64)
        plain_loss, plain_correct = 0.0, 0
        no_grad = torch.inference_mode if self.tuned else torch.no_grad
        for s in range(self.steps):
            sel = perm[s * b : (s + 1) * b]
            x = self.images[sel].to(torch.float32).div_(255.0)
            x = self._crop_flip(x, off[:, s * b : (s + 1) * b], coins[s * b : (s + 1) * b])
            x = ((x - self.mean) * self.inv_std).contiguous(memory_format=self.fmt)
            y = self.labels[sel]
            factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, self.step / self.total_steps)))
            for g in self.opt.param_groups:
                g["lr"] = LR * factor
            self.step += 1
            autocast = torch.autocast(dev.type, dtype=self.amp, enabled=self.amp is not None)
            if self.teacher is not None:
                with no_grad(), autocast:
                    t_logits = self.teacher(x)
            self.opt.zero_grad(set_to_none=True)
            with autocast:
                logits = self.student(x)
            logits = logits.float()
            loss = F.cross_entropy(logits, y)
            if self.teacher is not None:
                log_ps = F.log_softmax(logits / TEMPERATURE, dim=1)
                log_pt = F.log_softmax(t_logits.float() / TEMPERATURE, dim=1)
                kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
                loss = ALPHA * loss + (1 - ALPHA) * TEMPERATURE**2 * kl
            loss.backward()
            self.opt.step()
            if self.tuned:
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
            else:
                plain_loss += loss.item() * len(y)
                plain_correct += int((logits.argmax(1) == y).sum().item())
        float(loss_sum), int(correct)  # one sync per epoch, as the engine's epoch summary
        return n


# --------------------------------------------------------------------------- distillkit rows


def engine_config(wl, teacher_dir, args, subset_fraction, out_dir, extra) -> dict:
    """The distillkit config of a workload: defaults except data, model, batch and epochs."""
    spec = {
        "name": "engine_speed",
        "method": "kd" if wl.teacher else "ce",
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "model": wl.student,
        "batch_size": args.batch_size,
        "lr": LR,
        "epochs": args.repeats + 1,
        "device": str(args.device),
        "seed": 0,
        "quiet": True,
        "out_dir": str(out_dir),
        "subset": {"method": "random", "fraction": subset_fraction, "per_class": False},
    }
    if wl.teacher:
        spec["teacher"] = str(teacher_dir)
    spec.update(extra)
    return spec


class EngineRow:
    """distillkit's Trainer, built the way `distillkit train` builds it."""

    def __init__(self, spec: dict):
        from distillkit.config import config_from_dict
        from distillkit.engine.trainer import Trainer
        from distillkit.runner import prepare

        p = prepare(config_from_dict(spec))
        self.trainer = Trainer(
            p.cfg, p.distiller, p.bundle, p.device, p.run_dir, p.ctx, p.train_indices, p.model_meta
        )

    def epoch(self) -> int:
        """One training epoch (no evaluation, no checkpoint), as `fit` runs it."""
        stats = self.trainer.train_epoch()
        self.trainer.epoch += 1
        return int(stats["train_images"])


class WorkerRow:
    """An EngineRow of another source tree, in a child process driven line by line."""

    def __init__(self, spec: dict, src: str, threads: int):
        env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--threads", str(threads)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.last: dict = {}
        if self._read().get("ready") is not True:
            raise RuntimeError(f"worker for {src} did not start")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("worker exited")
        return json.loads(line)

    def epoch(self) -> int:
        """Ask the worker for one epoch; its own timings replace this process's."""
        self.proc.stdin.write("epoch\n")
        self.proc.stdin.flush()
        self.last = self._read()
        return int(self.last["images"])

    def close(self) -> None:
        """Let the worker exit."""
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def worker_main(spec_text: str) -> int:
    """Child side of WorkerRow: build the row, then run an epoch per 'epoch' line."""
    row = EngineRow(json.loads(spec_text))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "epoch":
            break
        wall, cpu = time.perf_counter(), time.process_time()
        images = row.epoch()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(json.dumps({"images": images, "wall": wall, "cpu": cpu}), flush=True)
    return 0


# --------------------------------------------------------------------------- driver


def synthetic_npz(n: int) -> str:
    """A .npz of n random CIFAR-shaped images (speed does not depend on pixel values)."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = Path(tempfile.mkdtemp(prefix="engine_speed_data_")) / "synthetic32.npz"
    test = max(1000, n // 10)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
        y_train=rng.integers(0, 10, n),
        x_test=rng.integers(0, 256, (test, 3, 32, 32), dtype=np.uint8),
        y_test=rng.integers(0, 10, test),
    )
    return str(path)


def make_teacher(model: str, args, out: Path) -> Path:
    """A briefly trained teacher run directory (its accuracy does not matter for speed)."""
    from distillkit.config import config_from_dict
    from distillkit.runner import run

    spec = {
        "name": "teacher",
        "model": model,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "epochs": 1,
        "device": str(args.device),
        "quiet": True,
        "out_dir": str(out),
        "subset": {"method": "random", "fraction": 0.02, "per_class": False},
    }
    run(config_from_dict(spec))
    return out


def time_epoch(row, device: torch.device) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one epoch of a row."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    images = row.epoch()
    sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if isinstance(row, WorkerRow):
        wall, cpu = row.last["wall"], row.last["cpu"]
    return images, wall, cpu


def machine_info(args) -> dict:
    """Where and how the numbers were taken."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    info = {
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_head": head,
        "host": f"{platform.machine()} {os.cpu_count()} cpus",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(args.device),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "argv": sys.argv[1:],
    }
    if args.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(args.device)
    return info


def build_rows(wl: Workload, args, bundle, root: Path) -> dict:
    """Every row of one workload, ready to run epochs."""
    teacher_dir = (
        make_teacher(wl.teacher, args, root / f"teacher_{wl.teacher}") if wl.teacher else None
    )
    n = len(bundle.train)
    fraction = min(1.0, args.samples / n)
    g = torch.Generator().manual_seed(0)
    indices = torch.randperm(n, generator=g)[: round(fraction * n)].tolist()
    rows: dict = {}
    names = [r.strip() for r in args.rows.split(",")]
    if "hand_plain" in names:
        rows["hand_plain"] = HandLoop(wl, bundle, indices, teacher_dir, args, False, False)
    if "hand_tuned" in names:
        rows["hand_tuned"] = HandLoop(wl, bundle, indices, teacher_dir, args, True, False)
    if args.compile and "hand_compiled" in names:
        rows["hand_compiled"] = HandLoop(wl, bundle, indices, teacher_dir, args, True, True)
    if "distillkit" in names:
        spec = engine_config(wl, teacher_dir, args, fraction, root / "dk", {})
        rows["distillkit"] = EngineRow(spec)
    if args.compile and "distillkit_compile" in names:
        spec = engine_config(wl, teacher_dir, args, fraction, root / "dkc", {"compile": True})
        rows["distillkit_compile"] = EngineRow(spec)
    if args.baseline_src:
        spec = engine_config(wl, teacher_dir, args, fraction, root / "base", {})
        rows["distillkit_base"] = WorkerRow(spec, args.baseline_src, args.threads)
    if args.teacher_cache and wl.teacher:
        for name, cache in (("distillkit_noaug", False), ("distillkit_noaug_cached", True)):
            extra = {"augment": False, "teacher_cache": cache}
            spec = engine_config(wl, teacher_dir, args, fraction, root / name, extra)
            rows[name] = EngineRow(spec)
    return rows


def measure(wl: Workload, rows: dict, args) -> list[dict]:
    """Warm-up epoch, then interleaved timed repeats in a rotated order; one dict per row."""
    first = {}
    for name, row in rows.items():
        first[name] = time_epoch(row, args.device)[1]
        print(f"  {wl.name} {name}: warm-up epoch {first[name]:.1f}s", flush=True)
    times: dict[str, list[tuple[int, float, float]]] = {name: [] for name in rows}
    order = list(rows)
    for r in range(args.repeats):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            times[name].append(time_epoch(rows[name], args.device))
    out = []
    for name, ts in times.items():
        wall = statistics.median(i / w for i, w, _ in ts)
        cpu = statistics.median(i / c for i, _, c in ts)
        steady = statistics.median(w for _, w, _ in ts)
        out.append(
            {
                "workload": wl.name,
                "row": name,
                "images_per_epoch": ts[0][0],
                "img_s_wall": round(wall, 1),
                "img_s_cpu": round(cpu, 1),
                "img_s_wall_best": round(max(i / w for i, w, _ in ts), 1),
                "img_s_cpu_best": round(max(i / c for i, _, c in ts), 1),
                "img_s_wall_all": [round(i / w, 1) for i, w, _ in ts],
                "warmup_epoch_s": round(first[name], 2),
                "compile_s": round(max(0.0, first[name] - steady), 2)
                if "compile" in name
                else None,
            }
        )
    # the yardstick: the fastest loop doing the same step (the no-augment rows do less)
    hand = [o for o in out if o["row"].startswith("hand_") and o["row"] != "hand_plain"]
    best = max(hand, key=lambda o: o["img_s_wall"]) if hand else None
    base = next((o for o in out if o["row"] == "distillkit_base"), None)
    for o in out:
        if best is not None and "noaug" not in o["row"]:
            o["vs_fastest_hand_wall"] = round(o["img_s_wall"] / best["img_s_wall"], 3)
            o["vs_fastest_hand_cpu"] = round(o["img_s_cpu"] / best["img_s_cpu"], 3)
            o["fastest_hand"] = best["row"]
        if base is not None and "noaug" not in o["row"]:
            o["vs_base_wall"] = round(o["img_s_wall"] / base["img_s_wall"], 3)
            o["vs_base_cpu"] = round(o["img_s_cpu"] / base["img_s_cpu"], 3)
    return out


def table(results: list[dict]) -> str:
    """Markdown table of the measured rows."""
    lines = [
        "| workload | row | img/s wall | img/s CPU time (median / best) "
        "| vs fastest hand (wall / CPU) | vs base (wall / CPU) | warm-up epoch s | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in results:
        vs = "-"
        if "vs_fastest_hand_wall" in o:
            vs = f"{o['vs_fastest_hand_wall']:.2f} / {o['vs_fastest_hand_cpu']:.2f}"
        vb = f"{o['vs_base_wall']:.2f} / {o['vs_base_cpu']:.2f}" if "vs_base_wall" in o else "-"
        comp = "-" if o["compile_s"] is None else f"{o['compile_s']:.1f}"
        lines.append(
            f"| {o['workload']} | {o['row']} | {o['img_s_wall']:.0f} "
            f"| {o['img_s_cpu']:.0f} / {o['img_s_cpu_best']:.0f} | {vs} | {vb} "
            f"| {o['warmup_epoch_s']:.1f} | {comp} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models", default="resnet8>cnn_small,resnet20", help="TEACHER>STUDENT or MODEL"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per row")
    p.add_argument("--samples", type=int, default=3840, help="training images per epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument(
        "--synthetic",
        type=int,
        default=0,
        help="instead of --dataset: N random 3x32x32 uint8 images in 10 classes (CIFAR's shape)",
    )
    p.add_argument(
        "--amp",
        default="auto",
        help="autocast of the tuned hand loops: auto (as distillkit's default) | none | bf16",
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--compile", action="store_true", help="add the torch.compile rows")
    p.add_argument(
        "--teacher-cache",
        action="store_true",
        help="add KD rows without augmentation, cached or not",
    )
    p.add_argument(
        "--rows",
        default="hand_plain,hand_tuned,hand_compiled,distillkit,distillkit_compile",
        help="which rows to run (comma list)",
    )
    p.add_argument("--baseline-src", default=None, help="a src/ folder of another distillkit")
    p.add_argument("--out", default=str(RESULTS), help="JSON lines file to append to")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads < 1 or args.repeats < 1 or args.samples < args.batch_size:
        p.error("need --threads >= 1, --repeats >= 1 and --samples >= --batch-size")
    torch.set_num_threads(args.threads)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for but CUDA is not available")
    args.device = torch.device(args.device)
    if args.compile:
        # cold compiles: a graph cached on disk by an earlier row or run would hide compile time
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # for every row, as the engine sets it
    from distillkit.data.datasets import load_dataset

    if args.synthetic:
        args.dataset, args.data_dir = "npz", synthetic_npz(args.synthetic)
    bundle = load_dataset(args.dataset, data_dir=args.data_dir)
    info = machine_info(args)
    print(f"threads={args.threads} device={args.device} torch={torch.__version__} "
          f"load={info['load_avg_start']}", flush=True)  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="engine_speed_") as tmp:
        for wl in parse_workloads(args.models):
            rows = build_rows(wl, args, bundle, Path(tmp) / wl.name.replace(" ", "_"))
            try:
                results += measure(wl, rows, args)
            finally:
                for row in rows.values():
                    if isinstance(row, WorkerRow):
                        row.close()
    info["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        for o in results:
            fh.write(json.dumps({**info, **o}) + "\n")
    print(table(results))
    print(f"load average {info['load_avg_start']} -> {info['load_avg_end']}; appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
