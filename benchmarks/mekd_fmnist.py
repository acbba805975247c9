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
the edge images, MEKD with soft answers, MEKD with hard answers (the paper: distillation on
generated images only), the same two with `edge_share` (`--edge-share` of each distillation batch
from answered edge images, the rest of the budget on generated ones: `mekd_*_edge`); and white-box
KD on the edge images (local teacher, unlimited queries) as the upper reference. Reports test accuracy (mean +- std over
seeds), images the teacher answered, and MB exchanged over HTTP.

MEKD runs use `--gan-steps-per-batch` D/G updates per batch, a constant learning rate (as in the
paper; the student's schedule would count from the first distillation epoch) and no augmentation
(the GAN learns the edge images as they are). White-box KD does not depend on the budget: it runs
once per seed; its teacher was trained on the whole of Fashion-MNIST and the student sees the
edge shard, a registered dataset of its own, so the run sets `teacher_dataset_check=false`. Runs are independent: `--jobs N` runs N at once in worker processes (the two servers stay in
the main process). Each finished run appends a line to OUT/runs.jsonl, which is never truncated: a
stopped benchmark keeps what it measured, a second invocation into the same OUT (other budgets,
say) adds its runs to the first's, and a run already recorded there (same method, budget and seed)
is not run again (use another --out for other settings). A run that fails is reported in one
line (its traceback in OUT/runs/NAME/error.txt), is not recorded, and the benchmark exits 1. OUT/report.md and OUT/results.json
tabulate every run in runs.jsonl; `--report-only` prints that table.

    python benchmarks/mekd_fmnist.py                     # full: budgets 5k/20k/100k, 3 seeds
    python benchmarks/mekd_fmnist.py --smoke             # minutes on a CPU: tiny everything
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _pool import Job, JobError, run_jobs  # noqa: E402

from distillkit.config import config_from_dict
from distillkit.data.datasets import (
    DataBundle,
    Split,
    list_datasets,
    load_dataset,
    register_dataset,
)
from distillkit.runner import prepare, run, run_prepared

EDGE = "fashion-mnist-edge"
EDGE_SEED = 1234


def parse_args() -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks everything to a pipeline check."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="bench_results/mekd_fmnist")
    p.add_argument(
        "--data-dir", default=None, help="default: the loader's search (/usr/share/datasets/...)"
    )
    p.add_argument("--teacher", default=None, help="a trained teacher run dir (else trained here)")
    p.add_argument("--teacher-model", default="resnet20")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--student-model", default="cnn_small")
    p.add_argument("--epochs", type=int, default=60, help="student epochs (MEKD: GAN + distill)")
    p.add_argument("--gan-epochs", type=int, default=30)
    p.add_argument("--gan-steps-per-batch", type=int, default=5)
    p.add_argument("--gen-width", type=int, default=128, help="generator/discriminator width")
    p.add_argument("--edge-share", type=float, default=0.5, help="for the *_edge MEKD variants")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (worker processes)")
    p.add_argument("--report-only", action="store_true", help="print the table of OUT/runs.jsonl")
    p.add_argument("--budgets", default="5000,20000,100000")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--edge-fraction", type=float, default=0.1)
    p.add_argument("--skew", type=float, default=5.0)
    p.add_argument(
        "--methods",
        default="blackbox_kd,blackbox_hard,mekd_soft,mekd_hard,mekd_soft_edge,mekd_hard_edge,"
        "whitebox_kd",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny sizes to check the pipeline")
    args = p.parse_args()
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.smoke:
        args.teacher_model, args.teacher_epochs = "mlp", 1
        args.student_model, args.epochs, args.gan_epochs = "mlp", 2, 1
        args.gan_steps_per_batch, args.gen_width = 1, 16
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
    """Register the edge shard as a dataset: skewed train shard, full test split (once)."""
    if EDGE in list_datasets():
        return

    @register_dataset(EDGE)
    def _load(data_dir: str | None = None, image_size: int | None = None) -> DataBundle:
        full = load_dataset("fashion-mnist", data_dir=data_dir, image_size=image_size)
        idx = torch.from_numpy(
            edge_indices(full.train.labels.numpy(), args.edge_fraction, args.skew, full.num_classes)
        )
        full.train = Split(full.train.images[idx], full.train.labels[idx])
        full.name = EDGE
        return full


def run_one(job: dict) -> dict:
    """Run one config (in a worker; the pool sets its thread count); return its result row."""
    args = argparse.Namespace(**job["args"])
    register_edge(args)
    if job.get("api_key"):
        os.environ["DISTILLKIT_API_KEY"] = job["api_key"]
    p = prepare(config_from_dict(job["spec"]))
    summary = run_prepared(p)
    teacher = p.distiller.teacher
    stats = teacher.stats() if hasattr(teacher, "stats") else {}
    return {
        "method": job["method"],
        "budget": job["budget"],
        "seed": job["spec"]["seed"],
        "acc": summary["test_acc"],
        "queries": summary.get("teacher_queries", 0),
        "MB": (stats.get("bytes_sent", 0) + stats.get("bytes_received", 0)) / 1e6,
        "seconds": summary.get("train_time_s", 0.0),
    }


def table(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds per (budget, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["method"]), []).append(r)
    out = []
    for (budget, method), rs in groups.items():
        accs = [r["acc"] for r in rs]
        out.append(
            {
                "budget": budget,
                "method": method,
                "seeds": len(rs),
                "acc_mean": statistics.mean(accs),
                "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "queries": statistics.mean(r["queries"] for r in rs),
                "MB": statistics.mean(r["MB"] for r in rs),
            }
        )
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    out.sort(
        key=lambda r: (r["budget"] == "any", str(r["budget"]).zfill(8), order.get(r["method"], 99))
    )
    return out


METHOD_ORDER = [
    "blackbox_kd",
    "blackbox_hard",
    "mekd_soft",
    "mekd_hard",
    "mekd_soft_edge",
    "mekd_hard_edge",
    "whitebox_kd",
]


def report(out: Path, teacher_acc: float | None, args: argparse.Namespace) -> str:
    """The markdown table of every finished run in OUT/runs.jsonl (also written to report.md)."""
    # one row per run: should a run appear twice (an older file), its last line counts
    rows = list({run_key(r): r for r in read_rows(out / "runs.jsonl")}.values())
    lines = []
    if teacher_acc is not None:
        lines.append(f"teacher {args.teacher_model}: test acc {teacher_acc:.2f}")
    lines.append(
        f"edge: {args.edge_fraction:.0%} shard, class skew {args.skew}; student {args.student_model}"
    )
    lines += [
        "",
        "| budget | method | seeds | test acc (mean +- std) | teacher queries | MB exchanged |",
        "|---|---|---|---|---|---|",
    ]
    for r in table(rows):
        lines.append(
            f"| {r['budget']} | {r['method']} | {r['seeds']} | {r['acc_mean']:.2f} +- "
            f"{r['acc_std']:.2f} | {r['queries']:.0f} | {r['MB']:.2f} |"
        )
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps({"teacher_acc": teacher_acc, "rows": table(rows)}, indent=2)
    )
    return text


def main() -> int:
    """Serve the teacher, run every (seed, budget, method) not yet recorded, print the table."""
    args = parse_args()
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "4")))
    torch.set_num_threads(threads)
    from distillkit.teachers.keys import BudgetStore, KeyStore
    from distillkit.teachers.server import ServerThread, create_app, load_service

    register_edge(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = Path(args.teacher) if args.teacher else out / "teacher"
    metrics_file = teacher_dir / "metrics.json"
    if args.report_only:
        acc = json.loads(metrics_file.read_text())["test_acc"] if metrics_file.is_file() else None
        print(report(out, acc, args))
        return 0
    base = {"data_dir": args.data_dir, "device": args.device, "quiet": True, "batch_size": 128}
    if not metrics_file.is_file():
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
    teacher_acc = json.loads(metrics_file.read_text())["test_acc"]

    serve_device = "cuda" if args.device.startswith("cuda") else "cpu"
    keys = {kind: KeyStore() for kind in ("soft", "hard")}
    servers = {}
    for kind in ("soft", "hard"):
        app = create_app(
            load_service(teacher_dir, kind, serve_device),
            keys[kind],
            BudgetStore(out / f"state_{kind}.db"),
        )
        servers[kind] = ServerThread(app).start()

    student = {**base, "dataset": EDGE, "model": args.student_model, "epochs": args.epochs}
    methods = [m for m in args.methods.split(",") if m]
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = []
    for seed in seeds:
        for budget in budgets:
            for method in methods:
                if method == "whitebox_kd" and budget != budgets[0]:
                    continue  # the local teacher has no budget: one run per seed
                name = f"{method}_b{budget}_s{seed}"
                spec = {
                    **student,
                    "name": name,
                    "seed": seed,
                    "lr": 0.05,
                    "out_dir": str(out / "runs" / name),
                }
                job = {"method": method, "budget": budget, "spec": spec, "api_key": None}
                if method == "whitebox_kd":
                    # the teacher saw all of fashion-mnist, the student the edge shard of it
                    spec.update(method="kd", teacher=str(teacher_dir), teacher_dataset_check=False)
                    job["budget"] = "any"
                else:
                    kind = "hard" if "hard" in method else "soft"
                    job["api_key"] = keys[kind].add(name, budget=budget)
                    opts = {"teacher_url": servers[kind].url, "budget": budget}
                    if method.startswith("mekd"):
                        spec.update(method="mekd", schedule="constant", augment=False)
                        opts.update(
                            gan_epochs=args.gan_epochs,
                            gan_steps_per_batch=args.gan_steps_per_batch,
                            gan_query_fraction=0.3,
                            gen_width=args.gen_width,
                            edge_share=args.edge_share if method.endswith("_edge") else 0.0,
                        )
                    else:
                        spec["method"] = method
                    spec["options"] = opts
                jobs.append(job)
    results = out / "runs.jsonl"
    done = recorded(results)
    skipped = [j for j in jobs if run_key(j) in done]
    jobs = [j for j in jobs if run_key(j) not in done]
    if skipped:
        print(f"{len(skipped)} run(s) already in {results}: not run again", flush=True)
    for job in jobs:
        job["args"] = vars(args)

    def failure(error: JobError) -> None:
        # not recorded in runs.jsonl, so the next invocation runs it again
        saved = error.save(out / "runs" / error.name / "error.txt")
        print(f"{error.line()} (traceback in {saved})", file=sys.stderr, flush=True)

    try:
        failed = run_jobs(
            [Job(job["spec"]["name"], (job,)) for job in jobs],
            run_one,
            n_workers=args.jobs,
            threads_per_worker=1 if args.jobs > 1 else threads,
            on_result=lambda _name, row: record(results, row),
            on_error=failure,
        )
    finally:
        for s in servers.values():
            s.stop()
    print()
    print(report(out, teacher_acc, args))
    if failed:
        print(f"failed runs: {', '.join(e.name for e in failed)}", file=sys.stderr)
        return 1
    return 0


def run_key(row: dict) -> tuple[str, str, int]:
    """What identifies a run across invocations: method, budget and seed."""
    seed = row["seed"] if "seed" in row else row["spec"]["seed"]
    return row["method"], str(row["budget"]), int(seed)


def read_rows(results: Path) -> list[dict]:
    """The rows of runs.jsonl (none when it does not exist yet)."""
    if not results.is_file():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def recorded(results: Path) -> set[tuple[str, str, int]]:
    """The runs already in runs.jsonl, from this or an earlier invocation."""
    return {run_key(r) for r in read_rows(results)}


def record(results: Path, row: dict) -> None:
    """Append one finished run to runs.jsonl and say it."""
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(
        f"{row['method']} budget={row['budget']} seed={row['seed']}: acc={row['acc']:.2f} "
        f"queries={row['queries']} MB={row['MB']:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
