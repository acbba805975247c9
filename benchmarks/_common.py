"""Helpers shared by the benchmark scripts (imported from beside them)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _move_stamped(path: Path, stem: str, suffix: str = "") -> Path:
    """Rename path to STEM.<its time>SUFFIX (-1, -2, ... when taken) and return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    target, n = path.with_name(f"{stem}.{stamp}{suffix}"), 1
    while target.exists():
        target, n = path.with_name(f"{stem}.{stamp}-{n}{suffix}"), n + 1
    os.replace(path, target)
    return target


def keep_previous(out: Path, names: list[str]) -> list[Path]:
    """Rename an earlier invocation's output files to NAME.<its time>.EXT, so none is overwritten."""
    kept = []
    for name in names:
        path = out / name
        if not path.is_file():
            continue
        target = _move_stamped(path, path.stem, path.suffix)
        print(f"kept the previous {name} as {target}", flush=True)
        kept.append(target)
    return kept


def set_aside(run_dir: Path) -> Path | None:
    """Rename a run directory an interrupted attempt left to NAME.interrupted.<its time> (kept, not
    deleted), so a fresh attempt neither appends to its metrics nor mixes with its checkpoints."""
    if not run_dir.exists():
        return None
    target = _move_stamped(run_dir, f"{run_dir.name}.interrupted")
    print(f"kept an interrupted attempt's {run_dir} as {target}", flush=True)
    return target
