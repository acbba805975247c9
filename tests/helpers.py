"""Shared helpers for tests that run the CLI in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: one thread each, so two ranks share 2 cores fairly."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `python -m distillkit ARGS` and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "distillkit", *args],
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=timeout,
    )


def read_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TIMING_KEYS = {"epoch_time", "images_per_sec"}


def without_timing(rows: list[dict]) -> list[dict]:
    """Rows with wall-clock fields removed (they legitimately differ between runs)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
