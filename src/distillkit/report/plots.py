"""Plots and tables from run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillkit.engine.logging import read_metrics


def plot_curves(runs: dict[str, str | Path], out_png: str | Path, key: str = "test_acc") -> Path:
    """One line per run of `key` against epoch, saved as a PNG."""
    # read and check everything first: an unknown key must not leave an empty plot behind
    series = {}
    for label, run_dir in runs.items():
        all_rows = read_metrics(run_dir)
        rows = [r for r in all_rows if r.get(key) is not None]
        if not rows:
            present = sorted({k for r in all_rows for k in r if k != "epoch"})
            raise ValueError(
                f"run {run_dir} has no metric {key!r}; its metrics are: {', '.join(present) or '(none)'}"
            )
        series[label] = rows

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in series.items():
        ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub-markdown table of `columns` from each row (floats to 2 decimals)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
