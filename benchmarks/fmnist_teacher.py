"""The shared Fashion-MNIST teacher, and the results-file helpers of the Fashion-MNIST benchmarks.

Trains (or finishes, or reuses) the one teacher that augment_fmnist.py, stablekd_fmnist.py and
kd-style runs take with `--teacher RUN`, then prints its test accuracy:

    python benchmarks/fmnist_teacher.py --out bench_results/fmnist_teacher
    # the same run as one distillkit command:
    distillkit train model=resnet20 dataset=fashion-mnist epochs=30 lr=0.1 warmup_epochs=1 \\
        seed=0 name=fmnist_teacher out_dir=bench_results/fmnist_teacher

resnet20, 30 epochs, SGD lr 0.1 with a cosine schedule, standard crop/flip: fixed settings, none
chosen on the test split. A run directory holding a checkpoint but no metrics.json (interrupted)
is resumed, on the device asked for.

The helpers below give every benchmark the same results file: one JSON line per finished run,
appended and flushed as the run finishes, never rewritten; a run whose `settings` are already
recorded is skipped by the next invocation; `--report` rebuilds the tables from the file alone.
Benchmarks use the teacher's final weights (checkpoints/last.pt), not the checkpoint that scored
best on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillkit.config import config_from_dict
from distillkit.data.datasets import (
    DataBundle,
    Split,
    list_datasets,
    load_dataset,
    register_dataset,
)
from distillkit.runner import resume, run

ROOT = Path(__file__).resolve().parents[1]


# -- the teacher ----------------------------------------------------------------------------------
def teacher_info(run_dir: str | Path) -> dict[str, Any]:
    """Path, final weights, model, epochs and test accuracy of a finished teacher run.

    Raises SystemExit with a one-line message when run_dir is not a finished run.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.json"
    last = run_dir / "checkpoints" / "last.pt"
    if not metrics.is_file() or not last.is_file():
        hint = (
            f"; finish it with `distillkit resume {run_dir}`"
            if last.is_file()
            else "; train one with `python benchmarks/fmnist_teacher.py`"
        )
        raise SystemExit(f"--teacher {run_dir} is not a finished run (no metrics.json){hint}")
    summary = json.loads(metrics.read_text())
    return {
        "teacher": str(run_dir.resolve()),
        # the final weights: best.pt is the epoch that scored best on the test split
        "teacher_checkpoint": str(last.resolve()),
        "teacher_model": summary.get("model"),
        "teacher_epochs": summary.get("epochs"),
        "teacher_acc": summary.get("test_acc"),
        "teacher_best_epoch": summary.get("best_epoch"),
    }


def teacher_config(args: argparse.Namespace) -> dict[str, Any]:
    """The teacher's RunConfig mapping."""
    return {
        "name": Path(args.out).name,
        "method": "ce",
        "dataset": "fashion-mnist",
        "data_dir": args.data_dir,
        "model": args.model,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": "cosine",
        "warmup_epochs": 1.0,
        "augment": True,
        "seed": args.seed,
        "device": args.device,
        "quiet": not args.verbose,
        "out_dir": str(args.out),
    }


def train_teacher(args: argparse.Namespace) -> dict[str, Any]:
    """Reuse a finished teacher, resume an interrupted one, or train it; return teacher_info."""
    out = Path(args.out)
    if (out / "metrics.json").is_file():
        print(f"reusing the finished teacher {out}", flush=True)
    elif (out / "checkpoints" / "last.pt").is_file():
        print(f"resuming the interrupted teacher {out} on {args.device}", flush=True)
        resume(out, {"device": args.device, "data_dir": args.data_dir, "quiet": not args.verbose})
    else:
        run(config_from_dict(teacher_config(args)), history=[" ".join(sys.argv)])
    return teacher_info(out)


def parser() -> argparse.ArgumentParser:
    """The teacher's command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_results/fmnist_teacher")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--verbose", action="store_true", help="per-epoch lines")
    return ap


def default_args(**changes: Any) -> argparse.Namespace:
    """The default teacher settings with some changed (a benchmark given no --teacher)."""
    args = parser().parse_args([])
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    """Train the shared teacher and print its test accuracy."""
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    info = train_teacher(args)
    print(
        f"teacher {info['teacher']}: {info['teacher_model']}, {info['teacher_epochs']} epochs, "
        f"test acc {info['teacher_acc']:.2f} ({time.perf_counter() - t0:.0f}s)"
    )
    return 0


# -- results files --------------------------------------------------------------------------------
def git_head() -> str | None:
    """The repository's HEAD commit (with `+dirty` when tracked files changed), or None."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines results file (none when absent); a torn last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # a kill mid-write tears only the last line; any other bad line is a real problem
            if i != len(lines) - 1:
                raise SystemExit(f"{path}:{i + 1} is not a JSON line") from None
            print(f"{path}: skipping the torn last line", file=sys.stderr)
    return rows


