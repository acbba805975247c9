"""The demo job (`distillkit demo`) over several seeds: its seed spread, for comparing engines.

Each seed runs the three demo runs (teacher, student alone, KD student) into OUT/seed<N> and
appends one line per run to benchmarks/results/demo_seeds.jsonl (label, seed, run, test_acc,
best_acc, amp). Run it with another source tree on PYTHONPATH and another --label to put an
earlier engine beside the current one:

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0,1,2 --label current
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/demo_seeds.py --seeds 0,1,2 --label previous
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "demo_seeds.jsonl"


def main() -> int:
    """Run the demo per seed, append the results, print mean and spread per run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--label", required=True, help="names the engine measured, e.g. current")
    p.add_argument("--out", default=str(RESULTS), help="JSON lines file to append to")
    args = p.parse_args()
    import distillkit
    from distillkit.demo import run_demo

    src = str(Path(distillkit.__file__).resolve().parent.parent)
    found: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="demo_seeds_") as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            rows = run_demo(Path(tmp) / f"seed{seed}", quiet=True, seed=seed)
            with Path(args.out).open("a") as fh:
                for r in rows:
                    line = {
                        "label": args.label,
                        "src": src,
                        "seed": seed,
                        "run": r["run"],
                        "test_acc": r["test_acc"],
                        "best_acc": r["best_acc"],
                        "amp": r.get("amp", "none"),
                        "torch": torch.__version__,
                        "threads": torch.get_num_threads(),
                        "host": platform.machine(),
                    }
                    fh.write(json.dumps(line) + "\n")
                    found.setdefault(r["run"], []).append(r["test_acc"])
    for run, accs in found.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{args.label} {run}: {statistics.mean(accs):.2f} +- {sd:.2f} ({accs})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
