"""Which augmentation helps KD? T. stddev vs student test loss on Fashion-MNIST (Wang et al. 2022).

One shared teacher (`--teacher RUN`, see fmnist_teacher.py) -> one student per scheme (identity,
flip, crop_flip, cutout, mixup, cutmix, cutmixpick with teacher entropy) and seed, all at the same
budget. Each (scheme, seed) job measures the scheme's T. stddev with that seed (one pass of the
teacher over the training split) and distills the student with kd_da; the finished job is
appended as one JSON line to `--results` (never rewritten; a rerun skips the (scheme, seed)
pairs already recorded with the same settings, so an interrupted run is continued by running the
same command again). The report, rebuilt from the results file alone (`--report`): student
accuracy and test loss (mean ± std over seeds), T. stddev per scheme, Pearson / Spearman /
Kendall with p-values, a bootstrap 95% interval of Spearman (seeds resampled within schemes) and
a verdict on the ranking claim (CutMixPick >= CutMix >= no extra augmentation) and on the
correlation claim (Spearman >= 0.7).

    python benchmarks/augment_fmnist.py --teacher bench_results/fmnist_teacher --jobs 2
    python benchmarks/augment_fmnist.py --report            # the tables, from the results file
    python benchmarks/augment_fmnist.py --teacher T --epochs 1 --seeds 0 --train-fraction 0.02 \\
        --schemes identity,cutmix --results /tmp/augment_smoke.jsonl          # a smoke test

The scatter of T. stddev against test loss (scheme means) goes to OUT/tstddev_vs_test_loss.png.
`--val-fraction F` carves a stratified F of the training split (seeded) as the evaluation set,
so settings are compared without reading the test split; those rows are reported apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fmnist_teacher as shared  # noqa: E402
from _common import keep_previous  # noqa: E402
from _pool import Job, JobError, run_jobs  # noqa: E402

from distillkit.commands.da_score import correlations, parse_schemes, scatter_plot, student_options
from distillkit.config import config_from_dict
from distillkit.data.datasets import (
    DataBundle,
    Split,
    list_datasets,
    load_dataset,
    register_dataset,
)

SCHEMES = "identity,flip,crop_flip,cutout,mixup,cutmix,cutmixpick:criterion=teacher_entropy"
RESULTS = "benchmarks/results/augment_fmnist.jsonl"
# run_da_score's T. stddev settings: 2 windows of 5 batches of 64 images each, one pass
TSTD = {"batch_size": 64, "window_batches": 5, "epochs": 1}
PER_RUN = ("scheme", "seed")  # the settings that vary within one table
CLAIM_ORDER = ("cutmixpick", "cutmix", "identity")  # CutMixPick >= CutMix >= no extra augmentation


def register_fraction_dataset(fraction: float) -> str:
    """Fashion-MNIST with a stratified `fraction` of its training split (test split whole)."""
    if fraction >= 1.0:
        return "fashion-mnist"
    name = f"fashion-mnist-frac{fraction:g}"
    if name in list_datasets():
        return name

    @register_dataset(name)
    def _load(data_dir: str | None = None, image_size: int | None = None) -> DataBundle:
        full = load_dataset("fashion-mnist", data_dir=data_dir, image_size=image_size)
        keep = torch.from_numpy(shared.stratified_val(full.train.labels.numpy(), fraction, 0))
        train = Split(full.train.images[keep].clone(), full.train.labels[keep].clone())
        return DataBundle(
            name, train, full.test, full.num_classes, full.in_channels, full.image_size,
            full.mean, full.std, full.classes, full.hflip,
        )  # fmt: skip

    return name


def register_data(fraction: float, val_fraction: float) -> str:
    """The dataset the runs train on (a worker process registers it again)."""
    name = register_fraction_dataset(fraction)
    return shared.register_val_split(val_fraction, 0, name) if val_fraction > 0 else name


def settings_of(args: argparse.Namespace, label: str, seed: int, teacher: dict) -> dict[str, Any]:
    """Everything that decides one (scheme, seed) result: its identity in the results file."""
    return {
        "scheme": label,
        "seed": seed,
        "epochs": args.epochs,
        "train_fraction": args.train_fraction,
        "val_fraction": args.val_fraction,
        "student_model": args.student_model,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "temperature": args.temperature,
        "teacher_checkpoint": teacher["teacher_checkpoint"],
        "tstddev": TSTD,
    }


def scheme_job(settings: dict[str, Any], args: dict[str, Any], out: str) -> dict[str, Any]:
    """T. stddev of one scheme with one seed, then its distilled student; returns the record."""
    from distillkit.data.augment import build_augmentation, parse_scheme
    from distillkit.data.tstddev import t_stddev_on_bundle
    from distillkit.engine.trainer import resolve_device
    from distillkit.runner import load_teacher, resume, run

    label, seed = settings["scheme"], settings["seed"]
    name, params = parse_scheme(label)
    dataset = register_data(settings["train_fraction"], settings["val_fraction"])
    base = config_from_dict(
        {
            "method": "kd_da",
            "dataset": dataset,
            "data_dir": args["data_dir"],
            "model": settings["student_model"],
            "teacher": settings["teacher_checkpoint"],
            "options": {"temperature": settings["temperature"]},
            # the derived datasets are parts of the teacher's fashion-mnist: same images, new name
            "teacher_dataset_check": dataset == "fashion-mnist",
        }
    )
    t0, c0 = time.perf_counter(), time.process_time()
    device = resolve_device(args["device"])
    bundle = load_dataset(dataset, data_dir=args["data_dir"])
    teacher = load_teacher(base, bundle).to(device)
    with torch.no_grad():
        tstd = t_stddev_on_bundle(
            teacher, bundle, build_augmentation(name, **params), seed=seed, device=device,
            batch_size=TSTD["batch_size"], window_batches=TSTD["window_batches"],
            epochs=TSTD["epochs"],
        )  # fmt: skip
    tstd_s = time.perf_counter() - t0
    del teacher
    # one run directory per settings: a different budget never reuses another's student
    digest = hashlib.sha1(shared.canonical(settings).encode()).hexdigest()[:8]
    run_dir = Path(out) / "students" / f"{label.split(':')[0]}_s{seed}_{digest}"
    cfg = config_from_dict(
        {
            **base.to_dict(),
            "name": run_dir.name,
            "options": student_options(base, name, params),
            "epochs": settings["epochs"],
            "batch_size": settings["batch_size"],
            "lr": settings["lr"],
            "warmup_epochs": min(1.0, settings["epochs"] / 2),
            "seed": seed,
            "teacher_cache": False,  # augmented inputs differ every step
            "device": args["device"],
            "quiet": not args["verbose"],
            "out_dir": str(run_dir),
        }
    )
    if (run_dir / "metrics.json").is_file():
        summary = json.loads((run_dir / "metrics.json").read_text())
    elif (run_dir / "checkpoints" / "last.pt").is_file():
        summary = resume(run_dir, {"device": args["device"]})
    else:
        summary = run(cfg)
    return {
        "scheme": label,
        "seed": seed,
        "epochs": settings["epochs"],
        "train_size": summary["train_samples"],
        "split": "val" if settings["val_fraction"] > 0 else "test",
        "t_stddev": tstd.value,
        "teacher_entropy": tstd.mean_entropy,
        "student_test_acc": summary["test_acc"],
        "student_test_loss": summary["test_loss"],
        "run_dir": str(run_dir),
        "tstddev_s": tstd_s,
        "train_time_s": summary.get("train_time_s"),
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
    }


def _init_worker(fraction: float, val_fraction: float) -> None:
    """Worker set-up (the pool sets the thread count): the datasets the runs name."""
    register_data(fraction, val_fraction)


# -- the report -----------------------------------------------------------------------------------
def _stats(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per scheme, in first-seen order: its seeds' T. stddev, accuracy and test loss."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        s = out.setdefault(r["scheme"], {"t": [], "acc": [], "loss": []})
        s["t"].append(r["t_stddev"])
        s["acc"].append(r["student_test_acc"])
        s["loss"].append(r["student_test_loss"])
    return out


def _spearman(groups: dict[str, list[tuple[float, float]]]) -> float | None:
    """Spearman of per-scheme mean T. stddev vs mean test loss, from (t, loss) seed pairs."""
    from scipy.stats import rankdata

    t = rankdata([np.mean([p[0] for p in v]) for v in groups.values()])
    loss = rankdata([np.mean([p[1] for p in v]) for v in groups.values()])
    if np.ptp(t) == 0 or np.ptp(loss) == 0:
        return None  # a constant side: no rank correlation
    # Spearman = Pearson of the ranks (ties averaged), as scipy.stats.spearmanr, without its p-value
    return float(np.corrcoef(t, loss)[0, 1])


def _pick(per: dict[str, Any], name: str) -> str | None:
    """The scheme label whose augmentation is `name` (labels may carry parameters)."""
    return next((k for k in per if k.split(":")[0] == name), None)


def report_group(rows: list[dict], n_boot: int = 2000) -> str:
    """Tables, correlations and verdicts of one settings group."""
    per = _stats(rows)
    first = rows[0]
    s = first["settings"]
    lines = [
        f"Fashion-MNIST {first.get('split', 'test')} split: teacher {first.get('teacher_model')} "
        f"({first.get('teacher_acc')}% test) -> {s.get('student_model')}, {first['epochs']} "
        f"epochs, {first['train_size']} training images, lr {s.get('lr')}, batch "
        f"{s.get('batch_size')}, T={s.get('temperature')}; {first.get('threads')} thread(s) x "
        f"{first.get('jobs')} job(s)",
        "",
        "| scheme | n | T. stddev | student acc (%) | student test loss |",
        "|---|---|---|---|---|",
    ]
    for label, v in per.items():
        lines.append(
            f"| {label} | {len(v['acc'])} | {shared.pm(v['t'], 6)} | {shared.pm(v['acc'])} | "
            f"{shared.pm(v['loss'], 4)} |"
        )
    t_mean = [float(np.mean(v["t"])) for v in per.values()]
    l_mean = [float(np.mean(v["loss"])) for v in per.values()]
    t_all = [x for v in per.values() for x in v["t"]]
    l_all = [x for v in per.values() for x in v["loss"]]
    lines += ["", "| T. stddev vs test loss | over scheme means | p | over every student | p |",
              "|---|---|---|---|---|"]  # fmt: skip
    means, every = correlations(t_mean, l_mean), correlations(t_all, l_all)

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for name in ("pearson", "spearman", "kendall"):
        a, b = means[name], every[name]
        lines.append(
            f"| {name} | {f(a['statistic'])} | {f(a['pvalue'])} | {f(b['statistic'])} | "
            f"{f(b['pvalue'])} |"
        )
    pairs = {k: list(zip(v["t"], v["loss"])) for k, v in per.items()}
    ci = shared.bootstrap(pairs, _spearman, n=n_boot, seed=0)
    lines += ["", "Claims (bootstrap: seeds resampled within schemes, 95% percentile, seed 0):"]
    claim = [_pick(per, n) for n in CLAIM_ORDER]
    for i, (hi, lo) in enumerate(zip(claim, claim[1:])):
        if hi is None or lo is None:
            missing = CLAIM_ORDER[i] if hi is None else CLAIM_ORDER[i + 1]
            lines.append(f"- ranking {CLAIM_ORDER[i]} >= {CLAIM_ORDER[i + 1]}: not measured "
                         f"({missing} not run)")  # fmt: skip
            continue
        diff = shared.diff_interval(per[hi]["acc"], per[lo]["acc"], n_boot)
        gap = np.mean(per[hi]["acc"]) - np.mean(per[lo]["acc"])
        lines.append(shared.verdict_line(
            f"ranking {hi} >= {lo} (student acc difference {gap:+.2f} points)", diff, 0.0))  # fmt: skip
    lines.append(shared.verdict_line(
        f"Spearman(T. stddev, test loss) >= 0.7 (over scheme means: {f(means['spearman']['statistic'])})",
        ci, 0.7, digits=3))  # fmt: skip
    return "\n".join(lines)


def report(path: str | Path, split: str | None = None) -> str:
    """Every settings group of a results file, one report each (split: only that split's rows)."""
    rows = [r for r in shared.read_results(path) if split in (None, r.get("split"))]
    if not rows:
        return f"{path}: no finished runs recorded"
    groups = shared.group_rows(rows, PER_RUN)
    return "\n\n".join(report_group(g) for g in groups.values())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=None, help="shared teacher run (fmnist_teacher.py)")
    ap.add_argument("--epochs", type=int, default=10, help="student epochs (every scheme)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train-fraction", type=float, default=1.0, help="stratified share of train")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="evaluate on a stratified share of train instead of test (0: test)")  # fmt: skip
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--student-model", default="cnn_small")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (1 thread each if > 1)")
    ap.add_argument("--results", default=RESULTS, help="JSON-lines results file (appended)")
    ap.add_argument("--report", action="store_true", help="print the tables of --results")
    ap.add_argument("--out", default="runs/bench_augment_fmnist", help="student run directories")
    ap.add_argument("--verbose", action="store_true", help="per-epoch lines")
    args = ap.parse_args(argv)
    if not 0.0 < args.train_fraction <= 1.0:
        ap.error(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    if not 0.0 <= args.val_fraction < 1.0:
        ap.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.jobs < 1 or args.epochs < 1:
        ap.error("--jobs and --epochs must be >= 1")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.scheme_list = parse_schemes(args.schemes)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the (scheme, seed) jobs not yet recorded, append each as it ends, print the report."""
    args = parse_args(argv)
    if args.report:
        print(report(args.results))
        return 0
    if args.teacher:
        teacher = shared.teacher_info(args.teacher)
    else:
        teacher = shared.train_teacher(
            shared.default_args(device=args.device, data_dir=args.data_dir)
        )
    threads = 1 if args.jobs > 1 else torch.get_num_threads()
    done = shared.recorded_settings(shared.read_results(args.results))
    todo = []
    for label, _, _ in args.scheme_list:
        for seed in args.seed_list:
            settings = settings_of(args, label, seed, teacher)
            if shared.canonical(settings) not in done:
                todo.append(settings)
    print(f"{len(todo)} run(s) to do, the others already in {args.results}", flush=True)
    register_data(args.train_fraction, args.val_fraction)
    facts = shared.run_facts(threads, args.jobs)
    worker_args = {"data_dir": args.data_dir, "device": args.device, "verbose": args.verbose}

    def finished(name: str, rec: dict[str, Any]) -> None:
        settings = next(s for s in todo if f"{s['scheme']}_s{s['seed']}" == name)
        shared.append_result(args.results, {**rec, **teacher, **facts, "settings": settings})
        print(f"{name}: acc {rec['student_test_acc']:.2f} loss {rec['student_test_loss']:.4f} "
              f"T. stddev {rec['t_stddev']:.6f} ({rec['wall_s']:.0f}s)", flush=True)  # fmt: skip

    def failed(error: JobError) -> None:
        print(f"{error.line()} (not recorded: the next invocation runs it again)", file=sys.stderr)

    t0 = time.perf_counter()
    errors = run_jobs(
        [Job(f"{s['scheme']}_s{s['seed']}", (s, worker_args, args.out)) for s in todo],
        scheme_job,
        n_workers=args.jobs,
        threads_per_worker=threads,
        on_result=finished,
        on_error=failed,
        initializer=_init_worker,
        initargs=(args.train_fraction, args.val_fraction),
    )
    print(f"\n{len(todo) - len(errors)} run(s) in {time.perf_counter() - t0:.0f}s\n")
    groups = shared.group_rows(shared.read_results(args.results), PER_RUN)
    ours = groups.get(shared.group_key(settings_of(args, "", 0, teacher), PER_RUN), [])
    if not ours:
        print("no finished runs")
        return 1
    print(report_group(ours))
    # the scatter of scheme means, from the results file; an earlier plot is kept, renamed
    keep_previous(Path(args.out), ["tstddev_vs_test_loss.png"])
    means = [
        {
            "scheme": k,
            "t_stddev": float(np.mean(v["t"])),
            "student_test_loss": float(np.mean(v["loss"])),
        }
        for k, v in _stats(ours).items()
    ]
    print(f"\nplot: {scatter_plot(means, Path(args.out) / 'tstddev_vs_test_loss.png')}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
