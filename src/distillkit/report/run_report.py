"""Every run directory's own report: summary.md (final numbers) and curves.png (loss, accuracy)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from distillkit.engine.logging import read_metrics
from distillkit.files import atomic_path

SUMMARY_FILE = "summary.md"
CURVES_FILE = "curves.png"


def _short_spec(spec: Any) -> str:
    """A model or dataset spec as a person reads it: a file import path shows its file name only."""
    text = str(spec)
    target, sep, attr = text.rpartition(":")
    if sep and ("/" in target or "\\" in target):
        return f"{Path(target).name}:{attr}"
    return text


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_markdown(summary: dict[str, Any], title: str | None = None) -> str:
    """A small markdown table of a run's final numbers (metrics.json), with a link to its curves."""
    best = _fmt(summary.get("best_acc"))
    if summary.get("best_epoch") is not None:
        best += f" (epoch {summary['best_epoch']})"
    seconds = summary.get("wall_time_s")
    rate = summary.get("images_per_sec")
    cells = {
        "method": _fmt(summary.get("method")),
        "model": _short_spec(summary.get("model")),
        "dataset": _short_spec(summary.get("dataset")),
        "test acc %": _fmt(summary.get("test_acc")),
        "best acc %": best,
        "epochs": _fmt(summary.get("epochs")),
        "time": "-" if seconds is None else f"{seconds:.1f} s",
        "images/s": "-" if rate is None else f"{rate:,.0f}",
        "teacher queries": _fmt(summary.get("teacher_queries")),
    }
    lines = [
        f"# {title or summary.get('name', 'run')}",
        "",
        "| " + " | ".join(cells) + " |",
        "|" + "---|" * len(cells),
        "| " + " | ".join(c.replace("|", "\\|") for c in cells.values()) + " |",
        "",
        f"Loss and accuracy per epoch: {CURVES_FILE}; every number: metrics.json, metrics.jsonl.",
        "",
    ]
    return "\n".join(lines)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _loss_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    terms = [k for k in keys if k.startswith("loss_")]
    shown = [k for k in ("train_loss", "test_loss") if k in keys]
    # a single term repeats train_loss; several (kd: ce and kl) show what the loss is made of
    if len(terms) > 1 or not shown:
        return shown + terms
    return shown


def _acc_keys(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r if k.endswith("_acc")))


def plot_run_curves(run_dir: str | Path, out_png: str | Path) -> Path:
    """Loss (left) and accuracy (right) of one run against epoch, from its metrics.jsonl."""
    rows = read_metrics(run_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, keys, label in ((left, _loss_keys(rows), "loss"), (right, _acc_keys(rows), "acc %")):
        for key in keys:
            x, y = _series(rows, key)
            if x:
                ax.plot(x, y, marker="o", ms=3, label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(Path(run_dir).name, fontsize=10)
    fig.tight_layout()
    out = Path(out_png)
    try:
        # written next to its place, then renamed: a failed plot never leaves half a file
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out


def write_run_report(run_dir: str | Path, summary: dict[str, Any]) -> list[Path]:
    """Write RUN_DIR/summary.md and RUN_DIR/curves.png; a failure is one line on stderr.

    Returns the files written. Nothing raised here may cost a trained run its result.
    """
    run_dir = Path(run_dir)
    md = run_dir / SUMMARY_FILE
    written = []
    try:
        md.write_text(summary_markdown(summary, title=run_dir.name))
        written.append(md)
        written.append(plot_run_curves(run_dir, run_dir / CURVES_FILE))
    except Exception as exc:  # a missing font or backend must not fail the run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"note: could not write {SUMMARY_FILE}/{CURVES_FILE} in {run_dir} "
            f"({type(exc).__name__}: {first})",
            file=sys.stderr,
            flush=True,
        )
    return written
