"""Checkpoints: atomic writes, clear errors on corrupt files, and loading a trained model back."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from distillkit.files import atomic_path
from distillkit.models.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "KILL_ENV",
    "kill_point",
    "load_checkpoint",
    "model_from_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_run_checkpoints",
    "sigint_deferred",
    "write_atomically",
]

# Test hook: kill the process right after the checkpoint of this epoch is written, to check resume.
KILL_ENV = "DISTILLKIT_KILL_AFTER_EPOCH"


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C until the block ends, so a checkpoint being written is always completed."""
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread (only it gets signals), or an embedding interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)  # now delivered to the previous handler


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically: a crash mid-write leaves the previous file intact."""
    with sigint_deferred():
        write_atomically({"format": FORMAT, "version": VERSION, **state}, Path(path))


def write_atomically(payload: Any, path: Path) -> None:
    """torch.save `payload` to `path` whole or not at all, on disk before it takes the name."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


def save_run_checkpoints(state: dict[str, Any], run_dir: str | Path, best: bool) -> None:
    """Write RUN_DIR/checkpoints/last.pt and, when `best`, best.pt (both atomic)."""
    folder = Path(run_dir) / "checkpoints"
    with sigint_deferred():  # last.pt and best.pt of one epoch are written together or not at all
        save_checkpoint(state, folder / "last.pt")
        if best:
            save_checkpoint(state, folder / "best.pt")


def kill_point(epoch: int) -> None:
    """Test hook: SIGKILL this process after `epoch` when $DISTILLKIT_KILL_AFTER_EPOCH says so."""
    if epoch == int(os.environ.get(KILL_ENV, "0") or 0):
        os.kill(os.getpid(), signal.SIGKILL)
