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

Same epochs, optimizer and LR schedule for every run; `--jobs N` runs N at a time (spawned
workers, one torch thread each on a CPU). Each finished run is appended as a JSON line to
`--results` (never rewritten; a rerun skips runs recorded with the same settings, so running the
same command again continues an interrupted benchmark); a failed run is reported in one line
(traceback in its run directory's error.txt). The report, rebuilt from the results file alone
(`--report`; also OUT/report.md, curves in OUT/stablekd_fmnist.png): final accuracy, the epoch
each seed first reaches KD's final accuracy, 40% data against KD at 100%, the gain at 100%, and
a verdict per claim with the bootstrap interval that decides it. `--val-fraction F` evaluates on
a stratified F of the training split instead of the test split.

    python benchmarks/stablekd_fmnist.py --teacher bench_results/fmnist_teacher --jobs 2
    python benchmarks/stablekd_fmnist.py --report        # the tables, from the results file
    python benchmarks/stablekd_fmnist.py --smoke --results /tmp/stablekd_smoke.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
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
import fmnist_teacher as shared  # noqa: E402
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
RESULTS = "benchmarks/results/stablekd_fmnist.jsonl"
# what varies within one table (the dataset check exists only where a teacher does)
PER_RUN = ("run", "seed", "method", "options", "subset", "revision", "teacher_dataset_check")
# a method's code revision, in the settings of its runs: rows of an older revision are kept in
# the results file but left out of the tables. stablekd 2: the teacher's blocks are re-read after
# the trainer folds the frozen teacher's BN (revision 1 ran the stale BN twice: 64% test accuracy)
REVISIONS = {"stablekd": 2}


def current_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows run with each method's current code revision (rows without one are revision 1)."""
    return [
        r
        for r in rows
        if "settings" not in r
        or r["settings"].get("revision", 1) >= REVISIONS.get(r["settings"].get("method"), 1)
    ]


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
    p.add_argument("--stablekd-options", default="{}", help="more StableKD options, JSON")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--fraction", type=float, default=0.4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--skip-kt", action="store_true", help="leave out the kernel-thinning subsets")
    p.add_argument("--train-limit", type=int, default=0, help="first N train images (0: all)")
    p.add_argument("--test-limit", type=int, default=0, help="use the first N test images (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (worker processes)")
    p.add_argument("--only", default="", help="run names to do (default all), e.g. kd,stablekd")
    p.add_argument("--smoke", action="store_true", help="tiny sizes to check the pipeline")
    p.add_argument("--results", default=RESULTS, help="JSON-lines results file (appended)")
    p.add_argument("--report", action="store_true", help="print the tables of --results")
    p.add_argument("--val-fraction", type=float, default=0.0, help="held-out share of train")
    args = p.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
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
        "train_time_s": summary.get("train_time_s"),
        "wall_time_s": summary.get("wall_time_s"),
    }


def register_data(train_limit: int, test_limit: int, val_fraction: float) -> str:
    """The dataset the runs train on: limited, then (with val_fraction) split for validation."""
    name = register_limited(train_limit, test_limit)
    return shared.register_val_split(val_fraction, 0, name) if val_fraction > 0 else name


def _init_worker(train_limit: int, test_limit: int, val_fraction: float = 0.0) -> None:
    """Worker set-up (the pool sets the thread count): the datasets the runs name."""
    register_data(train_limit, test_limit, val_fraction)


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
            }
            # one run directory per settings: another budget never reuses this run
            digest = hashlib.sha1(shared.canonical(spec).encode()).hexdigest()[:8]
            spec["out_dir"] = str(out / "runs" / f"{name}_s{seed}_{digest}")
            if extra["method"] != "ce":
                spec["teacher"] = str(teacher_dir)
                # limited / validation datasets are parts of fashion-mnist under another name
                spec["teacher_dataset_check"] = base["dataset"] == "fashion-mnist"
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


def settings_of(args: argparse.Namespace, name: str, spec: dict[str, Any], ckpt: str) -> dict:
    """Everything that decides one run's result: its identity in the results file."""
    drop = ("name", "out_dir", "quiet", "device", "data_dir", "teacher")
    return {
        "run": name,
        **{k: v for k, v in spec.items() if k not in drop},
        # StableKD's settings and the teacher belong to every run of the table
        "stablekd": [getattr(args, k) for k in ("stage_epochs", "blocks_per_stage")]
        + [args.feat_weight, args.stablekd_options],
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
        "val_fraction": args.val_fraction,
        "teacher_checkpoint": ckpt,
        **({"revision": REVISIONS[spec["method"]]} if spec["method"] in REVISIONS else {}),
    }


