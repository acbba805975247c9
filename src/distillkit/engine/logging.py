"""Run logging: metrics.jsonl/metrics.json, an optional TensorBoard writer, and console output."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLogger:
    """Writes one JSON line per epoch; the full history can be rewritten on resume."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:
                print(
                    "tensorboard is not installed; pip install 'distillkit[tensorboard]'",
                    file=sys.stderr,
                )

    def restore(self, history: list[dict[str, Any]]) -> None:
        """Continue from a checkpoint's history, rewriting metrics.jsonl to match it exactly."""
        self.history = [dict(h) for h in history]
        if self.enabled:
            with open(self.run_dir / "metrics.jsonl", "w") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in self.history)

    def log(self, row: dict[str, Any]) -> None:
        """Record one epoch's metrics."""
        row = {k: _clean(v) for k, v in row.items()}
        self.history.append(row)
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            step = row.get("epoch", len(self.history))
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.tb.add_scalar(key, value, step)

    def write_final(self, summary: dict[str, Any]) -> None:
        """Write metrics.json with the run's final numbers."""
        if self.enabled:
            clean = {k: _clean(v) for k, v in summary.items()}
            (self.run_dir / "metrics.json").write_text(json.dumps(clean, indent=2) + "\n")
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch rows of a run directory."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
