"""Method registry: each method file registers a builder and, optionally, a dataclass of options."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_REGISTRY: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class MethodSpec:
    """How to build one method.

    build(cfg, options, student, teacher, bundle) -> Distiller, where `options` is an instance of
    `options_cls` filled from the config's `options:` mapping (None when the method has none).
    `teacher_cache`: the method asks its teacher about training samples by index only (with
    augment=false), so the runner may cache the answers on disk (config key teacher_cache).
    """

    name: str
    build: Callable[..., Any]
    options_cls: type | None = None
    needs_teacher: bool = True
    description: str = ""
    teacher_cache: bool = False


def register_method(
    name: str,
    *,
    options: type | None = None,
    needs_teacher: bool = True,
    description: str = "",
    teacher_cache: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a builder function: `@register_method("kd")`."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name].build is not fn:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = MethodSpec(name, fn, options, needs_teacher, description, teacher_cache)
        return fn

    return deco


@functools.cache
def _load_all() -> None:
    """Import every module of distillkit.methods so their registrations run."""
    import distillkit.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"distillkit.methods.{info.name}")


def list_methods() -> list[str]:
    """Names of all registered methods."""
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The spec of a method; unknown names raise ValueError listing the valid ones."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