def append_result(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line and flush it to disk (the file is never rewritten).

    The line is stamped with the time and the host's load when it is written: the moment the run
    finished, not the moment its benchmark started.
    """
    record = {
        **record,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, sort_keys=True, default=str)
    with path.open("a+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":  # after a torn line: start a fresh one
                text = "\n" + text
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def canonical(settings: dict[str, Any]) -> str:
    """settings as sorted JSON: the identity of a run in a results file."""
    return json.dumps(settings, sort_keys=True, default=str)


def recorded_settings(rows: list[dict[str, Any]]) -> set[str]:
    """The canonical settings of every recorded run."""
    return {canonical(r["settings"]) for r in rows if "settings" in r}


def group_key(settings: dict[str, Any], per_run: tuple[str, ...]) -> str:
    """The settings a table's rows share: settings without the per_run keys, canonical."""
    return canonical({k: v for k, v in settings.items() if k not in per_run})


def group_rows(rows: list[dict[str, Any]], per_run: tuple[str, ...]) -> dict[str, list[dict]]:
    """Rows grouped by their settings without the per_run keys (one table per group)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "settings" in r:
            groups.setdefault(group_key(r["settings"], per_run), []).append(r)
    return groups


def run_facts(threads: int, jobs: int) -> dict[str, Any]:
    """What a record says about where it ran: threads, jobs, git head (time and load: on append)."""
    return {
        "threads": threads,
        "jobs": jobs,
        "git_head": git_head(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }


# -- statistics shared by the reports ------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def pm(values: list[float], digits: int = 2) -> str:
    """`mean ± std` of values (`-` when there are none)."""
    if not values:
        return "-"
    mu, sd = mean_std(values)
    return f"{mu:.{digits}f} ± {sd:.{digits}f}"


def bootstrap(
    groups: dict[str, list[Any]], stat: Any, n: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95% percentile interval of stat(groups) when each group's items are resampled (with
    replacement, within the group); None when a group has fewer than two items."""
    if not groups or any(len(v) < 2 for v in groups.values()):
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        sample = {k: [v[i] for i in rng.integers(0, len(v), len(v))] for k, v in groups.items()}
        value = stat(sample)
        if value is not None and np.isfinite(value):
            values.append(value)
    if len(values) < n // 2:  # mostly undefined (e.g. constant resamples): no interval
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def diff_interval(a: list[float], b: list[float], n: int = 2000) -> tuple[float, float] | None:
    """95% bootstrap interval of mean(a) - mean(b), each resampled on its own."""
    return bootstrap({"a": a, "b": b}, lambda g: float(np.mean(g["a"]) - np.mean(g["b"])), n=n)


def plot_curves(
    curves: dict[str, tuple[list[list[float]], list[list[float]], str]],
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
) -> Path:
    """One line per label (x and y per seed, line style): the mean, and ± std shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, (xs, ys, style) in curves.items():
        n = min(len(y) for y in ys)
        y = np.array([v[:n] for v in ys])
        x = xs[0][:n]
        ax.plot(x, y.mean(0), style, marker="o", ms=3, label=label)
        ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.15)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def verdict(interval: tuple[float, float] | None, threshold: float, strict: bool = False) -> str:
    """`confirmed` when the whole interval is at or above threshold (above, when strict),
    `refuted` when it is wholly below, else `not confirmed`."""
    if interval is None:
        return "not confirmed"
    lo, hi = interval
    if lo > threshold or (lo == threshold and not strict):
        return "confirmed"
    if hi < threshold:
        return "refuted"
    return "not confirmed"


def verdict_line(
    claim: str,
    interval: tuple[float, float] | None,
    threshold: float,
    strict: bool = False,
    digits: int = 2,
) -> str:
    """One markdown line: the claim, its verdict and the interval that decides it."""
    where = (
        "no interval: a group has fewer than two seeds"
        if interval is None
        else (f"95% bootstrap interval [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]")
    )
    op = ">" if strict else ">="
    return (
        f"- {claim}: **{verdict(interval, threshold, strict)}** ({where}; needs {op} {threshold:g})"
    )


# -- a validation split carved from train --------------------------------------------------------
def stratified_val(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a per-class `fraction` of labels, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        picks.append(rng.choice(rows, max(1, int(round(fraction * rows.size))), replace=False))
    return np.sort(np.concatenate(picks))


def register_val_split(fraction: float, seed: int, base: str = "fashion-mnist") -> str:
    """A dataset whose train is base's train minus a stratified `fraction`, and whose test is it.

    Hyperparameters are then compared on held-out training images; the test split is not read.
    """
    name = f"{base}-val{fraction:g}-s{seed}"
    if name in list_datasets():
        return name

    @register_dataset(name)
    def _load(data_dir: str | None = None, image_size: int | None = None) -> DataBundle:
        full = load_dataset(base, data_dir=data_dir, image_size=image_size)
        val = torch.from_numpy(stratified_val(full.train.labels.numpy(), fraction, seed))
        keep = torch.ones(len(full.train), dtype=torch.bool)
        keep[val] = False
        train = Split(full.train.images[keep].clone(), full.train.labels[keep].clone())
        held = Split(full.train.images[val].clone(), full.train.labels[val].clone())
        info = {**full.info, "split": f"test = stratified {fraction:g} of train (seed {seed})"}
        return DataBundle(
            name, train, held, full.num_classes, full.in_channels, full.image_size,
            full.mean, full.std, full.classes, full.hflip, info,
        )  # fmt: skip

    return name


if __name__ == "__main__":
    sys.exit(main())