def record_of(settings: dict[str, Any], curve: dict[str, Any], data: str) -> dict[str, Any]:
    """One results-file line: the run's identity, final accuracy and its per-epoch curve."""
    return {
        "method": settings["run"],
        "base_method": settings["method"],
        "seed": settings["seed"],
        "epochs": settings["epochs"],
        "train_size": curve["train_samples"],
        "data": data,
        "split": "val" if settings["val_fraction"] > 0 else "test",
        "final_acc": curve["final"],
        "curve_epochs": curve["epochs"],
        "curve_acc": curve["acc"],
        "curve_seconds": curve["seconds"],
        "train_time_s": curve.get("train_time_s"),
        "wall_time_s": curve.get("wall_time_s"),
        "settings": settings,
    }


def _first_epoch(row: dict[str, Any], target: float) -> int | None:
    """First epoch whose accuracy is at or above target (None: never)."""
    return next((e for e, a in zip(row["curve_epochs"], row["curve_acc"]) if a >= target), None)


def report_rows(rows: list[dict[str, Any]], n_boot: int = 2000) -> str:
    """Table, convergence and data-efficiency numbers and verdicts of one settings group."""
    by: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        by.setdefault(r["method"], []).append(r)
    first, s = rows[0], rows[0]["settings"]
    kd = by.get("kd", [])
    target = float(np.mean([r["final_acc"] for r in kd])) if kd else None
    lines = [
        f"Fashion-MNIST {first.get('split', 'test')} split: teacher {first.get('teacher_model')} "
        f"({first.get('teacher_acc')}% test) -> {s['model']}, {s['epochs']} epochs, StableKD "
        f"stages {s['stablekd'][1]} blocks x {s['stablekd'][0]} epochs, lr "
        f"{s['lr']}, batch {s['batch_size']}; {first.get('threads')} thread(s) x "
        f"{first.get('jobs')} job(s)",
        "",
        "| run | data | train images | n | final acc (%) | epoch reaching KD's final, per seed "
        "| mean |",
        "|---|---|---|---|---|---|---|",
    ]
    reach: dict[str, list[float]] = {}
    for name, rs in by.items():
        firsts = [_first_epoch(r, target) for r in rs] if target is not None else []
        # never reached: counted as one epoch past the budget, so a speed-up is a lower bound
        reach[name] = [float(f) if f is not None else r["epochs"] + 1.0 for f, r in zip(firsts, rs)]
        per_seed = ", ".join("-" if f is None else str(f) for f in firsts) or "n/a"
        mean = f"{np.mean(reach[name]):.1f}" if reach[name] else "n/a"
        accs = [r["final_acc"] for r in rs]
        lines.append(
            f"| {name} | {rs[0]['data']} | {rs[0]['train_size']} | {len(rs)} | {shared.pm(accs)} "
            f"| {per_seed} | {mean} |"
        )
    lines.append("")
    if target is None:
        return "\n".join([*lines, "no KD run at 100% yet: no target, no verdicts"])
    lines.append(
        f"target: KD's final accuracy at 100%: {target:.2f}; `-`: not reached (counted as "
        f"{s['epochs'] + 1} in the mean)"
    )
    lines += ["", "Claims (bootstrap: seeds resampled within runs, 95% percentile, seed 0):"]
    kd_acc = [r["final_acc"] for r in kd]

    if "stablekd" in by:
        ratio = shared.bootstrap(
            {"kd": reach["kd"], "sk": reach["stablekd"]},
            lambda g: float(np.mean(g["kd"]) / np.mean(g["sk"])),
            n=n_boot,
        )
        speed = np.mean(reach["kd"]) / np.mean(reach["stablekd"])
        lines.append(shared.verdict_line(
            f"StableKD reaches KD's final accuracy in fewer epochs (speed-up {speed:.2f}x)",
            ratio, 1.0, strict=True))  # fmt: skip
        lines.append(shared.verdict_line("... up to 10x faster", ratio, 10.0))
        sk = [r["final_acc"] for r in by["stablekd"]]
        lines.append(shared.verdict_line(
            f"StableKD gains accuracy at 100% ({np.mean(sk) - np.mean(kd_acc):+.2f} points)",
            shared.diff_interval(sk, kd_acc, n_boot), 0.0, strict=True))  # fmt: skip
    for name, rs in by.items():
        if rs[0]["data"] == "100%" or name == "student":
            continue
        accs = [r["final_acc"] for r in rs]
        lines.append(shared.verdict_line(
            f"{name} ({rs[0]['data']}) matches KD at 100% ({np.mean(accs) - np.mean(kd_acc):+.2f} "
            "points)", shared.diff_interval(accs, kd_acc, n_boot), 0.0))  # fmt: skip
    return "\n".join(lines)


