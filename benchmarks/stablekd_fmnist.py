"""StableKD vs end-to-end KD on Fashion-MNIST: convergence speed and data efficiency.

One teacher (`--teacher-model`, trained once on the full train split, or `--teacher RUN_DIR`) and
one student architecture, `--seeds` student seeds. Runs per seed:

- `student`: the student alone (cross-entropy), 100% of the training data;
- `kd`: end-to-end Hinton KD, 100%;
- `stablekd`: StableKD (blocks `--blocks-per-stage`, epochs `--stage-epochs`), 100%;
- `kd_random40`, `stablekd_random40`: the same on a random `--fraction` of the training data
  (per-class, `subset.method=random`);
- `kd_kt40`, `stablekd_kt40`: on a kernel-thinning subset (`subset.method=kt`), skipped with a
  note when `distillkit.data.subset` cannot be imported.

Every run has the same epochs, optimizer and LR schedule. The runs are independent: `--jobs N`
runs N of them at a time in worker processes (spawn, one torch thread each on a CPU; on a GPU
they share it). Reports (markdown on stdout and in `OUT/report.md`, raw numbers in
`OUT/results.json`, curves in `OUT/stablekd_fmnist.png`): test accuracy (mean +- std over seeds)
vs epoch and vs wall time; epochs and seconds each method needs to reach end-to-end KD's final
accuracy (mean over seeds of the first epoch at or above the mean final KD accuracy); and final
accuracy with 40% of the data against KD with 100%. The report and the JSON are rewritten as
every run finishes, so a killed benchmark leaves the finished runs' numbers; run directories
under `OUT/runs` with a `metrics.json` are reused by the next invocation; a failed run is
reported in one line (its traceback in its run directory's error.txt) and the others go on. An earlier invocation's
report.md, results.json and plot are kept, renamed with their time (report.YYYYmmdd-HHMMSS.md).

    python benchmarks/stablekd_fmnist.py                 # full: 15 epochs (3+3+9), 3 seeds
    python benchmarks/stablekd_fmnist.py --smoke         # a minute on a CPU: tiny everything
    python benchmarks/stablekd_fmnist.py --device cuda --jobs 16   # a GPU with 16 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import keep_previous  # noqa: E402
from _pool import Job, JobError, error_record, run_jobs  # noqa: E402

from distillkit.config import config_from_dict
from distillkit.data.datasets import (
    DataBundle,
    Split,
    list_datasets,
    load_dataset,
    register_dataset,
)
from distillkit.engine.logging import read_metrics
from distillkit.runner import prepare, run, run_prepared

LIMITED = "fashion-mnist-limited"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks everything to a pipeline check."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="bench_results/stablekd_fmnist")
    p.add_argument("--data-dir", default=None, help="default: the loader's search")
    p.add_argument("--teacher", default=None, help="a trained teacher run dir (else trained here)")
    p.add_argument("--teacher-model", default="resnet20")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--student-model", default="cnn_small")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--stage-epochs", default="3,3,9", help="must sum to --epochs")
    p.add_argument("--blocks-per-stage", default="4,2,1")
    p.add_argument("--feat-weight", type=float, default=1.0)
    p.add_argument(
        "--stablekd-options",
        default="{}",
        help='more StableKD options as JSON, e.g. \'{"block_input": "teacher"}\'',
    )
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--fraction", type=float, default=0.4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--skip-kt", action="store_true", help="leave out the kernel-thinning subsets")
    p.add_argument(
        "--train-limit", type=int, default=0, help="use the first N train images (0: all)"
    )
    p.add_argument("--test-limit", type=int, default=0, help="use the first N test images (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, each in its own worker process"
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated run names to do (default: all), e.g. kd,stablekd",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes to check the pipeline")
    args = p.parse_args(argv)
    if args.smoke:
        args.teacher_model, args.teacher_epochs = "cnn_medium", 3
        args.epochs, args.stage_epochs, args.seeds = 3, "1,1,1", "0"
        args.train_limit, args.test_limit = 1000, 500
    stage_epochs = [int(e) for e in args.stage_epochs.split(",")]
    if sum(stage_epochs) != args.epochs:
        p.error(f"--stage-epochs {args.stage_epochs} must sum to --epochs {args.epochs}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        extra = json.loads(args.stablekd_options)
    except json.JSONDecodeError as exc:
        p.error(f"--stablekd-options is not JSON: {exc}")
    if not isinstance(extra, dict):
        p.error("--stablekd-options must be a JSON object")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    return args


def register_limited(train_limit: int, test_limit: int) -> str:
    """The dataset name to train on: Fashion-MNIST, or its first N train / M test images."""
    if not train_limit and not test_limit:
        return "fashion-mnist"
    if LIMITED in list_datasets():  # a worker process that already registered it
        return LIMITED

    @register_dataset(LIMITED)
    def _load(data_dir: str | None = None, image_size: int | None = None) -> DataBundle:
        full = load_dataset("fashion-mnist", data_dir=data_dir, image_size=image_size)
        n = train_limit or len(full.train)
        m = test_limit or len(full.test)
        full.train = Split(full.train.images[:n], full.train.labels[:n])
        full.test = Split(full.test.images[:m], full.test.labels[:m])
        full.name = LIMITED
        return full

    return LIMITED


def random_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Per-class random subset (used only when distillkit.data.subset is missing)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        rows = np.nonzero(labels == c)[0]
        picks.append(rng.choice(rows, max(1, int(round(fraction * rows.size))), replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64)


def run_spec(spec: dict[str, Any], own_random_subset: float | None = None) -> dict[str, Any]:
    """Run one config (reusing a finished run directory); returns its per-epoch rows."""
    run_dir = Path(spec["out_dir"])
    if not (run_dir / "metrics.json").is_file():
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # an unfinished earlier attempt
        cfg = config_from_dict(spec)
        if own_random_subset is None:
            run(cfg)
        else:
            p = prepare(cfg)
            labels = p.bundle.train.labels.numpy()
            p.train_indices = random_subset(labels, own_random_subset, cfg.seed)
            run_prepared(p)
    rows = [r for r in read_metrics(run_dir) if r.get("test_acc") is not None]
    summary = json.loads((run_dir / "metrics.json").read_text())
    return {
        "epochs": [r["epoch"] for r in rows],
        "acc": [r["test_acc"] for r in rows],
        "seconds": [float(v) for v in np.cumsum([r["epoch_time"] for r in rows])],
        "final": summary["test_acc"],
        "train_samples": summary["train_samples"],
    }


def _init_worker(train_limit: int, test_limit: int) -> None:
    """Worker set-up (the pool sets the thread count): the limited dataset."""
    register_limited(train_limit, test_limit)


def _curve(spec: dict[str, Any], own: float | None) -> dict[str, Any]:
    """One run in a worker (looked up here, so run_spec can be replaced in tests)."""
    return run_spec(spec, own)


def _run_job(spec: dict[str, Any], own: float | None) -> dict[str, Any]:
    """One run here: {"curve": ...}, or {"error": traceback text} so a failure does not raise."""
    try:
        return {"curve": _curve(spec, own)}
    except Exception as exc:  # noqa: BLE001 - the same record the pool makes of a failed run
        return {"error": error_record(spec.get("name", "run"), exc).traceback}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (0 for a single value)."""
    return statistics.mean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def time_to(curve: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """First epoch (and its cumulative seconds) with test accuracy >= target."""
    for e, a, s in zip(curve["epochs"], curve["acc"], curve["seconds"]):
        if a >= target:
            return e, s
    return None, None


def plot(results: dict[str, list[dict]], args: argparse.Namespace, path: Path) -> None:
    """Test accuracy vs epoch and wall time (100% data), and the subsets against KD 100%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    bounds = np.cumsum([int(e) for e in args.stage_epochs.split(",")])[:-1]
    full = [m for m in ("student", "kd", "stablekd") if m in results]
    small = [m for m in results if m not in ("student", "stablekd")]
    for ax, methods, xkey in (
        (axes[0], full, "epochs"),
        (axes[1], full, "seconds"),
        (axes[2], small, "epochs"),
    ):
        for m in methods:
            curves = results[m]
            n = min(len(c["acc"]) for c in curves)
            acc = np.array([c["acc"][:n] for c in curves])
            x = np.mean([c[xkey][:n] for c in curves], axis=0)
            mu, sd = acc.mean(0), acc.std(0)
            style = "--" if m == "kd" and ax is axes[2] else "-"
            ax.plot(x, mu, style, marker="o", ms=3, label=m)
            ax.fill_between(x, mu - sd, mu + sd, alpha=0.2)
        if xkey == "epochs":
            for b in bounds:
                ax.axvline(b + 0.5, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("epoch" if xkey == "epochs" else "wall time (s, train + eval)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        if methods:
            ax.legend(fontsize=8)
    axes[0].set_title("100% data, vs epoch (dotted: stage boundaries)")
    axes[1].set_title("100% data, vs wall time")
    axes[2].set_title(f"{args.fraction:.0%} subsets vs KD 100%")
    fig.suptitle(
        f"Fashion-MNIST: {args.teacher_model} -> {args.student_model}, "
        f"{len(args.seeds.split(','))} seed(s), mean +- std"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_runs(
    args: argparse.Namespace, base: dict[str, Any], teacher_dir: Path, out: Path
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, int, dict[str, Any], float | None]], list]:
    """The methods, every (method, seed) run spec in report order, and notes."""
    try:
        import distillkit.data.subset  # noqa: F401

        have_subset = True
    except ImportError:
        have_subset = False
    pct = int(round(args.fraction * 100))
    stablekd_opts = {
        "blocks_per_stage": [int(b) for b in args.blocks_per_stage.split(",")],
        "stage_epochs": [int(e) for e in args.stage_epochs.split(",")],
        "feat_weight": args.feat_weight,
        **json.loads(args.stablekd_options),
    }
    methods: dict[str, dict[str, Any]] = {
        "student": {"method": "ce"},
        "kd": {"method": "kd"},
        "stablekd": {"method": "stablekd", "options": stablekd_opts},
    }
    for m in ("kd", "stablekd"):
        methods[f"{m}_random{pct}"] = {
            **methods[m],
            "subset": {"method": "random", "fraction": args.fraction},
        }
    notes = []
    if args.skip_kt:
        notes.append("kernel-thinning subsets skipped (--skip-kt)")
    elif not have_subset:
        notes.append("kernel-thinning subsets skipped: distillkit.data.subset is not available")
    else:
        for m in ("kd", "stablekd"):
            methods[f"{m}_kt{pct}"] = {
                **methods[m],
                "subset": {"method": "kt", "fraction": args.fraction},
            }
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(methods))
    if unknown:
        raise SystemExit(f"--only: unknown run names {unknown}; known: {', '.join(methods)}")
    runs = []
    for name, extra in methods.items():
        if only and name not in only:
            continue
        for seed in [int(s) for s in args.seeds.split(",")]:
            spec = {
                **base,
                **extra,
                "name": f"{name}_s{seed}",
                "model": args.student_model,
                "epochs": args.epochs,
                "seed": seed,
                "out_dir": str(out / "runs" / f"{name}_s{seed}"),
            }
            if extra["method"] != "ce":
                spec["teacher"] = str(teacher_dir)
            own = None
            if "subset" in extra and not have_subset:
                own = spec.pop("subset")["fraction"]  # the runner would need data.subset
            runs.append((name, seed, spec, own))
    return methods, runs, notes


def report(
    args: argparse.Namespace,
    methods: dict[str, dict[str, Any]],
    results: dict[str, dict[int, dict]],
    teacher_acc: float,
    notes: list[str],
    out: Path,
    expected: int,
) -> str:
    """Write OUT/report.md and OUT/results.json from the runs finished so far; return the text."""
    pct = int(round(args.fraction * 100))
    curves = {
        name: [results[name][s] for s in sorted(results[name])]
        for name in methods
        if results.get(name)
    }
    done = sum(len(c) for c in curves.values())
    target = statistics.mean(c["final"] for c in curves["kd"]) if "kd" in curves else None
    opts = methods["stablekd"]["options"]
    lines = [
        f"teacher {args.teacher_model}: test acc {teacher_acc:.2f}; student {args.student_model}; "
        f"{args.epochs} epochs; StableKD stages {opts['blocks_per_stage']} blocks x "
        f"{opts['stage_epochs']} epochs; seeds {args.seeds}; device {args.device}, "
        f"{args.jobs} job(s)",
        "",
        "| run | data | final test acc (mean +- std) | epochs to KD's final acc | "
        "seconds to KD's final acc |",
        "|---|---|---|---|---|",
    ]
    table = {}
    for name, cs in curves.items():
        mu, sd = mean_std([c["final"] for c in cs])
        reach = [time_to(c, target) for c in cs] if target is not None else []
        hit = [r for r in reach if r[0] is not None]
        if target is None:
            ep = sec = "n/a (no KD run yet)"
        elif hit:
            ep = f"{statistics.mean(r[0] for r in hit):.1f} ({len(hit)}/{len(cs)} seeds)"
            sec = f"{statistics.mean(r[1] for r in hit):.0f}"
        else:
            ep = sec = "not reached"
        sub = methods[name].get("subset")
        frac = "100%" if sub is None else f"{pct}% {sub['method']}"
        lines.append(f"| {name} | {frac} | {mu:.2f} +- {sd:.2f} | {ep} | {sec} |")
        table[name] = {
            "final_mean": mu,
            "final_std": sd,
            "seeds": sorted(results[name]),
            "reach": reach,
            "data": frac,
        }
    lines.append("")
    if target is not None:
        lines.append(f"target (KD 100% final, mean over seeds): {target:.2f}")
    if done < expected:
        lines.append(f"partial: {done} of {expected} runs finished")
    if args.jobs > 1:
        lines.append("note: runs shared the machine, so their seconds include that contention")
    lines += [f"note: {n}" for n in notes]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "args": vars(args),
        "teacher_acc": teacher_acc,
        "target": target,
        "finished": done,
        "expected": expected,
        "table": table,
        "curves": curves,
        "notes": notes,
    }
    # write then rename, so a kill mid-write never leaves a truncated file
    for fname, content in (
        ("report.md", text + "\n"),
        ("results.json", json.dumps(payload, indent=1, default=float)),
    ):
        tmp = out / (fname + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, out / fname)
    return text


def main(argv: list[str] | None = None) -> int:
    """Train the teacher if needed, run every (method, fraction, seed), report."""
    args = parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", "4"))
    torch.set_num_threads(max(1, threads if args.jobs == 1 else 1))
    out = Path(args.out)
    keep_previous(out, ["report.md", "results.json", "stablekd_fmnist.png"])
    dataset = register_limited(args.train_limit, args.test_limit)
    base = {
        "dataset": dataset,
        "data_dir": args.data_dir,
        "device": args.device,
        "quiet": True,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_epochs": 1.0 if args.epochs > 3 else 0.0,
    }
    teacher_dir = Path(args.teacher) if args.teacher else out / "teacher"
    if not (teacher_dir / "metrics.json").is_file():
        if args.teacher:
            raise SystemExit(f"--teacher {teacher_dir} has no metrics.json (not a finished run)")
        t0 = time.perf_counter()
        run_spec(
            {
                **base,
                "name": "teacher",
                "method": "ce",
                "model": args.teacher_model,
                "epochs": args.teacher_epochs,
                "out_dir": str(teacher_dir),
            }
        )
        print(f"teacher trained in {time.perf_counter() - t0:.0f}s", flush=True)
    teacher_summary = json.loads((teacher_dir / "metrics.json").read_text())
    teacher_acc = teacher_summary["test_acc"]
    args.teacher_model = teacher_summary.get("model", args.teacher_model)  # a reused teacher's

    methods, runs, notes = build_runs(args, base, teacher_dir, out)
    results: dict[str, dict[int, dict]] = {}
    failed: list[str] = []

    by_job = {spec["name"]: (name, seed, spec) for name, seed, spec, _ in runs}

    def finished(job: str, curve: dict[str, Any]) -> None:
        name, seed, _ = by_job[job]
        results.setdefault(name, {})[seed] = curve
        print(
            f"{name} seed {seed}: final acc {curve['final']:.2f} "
            f"({curve['train_samples']} train images, {curve['seconds'][-1]:.0f}s)",
            flush=True,
        )
        report(args, methods, results, teacher_acc, notes, out, len(runs))

    def failure(error: JobError) -> None:
        failed.append(error.name)
        saved = error.save(Path(by_job[error.name][2]["out_dir"]) / "error.txt")
        print(f"{error.line()} (traceback in {saved})", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    run_jobs(
        [Job(spec["name"], (spec, own)) for _, _, spec, own in runs],
        _curve,
        n_workers=args.jobs,
        # workers share the cores: one torch thread each
        threads_per_worker=max(1, threads if args.jobs == 1 else 1),
        on_result=finished,
        on_error=failure,
        initializer=_init_worker,
        initargs=(args.train_limit, args.test_limit),
    )
    notes.append(f"all runs took {time.perf_counter() - t0:.0f}s wall time")
    if failed:
        notes.append(f"failed runs: {', '.join(failed)}")
    text = report(args, methods, results, teacher_acc, notes, out, len(runs))
    print("\n" + text)
    png = out / "stablekd_fmnist.png"
    if results:
        plot(
            {name: [results[name][s] for s in sorted(results[name])] for name in results}, args, png
        )
        print(f"\nwrote {png}, {out / 'report.md'}, {out / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
