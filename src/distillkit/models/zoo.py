"""Model registry: build any zoo model by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

from torch import nn

Builder = Callable[..., nn.Module]
_B = TypeVar("_B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[_B], _B]:
    """Register a model builder under ``name`` (decorator)."""

    def decorator(builder: _B) -> _B:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Return the sorted names of all registered models."""
    return sorted(_REGISTRY)


def build_model(name: str, in_channels: int = 3, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build the registered model ``name`` for the given input channels and classes."""
    try:
        builder = _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Valid models: {', '.join(list_models())}"
        ) from None
    return builder(in_channels=in_channels, num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Return the number of (optionally only trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# The built-in models register themselves on import; importing them here (after
# ``register`` exists) guarantees the registry is complete whenever zoo is imported.
from . import cnn, mobilenet, resnet, vgg, vit, wrn  # noqa: E402, F401
