"""distillkit: compress deep models and the data they learn from.

`distillkit.distill`, `distillkit.train`, `distillkit.run` and `distillkit.load_config` are
resolved on first use, so `import distillkit` stays cheap (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module defining it; the package root is the bottom layer, so the modules above it are
# looked up by name at first access instead of imported here
_LAZY = {
    "distill": "distillkit.api",
    "train": "distillkit.api",
    "run": "distillkit.runner",
    "load_config": "distillkit.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """The public API functions, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distillkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazy ones included."""
    return sorted(set(globals()) | set(_LAZY))
