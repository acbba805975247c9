"""Checkpoints: atomic writes, clear errors on corrupt files, and loading a trained model back."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Test hook: kill the process right after the checkpoint of this epoch is written, to check resume.
KILL_ENV = "DISTILLKIT_KILL_AFTER_EPOCH"

FORMAT = "distillkit-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, or not a distillkit checkpoint."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        # the underlying library's explanation: shown by the CLI only under --verbose
        self.detail = detail


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C until the block ends, so a checkpoint being written is always completed."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # e.g. an embedding interpreter that does not allow it
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    with sigint_deferred():
        _write_atomically(payload, path)


def _write_atomically(payload: dict[str, Any], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide shared run dirs from others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """Accept a checkpoint file or a run directory (then checkpoints/<which>.pt, else last.pt)."""
    p = Path(path)
    if p.is_dir():
        for name in (which, "last", "best"):
            candidate = p / "checkpoints" / f"{name}.pt"
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"no checkpoint found in run directory {p} (looked in {p / 'checkpoints'})"
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def _numpy_globals() -> list[Any]:
    """The numpy pieces a checkpoint may hold (RNG state, subset indices): plain numeric arrays."""
    reconstruct = np._core.multiarray._reconstruct  # type: ignore[attr-defined]
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32)
    numeric += (np.uint64, np.float16, np.float32, np.float64)
    return [
        reconstruct,
        # files written under numpy 1.x name the same function by its old module
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *(type(np.dtype(t)) for t in numeric),
    ]


def _has_object_array(obj: Any) -> bool:
    if isinstance(obj, np.ndarray):
        return obj.dtype.hasobject
    if isinstance(obj, dict):
        return any(_has_object_array(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_object_array(v) for v in obj)
    return False


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_checkpoint(path: str | Path, which: str = "best") -> dict[str, Any]:
    """Read a checkpoint, raising CheckpointError that names the file if it is unusable."""
    p = resolve_checkpoint(path, which)
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects would run their code
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        unsafe = _UNSAFE_GLOBAL.search(str(exc))
        if unsafe:
            raise CheckpointError(
                f"checkpoint {p} holds a pickled Python object ({unsafe.group(1)}), which "
                "distillkit refuses to load: it could run code",
                detail=str(exc),
            ) from None
        raise CheckpointError(
            f"checkpoint {p} is corrupt or unreadable", detail=f"{type(exc).__name__}: {exc}"
        ) from None
    if _has_object_array(state):
        raise CheckpointError(
            f"checkpoint {p} holds a numpy object array, which distillkit refuses"
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a distillkit checkpoint")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{p} was written by a newer distillkit (format {state['version']})")
    return state


def model_from_checkpoint(
    path: str | Path, which: str = "best"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model a checkpoint holds; returns (model in eval mode, checkpoint)."""
    from distillkit.models import build_model

    state = load_checkpoint(path, which)
    meta = state["model_meta"]
    model = build_model(
        meta["name"],
        in_channels=meta["in_channels"],
        num_classes=meta["num_classes"],
        image_size=meta["image_size"],
        **meta.get("kwargs", {}),
    )
    model.load_state_dict(state["model"])
    model.eval()
    return model, state
