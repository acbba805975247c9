"""Fashion-MNIST KD benchmark: student alone vs Hinton KD over seeds, and engine overhead.

Prints two markdown tables:
1. teacher, student alone and KD student test accuracy (mean +- std over seeds) at one epoch budget;
2. KD images/s of distillkit's Trainer vs a minimal hand-written PyTorch KD loop on the same
   teacher, student, batch and data in the same process (no augmentation in either), per second
   of the process's CPU time (one thread: other jobs on a shared machine do not count).

The teacher is trained once and reused from its run directory (--out/teacher). The report goes to
OUT/report.md; an earlier invocation's report is kept, renamed with its time
(report.YYYYmmdd-HHMMSS.md), so a later `--skip-accuracy` run does not lose its accuracy table.
Every student run trained and every overhead measurement appends one JSON line to --results
(default benchmarks/results/kd_fmnist.jsonl; never rewritten).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fmnist_teacher as shared  # noqa: E402
from _common import keep_previous  # noqa: E402

from distillkit.config import config_from_dict
from distillkit.data.datasets import load_dataset
from distillkit.data.transforms import normalize, to_float
from distillkit.engine.checkpoint import model_from_checkpoint
from distillkit.engine.trainer import Trainer
from distillkit.methods.kd import KD
from distillkit.models import build_model
from distillkit.report import markdown_table
from distillkit.runner import run
from distillkit.teachers import LocalTeacher

RESULTS = Path(__file__).resolve().parent / "results" / "kd_fmnist.jsonl"


def machine() -> str:
    """torch version and thread count of this process."""
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="bench_results/kd_fmnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--teacher-model", default="resnet20")
    p.add_argument("--student-model", default="cnn_small")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5, help="student epoch budget (alone and KD)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--overhead-steps", type=int, default=150)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--results", default=str(RESULTS), help="JSON-lines file the runs append to")
    return p.parse_args()


def base_spec(args: argparse.Namespace, **extra) -> dict:
    spec = {
        "dataset": "fashion-mnist",
        "data_dir": args.data_dir,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_epochs": 0.5,
        "quiet": True,
    }
    spec.update(extra)
    return spec


def ensure_teacher(args: argparse.Namespace, out: Path) -> Path:
    """Train the teacher once; later invocations reuse its run directory."""
    tdir = out / "teacher"
    if (tdir / "metrics.json").is_file():
        return tdir
    if tdir.exists():
        raise SystemExit(
            f"{tdir} holds an unfinished teacher run: `distillkit resume {tdir}` or delete it"
        )
    spec = base_spec(args, name="teacher", model=args.teacher_model, epochs=args.teacher_epochs)
    spec["out_dir"] = str(tdir)
    print(f"training teacher {args.teacher_model} for {args.teacher_epochs} epochs ...", flush=True)
    run(config_from_dict(spec))
    return tdir


def accuracy_table(args: argparse.Namespace, out: Path, tdir: Path) -> str:
    seeds = [int(s) for s in args.seeds.split(",")]
    teacher = json.loads((tdir / "metrics.json").read_text())
    results: dict[str, list[dict]] = {"student alone": [], "KD": []}
    for seed in seeds:
        for label, method in (("student alone", "ce"), ("KD", "kd")):
            rdir = out / f"{method}_s{seed}"
            trained = not (rdir / "metrics.json").is_file()
            if trained:
                spec = base_spec(
                    args, name=f"{method}_s{seed}", model=args.student_model, epochs=args.epochs
                )
                spec.update(method=method, seed=seed, out_dir=str(rdir))
                if method == "kd":
                    spec.update(teacher=str(tdir), options={"temperature": 4.0, "alpha": 0.1})
                run(config_from_dict(spec))
            summary = json.loads((rdir / "metrics.json").read_text())
            if trained:  # a run reused from an earlier invocation is already recorded
                record = {"kind": "accuracy", "run": label, "seed": seed, "machine": machine()}
                keys = ("model", "epochs", "test_acc", "best_acc", "images_per_sec")
                record.update({k: summary[k] for k in keys}, teacher=args.teacher_model)
                shared.append_result(args.results, record)
            results[label].append(summary)
            print(f"seed {seed} {label}: {summary['test_acc']:.2f}", flush=True)

    def stat(rows: list[dict], key: str) -> str:
        vals = [r[key] for r in rows]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.2f} +- {sd:.2f}"

    rows = [
        {
            "run": f"teacher ({args.teacher_model}, {teacher['epochs']} ep)",
            "test acc (final)": f"{teacher['test_acc']:.2f}",
            "best acc": f"{teacher['best_acc']:.2f}",
            "img/s": f"{teacher['images_per_sec']:.0f}",
        }
    ]
    for label, rs in results.items():
        rows.append(
            {
                "run": f"{label} ({args.student_model}, {args.epochs} ep, seeds {args.seeds})",
                "test acc (final)": stat(rs, "test_acc"),
                "best acc": stat(rs, "best_acc"),
                "img/s": f"{statistics.mean(r['images_per_sec'] for r in rs):.0f}",
            }
        )
    gain = statistics.mean(r["test_acc"] for r in results["KD"]) - statistics.mean(
        r["test_acc"] for r in results["student alone"]
    )
    table = markdown_table(rows, ["run", "test acc (final)", "best acc", "img/s"])
    return table + f"\n\nKD gain over student alone (mean final test acc): {gain:+.2f} points"


def hand_written_kd(args: argparse.Namespace, tdir: Path, steps: int) -> float:
    """The plainest KD loop we would write by hand; returns images/s."""
    bundle = load_dataset("fashion-mnist", data_dir=args.data_dir)
    teacher, _ = model_from_checkpoint(tdir)
    torch.manual_seed(0)
    student = build_model(args.student_model, in_channels=1, num_classes=10, image_size=28)
    opt = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    images, labels = bundle.train.images, bundle.train.labels
    t_temp, alpha, b = 4.0, 0.1, args.batch_size
    perm = torch.randperm(len(labels))
    student.train()
    done = 0
    start = None
    for step in range(steps + 10):
        if step == 10:  # warm-up steps excluded, as the trainer's first epoch includes them too
            start, done = time.process_time(), 0
        idx = perm[(step * b) % (len(perm) - b) :][:b]
        x = normalize(to_float(images[idx]), bundle.mean, bundle.std)
        y = labels[idx]
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        kl = F.kl_div(
            F.log_softmax(s / t_temp, 1),
            F.log_softmax(t / t_temp, 1),
            reduction="batchmean",
            log_target=True,
        )
        loss = alpha * F.cross_entropy(s, y) + (1 - alpha) * t_temp**2 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += b
    return done / (time.process_time() - start)


def engine_epoch_kd(
    args: argparse.Namespace, tdir: Path, steps: int, out: Path, **engine: object
) -> float:
    """distillkit's full Trainer.train_epoch (progress, accounting, checks included); images/s.

    `engine` overrides config keys: amp="none", channels_last=False is the hand loop's float32
    NCHW step exactly, so the difference is the engine's own overhead; no overrides is the
    default config (bf16 autocast where the CPU has it, channels_last).
    """
    bundle = load_dataset("fashion-mnist", data_dir=args.data_dir)
    teacher, _ = model_from_checkpoint(tdir)
    torch.manual_seed(0)
    student = build_model(args.student_model, in_channels=1, num_classes=10, image_size=28)
    cfg = config_from_dict(
        base_spec(
            args,
            name="overhead",
            model=args.student_model,
            method="kd",
            teacher=str(tdir),
            augment=False,
            teacher_cache=False,  # the hand loop asks its teacher every step too
            **engine,
        )
    )
    distiller = KD(student, LocalTeacher(teacher), 4.0, 0.1, num_classes=10)
    n = steps * args.batch_size
    trainer = Trainer(
        cfg,
        distiller,
        bundle,
        torch.device("cpu"),
        out / "overhead",
        train_indices=torch.arange(n).numpy(),
    )
    trainer.train_epoch()  # warm-up epoch, as the hand loop skips its first batches
    trainer.epoch += 1
    t0 = time.process_time()
    stats = trainer.train_epoch()
    return stats["train_images"] / (time.process_time() - t0)


def overhead_table(args: argparse.Namespace, tdir: Path, out: Path) -> str:
    rows = []
    hand, same, default = [], [], []
    for rep in range(3):  # interleaved repeats: machine noise hits every loop alike
        hand.append(hand_written_kd(args, tdir, args.overhead_steps))
        same.append(
            engine_epoch_kd(
                args, tdir, args.overhead_steps, out / "same", amp="none", channels_last=False
            )
        )
        default.append(engine_epoch_kd(args, tdir, args.overhead_steps, out / "default"))
        print(
            f"rep {rep}: hand {hand[-1]:.0f} img/s, engine (same step) {same[-1]:.0f} img/s, "
            f"engine (defaults) {default[-1]:.0f} img/s",
            flush=True,
        )
    h, e, d = max(hand), max(same), max(default)
    rows.append(
        {"loop": "hand-written PyTorch KD (float32, NCHW)", "img/s (best of 3)": f"{h:.0f}"}
    )
    rows.append(
        {"loop": "distillkit Trainer.train_epoch, same step", "img/s (best of 3)": f"{e:.0f}"}
    )
    rows.append(
        {"loop": "distillkit Trainer.train_epoch, default config", "img/s (best of 3)": f"{d:.0f}"}
    )
    overhead = 100.0 * (h - e) / h
    record = {"kind": "overhead", "machine": machine(), "steps": args.overhead_steps}
    record.update(teacher=args.teacher_model, student=args.student_model, batch=args.batch_size)
    record.update(hand=hand, same_step=same, default_config=default, overhead_pct=overhead)
    shared.append_result(args.results, record)
    return (
        markdown_table(rows, ["loop", "img/s (best of 3)"])
        + f"\n\nengine overhead on the same step: {overhead:+.1f}%; "
        + f"default config: {d / h:.2f}x the hand-written loop"
    )


def main() -> None:
    """Train the teacher once, measure accuracy and engine overhead, write OUT/report.md."""
    args = parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tdir = ensure_teacher(args, out)
    sections = []
    if not args.skip_accuracy:
        sections.append("### Accuracy\n\n" + accuracy_table(args, out, tdir))
    sections.append(
        "### Engine overhead (KD step, no augmentation)\n\n" + overhead_table(args, tdir, out)
    )
    report = "\n\n".join(sections) + f"\n\nMachine: {machine()}\n"
    keep_previous(out, ["report.md"])
    (out / "report.md").write_text(report)
    print("\n" + report)


if __name__ == "__main__":
    main()
