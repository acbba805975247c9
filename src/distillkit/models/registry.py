"""Model registry: ``register`` zoo builders by name and ``build_model`` from a name or import path.

This module imports no model file; ``distillkit.models`` imports them so the registry is full.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from .external import build_external_model, is_import_spec

Builder = Callable[..., nn.Module]
_B = TypeVar("_B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[_B], _B]:
    """Register a model builder under ``name`` (decorator)."""

    def decorator(builder: _B) -> _B:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        if is_import_spec(name):
            raise ValueError(f"model name {name!r} must not look like an import path (a:b)")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Return the sorted names of all registered (zoo) models."""
    return sorted(_REGISTRY)


def build_model(spec: str, in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name, or a user model given as ``file.py:Name`` / ``module:Name``."""
    if is_import_spec(spec):
        return build_external_model(
            spec, in_channels=in_channels, num_classes=num_classes, **kwargs
        )
    try:
        builder = _REGISTRY[spec]
    except KeyError:
        close = difflib.get_close_matches(spec, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown model {spec!r}.{hint} Valid models: {', '.join(list_models())}, "
            "or path/to/file.py:Name or package.module:Name"
        ) from None
    return builder(in_channels=in_channels, num_classes=num_classes, **kwargs)