def plot_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy vs epoch of KD (dashed) and StableKD (solid), at 100% and on each subset."""
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["base_method"] in ("kd", "stablekd"):
            series.setdefault(f"{r['method']} ({r['data']})", []).append(r)
    curves = {
        label: ([r["curve_epochs"] for r in rs], [r["curve_acc"] for r in rs],
                "-" if rs[0]["base_method"] == "stablekd" else "--")
        for label, rs in sorted(series.items())
    }  # fmt: skip
    title = "Fashion-MNIST: KD (dashed) and StableKD (solid), mean ± std over seeds"
    ylabel = f"{rows[0].get('split', 'test')} accuracy (%)"
    return shared.plot_curves(curves, path, title, "epoch", ylabel)


def report_file(path: str | Path, out: Path | None = None) -> str:
    """The report of every settings group of a results file (plots into out when given)."""
    rows = current_rows(shared.read_results(path))
    if not rows:
        return f"{path}: no finished runs recorded"
    texts = []
    for i, group in enumerate(shared.group_rows(rows, PER_RUN).values()):
        texts.append(report_rows(group))
        if out is not None:
            png = plot_rows(group, out / f"stablekd_fmnist_{i}.png")
            texts[-1] += f"\n\ncurves: {png}"
    return "\n\n".join(texts)


def main(argv: list[str] | None = None) -> int:
    """Train the teacher if needed, run every (method, fraction, seed) not yet recorded, report."""
    args = parse_args(argv)
    out = Path(args.out)
    if args.report:
        print(report_file(args.results, out))
        return 0
    threads = int(os.environ.get("OMP_NUM_THREADS", "4"))
    torch.set_num_threads(max(1, threads if args.jobs == 1 else 1))
    keep_previous(out, ["report.md", "results.json", "stablekd_fmnist.png"])
    dataset = register_data(args.train_limit, args.test_limit, args.val_fraction)
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
    if not (teacher_dir / "metrics.json").is_file() and not args.teacher:
        t0 = time.perf_counter()
        run_spec(
            {
                **base,
                "dataset": register_limited(args.train_limit, args.test_limit),
                "name": "teacher",
                "method": "ce",
                "model": args.teacher_model,
                "epochs": args.teacher_epochs,
                "out_dir": str(teacher_dir),
            }
        )
        print(f"teacher trained in {time.perf_counter() - t0:.0f}s", flush=True)
    teacher = shared.teacher_info(teacher_dir)
    teacher_acc = teacher["teacher_acc"]
    args.teacher_model = teacher["teacher_model"] or args.teacher_model  # a reused teacher's
    ckpt = teacher["teacher_checkpoint"]  # final weights, not the best-on-test checkpoint

    methods, runs, notes = build_runs(args, base, Path(ckpt), out)
    pct = int(round(args.fraction * 100))
    data_of = {
        name: "100%" if m.get("subset") is None else f"{pct}% {m['subset']['method']}"
        for name, m in methods.items()
    }
    done = shared.recorded_settings(shared.read_results(args.results))
    settings = {spec["name"]: settings_of(args, name, spec, ckpt) for name, _, spec, _ in runs}
    # OUT/report.md follows this invocation's runs; the final report reads the results file
    results: dict[str, dict[int, dict]] = {}
    todo = [run for run in runs if shared.canonical(settings[run[2]["name"]]) not in done]
    print(f"{len(todo)} run(s) to do, {len(runs) - len(todo)} already in {args.results}")
    facts = shared.run_facts(max(1, threads if args.jobs == 1 else 1), args.jobs)
    failed: list[str] = []
    by_job = {spec["name"]: (name, seed, spec) for name, seed, spec, _ in runs}

    def finished(job: str, curve: dict[str, Any]) -> None:
        name, seed, _ = by_job[job]
        results.setdefault(name, {})[seed] = curve
        rec = record_of(settings[job], curve, data_of[name])
        shared.append_result(args.results, {**rec, **teacher, **facts})
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
        [Job(spec["name"], (spec, own)) for _, _, spec, own in todo],
        _curve,
        n_workers=args.jobs,
        # workers share the cores: one torch thread each
        threads_per_worker=max(1, threads if args.jobs == 1 else 1),
        on_result=finished,
        on_error=failure,
        initializer=_init_worker,
        initargs=(args.train_limit, args.test_limit, args.val_fraction),
    )
    notes.append(f"this invocation's runs took {time.perf_counter() - t0:.0f}s wall time")
    if failed:
        notes.append(f"failed runs: {', '.join(failed)}")
    text = report(args, methods, results, teacher_acc, notes, out, len(runs))
    groups = shared.group_rows(current_rows(shared.read_results(args.results)), PER_RUN)
    ours = groups.get(shared.group_key(next(iter(settings.values())), PER_RUN), [])
    if ours:
        text += "\n\n" + report_rows(ours)
        png = plot_rows(ours, out / "stablekd_fmnist.png")
        text += f"\n\ncurves: {png}"
        (out / "report.md").write_text(text + "\n")
    print("\n" + text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
