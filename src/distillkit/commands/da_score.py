"""`distillkit da-score`: rank augmentations for KD by T. stddev, optionally against real students.

For every scheme the teacher of CONFIG scores T. stddev (see distillkit.data.tstddev). With
--train-students a student is distilled per scheme and seed (method kd_da, same budget) and the
correlations (Pearson, Spearman, Kendall) between T. stddev and student test loss are reported,
as in Wang et al. (NeurIPS 2022). Results go to OUT/da_score.{json,csv} and a scatter plot PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from distillkit.commands.common import add_run_args, split_config_arg
from distillkit.errors import ConfigError, UsageError

DEFAULT_SCHEMES = "identity,flip,crop_flip,cutout,mixup,cutmix,cutmixpick"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `da-score` subcommand."""
    p = subparsers.add_parser(
        "da-score",
        help="T. stddev of augmentations for KD (and student loss correlations)",
        description=(
            "Score data augmentations for KD by the teacher-only T. stddev (Wang et al. 2022). "
            "Schemes take parameters as name:key=value:key=value, e.g. cutout:holes=2:length=4."
        ),
    )
    add_run_args(p)
    p.add_argument(
        "--schemes", default=DEFAULT_SCHEMES, help=f"comma-separated (default {DEFAULT_SCHEMES})"
    )
    p.add_argument(
        "--train-students", action="store_true", help="also distill a student per scheme"
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--out", help="output directory (default runs/<name>_da_score)")
    p.add_argument("--batch", type=int, default=64, help="T. stddev batch size (default 64)")
    p.add_argument(
        "--window-batches", type=int, default=5, help="batches per T. stddev window (default 5)"
    )
    p.add_argument("--tstd-epochs", type=int, default=1, help="passes over the data for T. stddev")
    p.set_defaults(func=cmd_da_score)


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise UsageError("--seeds is empty")
    return seeds


def parse_schemes(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """'identity,cutout:length=4' -> [(label, name, params)], every scheme checked by building it."""
    from distillkit.data.augment import build_augmentation, parse_scheme

    out = []
    for label in [s.strip() for s in str(text).split(",") if s.strip()]:
        name, params = parse_scheme(label)
        build_augmentation(name, **params)  # fail before any work, naming the scheme
        out.append((label, name, params))
    if not out:
        raise ValueError("--schemes is empty")
    labels = [lab for lab, _, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--schemes lists a scheme twice: {labels}")
    return out


def correlations(x: list[float], y: list[float]) -> dict[str, dict[str, float | None]]:
    """Pearson, Spearman and Kendall correlation (statistic and p-value) of x against y."""
    from scipy import stats

    tests = {"pearson": stats.pearsonr, "spearman": stats.spearmanr, "kendall": stats.kendalltau}
    usable = len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0
    out: dict[str, dict[str, float | None]] = {}
    for name, fn in tests.items():
        res = fn(x, y) if usable else (math.nan, math.nan)
        # an undefined statistic or p-value (NaN) is reported as None
        stat, p = (None if math.isnan(v) else v for v in (float(res[0]), float(res[1])))
        out[name] = {"statistic": stat, "pvalue": p}
    return out


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def student_options(cfg, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """kd_da options of a scheme's student: the config's own kd_da options, or (for another
    method) only its KD temperature, plus the scheme's augmentation."""
    options = {k: v for k, v in cfg.options.items() if cfg.method == "kd_da" or k == "temperature"}
    options.update(augmentation=name, params=dict(params))
    return options


def _train_student(
    cfg, label: str, name: str, params: dict[str, Any], seed: int, out_dir: Path
) -> dict[str, Any]:
    """Distill one student with kd_da and the scheme; reuse a finished run of the same config."""
    from distillkit.config import config_from_dict, load_config
    from distillkit.runner import canonical_config, run

    data = cfg.to_dict()
    run_dir = out_dir / "students" / f"{_safe(label)}_s{seed}"
    data.update(
        method="kd_da",
        options=student_options(cfg, name, params),
        seed=seed,
        name=f"{cfg.name}_{_safe(label)}_s{seed}",
        out_dir=str(run_dir),
        teacher_cache=False,
    )
    # run() saves paths and import specs absolute: compare like with like
    student_cfg = canonical_config(config_from_dict(data))
    metrics = run_dir / "metrics.json"
    saved = None
    if metrics.is_file() and (run_dir / "config.yaml").is_file():
        # a config written by an older distillkit does not load: not the same config
        with contextlib.suppress(ConfigError):
            saved = load_config(run_dir / "config.yaml").to_dict()
    return json.loads(metrics.read_text()) if saved == student_cfg.to_dict() else run(student_cfg)


def run_da_score(
    cfg,
    schemes: list[tuple[str, str, dict[str, Any]]],
    *,
    seeds: list[int],
    out_dir: str | Path,
    train_students: bool = False,
    batch_size: int = 64,
    window_batches: int = 5,
    tstd_epochs: int = 1,
    log=print,
) -> dict[str, Any]:
    """T. stddev per scheme (mean over seeds), and with students their test loss/acc and correlations."""
    from distillkit.data.augment import build_augmentation
    from distillkit.data.datasets import load_dataset
    from distillkit.data.tstddev import t_stddev_on_bundle
    from distillkit.engine.trainer import resolve_device
    from distillkit.runner import choose_subset, load_teacher

    if not cfg.teacher:
        raise ConfigError("da-score needs a teacher: set teacher=RUN_DIR_OR_CHECKPOINT")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    bundle = load_dataset(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size)
    teacher = load_teacher(cfg, bundle).to(device)
    indices = choose_subset(cfg, bundle, teacher, device)

    rows: list[dict[str, Any]] = []
    for label, name, params in schemes:
        # the teacher's forward passes run under no_grad inside t_stddev
        results = [
            t_stddev_on_bundle(
                teacher,
                bundle,
                build_augmentation(name, **params),
                batch_size=batch_size,
                window_batches=window_batches,
                epochs=tstd_epochs,
                seed=seed,
                augment=cfg.augment,
                device=device,
                indices=indices,
            )
            for seed in seeds
        ]
        values = [res.value for res in results]
        row: dict[str, Any] = {
            "scheme": label,
            "t_stddev": float(np.mean(values)),
            "t_stddev_seeds": values,
            "teacher_entropy": float(np.mean([res.mean_entropy for res in results])),
            "windows": results[-1].n_windows,
        }
        log(f"[da-score] {label}: T. stddev {row['t_stddev']:.6f} ({row['windows']} windows)")
        rows.append(row)

    result: dict[str, Any] = {
        "config": cfg.to_dict(),
        "seeds": seeds,
        "t_stddev_settings": {
            "batch_size": batch_size,
            "window_batches": window_batches,
            "images_per_window": 2 * batch_size * window_batches,
            "epochs": tstd_epochs,
        },
        "schemes": rows,
    }
    if train_students:
        for row, (label, name, params) in zip(rows, schemes):
            runs = [_train_student(cfg, label, name, params, s, out_dir) for s in seeds]
            row["student_test_loss"] = float(np.mean([r["test_loss"] for r in runs]))
            row["student_test_acc"] = float(np.mean([r["test_acc"] for r in runs]))
            row["student_test_loss_seeds"] = [r["test_loss"] for r in runs]
            row["student_test_acc_seeds"] = [r["test_acc"] for r in runs]
            log(
                f"[da-score] {label}: student test loss {row['student_test_loss']:.4f}, "
                f"acc {row['student_test_acc']:.2f}"
            )
        result["correlations"] = correlations(
            [r["t_stddev"] for r in rows], [r["student_test_loss"] for r in rows]
        )
        result["plot"] = str(scatter_plot(rows, out_dir / "tstddev_vs_test_loss.png"))
    write_results(result, out_dir)
    return result


def scatter_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """T. stddev against student test loss, one labelled point per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [r["t_stddev"] for r in rows]
    ys = [r["student_test_loss"] for r in rows]
    ax.scatter(xs, ys)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["scheme"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("T. stddev (teacher only)")
    ax.set_ylabel("student test loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


CSV_COLUMNS = [
    "scheme",
    "t_stddev",
    "teacher_entropy",
    "windows",
    "student_test_loss",
    "student_test_acc",
]


def write_results(result: dict[str, Any], out_dir: Path) -> None:
    """da_score.json (everything) and da_score.csv (one row per scheme)."""
    (out_dir / "da_score.json").write_text(json.dumps(result, indent=2, default=str))
    with open(out_dir / "da_score.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["schemes"])  # missing columns are written empty


def _fmt(v: Any, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of the schemes, plus the correlations when students were trained."""
    students = "correlations" in result
    cols = ["scheme", "T. stddev", "teacher entropy"]
    if students:
        cols += ["student test loss", "student test acc"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["schemes"]:
        cells = [r["scheme"], _fmt(r["t_stddev"], 6), _fmt(r["teacher_entropy"], 4)]
        if students:
            cells += [_fmt(r["student_test_loss"], 4), _fmt(r["student_test_acc"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    if students:
        lines += ["", "T. stddev vs student test loss:"]
        for name, c in result["correlations"].items():
            lines.append(f"  {name:<8} {_fmt(c['statistic'], 3):>7} (p={_fmt(c['pvalue'], 3)})")
    return "\n".join(lines)


def cmd_da_score(args: argparse.Namespace) -> int:
    """da-score: parse, run, print the table and where the files went."""
    from distillkit.config import load_config
    from distillkit.runner import check_config

    cfg = load_config(*split_config_arg(args))
    check_config(cfg)
    schemes = parse_schemes(args.schemes)
    seeds = _parse_seeds(args.seeds)
    for key in ("batch", "window_batches", "tstd_epochs"):
        if getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    out_dir = Path(args.out) if args.out else Path("runs") / f"{cfg.name}_da_score"
    result = run_da_score(
        cfg,
        schemes,
        seeds=seeds,
        out_dir=out_dir,
        train_students=args.train_students,
        batch_size=args.batch,
        window_batches=args.window_batches,
        tstd_epochs=args.tstd_epochs,
        log=(lambda *a: None) if cfg.quiet else print,
    )
    print(format_table(result))
    print(f"results: {out_dir / 'da_score.json'}, {out_dir / 'da_score.csv'}")
    if "plot" in result:
        print(f"plot: {result['plot']}")
    return 0
