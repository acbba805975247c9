"""Black-box KD on Fashion-MNIST through a real HTTP teacher: MEKD vs baselines at query budgets.

Setting (after MEKD, Lin et al. CVPR 2024):
- cloud teacher: `--teacher-model` trained on the full Fashion-MNIST train split, served by
  `distillkit.teachers.server` on loopback (one server with soft answers, one with hard answers);
- edge data: an unlabeled 10% shard of the train split drawn with a class skew: class c is
  sampled with weight `skew ** (-c / 9)`, so class 0 is `--skew` (default 5) times as frequent as
  class 9 (a fixed shard, seed 1234, the same for every run). Labels of the shard are never used
  in a loss; the test set is the full, balanced Fashion-MNIST test split;
- every black-box run gets a fresh API key whose server-side budget equals the run's budget.

Methods per budget and seed: black-box KD on the edge images (soft answers), hard-label training on
the edge images, MEKD with soft answers, MEKD with hard answers; and white-box KD on the edge images
(local teacher, unlimited queries) as the upper reference. Reports test accuracy (mean +- std over
seeds), images the teacher answered, and MB exchanged over HTTP.

    python benchmarks/mekd_fmnist.py                     # full: budgets 5k/20k/100k, 3 seeds
    python benchmarks/mekd_fmnist.py --smoke             # minutes on a CPU: tiny everything
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import numpy as np
import torch

from distillkit.config import config_from_dict
from distillkit.data.datasets import DataBundle, Split, load_dataset, register_dataset
from distillkit.runner import _execute, _write_run_files, prepare, run

EDGE = "fashion-mnist-edge"
EDGE_SEED = 1234


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="bench_results/mekd_fmnist")
    p.add_argument(
        "--data-dir", default=None, help="default: the loader's search (/usr/share/datasets/...)"
    )
    p.add_argument("--teacher-model", default="resnet20")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--student-model", default="cnn_small")
    p.add_argument("--epochs", type=int, default=60, help="student epochs (MEKD: GAN + distill)")
    p.add_argument("--gan-epochs", type=int, default=30)
    p.add_argument("--budgets", default="5000,20000,100000")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--edge-fraction", type=float, default=0.1)
    p.add_argument("--skew", type=float, default=5.0)
    p.add_argument("--methods", default="blackbox_kd,blackbox_hard,mekd_soft,mekd_hard,whitebox_kd")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny sizes to check the pipeline")
    args = p.parse_args()
    if args.smoke:
        args.teacher_model, args.teacher_epochs = "mlp", 1
        args.student_model, args.epochs, args.gan_epochs = "mlp", 2, 1
        args.budgets, args.seeds, args.edge_fraction = "300", "0", 0.01
    return args


def edge_indices(labels: np.ndarray, fraction: float, skew: float, num_classes: int) -> np.ndarray:
    """A class-skewed shard: class c drawn with weight skew**(-c/(K-1)), size fraction * n."""
    rng = np.random.default_rng(EDGE_SEED)
    size = int(round(fraction * len(labels)))
    weights = skew ** (-np.arange(num_classes) / max(1, num_classes - 1))
    counts = np.bincount(labels, minlength=num_classes)
    want = np.minimum(np.floor(weights / weights.sum() * size).astype(int), counts)
    want[0] += size - want.sum()
    picks = [
        rng.choice(np.nonzero(labels == c)[0], want[c], replace=False) for c in range(num_classes)
    ]
    return np.sort(np.concatenate(picks))


def register_edge(args: argparse.Namespace) -> None:
    """Register the edge shard as a dataset: skewed train shard, full test split."""

    @register_dataset(EDGE)
    def _load(data_dir: str | None = None, image_size: int | None = None) -> DataBundle:
        full = load_dataset("fashion-mnist", data_dir=data_dir, image_size=image_size)
        idx = torch.from_numpy(
            edge_indices(full.train.labels.numpy(), args.edge_fraction, args.skew, full.num_classes)
        )
        full.train = Split(full.train.images[idx], full.train.labels[idx])
        full.name = EDGE
        return full


def run_with_teacher_stats(spec: dict) -> tuple[dict, dict]:
    """Run a config; return its summary and its RemoteTeacher counters (if any)."""
    p = prepare(config_from_dict(spec))
    _write_run_files(p)
    summary = _execute(p, None)
    teacher = p.distiller.teacher
    stats = teacher.stats() if hasattr(teacher, "stats") else {}
    return summary, stats


def main() -> int:
    args = parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "4"))))
    from distillkit.teachers.keys import BudgetStore, KeyStore
    from distillkit.teachers.server import ServerThread, create_app, load_service

    register_edge(args)
    out = Path(args.out)
    base = {"data_dir": args.data_dir, "device": args.device, "quiet": True, "batch_size": 128}
    teacher_dir = out / "teacher"
    if not (teacher_dir / "metrics.json").is_file():
        run(
            config_from_dict(
                {
                    **base,
                    "name": "teacher",
                    "dataset": "fashion-mnist",
                    "model": args.teacher_model,
                    "epochs": args.teacher_epochs,
                    "lr": 0.05,
                    "out_dir": str(teacher_dir),
                }
            )
        )
    teacher_acc = json.loads((teacher_dir / "metrics.json").read_text())["test_acc"]

    keys = {kind: KeyStore() for kind in ("soft", "hard")}
    servers = {}
    for kind in ("soft", "hard"):
        app = create_app(
            load_service(teacher_dir, kind), keys[kind], BudgetStore(out / f"state_{kind}.db")
        )
        servers[kind] = ServerThread(app).start()

    student = {
        **base,
        "dataset": EDGE,
        "model": args.student_model,
        "epochs": args.epochs,
        "lr": 0.05,
    }
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    try:
        for budget in [int(b) for b in args.budgets.split(",")]:
            for method in methods:
                accs, queries, mbytes = [], [], []
                for seed in [int(s) for s in args.seeds.split(",")]:
                    name = f"{method}_b{budget}_s{seed}"
                    run_dir = out / "runs" / name
                    spec = {**student, "name": name, "seed": seed, "out_dir": str(run_dir)}
                    if method == "whitebox_kd":
                        spec.update(method="kd", teacher=str(teacher_dir))
                    else:
                        kind = "hard" if method in ("blackbox_hard", "mekd_hard") else "soft"
                        key = keys[kind].add(name, budget=budget)
                        os.environ["DISTILLKIT_API_KEY"] = key
                        opts = {"teacher_url": servers[kind].url, "budget": budget}
                        if method.startswith("mekd"):
                            spec["method"] = "mekd"
                            opts.update(gan_epochs=args.gan_epochs, gan_query_fraction=0.3)
                        else:
                            spec["method"] = method
                        spec["options"] = opts
                    summary, stats = run_with_teacher_stats(spec)
                    accs.append(summary["test_acc"])
                    queries.append(summary["teacher_queries"])
                    mbytes.append(
                        (stats.get("bytes_sent", 0) + stats.get("bytes_received", 0)) / 1e6
                    )
                    print(
                        f"{name}: acc={summary['test_acc']:.2f} queries={summary['teacher_queries']} "
                        f"MB={mbytes[-1]:.2f}",
                        flush=True,
                    )
                rows.append(
                    {
                        "budget": budget,
                        "method": method,
                        "acc_mean": statistics.mean(accs),
                        "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                        "queries": statistics.mean(queries),
                        "MB": statistics.mean(mbytes),
                    }
                )
    finally:
        for s in servers.values():
            s.stop()

    print(f"\nteacher {args.teacher_model} (full train split): test acc {teacher_acc:.2f}")
    print(
        f"edge: {args.edge_fraction:.0%} shard, class skew {args.skew}; student {args.student_model}\n"
    )
    print("| budget | method | test acc (mean +- std) | teacher queries | MB exchanged |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['budget']} | {r['method']} | {r['acc_mean']:.2f} +- {r['acc_std']:.2f} | "
            f"{r['queries']:.0f} | {r['MB']:.2f} |"
        )
    (out / "results.json").write_text(
        json.dumps({"teacher_acc": teacher_acc, "rows": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
