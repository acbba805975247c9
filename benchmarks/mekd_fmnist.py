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
the edge images, MEKD with soft and with hard answers run with the method's **default** options
(`mekd_soft`, `mekd_hard`: only the teacher URL and the budget are set), the same two as the paper
has them (distillation on generated images only, `edge_share=0`: `mekd_soft_paper`,
`mekd_hard_paper`), and white-box KD on the edge images (local teacher, unlimited queries) as the
upper reference. `--mekd-set k=v,...` overrides MEKD options in every MEKD run (recorded with the
run), and `--variant NAME:k=v,...` adds an MEKD run named NAME with those options (hard answers with
`response=hard` or when NAME contains "hard"). `--local` asks the teacher in process (the same
black box and budget counting, no HTTP: for machines without FastAPI). Every run uses the same
student, epochs, learning rate and schedule (MEKD's student schedule counts from its first
distillation epoch); MEKD runs take no loader augmentation
(the GAN learns the edge images as they are). Reports test accuracy (mean +- std over seeds),
images the teacher answered, and MB exchanged over HTTP.

`--val` measures on a validation split instead of the test split: 5000 images of the Fashion-MNIST
train split outside the edge shard, balanced over classes (for choosing options; never the test
split). Rows then carry `"split": "val"`.

Every finished run is also appended, as one JSON line, to `--results`
(default benchmarks/results/mekd_fmnist.jsonl; never truncated): method, budget, seed, split,
test_acc, teacher_queries, minutes, threads, device and the MEKD options given.
White-box KD does not depend on the budget: it runs
once per seed; its teacher was trained on the whole of Fashion-MNIST and the student sees the
edge shard, a registered dataset of its own, so the run sets `teacher_dataset_check=false`. Runs are independent: `--jobs N` runs N at once in worker processes (the two servers stay in
the main process). Each finished run appends a line to OUT/runs.jsonl, which is never truncated: a
stopped benchmark keeps what it measured, a second invocation into the same OUT (other budgets,
say) adds its runs to the first's, and a run already recorded there (same method, budget, seed and
split) is not run again (use another --out for other settings); the directory of a run an
earlier invocation left unfinished is kept as NAME.interrupted.TIME and the run starts afresh. A
run that fails is reported in one line (its traceback in OUT/runs/NAME/error.txt), is not
recorded, and the benchmark exits 1. OUT/report.md and OUT/results.json tabulate every run in
runs.jsonl; `--report-only` prints that table.

    python benchmarks/mekd_fmnist.py                     # full: budgets 5k/20k/100k, 3 seeds
    python benchmarks/mekd_fmnist.py --smoke             # minutes on a CPU: tiny everything
    # the table as measured (resnet8 teacher, in-process black box, one thread per run, 2 runs
    # at once on a 2-core CPU; the default GAN is sized so one run fits 20 minutes there):
    OMP_NUM_THREADS=1 python benchmarks/mekd_fmnist.py --local --teacher-model resnet8 \
        --teacher-epochs 5 --budgets 5000,20000 --seeds 0,1,2 --jobs 2 --methods \
        blackbox_kd,blackbox_hard,mekd_soft,mekd_hard,mekd_soft_paper,mekd_hard_paper
    # a larger GAN, named as a variant (the default before: width 128, 5 updates a batch)
    python benchmarks/mekd_fmnist.py --local --device cuda --teacher-model resnet8 \
        --teacher-epochs 5 --methods blackbox_kd \
        --variant mekd_soft_w128:gen_width=128,gan_steps_per_batch=5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import set_aside  # noqa: E402
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
EDGE_VAL = "fashion-mnist-edge-val"  # the same edge shard, a validation split as its test split
EDGE_SEED = 1234
VAL_SIZE = 5000
DEVICE = "cpu"


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
    p.add_argument("--mekd-set", default="", help="k=v,... MEKD options for every MEKD run")
    p.add_argument(
        "--variant", action="append", default=[], help="NAME:k=v,... an extra MEKD run (repeatable)"
    )
    p.add_argument("--val", action="store_true", help="measure on a validation split, not test")
    p.add_argument("--results", default="benchmarks/results/mekd_fmnist.jsonl")
    p.add_argument(
        "--local",
        action="store_true",
        help="ask the teacher in process (same black-box answers and budget; no HTTP, no fastapi)",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at once (worker processes)")
    p.add_argument("--report-only", action="store_true", help="print the table of OUT/runs.jsonl")
    p.add_argument("--budgets", default="5000,20000,100000")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--edge-fraction", type=float, default=0.1)
    p.add_argument("--skew", type=float, default=5.0)
    p.add_argument(
        "--methods",
        default="blackbox_kd,blackbox_hard,mekd_soft,mekd_hard,mekd_soft_paper,mekd_hard_paper,"
        "whitebox_kd",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny sizes to check the pipeline")
    args = p.parse_args()
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        args.mekd_options = parse_options(args.mekd_set)
        args.variants = {}
        for v in args.variant:
            name, _, opts = v.partition(":")
            if not name or name in METHOD_ORDER:
                raise ValueError(f"--variant needs a new NAME before ':', got {v!r}")
            args.variants[name] = parse_options(opts)
    except ValueError as exc:
        p.error(str(exc))
    if args.smoke:
        args.teacher_model, args.teacher_epochs = "mlp", 1
        args.student_model, args.epochs = "mlp", 2
        args.mekd_options = {"gan_epochs": 1, "gen_width": 16, **args.mekd_options}
        args.budgets, args.seeds, args.edge_fraction = "300", "0", 0.01
    return args


def parse_options(text: str) -> dict:
    """'k=v,k=v' as a dict, each value read as YAML (numbers, booleans, null, strings)."""
    import yaml

    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


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


def val_indices(labels: np.ndarray, edge: np.ndarray, size: int, num_classes: int) -> np.ndarray:
    """A balanced validation set of `size` train-split images outside the edge shard."""
    rng = np.random.default_rng(EDGE_SEED + 1)
    free = np.setdiff1d(np.arange(len(labels)), edge)
    per = size // num_classes
    picks = [rng.choice(free[labels[free] == c], per, replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(picks))


def register_edge(args: argparse.Namespace) -> None:
    """Register the edge shard as datasets: with the full test split, and with a val split."""
    if EDGE in list_datasets():
        return

    def load(name: str, data_dir: str | None, image_size: int | None) -> DataBundle:
        full = load_dataset("fashion-mnist", data_dir=data_dir, image_size=image_size)
        labels = full.train.labels.numpy()
        edge = edge_indices(labels, args.edge_fraction, args.skew, full.num_classes)
        if name == EDGE_VAL:
            val = torch.from_numpy(val_indices(labels, edge, VAL_SIZE, full.num_classes))
            full.test = Split(full.train.images[val], full.train.labels[val])
        idx = torch.from_numpy(edge)
        full.train = Split(full.train.images[idx], full.train.labels[idx])
        full.name = name
        return full

    register_dataset(EDGE)(lambda data_dir=None, image_size=None: load(EDGE, data_dir, image_size))
    register_dataset(EDGE_VAL)(
        lambda data_dir=None, image_size=None: load(EDGE_VAL, data_dir, image_size)
    )


def run_one(job: dict) -> dict:
    """Run one config (in a worker; the pool sets its thread count); return its result row."""
    args = argparse.Namespace(**job["args"])
    register_edge(args)
    if job.get("api_key"):
        os.environ["DISTILLKIT_API_KEY"] = job["api_key"]
    # a run recorded in runs.jsonl is never run again: a directory here is an interrupted attempt
    set_aside(Path(job["spec"]["out_dir"]))
    p = prepare(config_from_dict(job["spec"]))
    summary = run_prepared(p)
    teacher = p.distiller.teacher
    stats = teacher.stats() if hasattr(teacher, "stats") else {}
    return {
        "method": job["method"],
        "budget": job["budget"],
        "seed": job["spec"]["seed"],
        "split": job.get("split", "test"),
        "acc": summary["test_acc"],
        "queries": summary.get("teacher_queries", 0),
        "MB": (stats.get("bytes_sent", 0) + stats.get("bytes_received", 0)) / 1e6,
        "seconds": summary.get("train_time_s", 0.0),
        "options": job["spec"].get("options", {}),
        # the options the run resolved (defaults included): a row stays readable after a default
        # changes
        **({"resolved": _resolved(p.distiller.options)} if job["spec"]["method"] == "mekd" else {}),
    }


def _resolved(options: Any) -> dict:
    """Every option of an MEKD run, defaults included (a new option is recorded without edits)."""
    return dataclasses.asdict(options)


def table(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds per (budget, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r.get("split", "test"), r["method"]), []).append(r)
    out = []
    for (budget, split, method), rs in groups.items():
        accs = [r["acc"] for r in rs]
        out.append(
            {
                "budget": budget,
                "split": split,
                "method": method,
                "seeds": len(rs),
                "acc_mean": statistics.mean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "queries": statistics.mean(r["queries"] for r in rs),
                "MB": statistics.mean(r["MB"] for r in rs),
            }
        )
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    out.sort(
        key=lambda r: (
            r["split"],
            r["budget"] == "any",
            str(r["budget"]).zfill(8),
            order.get(r["method"], 99),
            r["method"],
        )
    )
    return out


METHOD_ORDER = [
    "blackbox_kd",
    "blackbox_hard",
    "mekd_soft",
    "mekd_hard",
    "mekd_soft_paper",
    "mekd_hard_paper",
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
        "| split | budget | method | seeds | acc (mean +- std) | teacher queries | MB exchanged |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table(rows):
        lines.append(
            f"| {r['split']} | {r['budget']} | {r['method']} | {r['seeds']} | {r['acc_mean']:.2f} +- "
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

    if not args.local:
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
    global DEVICE
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

    serve_device = "cuda" if args.device.startswith("cuda") else "cpu"
    keys = {kind: KeyStore() for kind in ("soft", "hard")}
    servers = {}
    for kind in () if args.local else ("soft", "hard"):
        app = create_app(
            load_service(teacher_dir, kind, serve_device),
            keys[kind],
            BudgetStore(out / f"state_{kind}.db"),
        )
        servers[kind] = ServerThread(app).start()

    dataset = EDGE_VAL if args.val else EDGE
    student = {**base, "dataset": dataset, "model": args.student_model, "epochs": args.epochs}
    methods = [m for m in args.methods.split(",") if m] + list(args.variants)
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
                split = "val" if args.val else "test"
                job = {"method": method, "budget": budget, "spec": spec, "api_key": None}
                job["split"] = split
                if method == "whitebox_kd":
                    # the teacher saw all of fashion-mnist, the student the edge shard of it
                    spec.update(method="kd", teacher=str(teacher_dir), teacher_dataset_check=False)
                    job["budget"] = "any"
                else:
                    kind = args.variants.get(method, {}).get("response") or (
                        "hard" if "hard" in method else "soft"
                    )
                    if args.local:
                        # the same black box in process: answers and budget counted alike
                        spec.update(teacher=str(teacher_dir), teacher_dataset_check=False)
                        opts = {"response": kind, "budget": budget}
                    else:
                        job["api_key"] = keys[kind].add(name, budget=budget)
                        opts = {"teacher_url": servers[kind].url, "budget": budget}
                    if method.startswith("mekd") or method in args.variants:
                        spec.update(method="mekd", augment=False)
                        opts["response"] = kind
                        opts.update(args.mekd_options)
                        if method.endswith("_paper"):
                            opts["edge_share"] = 0.0  # the paper: generated images only
                        opts.update(args.variants.get(method, {}))
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
    extra = {
        "device": args.device if args.device != "auto" else DEVICE,
        "threads": 1 if args.jobs > 1 else threads,
        "teacher": args.teacher_model,
        "student": args.student_model,
        "epochs": args.epochs,
        "teacher_via": "local" if args.local else "http",
        "teacher_acc": teacher_acc,
    }

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
            on_result=lambda _name, row: record(results, row, Path(args.results), extra),
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


def run_key(row: dict) -> tuple[str, str, int, str]:
    """What identifies a run across invocations: method, budget, seed and split."""
    seed = row["seed"] if "seed" in row else row["spec"]["seed"]
    return row["method"], str(row["budget"]), int(seed), row.get("split", "test")


def read_rows(results: Path) -> list[dict]:
    """The rows of runs.jsonl (none when it does not exist yet)."""
    if not results.is_file():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def recorded(results: Path) -> set[tuple[str, str, int, str]]:
    """The runs already in runs.jsonl, from this or an earlier invocation."""
    return {run_key(r) for r in read_rows(results)}


def record(results: Path, row: dict, shared: Path | None = None, extra: dict | None = None) -> None:
    """Append one finished run to runs.jsonl (and to the shared results file) and say it."""
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    # the shared file is the table's source: a row without its run's options (one run_one did
    # not make) could not be recomputed from it, so it is not recorded there
    if shared is not None and "options" in row:
        line = {
            "method": row["method"],
            "budget": row["budget"],
            "seed": row["seed"],
            "split": row.get("split", "test"),
            "test_acc": row["acc"],
            "teacher_queries": row["queries"],
            "minutes": round(row["seconds"] / 60.0, 2),
            **(extra or {}),
            "options": row.get("options", {}),
            **({"resolved": row["resolved"]} if "resolved" in row else {}),
        }
        shared.parent.mkdir(parents=True, exist_ok=True)
        with shared.open("a") as f:  # appended, never rewritten: earlier lines stay
            f.write(json.dumps(line) + "\n")
    print(
        f"{row['method']} budget={row['budget']} seed={row['seed']}: acc={row['acc']:.2f} "
        f"queries={row['queries']} MB={row['MB']:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
