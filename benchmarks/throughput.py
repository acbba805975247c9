"""Training throughput of the engine: images/s for zoo models on Fashion-MNIST, per AMP mode.

Each cell is one epoch of `distillkit train` (the whole engine: loader, augmentation, optimizer,
evaluation excluded from the rate) read from the run's metrics.json; the first epoch includes
CUDA warm-up, so `--epochs 2` reports the second.

    python benchmarks/throughput.py --device cuda --models resnet8,resnet20,resnet32x4
    python benchmarks/throughput.py --device cpu --models resnet8 --amp none --fraction 0.05
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distillkit.config import config_from_dict
from distillkit.runner import run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="resnet8,resnet20,resnet32x4")
    p.add_argument("--amp", default="none,bf16", help="comma list of none|bf16|fp16")
    p.add_argument("--batch-sizes", default="128")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--fraction", type=float, default=1.0, help="random share of the train split")
    p.add_argument("--out", default="bench_results/throughput")
    args = p.parse_args()
    rows = []
    for model in args.models.split(","):
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            for amp in args.amp.split(","):
                name = f"{model}_b{batch}_{amp}"
                spec = {
                    "name": name,
                    "dataset": "fashion-mnist",
                    "data_dir": args.data_dir,
                    "model": model,
                    "epochs": args.epochs,
                    "batch_size": batch,
                    "amp": amp,
                    "device": args.device,
                    "quiet": True,
                    "out_dir": str(Path(args.out) / name),
                }
                if args.fraction < 1.0:
                    spec["subset"] = {"method": "random", "fraction": args.fraction}
                run(config_from_dict(spec))
                last = (Path(args.out) / name / "metrics.jsonl").read_text().splitlines()[-1]
                row = json.loads(last)
                rows.append((model, batch, amp, row["images_per_sec"], row["test_acc"]))
                print(f"{name}: {row['images_per_sec']:.0f} img/s", flush=True)
    print("\n| model | batch | amp | train img/s (last epoch) | test acc after |")
    print("|---|---|---|---|---|")
    for model, batch, amp, ips, acc in rows:
        print(f"| {model} | {batch} | {amp} | {ips:.0f} | {acc:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
