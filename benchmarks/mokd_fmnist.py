"""Does MOKD help both models? DINO alone vs MOKD on Fashion-MNIST, without labels in training.

For every seed: the CNN trained alone (DINO), the ViT trained alone (DINO), and the pair trained
with MOKD, all at the same epoch budget on the same (unlabelled) training images. Labels are read
only to evaluate each EMA teacher's frozen features: weighted k-NN (k=20, T=0.07) with the full
training split as memory bank, and a linear probe. Prints a markdown table (mean +- std over
seeds) and writes OUT/results.json. Finished runs are reused, interrupted ones resumed.

    python benchmarks/mokd_fmnist.py --threads 2   # full: 10 epochs x 5000 images, 2 seeds (~45 min)
    python benchmarks/mokd_fmnist.py --epochs 1 --train-samples 256 --seeds 0 \
        --eval-train-samples 2000 --eval-test-samples 1000 --out /tmp/mokd_smoke   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distillkit.ssl_train import resume_ssl, run_ssl, ssl_config_from_dict

CNN = {"name": "resnet8", "optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4, "cross_weight": 1.0}
VIT = {
    "name": "vit_tiny",
    "kwargs": {"patch_size": 4, "dim": 96, "depth": 4, "heads": 3},
    "optimizer": "adamw",
    "lr": 5e-4,
    "weight_decay": 0.04,
    "weight_decay_end": 0.4,
    "grad_clip": None,
    "cross_weight": 0.1,
}


def base_config(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Settings shared by every run of one seed."""
    return {
        "dataset": "fashion-mnist",
        "data_dir": args.data_dir,
        "max_train_samples": args.train_samples,
        "out_dim": args.out_dim,
        "head_hidden": 512,
        "head_bottleneck": 128,
        "thead_width": 96,
        "thead_depth": 2,
        "thead_heads": 3,
        "global_size": 28,
        "local_size": 12,
        "local_crops_number": args.local_crops,
        "global_crops_scale": [0.25, 1.0],
        "local_crops_scale": [0.05, 0.25],
        "warmup_teacher_temp_epochs": max(1, args.epochs // 3),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "eval_every": 0,
        "eval_train_samples": args.eval_train_samples,
        "eval_test_samples": args.eval_test_samples,
        "seed": seed,
        "device": args.device,
        "quiet": not args.verbose,
    }


def member(spec: dict[str, Any], warmup: float, ema: float) -> dict[str, Any]:
    """One model's block with the run-length dependent settings filled in."""
    return {**spec, "warmup_epochs": warmup, "ema_momentum": ema}


def runs_for_seed(args: argparse.Namespace, seed: int) -> dict[str, dict[str, Any]]:
    """The three runs of one seed: CNN alone, ViT alone, MOKD pair."""
    base = base_config(args, seed)
    warm = min(1.0, args.epochs / 10)
    cnn, vit = member(CNN, warm, args.ema), member(VIT, warm, args.ema)
    return {
        "dino_cnn": {**base, "name": f"dino_cnn_s{seed}", "method": "dino", "a": cnn},
        "dino_vit": {**base, "name": f"dino_vit_s{seed}", "method": "dino", "a": vit},
        "mokd": {**base, "name": f"mokd_s{seed}", "method": "mokd", "a": cnn, "b": vit},
    }


def run_one(data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train (or reuse / resume) one run and return its metrics.json."""
    final = run_dir / "metrics.json"
    if final.is_file():
        return json.loads(final.read_text())
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return resume_ssl(run_dir)
    cfg = ssl_config_from_dict({**data, "out_dir": str(run_dir)})
    return run_ssl(cfg)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train-samples", type=int, default=5000, help="unlabelled training images")
    p.add_argument(
        "--eval-train-samples", type=int, default=None, help="k-NN bank / probe set (default all)"
    )
    p.add_argument("--eval-test-samples", type=int, default=None, help="test images (default all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--local-crops", type=int, default=4)
    p.add_argument("--out-dim", type=int, default=1024)
    p.add_argument("--ema", type=float, default=0.99, help="base teacher EMA momentum")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="runs/bench_mokd_fmnist")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    t0 = time.perf_counter()
    results: dict[str, dict[str, list[float]]] = {}
    per_run: dict[str, Any] = {}
    for seed in seeds:
        for kind, data in runs_for_seed(args, seed).items():
            summary = run_one(data, out / f"seed{seed}" / kind)
            per_run[f"{kind}_s{seed}"] = summary
            print(f"[bench] seed {seed} {kind}: " + " ".join(
                f"{k}={summary[k]:.2f}" for k in sorted(summary) if k.startswith(("knn_acc_", "linear_acc_"))
            ) + f" ({summary.get('wall_time_s', 0):.0f}s)", file=sys.stderr, flush=True)  # fmt: skip
            members = {"dino_cnn": {"a": "cnn_dino"}, "dino_vit": {"a": "vit_dino"}}
            names = members.get(kind, {"a": "cnn_mokd", "b": "vit_mokd"})
            for m, row in names.items():
                bucket = results.setdefault(row, {"knn": [], "linear": []})
                bucket["knn"].append(summary[f"knn_acc_{m}"])
                bucket["linear"].append(summary[f"linear_acc_{m}"])
    labels = {
        "cnn_dino": f"CNN ({CNN['name']}) DINO alone",
        "cnn_mokd": f"CNN ({CNN['name']}) with MOKD",
        "vit_dino": f"ViT ({VIT['name']}) DINO alone",
        "vit_mokd": f"ViT ({VIT['name']}) with MOKD",
    }
    print(
        f"\nFashion-MNIST, {args.train_samples} unlabelled training images, {args.epochs} epochs, "
        f"seeds {seeds}; EMA-teacher features\n"
    )
    print("| model | k-NN acc (%) | linear probe acc (%) |")
    print("|---|---|---|")
    for key in ("cnn_dino", "cnn_mokd", "vit_dino", "vit_mokd"):
        r = results.get(key, {"knn": [], "linear": []})
        print(f"| {labels[key]} | {_fmt(r['knn'])} | {_fmt(r['linear'])} |")
    out.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "results": results, "runs": per_run}
    payload["wall_time_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwall time {payload['wall_time_s']:.0f}s; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
