"""Which augmentation helps KD? T. stddev vs student test loss on Fashion-MNIST (Wang et al. 2022).

One teacher -> one student per scheme (identity, flip, crop_flip, cutout, mixup, cutmix,
cutmixpick with teacher entropy), all at the same epoch budget, over several seeds. Prints a
markdown table of student accuracy and test loss (mean +- std over seeds), T. stddev, and the
Pearson / Spearman / Kendall correlations between T. stddev and student test loss.

    python benchmarks/augment_fmnist.py                      # full run: 15 epochs, 3 seeds
    python benchmarks/augment_fmnist.py --teacher runs/fmnist_teacher --epochs 5 --seeds 0
    python benchmarks/augment_fmnist.py --epochs 1 --teacher-epochs 1 --seeds 0 --train-fraction 0.02

Results go to OUT/da_score.json, OUT/da_score.csv and OUT/tstddev_vs_test_loss.png; an earlier
invocation's files are kept, renamed with their time (da_score.YYYYmmdd-HHMMSS.json). Students of
an unchanged config are reused from OUT/students.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import keep_previous  # noqa: E402

from distillkit.commands.da_score import correlations, parse_schemes, run_da_score
from distillkit.config import config_from_dict
from distillkit.data.datasets import DataBundle, Split, load_dataset, register_dataset
from distillkit.runner import run

SCHEMES = "identity,flip,crop_flip,cutout,mixup,cutmix,cutmixpick:criterion=teacher_entropy"


def register_fraction_dataset(fraction: float, data_dir: str | None) -> str:
    """Fashion-MNIST with a stratified `fraction` of its training split (test split whole)."""
    if fraction >= 1.0:
        return "fashion-mnist"
    name = "fashion-mnist-frac"

    @register_dataset(name)
    def _load(dd: str | None = None, image_size: int | None = None) -> DataBundle:
        full = load_dataset("fashion-mnist", data_dir=dd or data_dir, image_size=image_size)
        labels = full.train.labels.numpy()
        rng = np.random.default_rng(0)
        keep = []
        for c in range(full.num_classes):
            idx = np.flatnonzero(labels == c)
            keep.append(rng.choice(idx, max(1, round(fraction * len(idx))), replace=False))
        keep = torch.from_numpy(np.sort(np.concatenate(keep)))
        train = Split(full.train.images[keep].clone(), full.train.labels[keep].clone())
        return DataBundle(
            name, train, full.test, full.num_classes, full.in_channels, full.image_size,
            full.mean, full.std, full.classes, full.hflip,
        )  # fmt: skip

    return name


def train_teacher(args: argparse.Namespace, dataset: str, out: Path) -> Path:
    """Train (or reuse) the teacher run directory."""
    run_dir = out / "teacher"
    if (run_dir / "metrics.json").is_file():
        print(f"reusing teacher {run_dir}")
        return run_dir
    cfg = config_from_dict(
        {
            "name": "augment_fmnist_teacher",
            "method": "ce",
            "dataset": dataset,
            "data_dir": args.data_dir,
            "model": args.teacher_model,
            "epochs": args.teacher_epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_epochs": min(1.0, args.teacher_epochs / 2),
            "device": args.device,
            "quiet": not args.verbose,
            "out_dir": str(run_dir),
        }
    )
    t0 = time.perf_counter()
    summary = run(cfg)
    print(f"teacher {args.teacher_model}: test acc {summary['test_acc']:.2f} "
          f"({time.perf_counter() - t0:.0f}s)")  # fmt: skip
    return run_dir


def _pm(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def markdown(result: dict) -> str:
    """The results table and the correlation lines."""
    lines = [
        "| scheme | T. stddev | student acc (%) | student test loss |",
        "|---|---|---|---|",
    ]
    for r in result["schemes"]:
        lines.append(
            f"| {r['scheme']} | {r['t_stddev']:.6f} | {_pm(r['student_test_acc_seeds'], 2)} | "
            f"{_pm(r['student_test_loss_seeds'], 4)} |"
        )
    lines.append("")
    lines.append("| correlation (T. stddev vs test loss) | statistic | p-value |")
    lines.append("|---|---|---|")
    for name, c in result["correlations"].items():
        stat = "n/a" if c["statistic"] is None else f"{c['statistic']:.3f}"
        p = "n/a" if c["pvalue"] is None else f"{c['pvalue']:.3f}"
        lines.append(f"| {name} | {stat} | {p} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train what is missing, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=None, help="reuse a trained teacher run directory")
    ap.add_argument("--epochs", type=int, default=15, help="student epochs (same for every scheme)")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train-fraction", type=float, default=1.0, help="stratified share of train")
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--teacher-model", default="resnet20")
    ap.add_argument("--student-model", default="cnn_small")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/bench_augment_fmnist")
    ap.add_argument("--verbose", action="store_true", help="per-epoch lines")
    args = ap.parse_args(argv)
    if not 0.0 < args.train_fraction <= 1.0:
        ap.error(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    schemes = parse_schemes(args.schemes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dataset = register_fraction_dataset(args.train_fraction, args.data_dir)
    teacher = Path(args.teacher) if args.teacher else train_teacher(args, dataset, out)
    cfg = config_from_dict(
        {
            "name": "augment_fmnist",
            "method": "kd_da",
            "dataset": dataset,
            "data_dir": args.data_dir,
            "model": args.student_model,
            "teacher": str(teacher),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_epochs": min(1.0, args.epochs / 2),
            "options": {"temperature": 4.0},
            "device": args.device,
            "quiet": not args.verbose,
        }
    )
    keep_previous(out, ["da_score.json", "da_score.csv", "tstddev_vs_test_loss.png"])
    t0 = time.perf_counter()
    result = run_da_score(cfg, schemes, seeds=seeds, out_dir=out, train_students=True)
    elapsed = time.perf_counter() - t0
    # correlations over every (scheme, seed) student too: more points, same question
    pairs = [
        (r["t_stddev_seeds"][i], r["student_test_loss_seeds"][i])
        for r in result["schemes"]
        for i in range(len(seeds))
    ]
    result["correlations_per_seed"] = correlations([p[0] for p in pairs], [p[1] for p in pairs])
    (out / "da_score.json").write_text(json.dumps(result, indent=2, default=str))
    frac = f", train fraction {args.train_fraction}" if args.train_fraction < 1 else ""
    print()
    print(f"Fashion-MNIST, teacher {teacher}, student {args.student_model}, {args.epochs} epochs, "
          f"seeds {seeds}{frac} ({elapsed:.0f}s)")  # fmt: skip
    print()
    print(markdown(result))
    print(f"\nresults: {out / 'da_score.json'}, {out / 'da_score.csv'}, {result['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
