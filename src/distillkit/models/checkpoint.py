"""Reading run checkpoints back: safe loading (weights only) and rebuilding the trained model.

Below the engine so that teachers (the teacher server) and methods (MEKD's generator) can read a
run's checkpoint; the engine writes them (engine/checkpoint.py) and re-exports these names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distillkit.models.registry import build_model

FORMAT = "distillkit-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, or not a distillkit checkpoint."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        # the underlying library's explanation: shown by the CLI only under --verbose
        self.detail = detail


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
    numeric = "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64"
    return [
        reconstruct,
        # files written under numpy 1.x name the same function by its old module
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *(type(np.dtype(t)) for t in numeric.split()),
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
    return model.eval(), state
